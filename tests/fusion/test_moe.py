"""Sparse MoE reference: routing invariants, routing metadata, the expert loop against a dense computation,
gradients, the module contract, aux-loss-free bias balancing and router statistics.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.moe import (
    MoEConfig,
    RouterStats,
    Routing,
    RoutingPlan,
    SparseMoE,
    SwiGLU,
    expert_ffn_reference,
    plan,
    route,
    router_stats,
)
from inspection.errors import ConfigError

#: fp32 sums of at most E <= 16 renormalised weights: a few ulps (1.2e-7 each) of rounding, far below any
#: routing mistake (a wrong or missing expert changes the sum by a whole score share, >= 1e-3 here)
WEIGHT_SUM_TOL = 1e-5
#: the per-expert loop and the dense einsum add the same fp32 products in different orders; outputs are O(1),
#: so the difference is a few ulps times D or H (<= 32 here); a wrong expert, slot or weight errs by O(0.1)
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
#: gradcheck's finite differences in float64; its own defaults (eps 1e-6, atol 1e-5) are made for this
GRADCHECK_EPS = 1e-6
GRADCHECK_ATOL = 1e-5
#: a bias this large beats any score difference: sigmoid and softmax scores lie in (0, 1)
FORCING_BIAS = 10.0
#: 200 steps of rate 0.01 let the bias move by up to 2, wider than the spread of the sigmoid scores, so the
#: rule can undo the skew within the test; the default 1e-3 is for thousands of training steps
BALANCING_RATE = 0.01
BALANCING_STEPS = 200
#: the skewed router starts with nearly every token on expert 0 (ratio close to E = 4); the sign rule then
#: oscillates around balance by about one rate step, which leaves the ratio within ~10% of 1 (measured 1.06)
SKEWED_MIN_RATIO = 3.5
BALANCED_MAX_RATIO = 1.25

HYPOTHESIS = settings(max_examples=60, deadline=None)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expert_weights(e: int, d: int, h: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    g = generator(seed)
    w_gate = torch.randn(e, d, h, generator=g, dtype=dtype) / math.sqrt(d)
    w_up = torch.randn(e, d, h, generator=g, dtype=dtype) / math.sqrt(d)
    w_down = torch.randn(e, h, d, generator=g, dtype=dtype) / math.sqrt(h)
    return w_gate, w_up, w_down


def random_routing(t: int, e: int, k: int, seed: int = 0, score: str = "sigmoid", bias=None,
                   dtype=torch.float32) -> Routing:
    logits = 2.0 * torch.randn(t, e, generator=generator(seed + 1), dtype=dtype)
    bias = torch.zeros(e) if bias is None else bias
    return route(logits, bias, k, score)


def dense_expert_ffn(x, routing, w_gate, w_up, w_down) -> torch.Tensor:
    """Independent computation: every expert on every token, then gather each token's K and mix."""
    x = x.double()
    gate = torch.einsum("td,edh->eth", x, w_gate.double())  # [E, T, H]
    h = F.silu(gate) * torch.einsum("td,edh->eth", x, w_up.double())  # [E, T, H]
    every = torch.einsum("eth,ehd->etd", h, w_down.double())  # [E, T, D]
    tokens = torch.arange(x.shape[0]).unsqueeze(1)  # [T, 1]
    chosen = every[routing.indices, tokens]  # [T, K, D]
    return (routing.weights.double().unsqueeze(-1) * chosen).sum(dim=1)  # [T, D]


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_are_valid():
    cfg = MoEConfig(dim=8, hidden=16)
    assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.score) == (16, 2, 1, "sigmoid")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(dim=0), "dim"),
        (dict(hidden=-1), "hidden"),
        (dict(n_experts=0), "n_experts"),
        (dict(top_k=0), "top_k"),
        (dict(n_experts=4, top_k=5), "top_k"),
        (dict(n_shared=-1), "n_shared"),
        (dict(score="relu"), "score"),
        (dict(bias_update_rate=-1e-3), "bias_update_rate"),
        (dict(bias_update_rate=float("nan")), "bias_update_rate"),
        (dict(route_scale=0.0), "route_scale"),
        (dict(dim=8.0), "dim"),
        (dict(top_k=True), "top_k"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    args = dict(dim=8, hidden=16) | overrides
    with pytest.raises(ConfigError, match=fragment) as info:
        MoEConfig(**args)
    assert "got" in str(info.value)  # says what arrived
    assert isinstance(info.value, ValueError)


def test_config_allows_no_shared_expert():
    assert SparseMoE(MoEConfig(dim=4, hidden=4, n_experts=2, top_k=1, n_shared=0)).shared is None


# ----------------------------------------------------------------------------------- routing invariants
def check_plan(p: RoutingPlan, indices: torch.Tensor, n_experts: int) -> None:
    t, k = indices.shape
    flat = indices.reshape(-1)
    for name in ("sorted_token", "sorted_slot", "counts", "offsets", "inverse"):
        assert getattr(p, name).dtype == torch.int64, name
    assert p.sorted_token.shape == p.sorted_slot.shape == p.inverse.shape == (t * k,)
    assert p.counts.shape == (n_experts,) and p.offsets.shape == (n_experts + 1,)
    assert int(p.counts.sum()) == t * k
    assert torch.equal(p.counts, torch.bincount(flat, minlength=n_experts))
    assert int(p.offsets[0]) == 0 and int(p.offsets[-1]) == t * k
    assert bool((p.offsets[1:] >= p.offsets[:-1]).all())
    assert torch.equal(p.offsets[1:] - p.offsets[:-1], p.counts)
    # the sorted order lists (token, slot) pairs; their experts are grouped by expert, segment by segment
    flat_ids = p.sorted_token * k + p.sorted_slot  # [T*K] flat assignment at each sorted position
    assert torch.equal(torch.sort(flat_ids).values, torch.arange(t * k))  # a permutation
    sorted_experts = indices[p.sorted_token, p.sorted_slot]  # [T*K]
    for e in range(n_experts):
        segment = slice(int(p.offsets[e]), int(p.offsets[e + 1]))
        assert bool((sorted_experts[segment] == e).all())
        assert bool((flat_ids[segment][1:] > flat_ids[segment][:-1]).all())  # stable: flat order kept
    # the inverse undoes the permutation
    assert torch.equal(sorted_experts[p.inverse], flat)
    assert torch.equal(flat_ids[p.inverse], torch.arange(t * k))
    assert torch.equal(p.sorted_token[p.inverse], torch.arange(t).repeat_interleave(k))
    assert torch.equal(p.sorted_slot[p.inverse], torch.arange(k).repeat(t))


@HYPOTHESIS
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    score=st.sampled_from(["sigmoid", "softmax"]),
    route_scale=st.sampled_from([1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_routing_invariants(t, e, k_frac, score, route_scale, seed):
    k = 1 + round(k_frac * (e - 1))
    g = generator(seed)
    logits = 3.0 * torch.randn(t, e, generator=g)
    bias = 0.1 * torch.randn(e, generator=g)
    r = route(logits, bias, k, score, route_scale)

    assert r.weights.shape == r.indices.shape == (t, k) and r.scores.shape == (t, e)
    assert r.weights.dtype == r.scores.dtype == torch.float32 and r.indices.dtype == torch.int64
    expected_scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    torch.testing.assert_close(r.scores, expected_scores)
    # weights renormalise to route_scale
    torch.testing.assert_close(r.weights.sum(-1), torch.full((t,), route_scale), atol=WEIGHT_SUM_TOL, rtol=0)
    # indices in range and distinct per token
    assert bool(((r.indices >= 0) & (r.indices < e)).all())
    assert all(len(set(row)) == k for row in r.indices.tolist())
    # chosen by the biased scores: every chosen expert beats every unchosen one
    biased = r.scores + bias
    chosen = biased.gather(1, r.indices)
    if k < e:
        unchosen = biased.scatter(1, r.indices, float("-inf"))
        assert bool((chosen.min(-1).values >= unchosen.max(-1).values).all())
    # weighted by the unbiased scores of the chosen experts
    picked = r.scores.gather(1, r.indices)
    torch.testing.assert_close(r.weights, picked / picked.sum(-1, keepdim=True) * route_scale)

    check_plan(plan(r.indices, e), r.indices, e)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_bias_changes_selection_but_weights_come_from_unbiased_scores(score):
    t, e, k, forced = 32, 6, 2, 3
    logits = 2.0 * torch.randn(t, e, generator=generator(5))
    plain = route(logits, torch.zeros(e), k, score)
    assert not bool((plain.indices == forced).any(-1).all()), "precondition: some tokens skip the expert"

    bias = torch.zeros(e)
    bias[forced] = FORCING_BIAS
    forced_r = route(logits, bias, k, score, route_scale=1.5)
    assert bool((forced_r.indices[:, 0] == forced).all())  # chosen first by every token
    torch.testing.assert_close(forced_r.scores, plain.scores)  # the bias never touches the scores
    picked = forced_r.scores.gather(1, forced_r.indices)  # unbiased scores of the chosen pair
    torch.testing.assert_close(forced_r.weights[:, 0], forced_r.scores[:, forced] / picked.sum(-1) * 1.5)


def test_bias_gets_no_gradient_and_logits_do():
    logits = torch.randn(8, 4, generator=generator(2), requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    r = route(logits, bias, 2)
    (r.weights * torch.arange(2.0)).sum().backward()
    assert bias.grad is None
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_ties_go_to_the_lower_expert_index():
    r = route(torch.zeros(5, 6), torch.zeros(6), 3)
    assert torch.equal(r.indices, torch.arange(3).expand(5, 3))
    torch.testing.assert_close(r.weights, torch.full((5, 3), 1 / 3))


def test_single_token():
    r = random_routing(1, 5, 2)
    assert r.indices.shape == (1, 2)
    check_plan(plan(r.indices, 5), r.indices, 5)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_all_tokens_to_one_expert(score):
    bias = torch.zeros(4)
    bias[2] = FORCING_BIAS
    r = random_routing(9, 4, 1, score=score, bias=bias)
    assert bool((r.indices == 2).all())
    torch.testing.assert_close(r.weights, torch.ones(9, 1))
    p = plan(r.indices, 4)
    assert p.counts.tolist() == [0, 0, 9, 0] and p.offsets.tolist() == [0, 0, 0, 9, 9]
    check_plan(p, r.indices, 4)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_k_equals_e_chooses_every_expert(score):
    t, e = 7, 5
    r = random_routing(t, e, e, score=score)
    assert torch.equal(torch.sort(r.indices, -1).values, torch.arange(e).expand(t, e))
    dense = torch.zeros(t, e).scatter(1, r.indices, r.weights)  # [T, E]
    torch.testing.assert_close(dense, r.scores / r.scores.sum(-1, keepdim=True))
    check_plan(plan(r.indices, e), r.indices, e)


def test_route_rejects_bad_arguments():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=3\]; got 4"):
        route(logits, torch.zeros(3), 4)
    with pytest.raises(ValueError, match="score must be one of"):
        route(logits, torch.zeros(3), 1, "relu")
    with pytest.raises(ValueError, match=r"bias must be \[E\] with E=3"):
        route(logits, torch.zeros(2), 1)
    with pytest.raises(TypeError, match="floating-point"):
        route(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="rank 2"):
        route(torch.zeros(2, 4, 3), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="route_scale"):
        route(logits, torch.zeros(3), 1, route_scale=0.0)


def test_plan_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\); got values from 0 to 3"):
        plan(torch.tensor([[0, 3]]), 3)
    with pytest.raises(TypeError, match="int64"):
        plan(torch.tensor([[0, 1]], dtype=torch.int32), 3)


# ------------------------------------------------------------------------------------ expert computation
@pytest.mark.parametrize(
    "t, d, h, e, k",
    [(1, 8, 16, 4, 2), (7, 5, 3, 4, 2), (16, 8, 16, 8, 2), (13, 6, 10, 5, 5), (32, 8, 8, 16, 1)],
    ids=["one-token", "odd-sizes", "power-of-two", "k-equals-e", "many-experts"],
)
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_expert_ffn_matches_dense(t, d, h, e, k, score):
    x = torch.randn(t, d, generator=generator(3))
    weights = expert_weights(e, d, h)
    r = random_routing(t, e, k, score=score)
    out = expert_ffn_reference(x, r, *weights)
    assert out.shape == (t, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_expert_ffn(x, r, *weights), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_expert_ffn_all_tokens_to_one_expert():
    t, d, h, e = 12, 6, 8, 4
    bias = torch.zeros(e)
    bias[1] = FORCING_BIAS
    r = random_routing(t, e, 2, bias=bias)
    assert bool((r.indices == 1).any(-1).all())
    x = torch.randn(t, d, generator=generator(4))
    weights = expert_weights(e, d, h)
    out = expert_ffn_reference(x, r, *weights)
    torch.testing.assert_close(out.double(), dense_expert_ffn(x, r, *weights), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights_too", [False, True], ids=["fp32-weights", "low-precision-weights"])
def test_expert_ffn_low_precision_inputs_come_back_in_their_dtype(dtype, weights_too):
    t, d, h, e, k = 10, 8, 12, 4, 2
    x = torch.randn(t, d, generator=generator(6)).to(dtype)
    weights = expert_weights(e, d, h)
    if weights_too:
        weights = tuple(w.to(dtype) for w in weights)
    r = random_routing(t, e, k)
    out = expert_ffn_reference(x, r, *weights)
    assert out.dtype == dtype and out.shape == (t, d)
    # computed in fp32 from the same low-precision values, so only the final cast rounds: half an ulp of dtype
    ref = dense_expert_ffn(x, r, *weights)
    torch.testing.assert_close(out.double(), ref, rtol=torch.finfo(dtype).eps, atol=FP32_ATOL)


def test_expert_ffn_gradcheck_in_float64():
    t, d, h, e, k = 5, 3, 4, 3, 2
    r = random_routing(t, e, k, dtype=torch.float64)
    x = torch.randn(t, d, generator=generator(7), dtype=torch.float64, requires_grad=True)
    w_gate, w_up, w_down = (w.requires_grad_() for w in expert_weights(e, d, h, dtype=torch.float64))
    rw = r.weights.detach().clone().requires_grad_()

    def fn(x, w_gate, w_up, w_down, rw):
        routing = Routing(weights=rw, indices=r.indices, scores=r.scores)
        return expert_ffn_reference(x, routing, w_gate, w_up, w_down)

    assert fn(x, w_gate, w_up, w_down, rw).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (x, w_gate, w_up, w_down, rw), eps=GRADCHECK_EPS, atol=GRADCHECK_ATOL)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_route_weights_gradcheck_in_float64(score):
    logits = torch.randn(6, 5, generator=generator(8), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(5)
    assert torch.autograd.gradcheck(
        lambda z: route(z, bias, 2, score, 1.5).weights, (logits,), eps=GRADCHECK_EPS, atol=GRADCHECK_ATOL
    )


def test_expert_without_tokens_gets_zero_gradient():
    t, d, h, e, idle = 16, 6, 8, 4, 2
    bias = torch.zeros(e)
    bias[idle] = -FORCING_BIAS
    r = random_routing(t, e, 2, bias=bias)
    assert not bool((r.indices == idle).any()), "precondition: the idle expert gets no token"
    rw = r.weights.detach().clone().requires_grad_()
    weights = tuple(w.requires_grad_() for w in expert_weights(e, d, h))
    x = torch.randn(t, d, generator=generator(9), requires_grad=True)
    out = expert_ffn_reference(x, Routing(weights=rw, indices=r.indices, scores=r.scores), *weights)
    out.square().sum().backward()
    for w in weights:
        assert bool((w.grad[idle] == 0).all())
        busy = [i for i in range(e) if i != idle]
        assert bool((w.grad[busy].abs().flatten(1).sum(-1) > 0).all())
    assert x.grad is not None and rw.grad is not None and bool(rw.grad.abs().sum() > 0)


def test_expert_ffn_rejects_mismatched_shapes():
    r = random_routing(4, 3, 1)
    w_gate, w_up, w_down = expert_weights(3, 5, 6)
    with pytest.raises(ValueError, match=r"w_gate and w_up must be \[E, D, H\] with D=4"):
        expert_ffn_reference(torch.zeros(4, 4), r, w_gate, w_up, w_down)
    with pytest.raises(ValueError, match=r"w_down must be \[E, H, D\]"):
        expert_ffn_reference(torch.zeros(4, 5), r, w_gate, w_up, w_down.transpose(1, 2))
    with pytest.raises(ValueError, match="routing covers 4 tokens but x has T=3"):
        expert_ffn_reference(torch.zeros(3, 5), r, w_gate, w_up, w_down)
    with pytest.raises(ValueError, match="E=3 experts but the weights have E=2"):
        expert_ffn_reference(torch.zeros(4, 5), r, w_gate[:2], w_up[:2], w_down[:2])


def test_swiglu_keeps_leading_shape():
    block = SwiGLU(6, 10)
    assert block(torch.randn(2, 3, 6)).shape == (2, 3, 6)


# ----------------------------------------------------------------------------------------- module contract
CONTRACT_CONFIGS = {
    "sigmoid-shared": MoEConfig(dim=8, hidden=16, n_experts=4, top_k=2),
    "softmax-no-shared": MoEConfig(dim=8, hidden=12, n_experts=5, top_k=2, n_shared=0, score="softmax"),
    "k-equals-e-two-shared": MoEConfig(dim=6, hidden=8, n_experts=3, top_k=3, n_shared=2, route_scale=2.0),
}


def make_moe(cfg: MoEConfig, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    return SparseMoE(cfg)


@pytest.fixture(params=list(CONTRACT_CONFIGS), ids=list(CONTRACT_CONFIGS))
def cfg(request) -> MoEConfig:
    return CONTRACT_CONFIGS[request.param]


def test_output_shape_and_finite(cfg):
    moe = make_moe(cfg)
    x = torch.randn(2, 16, cfg.dim, generator=generator(10))
    y, stats = moe(x)
    assert y.shape == (2, 16, cfg.dim) and y.dtype == x.dtype
    assert bool(torch.isfinite(y).all())
    assert isinstance(stats, RouterStats)
    assert stats.counts.shape == stats.load.shape == (cfg.n_experts,)
    assert int(stats.counts.sum()) == 2 * 16 * cfg.top_k


def test_every_parameter_gets_a_gradient(cfg):
    moe = make_moe(cfg)
    y, stats = moe(torch.randn(2, 16, cfg.dim, generator=generator(11)))
    assert bool((stats.counts > 0).all()), "precondition: every routed expert gets tokens"
    y.square().mean().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert bool(p.grad.abs().sum() > 0), name
    assert moe.expert_bias.grad is None


def test_batch_size_one_and_single_token(cfg):
    moe = make_moe(cfg)
    assert moe(torch.randn(1, 5, cfg.dim))[0].shape == (1, 5, cfg.dim)
    assert moe(torch.randn(1, 1, cfg.dim))[0].shape == (1, 1, cfg.dim)
    assert moe(torch.randn(cfg.dim))[0].shape == (cfg.dim,)


def test_eval_outputs_repeat_and_match_train_mode(cfg):
    moe = make_moe(cfg)
    x = torch.randn(3, 7, cfg.dim, generator=generator(12))
    moe.train()
    y_train, stats_train = moe(x)
    moe.eval()
    with torch.no_grad():
        y1, stats1 = moe(x)
        y2, stats2 = moe(x)
    assert torch.equal(y1, y2) and torch.equal(stats1.counts, stats2.counts)
    assert torch.equal(y_train.detach(), y1)  # no dropout or noise: the mode only matters to the caller
    assert type(stats_train) is type(stats1) is RouterStats


def test_state_dict_round_trip_is_exact(cfg):
    moe = make_moe(cfg, seed=0)
    x = torch.randn(2, 9, cfg.dim, generator=generator(13))
    moe.expert_bias.copy_(0.1 * torch.randn(cfg.n_experts, generator=generator(18)))  # something to carry
    state = moe.state_dict()
    assert "expert_bias" in state
    fresh = make_moe(cfg, seed=1)
    assert not torch.equal(fresh(x)[0], moe(x)[0]), "precondition: the fresh module differs"
    fresh.load_state_dict(state)
    assert torch.equal(fresh.expert_bias, moe.expert_bias)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x)[0], moe.eval()(x)[0])


def test_forward_matches_its_parts():
    cfg = CONTRACT_CONFIGS["sigmoid-shared"]
    moe = make_moe(cfg)
    x = torch.randn(2, 5, cfg.dim, generator=generator(14))
    flat = x.reshape(-1, cfg.dim)
    r = route(moe.router(flat), moe.expert_bias, cfg.top_k, cfg.score)
    expected = moe.shared(flat) + expert_ffn_reference(flat, r, moe.w_gate, moe.w_up, moe.w_down)
    torch.testing.assert_close(moe(x)[0], expected.reshape(x.shape), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_expert_ffn_hook_can_be_swapped():
    cfg = CONTRACT_CONFIGS["sigmoid-shared"]
    moe = make_moe(cfg)
    x = torch.randn(2, 5, cfg.dim, generator=generator(15))
    expected = moe(x)[0]
    calls = []

    def traced(x, routing, w_gate, w_up, w_down):
        calls.append(x.shape)
        return expert_ffn_reference(x, routing, w_gate, w_up, w_down)

    moe.expert_ffn = traced
    assert torch.equal(moe(x)[0], expected)
    assert calls == [torch.Size([10, cfg.dim])]


def test_idle_expert_gets_zero_gradient_in_the_module():
    cfg = MoEConfig(dim=8, hidden=8, n_experts=4, top_k=2)
    moe = make_moe(cfg)
    moe.expert_bias[3] = -FORCING_BIAS
    y, stats = moe(torch.randn(4, 8, cfg.dim, generator=generator(16)))
    assert int(stats.counts[3]) == 0
    y.sum().backward()
    for w in (moe.w_gate, moe.w_up, moe.w_down, moe.router.weight):  # sigmoid: an unchosen score is unused
        assert bool((w.grad[3] == 0).all())


def test_forward_rejects_bad_input():
    moe = make_moe(CONTRACT_CONFIGS["sigmoid-shared"])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., D\] with D=8; got shape \(2, 3, 7\)"):
        moe(torch.zeros(2, 3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one token"):
        moe(torch.zeros(0, 8))
    with pytest.raises(TypeError, match="MoEConfig"):
        SparseMoE(dict(dim=8, hidden=8))


# ------------------------------------------------------------------------------------------ bias balancing
def test_bias_is_a_saved_buffer_not_a_parameter():
    moe = make_moe(CONTRACT_CONFIGS["sigmoid-shared"])
    assert "expert_bias" not in dict(moe.named_parameters())
    assert "expert_bias" in dict(moe.named_buffers()) and "expert_bias" in moe.state_dict()
    assert moe.expert_bias.dtype == torch.float32 and not moe.expert_bias.requires_grad
    assert bool((moe.expert_bias == 0).all())


def test_update_bias_follows_the_sign_rule():
    cfg = MoEConfig(dim=4, hidden=4, n_experts=4, top_k=1, bias_update_rate=0.25)
    moe = make_moe(cfg)
    moe.update_bias(torch.tensor([10, 0, 5, 5]))  # mean 5: over-, under-, exactly loaded
    assert moe.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    assert moe.expert_bias.grad_fn is None and not moe.expert_bias.requires_grad
    with pytest.raises(ValueError, match=r"counts must be \[E\] with E=4; got \(3,\)"):
        moe.update_bias(torch.tensor([1, 2, 3]))


def test_forward_never_changes_the_bias():
    moe = make_moe(CONTRACT_CONFIGS["sigmoid-shared"]).train()
    moe(torch.randn(4, 8, 8) + 3.0)
    assert bool((moe.expert_bias == 0).all())


def test_bias_updates_balance_a_skewed_router():
    cfg = MoEConfig(dim=8, hidden=8, n_experts=4, top_k=1, bias_update_rate=BALANCING_RATE)
    moe = make_moe(cfg)
    g = generator(17)
    with torch.no_grad():  # a router that prefers expert 0 for inputs with a positive mean
        moe.router.weight.copy_(0.3 * torch.randn(4, cfg.dim, generator=g))
        moe.router.weight[0] += 1.0
    x = torch.randn(256, cfg.dim, generator=g) + 1.0
    ratios = []
    for _ in range(BALANCING_STEPS):
        with torch.no_grad():
            _, stats = moe(x)
        ratios.append(float(stats.max_load_ratio))
        moe.update_bias(stats.counts)
    assert ratios[0] > SKEWED_MIN_RATIO, f"precondition: the router starts skewed; ratio {ratios[0]}"
    assert max(ratios[-20:]) < BALANCED_MAX_RATIO, f"the load did not balance: last ratios {ratios[-20:]}"
    assert float(moe.expert_bias[0]) < 0 < float(moe.expert_bias[1:].max())


# ------------------------------------------------------------------------------------------- router stats
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_stats_ranges(score, seed):
    e = 6
    r = random_routing(20, e, 2, seed=seed, score=score)
    stats = router_stats(r)
    assert int(stats.counts.sum()) == 40 and stats.counts.dtype == torch.int64
    assert torch.equal(stats.counts, plan(r.indices, e).counts)
    torch.testing.assert_close(stats.load.sum(), torch.tensor(1.0), atol=WEIGHT_SUM_TOL, rtol=0)
    assert stats.gate_entropy.shape == stats.max_load_ratio.shape == ()
    assert 0.0 <= float(stats.gate_entropy) <= math.log(e) + WEIGHT_SUM_TOL
    ratio = float(stats.max_load_ratio)
    assert ratio >= 1.0 and ratio <= e / 2  # never below balanced; bounded for this spread-out routing


def test_router_stats_all_to_one_expert():
    e = 4
    bias = torch.zeros(e)
    bias[0] = FORCING_BIAS
    stats = router_stats(random_routing(10, e, 1, bias=bias))
    assert stats.counts.tolist() == [10, 0, 0, 0]
    assert float(stats.max_load_ratio) == e


def test_router_stats_perfectly_balanced():
    e, per_expert = 4, 3
    owner = torch.arange(e).repeat(per_expert)  # [T] token t prefers expert t % E
    logits = 5.0 * F.one_hot(owner, e).float()  # [T, E]
    stats = router_stats(route(logits, torch.zeros(e), 1))
    assert stats.counts.tolist() == [per_expert] * e
    assert float(stats.max_load_ratio) == 1.0


def test_router_stats_entropy_extremes():
    e = 5
    uniform = route(torch.zeros(3, e), torch.zeros(e), 2)
    torch.testing.assert_close(router_stats(uniform).gate_entropy, torch.tensor(math.log(e)))
    one_hot = Routing(weights=torch.ones(3, 1), indices=torch.zeros(3, 1, dtype=torch.int64),
                      scores=F.one_hot(torch.zeros(3, dtype=torch.int64), e).float())
    assert float(router_stats(one_hot).gate_entropy) == 0.0


def test_router_stats_need_a_token():
    with pytest.raises(ValueError, match="at least one token"):
        router_stats(route(torch.zeros(0, 3), torch.zeros(3), 1))
