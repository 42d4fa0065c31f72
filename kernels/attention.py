"""Masked cross-attention kernels: forward, backward, and all modality coalitions of a unit in one launch.

B batch · H heads · Q queries · N keys · Dh head width · C coalitions (key masks) · R = C·Q rows of one (b, h)

The bridge's attention (:func:`fusion.bridge.masked_attention`): fusion queries over modality tokens with a key
padding mask (True = ignore) and an optional top-k key selection (each query keeps the keys whose score is at
least its ``top_k``-th largest visible score, so ties at the threshold are all kept). A query with no visible
key gets a zero output and zero gradients. Two public ops, in the house's four parts (torch reference,
``@triton.jit`` kernels, validating launchers, public dispatchers):

* :func:`attention` - ``[B, H, Q, Dh]``, differentiable: a flash-attention-2 style forward (online softmax in
  float32, log-sum-exp saved) and backward (scores recomputed from the saved log-sum-exp; one program owns all
  the queries of a ``(b, h)`` when ``Q <= 64``, so dK and dV are written once, without atomics);
* :func:`coalition_attention` - ``[B, C, H, Q, Dh]``, forward only: the ``C`` key masks of one unit (the
  modality coalitions of an exact Shapley explanation) in one launch; the ``C·Q`` rows of a ``(b, h)`` share
  each K/V tile a program loads (64 rows a program; the programs of one ``(b, h)`` are launched side by side and
  share its tiles through L2), so K and V come from device memory about once per ``(b, h)`` instead of C times.

* :func:`group_coalition_attention` - ``[B, C, H, Q, Dh]``, forward only: the same for coalitions of key groups
  (modalities), given as group membership instead of key masks. Attention over a union of key sets is the
  log-sum-exp-weighted mean of the attentions over each set, so each group is attended once (one pass over the
  keys, the scores of a tile computed once, up to 4 groups' running outputs in registers) and every coalition
  is a merge of its members' partial outputs: the work of one attention over N keys instead of C.

The first two run one forward kernel, :func:`_attention_fwd_kernel`, whose rows are (coalition, query) pairs; plain
attention is the case ``C = 1``. Keys a row cannot see are never loaded (their K/V rows are predicated off), so an
absent modality costs no memory traffic.

Top-k: a prologue of the forward kernel finds each row's kept set exactly, by bisection on the order-preserving
integer image of the float32 scores (about 15-30 extra passes over K, recomputing ``q·kᵀ``), and saves as the
row's threshold the float halfway (in ulps) between the smallest kept score and the largest dropped one, so the
backward's recomputed scores, rounded differently in other tile shapes, fall on the same sides. The kept set is
decided on the kernel's float32 dot products: a score within rounding of the top_k-th can fall on the other side
than in the reference, whose products round differently (ties exact in both, such as equal keys, are resolved
the same way).

The reference is written out here (not imported from :mod:`fusion.bridge`, which calls these ops through
``FusionBridge.attention``); the tests check it against :func:`fusion.bridge.masked_attention` bit for bit. The
public ops run the Triton kernels on CUDA tensors or under ``TRITON_INTERPRET=1`` and the references elsewhere or
when ``INSPECTION_FORCE_REFERENCE=1`` (see :func:`kernels._launch.use_triton`). Float32 inputs follow torch's own
float32 matmul setting (``torch.backends.cuda.matmul.allow_tf32``): IEEE products by default, TF32 when allowed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._launch import block_size, use_triton

#: Input dtypes the kernels take (q, k and v share one); outputs and gradients come back in it.
ATTENTION_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Largest head width the kernels hold in a tile (the bridge uses 32-128).
MAX_HEAD_DIM = 128
#: Rows (coalition x query pairs) of one forward program; more rows split over programs of the same (b, h).
_FWD_MAX_BLOCK_M = 64
#: Coalitions of one forward launch: each is one bit of a per-key int32 (bit 31, the sign, is left alone).
_MAX_COALITIONS_PER_LAUNCH = 30
#: Queries of one backward program. With Q above it, several programs add into dK and dV with atomics.
_BWD_MAX_BLOCK_M = 64
#: Groups whose partial outputs the group-coalition kernel holds in registers; more go through the mask kernel.
_MAX_REGISTER_GROUPS = 4
#: float32 elements of those partials per program (G x query block x head width), at most.
_GROUP_REGISTER_FLOATS = 32768
#: log2(e): the kernels use exp2 on scores pre-scaled by it.
_LOG2E = 1.4426950408889634


# ============================================================================================ reference
def _check_attention_args(q: object, k: object, v: object, mask: object, top_k: object, *,
                          coalitions: bool = False) -> None:
    """Checks shared by the references and the launchers: types, ranks, sizes, devices, ``top_k``."""
    q_shape = "[B, H, Q, Dh] or [B, C, H, Q, Dh]" if coalitions else "[B, H, Q, Dh]"
    for name, value, shape in (("q", q, q_shape), ("k", k, "[B, H, N, Dh]"), ("v", v, "[B, H, N, Dh]")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a {shape} torch.Tensor; got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if q.dim() not in ((4, 5) if coalitions else (4,)) or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q {q_shape} and k, v [B, H, N, Dh]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, n, dh = k.shape
    if q.shape[0] != b or q.shape[-3] != h or q.shape[-1] != dh:
        raise ValueError(f"q must share B={b}, H={h} and Dh={dh} with k and v; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if mask is not None or coalitions:
        name, want = ("masks", "[B, C, N]") if coalitions else ("key_padding_mask", "[B, N]")
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a bool {want} torch.Tensor; got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be bool (True = ignore the key); got dtype {mask.dtype}")
        ok = (mask.dim() == 3 and mask.shape[0] == b and mask.shape[2] == n) if coalitions else \
            tuple(mask.shape) == (b, n)
        if not ok:
            raise ValueError(f"{name} must be {want} with B={b}, N={n}; got shape {tuple(mask.shape)}")
        if coalitions and q.dim() == 5 and q.shape[1] != mask.shape[1]:
            raise ValueError(f"q [B, C, H, Q, Dh] must have one query set per mask: expected C={mask.shape[1]}; "
                             f"got C={q.shape[1]}")
        if mask.device != k.device:
            raise ValueError(f"{name} must be on the keys' device {k.device}; got {mask.device}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                        top_k: int | None = None) -> Tensor:
    """Masked attention in torch, float32: the executable specification, equal to ``masked_attention``.

    ``softmax(q·kᵀ/√Dh)·v`` over the visible keys; with ``top_k`` (< N) each query keeps only the keys whose
    score is at least its ``top_k``-th largest (masked keys count as -inf), so all keys tied with it are kept.
    Differentiable in ``q``, ``k`` and ``v``.

    Args:
        q: ``[B, H, Q, Dh]`` queries.
        k, v: ``[B, H, N, Dh]`` keys and values.
        key_padding_mask: ``[B, N]`` bool, True where a key must be ignored.
        top_k: keep only each query's ``top_k`` highest-scoring keys.

    Returns:
        ``[B, H, Q, Dh]`` in q's dtype; a query with no visible key gets zeros.

    Raises:
        TypeError: a tensor is not floating point (bool for the mask), or the dtypes differ.
        ValueError: shapes or devices disagree, or ``top_k`` < 1.
    """
    _check_attention_args(q, k, v, key_padding_mask, top_k)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Q, N]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]  # [B, H, Q, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, H, Q, N]
    probs = torch.nan_to_num(probs, nan=0.0)  # all keys masked -> a zero row
    return (probs @ v.float()).to(q.dtype)  # [B, H, Q, Dh]


def coalition_attention_reference(q: Tensor, k: Tensor, v: Tensor, masks: Tensor,
                                  top_k: int | None = None) -> Tensor:
    """One :func:`attention_reference` call per key mask, stacked: the specification of the coalitions op.

    Args:
        q: ``[B, H, Q, Dh]`` queries shared by every mask, or ``[B, C, H, Q, Dh]`` one set per mask.
        k, v: ``[B, H, N, Dh]`` keys and values of the unit, shared by every mask.
        masks: ``[B, C, N]`` bool, True where coalition c must ignore a key.
        top_k: keep only each query's ``top_k`` highest-scoring keys (per coalition).

    Returns:
        ``[B, C, H, Q, Dh]`` in q's dtype.

    Raises:
        TypeError, ValueError: as :func:`attention_reference`, for ``masks`` of the wrong shape or dtype, or
            per-mask queries whose C differs from the masks'.
    """
    _check_attention_args(q, k, v, masks, top_k, coalitions=True)
    outs = [attention_reference(q[:, c] if q.dim() == 5 else q, k, v, masks[:, c], top_k)
            for c in range(masks.shape[1])]  # C x [B, H, Q, Dh]
    if not outs:
        return q.new_empty(q.shape[0], 0, *q.shape[-3:])
    return torch.stack(outs, dim=1)  # [B, C, H, Q, Dh]


def group_coalition_masks(key_groups: Tensor, coalitions: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """The ``[B, C, N]`` key masks (True = hidden) that group coalitions stand for.

    Key j is visible to coalition c of unit b when its group ``key_groups[j]`` is one of ``[0, G)``, is a member
    of the coalition (``coalitions[b, c, key_groups[j]]``) and the key is not padding
    (``key_padding_mask[b, j]`` is False). Keys whose group lies outside ``[0, G)`` are hidden from every
    coalition.

    Args:
        key_groups: ``[N]`` integer, the group (modality) of each key.
        coalitions: ``[B, C, G]`` bool, True where group g is a member of coalition c.
        key_padding_mask: ``[B, N]`` bool, True where a key is padding, or None.

    Returns:
        ``[B, C, N]`` bool, the ``masks`` argument of :func:`coalition_attention` for the same coalitions.
    """
    n_groups = coalitions.shape[-1]
    valid = (key_groups >= 0) & (key_groups < n_groups)  # [N]
    member = coalitions[:, :, key_groups.clamp(0, max(n_groups - 1, 0)).long()]  # [B, C, N]
    hidden = ~(member & valid[None, None, :])
    if key_padding_mask is not None:
        hidden = hidden | key_padding_mask[:, None, :]
    return hidden


def _check_group_args(q: object, k: object, v: object, key_groups: object, coalitions: object,
                      key_padding_mask: object) -> None:
    """Checks of :func:`group_coalition_attention` (on top of :func:`_check_attention_args`); no device sync."""
    _check_attention_args(q, k, v, key_padding_mask, None)
    b, _, n, _ = k.shape
    if not isinstance(key_groups, Tensor) or key_groups.dim() != 1 or key_groups.shape[0] != n \
            or key_groups.dtype.is_floating_point or key_groups.dtype in (torch.bool, torch.complex64,
                                                                        torch.complex128):
        raise ValueError(f"key_groups must be an [N] integer tensor with N={n} (the group of each key); got "
                         f"{getattr(key_groups, 'dtype', type(key_groups).__name__)} "
                         f"{tuple(getattr(key_groups, 'shape', ()))}")
    if not isinstance(coalitions, Tensor) or coalitions.dtype != torch.bool or coalitions.dim() != 3 \
            or coalitions.shape[0] != b or coalitions.shape[2] < 1:
        raise ValueError(f"coalitions must be a [B, C, G] bool tensor with B={b} and G >= 1 (True = the group "
                         f"is a member); got {getattr(coalitions, 'dtype', type(coalitions).__name__)} "
                         f"{tuple(getattr(coalitions, 'shape', ()))}")
    for name, t in (("key_groups", key_groups), ("coalitions", coalitions)):
        if t.device != k.device:
            raise ValueError(f"{name} must be on the keys' device {k.device}; got {t.device}")


def group_coalition_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_groups: Tensor, coalitions: Tensor,
                                        key_padding_mask: Tensor | None = None) -> Tensor:
    """:func:`coalition_attention_reference` under the masks of :func:`group_coalition_masks`: the specification
    of :func:`group_coalition_attention`."""
    _check_group_args(q, k, v, key_groups, coalitions, key_padding_mask)
    return coalition_attention_reference(q, k, v, group_coalition_masks(key_groups, coalitions, key_padding_mask))


# ============================================================================================== kernels
@triton.jit
def _ordered_key(s):
    """float32 -> int32 whose signed order is the float order (-0.0 taken as +0.0; no NaN expected)."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s == 0.0, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_float(key):
    """Inverse of :func:`_ordered_key`."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _score_tile(q, k_base, mask_base, row_c, all_hidden, row_ok, start, n_keys, stride_kn, d, d_ok,
                HAS_MASK: tl.constexpr, PER_ROW_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """Raw scores ``q·kᵀ`` of one key tile and which (row, key) pairs are visible.

    With PER_ROW_MASK the mask holds one int32 per key whose bit c is set when coalition c hides it, and
    ``row_c`` [BM] is each row's coalition (``all_hidden`` = 2**C - 1); otherwise one uint8 per key, True = hidden,
    for every row. Keys no row can see are not loaded (their K rows read as zero). Returns ``s`` [BM, BN] float32,
    ``vis`` [BM, BN], ``col_vis`` [BN] (visible to some row), ``cols`` [BN], ``col_ok`` [BN] and the K tile
    [BN, BD].
    """
    cols = start + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < n_keys
    if HAS_MASK:
        if PER_ROW_MASK:
            hidden = tl.load(mask_base + cols, mask=col_ok, other=-1)  # [BN] bit c: hidden from coalition c
            col_vis = ((hidden & all_hidden) != all_hidden) & col_ok
            vis = (((hidden[None, :] >> row_c[:, None]) & 1) == 0) & col_ok[None, :] & row_ok[:, None]
        else:
            ignore = tl.load(mask_base + cols, mask=col_ok, other=1)  # [BN] one mask for every row
            col_vis = (ignore == 0) & col_ok
            vis = col_vis[None, :] & row_ok[:, None]
    else:
        col_vis = col_ok
        vis = col_vis[None, :] & row_ok[:, None]
    kt = tl.load(k_base + cols[:, None] * stride_kn + d[None, :], mask=col_vis[:, None] & d_ok[None, :],
                 other=0.0)  # [BN, BD]
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # [BM, BN]
    return s, vis, col_vis, cols, col_ok, kt


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, thr_ptr,
    stride_qb, stride_qc, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_ob, stride_oc, stride_oh, stride_om,
    n_heads, n_coalitions, n_queries, n_keys, head_dim, n_row_blocks, top_k, scale_log2,
    HAS_MASK: tl.constexpr, PER_ROW_MASK: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M (coalition, query) rows of one (b, h), online softmax over all key tiles.

    Row r is query ``r % Q`` under mask ``r // Q``. Writes the output, the base-2 log-sum-exp of the scaled
    scores (+inf for a row with no visible key) and, with TOP_K, the raw-score threshold of each row.
    """
    scale_log2 = tl.cast(scale_log2, tl.float32)  # a float argument is fp64 when torch.compile launches the kernel
    pid = tl.program_id(0)
    pid_m = pid % n_row_blocks  # row blocks of one (b, h) are adjacent: they share K/V tiles through L2
    pid_bh = pid // n_row_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < n_coalitions * n_queries
    c = rows // n_queries  # [BM] coalition of each row
    i = rows % n_queries  # [BM] query of each row
    d = tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < head_dim

    q_row = b * stride_qb + h * stride_qh + c * stride_qc + i * stride_qm  # [BM]
    q = tl.load(q_ptr + q_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    mask_base = mask_ptr + b * stride_mb
    all_hidden = (1 << n_coalitions) - 1  # bit pattern of a key every coalition hides
    stat = ((b * n_coalitions + c) * n_heads + h) * n_queries + i  # [BM] into [B, C, H, Q]

    thr = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if TOP_K:
        # pass 1: visible keys per row and the range of their ordered keys
        n_vis = tl.zeros([BLOCK_M], tl.int32)
        key_max = tl.full([BLOCK_M], -2147483648, tl.int32)
        key_min = tl.full([BLOCK_M], 2147483647, tl.int32)
        for start in range(0, n_keys, BLOCK_N):
            s, vis, _, _, _, _ = _score_tile(q, k_base, mask_base, c, all_hidden, row_ok, start, n_keys, stride_kn,
                                             d, d_ok, HAS_MASK, PER_ROW_MASK, BLOCK_N, PRECISION)
            key = _ordered_key(s)
            n_vis += tl.sum(vis.to(tl.int32), axis=1)
            key_max = tl.maximum(key_max, tl.max(tl.where(vis, key, -2147483648), axis=1))
            key_min = tl.minimum(key_min, tl.min(tl.where(vis, key, 2147483647), axis=1))
        # bisection for the largest key t with count(key >= t) >= top_k, i.e. the top_k-th largest score;
        # invariant count(key >= lo) >= top_k > count(key >= hi); a row stops once hi = lo + 1 or once
        # count(key >= lo) == top_k (then {key >= lo} already is the kept set)
        lo = key_min.to(tl.int64)
        hi = key_max.to(tl.int64) + 1
        count_lo = n_vis
        busy = (n_vis > top_k) & (hi - lo > 1)
        while tl.max(busy.to(tl.int32), axis=0) > 0:
            mid = lo + (hi - lo) // 2  # [BM]
            count = tl.zeros([BLOCK_M], tl.int32)
            for start in range(0, n_keys, BLOCK_N):
                s, vis, _, _, _, _ = _score_tile(q, k_base, mask_base, c, all_hidden, row_ok, start, n_keys,
                                                 stride_kn, d, d_ok, HAS_MASK, PER_ROW_MASK, BLOCK_N, PRECISION)
                above = vis & (_ordered_key(s).to(tl.int64) >= mid[:, None])
                count += tl.sum(above.to(tl.int32), axis=1)
            raise_lo = busy & (count >= top_k)
            lo = tl.where(raise_lo, mid, lo)
            count_lo = tl.where(raise_lo, count, count_lo)
            hi = tl.where(busy & (count < top_k), mid, hi)
            busy = busy & (hi - lo > 1) & (count_lo != top_k)
        # the kept set is {key >= lo}: put the threshold halfway (in ulps) between its smallest key and the
        # largest visible key below it, so that a recomputed score (the backward's) cannot cross it by rounding
        kth = tl.full([BLOCK_M], 2147483647, tl.int32)
        below = tl.full([BLOCK_M], -2147483648, tl.int32)  # stays INT32_MIN (< key(-inf)) when nothing is below
        for start in range(0, n_keys, BLOCK_N):
            s, vis, _, _, _, _ = _score_tile(q, k_base, mask_base, c, all_hidden, row_ok, start, n_keys, stride_kn,
                                             d, d_ok, HAS_MASK, PER_ROW_MASK, BLOCK_N, PRECISION)
            key = _ordered_key(s)
            kept = vis & (key.to(tl.int64) >= lo[:, None])
            kth = tl.minimum(kth, tl.min(tl.where(kept, key, 2147483647), axis=1))
            below = tl.maximum(below, tl.max(tl.where(vis & ~kept, key, -2147483648), axis=1))
        half = below.to(tl.int64) + (kth.to(tl.int64) - below.to(tl.int64) + 1) // 2  # in (below, kth]
        # rows with at most top_k visible keys (or none below the kept ones) keep every visible key
        select = (n_vis > top_k) & (below > -2147483648)
        thr = tl.where(select, _key_to_float(tl.where(select, half, 0).to(tl.int32)), float("-inf"))
        tl.store(thr_ptr + stat, thr, mask=row_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        s, vis, col_vis, cols, _, _ = _score_tile(q, k_base, mask_base, c, all_hidden, row_ok, start, n_keys,
                                                  stride_kn, d, d_ok, HAS_MASK, PER_ROW_MASK, BLOCK_N,
                                                  PRECISION)
        if TOP_K:
            vis = vis & (s >= thr[:, None])
        s = tl.where(vis, s * scale_log2, float("-inf"))  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 finite
        p = tl.exp2(s - m_safe[:, None])  # [BM, BN], 0 where hidden
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=col_vis[:, None] & d_ok[None, :],
                     other=0.0)  # [BN, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)  # [BM, BD] zero rows where nothing is visible
    o_row = b * stride_ob + c * stride_oc + h * stride_oh + i * stride_om  # [BM]
    tl.store(o_ptr + o_row[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + stat, tl.where(seen, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, do_ptr, lse_ptr, thr_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    n_heads, n_queries, n_keys, head_dim, n_row_blocks, sm_scale, scale_log2,
    HAS_MASK: tl.constexpr, TOP_K: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (b, h) against every key tile; recompute P from the saved LSE.

    dq is accumulated in registers; each key tile's dK and dV are stored (ATOMIC=False: this program holds all
    the queries, so it is the tile's only writer) or added into float32 buffers (ATOMIC=True). dq, dk and dv
    are contiguous [B, H, *, Dh].
    """
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when torch.compile launches the kernel
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid = tl.program_id(0)
    pid_m = pid % n_row_blocks
    pid_bh = pid // n_row_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < n_queries
    d = tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < head_dim
    row_tile = row_ok[:, None] & d_ok[None, :]

    q = tl.load(q_ptr + (b * stride_qb + h * stride_qh + rows * stride_qm)[:, None] + d[None, :],
                mask=row_tile, other=0.0)  # [BM, BD]
    do = tl.load(do_ptr + (b * stride_dob + h * stride_doh + rows * stride_dom)[:, None] + d[None, :],
                 mask=row_tile, other=0.0)  # [BM, BD]
    o = tl.load(o_ptr + (b * stride_ob + h * stride_oh + rows * stride_om)[:, None] + d[None, :],
                mask=row_tile, other=0.0)  # [BM, BD]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # [BM] rowsum(dO * O)
    stat = (b * n_heads + h) * n_queries + rows  # [BM]
    lse = tl.load(lse_ptr + stat, mask=row_ok, other=float("inf"))
    if TOP_K:
        thr = tl.load(thr_ptr + stat, mask=row_ok, other=float("inf"))
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    mask_base = mask_ptr + b * stride_mb
    grad_base = (b * n_heads + h) * n_keys * head_dim  # dk, dv contiguous [B, H, N, Dh]

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        s, vis, col_vis, cols, col_ok, kt = _score_tile(q, k_base, mask_base, 0, 0, row_ok, start, n_keys,
                                                        stride_kn, d, d_ok, HAS_MASK, False, BLOCK_N, PRECISION)
        if TOP_K:
            vis = vis & (s >= thr[:, None])
        p = tl.where(vis, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)  # [BM, BN] softmax probabilities
        vt = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=col_vis[:, None] & d_ok[None, :],
                     other=0.0)  # [BN, BD]
        dv_tile = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # [BN, BD]
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])  # [BM, BN] gradient of the scaled scores
        dk_tile = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale  # [BN, BD]
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
        grad = grad_base + cols[:, None] * head_dim + d[None, :]  # [BN, BD]
        key_tile = col_ok[:, None] & d_ok[None, :]
        if ATOMIC:
            tl.atomic_add(dk_ptr + grad, dk_tile, mask=key_tile)
            tl.atomic_add(dv_ptr + grad, dv_tile, mask=key_tile)
        else:
            tl.store(dk_ptr + grad, dk_tile.to(dk_ptr.dtype.element_ty), mask=key_tile)
            tl.store(dv_ptr + grad, dv_tile.to(dv_ptr.dtype.element_ty), mask=key_tile)
    dq_off = ((b * n_heads + h) * n_queries + rows) * head_dim  # [BM]
    tl.store(dq_ptr + dq_off[:, None] + d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_tile)


@triton.jit
def _group_program(q_ptr, k_ptr, v_ptr, pad_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                   stride_vb, stride_vh, stride_pb, n_heads, n_queries, head_dim, n_row_blocks,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a group-coalition program works on: its (b, h), its rows' queries ``i`` [BM] (and which exist), the
    head-width lanes ``d`` [BD] (and which exist), the query tile [BM, BD] and the K, V and padding rows of b."""
    pid = tl.program_id(0)
    pid_m = pid % n_row_blocks
    pid_bh = pid // n_row_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query of each row
    row_ok = i < n_queries
    d = tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i[:, None] * stride_qm + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    return (b, h, i, row_ok, d, d_ok, q, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
            pad_ptr + b * stride_pb)


@triton.jit
def _group_update(s, vt, in_g, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key tile's online-softmax step for the keys ``in_g`` [BN] of one group: scaled scores ``s`` [BM, BN],
    values ``vt`` [BN, BD]; returns the group's new running max, sum and accumulator."""
    s = tl.where(in_g[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # [BM, BN], 0 off the group
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _group_result(m_i, l_i, acc):
    """A group's normalised output [BM, BD] (zero without a visible key) and base-2 log-sum-exp [BM] (-inf)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))


@triton.jit
def _group_weight(lse_g, member, top):
    """Weight ``2^(lse_g - top)`` of a member group's partial in a coalition (0 for a non-member)."""
    return tl.where(member, tl.exp2(lse_g - top), 0.0)


@triton.jit
def _group_coalition_kernel(
    q_ptr, k_ptr, v_ptr, group_ptr, pad_ptr, member_ptr, o_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_mb, stride_mc,
    stride_ob, stride_oc, stride_oh, stride_om,
    n_heads, n_queries, n_keys, head_dim, n_coalitions, n_row_blocks, scale_log2,
    N_GROUPS: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (b, h), up to 4 groups' attention in one pass, then every coalition.

    Phase 1, one pass over the key tiles: each tile's scores are computed once, and each group with a visible
    key in the tile takes its online-softmax step (running max, sum and output of every group in registers).
    Phase 2, per coalition c: ``Σ_g w_g o_g / Σ_g w_g`` over its member groups, with ``o_g`` the group's
    normalised output and ``w_g = 2^(lse_g - max lse)``: the softmax over the union of their keys; zero rows
    where no member group has a visible key.
    """
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp64 when torch.compile launches the kernel
    b, h, i, row_ok, d, d_ok, q, k_base, v_base, pad_base = _group_program(
        q_ptr, k_ptr, v_ptr, pad_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_pb, n_heads, n_queries, head_dim, n_row_blocks, BLOCK_M, BLOCK_D)

    m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m1, l1, a1 = m0, l0, a0
    m2, l2, a2 = m0, l0, a0
    m3, l3, a3 = m0, l0, a0
    for start in range(0, n_keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN]
        grp = tl.load(group_ptr + cols, mask=cols < n_keys, other=-1)  # [BN], -1 past the end
        col_vis = (grp >= 0) & (grp < N_GROUPS)
        if HAS_PAD:
            col_vis = col_vis & (tl.load(pad_base + cols, mask=col_vis, other=1) == 0)
        if tl.max(col_vis.to(tl.int32), axis=0) > 0:
            kt = tl.load(k_base + cols[:, None] * stride_kn + d[None, :], mask=col_vis[:, None] & d_ok[None, :],
                         other=0.0)  # [BN, BD]
            vt = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=col_vis[:, None] & d_ok[None, :],
                         other=0.0)  # [BN, BD]
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale_log2  # [BM, BN]
            in_g = col_vis & (grp == 0)
            if tl.max(in_g.to(tl.int32), axis=0) > 0:
                m0, l0, a0 = _group_update(s, vt, in_g, m0, l0, a0, PRECISION)
            if N_GROUPS > 1:
                in_g = col_vis & (grp == 1)
                if tl.max(in_g.to(tl.int32), axis=0) > 0:
                    m1, l1, a1 = _group_update(s, vt, in_g, m1, l1, a1, PRECISION)
            if N_GROUPS > 2:
                in_g = col_vis & (grp == 2)
                if tl.max(in_g.to(tl.int32), axis=0) > 0:
                    m2, l2, a2 = _group_update(s, vt, in_g, m2, l2, a2, PRECISION)
            if N_GROUPS > 3:
                in_g = col_vis & (grp == 3)
                if tl.max(in_g.to(tl.int32), axis=0) > 0:
                    m3, l3, a3 = _group_update(s, vt, in_g, m3, l3, a3, PRECISION)
    o0, lse0 = _group_result(m0, l0, a0)
    o1, lse1 = o0, lse0
    o2, lse2 = o0, lse0
    o3, lse3 = o0, lse0
    if N_GROUPS > 1:
        o1, lse1 = _group_result(m1, l1, a1)
    if N_GROUPS > 2:
        o2, lse2 = _group_result(m2, l2, a2)
    if N_GROUPS > 3:
        o3, lse3 = _group_result(m3, l3, a3)

    member_base = member_ptr + b * stride_mb
    o_row = b * stride_ob + h * stride_oh + i * stride_om  # [BM]
    for c in range(n_coalitions):
        in0 = tl.load(member_base + c * stride_mc) != 0
        top = tl.where(in0, lse0, float("-inf"))  # [BM] largest member log-sum-exp
        in1 = in0
        in2 = in0
        in3 = in0
        if N_GROUPS > 1:
            in1 = tl.load(member_base + c * stride_mc + 1) != 0
            top = tl.maximum(top, tl.where(in1, lse1, float("-inf")))
        if N_GROUPS > 2:
            in2 = tl.load(member_base + c * stride_mc + 2) != 0
            top = tl.maximum(top, tl.where(in2, lse2, float("-inf")))
        if N_GROUPS > 3:
            in3 = tl.load(member_base + c * stride_mc + 3) != 0
            top = tl.maximum(top, tl.where(in3, lse3, float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        w = _group_weight(lse0, in0, top)
        den = w
        num = w[:, None] * o0
        if N_GROUPS > 1:
            w = _group_weight(lse1, in1, top)
            den += w
            num += w[:, None] * o1
        if N_GROUPS > 2:
            w = _group_weight(lse2, in2, top)
            den += w
            num += w[:, None] * o2
        if N_GROUPS > 3:
            w = _group_weight(lse3, in3, top)
            den += w
            num += w[:, None] * o3
        seen = den > 0.0
        out = tl.where(seen[:, None], num / tl.where(seen, den, 1.0)[:, None], 0.0)  # [BM, BD]
        tl.store(o_ptr + c * stride_oc + o_row[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


# ============================================================================================ launchers
def _check_kernel_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """What the kernels need beyond the shared checks: dtype, head width, device, unit stride in Dh."""
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"the attention kernels take q, k, v in {ATTENTION_DTYPES}; got {q.dtype} "
                        "(use attention_reference, or INSPECTION_FORCE_REFERENCE=1)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the attention kernels hold head widths up to Dh={MAX_HEAD_DIM}; got Dh={q.shape[-1]} "
                         "(use attention_reference, or INSPECTION_FORCE_REFERENCE=1)")
    if not use_triton(q):
        raise ValueError(f"the Triton attention kernels need CUDA tensors or TRITON_INTERPRET=1; got device "
                         f"{q.device} (call attention(), which falls back to the reference)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension: expected stride 1; got "
                             f"strides {t.stride()} (call .contiguous())")


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 dots follow torch's float32 matmul setting (exact unless TF32 is allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _fwd_config(rows: int, n_keys: int, head_dim: int) -> dict[str, int]:
    """Tile sizes and launch shape of the forward kernel on Hopper (H100 80GB, bf16, measured there).

    The op is memory bound (about Q flops per byte of K/V at Q = 16-64, far under an H100's ~250), so a program
    streams the K/V tiles of one (b, h) through a 3-stage pipeline with 4 warps: 8 warps were 1.1-2.5x slower
    at every shape timed. Key tiles: 128 keys at Dh <= 64; 32 at Dh = 128 (B=256, Q=64, N=200: 0.101 ms against
    0.111 with 64 keys and 0.146 with 128), although with Q = 32 (B=64, N=1024) 64 keys measured 0.090 ms
    against 0.118 - a choice by row count not made yet. Coalition rows beyond 64 go to further programs of the
    same (b, h), launched next to each other, which read its K/V tiles again from L2.
    """
    block_d = block_size(head_dim, lo=16, hi=MAX_HEAD_DIM)
    block_m = block_size(rows, lo=16, hi=_FWD_MAX_BLOCK_M)
    block_n = block_size(n_keys, lo=16, hi=128 if block_d <= 64 else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=3)


def _bwd_config(n_queries: int, n_keys: int, head_dim: int) -> dict[str, int]:
    """Tile sizes of the backward kernel: all queries of a (b, h) in one program up to 64, 64-key tiles, 4 warps,
    2 stages (H100, fwd+bwd graph replays: B=64, Q=32, N=1024, Dh=128 took 0.30 ms so against 0.50 ms with
    32-key tiles and 8 warps; 8 warps were slower at every shape timed)."""
    block_d = block_size(head_dim, lo=16, hi=MAX_HEAD_DIM)
    block_m = block_size(n_queries, lo=16, hi=_BWD_MAX_BLOCK_M)
    block_n = block_size(n_keys, lo=16, hi=64)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, n_coalitions: int,
                    top_k: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Allocate the outputs and launch :func:`_attention_fwd_kernel` (inputs already validated).

    Args:
        q: ``[B, 1, H, Q, Dh]`` (shared by every mask) or ``[B, C, H, Q, Dh]``.
        k, v: ``[B, H, N, Dh]``.
        mask: None (every key visible; C = 1); for C = 1 a ``[B, N]`` uint8, 1 = hidden; for C > 1 a
            ``[B, N]`` int32 whose bit c is set where coalition c hides the key.
        n_coalitions: C, at most :data:`_MAX_COALITIONS_PER_LAUNCH`.
        top_k: keys kept per row, or None.

    Returns:
        ``out`` ``[B, C, H, Q, Dh]`` in q's dtype, ``lse`` ``[B, C, H, Q]`` float32 (base 2, of the scores
        scaled by log2(e)/√Dh; +inf for rows with no visible key) and, when top-k selects, ``thr``
        ``[B, C, H, Q]`` float32 raw-score thresholds (else None).
    """
    b, h, n, dh = k.shape
    n_q = q.shape[3]
    out = torch.empty(b, n_coalitions, h, n_q, dh, dtype=q.dtype, device=q.device)  # [B, C, H, Q, Dh]
    lse = torch.empty(b, n_coalitions, h, n_q, dtype=torch.float32, device=q.device)  # [B, C, H, Q]
    select = top_k is not None and top_k < n
    thr = torch.empty_like(lse) if select else None
    rows = n_coalitions * n_q
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out, lse, thr
    cfg = _fwd_config(rows, n, dh)
    n_row_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
    grid = (n_row_blocks * b * h,)
    _attention_fwd_kernel[grid](
        q, k, v, mask if mask is not None else q, out, lse, thr if thr is not None else lse,
        q.stride(0), q.stride(1) if q.shape[1] > 1 else 0, q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        h, n_coalitions, n_q, n, dh, n_row_blocks, top_k if select else 0, _LOG2E / math.sqrt(dh),
        HAS_MASK=mask is not None, PER_ROW_MASK=n_coalitions > 1, TOP_K=select,
        PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return out, lse, thr


def _attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                              top_k: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate and launch the forward of :func:`attention`: ``out`` ``[B, H, Q, Dh]``, ``lse`` and ``thr``
    ``[B, H, Q]`` (see :func:`_launch_forward`)."""
    _check_attention_args(q, k, v, key_padding_mask, top_k)
    _check_kernel_inputs(q, k, v)
    mask = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None  # [B, N]
    out, lse, thr = _launch_forward(q.unsqueeze(1), k, v, mask, 1, top_k)
    return out[:, 0], lse[:, 0], thr[:, 0] if thr is not None else None


def _coalition_forward_triton(q: Tensor, k: Tensor, v: Tensor, masks: Tensor, top_k: int | None) -> Tensor:
    """Validate and launch :func:`coalition_attention`: C masks per launch up to
    :data:`_MAX_COALITIONS_PER_LAUNCH` (one bit each in a per-key int32), more in several launches."""
    _check_attention_args(q, k, v, masks, top_k, coalitions=True)
    _check_kernel_inputs(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("coalition_attention is forward only on the Triton path: expected inputs without "
                         "grad; got requires_grad=True (call it under torch.no_grad(), or use attention() "
                         "per mask to differentiate)")
    q = q.unsqueeze(1) if q.dim() == 4 else q  # [B, 1 or C, H, Q, Dh]
    outs = []
    for first in range(0, max(masks.shape[1], 1), _MAX_COALITIONS_PER_LAUNCH):
        chunk = masks[:, first:first + _MAX_COALITIONS_PER_LAUNCH]  # [B, c, N]
        n_chunk = chunk.shape[1]
        if n_chunk == 1:
            mask = chunk[:, 0].to(torch.uint8)  # [B, N]
        else:
            bit = torch.arange(n_chunk, dtype=torch.int32, device=masks.device)  # [c] (no host copy: graph-safe)
            weights = torch.bitwise_left_shift(torch.ones_like(bit), bit)  # [c] 2**c
            mask = (chunk.to(torch.int32) * weights[None, :, None]).sum(dim=1, dtype=torch.int32)  # [B, N] bits
        q_chunk = q if q.shape[1] == 1 else q[:, first:first + n_chunk]
        outs.append(_launch_forward(q_chunk, k, v, mask, n_chunk, top_k)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [B, C, H, Q, Dh]


def _group_config(n_queries: int, n_keys: int, head_dim: int, n_groups: int) -> dict[str, int]:
    """Tile sizes and warps of :func:`_group_coalition_kernel` on Hopper (H100 80GB, bf16, 3 groups, measured there).

    Key tiles and stages as the forward (:func:`_fwd_config`). The query block is halved until the G partial
    outputs held in registers take at most :data:`_GROUP_REGISTER_FLOATS` float32 per program (Q = 64, Dh = 128,
    B = 256, N = 200: 64-row blocks 0.29 ms, 32-row blocks 0.40 ms). Two warps where one group's output block is
    at most 2048 floats (Q = 16, Dh = 32, B = 1024, N = 64: 0.079 ms against 0.120 with four; Q = 32, Dh = 64:
    0.204 against 0.220), four above (Q = 64, Dh = 64: 0.166 ms against 0.240 with two and 32-row blocks); eight
    were slower at every shape timed.
    """
    cfg = _fwd_config(n_queries, n_keys, head_dim)
    while cfg["BLOCK_M"] > 16 and n_groups * cfg["BLOCK_M"] * cfg["BLOCK_D"] > _GROUP_REGISTER_FLOATS:
        cfg["BLOCK_M"] //= 2
    cfg["num_warps"] = 2 if cfg["BLOCK_M"] * cfg["BLOCK_D"] <= 2048 else 4
    return cfg


def _group_coalition_forward_triton(q: Tensor, k: Tensor, v: Tensor, key_groups: Tensor, coalitions: Tensor,
                                    key_padding_mask: Tensor | None) -> Tensor:
    """Validate and launch :func:`_group_coalition_kernel`: ``[B, C, H, Q, Dh]`` in q's dtype. More than
    :data:`_MAX_REGISTER_GROUPS` groups go to :func:`coalition_attention` with the masks they stand for.

    Nothing is copied to or from the host, so the launch can be captured in a CUDA graph.
    """
    _check_group_args(q, k, v, key_groups, coalitions, key_padding_mask)
    _check_kernel_inputs(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("group_coalition_attention is forward only on the Triton path: expected inputs without "
                         "grad; got requires_grad=True (call it under torch.no_grad(), or use attention() per "
                         "coalition to differentiate)")
    n_coalitions, n_groups = coalitions.shape[1], coalitions.shape[2]
    if n_groups > _MAX_REGISTER_GROUPS:
        return _coalition_forward_triton(q, k, v, group_coalition_masks(key_groups, coalitions, key_padding_mask),
                                         None)
    b, h, n, dh = k.shape
    n_q = q.shape[2]
    out = torch.empty(b, n_coalitions, h, n_q, dh, dtype=q.dtype, device=q.device)  # [B, C, H, Q, Dh]
    if out.numel() == 0:
        return out
    if n == 0:
        return out.zero_()
    groups = key_groups.to(torch.int32).contiguous()  # [N]
    member = coalitions.to(torch.uint8)  # [B, C, G]
    pad = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None  # [B, N]
    cfg = _group_config(n_q, n, dh, n_groups)
    n_row_blocks = triton.cdiv(n_q, cfg["BLOCK_M"])
    _group_coalition_kernel[(n_row_blocks * b * h,)](
        q, k, v, groups, pad if pad is not None else groups, member, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pad.stride(0) if pad is not None else 0, member.stride(0), member.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        h, n_q, n, dh, n_coalitions, n_row_blocks, _LOG2E / math.sqrt(dh),
        N_GROUPS=n_groups, HAS_PAD=pad is not None, PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return out


def _attention_backward_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, grad_out: Tensor,
                               lse: Tensor, thr: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch :func:`_attention_bwd_kernel` on tensors saved by the forward; returns dq, dk, dv (input dtype).

    Args:
        q: ``[B, H, Q, Dh]``; k, v: ``[B, H, N, Dh]``; mask: ``[B, N]`` bool or None.
        out, grad_out: ``[B, H, Q, Dh]`` forward output and its gradient.
        lse: ``[B, H, Q]`` float32 base-2 log-sum-exp; thr: ``[B, H, Q]`` top-k thresholds or None.
    """
    b, h, n, dh = k.shape
    n_q = q.shape[2]
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq = torch.empty(b, h, n_q, dh, dtype=q.dtype, device=q.device)  # [B, H, Q, Dh]
    cfg = _bwd_config(n_q, n, dh)
    atomic = n_q > cfg["BLOCK_M"]
    grad_dtype = torch.float32 if atomic else k.dtype
    make = torch.zeros if atomic else torch.empty
    dk = make(b, h, n, dh, dtype=grad_dtype, device=k.device)  # [B, H, N, Dh]
    dv = make(b, h, n, dh, dtype=grad_dtype, device=k.device)  # [B, H, N, Dh]
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    if mask is not None:
        mask = mask.to(torch.uint8)  # [B, N]
    n_row_blocks = triton.cdiv(n_q, cfg["BLOCK_M"])
    grid = (n_row_blocks * b * h,)
    _attention_bwd_kernel[grid](
        q, k, v, mask if mask is not None else q, out, grad_out, lse, thr if thr is not None else lse,
        dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        h, n_q, n, dh, n_row_blocks, 1.0 / math.sqrt(dh), _LOG2E / math.sqrt(dh),
        HAS_MASK=mask is not None, TOP_K=thr is not None, ATOMIC=atomic,
        PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _MaskedAttention(torch.autograd.Function):
    """Triton forward and backward as one differentiable op (the mask and top-k get no gradient)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                top_k: int | None) -> Tensor:
        out, lse, thr = _attention_forward_triton(q, k, v, key_padding_mask, top_k)  # [B, H, Q, Dh], [B, H, Q]
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse, thr)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, mask, out, lse, thr = ctx.saved_tensors
        dq, dk, dv = _attention_backward_triton(q, k, v, mask, out, grad_out, lse, thr)
        return dq, dk, dv, None, None


# ================================================================================================ public
def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              top_k: int | None = None) -> Tensor:
    """Masked attention with optional top-k keys; Triton on CUDA or the interpreter, else the reference.

    Same contract as :func:`attention_reference` (and :func:`fusion.bridge.masked_attention`, which the
    bridge's ``attention`` hook defaults to this op). Differentiable on both paths: the Triton path has its own
    backward kernel. It takes q, k, v of one dtype in :data:`ATTENTION_DTYPES` (the bridge's bf16 under autocast
    included), head widths up to :data:`MAX_HEAD_DIM`, tensors contiguous in the head dimension (other strides
    are read in place), and returns the input dtype.

    Args:
        q: ``[B, H, Q, Dh]`` queries.
        k, v: ``[B, H, N, Dh]`` keys and values.
        key_padding_mask: ``[B, N]`` bool, True where a key must be ignored.
        top_k: keep only each query's ``top_k`` highest-scoring keys (ties with the ``top_k``-th all kept).

    Returns:
        ``[B, H, Q, Dh]`` in q's dtype; a query with no visible key gets zeros (and zero gradients).

    Raises:
        TypeError: a tensor has the wrong dtype.
        ValueError: shapes or devices disagree, ``top_k`` < 1, or (Triton path) Dh > :data:`MAX_HEAD_DIM` or a
            tensor is strided in its head dimension.
    """
    if isinstance(q, Tensor) and use_triton(q):  # the forward launcher validates
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, v)):
            return _MaskedAttention.apply(q, k, v, key_padding_mask, top_k)
        return _attention_forward_triton(q, k, v, key_padding_mask, top_k)[0]  # no autograd bookkeeping
    return attention_reference(q, k, v, key_padding_mask, top_k)


def coalition_attention(q: Tensor, k: Tensor, v: Tensor, masks: Tensor, top_k: int | None = None) -> Tensor:
    """Attention of the same queries and tokens under C key masks (modality coalitions), in one launch.

    Equal to stacking C calls of :func:`attention` (see :func:`coalition_attention_reference`), but the Triton
    path loads each K/V tile of a ``(b, h)`` for 64 coalition x query rows at a time, and the programs of one
    ``(b, h)`` run side by side, so K and V come from device memory about once instead of C times: that is where
    it beats C separate calls. Forward only on the Triton path: explanations run under
    ``torch.no_grad()``; use :func:`attention` per mask to differentiate. Coalitions of whole modalities go
    faster through :func:`group_coalition_attention`.

    Args:
        q: ``[B, H, Q, Dh]`` queries shared by every mask (the bridge's learned queries in its first layer), or
            ``[B, C, H, Q, Dh]`` one set per mask (later layers, where the queries differ by coalition).
        k, v: ``[B, H, N, Dh]`` keys and values of the units, shared by every mask.
        masks: ``[B, C, N]`` bool, True where coalition c must ignore a key (e.g. C = 8 subsets of 3 modalities).
        top_k: keep only each query's ``top_k`` highest-scoring keys, per coalition.

    Returns:
        ``[B, C, H, Q, Dh]`` in q's dtype; coalition rows with no visible key are zero.

    Raises:
        TypeError: a tensor has the wrong dtype.
        ValueError: shapes or devices disagree, ``top_k`` < 1, or (Triton path) an input requires grad,
            Dh > :data:`MAX_HEAD_DIM` or a tensor is strided in its head dimension.
    """
    if isinstance(q, Tensor) and use_triton(q):
        return _coalition_forward_triton(q, k, v, masks, top_k)
    return coalition_attention_reference(q, k, v, masks, top_k)


def group_coalition_attention(q: Tensor, k: Tensor, v: Tensor, key_groups: Tensor, coalitions: Tensor,
                              key_padding_mask: Tensor | None = None) -> Tensor:
    """Attention of the same queries under C coalitions of key groups (modalities), each group attended once.

    Equal to :func:`coalition_attention` with the masks of :func:`group_coalition_masks` (see
    :func:`group_coalition_attention_reference`), but the Triton path computes the softmax attention over each
    group's keys once per query (G partial outputs with their log-sum-exp) and forms every coalition by merging
    the partials of its members: the work is one attention over the N keys plus ``C·G`` tiny merges, where C
    separate calls (or :func:`coalition_attention`) attend over N keys C times. Up to 4 groups, one pass over the
    keys computes each tile's scores once and updates the groups present in it; more groups go to
    :func:`coalition_attention` with the masks they stand for. Keys of one group need not be contiguous. Forward
    only on the Triton path, no top-k (the top-k of a union is not the union of the top-ks: use
    :func:`coalition_attention`).

    Args:
        q: ``[B, H, Q, Dh]`` queries, shared by every coalition.
        k, v: ``[B, H, N, Dh]`` keys and values.
        key_groups: ``[N]`` integer, the group of each key (e.g. the bridge's ``modality_index``); keys whose
            group is outside ``[0, G)`` are hidden from every coalition.
        coalitions: ``[B, C, G]`` bool, True where group g is a member of coalition c of unit b.
        key_padding_mask: ``[B, N]`` bool, True where a key is padding (hidden from every coalition), or None.

    Returns:
        ``[B, C, H, Q, Dh]`` in q's dtype; coalitions with no visible key are zero.

    Raises:
        TypeError: a tensor has the wrong dtype.
        ValueError: shapes or devices disagree, or (Triton path) an input requires grad, Dh >
            :data:`MAX_HEAD_DIM` or a tensor is strided in its head dimension.
    """
    if isinstance(q, Tensor) and use_triton(q):
        return _group_coalition_forward_triton(q, k, v, key_groups, coalitions, key_padding_mask)
    return group_coalition_attention_reference(q, k, v, key_groups, coalitions, key_padding_mask)
