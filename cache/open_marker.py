"""Whether the machine went down while the result cache's files were open.

The result cache commits without fsync (``sync=False``). LMDB survives a crash of the process
that way, but after a power loss or kernel crash unflushed pages can leave a damaged file, and
LMDB aborts the whole process (a C assertion) on some damage. So while the environment is open
a marker file holds the boot id; a marker from another boot means the machine stopped with the
cache open, and the cache must start empty rather than risk crashing the coordinator at start.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

MARKER = "OPEN"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id ("" where the system does not say: then boots are never told apart)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def opened_in_earlier_boot(path: Path) -> bool:
    """True if the files under ``path`` were left open by an earlier boot of the machine."""
    try:
        marked = (path / MARKER).read_text().strip()
    except OSError:
        return False  # closed cleanly, or never opened
    return marked != boot_id()


def mark_open(path: Path) -> None:
    (path / MARKER).write_text(boot_id() + "\n")


def mark_closed(path: Path) -> None:
    with contextlib.suppress(OSError):  # a removed directory has no marker to remove
        (path / MARKER).unlink()
