"""How much memory a loaded span takes: what placement budgets with and what a node subtracts
before it counts memory for KV caches (measured: RSS after warm-up stayed within
1.15 x the span's bytes + 150 MB)."""

from __future__ import annotations

import math
from fractions import Fraction

DEFAULT_OVERHEAD = 1.15
DEFAULT_FIXED_OVERHEAD = 150 * 2**20


def span_need(
    span_bytes: int,
    overhead: float = DEFAULT_OVERHEAD,
    fixed_overhead: int = DEFAULT_FIXED_OVERHEAD,
) -> int:
    """Bytes of node memory a span of `span_bytes` needs: ceil(overhead * bytes) + fixed.

    The overhead is taken as the decimal it is written as (1.15 = 23/20), so the result is exact
    and the same everywhere it is computed.
    """
    return math.ceil(ratio(overhead) * span_bytes) + fixed_overhead


def ratio(overhead: float) -> Fraction:
    """The overhead as the decimal it is written as (1.15 = 23/20): exact everywhere."""
    return Fraction(repr(float(overhead)))
