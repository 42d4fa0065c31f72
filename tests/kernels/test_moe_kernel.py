"""Fused MoE expert-FFN kernels against their torch references and against :mod:`fusion.moe`.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k · A = T*K assignments

Runs where Triton does: on CUDA, or on the CPU in a process started with ``TRITON_INTERPRET=1`` (the variable
must be set before triton is imported, so it cannot be set from here):
``TRITON_INTERPRET=1 pytest -m interpret tests/kernels/test_moe_kernel.py``. The interpreter computes float32
and float16 faithfully (not bfloat16: the bfloat16 checks are in test_moe_gpu.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from fusion.moe import MoEConfig, Routing, SparseMoE, expert_ffn_default, plan, route
from kernels._launch import FORCE_REFERENCE_ENV, use_triton
from kernels.moe import _expert_ffn_triton, expert_ffn, expert_ffn_reference
from kernels.routing import MAX_EXPERTS, block_plan, block_plan_reference

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels run on CUDA or under TRITON_INTERPRET=1 "
        "(run: TRITON_INTERPRET=1 pytest -m interpret tests/kernels/test_moe_kernel.py)",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: float32: kernel and reference differ only in summation order (tiles of 16-64 along D and H, a K-term sum in
#: another order) and in exp/sigmoid implementations: observed relative errors <= 6e-7 for outputs and
#: gradients (interpreter; IEEE float32 dots on a GPU). A kernel that drops the routing weight, picks the wrong
#: expert or misses a K step is off by >= 1e-1.
FP32_REL = 1e-5
#: float16: the kernel rounds h, each weighted expert row and the output to float16 (unit roundoff 4.9e-4); the
#: reference computes in float32 from the same float16 inputs. Four unit roundoffs.
FP16_REL = 2e-3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def make_case(
    n_tokens: int, dim: int, hidden: int, n_experts: int, top_k: int, dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None, seed: int = 0,
) -> tuple[torch.Tensor, Routing, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[T, D]``, a routing from real router logits, and SwiGLU weights, all in ``dtype`` (routing fp32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, dim, generator=gen)  # [T, D]
    logits = torch.randn(n_tokens, n_experts, generator=gen)  # [T, E]
    w_gate = torch.randn(n_experts, dim, hidden, generator=gen) / dim**0.5  # [E, D, H]
    w_up = torch.randn(n_experts, dim, hidden, generator=gen) / dim**0.5  # [E, D, H]
    w_down = torch.randn(n_experts, hidden, dim, generator=gen) / hidden**0.5  # [E, H, D]
    bias = torch.zeros(n_experts) if bias is None else bias
    routing = route(logits.to(DEVICE), bias.to(DEVICE), top_k)
    x, w_gate, w_up, w_down = (t.to(device=DEVICE, dtype=dtype) for t in (x, w_gate, w_up, w_down))
    return x, routing, w_gate, w_up, w_down


def _biased(n_experts: int, **values: float) -> torch.Tensor:
    bias = torch.zeros(n_experts)
    for key, value in values.items():
        bias[int(key.removeprefix("e"))] = value
    return bias


#: (T, D, H, E, K, bias): a power of two, odd and prime sizes, one token, several tiles, K = E, and the MoE edges.
SHAPES = {
    "one-token": (1, 16, 32, 4, 2, None),
    "pow2": (64, 32, 64, 8, 2, None),
    "odd": (37, 24, 40, 5, 3, None),
    "prime-experts": (29, 48, 16, 13, 4, None),
    "k-equals-e": (19, 16, 24, 6, 6, None),
    "k1-several-tiles": (100, 40, 56, 3, 1, None),
    "wide-ragged": (48, 80, 48, 7, 2, None),
    "all-to-one-expert": (40, 24, 32, 6, 1, _biased(6, e2=1e3)),
    "all-first-to-one-expert": (33, 16, 16, 5, 2, _biased(5, e4=1e3)),
    "idle-experts": (45, 32, 24, 8, 2, _biased(8, e3=-1e3, e7=-1e3)),
}


# ------------------------------------------------------------------------------------------------ block plan
@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize("name", list(SHAPES))
def test_block_plan_matches_fusion_plan_exactly(name: str, block_m: int) -> None:
    n_tokens, _, _, n_experts, top_k, bias = SHAPES[name]
    _, routing, *_ = make_case(n_tokens, 8, 8, n_experts, top_k, bias=bias)
    got = block_plan(routing.indices, n_experts, block_m)
    spec = plan(routing.indices, n_experts)
    ref = block_plan_reference(routing.indices, n_experts, block_m)
    for field in ("counts", "offsets", "sorted_token", "sorted_slot", "inverse"):
        value = getattr(got, field)
        assert value.dtype == torch.int64
        assert torch.equal(value, getattr(spec, field)), field
    assert torch.equal(got.padded_offsets, ref.padded_offsets)

    # invariants: counts sum to T*K, offsets monotone, the inverse undoes the permutation
    n_assign = n_tokens * top_k
    assert int(got.counts.sum()) == n_assign
    assert bool((got.offsets[1:] >= got.offsets[:-1]).all())
    flat_tokens = torch.arange(n_tokens, device=DEVICE).repeat_interleave(top_k)  # [A]
    assert torch.equal(got.sorted_token[got.inverse], flat_tokens)
    assert torch.equal(routing.indices.reshape(-1)[got.inverse.argsort()], routing.indices.reshape(-1).sort(
        stable=True).values)
    # padding: whole tiles, less than one tile of waste per expert, none for an expert without assignments
    padded = got.padded_offsets[1:] - got.padded_offsets[:-1]  # [E]
    waste = padded - got.counts  # [E]
    assert bool((padded % block_m == 0).all())
    assert bool(((waste >= 0) & (waste < block_m)).all())
    assert bool((padded[got.counts == 0] == 0).all())
    assert int(got.padded_offsets[-1]) // block_m <= got.max_tiles


@pytest.mark.parametrize(("n_tokens", "n_experts", "top_k"), [(600, 128, 4), (1100, 64, 8)])
def test_block_plan_with_many_chunks_matches_fusion_plan(n_tokens: int, n_experts: int, top_k: int) -> None:
    """Enough assignments for the separate scan kernel (more than 32 chunks of 64 for E = 128, 64 chunks of 128
    for E = 64), where the smaller cases above sum the chunk counts inside the scatter kernel."""
    _, routing, *_ = make_case(n_tokens, 8, 8, n_experts, top_k)
    got = block_plan(routing.indices, n_experts, 64)
    spec = plan(routing.indices, n_experts)
    for field in ("counts", "offsets", "sorted_token", "sorted_slot", "inverse"):
        assert torch.equal(getattr(got, field), getattr(spec, field)), field
    assert torch.equal(got.padded_offsets, block_plan_reference(routing.indices, n_experts, 64).padded_offsets)
    bad = routing.indices.clone()
    bad[n_tokens // 2, 0] = -3
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, {n_experts}\); got values from -3 to"):
        block_plan(bad, n_experts, 64)


def test_block_plan_with_no_tokens() -> None:
    got = block_plan(torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), 4, 16)
    assert got.n_assignments == 0 and got.max_tiles == 0
    assert torch.equal(got.counts, torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert torch.equal(got.padded_offsets, torch.zeros(5, dtype=torch.int64, device=DEVICE))


# -------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_matches_reference(name: str, dtype: torch.dtype) -> None:
    n_tokens, dim, hidden, n_experts, top_k, bias = SHAPES[name]
    x, routing, w_gate, w_up, w_down = make_case(n_tokens, dim, hidden, n_experts, top_k, dtype, bias)
    out = expert_ffn(x, routing, w_gate, w_up, w_down)
    assert out.shape == (n_tokens, dim) and out.dtype == dtype  # [T, D]
    want = expert_ffn_reference(x.float(), routing, w_gate.float(), w_up.float(), w_down.float())
    assert rel_err(out, want) <= (FP32_REL if dtype == torch.float32 else FP16_REL)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=FP32_REL, atol=FP32_REL)


def test_reference_equals_fusion_reference() -> None:
    from fusion.moe import expert_ffn_reference as fusion_reference

    x, routing, *weights = make_case(37, 24, 40, 5, 3)
    assert torch.equal(expert_ffn_reference(x, routing, *weights), fusion_reference(x, routing, *weights))


def test_idle_expert_contributes_nothing() -> None:
    """Changing the weights of an expert nobody chose leaves the output bit-identical."""
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES["idle-experts"][:5], bias=SHAPES["idle-experts"][5])
    assert not bool((routing.indices == 3).any())
    before = expert_ffn(x, routing, w_gate, w_up, w_down)
    w_gate[3] = 1e6
    w_down[3] = float("nan")
    assert torch.equal(expert_ffn(x, routing, w_gate, w_up, w_down), before)


# ------------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("name", ["one-token", "odd", "k-equals-e", "k1-several-tiles", "wide-ragged",
                                  "all-first-to-one-expert", "idle-experts"])
def test_gradients_match_autograd_through_the_reference(name: str) -> None:
    n_tokens, dim, hidden, n_experts, top_k, bias = SHAPES[name]
    x, routing, w_gate, w_up, w_down = make_case(n_tokens, dim, hidden, n_experts, top_k, bias=bias, seed=1)
    grad_out = torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # [T, D]

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_gate, w_up, w_down, routing.weights)]
        r = Routing(weights=leaves[4], indices=routing.indices, scores=routing.scores)
        out = fn(leaves[0], r, *leaves[1:4])
        return torch.autograd.grad(out, leaves, grad_out)

    got = grads(expert_ffn)
    want = grads(expert_ffn_reference)
    for label, g, w in zip(("x", "w_gate", "w_up", "w_down", "routing.weights"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, label
        assert rel_err(g, w) <= FP32_REL, f"{label}: {rel_err(g, w):.2e}"
    if name == "idle-experts":  # experts nobody chose get exactly zero gradient, as in the reference
        for g in got[1:4]:
            assert torch.equal(g[[3, 7]], torch.zeros_like(g[[3, 7]]))


def test_only_the_requested_gradients_are_computed() -> None:
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES["odd"][:5])
    w_down.requires_grad_(True)
    out = expert_ffn(x, routing, w_gate, w_up, w_down)
    (g,) = torch.autograd.grad(out.square().sum(), [w_down])
    want_leaf = w_down.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(expert_ffn_reference(x, routing, w_gate, w_up, want_leaf).square().sum(),
                                  [want_leaf])
    assert rel_err(g, want) <= FP32_REL


# ------------------------------------------------------------------------------------------------- dispatch
def test_force_reference_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES["odd"][:5])
    assert use_triton(x)
    with pytest.raises(TypeError, match="float64"):  # the kernels take no float64: this is the Triton path
        expert_ffn(x.double(), routing, w_gate.double(), w_up.double(), w_down.double())
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    assert not use_triton(x)
    assert torch.equal(expert_ffn(x, routing, w_gate, w_up, w_down),
                       expert_ffn_reference(x, routing, w_gate, w_up, w_down))
    out = expert_ffn(x.double(), routing, w_gate.double(), w_up.double(), w_down.double())
    assert out.dtype == torch.float64


def test_sparse_moe_uses_the_kernels_and_trains_like_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(dim=24, hidden=40, n_experts=6, top_k=2)).to(DEVICE)
    assert moe.expert_ffn is expert_ffn_default
    x = torch.randn(3, 11, 24, device=DEVICE)  # [B, N, D]

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        moe.zero_grad()
        out, _ = moe(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in moe.named_parameters()}

    out, grads = step()
    with monkeypatch.context() as m:
        m.setenv(FORCE_REFERENCE_ENV, "1")
        want_out, want_grads = step()
    assert out.shape == x.shape
    assert rel_err(out, want_out) <= FP32_REL
    for name, g in grads.items():  # the router's gradient flows through the routing weights
        assert rel_err(g, want_grads[name]) <= FP32_REL, name
    assert float(grads["router.weight"].abs().sum()) > 0
    with pytest.raises(TypeError, match="float64"):
        expert_ffn(x.reshape(-1, 24).double(), route(torch.zeros(33, 6, device=DEVICE), moe.expert_bias, 2),
                   moe.w_gate.double(), moe.w_up.double(), moe.w_down.double())
    moe.double()  # fusion's default keeps the reference for what the kernels do not take
    out64, _ = moe(x.double())
    with monkeypatch.context() as m:
        m.setenv(FORCE_REFERENCE_ENV, "1")
        assert torch.equal(out64, moe(x.double())[0])


# ------------------------------------------------------------------------------------------- input checks
def _case():
    return make_case(6, 16, 8, 4, 2)


def _bad_routing(indices: torch.Tensor, n_experts: int = 4, weights_dtype: torch.dtype = torch.float32):
    t, k = indices.shape
    return Routing(weights=torch.full((t, k), 0.5, dtype=weights_dtype, device=DEVICE), indices=indices,
                   scores=torch.zeros(t, n_experts, device=DEVICE))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda x, r, g, u, d: (x.long(), r, g, u, d), TypeError, r"x must be a floating-point \[T, D\] tensor"),
        (lambda x, r, g, u, d: (x, r.indices, g, u, d), TypeError, r"routing must be a Routing"),
        (lambda x, r, g, u, d: (x[0], r, g, u, d), ValueError, r"x must be \[T, D\]; got shape \(16,\)"),
        (lambda x, r, g, u, d: (x, r, g[:, :8], u, d), ValueError, r"w_gate and w_up must be \[E, D, H\] with D=16"),
        (lambda x, r, g, u, d: (x, r, g, u, d.transpose(1, 2)), ValueError, r"w_down must be \[E, H, D\]"),
        (lambda x, r, g, u, d: (x[:5], r, g, u, d), ValueError, r"routing covers 6 tokens but x has T=5"),
        (lambda x, r, g, u, d: (x, r, g[:3], u[:3], d[:3]), ValueError, r"scores cover E=4 .* weights have E=3"),
        (lambda x, r, g, u, d: (x, _bad_routing(torch.full((6, 2), 4, dtype=torch.int64, device=DEVICE)), g, u, d),
         ValueError, r"indices must lie in \[0, 4\); got values from 4 to 4"),
        (lambda x, r, g, u, d: (x.double(), r, g, u, d), TypeError, r"dtype in .* got torch.float64"),
    ],
    ids=["int-x", "not-routing", "rank", "gate-width", "down-transposed", "token-count", "expert-count",
         "expert-out-of-range", "float64"],
)
def test_expert_ffn_rejects_bad_inputs(mutate, error: type[Exception], match: str) -> None:
    args = mutate(*_case())
    with pytest.raises(error, match=match):
        expert_ffn(*args)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda x, r, g, u, d: (x, r, g.half(), u, d), TypeError, r"w_gate must have x's dtype torch.float32"),
        (lambda x, r, g, u, d: (x, _bad_routing(r.indices, weights_dtype=torch.float64), g, u, d), TypeError,
         r"routing.weights must be float32; got torch.float64"),
        (lambda x, r, g, u, d: (x.t().contiguous().t(), r, g, u, d), ValueError, r"x must be contiguous"),
        (lambda x, r, g, u, d: (x, r, g, u.transpose(1, 2).contiguous().transpose(1, 2), d), ValueError,
         r"w_up must be contiguous"),
    ],
    ids=["weight-dtype", "routing-weights-dtype", "strided-x", "strided-weight"],
)
def test_launcher_rejects_what_the_kernels_cannot_take(mutate, error: type[Exception], match: str) -> None:
    args = mutate(*_case())
    with pytest.raises(error, match=match):
        _expert_ffn_triton(*args)


def test_out_of_range_expert_is_rejected_on_the_training_path_too() -> None:
    """The range is checked once after all launches; a differentiable call raises just the same."""
    x, routing, w_gate, w_up, w_down = _case()
    indices = routing.indices.clone()
    indices[2, 1] = 9
    bad = Routing(weights=routing.weights.clone().requires_grad_(True), indices=indices, scores=routing.scores)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\); got values from 0 to 9"):
        expert_ffn(x.requires_grad_(True), bad, w_gate, w_up, w_down)


def test_too_many_experts_are_rejected_by_the_kernels() -> None:
    n_experts = MAX_EXPERTS + 1
    x = torch.randn(3, 4, device=DEVICE)
    weights = [torch.zeros(n_experts, 4, 4, device=DEVICE) for _ in range(3)]
    routing = _bad_routing(torch.zeros(3, 1, dtype=torch.int64, device=DEVICE), n_experts)
    with pytest.raises(ValueError, match=rf"at most E={MAX_EXPERTS} experts; got E={n_experts}"):
        expert_ffn(x, routing, *weights)
    with pytest.raises(ValueError, match=rf"at most E={MAX_EXPERTS} experts"):
        block_plan(routing.indices, n_experts, 16)


@pytest.mark.parametrize("block_m", [0, 24, True])
def test_block_plan_rejects_bad_tile_rows(block_m: object) -> None:
    with pytest.raises(ValueError, match="block_m must be a power of two >= 1"):
        block_plan(torch.zeros(3, 1, dtype=torch.int64, device=DEVICE), 4, block_m)
