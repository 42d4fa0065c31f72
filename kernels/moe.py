"""Fused sparse-MoE expert FFN: grouped SwiGLU experts over routed tokens, forward and backward in Triton.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k · A = T*K assignments

One op in four parts, as the house pattern has it: :func:`expert_ffn_reference` (torch, float32, the
executable specification, equal to :func:`fusion.moe.expert_ffn_reference`), the ``@triton.jit`` kernels, a
validating launcher, and the public :func:`expert_ffn` with the signature of :data:`fusion.moe.ExpertFFN`.

How the Triton path computes ``y[t] = sum_k w[t,k] * SwiGLU_{e(t,k)}(x[t])``:

1. :func:`kernels.routing.block_plan` sorts the A assignments by expert (a stable counting sort, integer
   outputs equal to :func:`fusion.moe.plan`'s) and pads every expert's segment to whole tiles of ``block_m``
   rows, at most one tile of waste per expert and none for an expert without tokens. Its kernels also count
   experts outside ``[0, E)`` and leave those assignments out, so every later index stays in bounds; the count
   is read once, after all the launches of the call (the one host sync), and a nonzero count raises
   ``ValueError``. The GEMM grids are sized by a bound on the tile count known without reading the counts.
2. ``_gate_up_kernel``: each program takes one ``block_m`` tile of one expert's sorted assignments, gathers
   the x rows by token index and computes ``x @ Wg[e]`` and ``x @ Wu[e]`` in one pass over D, then writes
   ``h = silu(g) * u`` in sorted order (and, when a backward will follow, ``g`` and ``u`` themselves).
3. ``_rows_down_kernel``: ``h @ Wd[e]`` per tile, the routing weight applied in the epilogue in float32,
   each row written to its flat slot ``t * K + k`` of a ``[A, D]`` buffer. A ``_combine_kernel`` then sums the
   K slots of every token in float32 into ``[T, D]``. Chosen over float32 atomics into ``[T, D]`` because the
   result is deterministic (bit-identical run to run, which training reproducibility and the tests rely on),
   it needs no zero-fill or float32 ``[T, D]`` scratch, and the extra pass reads ``A * D`` values once,
   small next to the GEMMs (``2 * D * H`` flops per value written). The buffer is in the compute dtype.
4. The shared expert is not in this op: :class:`fusion.moe.SparseMoE` runs it as a dense SwiGLU on all
   tokens (three cuBLAS GEMMs through ``nn.Linear``, bf16 under autocast). Every token uses it, so it has no
   routing to fuse, and a dense cuBLAS GEMM is what the grouped kernels themselves are measured against (the
   upper bound in :mod:`kernels._bench_moe`); folding it in as an extra expert segment would copy its weights
   into the stacked ``[E+1, ...]`` tensors on every call for no gain. ``SparseMoE.forward`` is unchanged.
5. Backward (:class:`_ExpertFFNFunction`) gives gradients for x, the three weights and the routing weights:
   ``_down_grad_kernel`` computes ``dy[t] @ Wd[e]^T`` per tile and, in its epilogue, the SwiGLU backward
   (``dg``, ``du``), ``h`` again and the routing-weight gradient ``<dy[t] @ Wd[e]^T, h>`` per hidden tile
   (summed over tiles afterwards: deterministic); ``_rows_down_kernel`` gives ``dg @ Wg^T + du @ Wu^T`` per
   flat slot and ``_combine_kernel`` sums them into dx; ``_weight_grad_kernel`` forms ``X_e^T dG_e``,
   ``X_e^T dU_e`` and ``H_e^T (w dY)_e`` per expert, looping over that expert's rows (no atomics, zero for an
   expert without tokens). The forward saves ``g`` and ``u`` (``2 * A * H`` values) rather than recomputing
   the gate/up GEMM.
6. Tiles: a hand table for Hopper keyed on dtype, mean rows per expert, D and H (:func:`moe_tiles`),
   chosen from the compiler's resource report and a measured sweep (see ``_HOPPER_16BIT``).

Precision: operands in the compute dtype (float32, float16 or bfloat16), accumulation and epilogues in
float32; ``h``, ``g``, ``u`` and the slot buffers are stored in the compute dtype. Under CUDA autocast the
compute dtype is the autocast dtype (the weights are cast like ``nn.Linear``'s), else the promotion of the
input dtypes; the output has x's dtype, like the reference. float32 dots follow
``torch.get_float32_matmul_precision()`` ("highest": IEEE float32, otherwise TF32).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels._launch import INTERPRET_ENV, block_size, use_triton
from kernels.contracts import Routing, check_expert_ffn_args
from kernels.routing import (
    MAX_EXPERTS,
    BlockPlan,
    _launch_block_plan,
    block_plan_reference,
    check_expert_range,
)

#: Compute dtypes of the Triton path (the interpreter computes bfloat16 wrongly: float32 and float16 there).
MOE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


# ============================================================================================ reference
def expert_ffn_reference(
    x: Tensor,
    routing: Routing,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Routed SwiGLU experts, one expert at a time, in torch: the specification of :func:`expert_ffn`.

    For each expert e with assignments (in :func:`kernels.routing.block_plan_reference`'s sorted order):
    gather its tokens, ``h = silu(x @ w_gate[e]) * (x @ w_up[e])``, ``y = h @ w_down[e]``, scale each row by
    its routing weight and add it into the output. Equal to :func:`fusion.moe.expert_ffn_reference`.
    Differentiable in x, the three weights and ``routing.weights``.

    Args:
        x: ``[T, D]`` tokens.
        routing: the tokens' routing (``indices`` and ``weights`` are ``[T, K]``).
        w_gate: ``[E, D, H]`` gate projections.
        w_up: ``[E, D, H]`` up projections.
        w_down: ``[E, H, D]`` down projections.
        compute_dtype: dtype of every operand and intermediate; float32 (float64 for float64 x) when None.
            A low-precision dtype gives plain torch's own rounding, the yardstick of the GPU tests.

    Returns:
        ``[T, D]`` weighted sum of each token's chosen experts, in ``x.dtype``.

    Raises:
        TypeError: a tensor is not floating point or ``routing`` is not a :class:`kernels.contracts.Routing`.
        ValueError: the shapes do not agree or an expert index is out of range.
    """
    check_expert_ffn_args(x, routing, w_gate, w_up, w_down)
    n_tokens, dim = x.shape
    n_experts = w_gate.shape[0]
    compute = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)  # [T, D]
    weights = routing.weights.to(compute)  # [T, K]
    grouping = block_plan_reference(routing.indices, n_experts, 1)
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
        ye = (h @ w_down[e].to(compute)) * weights[tokens, slots].unsqueeze(-1)  # [n_e, D]
        out = out.index_add(0, tokens, ye)  # [T, D]
    return out.to(x.dtype)


