"""The bridge's trace: each fusion query's routed experts and gate weights, and the attention spread.

B batch · N tokens · Q fusion queries · D width · K top-k · L layers

The routing oracle is the router itself: each MoE layer's input is captured and handed to
:func:`fusion.moe.route` with the layer's router weights and bias. The spread is checked against closed forms
(uniform attention over n keys has entropy log n, attention on one key 0). The file runs on the torch
references on CPU, and on the Triton kernels under ``TRITON_INTERPRET=1`` or on CUDA.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fusion.bridge import BridgeConfig, FusionBridge, attention_entropy, attention_weights, masked_attention
from fusion.moe import MoEConfig, route

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
#: Closed forms computed in float32: a few ulps of log n.
ENTROPY_ATOL = 1e-5
#: The trace's weights are the router's float32 weights, gathered from the same scores: identical.
WEIGHT_ATOL = 0.0

D, Q, K, E = 32, 5, 2, 6


def _bridge(moe: bool = True, layers: int = 2, attn_top_k: int | None = None) -> FusionBridge:
    torch.manual_seed(0)
    config = BridgeConfig(dim=D, n_queries=Q, n_heads=4, n_layers=layers, dropout=0.0, attn_top_k=attn_top_k,
                          moe=MoEConfig(dim=D, hidden=16, n_experts=E, top_k=K) if moe else None)
    return FusionBridge(config).to(DEVICE).eval()


def _inputs(b: int = 3, n: int = 11):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(b, n, D, generator=gen).to(DEVICE)
    modality_index = torch.tensor([0] * 4 + [1] * 4 + [2] * (n - 8)).to(DEVICE)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, 4:8] = True  # row 1 without modality 1
    mask[2] = True  # row 2 sees nothing: the empty coalition
    return tokens, modality_index, mask.to(DEVICE)


def _router_oracle(bridge: FusionBridge, tokens, modality_index, mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
    captured: list[torch.Tensor] = []
    hooks = [layer.ffn.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
             for layer in bridge.layers]
    try:
        with torch.no_grad():
            bridge(tokens, modality_index, mask)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    with torch.no_grad():
        for layer, x in zip(bridge.layers, captured, strict=True):
            cfg = layer.ffn.config
            logits = F.linear(x.reshape(-1, D).float(), layer.ffn.router.weight.float())  # [B*Q, E]
            r = route(logits, layer.ffn.expert_bias, cfg.top_k, cfg.score, cfg.route_scale)
            out.append((r.indices.reshape(x.shape[0], Q, K), r.weights.reshape(x.shape[0], Q, K)))
    return out


@pytest.mark.parametrize("path", ["default", "reference"])
def test_trace_is_the_routers_choice_and_changes_no_output(monkeypatch, path):
    if path == "reference":
        monkeypatch.setenv("INSPECTION_FORCE_REFERENCE", "1")
    bridge = _bridge()
    tokens, modality_index, mask = _inputs()
    with torch.no_grad():
        plain = bridge(tokens, modality_index, mask)
        traced = bridge(tokens, modality_index, mask, trace=True)
    assert plain.trace is None
    assert torch.equal(plain.queries, traced.queries) and torch.equal(plain.pooled, traced.pooled)
    assert len(traced.trace) == 2
    for t, (experts, weights) in zip(traced.trace, _router_oracle(bridge, tokens, modality_index, mask), strict=True):
        assert t.experts.shape == t.weights.shape == (3, Q, K)
        assert t.experts.dtype == torch.int64 and t.weights.dtype == torch.float32
        assert torch.equal(t.experts, experts)
        torch.testing.assert_close(t.weights, weights, rtol=0, atol=WEIGHT_ATOL)
        assert t.attention_spread.shape == (3,)
    # rows see 11, 7 and 0 tokens: spreads within [0, log n], and exactly 0 for the row that sees none
    for t in traced.trace:
        s = t.attention_spread.tolist()
        assert 0.0 < s[0] <= math.log(11) + ENTROPY_ATOL and 0.0 < s[1] <= math.log(7) + ENTROPY_ATOL
        assert s[2] == 0.0


@pytest.mark.parametrize("moe", [True, False])
def test_tracing_some_rows_gives_those_rows_of_the_full_trace_and_changes_no_output(moe):
    bridge = _bridge(moe=moe)
    tokens, modality_index, mask = _inputs()
    rows = torch.tensor([2, 0])  # a subset, out of order
    with torch.no_grad():
        full = bridge(tokens, modality_index, mask, trace=True)
        some = bridge(tokens, modality_index, mask, trace=True, trace_rows=rows)
    assert torch.equal(full.queries, some.queries) and torch.equal(full.pooled, some.pooled)
    for f, t in zip(full.trace, some.trace, strict=True):
        assert t.attention_spread.shape == (2,)
        torch.testing.assert_close(t.attention_spread, f.attention_spread[rows], rtol=0, atol=ENTROPY_ATOL)
        if moe:
            assert torch.equal(t.experts, f.experts[rows]) and torch.equal(t.weights, f.weights[rows])
        else:
            assert t.experts is None and t.weights is None


def test_a_dense_bridge_traces_spread_without_routing():
    bridge = _bridge(moe=False, layers=1)
    traced = bridge(*_inputs(), trace=True)
    assert len(traced.trace) == 1 and traced.router_stats == []
    assert traced.trace[0].experts is None and traced.trace[0].weights is None
    assert traced.trace[0].attention_spread.shape == (3,)


def test_trace_leaves_training_gradients_alone():
    bridge = _bridge().train()
    tokens, modality_index, mask = _inputs()
    grads = []
    for trace in (False, True):
        bridge.zero_grad()
        bridge(tokens, modality_index, mask, trace=trace).pooled.square().sum().backward()
        grads.append([p.grad.clone() for p in bridge.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_attention_entropy_closed_forms():
    b, h, n, dh = 3, 2, 6, 4
    q = torch.zeros(b, h, Q, dh)  # every score equal: uniform attention over the visible keys
    k = torch.randn(b, h, n, dh, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, :4] = True  # 2 visible keys
    mask[2] = True  # none
    got = attention_entropy(q, k, mask)
    torch.testing.assert_close(got, torch.tensor([math.log(n), math.log(2), 0.0]), rtol=0, atol=ENTROPY_ATOL)
    # top-1 attention looks at one key: entropy 0
    assert float(attention_entropy(torch.randn(1, h, Q, dh), k[:1], None, top_k=1).abs().max()) <= ENTROPY_ATOL
    # one key far above the rest: all weight on it
    spike = torch.zeros(1, h, n, dh)
    spike[..., 3, :] = 100.0
    assert float(attention_entropy(torch.ones(1, h, Q, dh), spike).max()) <= ENTROPY_ATOL


def test_attention_weights_are_the_reference_attention():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, Q, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen),
               torch.randn(2, 2, 9, 8, generator=gen))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    for top_k in (None, 3):
        w = attention_weights(q, k, mask, top_k)  # [B, H, Q, N]
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, Q))
        assert float(w[0, ..., 5:].abs().max()) == 0.0
        assert torch.equal(w @ v, masked_attention(q, k, v, mask, top_k))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_the_trace_is_the_routers_choice_through_the_kernels(precision):
    bridge = _bridge()
    tokens, modality_index, mask = _inputs(b=16, n=40)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        traced = bridge(tokens, modality_index, mask, trace=True)
        oracle = _router_oracle(bridge, tokens, modality_index, mask)
    for t, (experts, weights) in zip(traced.trace, oracle, strict=True):
        assert torch.equal(t.experts, experts)  # the Triton routing kernel's choice, as the router returns it
        torch.testing.assert_close(t.weights, weights, rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_traced_bridge_matches_eager_on_cuda():
    # fp32 only: under bf16 the compiled graph rounds the router's logits differently, and near-ties may flip
    bridge = _bridge()
    tokens, modality_index, mask = _inputs(b=16, n=40)
    with torch.inference_mode():
        eager = bridge(tokens, modality_index, mask, trace=True)
        got = torch.compile(bridge, fullgraph=False)(tokens, modality_index, mask, trace=True)
    for a, b in zip(eager.trace, got.trace, strict=True):
        assert torch.equal(b.experts, a.experts)
        # float32 reassociation in the compiled graph
        torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.attention_spread, a.attention_spread, rtol=0, atol=1e-4)
