"""MoE routing kernels: top-k expert choice with aux-loss-free bias, and the per-expert assignment counts.

Shapes: T tokens · E experts · K top-k · A = T*K assignments

Three ops, each in four parts (torch reference, ``@triton.jit`` kernel, validating launcher, public dispatcher):

* :func:`route_topk` chooses ``K`` experts per token by ``scores + bias`` and mixes them with the unbiased
  scores renormalised to 1 (times ``route_scale``), exactly as :func:`fusion.moe.route`;
* :func:`expert_counts` counts the assignments per expert, the ``counts`` of :func:`fusion.moe.plan`;
* :func:`block_plan` groups the assignments by expert (the whole of :func:`fusion.moe.plan`) and pads each
  expert's segment to whole row tiles for the grouped GEMMs of :mod:`kernels.moe`.

The references are written out here in torch (not imported from :mod:`fusion.moe`, which will call these ops)
and the tests check them against :mod:`fusion.moe` bit for bit. The public ops run the Triton kernels on CUDA
tensors or under ``TRITON_INTERPRET=1`` and the references elsewhere or when ``INSPECTION_FORCE_REFERENCE=1``
(see :func:`kernels._launch.use_triton`). The Triton paths are forward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# ============================================================================ block plan: grouped layout
#: Elements of one ``[assignments, E]`` one-hot tile in the block-plan kernels (bounds the chunk length).
_PLAN_TILE_ELEMENTS = 8192
#: Experts whose running sums one program of the block-plan scan carries, and chunks it scans per step
#: (a [128, 16] int32 tile compiles for sm_90 without register spills; [512, 16] spills).
_PLAN_SCAN_EXPERTS = 16
_PLAN_SCAN_CHUNKS = 128
#: Largest ``[chunks, E]`` count tile the scatter kernel sums itself instead of launching the scan kernel (one
#: launch less: the plans of the model's shapes are launch-bound, tens of microseconds per launch).
_PLAN_FUSED_SCAN_ELEMENTS = 4096


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The assignments grouped by expert, with each expert's segment padded to whole row tiles.

    Assignment ``a = t * K + k`` sends token ``t`` to expert ``indices[t, k]``. The sorted order lists the
    assignments of expert 0, then expert 1, ... and, within an expert, in increasing ``a`` (a stable sort), as
    :func:`fusion.moe.plan`. The grouped GEMMs cut each expert's segment into tiles of ``block_m`` rows; the
    padded layout gives expert e the padded rows ``[padded_offsets[e], padded_offsets[e+1])``, whose first
    ``counts[e]`` rows are its assignments and whose rest (fewer than ``block_m``) is padding. An expert without
    assignments gets no rows. All tensors are int64 on the indices' device.

    Attributes:
        counts: ``[E]`` assignments per expert.
        offsets: ``[E+1]`` exclusive prefix sum of ``counts``: expert e owns sorted positions
            ``[offsets[e], offsets[e+1])``.
        sorted_token: ``[A]`` token of each assignment in sorted order.
        sorted_slot: ``[A]`` slot k of each assignment in sorted order.
        inverse: ``[A]`` sorted position of flat assignment ``a`` (``sorted_values[inverse]`` is token-major).
        padded_offsets: ``[E+1]`` exclusive prefix sum of ``counts`` rounded up to multiples of ``block_m``.
        block_m: rows per tile, a power of two.
    """

    counts: Tensor
    offsets: Tensor
    sorted_token: Tensor
    sorted_slot: Tensor
    inverse: Tensor
    padded_offsets: Tensor
    block_m: int

    @property
    def n_experts(self) -> int:
        """E."""
        return self.counts.shape[0]

    @property
    def n_assignments(self) -> int:
        """A = T * K."""
        return self.sorted_token.shape[0]

    @property
    def max_tiles(self) -> int:
        """An upper bound on the row tiles, known without reading the counts back from the device.

        ``sum_e ceil(c_e / B) <= ceil(A / B) + m - 1`` for the m <= min(E, A) experts with assignments.
        """
        a = self.n_assignments
        return 0 if a == 0 else triton.cdiv(a, self.block_m) + min(self.n_experts, a) - 1


# ------------------------------------------------------------------------------------------- reference
def _check_block_m(block_m: object) -> None:
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 1; got {block_m!r}")


