"""Routing kernels against their torch references and against :mod:`fusion.moe`.

Shapes: T tokens · E experts · K top-k · A = T*K assignments

Runs where Triton does: on CUDA, or on the CPU in a process started with ``TRITON_INTERPRET=1`` (the variable
must be set before triton is imported, so it cannot be set from here):
``TRITON_INTERPRET=1 pytest -m interpret tests/kernels``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from fusion.moe import plan, route
from kernels._launch import FORCE_REFERENCE_ENV, block_size, use_triton
from kernels.routing import (
    MAX_EXPERTS,
    expert_counts,
    route_topk,
    routing_plan_reference,
    routing_reference,
)

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels run on CUDA or under TRITON_INTERPRET=1 "
        "(run: TRITON_INTERPRET=1 pytest -m interpret tests/kernels)",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Weights tolerance (absolute and relative). Both sides compute in float32 from the same inputs (float16
#: logits are upcast before any arithmetic), so they differ only by the order of the K-term sum and the
#: exp/sigmoid implementation: a few float32 ulps (observed <= 2.4e-7 with route_scale 2.5). Using the biased
#: scores for the weights, or skipping the renormalisation, moves weights by >= 1e-3 and fails.
WEIGHT_TOL = 1e-6
#: Indices are compared exactly. Random inputs are drawn so that the first K+1 biased scores of every row are
#: at least this far apart (about 80 float32 ulps at 1.0): an exact comparison then tests the kernel, not
#: rounding, on every device. Exact ties are tested separately with equal inputs.
SELECTION_MARGIN = 1e-5
#: Seeds tried per shape before the generator gives up on finding well-separated inputs.
_MAX_DRAWS = 50

def _top_ks(n_experts: int) -> list[int]:
    return [1, 2, 4, n_experts] if n_experts <= 16 else [1, 2, 4]


def _matrix() -> list[tuple[int, int, int, str, torch.dtype]]:
    """Every (T, E) once per score function; K and the logits dtype rotate so each E meets each of its K
    with both score functions and both dtypes recur on every shape."""
    cases = []
    for (t_idx, n_tokens), (e_idx, n_experts), (s_idx, score) in itertools.product(
        enumerate((1, 7, 64, 257)), enumerate((4, 16, 13, 64)), enumerate(("sigmoid", "softmax"))
    ):
        ks = _top_ks(n_experts)
        top_k = ks[(t_idx + s_idx) % len(ks)]
        dtype = (torch.float32, torch.float16)[(t_idx + e_idx + s_idx) % 2]
        cases.append((n_tokens, n_experts, top_k, score, dtype))
    return cases


MATRIX = _matrix()
MATRIX_IDS = [f"T{t}-E{e}-K{k}-{s}-{str(d).removeprefix('torch.')}" for t, e, k, s, d in MATRIX]


def _router_inputs(
    n_tokens: int, n_experts: int, top_k: int, score: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[T, E]`` in ``dtype`` and a float32 bias ``[E]`` whose top K+1 choices are well apart."""
    for draw in range(_MAX_DRAWS):
        gen = torch.Generator().manual_seed(seed * _MAX_DRAWS + draw)
        logits = torch.randn(n_tokens, n_experts, generator=gen).to(dtype)  # [T, E]
        bias = 0.1 * torch.randn(n_experts, generator=gen)  # [E]
        x = logits.float()
        scores = torch.sigmoid(x) if score == "sigmoid" else torch.softmax(x, dim=-1)  # [T, E]
        top = torch.sort(scores + bias, dim=-1, descending=True).values[:, : top_k + 1]  # [T, <=K+1]
        gaps = top[:, :-1] - top[:, 1:]  # [T, <=K]
        if gaps.numel() == 0 or float(gaps.min()) > SELECTION_MARGIN:
            return logits.to(DEVICE), bias.to(DEVICE)
    pytest.fail(
        f"no well-separated router inputs for T={n_tokens}, E={n_experts}, K={top_k} in {_MAX_DRAWS} draws"
    )


def _assert_matches_reference(
    weights: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, top_k: int,
    score: str, route_scale: float,
) -> None:
    ref_w, ref_i = routing_reference(logits, bias, top_k, score, route_scale)
    n_tokens = logits.shape[0]
    assert weights.shape == (n_tokens, top_k) and indices.shape == (n_tokens, top_k)  # [T, K]
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, atol=WEIGHT_TOL, rtol=WEIGHT_TOL)


# ------------------------------------------------------------------------------------- references = fusion
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_routing_reference_equals_fusion_route(score: str) -> None:
    logits, bias = _router_inputs(64, 13, 4, score, torch.float32)
    weights, indices = routing_reference(logits, bias, 4, score, 2.5)
    spec = route(logits, bias, 4, score, 2.5)
    assert torch.equal(indices, spec.indices)
    assert torch.equal(weights, spec.weights)


