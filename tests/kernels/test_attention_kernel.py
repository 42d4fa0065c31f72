"""Attention kernels against their torch reference, :mod:`fusion.bridge` and closed forms.

B batch · H heads · Q queries · N keys · Dh head width · C coalitions (key masks)

Runs where Triton does: on CUDA, or on the CPU in a process started with ``TRITON_INTERPRET=1`` (the variable
must be set before triton is imported, so it cannot be set from here):
``TRITON_INTERPRET=1 pytest -m interpret tests/kernels/test_attention_kernel.py``.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from fusion.bridge import BridgeConfig, FusionBridge, kernel_attention, masked_attention
from kernels._launch import FORCE_REFERENCE_ENV, use_triton
from kernels.attention import (
    MAX_HEAD_DIM,
    attention,
    attention_reference,
    coalition_attention,
    coalition_attention_reference,
    group_coalition_attention,
    group_coalition_attention_reference,
    group_coalition_masks,
)

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels run on CUDA or under TRITON_INTERPRET=1 "
        "(run: TRITON_INTERPRET=1 pytest -m interpret tests/kernels)",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

#: float32 outputs and gradients (absolute and relative). Kernel and reference both compute in float32 from the
#: same inputs and differ only by summation order (key tiles, online rescaling) and exp2 versus exp: a few ulps
#: of O(1) values (observed <= 1e-6). A dropped or extra key, a missing 1/sqrt(Dh) or a wrong row moves
#: outputs by >= 1e-3.
FP32_TOL = 1e-5
#: float16 outputs (absolute and relative). The kernel rounds the probabilities to float16 before P·V (relative
#: 2**-11 per term) and both round the output to float16 (half an ulp, 4.9e-4 at 1.0): about two float16 ulps
#: of the O(1) outputs. Scaling the scores by 1/Dh instead of 1/sqrt(Dh) moves them by > 1e-2.
FP16_TOL = 2e-3
#: Top-k inputs are drawn so that the top_k-th and (top_k+1)-th raw scores of every row are at least this far
#: apart: float32 products of the same inputs differ by ~1e-6, so both sides then keep the same keys. Exact
#: ties are tested separately with integer-valued inputs, whose products are exact everywhere.
SELECTION_MARGIN = 1e-3
#: Seeds tried per shape before the generator gives up on finding well-separated top-k inputs.
_MAX_DRAWS = 50
#: Modality spans of the "modality" masks as fractions of N (vision, vibration, temperature tokens).
_SPANS = (0.5, 0.3)
#: Bridge gradients (absolute and relative): two layers of attention, LayerNorms and feed-forwards in float32
#: accumulate the kernels' reassociation (observed ~1e-6); a wrong gradient of one attention is O(1e-2).
BRIDGE_GRAD_TOL = 1e-4
#: Presence pattern of unit b (cycled): one modality absent, all present, only the last one, none at all.
_PRESENCE = ((True, False, True), (True, True, True), (False, False, True), (False, False, False))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    tol = FP32_TOL if dtype == torch.float32 else FP16_TOL
    return dict(atol=tol, rtol=tol)


def _modality_of(n_keys: int) -> torch.Tensor:
    """``[N]`` long: which of the 3 modalities each key belongs to."""
    first, second = max(1, int(n_keys * _SPANS[0])), max(1, int(n_keys * _SPANS[1]))
    index = torch.full((n_keys,), 2, dtype=torch.long)
    index[:first] = 0
    index[first:first + second] = 1
    return index


def _modality_mask(batch: int, n_keys: int, presence=_PRESENCE) -> torch.Tensor:
    """``[B, N]`` bool key padding mask (True = absent) from the cycled presence patterns."""
    present = torch.tensor([presence[b % len(presence)] for b in range(batch)])  # [B, 3]
    return ~present[:, _modality_of(n_keys)]


def _mask(kind: str, batch: int, n_keys: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "modality":
        return _modality_mask(batch, n_keys).to(DEVICE)
    return (torch.rand(batch, n_keys, generator=gen) < 0.3).to(DEVICE)


def _well_separated(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, top_k: int | None) -> bool:
    if top_k is None or top_k >= k.shape[2]:
        return True
    scores = q.double() @ k.double().transpose(-1, -2)  # [B, H, Q, N]
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :].cpu(), float("-inf"))
    top = scores.topk(top_k + 1, dim=-1).values  # [B, H, Q, K+1]
    gap = top[..., -2] - top[..., -1]
    gap = gap[torch.isfinite(top[..., -2])]  # rows with at most top_k visible keys keep them all
    return gap.numel() == 0 or float(gap.nan_to_num(posinf=1.0).min()) > SELECTION_MARGIN


def _inputs(b: int, h: int, n_q: int, n: int, dh: int, dtype: torch.dtype, top_k: int | None, kind: str,
            seed: int = 0):
    """Random q, k, v on DEVICE and a mask of ``kind``, redrawn until the top-k choice is well separated."""
    for draw in range(_MAX_DRAWS):
        gen = torch.Generator().manual_seed(seed * _MAX_DRAWS + draw)
        q = torch.randn(b, h, n_q, dh, generator=gen).to(dtype)  # [B, H, Q, Dh]
        k = torch.randn(b, h, n, dh, generator=gen).to(dtype)  # [B, H, N, Dh]
        v = torch.randn(b, h, n, dh, generator=gen).to(dtype)  # [B, H, N, Dh]
        mask = _mask(kind, b, n, gen)
        if _well_separated(q, k, mask, top_k):
            return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask
    pytest.fail(f"no well-separated top-{top_k} inputs for {(b, h, n_q, n, dh)} in {_MAX_DRAWS} draws")


# (B, H, Q, N, Dh, dtype, top_k, mask kind): powers of two, odd and prime sizes, one query row, N above one key
# block (128 keys at Dh <= 64, 64 at Dh = 128) and not a multiple of it, the tiny self-attention case, top-k
# 1 / middle / >= N, and Q above the backward's 64-query block.
MATRIX = [
    (1, 1, 16, 16, 16, torch.float32, None, "none"),
    (2, 2, 16, 64, 32, torch.float16, None, "modality"),
    (3, 2, 17, 129, 32, torch.float32, None, "modality"),
    (2, 1, 5, 97, 24, torch.float32, 7, "modality"),
    (1, 3, 1, 33, 8, torch.float16, None, "random"),
    (4, 1, 16, 200, 64, torch.float16, 1, "modality"),
    (2, 2, 16, 131, 128, torch.float32, 131, "modality"),
    (2, 1, 70, 40, 16, torch.float32, None, "random"),
    (2, 2, 32, 577, 64, torch.float16, 16, "modality"),
    (1, 2, 64, 256, 96, torch.float32, None, "none"),
]
MATRIX_IDS = [f"B{b}-H{h}-Q{q}-N{n}-D{d}-{str(t).removeprefix('torch.')}-k{k}-{m}"
              for b, h, q, n, d, t, k, m in MATRIX]

GRAD_MATRIX = [case for case in MATRIX if case[5] == torch.float32]
GRAD_IDS = [i for i, case in zip(MATRIX_IDS, MATRIX, strict=True) if case[5] == torch.float32]


# -------------------------------------------------------------------------------------- reference = fusion
def test_reference_equals_fusion_masked_attention() -> None:
    q, k, v, mask = _inputs(4, 2, 5, 37, 16, torch.float32, 3, "modality")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    spec_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for top_k in (None, 3):
        ours = attention_reference(*leaves, mask, top_k)
        spec = masked_attention(*spec_leaves, mask, top_k)
        assert torch.equal(ours, spec)
        ours.square().sum().backward()
        spec.square().sum().backward()
        for a, b in zip(leaves, spec_leaves, strict=True):
            assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------------------------------ forward matrix
@pytest.mark.parametrize(("b", "h", "n_q", "n", "dh", "dtype", "top_k", "kind"), MATRIX, ids=MATRIX_IDS)
def test_forward_matches_reference(b, h, n_q, n, dh, dtype, top_k, kind) -> None:
    q, k, v, mask = _inputs(b, h, n_q, n, dh, dtype, top_k, kind)
    out = attention(q, k, v, mask, top_k)
    assert out.shape == (b, h, n_q, dh) and out.dtype == dtype  # [B, H, Q, Dh]
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, top_k), **_tol(dtype))


@pytest.mark.parametrize(("b", "h", "n_q", "n", "dh", "dtype", "top_k", "kind"), GRAD_MATRIX, ids=GRAD_IDS)
def test_gradients_match_autograd_through_the_reference(b, h, n_q, n, dh, dtype, top_k, kind) -> None:
    q, k, v, mask = _inputs(b, h, n_q, n, dh, dtype, top_k, kind, seed=1)
    grad_out = torch.randn(b, h, n_q, dh, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    spec = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*ours, mask, top_k).backward(grad_out)
    attention_reference(*spec, mask, top_k).backward(grad_out)
    for name, a, r in zip("qkv", ours, spec, strict=True):
        assert a.grad.shape == r.shape and a.grad.dtype == dtype, name
        torch.testing.assert_close(a.grad, r.grad, **_tol(dtype), msg=lambda m, name=name: f"d{name}: {m}")


def test_float16_gradients_match_the_reference() -> None:
    q, k, v, mask = _inputs(2, 2, 16, 97, 32, torch.float16, 5, "modality", seed=2)
    grad_out = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    spec = [t.float().requires_grad_() for t in (q, k, v)]
    attention(*ours, mask, 5).backward(grad_out)
    attention_reference(*spec, mask, 5).backward(grad_out.float())
    for a, r in zip(ours, spec, strict=True):
        assert a.grad.dtype == torch.float16
        # float16 gradients: dS and P are rounded to float16 before their products; 4 ulps at 1.0
        torch.testing.assert_close(a.grad.float(), r.grad, atol=4e-3, rtol=4e-3)


def test_strided_views_as_the_bridge_makes_them_are_read_in_place() -> None:
    gen = torch.Generator().manual_seed(4)
    b, n_q, n, h, dh = 3, 16, 50, 2, 32
    x = torch.randn(b, n_q, h * dh, generator=gen).to(DEVICE)
    kv = torch.randn(b, n, 2 * h * dh, generator=gen).to(DEVICE)
    q = x.reshape(b, n_q, h, dh).transpose(1, 2)  # [B, H, Q, Dh], strided
    k, v = kv.reshape(b, n, 2, h, dh).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh] each, strided
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = _modality_mask(b, n).to(DEVICE)
    torch.testing.assert_close(attention(q, k, v, mask), attention(q.contiguous(), k.contiguous(),
                                                                    v.contiguous(), mask), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- edges
def test_absent_modality_equals_attention_over_the_present_tokens_only() -> None:
    """Masking a modality is the same as removing its tokens, whatever they hold."""
    q, k, v, _ = _inputs(1, 2, 16, 150, 32, torch.float32, None, "none", seed=5)
    modality = _modality_of(150)
    mask = (modality == 1)[None].to(DEVICE)  # [1, N] the vibration tokens are absent
    keep = (modality != 1).nonzero(as_tuple=True)[0].to(DEVICE)
    k, v = k.clone(), v.clone()
    k[:, :, modality == 1] = 1e4  # garbage in the absent tokens must not matter
    v[:, :, modality == 1] = -1e4
    want = attention_reference(q, k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(attention(q, k, v, mask), want, **_tol(torch.float32))


def test_hidden_keys_are_never_read() -> None:
    """NaN in the tokens of an absent modality does not reach the output: the kernel does not load them."""
    q, k, v, _ = _inputs(3, 1, 16, 90, 32, torch.float32, None, "none", seed=6)
    mask = _modality_mask(3, 90).to(DEVICE)
    clean = attention(q, k, v, mask)
    k[mask[:, None, :, None].expand_as(k)] = float("nan")
    v[mask[:, None, :, None].expand_as(v)] = float("nan")
    assert torch.equal(attention(q, k, v, mask), clean)


@pytest.mark.parametrize("top_k", [None, 4])
def test_a_unit_with_every_key_masked_gets_zero_output_and_zero_gradients(top_k) -> None:
    q, k, v, _ = _inputs(3, 2, 17, 70, 32, torch.float32, None, "none", seed=7)
    mask = torch.zeros(3, 70, dtype=torch.bool, device=DEVICE)
    mask[1] = True  # unit 1 has no modality at all
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, mask, top_k)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert bool(out[0].abs().sum() > 0) and bool(out[2].abs().sum() > 0)
    out.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
        assert bool(t.grad[0].abs().sum() > 0)


def test_top_k_at_least_n_is_plain_attention() -> None:
    q, k, v, mask = _inputs(2, 2, 16, 45, 32, torch.float32, None, "modality", seed=8)
    plain = attention(q, k, v, mask)
    assert torch.equal(attention(q, k, v, mask, 45), plain)
    assert torch.equal(attention(q, k, v, mask, 1000), plain)
    torch.testing.assert_close(plain, attention_reference(q, k, v, mask), **_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_top_1_returns_the_value_of_the_best_visible_key(dtype) -> None:
    q, k, v, mask = _inputs(4, 2, 16, 77, 32, dtype, 1, "modality", seed=9)
    out = attention(q, k, v, mask, 1)
    scores = (q.double() @ k.double().transpose(-1, -2)).masked_fill(mask[:, None, None, :], float("-inf"))
    best = scores.argmax(dim=-1)  # [B, H, Q]
    want = torch.gather(v, 2, best[..., None].expand(-1, -1, -1, v.shape[-1]))  # [B, H, Q, Dh]
    present = mask.logical_not().any(dim=1)  # [B] units with a visible key
    assert torch.equal(out[present], want[present])  # one key with probability exactly 1
    assert torch.equal(out[~present], torch.zeros_like(out[~present]))


def test_ties_at_the_threshold_are_all_kept() -> None:
    # one query, scores 3, 2, 2, 2, 1, 0 (integer-valued, exact in every dtype): top-2 keeps 3 and all three 2s
    q = torch.tensor([[[[1.0] + [0.0] * 15]]], device=DEVICE)  # [1, 1, 1, 16]
    k = torch.zeros(1, 1, 6, 16, device=DEVICE)
    k[0, 0, :, 0] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    v = torch.arange(6 * 16, dtype=torch.float32, device=DEVICE).reshape(1, 1, 6, 16) / 16
    weights = torch.softmax(torch.tensor([3.0, 2.0, 2.0, 2.0]) / 4.0, dim=0).to(DEVICE)  # sqrt(Dh) = 4
    want = (weights[:, None] * v[0, 0, :4]).sum(dim=0)
    out = attention(q, k, v, None, 2)
    torch.testing.assert_close(out[0, 0, 0], want, **_tol(torch.float32))
    # random integer-valued inputs: many exact ties, resolved as the reference does
    gen = torch.Generator().manual_seed(10)
    q = torch.randint(-1, 2, (2, 2, 16, 16), generator=gen).float().to(DEVICE)
    k = torch.randint(-1, 2, (2, 2, 60, 16), generator=gen).float().to(DEVICE)
    v = torch.randn(2, 2, 60, 16, generator=gen).to(DEVICE)
    mask = _modality_mask(2, 60).to(DEVICE)
    for top_k in (1, 3, 10):
        torch.testing.assert_close(attention(q, k, v, mask, top_k), attention_reference(q, k, v, mask, top_k),
                                   **_tol(torch.float32))


def test_rows_with_fewer_visible_keys_than_top_k_keep_them_all() -> None:
    q, k, v, _ = _inputs(2, 1, 16, 40, 32, torch.float32, None, "none", seed=11)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[:, :3] = False  # 3 visible keys, top_k = 8
    torch.testing.assert_close(attention(q, k, v, mask, 8), attention(q, k, v, mask), **_tol(torch.float32))
    torch.testing.assert_close(attention(q, k, v, mask, 8), attention_reference(q, k[:, :, :3], v[:, :, :3]),
                               **_tol(torch.float32))


# ---------------------------------------------------------------------------------------------- coalitions
def _coalition_masks(batch: int, n_keys: int) -> torch.Tensor:
    """``[B, 8, N]`` bool (True = hidden): every subset of the 3 modalities, the empty one first."""
    subsets = list(itertools.product((False, True), repeat=3))  # 8 presence patterns, (F, F, F) first
    per_unit = torch.stack([_modality_mask(1, n_keys, (s,))[0] for s in subsets])  # [8, N]
    return per_unit[None].expand(batch, -1, -1).clone().to(DEVICE)


@pytest.mark.parametrize(
    ("b", "h", "n_q", "n", "dh", "dtype", "top_k"),
    [(2, 2, 16, 100, 32, torch.float32, None), (3, 1, 17, 64, 16, torch.float32, 5),
     (2, 2, 16, 150, 64, torch.float16, None), (1, 2, 5, 40, 24, torch.float32, None)],
    ids=["8x16-rows", "8x17-rows-three-blocks-topk", "fp16", "small"],
)
def test_coalitions_equal_separate_calls(b, h, n_q, n, dh, dtype, top_k) -> None:
    q, k, v, _ = _inputs(b, h, n_q, n, dh, dtype, None, "none", seed=12)
    masks = _coalition_masks(b, n)  # [B, 8, N]
    out = coalition_attention(q, k, v, masks, top_k)
    assert out.shape == (b, 8, h, n_q, dh) and out.dtype == dtype  # [B, C, H, Q, Dh]
    for c in range(8):
        torch.testing.assert_close(out[:, c], attention(q, k, v, masks[:, c], top_k), **_tol(dtype))
    torch.testing.assert_close(out, coalition_attention_reference(q, k, v, masks, top_k), **_tol(dtype))
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # the empty coalition (all hidden) is zero


def test_coalitions_with_one_query_set_per_mask() -> None:
    b, h, n_q, n, dh = 2, 2, 16, 80, 32
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(b, 8, h, n_q, dh, generator=gen).to(DEVICE)  # [B, C, H, Q, Dh]
    _, k, v, _ = _inputs(b, h, n_q, n, dh, torch.float32, None, "none", seed=13)
    masks = _coalition_masks(b, n)
    out = coalition_attention(q, k, v, masks)
    for c in range(8):
        torch.testing.assert_close(out[:, c], attention(q[:, c], k, v, masks[:, c]), **_tol(torch.float32))


@pytest.mark.parametrize("n_coalitions", [1, 33])
def test_one_or_more_coalitions_than_one_launch_holds(n_coalitions) -> None:
    q, k, v, _ = _inputs(2, 1, 5, 30, 16, torch.float32, None, "none", seed=14)
    masks = (torch.rand(2, n_coalitions, 30, generator=torch.Generator().manual_seed(14)) < 0.5).to(DEVICE)
    out = coalition_attention(q, k, v, masks)  # [B, C, H, Q, Dh]
    assert out.shape == (2, n_coalitions, 1, 5, 16)
    torch.testing.assert_close(out, coalition_attention_reference(q, k, v, masks), **_tol(torch.float32))


def test_coalitions_are_forward_only() -> None:
    q, k, v, _ = _inputs(1, 1, 16, 20, 16, torch.float32, None, "none")
    with pytest.raises(ValueError, match="forward only on the Triton path"):
        coalition_attention(q.requires_grad_(), k, v, _coalition_masks(1, 20))
    with torch.no_grad():
        assert coalition_attention(q, k, v, _coalition_masks(1, 20)).shape == (1, 8, 1, 16, 16)


# ---------------------------------------------------------------------------------------- group coalitions
def _all_subsets(batch: int, n_groups: int) -> torch.Tensor:
    """``[B, 2**G, G]`` bool: every subset of the groups (True = member), the empty one first."""
    subsets = torch.tensor(list(itertools.product((False, True), repeat=n_groups)))  # [2**G, G]
    return subsets[None].expand(batch, -1, -1).clone().to(DEVICE)


def test_group_masks_spell_out_membership_padding_and_foreign_groups() -> None:
    groups = torch.tensor([0, 0, 1, 2, 5, -1], device=DEVICE)  # keys 4 and 5 belong to no group of G = 3
    coalitions = torch.tensor([[[True, False, True], [False, True, False]]], device=DEVICE)  # [1, 2, 3]
    padding = torch.tensor([[False, True, False, False, False, False]], device=DEVICE)
    masks = group_coalition_masks(groups, coalitions, padding)  # [1, 2, 6] True = hidden
    assert masks.tolist() == [[[False, True, True, False, True, True], [True, True, False, True, True, True]]]


@pytest.mark.parametrize(
    ("b", "h", "n_q", "n", "dh", "dtype", "padded"),
    [(2, 2, 16, 100, 32, torch.float32, False), (4, 1, 17, 131, 16, torch.float32, True),
     (2, 2, 16, 150, 64, torch.float16, True), (1, 2, 70, 40, 24, torch.float32, False),
     (2, 1, 5, 200, 128, torch.float16, False)],
    ids=["modalities", "two-row-blocks-odd-n-padded", "fp16-padded", "q-above-one-block", "dh128-fp16"],
)
def test_group_coalitions_equal_separate_calls(b, h, n_q, n, dh, dtype, padded) -> None:
    """All 8 subsets of 3 contiguous modalities (as the bridge lays out its tokens), with and without padding."""
    q, k, v, _ = _inputs(b, h, n_q, n, dh, dtype, None, "none", seed=21)
    groups = _modality_of(n).to(DEVICE)
    padding = _modality_mask(b, n).to(DEVICE) if padded else None  # whole modalities absent in some units
    coalitions = _all_subsets(b, 3)  # [B, 8, 3]
    with torch.no_grad():
        out = group_coalition_attention(q, k, v, groups, coalitions, padding)
    assert out.shape == (b, 8, h, n_q, dh) and out.dtype == dtype  # [B, C, H, Q, Dh]
    masks = group_coalition_masks(groups, coalitions, padding)  # [B, 8, N]
    for c in range(8):
        torch.testing.assert_close(out[:, c], attention(q, k, v, masks[:, c]), **_tol(dtype))
    torch.testing.assert_close(out, group_coalition_attention_reference(q, k, v, groups, coalitions, padding),
                               **_tol(dtype))
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # the empty coalition is zero


@pytest.mark.parametrize("n_groups", [1, 2, 4, 5, 7])
def test_group_coalitions_with_scattered_foreign_and_empty_groups(n_groups) -> None:
    """Groups interleaved key by key, keys of no group, a group with no key (for G > 1), random coalitions per
    unit; up to 4 groups the group kernel holds the partials in registers, above that the masks go to the mask
    kernel."""
    b, h, n_q, n, dh = 3, 2, 16, 90, 32
    q, k, v, _ = _inputs(b, h, n_q, n, dh, torch.float32, None, "none", seed=22)
    gen = torch.Generator().manual_seed(22 + n_groups)
    groups = torch.randint(-1, max(n_groups - 1, 1), (n,), generator=gen)  # -1: no group; group G-1 has no key
    groups[groups == 0] = n_groups + 2  # some keys of a group >= G belong to none either
    groups[:3] = 0
    coalitions = torch.rand(b, 6, n_groups, generator=gen) < 0.5  # [B, 6, G]
    coalitions[:, 0] = True  # every group, the foreign keys still hidden
    padding = torch.rand(b, n, generator=gen) < 0.2
    groups, coalitions, padding = groups.to(DEVICE), coalitions.to(DEVICE), padding.to(DEVICE)
    out = group_coalition_attention(q, k, v, groups.to(torch.int32), coalitions, padding)
    want = coalition_attention_reference(q, k, v, group_coalition_masks(groups, coalitions, padding))
    torch.testing.assert_close(out, want, **_tol(torch.float32))


def test_group_coalitions_of_a_unit_with_every_key_padded_are_zero() -> None:
    q, k, v, _ = _inputs(2, 1, 16, 48, 16, torch.float32, None, "none", seed=23)
    groups = _modality_of(48).to(DEVICE)
    padding = torch.zeros(2, 48, dtype=torch.bool, device=DEVICE)
    padding[1] = True
    out = group_coalition_attention(q, k, v, groups, _all_subsets(2, 3), padding)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, 1:].abs().sum(dim=(-1, -2, -3)).gt(0).all()  # unit 0: every non-empty coalition sees keys


def test_group_coalitions_are_forward_only_and_check_their_inputs() -> None:
    q, k, v, _ = _inputs(2, 2, 4, 8, 16, torch.float32, None, "none")
    groups, coalitions = _modality_of(8).to(DEVICE), _all_subsets(2, 3)
    with pytest.raises(ValueError, match="forward only on the Triton path"):
        group_coalition_attention(q.clone().requires_grad_(), k, v, groups, coalitions)
    with pytest.raises(ValueError, match=r"key_groups must be an \[N\] integer tensor with N=8"):
        group_coalition_attention(q, k, v, groups[:5], coalitions)
    with pytest.raises(ValueError, match=r"key_groups must be .* got torch.float32"):
        group_coalition_attention(q, k, v, groups.float(), coalitions)
    with pytest.raises(ValueError, match=r"coalitions must be a \[B, C, G\] bool tensor with B=2"):
        group_coalition_attention(q, k, v, groups, coalitions[:1])
    with pytest.raises(ValueError, match=r"coalitions must be .* got torch.int64"):
        group_coalition_attention(q, k, v, groups, coalitions.long())
    with pytest.raises(ValueError, match=r"expected q \[B, H, Q, Dh\]"):
        group_coalition_attention(q[:, None].expand(-1, 8, -1, -1, -1), k, v, groups, coalitions)


# ---------------------------------------------------------------------------------------------- the bridge
def test_bridge_defaults_to_the_kernel_and_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    bridge = FusionBridge(BridgeConfig(dim=64, n_queries=16, n_heads=2, n_layers=2, attn_top_k=20,
                                       dropout=0.0)).to(DEVICE)
    assert bridge.attention is kernel_attention
    tokens = torch.randn(3, 90, 64, device=DEVICE)  # [B, N, D]
    modality = _modality_of(90).to(DEVICE)
    mask = _modality_mask(3, 90).to(DEVICE)
    out = bridge(tokens, modality, mask)
    out.pooled.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in bridge.named_parameters() if p.grad is not None}
    bridge.zero_grad()
    with monkeypatch.context() as m:
        m.setenv(FORCE_REFERENCE_ENV, "1")
        ref = bridge(tokens, modality, mask)
        ref.pooled.square().sum().backward()
    torch.testing.assert_close(out.queries, ref.queries, **_tol(torch.float32))
    assert grads.keys() == {n for n, p in bridge.named_parameters() if p.grad is not None}
    for name, p in bridge.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=BRIDGE_GRAD_TOL, rtol=BRIDGE_GRAD_TOL, msg=name)


# ------------------------------------------------------------------------------------------------ dispatch
def test_force_reference_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, mask = _inputs(2, 2, 16, 40, 32, torch.float32, 3, "modality")
    assert use_triton(q)
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    assert not use_triton(q)
    assert torch.equal(attention(q, k, v, mask, 3), attention_reference(q, k, v, mask, 3))
    masks = _coalition_masks(2, 40)
    assert torch.equal(coalition_attention(q, k, v, masks), coalition_attention_reference(q, k, v, masks))
    groups, subsets = _modality_of(40).to(DEVICE), _all_subsets(2, 3)
    assert torch.equal(group_coalition_attention(q, k, v, groups, subsets, mask),
                       group_coalition_attention_reference(q, k, v, groups, subsets, mask))
    # only the reference takes what the kernel refuses: float64, Dh above MAX_HEAD_DIM, grad through coalitions
    assert attention(q.double(), k.double(), v.double(), mask).dtype == torch.float64
    wide = torch.zeros(1, 1, 4, MAX_HEAD_DIM + 8, device=DEVICE)
    assert attention(wide, wide, wide).shape == wide.shape
    assert coalition_attention(q.requires_grad_(), k, v, masks).requires_grad


# -------------------------------------------------------------------------------------------- input checks
def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


_Q, _KV = (2, 2, 4, 16), (2, 2, 8, 16)


@pytest.mark.parametrize(
    ("q", "k", "v", "mask", "top_k", "error", "match"),
    [
        (_t(2, 4, 16), _t(*_KV), _t(*_KV), None, None, ValueError, r"expected q \[B, H, Q, Dh\].*\(2, 4, 16\)"),
        (_t(*_Q), _t(*_KV), _t(2, 2, 9, 16), None, None, ValueError, r"k, v \[B, H, N, Dh\]"),
        (_t(*_Q), _t(2, 2, 8, 8), _t(2, 2, 8, 8), None, None, ValueError, r"share B=2, H=2 and Dh=8"),
        (_t(*_Q), _t(*_KV, dtype=torch.float16), _t(*_KV), None, None, TypeError, r"share one dtype"),
        (_t(*_Q, dtype=torch.int32), _t(*_KV), _t(*_KV), None, None, TypeError, r"floating-point.*int32"),
        (_t(*_Q, dtype=torch.float64), _t(*_KV, dtype=torch.float64), _t(*_KV, dtype=torch.float64), None, None,
         TypeError, r"take q, k, v in .* got torch.float64"),
        (_t(*_Q), _t(*_KV), _t(*_KV), _t(2, 8), None, TypeError, r"must be bool .* got dtype torch.float32"),
        (_t(*_Q), _t(*_KV), _t(*_KV), _t(2, 9, dtype=torch.bool), None, ValueError,
         r"\[B, N\] with B=2, N=8; got shape \(2, 9\)"),
        (_t(*_Q), _t(*_KV), _t(*_KV), None, 0, ValueError, r"top_k must be None or an int >= 1; got 0"),
        (_t(*_Q), _t(*_KV), _t(*_KV), None, True, ValueError, r"top_k must be None or an int >= 1; got True"),
        (_t(1, 1, 4, 160), _t(1, 1, 8, 160), _t(1, 1, 8, 160), None, None, ValueError,
         r"head widths up to Dh=128; got Dh=160"),
        (_t(2, 2, 16, 4).transpose(-1, -2), _t(*_KV), _t(*_KV), None, None, ValueError,
         r"q must be contiguous in its last \(head\) dimension"),
    ],
    ids=["q-rank", "kv-shapes", "head-dim", "dtypes-differ", "int", "float64", "mask-dtype", "mask-shape", "k0",
         "k-bool", "dh-too-wide", "strided-head-dim"],
)
def test_attention_rejects_bad_inputs(q, k, v, mask, top_k, error, match) -> None:
    with pytest.raises(error, match=match):
        attention(q, k, v, mask, top_k)


@pytest.mark.parametrize(
    ("q", "masks", "match"),
    [
        (_t(*_Q), _t(2, 8, dtype=torch.bool), r"masks must be \[B, C, N\] with B=2, N=8; got shape \(2, 8\)"),
        (_t(2, 3, 2, 4, 16), _t(2, 8, 8, dtype=torch.bool), r"one query set per mask: expected C=8; got C=3"),
    ],
    ids=["masks-rank", "per-mask-queries"],
)
def test_coalition_attention_rejects_bad_inputs(q, masks, match) -> None:
    with pytest.raises(ValueError, match=match):
        coalition_attention(q, _t(*_KV), _t(*_KV), masks)


def test_scores_use_one_over_sqrt_head_dim() -> None:
    """A closed form: two keys with raw scores 0 and sqrt(Dh) get weights 1 / (1 + e) and e / (1 + e)."""
    dh = 64
    q = torch.zeros(1, 1, 1, dh, device=DEVICE)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, dh, device=DEVICE)
    k[0, 0, 1, 0] = math.sqrt(dh)
    v = torch.zeros(1, 1, 2, dh, device=DEVICE)
    v[0, 0, 1, 0] = 1.0
    out = attention(q, k, v)
    torch.testing.assert_close(out[0, 0, 0, 0].item(), math.e / (1 + math.e), atol=FP32_TOL, rtol=FP32_TOL)
