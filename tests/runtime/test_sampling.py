"""Sampling: greedy, temperature, top-k/top-p against a plain full-sort reference, seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.errors import InvalidRequest, InvalidSamplingParams, NonFiniteLogits
from runtime.sampling import (
    MAX_SEED,
    SamplingParams,
    sample,
    sample_batch,
    sampling_params,
    top_sorted,
    uniform_draw,
)

# chi-square critical values at p = 0.001 by degrees of freedom: the draws below use fixed
# seeds, so each check is deterministic; a wrong distribution lands far above these
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    return z - math.log(np.exp(z).sum())


def kept_probabilities(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The reference: full stable sort, top-k, then the nucleus; probabilities over the vocab."""
    z = (logits - logits.max()) / p.temperature
    order = np.argsort(-z, kind="stable")  # descending, lowest id first among ties
    restricted = 0 < p.top_k < z.size
    if restricted:
        order = order[: p.top_k]
    if p.top_p < 1:
        # the nucleus with the runtime's float steps (a boundary token is in or out alike):
        # kept while the mass ranked above it is below top_p
        log_norm = np.log(np.sum(np.exp(z[order] if restricted else z)))
        cumulative = np.cumsum(np.exp(z[order] - log_norm))
        order = order[: min(int(np.searchsorted(cumulative, p.top_p)) + 1, order.size)]
    mass = np.exp(z[order])
    mass /= mass.sum()
    probabilities = np.zeros(logits.size)
    probabilities[order] = mass
    return probabilities


def reference_token(logits: np.ndarray, p: SamplingParams, position: int) -> int:
    """The same draw as runtime.sampling, but over the full sort: the optimised paths must agree.

    The float steps mirror the runtime's (same sums, same order) so even boundary draws agree.
    """
    z = (logits.astype(np.float64) - logits.max()) / p.temperature
    order = np.argsort(-z, kind="stable")
    restricted = 0 < p.top_k < z.size
    if restricted:
        order = order[: p.top_k]
    if p.top_p < 1:
        log_norm = np.log(np.sum(np.exp(z[order] if restricted else z)))
        cumulative = np.cumsum(np.exp(z[order] - log_norm))
        order = order[: min(int(np.searchsorted(cumulative, p.top_p)) + 1, order.size)]
    elif not restricted:
        order = np.arange(z.size)  # no filter: the runtime walks ids in id order
    cdf = np.cumsum(np.exp(z[order]))
    pick = int(np.searchsorted(cdf, uniform_draw(p.seed, position) * cdf[-1], side="right"))
    return int(order[min(pick, order.size - 1)])


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> tuple[float, int]:
    support = probabilities > 0
    expected = probabilities[support] * counts.sum()
    stat = float((((counts[support] - expected) ** 2) / expected).sum())
    return stat, int(support.sum()) - 1


logit_rows = hnp.arrays(
    np.float32,
    st.integers(1, 200),
    elements=st.floats(-30, 30, width=32) | st.sampled_from([0.0, 1.0, 2.5]),  # ties too
)


@given(logit_rows)
def test_greedy_is_argmax_with_the_lowest_id_on_ties(logits: np.ndarray) -> None:
    token, logprob = sample(logits, SamplingParams(temperature=0.0), position=3)
    assert token == int(np.argmax(logits))  # numpy's argmax returns the first maximum
    assert logprob == pytest.approx(log_softmax(logits.astype(np.float64))[token], abs=1e-9)


@given(logit_rows, st.floats(1e-6, 1e6), st.integers(0, MAX_SEED))
def test_top_k_1_is_greedy_whatever_the_temperature(
    logits: np.ndarray, temperature: float, seed: int
) -> None:
    p = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    assert sample(logits, p, 7)[0] == int(np.argmax(logits))


@given(
    logit_rows,
    st.floats(0.05, 5.0),
    st.integers(0, 300),
    st.floats(0.01, 1.0),
    st.integers(0, MAX_SEED),
    st.integers(0, 10**6),
)
def test_every_path_draws_what_the_full_sort_reference_draws(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int, position: int
) -> None:
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    token, logprob = sample(logits, p, position)
    assert token == reference_token(logits, p, position)
    assert kept_probabilities(logits.astype(np.float64), p)[token] > 0
    expected = log_softmax(logits.astype(np.float64) / temperature)[token]
    assert logprob == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_a_wide_nucleus_grows_its_candidates_and_still_matches_the_reference(top_p: float) -> None:
    # nearly flat logits over 5000 ids: the nucleus needs thousands of candidates
    logits = np.random.default_rng(1).normal(0, 0.1, 5000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=top_p, seed=11)
    for position in range(20):
        assert sample(logits, p, position)[0] == reference_token(logits, p, position)


@given(hnp.arrays(np.float64, st.integers(1, 400), elements=st.integers(-3, 3).map(float)))
@settings(max_examples=50)
def test_top_sorted_is_the_prefix_of_a_stable_descending_sort(scores: np.ndarray) -> None:
    full = np.argsort(-scores, kind="stable")
    for k in {1, 2, scores.size // 2 + 1, scores.size}:
        assert top_sorted(scores, k).tolist() == full[:k].tolist()


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 3.0),
            st.integers(0, 20),
            st.floats(0.05, 1.0),
            st.integers(0, MAX_SEED),
            st.integers(0, 10**9),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=50)