def test_routing_plan_reference_equals_fusion_plan() -> None:
    indices = torch.randint(0, 12, (64, 4), generator=torch.Generator().manual_seed(1)).to(DEVICE)  # [T, K]
    counts, offsets, sorted_token, inverse = routing_plan_reference(indices, 13)
    spec = plan(indices, 13)
    for got, want in ((counts, spec.counts), (offsets, spec.offsets), (sorted_token, spec.sorted_token),
                      (inverse, spec.inverse)):
        assert got.dtype == torch.int64
        assert torch.equal(got, want)
    assert counts[12] == 0  # an expert with no tokens


# ------------------------------------------------------------------------------------------ routing matrix
@pytest.mark.parametrize(("n_tokens", "n_experts", "top_k", "score", "dtype"), MATRIX, ids=MATRIX_IDS)
def test_route_topk_matches_reference(
    n_tokens: int, n_experts: int, top_k: int, score: str, dtype: torch.dtype
) -> None:
    logits, bias = _router_inputs(n_tokens, n_experts, top_k, score, dtype)
    route_scale = 2.5
    weights, indices = route_topk(logits, bias, top_k, score, route_scale)
    _assert_matches_reference(weights, indices, logits, bias, top_k, score, route_scale)
    want_sum = torch.full((n_tokens,), route_scale, device=DEVICE)  # [T]
    torch.testing.assert_close(weights.sum(dim=-1), want_sum, atol=WEIGHT_TOL, rtol=WEIGHT_TOL)


@pytest.mark.parametrize(("n_tokens", "n_experts", "top_k", "score", "dtype"), MATRIX, ids=MATRIX_IDS)
def test_expert_counts_matches_bincount(
    n_tokens: int, n_experts: int, top_k: int, score: str, dtype: torch.dtype
) -> None:
    logits, bias = _router_inputs(n_tokens, n_experts, top_k, score, dtype)
    _, indices = routing_reference(logits, bias, top_k, score)
    counts = expert_counts(indices, n_experts)  # [E]
    assert counts.shape == (n_experts,) and counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=n_experts))
    assert int(counts.sum()) == n_tokens * top_k
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=DEVICE)  # [E+1]
    offsets[1:] = torch.cumsum(counts, dim=0)
    assert bool((offsets[1:] >= offsets[:-1]).all())
    assert torch.equal(offsets, routing_plan_reference(indices, n_experts)[1])


# -------------------------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_all_tokens_to_one_expert_leaves_the_others_empty(score: str) -> None:
    n_tokens, n_experts, hot = 64, 13, 5
    logits, bias = _router_inputs(n_tokens, n_experts, 2, score, torch.float32)
    bias[hot] = 1e3  # far above any score in [0, 1]
    weights, indices = route_topk(logits, bias, 2, score)
    _assert_matches_reference(weights, indices, logits, bias, 2, score, 1.0)
    assert bool((indices[:, 0] == hot).all())  # every row chooses the hot expert first

    weights, indices = route_topk(logits, bias, 1, score)
    _assert_matches_reference(weights, indices, logits, bias, 1, score, 1.0)
    counts = expert_counts(indices, n_experts)  # [E]
    want = torch.zeros(n_experts, dtype=torch.int64, device=DEVICE)
    want[hot] = n_tokens
    assert torch.equal(counts, want)  # every other expert has no tokens
    assert torch.equal(weights, torch.ones(n_tokens, 1, device=DEVICE))  # K = 1: s / s is exactly 1


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_experts", [13, 16])
def test_k_equals_e_is_a_full_ranking(score: str, n_experts: int) -> None:
    logits, bias = _router_inputs(7, n_experts, n_experts, score, torch.float32)
    weights, indices = route_topk(logits, bias, n_experts, score)
    _assert_matches_reference(weights, indices, logits, bias, n_experts, score, 1.0)
    assert torch.equal(indices.sort(dim=-1).values, torch.arange(n_experts, device=DEVICE).expand(7, -1))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_ties_go_to_the_lowest_expert_index(score: str) -> None:
    n_tokens, n_experts, top_k = 5, 13, 4
    logits = torch.zeros(n_tokens, n_experts, device=DEVICE)  # every score equal
    bias = torch.zeros(n_experts, device=DEVICE)
    weights, indices = route_topk(logits, bias, top_k, score)
    _assert_matches_reference(weights, indices, logits, bias, top_k, score, 1.0)
    assert torch.equal(indices, torch.arange(top_k, device=DEVICE).expand(n_tokens, -1))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / top_k), atol=WEIGHT_TOL, rtol=WEIGHT_TOL)

    bias[[3, 7, 11]] = 1.0  # three tied leaders, then ties among the rest
    _, indices = route_topk(logits, bias, top_k, score)
    assert torch.equal(indices, torch.tensor([3, 7, 11, 0], device=DEVICE).expand(n_tokens, -1))


