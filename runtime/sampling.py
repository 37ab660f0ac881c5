"""Choosing the next token from logits: greedy, or temperature then top-k then top-p (nucleus).

The one random number a step uses comes only from the request's seed and the position of the
token being chosen (``numpy.random.default_rng([seed, position])``), never from a generator's
running state: a seeded sequence repeats exactly on a retry, after a failover, or when another
node holding the LM head samples it from the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import InvalidSamplingParams, NonFiniteLogits

MAX_SEED = 2**63 - 1
FIELDS = ("temperature", "top_k", "top_p", "seed")
_FIRST_NUCLEUS = 64  # candidates sorted first for top-p; grown x8 until the mass is reached


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float | np.floating)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence samples; checked on construction, so every instance is valid.

    ``temperature == 0`` is greedy (as is ``top_k == 1``); ``top_k == 0`` and ``top_p == 1``
    turn those filters off; ``seed`` with the token's position fixes the draw.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidSamplingParams(
                "temperature",
                f"temperature: must be a finite number >= 0 (0 means greedy), got {t!r}",
            )
        if not _is_int(k) or k < 0:
            raise InvalidSamplingParams(
                "top_k", f"top_k: must be an integer >= 0 (0 turns top-k off), got {k!r}"
            )
        if not _is_number(p) or not (0 < p <= 1):
            raise InvalidSamplingParams(
                "top_p", f"top_p: must be a number in (0, 1] (1 turns top-p off), got {p!r}"
            )
        if not _is_int(s) or not (0 <= s <= MAX_SEED):
            raise InvalidSamplingParams(
                "seed", f"seed: must be an integer in 0..2**63-1, got {s!r}"
            )
        # plain Python numbers, whatever the caller passed (numpy scalars, ints for floats)
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "seed", int(s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sampling_params(
    raw: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    seed_if_absent: int = 0,
) -> SamplingParams:
    """SamplingParams from a request body: only the keys of ``FIELDS`` are read.

    A key absent or null in ``raw`` takes the package's ``defaults`` (e.g. the manifest's
    generation defaults), then the dataclass default; an absent seed takes ``seed_if_absent``
    (a caller wanting unrepeatable runs passes a fresh random one per request).
    """
    if not isinstance(raw, Mapping):
        raise InvalidSamplingParams("parameters", f"parameters: must be an object, got {raw!r}")
    fallback: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    fallback["seed"] = seed_if_absent
    chosen: dict[str, Any] = {}
    for name in FIELDS:
        value = raw.get(name)
        if value is None and defaults is not None:
            value = defaults.get(name)
        chosen[name] = fallback[name] if value is None else value
    return SamplingParams(**chosen)


def uniform_draw(seed: int, position: int) -> float:
    """The step's uniform number in [0, 1): a pure function of (seed, position)."""
    return float(np.random.default_rng([seed, position]).random())


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> tuple[int, float]:
    """The next token id for one sequence and its logprob.

    ``logits`` [V] (any float dtype); ``position`` is the index in the sequence of the token
    being chosen (prompt length + tokens generated so far), so a retried step draws the same.
    The logprob is the log-softmax over the FULL vocabulary of ``logits / temperature``
    (of the raw logits when greedy), before top-k/top-p cut anything. Ties go to the lowest id.
    NaN or +inf logits, or every logit -inf, raise NonFiniteLogits; -inf masks a token.
    """
    row = np.asarray(logits)
    if row.ndim != 1:
        raise ValueError(f"logits: expected one row [V], got shape {row.shape}")
    return sample_batch(row[None, :], [params], [position])[0]


