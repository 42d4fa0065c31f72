"""The MoE uses the Triton routing kernel where it runs (CUDA, interpreter) and gives the reference's results."""

from __future__ import annotations

import os

import pytest
import torch

from fusion.moe import MoEConfig, SparseMoE, route
from kernels._launch import use_triton

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels run on CUDA or under TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest -m interpret "
                "tests/kernels)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
#: the kernel chooses; torch computes the weights from the same scores: identical up to fp32 rounding of scores
WEIGHT_ATOL = 1e-6


def reference(fn, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("INSPECTION_FORCE_REFERENCE", "1")
        return fn()


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("t, e, k", [(1, 4, 1), (33, 16, 2), (130, 13, 4), (64, 8, 8)])
def test_route_dispatches_to_the_kernel_and_matches_the_reference(monkeypatch, score, t, e, k):
    gen = torch.Generator().manual_seed(t * 100 + e)
    logits = (torch.randn(t, e, generator=gen) * 3).to(DEVICE).requires_grad_(True)
    bias = (torch.randn(e, generator=gen) * 0.1).to(DEVICE)
    assert use_triton(logits)
    fast = route(logits, bias, k, score)
    ref = reference(lambda: route(logits, bias, k, score), monkeypatch)
    assert torch.equal(fast.indices, ref.indices)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=0, atol=WEIGHT_ATOL)
    fast.weights.square().sum().backward()  # gradients flow through the torch gather, as in the reference
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_sparse_moe_forward_is_the_same_with_the_kernel(monkeypatch):
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(dim=32, hidden=16, n_experts=8, top_k=2)).to(DEVICE).eval()
    x = torch.randn(2, 24, 32, device=DEVICE)
    with torch.no_grad():
        fast, stats_fast = moe(x)
        ref, stats_ref = reference(lambda: moe(x), monkeypatch)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    assert torch.equal(stats_fast.counts, stats_ref.counts)