def test_one_token_float16_logits() -> None:
    logits, bias = _router_inputs(1, 64, 4, "sigmoid", torch.float16)
    weights, indices = route_topk(logits, bias, 4)
    _assert_matches_reference(weights, indices, logits, bias, 4, "sigmoid", 1.0)


# -------------------------------------------------------------------------------------------- input checks
def _logits(n_tokens: int = 4, n_experts: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(n_tokens, n_experts, dtype=dtype, device=DEVICE)


def _bias(n_experts: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(n_experts, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    ("logits", "bias", "top_k", "score", "error", "match"),
    [
        (torch.zeros(8), _bias(), 2, "sigmoid", ValueError, r"logits must be \[T, E\] .* got shape \(8,\)"),
        (_logits(dtype=torch.int32), _bias(), 2, "sigmoid", TypeError, r"floating-point .* torch.int32"),
        (_logits(dtype=torch.float64), _bias(), 2, "sigmoid", TypeError, r"dtype in .* got torch.float64"),
        (_logits(), _bias(dtype=torch.float16), 2, "sigmoid", TypeError, r"float32; got torch.float16"),
        (_logits(), _bias(7), 2, "sigmoid", ValueError, r"bias must be \[E\] with E=8 .* got shape \(7,\)"),
        (_logits(), _bias(), 0, "sigmoid", ValueError, r"top_k must be an int in \[1, E=8\]; got 0"),
        (_logits(), _bias(), 9, "sigmoid", ValueError, r"top_k must be an int in \[1, E=8\]; got 9"),
        (_logits(), _bias(), 2, "relu", ValueError, r"score must be one of .* got 'relu'"),
        (_logits(n_experts=257), _bias(257), 2, "sigmoid", ValueError, r"at most E=256 experts .*E=257"),
    ],
    ids=[
        "rank", "int-logits", "float64-logits", "float16-bias", "bias-length", "k0", "k-above-e", "score",
        "too-many-experts",
    ],
)
def test_route_topk_rejects_bad_inputs(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, score: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        route_topk(logits, bias, top_k, score)


def test_route_topk_rejects_logits_that_need_grad() -> None:
    with pytest.raises(ValueError, match="forward only: expected logits without grad"):
        route_topk(_logits().requires_grad_(), _bias(), 2)


@pytest.mark.parametrize(
    ("indices", "n_experts", "error", "match"),
    [
        (torch.zeros(4, 2, dtype=torch.int32), 8, TypeError, r"indices must be int64; got dtype torch.int32"),
        (torch.zeros(8, dtype=torch.int64), 8, ValueError, r"\[T, K\] \(rank 2\); got shape \(8,\)"),
        (torch.full((4, 2), 8, dtype=torch.int64), 8, ValueError, r"lie in \[0, 8\); got values from 8 to 8"),
        (torch.zeros(4, 2, dtype=torch.int64), 0, ValueError, r"n_experts must be an int >= 1; got 0"),
    ],
    ids=["int32", "rank", "out-of-range", "no-experts"],
)
def test_expert_counts_rejects_bad_inputs(
    indices: torch.Tensor, n_experts: int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        expert_counts(indices.to(DEVICE), n_experts)


# ------------------------------------------------------------------------------------------------ dispatch
def test_force_reference_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, bias = _router_inputs(7, 13, 2, "sigmoid", torch.float32)
    assert use_triton(logits)
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    assert not use_triton(logits)
    weights, indices = route_topk(logits, bias, 2)
    ref_w, ref_i = routing_reference(logits, bias, 2)
    assert torch.equal(weights, ref_w) and torch.equal(indices, ref_i)
    # only the reference accepts what the kernel refuses: float64 logits and E > MAX_EXPERTS
    weights, _ = route_topk(logits.double(), bias, 2)
    assert weights.dtype == torch.float64
    wide = _logits(n_experts=MAX_EXPERTS + 1)
    assert route_topk(wide, _bias(MAX_EXPERTS + 1), 2)[1].shape == (4, 2)
    assert torch.equal(expert_counts(indices, 13), routing_plan_reference(indices, 13)[0])


@pytest.mark.parametrize(
    ("n", "lo", "hi", "want"),
    [(1, 16, 1024, 16), (17, 16, 1024, 32), (64, 16, 1024, 64), (5000, 16, 1024, 1024), (3, 1, 256, 4),
     (0, 1, 8, 1)],
)
def test_block_size_is_a_clamped_power_of_two(n: int, lo: int, hi: int, want: int) -> None:
    assert block_size(n, lo, hi) == want