def test_a_seed_and_position_repeat_alone_in_a_batch_and_on_repeat(
    rows: list[tuple[float, int, float, int, int]], data_seed: int
) -> None:
    logits = np.random.default_rng(data_seed).normal(0, 3, (len(rows), 64)).astype(np.float32)
    params = [SamplingParams(t, k, p, s) for t, k, p, s, _ in rows]
    positions = [row[4] for row in rows]
    batch = sample_batch(logits, params, positions)
    assert batch == sample_batch(logits, params, positions)
    assert batch == [sample(logits[i], params[i], positions[i]) for i in range(len(rows))]


def test_different_positions_and_seeds_draw_differently() -> None:
    draws = {uniform_draw(5, position) for position in range(1000)}
    assert len(draws) == 1000
    assert uniform_draw(5, 3) != uniform_draw(6, 3)
    flat = np.zeros(1000, dtype=np.float32)  # uniform over 1000 ids
    tokens = {sample(flat, SamplingParams(seed=5), position)[0] for position in range(200)}
    assert len(tokens) > 150  # ~180 distinct expected; a draw ignoring position gives 1


LOGITS = np.array([2.0, 1.5, 1.5, 0.3, -1.0, 0.8, -3.0], dtype=np.float32)


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.7, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.85),
    ],
    ids=["plain", "cold", "top_k", "top_p", "both"],
)
def test_the_empirical_distribution_over_seeds_matches_the_filtered_softmax(
    p: SamplingParams,
) -> None:
    n = 6000
    params = [SamplingParams(p.temperature, p.top_k, p.top_p, seed) for seed in range(n)]
    chosen = sample_batch(np.tile(LOGITS, (n, 1)), params, [4] * n)
    counts = np.bincount([token for token, _ in chosen], minlength=LOGITS.size)
    probabilities = kept_probabilities(LOGITS.astype(np.float64), p)
    assert counts[probabilities == 0].sum() == 0  # nothing outside top-k/top-p, ever
    stat, dof = chi_square(counts, probabilities)
    assert stat < CHI2_999[dof], (counts.tolist(), probabilities.round(3).tolist())


def test_a_wrong_distribution_fails_the_same_check() -> None:
    # the check has teeth: draws at T=1 are far from softmax(logits / 0.6)
    n = 6000
    chosen = sample_batch(
        np.tile(LOGITS, (n, 1)), [SamplingParams(seed=s) for s in range(n)], [4] * n
    )
    counts = np.bincount([token for token, _ in chosen], minlength=LOGITS.size)
    stat, dof = chi_square(counts, kept_probabilities(LOGITS, SamplingParams(0.6)))
    assert stat > CHI2_999[dof]


@pytest.mark.parametrize(
    ("bad", "what"),
    [(math.nan, "NaN"), (math.inf, r"\+inf")],
)
def test_nan_or_inf_logits_raise_instead_of_choosing(bad: float, what: str) -> None:
    logits = np.array([0.5, bad, 1.0], dtype=np.float32)
    for p in (SamplingParams(0.0), SamplingParams(0.8, top_k=2, top_p=0.9)):
        with pytest.raises(NonFiniteLogits, match=what):
            sample(logits, p, 0)
    rows = np.stack([np.zeros(3, dtype=np.float32), logits])
    with pytest.raises(NonFiniteLogits, match="row 1 \\(position 9\\)"):
        sample_batch(rows, [SamplingParams()] * 2, [8, 9])


def test_minus_inf_masks_a_token_and_all_masked_is_an_error() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0], dtype=np.float32)
    tokens = {sample(logits, SamplingParams(seed=s), 0)[0] for s in range(200)}
    assert tokens == {1, 3}
    with pytest.raises(NonFiniteLogits, match="every entry -inf"):
        sample(np.full(4, -np.inf, dtype=np.float32), SamplingParams(), 0)


def test_a_near_one_total_still_lands_on_a_weighted_token() -> None:
    # only the last id has weight: the fallback for u * total rounding up must find it
    logits = np.array([-np.inf] * 9 + [0.0])
    for seed in range(50):
        assert sample(logits, SamplingParams(seed=seed), seed)[0] == 9


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("temperature", "1.0"),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_p", False),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", 1.0),
        ("seed", True),
    ],
)
def test_bad_params_name_their_field(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParams) as caught:
        sampling_params({field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and repr(value) in str(caught.value)
    assert isinstance(caught.value, InvalidRequest)  # answered as a 400


def test_sampling_params_reads_request_then_defaults_then_its_own() -> None:
    assert sampling_params({}) == SamplingParams()
    raw = {"temperature": 0, "top_p": None, "max_tokens": 5, "seed": np.int64(9)}
    p = sampling_params(raw, defaults={"top_p": 0.9, "top_k": 40}, seed_if_absent=3)
    assert p == SamplingParams(temperature=0.0, top_k=40, top_p=0.9, seed=9)
    assert isinstance(p.seed, int) and isinstance(p.temperature, float)
    assert sampling_params({}, seed_if_absent=77).seed == 77
    assert p.greedy and SamplingParams(top_k=1).greedy and not SamplingParams().greedy
    with pytest.raises(InvalidSamplingParams, match="parameters: must be an object"):
        sampling_params([("temperature", 1.0)])  # type: ignore[arg-type]