# ================================================================================================ tiles
class GemmTiles(NamedTuple):
    """Tile of one grouped GEMM: output columns and reduction step per program, warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class WeightGradTiles(NamedTuple):
    """Tile of the per-expert weight-gradient GEMM: ``block_m x block_n`` of ``dW[e]``, ``block_k`` rows a step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoETiles:
    """Tile sizes of one :func:`expert_ffn` call; ``block_m`` (rows per tile) is shared by the grouped kernels
    because it is the padding unit of the :class:`kernels.routing.BlockPlan`.

    Attributes:
        block_m: assignments per row tile.
        gate_up: the gather + gate/up GEMM (two accumulators of ``block_m x block_n``).
        down: the down GEMM (output columns over D).
        down_grad: ``dy @ Wd^T`` with the SwiGLU backward epilogue (output columns over H).
        input_grad: ``dg @ Wg^T + du @ Wu^T`` (two operand pairs per K step: twice the shared memory).
        weight_grad: the per-expert weight gradients.
    """

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles
    down_grad: GemmTiles
    input_grad: GemmTiles
    weight_grad: WeightGradTiles


#: Hopper (H100) tiles for 16-bit operands, by rows per tile. 128-row tiles feed two 64-row wgmma warpgroups
#: (num_warps=8); 64-row tiles suit experts with few rows each (less padding). Every entry compiles for sm_90
#: with Triton 3.6 to wgmma (HGMMA) and its pipeline fits the 228 KB of shared memory (gate/up 128 x 128 with
#: 64-deep K steps: 48 KB a stage, 3 stages); the compiler's resource report shows no register spills except a
#: few bytes in the training variant of the 128 x 128 gate/up epilogue (it stores h, g and u). The forward tiles
#: are the fastest of :func:`kernels._bench_moe.sweep` on an H100 80GB (bench/results/kernels_moe.json, key
#: "sweep"): at T=32768, D=2048, H=768, E=128, K=8 the forward went 6.35 -> 5.73 ms with gate/up 128 x 128 x 3
#: stages instead of 128 x 64 x 4, and 6.38 -> 5.92 ms with down 128 x 256 x 3 instead of 128 x 128 x 4; at
#: T=16384, D=512, H=256 all candidates were within 10%; at T=8192, D=H=256 the 128-wide gate/up tile was
#: slower (0.162 ms against 0.116 ms for 64-wide), hence the narrow tiles below for narrow H and D.
_HOPPER_16BIT: dict[int, MoETiles] = {
    64: MoETiles(
        block_m=64,
        gate_up=GemmTiles(64, 64, 4, 3),
        down=GemmTiles(128, 64, 4, 3),
        down_grad=GemmTiles(64, 64, 4, 3),
        input_grad=GemmTiles(128, 64, 4, 3),
        weight_grad=WeightGradTiles(128, 128, 64, 8, 3),
    ),
    128: MoETiles(
        block_m=128,
        gate_up=GemmTiles(128, 64, 8, 3),
        down=GemmTiles(256, 64, 8, 3),
        down_grad=GemmTiles(64, 64, 8, 3),
        input_grad=GemmTiles(128, 64, 8, 3),
        weight_grad=WeightGradTiles(128, 128, 64, 8, 3),
    ),
}
#: float32 operands take twice the shared memory per element: half the K step, two stages.
_FLOAT32 = MoETiles(
    block_m=64,
    gate_up=GemmTiles(64, 32, 4, 2),
    down=GemmTiles(64, 32, 4, 2),
    down_grad=GemmTiles(64, 32, 4, 2),
    input_grad=GemmTiles(64, 32, 4, 2),
    weight_grad=WeightGradTiles(64, 64, 32, 4, 2),
)
#: Under TRITON_INTERPRET=1 small tiles keep the CPU time down and make small test shapes span several tiles.
_INTERPRETER = MoETiles(
    block_m=16,
    gate_up=GemmTiles(16, 16, 1, 1),
    down=GemmTiles(16, 16, 1, 1),
    down_grad=GemmTiles(16, 16, 1, 1),
    input_grad=GemmTiles(16, 16, 1, 1),
    weight_grad=WeightGradTiles(16, 16, 16, 1, 1),
)
#: Mean assignments per expert from which 128-row tiles are used (below, 64-row tiles waste less on padding).
BIG_TILE_ROWS = 512
#: The wide column tiles pay where the dimension they cut is wide; on narrow ones they leave too few programs
#: for 132 SMs (e.g. H = 256: two 128-wide gate/up tiles per row tile; measured 0.162 against 0.116 ms at
#: T=8192, D=H=256), so there the 128-row tiles take the narrower column tiles below: gate/up 128-wide from
#: H = 512, down 256-wide from D = 1024 (down 128- and 256-wide measured equal at D = 256 and 512).
_WIDE_GATE_UP_FROM_H = 512
_WIDE_DOWN_FROM_D = 1024
_NARROW_GATE_UP = GemmTiles(64, 64, 8, 3)
_NARROW_DOWN = GemmTiles(128, 64, 8, 3)


