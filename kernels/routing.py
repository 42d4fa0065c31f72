"""MoE routing kernels: top-k expert choice with aux-loss-free bias, and the per-expert assignment counts.

Shapes: T tokens · E experts · K top-k · A = T*K assignments

Two ops, each in four parts (torch reference, ``@triton.jit`` kernel, validating launcher, public dispatcher):

* :func:`route_topk` chooses ``K`` experts per token by ``scores + bias`` and mixes them with the unbiased
  scores renormalised to 1 (times ``route_scale``), exactly as :func:`fusion.moe.route`;
* :func:`expert_counts` counts the assignments per expert, the ``counts`` of :func:`fusion.moe.plan`.

The references are written out here in torch (not imported from :mod:`fusion.moe`, which will call these ops)
and the tests check them against :mod:`fusion.moe` bit for bit. The public ops run the Triton kernels on CUDA
tensors or under ``TRITON_INTERPRET=1`` and the references elsewhere or when ``INSPECTION_FORCE_REFERENCE=1``
(see :func:`kernels._launch.use_triton`). The Triton paths are forward only.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._launch import block_size, use_triton

#: Router affinity functions, as in :data:`fusion.moe.SCORE_FUNCTIONS`.
SCORE_FUNCTIONS: tuple[str, ...] = ("sigmoid", "softmax")
#: Logit dtypes the routing kernel loads; it computes in float32 whatever it loads.
ROUTING_LOGIT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Largest E the routing kernel holds in one row tile (its ``[tokens, E]`` tile lives in registers).
MAX_EXPERTS = 256
#: Elements of one ``[tokens, E]`` routing tile: bounds the tokens per program so a tile stays in registers.
_ROUTING_TILE_ELEMENTS = 4096
#: Assignments counted by one program of the histogram kernel.
_COUNTS_BLOCK = 1024


# ======================================================================================== routing: top-k
# ------------------------------------------------------------------------------------------- reference
def _check_routing_args(
    logits: object, bias: object, top_k: object, score: object, route_scale: object
) -> None:
    """Checks shared by the reference and the launcher: types, ranks, sizes, ranges and devices."""
    for name, value, rank, shape in (("logits", logits, 2, "[T, E]"), ("bias", bias, 1, "[E]")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a {shape} torch.Tensor; got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point {shape} tensor; got dtype {value.dtype}")
        if value.dim() != rank:
            raise ValueError(f"{name} must be {shape} (rank {rank}); got shape {tuple(value.shape)}")
    n_experts = logits.shape[1]
    if bias.shape[0] != n_experts:
        raise ValueError(
            f"bias must be [E] with E={n_experts} (the logits' last dim); got shape {tuple(bias.shape)}"
        )
    if bias.device != logits.device:
        raise ValueError(f"bias must be on the logits' device {logits.device}; got {bias.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be an int in [1, E={n_experts}]; got {top_k!r}")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score must be one of {SCORE_FUNCTIONS}; got {score!r}")
    if (
        isinstance(route_scale, bool)
        or not isinstance(route_scale, int | float)
        or not math.isfinite(route_scale)
        or route_scale <= 0
    ):
        raise ValueError(f"route_scale must be a finite number > 0; got {route_scale!r}")


def routing_reference(
    logits: Tensor, bias: Tensor, top_k: int, score: str = "sigmoid", route_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Top-k routing in torch: the executable specification, equal to :func:`fusion.moe.route`.

    ``scores = sigmoid(logits)`` or ``softmax(logits)`` over experts in float32 (float64 stays float64). The
    experts are chosen by ``scores + bias`` in a stable descending sort, so ties go to the lower expert
    index; the weights are the unbiased scores of the chosen experts divided by their sum, times
    ``route_scale``.

    Args:
        logits: ``[T, E]`` router logits.
        bias: ``[E]`` load-balancing bias, used for the choice only.
        top_k: experts per token K, in ``[1, E]``.
        score: ``"sigmoid"`` or ``"softmax"``.
        route_scale: factor applied to the renormalised weights, > 0.

    Returns:
        ``weights`` ``[T, K]`` (float32, float64 for float64 logits; differentiable in ``logits``) and
        ``indices`` ``[T, K]`` int64, in descending order of biased score.

    Raises:
        TypeError: ``logits`` or ``bias`` is not a floating-point tensor.
        ValueError: a shape, device, ``top_k``, ``score`` or ``route_scale`` is out of range.
    """
    _check_routing_args(logits, bias, top_k, score, route_scale)
    compute = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute)  # [T, E]
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)  # [T, E]
    biased = scores.detach() + bias.detach().to(compute)  # [T, E]
    order = torch.sort(biased, dim=-1, descending=True, stable=True).indices  # [T, E]
    indices = order[:, :top_k].contiguous()  # [T, K]
    chosen = scores.gather(1, indices)  # [T, K]
    total = chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)  # [T, 1]
    weights = chosen / total * route_scale  # [T, K]
    return weights, indices


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _routing_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    indices_ptr,
    n_tokens,
    n_experts,
    route_scale,
    TOP_K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program routes BLOCK_T tokens: scores, K passes of (max, lowest index, mask out), renormalise."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < n_tokens
    col_ok = cols < n_experts
    tile_ok = row_ok[:, None] & col_ok[None, :]  # [BT, BE]
    row_start = rows.to(tl.int64) * n_experts  # [BT]

    x = tl.load(logits_ptr + row_start[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, float("-inf"))  # padded experts get probability 0
        row_max = tl.max(x, axis=1)  # [BT]
        num = tl.exp(x - row_max[:, None])  # [BT, BE]
        scores = tl.div_rn(num, tl.sum(num, axis=1)[:, None])  # [BT, BE] IEEE division, as torch
    else:
        scores = tl.sigmoid(x)  # [BT, BE]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)  # [BE]
    biased = scores + bias[None, :]  # [BT, BE] for the choice only

    slots = tl.arange(0, BLOCK_K)  # [BK]
    chosen_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # [BT, BK]
    chosen_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)  # [BT, BK]
    free = tile_ok  # [BT, BE] experts not chosen yet (padding and rows past T are never free)
    for k in range(TOP_K):
        best = tl.max(tl.where(free, biased, float("-inf")), axis=1)  # [BT]
        hit = free & (biased == best[:, None])  # [BT, BE]
        pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # [BT] lowest index among ties
        picked = cols[None, :] == pick[:, None]  # [BT, BE]
        score_k = tl.sum(tl.where(picked, scores, 0.0), axis=1)  # [BT] unbiased score of the pick
        slot_k = slots[None, :] == k  # [1, BK]
        chosen_w = tl.where(slot_k, score_k[:, None], chosen_w)
        chosen_i = tl.where(slot_k, pick[:, None], chosen_i)
        free = free & ~picked

    # the smallest normal float32 guards a sum that underflowed to 0, as the reference does
    total = tl.maximum(tl.sum(chosen_w, axis=1), 1.1754943508222875e-38)  # [BT]
    # div_rn: Triton's fp32 `/` is an approximate division on GPUs (s / s was not exactly 1 on an H100)
    weights = tl.div_rn(chosen_w, total[:, None]) * route_scale  # [BT, BK]
    out_ok = row_ok[:, None] & (slots[None, :] < TOP_K)  # [BT, BK]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]  # [BT, BK]
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(indices_ptr + out, chosen_i.to(tl.int64), mask=out_ok)


