"""The cross-modal attention bridge: learned fusion queries attend over the tokens of all present modalities.

B batch · N tokens (all modalities) · Q fusion queries · D width · H heads · Dh head width · M modalities

Each layer: the queries cross-attend to the tokens (a key padding mask hides absent modalities; optionally
only each query's top-k keys count), then self-attend, then pass a feed-forward block — the sparse MoE of
:mod:`fusion.moe`, or a dense SwiGLU. ``masked_attention`` is the readable torch reference; the Triton
kernels replace it through ``FusionBridge.attention`` on CUDA.

A query row whose keys are all masked (no modality present — the empty coalition of a Shapley explanation)
attends to nothing: its attention output is zero and the residual stream passes the query through unchanged.

``FusionBridge.forward(..., trace=True)`` also returns one :class:`LayerTrace` per layer: the experts each
fusion query was routed to with their gate weights (the routing the MoE computed before dispatching to its
experts, so the Triton and torch paths report what they ran), and the spread of the queries' cross-attention
weights. Without the flag nothing extra is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.moe import MoEConfig, RouterStats, SparseMoE, SwiGLU
from inspection.errors import ConfigError


def attention_weights(q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None,
                      top_k: int | None = None) -> Tensor:
    """The attention weights of :func:`masked_attention`, in fp32.

    Args:
        q: ``[B, H, Q, Dh]`` queries.
        k: ``[B, H, N, Dh]`` keys.
        key_padding_mask: ``[B, N]`` bool, True where a key must be ignored.
        top_k: keep only each query's ``top_k`` highest-scoring unmasked keys.

    Returns:
        ``[B, H, Q, N]`` float32, each row a distribution over the visible keys; rows with no visible key are
        zero.

    Raises:
        ValueError: the shapes do not agree, or the mask is not a bool ``[B, N]``.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B,H,Q,Dh] and k [B,H,N,Dh]; got {tuple(q.shape)}, {tuple(k.shape)}")
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Q, N]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (k.shape[0], k.shape[2]) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool [B, N] = {(k.shape[0], k.shape[2])}; got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]  # [B, H, Q, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # all keys masked -> a zero row


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                     top_k: int | None = None) -> Tensor:
    """Reference attention with a key padding mask and optional top-k key selection, in fp32.

    Args:
        q: ``[B, H, Q, Dh]`` queries.
        k, v: ``[B, H, N, Dh]`` keys and values.
        key_padding_mask: ``[B, N]`` bool, True where a key must be ignored.
        top_k: keep only each query's ``top_k`` highest-scoring unmasked keys.

    Returns:
        ``[B, H, Q, Dh]`` in q's dtype; rows with no visible key are zero.
    """
    if k.shape != v.shape:
        raise ValueError(f"expected k and v of one shape [B,H,N,Dh]; got {tuple(k.shape)}, {tuple(v.shape)}")
    probs = attention_weights(q, k, key_padding_mask, top_k)  # [B, H, Q, N]; checks q, k and the mask
    return (probs @ v.float()).to(q.dtype)


def attention_entropy(q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None,
                      top_k: int | None = None) -> Tensor:
    """How widely each row's queries spread their attention: the entropy of :func:`attention_weights`.

    Args:
        q: ``[B, H, Q, Dh]`` queries.
        k: ``[B, H, N, Dh]`` keys.
        key_padding_mask: ``[B, N]`` bool, True where a key must be ignored.
        top_k: keep only each query's ``top_k`` highest-scoring unmasked keys.

    Returns:
        ``[B]`` float32: per row, the mean over heads and queries of the entropy (nats) of the query's
        attention weights; in ``[0, log n]`` for ``n`` visible keys (``log top_k`` at most with top-k), 0 for a
        row with no visible key. 0 is every query looking at one token; ``log n`` is every query looking at all
        of them alike.

    Raises:
        ValueError: as :func:`attention_weights`.
    """
    probs = attention_weights(q, k, key_padding_mask, top_k)  # [B, H, Q, N]
    return 0.0 - torch.special.xlogy(probs, probs).sum(dim=-1).mean(dim=(1, 2))  # [B] (0.0 -: no -0.0)


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                     top_k: int | None = None) -> Tensor:
    """``masked_attention`` through :func:`kernels.attention.attention`: the Triton kernels on CUDA (and under
    ``TRITON_INTERPRET=1``), elsewhere or with ``INSPECTION_FORCE_REFERENCE=1`` its torch reference, which equals
    ``masked_attention`` bit for bit. Imported at the call, so ``import fusion`` needs no GPU."""
    from kernels.attention import attention

    return attention(q, k, v, key_padding_mask, top_k)