@functools.lru_cache(maxsize=256)
def moe_tiles(dtype: torch.dtype, rows_per_expert: int, interpret: bool, dim: int, hidden: int) -> MoETiles:
    """Tile sizes for one call, from a small hand table keyed on the dtype, the mean rows per expert, D and H.

    Dimensions smaller than a tile are masked, not given smaller tiles: fewer compiled variants.

    Args:
        dtype: compute dtype.
        rows_per_expert: ``A // E``, the mean assignments per expert.
        interpret: whether the Triton interpreter runs the kernels.
        dim: D.
        hidden: H.

    Returns:
        The tiles.
    """
    if interpret:
        return _INTERPRETER
    if dtype == torch.float32:
        return _FLOAT32
    if rows_per_expert < BIG_TILE_ROWS:
        return _HOPPER_16BIT[64]
    tiles = _HOPPER_16BIT[128]
    if hidden < _WIDE_GATE_UP_FROM_H:
        tiles = replace(tiles, gate_up=_NARROW_GATE_UP)
    if dim < _WIDE_DOWN_FROM_D:
        tiles = replace(tiles, down=_NARROW_DOWN)
    return tiles


def _dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 follows torch's matmul precision setting; None for 16-bit."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ============================================================================================== kernels
@triton.jit
def _row_tile(pid_m, offsets_ptr, padded_offsets_ptr, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The expert of row tile ``pid_m`` (E past the last tile), its sorted rows ``[BM]`` and which are real."""
    experts = tl.arange(0, BLOCK_E)  # [BE]
    ends = tl.load(padded_offsets_ptr + 1 + experts, mask=experts < n_experts, other=0)  # [BE]
    first_row = pid_m * BLOCK_M
    expert = tl.sum(((ends <= first_row) & (experts < n_experts)).to(tl.int32), axis=0)
    safe = tl.minimum(expert, n_experts - 1)
    seg_start = tl.load(offsets_ptr + safe)
    seg_end = tl.load(offsets_ptr + safe + 1)
    pad_start = tl.load(padded_offsets_ptr + safe)
    rows = seg_start + (first_row - pad_start) + tl.arange(0, BLOCK_M)  # [BM]
    return expert, rows, rows < seg_end


@triton.jit
def _gate_up_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_ptr, up_ptr,
    sorted_token_ptr, offsets_ptr, padded_offsets_ptr,
    n_experts, dim, hidden,
    SAVE_PRE: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """h = silu(x[tok] @ Wg[e]) * (x[tok] @ Wu[e]) for one [BM, BN] tile of one expert's sorted rows."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(hidden, BLOCK_N)
    pid_m = pid // n_tiles_n  # column tiles of one row tile run side by side: the gathered rows hit L2
    pid_n = pid % n_tiles_n
    expert, rows, row_ok = _row_tile(pid_m, offsets_ptr, padded_offsets_ptr, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    tokens = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0)  # [BM] padding rows read token 0, unused
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = x_ptr + tokens[:, None] * dim + ks[None, :]  # [BM, BK]
    w_off = expert.to(tl.int64) * dim * hidden
    g_ptrs = w_gate_ptr + w_off + ks[:, None] * hidden + cols[None, :]  # [BK, BN]
    u_ptrs = w_up_ptr + w_off + ks[:, None] * hidden + cols[None, :]  # [BK, BN]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < dim
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * hidden
        u_ptrs += BLOCK_K * hidden
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BM, BN] float32
    out = rows.to(tl.int64)[:, None] * hidden + cols[None, :]  # [BM, BN]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=ok)
    if SAVE_PRE:
        tl.store(gate_ptr + out, acc_g.to(gate_ptr.dtype.element_ty), mask=ok)
        tl.store(up_ptr + out, acc_u.to(up_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rows_down_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, out_ptr, weights_ptr,
    sorted_token_ptr, sorted_slot_ptr, offsets_ptr, padded_offsets_ptr,
    n_experts, k_size, n_size, top_k, stride_be, stride_bk, stride_bn,
    TWO: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[t*K+k] = (w[t,k] *) (A1[row] @ B1[e] (+ A2[row] @ B2[e])) for one tile of sorted rows.

    A operands are ``[A, k_size]`` in sorted order; B operands are per expert with the given strides (a
    transposed weight is a stride swap). Forward: A1 = h, B1 = Wd, weighted. Backward: dg @ Wg^T + du @ Wu^T.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(n_size, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    expert, rows, row_ok = _row_tile(pid_m, offsets_ptr, padded_offsets_ptr, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    src = tl.where(row_ok, rows, 0).to(tl.int64)  # [BM] padding rows read row 0, never stored
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < n_size
    ks = tl.arange(0, BLOCK_K)  # [BK]
    b_off = expert.to(tl.int64) * stride_be
    a1_ptrs = a1_ptr + src[:, None] * k_size + ks[None, :]  # [BM, BK]
    b1_ptrs = b1_ptr + b_off + ks[:, None] * stride_bk + cols[None, :] * stride_bn  # [BK, BN]
    if TWO:
        a2_ptrs = a2_ptr + src[:, None] * k_size + ks[None, :]
        b2_ptrs = b2_ptr + b_off + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        k_ok = (k0 + ks) < k_size
        a1 = tl.load(a1_ptrs) if EVEN_K else tl.load(a1_ptrs, mask=k_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a1, b1, acc, input_precision=PRECISION)
        a1_ptrs += BLOCK_K
        b1_ptrs += BLOCK_K * stride_bk
        if TWO:
            a2 = tl.load(a2_ptrs) if EVEN_K else tl.load(a2_ptrs, mask=k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
            a2_ptrs += BLOCK_K
            b2_ptrs += BLOCK_K * stride_bk
    tokens = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0)  # [BM]
    slots = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)  # [BM]
    dest = tokens * top_k + slots  # [BM] flat slot t*K+k
    if WEIGHTED:
        w = tl.load(weights_ptr + dest, mask=row_ok, other=0.0)  # [BM] float32
        acc = acc * w[:, None]
    out = dest[:, None] * n_size + cols[None, :]  # [BM, BN]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(flat_ptr, out_ptr, n_tokens, dim, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """out[t] = sum_k flat[t*K+k] in float32, for a [BT, BD] tile of tokens and columns."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    ok = (toks < n_tokens)[:, None] & (cols < dim)[None, :]
    src = toks.to(tl.int64)[:, None] * (TOP_K * dim) + cols[None, :]  # [BT, BD]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(flat_ptr + src + k * dim, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _down_grad_kernel(
    dy_ptr, w_down_ptr, gate_ptr, up_ptr, weights_ptr, dgate_ptr, dup_ptr, h_ptr, dw_part_ptr,
    sorted_token_ptr, sorted_slot_ptr, offsets_ptr, padded_offsets_ptr,
    n_experts, dim, hidden, top_k,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dh = dy[tok] @ Wd[e]^T for one [BM, BN] tile; epilogue: the SwiGLU backward and the routing-weight
    gradient's share of this hidden tile, dw_part[t*K+k, pid_n] = <dh_unweighted, h>."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(hidden, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    expert, rows, row_ok = _row_tile(pid_m, offsets_ptr, padded_offsets_ptr, n_experts, BLOCK_M, BLOCK_E)
    if expert >= n_experts:
        return
    tokens = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0)  # [BM]
    slots = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] over H
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)  # [BK] over D
    a_ptrs = dy_ptr + tokens[:, None] * dim + ks[None, :]  # [BM, BK]
    b_ptrs = w_down_ptr + expert.to(tl.int64) * hidden * dim + ks[:, None] + cols[None, :] * dim  # Wd[e]^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < dim
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dest = tokens * top_k + slots  # [BM]
    w = tl.load(weights_ptr + dest, mask=row_ok, other=0.0)  # [BM] float32
    at = rows.to(tl.int64)[:, None] * hidden + cols[None, :]  # [BM, BN]
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.load(gate_ptr + at, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + at, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    h = silu * u
    tl.store(dw_part_ptr + dest * n_tiles_n + pid_n, tl.sum(acc * h, axis=1), mask=row_ok)
    dh = acc * w[:, None]
    tl.store(dup_ptr + at, (dh * silu).to(dup_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_ptr + at, (dh * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=ok)
    tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _weight_grad_kernel(
    a_ptr, b1_ptr, b2_ptr, out1_ptr, out2_ptr, weights_ptr,
    sorted_token_ptr, sorted_slot_ptr, offsets_ptr,
    m_size, n_size, top_k,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, TWO: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e] = A_e^T @ B_e over the rows of expert e, for one [BM, BN] tile of out[e].

    A rows are x[token] (A_GATHER) or sorted rows; B rows are w[t,k] * dy[token] (B_GATHER) or sorted rows.
    dWg, dWu: A = x, B1 = dg, B2 = du. dWd: A = h, B = w * dy.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(m_size, BLOCK_M)
    tiles_n = tl.cdiv(n_size, BLOCK_N)
    expert = pid // (tiles_m * tiles_n)  # one expert's tiles run side by side: its rows stay in L2
    rest = pid % (tiles_m * tiles_n)
    ms = (rest // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    ns = (rest % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = ms < m_size
    n_ok = ns < n_size
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)  # [BK]
        r_ok = rows < end
        safe = tl.where(r_ok, rows, 0)
        if A_GATHER or B_GATHER:
            tokens = tl.load(sorted_token_ptr + safe, mask=r_ok, other=0)  # [BK]
        a_rows = tokens if A_GATHER else safe.to(tl.int64)
        a = tl.load(a_ptr + a_rows[None, :] * m_size + ms[:, None], mask=r_ok[None, :] & m_ok[:, None],
                    other=0.0)  # [BM, BK] = A_e^T tile
        if B_GATHER:
            slots = tl.load(sorted_slot_ptr + safe, mask=r_ok, other=0)
            w = tl.load(weights_ptr + tokens * top_k + slots, mask=r_ok, other=0.0)  # [BK] float32
            b1 = tl.load(b1_ptr + tokens[:, None] * n_size + ns[None, :], mask=r_ok[:, None] & n_ok[None, :],
                         other=0.0)
            b1 = (b1.to(tl.float32) * w[:, None]).to(b1_ptr.dtype.element_ty)  # [BK, BN]
        else:
            b1 = tl.load(b1_ptr + safe.to(tl.int64)[:, None] * n_size + ns[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        if TWO:
            b2 = tl.load(b2_ptr + safe.to(tl.int64)[:, None] * n_size + ns[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
    out = expert.to(tl.int64) * m_size * n_size + ms[:, None] * n_size + ns[None, :]  # [BM, BN]
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(out1_ptr + out, acc1.to(out1_ptr.dtype.element_ty), mask=ok)
    if TWO:
        tl.store(out2_ptr + out, acc2.to(out2_ptr.dtype.element_ty), mask=ok)


# ============================================================================================= launcher
def _grid_rows(plan: BlockPlan, n_size: int, block_n: int) -> tuple[int]:
    return (plan.max_tiles * triton.cdiv(n_size, block_n),)


def _launch_gate_up(x: Tensor, w_gate: Tensor, w_up: Tensor, plan: BlockPlan, tiles: MoETiles,
                    save: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """h ``[A, H]`` in sorted order, and gate/up ``[A, H]`` when ``save``."""
    dim, hidden = x.shape[1], w_gate.shape[2]
    n_assign = plan.n_assignments
    h = x.new_empty(n_assign, hidden)  # [A, H]
    gate = x.new_empty(n_assign, hidden) if save else h
    up = x.new_empty(n_assign, hidden) if save else h
    t = tiles.gate_up
    _gate_up_kernel[_grid_rows(plan, hidden, t.block_n)](
        x, w_gate, w_up, h, gate, up, plan.sorted_token, plan.offsets, plan.padded_offsets,
        plan.n_experts, dim, hidden,
        SAVE_PRE=save, EVEN_K=dim % t.block_k == 0, PRECISION=_dot_precision(x.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_E=block_size(plan.n_experts, 2, 1024),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return h, (gate if save else None), (up if save else None)


def _launch_rows_down(a1: Tensor, b1: Tensor, a2: Tensor | None, b2: Tensor | None, weights: Tensor | None,
                      n_size: int, transpose_b: bool, plan: BlockPlan, tiles: MoETiles, t: GemmTiles,
                      top_k: int) -> Tensor:
    """``[A, n_size]`` rows in flat slot order: (weighted) A1 @ B1[e] (+ A2 @ B2[e])."""
    k_size = a1.shape[1]
    flat = a1.new_empty(plan.n_assignments, n_size)  # [A, N]
    stride_be = b1.stride(0)
    stride_bk, stride_bn = (b1.stride(2), b1.stride(1)) if transpose_b else (b1.stride(1), b1.stride(2))
    _rows_down_kernel[_grid_rows(plan, n_size, t.block_n)](
        a1, b1, a1 if a2 is None else a2, b1 if b2 is None else b2, flat, a1 if weights is None else weights,
        plan.sorted_token, plan.sorted_slot, plan.offsets, plan.padded_offsets,
        plan.n_experts, k_size, n_size, top_k, stride_be, stride_bk, stride_bn,
        TWO=a2 is not None, WEIGHTED=weights is not None, EVEN_K=k_size % t.block_k == 0,
        PRECISION=_dot_precision(a1.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_E=block_size(plan.n_experts, 2, 1024),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return flat


def _combine(flat: Tensor, n_tokens: int, top_k: int, out_dtype: torch.dtype) -> Tensor:
    """``[T, N]``: the float32 sum of each token's K consecutive rows of ``flat`` ``[T*K, N]``."""
    n_size = flat.shape[1]
    if top_k == 1 and flat.dtype == out_dtype:
        return flat
    out = torch.empty(n_tokens, n_size, dtype=out_dtype, device=flat.device)  # [T, N]
    block_d = block_size(n_size, 16, 256)
    block_t = max(1, 2048 // block_d)
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(n_size, block_d))
    _combine_kernel[grid](flat, out, n_tokens, n_size, TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def _forward(x: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, plan: BlockPlan,
             tiles: MoETiles, out_dtype: torch.dtype, save: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    n_tokens, dim = x.shape
    top_k = weights.shape[1]
    h, gate, up = _launch_gate_up(x, w_gate, w_up, plan, tiles, save)  # [A, H] sorted
    flat = _launch_rows_down(h, w_down, None, None, weights, dim, False, plan, tiles, tiles.down, top_k)  # [A, D] flat
    del h
    return _combine(flat, n_tokens, top_k, out_dtype), gate, up  # [T, D]


def _backward(ctx_tensors: tuple[Tensor, ...], needs: tuple[bool, ...], dout: Tensor, plan: BlockPlan,
              tiles: MoETiles) -> tuple[Tensor | None, ...]:
    x, weights, w_gate, w_up, w_down, gate, up = ctx_tensors
    n_tokens, dim = x.shape
    hidden = w_gate.shape[2]
    top_k = weights.shape[1]
    n_assign = plan.n_assignments
    dy = dout.to(x.dtype).contiguous()  # [T, D]
    precision = _dot_precision(x.dtype)
    block_e = block_size(plan.n_experts, 2, 1024)

    # dh = dy @ Wd^T per sorted row, SwiGLU backward, h again and the routing-weight gradient's partials
    t = tiles.down_grad
    n_tiles_h = triton.cdiv(hidden, t.block_n)
    dgate, dup, h = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(gate)  # [A, H] sorted
    dw_part = torch.empty(n_assign, n_tiles_h, dtype=torch.float32, device=x.device)  # [A, H tiles] flat
    _down_grad_kernel[(plan.max_tiles * n_tiles_h,)](
        dy, w_down, gate, up, weights, dgate, dup, h, dw_part,
        plan.sorted_token, plan.sorted_slot, plan.offsets, plan.padded_offsets,
        plan.n_experts, dim, hidden, top_k,
        EVEN_K=dim % t.block_k == 0, PRECISION=precision,
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_E=block_e,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    d_weights = dw_part.sum(dim=1).view(n_tokens, top_k).to(weights.dtype) if needs[1] else None  # [T, K]

    dx = None
    if needs[0]:  # dx[t] = sum_k dg @ Wg^T + du @ Wu^T
        flat = _launch_rows_down(dgate, w_gate, dup, w_up, None, dim, True, plan, tiles, tiles.input_grad,
                                 top_k)  # [A, D]
        dx = _combine(flat, n_tokens, top_k, x.dtype)  # [T, D]
        del flat

    w = tiles.weight_grad
    d_gate = d_up = d_down = None
    if needs[2] or needs[3]:
        d_gate, d_up = torch.empty_like(w_gate), torch.empty_like(w_up)  # [E, D, H]
        grid = (plan.n_experts * triton.cdiv(dim, w.block_m) * triton.cdiv(hidden, w.block_n),)
        _weight_grad_kernel[grid](
            x, dgate, dup, d_gate, d_up, weights, plan.sorted_token, plan.sorted_slot, plan.offsets,
            dim, hidden, top_k,
            A_GATHER=True, B_GATHER=False, TWO=True, PRECISION=precision,
            BLOCK_M=w.block_m, BLOCK_N=w.block_n, BLOCK_K=w.block_k, num_warps=w.num_warps,
            num_stages=w.num_stages,
        )
    if needs[4]:
        d_down = torch.empty_like(w_down)  # [E, H, D]
        grid = (plan.n_experts * triton.cdiv(hidden, w.block_m) * triton.cdiv(dim, w.block_n),)
        _weight_grad_kernel[grid](
            h, dy, dy, d_down, d_down, weights, plan.sorted_token, plan.sorted_slot, plan.offsets,
            hidden, dim, top_k,
            A_GATHER=False, B_GATHER=True, TWO=False, PRECISION=precision,
            BLOCK_M=w.block_m, BLOCK_N=w.block_n, BLOCK_K=w.block_k, num_warps=w.num_warps,
            num_stages=w.num_stages,
        )
    return dx, d_weights, (d_gate if needs[2] else None), (d_up if needs[3] else None), d_down


class _ExpertFFNFunction(torch.autograd.Function):
    """Autograd for the Triton path; inputs are already in the compute dtype and contiguous."""

    @staticmethod
    def forward(ctx, x, weights, w_gate, w_up, w_down, plan, tiles, out_dtype):  # noqa: D102
        out, gate, up = _forward(x, weights, w_gate, w_up, w_down, plan, tiles, out_dtype, save=True)
        ctx.save_for_backward(x, weights, w_gate, w_up, w_down, gate, up)
        ctx.plan = plan
        ctx.tiles = tiles
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        grads = _backward(ctx.saved_tensors, ctx.needs_input_grad[:5], dout, ctx.plan, ctx.tiles)
        return (*grads, None, None, None)


def _check_launch_args(x: Tensor, routing: Routing, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> None:
    """What the kernels need beyond the shared shape checks: dtypes, devices, contiguity, sizes."""
    check_expert_ffn_args(x, routing, w_gate, w_up, w_down)
    if x.dtype not in MOE_DTYPES:
        raise TypeError(
            f"x must have a dtype in {MOE_DTYPES} on the Triton path; got {x.dtype} "
            "(use expert_ffn_reference or INSPECTION_FORCE_REFERENCE=1 for float64)"
        )
    for name, value in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}; got {value.dtype} (cast the weights first)")
    if routing.weights.dtype != torch.float32:
        raise TypeError(f"routing.weights must be float32; got {routing.weights.dtype}")
    tensors = (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down),
               ("routing.weights", routing.weights), ("routing.indices", routing.indices))
    for name, value in tensors:
        if value.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {value.device}")
        if not value.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous; got strides {value.stride()} for shape {tuple(value.shape)} "
                "(call .contiguous() first)"
            )
    if routing.n_experts > MAX_EXPERTS:
        raise ValueError(
            f"the MoE kernels take at most E={MAX_EXPERTS} experts; got E={routing.n_experts} "
            "(use expert_ffn_reference or INSPECTION_FORCE_REFERENCE=1 for more)"
        )
    n_tokens, dim = x.shape
    hidden = w_gate.shape[2]
    n_assign = routing.indices.numel()
    if max(n_assign * max(dim, hidden), w_gate.numel()) >= 2**31:
        raise ValueError(
            f"the MoE kernels index row tiles with int32 in places: expected T*K*max(D, H) and E*D*H < 2**31; "
            f"got T*K={n_assign}, D={dim}, H={hidden}, E*D*H={w_gate.numel()}"
        )


def _expert_ffn_triton(
    x: Tensor, routing: Routing, w_gate: Tensor, w_up: Tensor, w_down: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Validate the inputs and run the kernels.

    x and the weights must share one dtype of :data:`MOE_DTYPES` and be contiguous on one device; the routing
    weights must be float32. Differentiable when any input requires grad. The expert range is checked by the
    block-plan kernels, which leave out-of-range assignments out (every later index stays in bounds); the count
    is read once, after every launch, so the host enqueues all the kernels without waiting in between, and a
    nonzero count raises before the result is returned.
    """
    _check_launch_args(x, routing, w_gate, w_up, w_down)
    out_dtype = out_dtype or x.dtype
    n_tokens, dim = x.shape
    n_experts, _, hidden = w_gate.shape
    top_k = routing.indices.shape[1]
    interpret = os.environ.get(INTERPRET_ENV) == "1"
    if n_tokens == 0:
        return x.new_zeros(0, dim, dtype=out_dtype)
    tiles = moe_tiles(x.dtype, n_tokens * top_k // n_experts, interpret, dim, hidden)
    plan, invalid = _launch_block_plan(routing.indices, n_experts, tiles.block_m)
    weights = routing.weights
    inputs = (x, weights, w_gate, w_up, w_down)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = _ExpertFFNFunction.apply(*inputs, plan, tiles, out_dtype)
    else:
        out = _forward(*inputs, plan, tiles, out_dtype, save=False)[0]
    check_expert_range(invalid, routing.indices, n_experts)  # the one device sync
    return out


# =============================================================================================== public
def compute_dtype(x: Tensor, *weights: Tensor) -> torch.dtype:
    """The dtype :func:`expert_ffn` computes in: CUDA autocast's when it is on, else the inputs' promotion."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    dtype = x.dtype
    for w in weights:
        dtype = torch.promote_types(dtype, w.dtype)
    return dtype


def expert_ffn(x: Tensor, routing: Routing, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Routed SwiGLU experts: Triton on CUDA or under the interpreter, :func:`expert_ffn_reference` elsewhere.

    Same contract as :func:`fusion.moe.expert_ffn_reference` (an :data:`fusion.moe.ExpertFFN`). The Triton
    path casts x and the weights to :func:`compute_dtype` (differentiably) and returns x's dtype; it matches
    the float32 reference within float32 rounding for float32 inputs and is about as close as plain torch in
    16-bit (tests/kernels/test_moe_gpu.py); gradients reach x, the weights and ``routing.weights``.
    ``INSPECTION_FORCE_REFERENCE=1`` selects the reference.

    Args:
        x: ``[T, D]`` tokens.
        routing: the tokens' routing (``indices`` and ``weights`` are ``[T, K]``; float32 weights).
        w_gate: ``[E, D, H]`` gate projections.
        w_up: ``[E, D, H]`` up projections.
        w_down: ``[E, H, D]`` down projections.

    Returns:
        ``[T, D]`` weighted sum of each token's chosen experts, in ``x.dtype``.

    Raises:
        TypeError: a tensor has the wrong type or dtype (Triton path: float64, or non-float32 routing
            weights).
        ValueError: the shapes, devices or expert indices are out of range (Triton path: E above
            :data:`kernels.routing.MAX_EXPERTS`).
    """
    if isinstance(x, Tensor) and use_triton(x):
        check_expert_ffn_args(x, routing, w_gate, w_up, w_down)
        dtype = compute_dtype(x, w_gate, w_up, w_down)
        cast = [t.to(dtype).contiguous() for t in (x, w_gate, w_up, w_down)]
        return _expert_ffn_triton(cast[0], routing, *cast[1:], out_dtype=x.dtype)
    return expert_ffn_reference(x, routing, w_gate, w_up, w_down)