def sample_batch(
    logits: np.ndarray, params: Sequence[SamplingParams], positions: Sequence[int]
) -> list[tuple[int, float]]:
    """``sample`` for each row of ``logits`` [B, V]; row i uses params[i] and positions[i].

    Row results equal ``sample`` of that row alone (the draw depends on nothing else).
    """
    rows = np.asarray(logits, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"logits: expected [B, V] with V >= 1, got shape {rows.shape}")
    if not (len(params) == len(positions) == rows.shape[0]):
        raise ValueError(
            f"logits has {rows.shape[0]} rows but {len(params)} params and "
            f"{len(positions)} positions were given"
        )
    for position in positions:
        if not _is_int(position) or position < 0:
            raise ValueError(f"positions: must be integers >= 0, got {position!r}")
    peak = rows.max(axis=1, keepdims=True)
    _check_finite(rows, peak[:, 0], positions)
    shifted = rows - peak  # the largest logit is 0: exp cannot overflow, -inf stays a mask
    temperatures = np.array([p.temperature if p.temperature > 0 else 1.0 for p in params])
    with np.errstate(over="ignore"):  # a tiny temperature sends far logits to -inf: masked
        scaled = shifted / temperatures[:, None] if (temperatures != 1.0).any() else shifted
    log_norm = np.log(np.sum(np.exp(scaled), axis=1))
    chosen: list[tuple[int, float]] = []
    for i, (p, position) in enumerate(zip(params, positions, strict=True)):
        token = _choose(shifted[i], scaled[i], float(log_norm[i]), p, int(position))
        chosen.append((token, float(scaled[i, token] - log_norm[i])))
    return chosen


def _check_finite(rows: np.ndarray, peak: np.ndarray, positions: Sequence[int]) -> None:
    # a row's max is NaN if any entry is NaN, +inf if any is, -inf if all are: one test for all
    bad = np.flatnonzero(~np.isfinite(peak))
    if bad.size == 0:
        return
    i = int(bad[0])
    row = rows[i]
    if np.isnan(row).any():
        what = f"{int(np.isnan(row).sum())} NaN"
    elif np.isposinf(row).any():
        what = f"{int(np.isposinf(row).sum())} +inf"
    else:
        what = "every entry -inf (all tokens masked)"
    raise NonFiniteLogits(
        f"logits of row {i} (position {positions[i]}) hold {what}: the model's output is "
        "broken and no token can be sampled; logits must be finite (-inf masks a token)"
    )


def _choose(
    shifted: np.ndarray, scaled: np.ndarray, log_norm: float, p: SamplingParams, position: int
) -> int:
    if p.greedy:
        # argmax of the unscaled row: a tiny temperature cannot turn near-ties into ties
        return int(np.argmax(shifted))  # the first maximum, i.e. the lowest id
    vocab = scaled.size
    ids: np.ndarray | None = None  # None: every id, in id order
    if 0 < p.top_k < vocab:
        ids = top_sorted(scaled, p.top_k)
    if p.top_p < 1.0:
        ids = _nucleus(scaled, ids, log_norm, p.top_p)
    weights = np.exp(scaled if ids is None else scaled[ids])
    cdf = np.cumsum(weights)
    pick = int(np.searchsorted(cdf, uniform_draw(p.seed, position) * cdf[-1], side="right"))
    if pick == cdf.size:  # u * total rounded up to total: the last token with any weight
        pick = int(np.flatnonzero(weights > 0)[-1])
    return pick if ids is None else int(ids[pick])


def top_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest scores, by score descending then id ascending (deterministic ties).

    O(V) selection then a sort of k, instead of sorting the whole vocabulary.
    """
    vocab = scores.size
    if k >= vocab:
        return np.argsort(-scores, kind="stable")
    threshold = np.partition(scores, vocab - k)[vocab - k]  # the k-th largest value
    above = np.flatnonzero(scores > threshold)
    at = np.flatnonzero(scores == threshold)[: k - above.size]
    ids = np.concatenate([above, at])
    return ids[np.lexsort((ids, -scores[ids]))]


def _nucleus(
    scaled: np.ndarray, ids: np.ndarray | None, log_norm: float, top_p: float
) -> np.ndarray:
    """The smallest prefix of the sorted candidates whose probability reaches top_p (>= 1 id).

    Probabilities are renormalised over the candidates (top-k's, or the whole vocabulary).
    """
    if ids is not None:
        kept = scaled[ids]
        mass = np.exp(kept - np.log(np.sum(np.exp(kept))))
        return ids[: _prefix(np.cumsum(mass), top_p)]
    size = _FIRST_NUCLEUS
    while True:
        size = min(size, scaled.size)
        ids = top_sorted(scaled, size)
        cumulative = np.cumsum(np.exp(scaled[ids] - log_norm))
        # cumsum is sequential, so these prefix sums equal those of a full sort
        if cumulative[-1] >= top_p or size == scaled.size:
            return ids[: _prefix(cumulative, top_p)]
        size *= 8


def _prefix(cumulative: np.ndarray, top_p: float) -> int:
    # keep a token while the mass before it is below top_p; rounding may leave the total < 1
    return min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, cumulative.size)
