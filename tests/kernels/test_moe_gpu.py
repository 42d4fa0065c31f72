"""bfloat16 accuracy of the fused MoE expert-FFN kernels on a GPU, forward and backward, at realistic sizes.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k

The yardstick is plain torch: the reference computed in bfloat16 (:func:`kernels.moe.expert_ffn_reference`
with ``compute_dtype=torch.bfloat16``) from the same bfloat16 inputs. Both are compared with the float32
reference from those inputs by ‖out − ref‖ / ‖ref‖, and the kernels may be at most :data:`BF16_RATIO` times
worse than plain torch.
"""

from __future__ import annotations

import pytest
import torch

from fusion.moe import MoEConfig, Routing, SparseMoE, route
from kernels._launch import FORCE_REFERENCE_ENV
from kernels.moe import expert_ffn, expert_ffn_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

DEVICE = "cuda"
#: The kernels round h, the weighted expert rows and the output to bfloat16 once each and accumulate in
#: float32; plain torch rounds after every matmul and elementwise op. At most twice plain torch's error.
BF16_RATIO = 2.0

#: (T, D, H, E, K): the model's sizes (D = H = 256, E = 16, K = 2 and wider), one with no power of two, and the
#: published DeepSeek-style shape (D = 2048, H = 768, E = 128, K = 8) at fewer tokens.
SHAPES = {
    "model-4k": (4096, 256, 256, 16, 2),
    "wide-4k": (4096, 512, 512, 32, 4),
    "odd-3000": (3000, 384, 320, 24, 3),
    "record-2k": (2048, 2048, 768, 128, 8),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    want = want.double()
    return float((got.double() - want).norm() / want.norm())


def make_case(n_tokens: int, dim: int, hidden: int, n_experts: int, top_k: int, seed: int = 0):
    """bfloat16 x ``[T, D]`` and weights, and a float32 routing from random router logits."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n_tokens, dim, generator=gen, device=DEVICE).bfloat16()  # [T, D]
    w_gate = (torch.randn(n_experts, dim, hidden, generator=gen, device=DEVICE) / dim**0.5).bfloat16()
    w_up = (torch.randn(n_experts, dim, hidden, generator=gen, device=DEVICE) / dim**0.5).bfloat16()
    w_down = (torch.randn(n_experts, hidden, dim, generator=gen, device=DEVICE) / hidden**0.5).bfloat16()
    logits = torch.randn(n_tokens, n_experts, generator=gen, device=DEVICE)  # [T, E]
    routing = route(logits, torch.zeros(n_experts, device=DEVICE), top_k)
    return x, routing, w_gate, w_up, w_down


@pytest.mark.parametrize("name", list(SHAPES))
def test_bf16_forward_error_is_within_twice_torch(name: str) -> None:
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES[name])
    want = expert_ffn_reference(x, routing, w_gate, w_up, w_down)  # float32 from the bf16 values
    torch_bf16 = expert_ffn_reference(x, routing, w_gate, w_up, w_down, compute_dtype=torch.bfloat16)
    out = expert_ffn(x, routing, w_gate, w_up, w_down)
    assert out.shape == x.shape and out.dtype == torch.bfloat16  # [T, D]
    assert bool(torch.isfinite(out).all())
    err, torch_err = rel_err(out, want), rel_err(torch_bf16, want)
    assert 0 < torch_err < 2e-2  # precondition: the yardstick is a bf16 error, not a broken reference
    assert err <= BF16_RATIO * torch_err, f"kernel {err:.2e} vs torch bf16 {torch_err:.2e}"


def _grads(fn, x, routing, w_gate, w_up, w_down, grad_out, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w_gate, w_up, w_down)]
    weights = routing.weights.detach().clone().requires_grad_(True)
    r = Routing(weights=weights, indices=routing.indices, scores=routing.scores)
    out = fn(leaves[0], r, *leaves[1:], **kw)
    return torch.autograd.grad(out, [*leaves, weights], grad_out.to(out.dtype))


@pytest.mark.parametrize("name", ["model-4k", "odd-3000", "record-2k"])
def test_bf16_gradients_error_is_within_twice_torch(name: str) -> None:
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES[name], seed=1)
    grad_out = torch.randn_like(x, dtype=torch.float32).bfloat16()  # [T, D]
    args = (x, routing, w_gate, w_up, w_down, grad_out)
    want = _grads(expert_ffn_reference, *args, torch.float32)
    torch_bf16 = _grads(expert_ffn_reference, *args, torch.bfloat16, compute_dtype=torch.bfloat16)
    got = _grads(expert_ffn, *args, torch.bfloat16)
    for label, g, t, w in zip(("x", "w_gate", "w_up", "w_down", "routing.weights"), got, torch_bf16, want,
                              strict=True):
        assert g.shape == w.shape and bool(torch.isfinite(g).all()), label
        err, torch_err = rel_err(g, w), rel_err(t, w)
        assert 0 < torch_err < 5e-2, f"{label}: yardstick {torch_err:.2e}"
        assert err <= BF16_RATIO * torch_err, f"{label}: kernel {err:.2e} vs torch bf16 {torch_err:.2e}"


def test_autocast_training_step_is_as_close_as_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model trains with float32 parameters under bf16 autocast: the kernel path's output and every
    parameter gradient (router included) are as close to the float32 step as the reference path's."""
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(dim=256, hidden=256, n_experts=16, top_k=2)).to(DEVICE)
    x = torch.randn(8, 512, 256, device=DEVICE)  # [B, N, D]

    def step(autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        moe.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, _ = moe(x)
            loss = out.float().square().mean()
        loss.backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in moe.named_parameters()}

    with monkeypatch.context() as m:
        m.setenv(FORCE_REFERENCE_ENV, "1")
        want_out, want_grads = step(autocast=False)
        ref_out, ref_grads = step(autocast=True)
    out, grads = step(autocast=True)
    assert out.dtype == ref_out.dtype and out.shape == x.shape
    assert rel_err(out, want_out) <= BF16_RATIO * rel_err(ref_out, want_out)
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), name
        assert rel_err(g, want_grads[name]) <= BF16_RATIO * rel_err(ref_grads[name], want_grads[name]), name
    assert float(grads["router.weight"].abs().sum()) > 0


def test_forward_and_backward_are_deterministic() -> None:
    x, routing, w_gate, w_up, w_down = make_case(*SHAPES["wide-4k"], seed=3)
    grad_out = torch.randn_like(x)
    first = _grads(expert_ffn, x, routing, w_gate, w_up, w_down, grad_out, torch.bfloat16)
    second = _grads(expert_ffn, x, routing, w_gate, w_up, w_down, grad_out, torch.bfloat16)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_inputs_on_two_devices_are_rejected() -> None:
    x, routing, w_gate, w_up, w_down = make_case(64, 32, 32, 4, 2)
    with pytest.raises(ValueError, match=r"w_down must be on x's device cuda:0; got cpu"):
        expert_ffn(x, routing, w_gate, w_up, w_down.cpu())