def block_plan_reference(indices: Tensor, n_experts: int, block_m: int) -> BlockPlan:
    """Group the assignments by expert and pad each segment to whole tiles, in torch: the specification.

    ``counts``, ``offsets``, ``sorted_token`` and ``inverse`` are :func:`routing_plan_reference`'s (equal to
    :func:`fusion.moe.plan`'s); ``sorted_slot`` is ``plan``'s too.

    Args:
        indices: ``[T, K]`` int64 chosen experts, each in ``[0, n_experts)``.
        n_experts: E.
        block_m: rows per tile, a power of two.

    Returns:
        The plan.

    Raises:
        TypeError: ``indices`` is not an int64 tensor.
        ValueError: ``indices`` is not rank 2, ``n_experts`` < 1, an expert is outside ``[0, n_experts)``, or
            ``block_m`` is not a power of two.
    """
    _check_block_m(block_m)
    counts, offsets, sorted_token, inverse = routing_plan_reference(indices, n_experts)
    top_k = indices.shape[1]
    order = torch.empty_like(inverse)  # [A] flat assignment at each sorted position
    order[inverse] = torch.arange(inverse.numel(), device=indices.device)
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)  # [E+1]
    padded_offsets[1:] = torch.cumsum(padded, dim=0)
    return BlockPlan(
        counts=counts,
        offsets=offsets,
        sorted_token=sorted_token,
        sorted_slot=order % top_k,
        inverse=inverse,
        padded_offsets=padded_offsets,
        block_m=block_m,
    )


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _plan_histogram_kernel(indices_ptr, chunk_counts_ptr, invalid_ptr, n_assign, n_experts, CHUNK: tl.constexpr,
                           BLOCK_E: tl.constexpr):
    """One program counts the assignments of its CHUNK per expert, ``chunk_counts[chunk, e]`` (no atomics),
    and those naming no expert in ``[0, E)``, ``invalid[chunk]``."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)  # [C]
    ok = offs < n_assign
    expert = tl.load(indices_ptr + offs, mask=ok, other=0)  # [C]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    hits = ((expert[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32)  # [C, BE]
    tl.store(chunk_counts_ptr + pid * n_experts + cols, tl.sum(hits, axis=0), mask=cols < n_experts)
    bad = ok & ((expert < 0) | (expert >= n_experts))  # [C]
    tl.store(invalid_ptr + pid, tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def _plan_scan_kernel(chunk_counts_ptr, chunk_base_ptr, counts_ptr, invalid_ptr, n_chunks, n_experts,
                      BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program scans BLOCK_E experts down the chunks: the exclusive running count of each expert before
    each chunk (``chunk_base``) and the expert totals (``counts``). Program 0 also totals ``invalid`` into its
    last slot."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    col_ok = cols < n_experts
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)  # [BE] assignments of each expert in earlier chunks
    bad = tl.zeros((BLOCK_C,), dtype=tl.int32)  # [BC]
    for start in range(0, n_chunks, BLOCK_C):
        rows = start + tl.arange(0, BLOCK_C)  # [BC]
        ok = (rows < n_chunks)[:, None] & col_ok[None, :]  # [BC, BE]
        at = rows[:, None] * n_experts + cols[None, :]  # [BC, BE]
        tile = tl.load(chunk_counts_ptr + at, mask=ok, other=0)  # [BC, BE]
        tl.store(chunk_base_ptr + at, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=ok)
        carry += tl.sum(tile, axis=0)
        bad += tl.load(invalid_ptr + rows, mask=rows < n_chunks, other=0)
    tl.store(counts_ptr + cols, carry.to(tl.int64), mask=col_ok)
    if pid == 0:
        tl.store(invalid_ptr + n_chunks, tl.sum(bad, axis=0))


@triton.jit
def _plan_scatter_kernel(indices_ptr, chunk_counts_ptr, chunk_base_ptr, invalid_ptr, counts_ptr, offsets_ptr,
                         padded_offsets_ptr, sorted_token_ptr, sorted_slot_ptr, inverse_ptr, n_assign, n_experts,
                         n_chunks, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_E: tl.constexpr, FUSED_SCAN: tl.constexpr, BLOCK_CH: tl.constexpr):
    """One program places the assignments of its CHUNK: position = offsets[e] + (assignments to e in earlier
    chunks) + rank among the chunk's earlier assignments to e (a stable counting sort). Program 0 also writes
    the offsets. FUSED_SCAN: with few chunks (BLOCK_CH of them at most) each program sums the earlier chunks'
    counts itself, and program 0 writes ``counts`` and the invalid total: one launch instead of two.
    Assignments naming no expert are counted in ``invalid`` and written nowhere: the valid ones fill sorted
    positions ``[0, offsets[E])`` exactly, so nothing downstream reads out of bounds."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)  # [BE]
    col_ok = cols < n_experts
    if FUSED_SCAN:
        chunks = tl.arange(0, BLOCK_CH)  # [BCH]
        tile = tl.load(chunk_counts_ptr + chunks[:, None] * n_experts + cols[None, :],
                       mask=(chunks < n_chunks)[:, None] & col_ok[None, :], other=0)  # [BCH, BE]
        counts = tl.sum(tile, axis=0)  # [BE]
        before = tl.sum(tl.where((chunks < pid)[:, None], tile, 0), axis=0)  # [BE]
        if pid == 0:
            tl.store(counts_ptr + cols, counts.to(tl.int64), mask=col_ok)
            bad = tl.load(invalid_ptr + chunks, mask=chunks < n_chunks, other=0)  # [BCH]
            tl.store(invalid_ptr + n_chunks, tl.sum(bad, axis=0))
    else:
        counts = tl.load(counts_ptr + cols, mask=col_ok, other=0).to(tl.int32)  # [BE]
        before = tl.load(chunk_base_ptr + pid * n_experts + cols, mask=col_ok, other=0)  # [BE]
    offsets = tl.cumsum(counts, axis=0) - counts  # [BE] exclusive
    if pid == 0:
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BE]
        tl.store(offsets_ptr + cols, offsets.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + n_experts, tl.sum(counts, axis=0).to(tl.int64))
        tl.store(padded_offsets_ptr + cols, (tl.cumsum(padded, axis=0) - padded).to(tl.int64), mask=col_ok)
        tl.store(padded_offsets_ptr + n_experts, tl.sum(padded, axis=0).to(tl.int64))
    offs = pid * CHUNK + tl.arange(0, CHUNK)  # [C]
    ok = offs < n_assign
    expert = tl.load(indices_ptr + offs, mask=ok, other=0)  # [C]
    hits = ((expert[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32)  # [C, BE]
    base = before + offsets  # [BE]
    rank = tl.cumsum(hits, axis=0) - 1  # [C, BE] rank among the chunk's assignments to each expert
    pos = tl.sum(tl.where(hits != 0, rank + base[None, :], 0), axis=1).to(tl.int64)  # [C]
    valid = ok & (expert >= 0) & (expert < n_experts)  # [C]
    tl.store(sorted_token_ptr + pos, offs // TOP_K, mask=valid)
    tl.store(sorted_slot_ptr + pos, offs % TOP_K, mask=valid)
    tl.store(inverse_ptr + offs, pos, mask=valid)


# -------------------------------------------------------------------------------------------- launcher
def _block_plan_triton(indices: Tensor, n_experts: int, block_m: int) -> BlockPlan:
    """Validate the inputs, launch the block-plan kernels and check the expert range (one device read)."""
    plan, invalid = _launch_block_plan(indices, n_experts, block_m)
    check_expert_range(invalid, indices, n_experts)
    return plan


def check_expert_range(invalid: Tensor, indices: Tensor, n_experts: int) -> None:
    """Raise if the block-plan kernels counted assignments outside ``[0, n_experts)``: one device sync.

    Args:
        invalid: the 0-d int32 count returned by :func:`_launch_block_plan`.
        indices: the ``[T, K]`` experts the plan was made from (read again only to word the error).
        n_experts: E.

    Raises:
        ValueError: some expert is outside ``[0, n_experts)``.
    """
    if int(invalid):
        low, high = torch.stack(tuple(torch.aminmax(indices))).tolist()
        raise ValueError(f"indices must lie in [0, {n_experts}); got values from {low} to {high}")


def _launch_block_plan(indices: Tensor, n_experts: int, block_m: int) -> tuple[BlockPlan, Tensor]:
    """Validate what needs no device read and launch the block-plan kernels: histogram, scan (only with many
    chunks) and scatter. Returns the plan and a 0-d count of out-of-range experts, not read here: the kernels
    leave such assignments out (so a plan built from bad indices is incomplete but every index in it is in
    bounds), and a caller that launches more work on the plan can read the count once after all its launches,
    so that the host does not wait in between (:func:`check_expert_range`)."""
    _check_block_m(block_m)
    if not isinstance(indices, Tensor) or indices.dim() != 2:
        _check_plan_args(indices, n_experts)  # raises the type or rank error
    _check_plan_args(indices[:0], n_experts)  # dtype and n_experts, without reading the values
    if n_experts > MAX_EXPERTS:
        raise ValueError(
            f"the block-plan kernels hold at most E={MAX_EXPERTS} experts in a tile; got E={n_experts} "
            "(use block_plan_reference or INSPECTION_FORCE_REFERENCE=1 for more)"
        )
    n_assign = indices.numel()
    if n_assign >= 2**31:
        raise ValueError(f"the block-plan kernels index with int32: expected T*K < 2**31; got {n_assign}")
    top_k = indices.shape[1]
    indices = indices.contiguous()
    device = indices.device
    e1 = n_experts + 1
    # one tensor per output, not views of one buffer: under torch.compile, kernels writing into several views
    # of one base lose their writes to copies (seen on an H200, torch 2.11: the range check read garbage)
    empty = lambda n: torch.empty(n, dtype=torch.int64, device=device)  # noqa: E731
    counts, offsets, padded_offsets = empty(n_experts), empty(e1), empty(e1)
    sorted_token, sorted_slot, inverse = empty(n_assign), empty(n_assign), empty(n_assign)
    plan = BlockPlan(counts=counts, offsets=offsets, sorted_token=sorted_token, sorted_slot=sorted_slot,
                     inverse=inverse, padded_offsets=padded_offsets, block_m=block_m)
    if n_assign == 0:
        counts.zero_()
        offsets.zero_()
        padded_offsets.zero_()
        return plan, torch.zeros((), dtype=torch.int32, device=device)
    block_e = block_size(n_experts, lo=16, hi=MAX_EXPERTS)
    chunk = block_size(n_assign, lo=16, hi=_PLAN_TILE_ELEMENTS // block_e)
    n_chunks = triton.cdiv(n_assign, chunk)
    chunk_counts = torch.empty(n_chunks * n_experts, dtype=torch.int32, device=device)  # [chunks * E]
    chunk_base = torch.empty(n_chunks * n_experts, dtype=torch.int32, device=device)  # [chunks * E]
    invalid = torch.empty(n_chunks + 1, dtype=torch.int32, device=device)  # [chunks + 1], the total last
    _plan_histogram_kernel[(n_chunks,)](indices, chunk_counts, invalid, n_assign, n_experts, CHUNK=chunk,
                                        BLOCK_E=block_e)
    fused = n_chunks * block_e <= _PLAN_FUSED_SCAN_ELEMENTS
    if not fused:
        scan_e = block_size(n_experts, lo=1, hi=_PLAN_SCAN_EXPERTS)
        _plan_scan_kernel[(triton.cdiv(n_experts, scan_e),)](
            chunk_counts, chunk_base, counts, invalid, n_chunks, n_experts,
            BLOCK_C=block_size(n_chunks, lo=1, hi=_PLAN_SCAN_CHUNKS), BLOCK_E=scan_e,
        )
    _plan_scatter_kernel[(n_chunks,)](
        indices, chunk_counts, chunk_base, invalid, counts, offsets, padded_offsets, sorted_token, sorted_slot,
        inverse, n_assign, n_experts, n_chunks, TOP_K=top_k, BLOCK_M=block_m, CHUNK=chunk, BLOCK_E=block_e,
        FUSED_SCAN=fused, BLOCK_CH=block_size(n_chunks, lo=1, hi=1 << 30) if fused else 1,
    )
    return plan, invalid[n_chunks]


# ---------------------------------------------------------------------------------------------- public
def block_plan(indices: Tensor, n_experts: int, block_m: int) -> BlockPlan:
    """Group the assignments by expert, padded to whole row tiles; Triton on CUDA or the interpreter.

    Every integer output equals :func:`block_plan_reference`'s exactly (and ``counts``, ``offsets``,
    ``sorted_token``, ``sorted_slot``, ``inverse`` equal :func:`fusion.moe.plan`'s). The Triton path is a
    deterministic stable counting sort in two or three launches (per-chunk histogram, a per-expert scan when
    there are many chunks, scatter) and
    holds at most :data:`MAX_EXPERTS` experts; it reads one number back from the device (the count of experts
    out of range, which raise).

    Args:
        indices: ``[T, K]`` int64 chosen experts, each in ``[0, n_experts)``.
        n_experts: E.
        block_m: rows per tile of the grouped GEMMs, a power of two.

    Returns:
        The plan.

    Raises:
        TypeError: ``indices`` is not an int64 tensor.
        ValueError: ``indices`` is not rank 2, ``n_experts`` < 1 (or above :data:`MAX_EXPERTS` on the Triton
            path), an expert is outside ``[0, n_experts)``, or ``block_m`` is not a power of two.
    """
    if isinstance(indices, Tensor) and use_triton(indices):
        return _block_plan_triton(indices, n_experts, block_m)
    return block_plan_reference(indices, n_experts, block_m)