@dataclass(frozen=True)
class BridgeConfig:
    """Attributes:
    dim: token width D (every encoder projects to it).
    n_queries: learned fusion queries Q.
    n_heads: attention heads (dim must divide by it).
    n_layers: bridge layers.
    n_modalities: modality-type embeddings M.
    attn_top_k: when set, each query attends only to its top-k keys.
    ffn_hidden: hidden width of the dense feed-forward (used when moe is None).
    moe: the sparse MoE feed-forward config; None for a dense SwiGLU.
    dropout: on attention outputs and the feed-forward.
    """

    dim: int = 256
    n_queries: int = 16
    n_heads: int = 8
    n_layers: int = 2
    n_modalities: int = 3
    attn_top_k: int | None = None
    ffn_hidden: int = 512
    moe: MoEConfig | None = None
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if min(self.n_queries, self.n_layers, self.n_modalities) < 1:
            raise ConfigError("n_queries, n_layers and n_modalities must be >= 1")
        if self.attn_top_k is not None and self.attn_top_k < 1:
            raise ConfigError(f"attn_top_k must be >= 1 or None; got {self.attn_top_k}")
        if self.moe is not None and self.moe.dim != self.dim:
            raise ConfigError(f"moe.dim ({self.moe.dim}) must equal the bridge dim ({self.dim})")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None, top_k: int | None,
                attention: Callable[..., Tensor], spread: bool = False,
                rows: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``[B, Q, D]`` outputs; with ``spread``, also the :func:`attention_entropy` of the weights: ``[B]``, or
        ``[R]`` for the ``[R]`` row indices ``rows`` only."""
        b, q_len, d = x.shape
        h, dh = self.heads, d // self.heads
        q = self.q(x).reshape(b, q_len, h, dh).transpose(1, 2)  # [B, H, Q, Dh]
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, dh).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh] each
        y = attention(q, k, v, mask, top_k)  # [B, H, Q, Dh]
        out = self.drop(self.out(y.transpose(1, 2).reshape(b, q_len, d)))  # [B, Q, D]
        if not spread:
            return out
        with torch.no_grad():
            if rows is not None:
                q, k, mask = q[rows], k[rows], None if mask is None else mask[rows]
            return out, attention_entropy(q, k, mask, top_k)  # [B, Q, D], [B] or [R]


class BridgeLayer(nn.Module):
    """Cross-attention to the tokens, self-attention among the queries, feed-forward (MoE or dense)."""

    def __init__(self, config: BridgeConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm_cross, self.norm_tokens = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = _Attention(d, config.n_heads, config.dropout)
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = _Attention(d, config.n_heads, config.dropout)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = SparseMoE(config.moe) if config.moe is not None else SwiGLU(d, config.ffn_hidden)
        self.drop = nn.Dropout(config.dropout)
        self.top_k = config.attn_top_k

    def forward(self, q: Tensor, tokens: Tensor, mask: Tensor, attention, trace: bool = False,
                trace_rows: Tensor | None = None) -> tuple[Tensor, RouterStats | None, LayerTrace | None]:
        """``[B, Q, D]`` queries, the MoE's router statistics (None when dense) and, with ``trace``, the
        layer's :class:`LayerTrace` (else None) of every row or of the ``[R]`` row indices ``trace_rows``."""
        cross = self.cross(self.norm_cross(q), self.norm_tokens(tokens), mask, self.top_k, attention, trace,
                           trace_rows)
        spread = None
        if trace:
            cross, spread = cross
        q = q + cross
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, None, None, attention)
        h = self.norm_ffn(q)  # [B, Q, D]
        stats = routing = None
        if isinstance(self.ffn, SparseMoE):
            y, stats, routing = self.ffn(h, return_routing=True) if trace else (*self.ffn(h), None)
        else:
            y = self.ffn(h)  # [B, Q, D]
        layer_trace = None
        if trace:
            shape = (*h.shape[:-1], -1)  # [B, Q, K]

            def picked(t: Tensor) -> Tensor:
                t = t.detach().reshape(shape)
                return t if trace_rows is None else t[trace_rows]

            layer_trace = LayerTrace(
                attention_spread=spread,
                experts=None if routing is None else picked(routing.indices),
                weights=None if routing is None else picked(routing.weights).float(),
            )
        return q + self.drop(y), stats, layer_trace


