"""Sparse Mixture-of-Experts in the DeepSeekMoE / DeepSeek-V3 style: the readable reference.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k

One shared SwiGLU expert sees every token; ``E`` fine-grained routed SwiGLU experts each see the tokens whose
top-``K`` choice includes them. Load is balanced without an auxiliary loss (DeepSeek-V3): a per-expert bias is
added to the router's scores *only to choose* the experts, the mixing weights come from the unbiased scores,
and the training loop nudges the bias after each optimizer step (:meth:`SparseMoE.update_bias`).

This torch code is the executable specification of the layer. The hot pieces are separate pure functions
(:func:`route`, :func:`plan`, :func:`expert_ffn_reference`) so that faster implementations can be checked
against them and swapped in without touching the module: :class:`SparseMoE` calls its expert computation
through the ``expert_ffn`` attribute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inspection.errors import ConfigError
from kernels.contracts import Routing, check_expert_ffn_args, check_float_tensor, check_index_tensor

SCORE_FUNCTIONS: tuple[str, ...] = ("sigmoid", "softmax")


# ------------------------------------------------------------------------------------------------ config
def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"MoEConfig.{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ConfigError(f"MoEConfig.{name} must be >= {minimum}; got {value}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"MoEConfig.{name} must be a number; got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"MoEConfig.{name} must be finite; got {value}")
    return float(value)


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and routing rules of one :class:`SparseMoE` layer.

    Attributes:
        dim: token width D.
        hidden: hidden width H of each routed expert.
        n_experts: number of routed experts E.
        top_k: routed experts per token K, in ``[1, E]``.
        n_shared: shared experts; they are fused into one SwiGLU of hidden width ``hidden * n_shared``.
            0 disables the shared path.
        score: router affinity function, ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` (DeepSeekMoE).
        bias_update_rate: step size of the load-balancing bias update (DeepSeek-V3's gamma), >= 0.
        route_scale: factor applied to the renormalised routing weights, > 0.
    """

    dim: int
    hidden: int
    n_experts: int = 16
    top_k: int = 2
    n_shared: int = 1
    score: str = "sigmoid"
    bias_update_rate: float = 1e-3
    route_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_int("dim", self.dim, 1)
        _check_int("hidden", self.hidden, 1)
        _check_int("n_experts", self.n_experts, 1)
        _check_int("top_k", self.top_k, 1)
        _check_int("n_shared", self.n_shared, 0)
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"MoEConfig.top_k must be in [1, n_experts={self.n_experts}]; got top_k={self.top_k}"
            )
        if self.score not in SCORE_FUNCTIONS:
            raise ConfigError(f"MoEConfig.score must be one of {SCORE_FUNCTIONS}; got {self.score!r}")
        if _check_float("bias_update_rate", self.bias_update_rate) < 0:
            raise ConfigError(f"MoEConfig.bias_update_rate must be >= 0; got {self.bias_update_rate}")
        if _check_float("route_scale", self.route_scale) <= 0:
            raise ConfigError(f"MoEConfig.route_scale must be > 0; got {self.route_scale}")


# ----------------------------------------------------------------------------------------------- routing
def _select_fast(logits: Tensor, bias: Tensor, top_k: int, score: str) -> Tensor | None:
    """The chosen experts ``[T, K]`` from the Triton routing kernel on CUDA (or under ``TRITON_INTERPRET=1``),
    else None. Only the integer choice comes from the kernel; the weights are gathered in torch so gradients
    flow exactly as in the reference below. The kernel makes the same choice (stable, lowest index on ties)."""
    from kernels._launch import use_triton

    if logits.dtype != torch.float32 or logits.shape[1] > 256 or not use_triton(logits):
        return None
    from kernels.routing import route_topk

    with torch.no_grad():
        _, indices = route_topk(logits.detach(), bias.detach().float(), top_k, score)
    return indices


