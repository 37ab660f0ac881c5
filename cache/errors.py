"""Typed errors of the cache package.

Each error says what was wrong and what is accepted. The result cache itself never raises on
disk trouble (it degrades to "no cache"); these reach callers only for bad input and for the
job store, whose jobs may not be lost silently.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error raised by ``cache``."""


class InvalidCacheSettings(CacheError, ValueError):
    """A cache setting out of its accepted range."""


class UnsupportedTensor(CacheError):
    """A tensor whose dtype or elements cannot be hashed into a key or stored."""


class CorruptEntry(CacheError):
    """A stored cache value failed its checksum or could not be decoded."""


class JobStoreError(CacheError):
    """The job store could not do what was asked (closed, not started, or a failed write)."""


class JobNotFound(JobStoreError):
    """No job with that id is stored (maps to 404)."""


class InvalidJob(JobStoreError):
    """A job whose fields break the store's rules (e.g. an unknown status)."""