# -------------------------------------------------------------------------------------------- launcher
def _routing_triton(
    logits: Tensor, bias: Tensor, top_k: int, score: str, route_scale: float
) -> tuple[Tensor, Tensor]:
    """Validate the inputs, allocate the outputs and launch :func:`_routing_kernel` (forward only)."""
    _check_routing_args(logits, bias, top_k, score, route_scale)
    if logits.dtype not in ROUTING_LOGIT_DTYPES:
        raise TypeError(f"logits must have a dtype in {ROUTING_LOGIT_DTYPES}; got {logits.dtype}")
    if bias.dtype != torch.float32:
        raise TypeError(f"bias must be float32; got {bias.dtype} (cast it with bias.float())")
    n_tokens, n_experts = logits.shape
    if n_experts > MAX_EXPERTS:
        raise ValueError(
            f"the routing kernel holds at most E={MAX_EXPERTS} experts in a row tile; got E={n_experts} "
            "(use routing_reference or INSPECTION_FORCE_REFERENCE=1 for more)"
        )
    if torch.is_grad_enabled() and logits.requires_grad:
        raise ValueError(
            "the routing kernel is forward only: expected logits without grad; got requires_grad=True "
            "(call it under torch.no_grad(), or use routing_reference to differentiate the weights)"
        )
    logits = logits.contiguous()
    bias = bias.contiguous()
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=logits.device)  # [T, K]
    indices = torch.empty(n_tokens, top_k, dtype=torch.int64, device=logits.device)  # [T, K]
    if n_tokens == 0:
        return weights, indices
    block_e = block_size(n_experts, lo=16, hi=MAX_EXPERTS)
    block_k = block_size(top_k, lo=1, hi=MAX_EXPERTS)
    block_t = block_size(n_tokens, lo=1, hi=max(1, _ROUTING_TILE_ELEMENTS // block_e))
    grid = (triton.cdiv(n_tokens, block_t),)
    _routing_kernel[grid](
        logits,
        bias,
        weights,
        indices,
        n_tokens,
        n_experts,
        float(route_scale),
        TOP_K=top_k,
        SOFTMAX=score == "softmax",
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
    )
    return weights, indices


# ---------------------------------------------------------------------------------------------- public
def route_topk(
    logits: Tensor, bias: Tensor, top_k: int, score: str = "sigmoid", route_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Choose ``top_k`` experts per token and their mixing weights; Triton on CUDA or the interpreter.

    Same contract as :func:`routing_reference` (and :func:`fusion.moe.route`): indices equal it exactly
    (ties go to the lower expert index), weights within float32 rounding. The Triton path computes in
    float32 from float32, float16 or bfloat16 logits, takes a float32 bias and at most
    :data:`MAX_EXPERTS` experts, and is forward only.

    Args:
        logits: ``[T, E]`` router logits, finite.
        bias: ``[E]`` load-balancing bias, used for the choice only.
        top_k: experts per token K, in ``[1, E]``.
        score: ``"sigmoid"`` or ``"softmax"``.
        route_scale: factor applied to the renormalised weights, > 0.

    Returns:
        ``weights`` ``[T, K]`` float32 and ``indices`` ``[T, K]`` int64, in descending order of biased score.

    Raises:
        TypeError: a tensor has the wrong dtype.
        ValueError: a shape, device, ``top_k``, ``score`` or ``route_scale`` is out of range, or (Triton
            path) E exceeds :data:`MAX_EXPERTS` or ``logits`` requires grad.
    """
    if isinstance(logits, Tensor) and use_triton(logits):
        return _routing_triton(logits, bias, top_k, score, route_scale)
    return routing_reference(logits, bias, top_k, score, route_scale)


# ================================================================================= routing plan: counts
# ------------------------------------------------------------------------------------------- reference
def _check_plan_args(indices: object, n_experts: object) -> None:
    """Checks shared by the reference and the launcher (the value range needs one device sync)."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a [T, K] torch.Tensor; got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64; got dtype {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be [T, K] (rank 2); got shape {tuple(indices.shape)}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1; got {n_experts!r}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= n_experts:
            raise ValueError(f"indices must lie in [0, {n_experts}); got values from {low} to {high}")


def routing_plan_reference(indices: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group the assignments by expert in torch: the specification, equal to :func:`fusion.moe.plan`.

    Args:
        indices: ``[T, K]`` int64 chosen experts, each in ``[0, n_experts)``.
        n_experts: E.

    Returns:
        ``counts`` ``[E]`` assignments per expert; ``offsets`` ``[E+1]`` their exclusive prefix sum, so expert
        e owns sorted positions ``[offsets[e], offsets[e+1])``; ``sorted_token`` ``[A]`` the token of each
        assignment in expert order (a stable sort of the flat, token-major assignments); ``inverse`` ``[A]``
        the sorted position of each flat assignment. All int64 on ``indices``' device.

    Raises:
        TypeError: ``indices`` is not an int64 tensor.
        ValueError: ``indices`` is not rank 2, ``n_experts`` < 1, or an expert is outside ``[0, n_experts)``.
    """
    _check_plan_args(indices, n_experts)
    top_k = indices.shape[1]
    flat = indices.reshape(-1)  # [A]
    order = torch.sort(flat, stable=True).indices  # [A] flat assignment at each sorted position
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)  # [E+1]
    offsets[1:] = torch.cumsum(counts, dim=0)
    inverse = torch.empty_like(order)  # [A]
    inverse[order] = torch.arange(order.numel(), device=indices.device)
    sorted_token = torch.div(order, top_k, rounding_mode="floor")  # [A]
    return counts, offsets, sorted_token, inverse


# ---------------------------------------------------------------------------------------------- kernel
@triton.jit
def _expert_counts_kernel(indices_ptr, counts_ptr, n_assign, n_experts, BLOCK: tl.constexpr):
    """One program adds 1 per assignment of its BLOCK assignments into ``counts`` (atomic histogram)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = offs < n_assign
    expert = tl.load(indices_ptr + offs, mask=ok, other=0)  # [BLOCK]
    ok = ok & (expert >= 0) & (expert < n_experts)  # never write outside counts
    ones = tl.full((BLOCK,), 1, dtype=tl.int32)
    tl.atomic_add(counts_ptr + expert, ones, mask=ok)


# -------------------------------------------------------------------------------------------- launcher
def _expert_counts_triton(indices: Tensor, n_experts: int) -> Tensor:
    """Validate the inputs (one device sync for the value range) and launch :func:`_expert_counts_kernel`."""
    _check_plan_args(indices, n_experts)
    n_assign = indices.numel()
    if n_assign >= 2**31:
        raise ValueError(
            f"the counts kernel indexes assignments with int32: expected T*K < 2**31; got {n_assign}"
        )
    indices = indices.contiguous()
    counts = torch.zeros(n_experts, dtype=torch.int32, device=indices.device)  # [E]
    if n_assign:
        block = block_size(n_assign, lo=16, hi=_COUNTS_BLOCK)
        grid = (triton.cdiv(n_assign, block),)
        _expert_counts_kernel[grid](indices, counts, n_assign, n_experts, BLOCK=block)
    return counts.to(torch.int64)


# ---------------------------------------------------------------------------------------------- public
def expert_counts(indices: Tensor, n_experts: int) -> Tensor:
    """Assignments per expert; Triton on CUDA or the interpreter, else the reference.

    Equal to ``routing_plan_reference(indices, n_experts)[0]`` (and ``fusion.moe.plan(...).counts``)
    exactly. The offsets are its exclusive prefix sum (``torch.cumsum``).

    Args:
        indices: ``[T, K]`` int64 chosen experts, each in ``[0, n_experts)``.
        n_experts: E.

    Returns:
        ``[E]`` int64 counts; they sum to ``T * K``.

    Raises:
        TypeError: ``indices`` is not an int64 tensor.
        ValueError: ``indices`` is not rank 2, ``n_experts`` < 1, or an expert is outside ``[0, n_experts)``.
    """
    if isinstance(indices, Tensor) and use_triton(indices):
        return _expert_counts_triton(indices, n_experts)
    return routing_plan_reference(indices, n_experts)[0]