def route(
    logits: Tensor, bias: Tensor, top_k: int, score: str = "sigmoid", route_scale: float = 1.0
) -> Routing:
    """Choose ``top_k`` experts per token and their mixing weights (aux-loss-free balancing, DeepSeek-V3).

    ``scores = sigmoid(logits)`` or ``softmax(logits)`` over experts, computed in float32 (float64 stays
    float64). The experts are chosen by ``scores + bias``; the bias only changes *which* experts are chosen.
    The weights are the unbiased scores of the chosen experts divided by their sum, times ``route_scale``.

    Ties in ``scores + bias`` go to the lower expert index: the choice is a stable descending sort, so it is
    deterministic on every device and a faster implementation must reproduce it exactly. On CUDA (and under
    ``TRITON_INTERPRET=1``) the choice comes from :func:`kernels.routing.route_topk`;
    ``INSPECTION_FORCE_REFERENCE=1`` keeps the sort.

    Args:
        logits: ``[T, E]`` router logits.
        bias: ``[E]`` load-balancing bias added to the scores for selection only.
        top_k: experts per token K, in ``[1, E]``.
        score: ``"sigmoid"`` or ``"softmax"``.
        route_scale: factor applied to the renormalised weights, > 0.

    Returns:
        The routing; gradients flow from ``weights`` to ``logits``, never to ``bias``.

    Raises:
        TypeError: a tensor argument is not a floating-point tensor.
        ValueError: a shape, ``top_k``, ``score`` or ``route_scale`` is out of range.
    """
    check_float_tensor("logits", logits, 2)
    check_float_tensor("bias", bias, 1)
    n_tokens, n_experts = logits.shape
    if bias.shape[0] != n_experts:
        raise ValueError(
            f"bias must be [E] with E={n_experts} (the logits' last dim); got {tuple(bias.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an int in [1, E={n_experts}]; got {top_k!r}")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score must be one of {SCORE_FUNCTIONS}; got {score!r}")
    if not (isinstance(route_scale, int | float) and math.isfinite(route_scale) and route_scale > 0):
        raise ValueError(f"route_scale must be a finite number > 0; got {route_scale!r}")

    compute = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute)  # [T, E]
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)  # [T, E]
    indices = _select_fast(logits, bias, top_k, score)
    if indices is None:
        biased = scores.detach() + bias.detach().to(compute)  # [T, E]
        order = torch.sort(biased, dim=-1, descending=True, stable=True).indices  # [T, E]
        indices = order[:, :top_k].contiguous()  # [T, K]
    chosen = scores.gather(1, indices)  # [T, K]
    # tiny only guards a sum that underflowed to 0 (sigmoid of logits below about -88); otherwise exact
    total = chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)  # [T, 1]
    weights = chosen / total * route_scale  # [T, K]
    return Routing(weights=weights, indices=indices, scores=scores)


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Metadata for grouped execution: every (token, slot) assignment, grouped by expert.

    Assignment ``a = t * K + k`` sends token ``t`` to expert ``indices[t, k]``. The sorted order lists the
    assignments of expert 0, then expert 1, ...; within an expert, in increasing ``a`` (a stable sort).

    Attributes:
        sorted_token: ``[T*K]`` token index of each assignment in sorted order.
        sorted_slot: ``[T*K]`` slot k of each assignment in sorted order.
        counts: ``[E]`` int64 assignments per expert.
        offsets: ``[E+1]`` exclusive prefix sum of ``counts``: expert e owns ``[offsets[e], offsets[e+1])``.
        inverse: ``[T*K]`` position in the sorted order of flat assignment ``a``, so that
            ``sorted_values[inverse]`` restores flat (token-major) order.
    """

    sorted_token: Tensor
    sorted_slot: Tensor
    counts: Tensor
    offsets: Tensor
    inverse: Tensor

    def __post_init__(self) -> None:
        for name in ("sorted_token", "sorted_slot", "counts", "offsets", "inverse"):
            check_index_tensor(f"RoutingPlan.{name}", getattr(self, name), 1)
        n_assign = self.sorted_token.shape[0]
        if self.sorted_slot.shape[0] != n_assign or self.inverse.shape[0] != n_assign:
            raise ValueError(
                "RoutingPlan.sorted_token, sorted_slot and inverse must all be [T*K]; got "
                f"{self.sorted_token.shape[0]}, {self.sorted_slot.shape[0]} and {self.inverse.shape[0]}"
            )
        if self.offsets.shape[0] != self.counts.shape[0] + 1:
            raise ValueError(
                f"RoutingPlan.offsets must be [E+1] with E={self.counts.shape[0]}; "
                f"got {self.offsets.shape[0]}"
            )


def plan(indices: Tensor, n_experts: int) -> RoutingPlan:
    """Group the assignments of ``indices`` by expert.

    Args:
        indices: ``[T, K]`` int64 chosen experts, each in ``[0, n_experts)``.
        n_experts: E.

    Returns:
        The plan; all its tensors are int64 on ``indices``' device.

    Raises:
        TypeError: ``indices`` is not an int64 tensor.
        ValueError: ``indices`` is not rank 2 or holds an expert outside ``[0, n_experts)``.
    """
    check_index_tensor("indices", indices, 2)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1; got {n_experts!r}")
    top_k = indices.shape[1]
    flat = indices.reshape(-1)  # [T*K]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
        raise ValueError(
            f"indices must lie in [0, {n_experts}); got values from {int(flat.min())} to {int(flat.max())}"
        )
    order = torch.sort(flat, stable=True).indices  # [T*K] flat assignment at each sorted position
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)  # [E+1]
    offsets[1:] = torch.cumsum(counts, dim=0)
    inverse = torch.empty_like(order)  # [T*K]
    inverse[order] = torch.arange(order.numel(), device=indices.device)
    return RoutingPlan(
        sorted_token=torch.div(order, top_k, rounding_mode="floor"),
        sorted_slot=order % top_k,
        counts=counts,
        offsets=offsets,
        inverse=inverse,
    )


# --------------------------------------------------------------------------------------------- experts
def expert_ffn_reference(
    x: Tensor, routing: Routing, w_gate: Tensor, w_up: Tensor, w_down: Tensor
) -> Tensor:
    """Routed SwiGLU experts, one expert at a time: the readable specification of the grouped computation.

    For each expert e with tokens: gather its tokens, ``h = silu(x @ w_gate[e]) * (x @ w_up[e])``,
    ``y = h @ w_down[e]``, scale each row by its routing weight and add it into the output. Experts without
    tokens are skipped, so their weights receive zero gradient. Computed in float32 (float64 when ``x`` is
    float64) and cast back to ``x.dtype``; differentiable in ``x``, the three weights and ``routing.weights``.

    Args:
        x: ``[T, D]`` tokens.
        routing: the tokens' routing (``indices`` and ``weights`` are ``[T, K]``).
        w_gate: ``[E, D, H]`` gate projections.
        w_up: ``[E, D, H]`` up projections.
        w_down: ``[E, H, D]`` down projections.

    Returns:
        ``[T, D]`` weighted sum of each token's chosen experts, in ``x.dtype``.

    Raises:
        TypeError: a tensor is not floating point or ``routing`` is not a :class:`Routing`.
        ValueError: the shapes do not agree.
    """
    check_expert_ffn_args(x, routing, w_gate, w_up, w_down)
    n_tokens, dim = x.shape
    n_experts = w_gate.shape[0]

    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)  # [T, D]
    weights = routing.weights.to(compute)  # [T, K]
    grouping = plan(routing.indices, n_experts)
    offsets = grouping.offsets.tolist()  # one host sync for the whole loop
    out = xc.new_zeros(n_tokens, dim)  # [T, D]
    for e in range(n_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        tokens = grouping.sorted_token[start:end]  # [n_e]
        slots = grouping.sorted_slot[start:end]  # [n_e]
        xe = xc[tokens]  # [n_e, D]
        h = F.silu(xe @ w_gate[e].to(compute)) * (xe @ w_up[e].to(compute))  # [n_e, H]
        ye = h @ w_down[e].to(compute)  # [n_e, D]
        ye = ye * weights[tokens, slots].unsqueeze(-1)  # [n_e, D]
        out = out.index_add(0, tokens, ye)  # [T, D]
    return out.to(x.dtype)


def expert_ffn_default(
    x: Tensor, routing: Routing, w_gate: Tensor, w_up: Tensor, w_down: Tensor
) -> Tensor:
    """The expert computation :class:`SparseMoE` uses unless told otherwise: the fused Triton kernels of
    :func:`kernels.moe.expert_ffn` on CUDA (and under ``TRITON_INTERPRET=1``) for float32/float16/bfloat16 x
    and up to ``kernels.routing.MAX_EXPERTS`` experts, else :func:`expert_ffn_reference`.
    ``INSPECTION_FORCE_REFERENCE=1`` keeps the reference. The kernels are imported on first use, so importing
    this module needs no GPU.

    Args and result are those of :func:`expert_ffn_reference`.
    """
    from kernels._launch import use_triton

    if isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and use_triton(x):
        from kernels.moe import expert_ffn
        from kernels.routing import MAX_EXPERTS

        if isinstance(routing, Routing) and routing.n_experts <= MAX_EXPERTS:
            return expert_ffn(x, routing, w_gate, w_up, w_down)
    return expert_ffn_reference(x, routing, w_gate, w_up, w_down)


def _init_normal(weight: Tensor, fan_in: int, gain: float = 1.0) -> None:
    nn.init.normal_(weight, mean=0.0, std=gain / math.sqrt(fan_in))


#: The down projection starts at 1/sqrt(2) of the fan-in scale so the expert's residual branch starts small.
_DOWN_GAIN = 1.0 / math.sqrt(2.0)


class SwiGLU(nn.Module):
    """A gated feed-forward block, ``down(silu(gate(x)) * up(x))``: the shared expert.

    Args:
        dim: token width D.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"SwiGLU needs dim >= 1 and hidden >= 1; got dim={dim}, hidden={hidden}")
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init with std 1/sqrt(fan_in); the down projection is scaled by ``_DOWN_GAIN``."""
        _init_normal(self.gate.weight, self.gate.in_features)
        _init_normal(self.up.weight, self.up.in_features)
        _init_normal(self.down.weight, self.down.in_features, _DOWN_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``[..., D]`` tokens; returns ``[..., D]``."""
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [..., D]