@dataclass(frozen=True, eq=False)
class LayerTrace:
    """What one bridge layer did with each row, for audit and monitoring (``trace=True``; no gradient). ``B`` is
    the batch's rows, or the ``R`` rows of ``trace_rows`` in their order.

    Attributes:
        attention_spread: ``[B]`` float32, the :func:`attention_entropy` of the fusion queries' cross-attention
            over the visible tokens (nats, mean over heads and queries).
        experts: ``[B, Q, K]`` int64, the routed experts each fusion query went to, in the router's order
            (descending biased score); None for a dense layer.
        weights: ``[B, Q, K]`` float32, their gate weights (the unbiased scores of the chosen experts
            renormalised per query, times ``route_scale``); None for a dense layer.
    """

    attention_spread: Tensor
    experts: Tensor | None = None
    weights: Tensor | None = None


@dataclass
class BridgeOutput:
    """Attributes:
    queries: ``[B, Q, D]`` fused queries after the last layer.
    pooled: ``[B, D]`` normalised mean of the queries.
    router_stats: one :class:`RouterStats` per MoE layer (empty for a dense bridge).
    trace: one :class:`LayerTrace` per layer when asked for (``trace=True``), else None.
    """

    queries: Tensor
    pooled: Tensor
    router_stats: list[RouterStats]
    trace: list[LayerTrace] | None = None


class FusionBridge(nn.Module):
    """``Q`` learned fusion queries over the concatenated tokens of every present modality."""

    def __init__(self, config: BridgeConfig = BridgeConfig()) -> None:
        super().__init__()
        self.config = config
        self.queries = nn.Parameter(torch.randn(config.n_queries, config.dim) * 0.02)
        self.modality_emb = nn.Parameter(torch.randn(config.n_modalities, config.dim) * 0.02)
        self.layers = nn.ModuleList(BridgeLayer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim)
        #: the attention implementation: the fused Triton kernels where they run, else ``masked_attention``
        self.attention: Callable[..., Tensor] = kernel_attention

    def forward(self, tokens: Tensor, modality_index: Tensor, key_padding_mask: Tensor,
                trace: bool = False, trace_rows: Tensor | None = None) -> BridgeOutput:
        """Args:
            tokens: ``[B, N, D]`` tokens of all modalities (absent ones may hold anything).
            modality_index: ``[N]`` long, which modality each token belongs to.
            key_padding_mask: ``[B, N]`` bool, True for tokens of absent modalities.
            trace: also return each layer's routing and attention spread (:class:`LayerTrace`); the outputs
                are the same either way.
            trace_rows: ``[R]`` long row indices: trace only these rows (in this order), so that a caller that
                needs the trace of a few rows (the grand coalitions of a stacked batch) does not pay for all.
        """
        if tokens.ndim != 3 or tokens.shape[2] != self.config.dim:
            raise ValueError(f"tokens must be [B, N, {self.config.dim}]; got {tuple(tokens.shape)}")
        tokens = tokens + self.modality_emb[modality_index]  # [B, N, D]
        q = self.queries.expand(tokens.shape[0], -1, -1)  # [B, Q, D]
        stats, traces = [], []
        for layer in self.layers:
            q, s, t = layer(q, tokens, key_padding_mask, self.attention, trace, trace_rows)
            if s is not None:
                stats.append(s)
            traces.append(t)
        return BridgeOutput(q, self.norm(q.mean(dim=1)), stats, traces if trace else None)