# ---------------------------------------------------------------------------------------------- stats
@dataclass(frozen=True, eq=False)
class RouterStats:
    """How one forward pass spread its tokens over the routed experts (for monitoring; no gradient).

    Attributes:
        counts: ``[E]`` int64 assignments per expert; sums to ``T * K``.
        load: ``[E]`` share of the assignments per expert, ``counts / (T * K)``; sums to 1.
        gate_entropy: ``[]`` mean over tokens of the entropy (nats) of the token's scores normalised over
            all E experts; in ``[0, log E]``.
        max_load_ratio: ``[]`` ``max(load) * E``: 1 is perfectly balanced, ``E / K`` is every token's
            top-k sharing one expert (``E`` when K = 1).
    """

    counts: Tensor
    load: Tensor
    gate_entropy: Tensor
    max_load_ratio: Tensor


@torch.no_grad()
def router_stats(routing: Routing) -> RouterStats:
    """Summarise a routing for monitoring.

    Args:
        routing: the routing of at least one token.

    Returns:
        The statistics, detached and in float32 (counts int64).

    Raises:
        ValueError: the routing has no tokens, so the load is undefined.
    """
    n_tokens, top_k = routing.indices.shape
    if n_tokens == 0:
        raise ValueError("router statistics need at least one token; got T=0")
    n_experts = routing.n_experts
    counts = torch.bincount(routing.indices.reshape(-1), minlength=n_experts)  # [E]
    load = counts.to(torch.float32) / (n_tokens * top_k)  # [E]
    scores = routing.scores.to(torch.float32)  # [T, E]
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # [T, E]
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # [T]
    return RouterStats(
        counts=counts,
        load=load,
        gate_entropy=entropy.mean(),
        max_load_ratio=load.max() * n_experts,
    )


# ---------------------------------------------------------------------------------------------- module
#: The expert computation :class:`SparseMoE` calls: ``(x [T, D], routing, w_gate, w_up, w_down) -> [T, D]``.
ExpertFFN = Callable[[Tensor, Routing, Tensor, Tensor, Tensor], Tensor]


class SparseMoE(nn.Module):
    """DeepSeekMoE layer: a shared SwiGLU expert plus top-k routed SwiGLU experts, aux-loss-free balanced.

    ``forward`` routes in float32 with :func:`route` and runs the routed experts through ``self.expert_ffn``,
    which defaults to :func:`expert_ffn_default` (the Triton kernels on CUDA, :func:`expert_ffn_reference`
    elsewhere). Another implementation with the same signature may be assigned to that attribute (per
    instance); it must match the reference within its documented tolerance.

    The load-balancing bias ``expert_bias`` is a persistent buffer (saved in the state dict, never trained by
    the optimizer). The training loop calls :meth:`update_bias` after each optimizer step with the step's
    accumulated ``RouterStats.counts``; ``forward`` never changes it, so train and eval forwards are pure
    and deterministic for fixed weights and bias.

    Args:
        config: sizes and routing rules.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig; got {type(config).__name__}")
        self.config = config
        e, d, h = config.n_experts, config.dim, config.hidden
        self.router = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.empty(e, d, h))
        self.w_up = nn.Parameter(torch.empty(e, d, h))
        self.w_down = nn.Parameter(torch.empty(e, h, d))
        self.shared = SwiGLU(d, h * config.n_shared) if config.n_shared > 0 else None
        self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32), persistent=True)
        self.expert_ffn: ExpertFFN = expert_ffn_default
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init with std 1/sqrt(fan_in); down projections are scaled by ``_DOWN_GAIN``."""
        d, h = self.config.dim, self.config.hidden
        _init_normal(self.router.weight, d)
        _init_normal(self.w_gate, d)
        _init_normal(self.w_up, d)
        _init_normal(self.w_down, h, _DOWN_GAIN)
        if self.shared is not None:
            self.shared.reset_parameters()

    def forward(
        self, x: Tensor, return_routing: bool = False
    ) -> tuple[Tensor, RouterStats] | tuple[Tensor, RouterStats, Routing]:
        """Mix each token through the shared expert and its top-k routed experts.

        Args:
            x: ``[..., D]`` tokens, at least one.
            return_routing: also return the routing the experts ran with (for audit); the outputs are the
                same either way.

        Returns:
            ``[..., D]`` outputs in ``x.dtype``, and the routing statistics of this call; with
            ``return_routing``, third, the :class:`Routing` of the ``T`` tokens of ``x`` flattened in order
            (``weights``, ``indices`` ``[T, K]``), exactly what ``self.expert_ffn`` received.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: ``x``'s last dimension is not D, or ``x`` holds no tokens.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
        dim = self.config.dim
        if x.dim() < 1 or x.shape[-1] != dim:
            raise ValueError(f"x must be [..., D] with D={dim}; got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"x must hold at least one token; got shape {tuple(x.shape)}")
        flat = x.reshape(-1, dim)  # [T, D]
        compute = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(flat.to(compute), self.router.weight.to(compute))  # [T, E]
        routing = route(
            logits, self.expert_bias, self.config.top_k, self.config.score, self.config.route_scale
        )
        y = self.expert_ffn(flat, routing, self.w_gate, self.w_up, self.w_down)  # [T, D]
        if self.shared is not None:
            y = y + self.shared(flat)  # [T, D]
        if return_routing:
            return y.reshape(x.shape), router_stats(routing), routing  # [..., D]
        return y.reshape(x.shape), router_stats(routing)  # [..., D]

    @torch.no_grad()
    def update_bias(self, counts: Tensor) -> None:
        """Nudge the balancing bias toward equal load (DeepSeek-V3): ``bias += rate * sign(mean - counts)``.

        Under-loaded experts gain bias, over-loaded ones lose it, each by ``config.bias_update_rate``.
        Call it from the training loop after each optimizer step, never inside ``forward``.

        Args:
            counts: ``[E]`` assignments per expert accumulated over the step (``RouterStats.counts``, summed
                over the step's micro-batches).

        Raises:
            TypeError: ``counts`` is not a tensor.
            ValueError: ``counts`` is not ``[E]``.
        """
        if not isinstance(counts, Tensor):
            raise TypeError(f"counts must be a torch.Tensor; got {type(counts).__name__}")
        if tuple(counts.shape) != (self.config.n_experts,):
            raise ValueError(f"counts must be [E] with E={self.config.n_experts}; got {tuple(counts.shape)}")
        load = counts.to(device=self.expert_bias.device, dtype=torch.float32)  # [E]
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.config.bias_update_rate)
