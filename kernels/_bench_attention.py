"""Benchmark of the attention kernels (bf16) against torch SDPA and compiled FlexAttention, on one CUDA GPU.

B units · H heads · Q fusion queries · N modality tokens · Dh head width · C coalitions

``run(out_path, quick=False)`` times, side by side in one process, for each shape: the forward of
:func:`kernels.attention.attention`, of ``torch.nn.functional.scaled_dot_product_attention`` with the key padding
mask as a boolean ``attn_mask`` (default backend choice, and forced onto the memory-efficient backend), and of
``torch.compile(flex_attention)`` with a block mask built from the key padding mask (built once, outside the
timing); then forward + backward of the same four; then the 8 modality coalitions of every unit in one
:func:`kernels.attention.group_coalition_attention` call (and, for comparison, one
:func:`kernels.attention.coalition_attention` call with the same 8 masks key by key) against 8 separate
:func:`kernels.attention.attention` calls and 8 SDPA calls.

Timing: every method is timed twice. The ratios and TFLOP/s use medians of CUDA-graph replays
(``triton.testing.do_bench_cudagraph``) that cycle over 3 input sets, so no call finds the previous one's K/V
in L2 (K+V of every shape is at least 64 MiB) and the host's launch cost (Python validation and launch for
ours, the C++ dispatcher for SDPA) is left out for everyone. Beside them, ``triton.testing.do_bench`` medians
(CUDA events, L2 flushed before every call) keep the host cost where it outlasts the flush. FLOP counts are
dense (``4·B·H·Q·N·Dh`` forward, 2.5x that for the backward, as flash-attention counts); bytes are the dense
minimum (q, k, v, mask read once, the output written once), though our kernel skips the K/V rows of absent
modalities. The peaks they are compared with are measured here: a bf16 8192³ matmul and a 1 GiB
device-to-device copy.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels.attention import attention, attention_reference, coalition_attention, group_coalition_attention
from kernels.bench import geomean, run_info

#: (B, H, Q, N, Dh): the bridge's range of units, queries, tokens and head widths; K+V of every shape is at
#: least 64 MiB (above the H100's 50 MB L2). N = 577 and 200 are not multiples of any key block.
SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (1024, 8, 16, 64, 32),
    (512, 8, 16, 256, 32),
    (256, 8, 32, 577, 64),
    (128, 8, 64, 1024, 64),
    (64, 8, 32, 1024, 128),
    (256, 8, 64, 200, 128),
)
#: Input sets the graph-replay timings cycle through (replays do not flush L2 between calls).
ROTATION = 3
#: Shapes of a quick run.
QUICK_SHAPES = SHAPES[:2]
#: Modality token spans as fractions of N (vision, vibration, temperature).
SPANS = (0.5, 0.3)
#: Unit presence patterns, cycled over the batch: half the units have every modality, the rest miss one.
PRESENCE = ((True, True, True), (False, True, True), (True, True, True), (True, False, True),
            (True, True, True), (True, True, False))
#: Seconds after which the remaining fwd+bwd columns are skipped (the whole run must fit one device call);
#: the environment variable below overrides it.
TIME_BUDGET_S = 300.0
BUDGET_ENV = "INSPECTION_BENCH_BUDGET_S"
#: Targets of the op (geometric means of baseline_ms / ours_ms).
TARGETS = {"vs_sdpa": 2.0, "vs_flex": 1.0, "coalitions_vs_separate": 4.0}
GOALS = {"vs_sdpa": 3.0, "vs_flex": 1.2, "coalitions_vs_separate": 6.0}


def _median_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _graph_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _peak_mib(fn: Callable[[], object]) -> float:
    """Device memory a call allocates above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure_peaks() -> dict[str, float]:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: a @ b)
    src = torch.randn(2**28, device="cuda")  # 1 GiB float32
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * n**3 / mm_ms / 1e9, "copy_gbps": 2 * 2**30 / copy_ms / 1e6,
            "matmul_shape": f"{n}x{n}x{n} bf16", "copy_bytes": 2**30}


def _modality_of(n_keys: int) -> torch.Tensor:
    first, second = max(1, int(n_keys * SPANS[0])), max(1, int(n_keys * SPANS[1]))
    index = torch.full((n_keys,), 2, dtype=torch.long)
    index[:first] = 0
    index[first:first + second] = 1
    return index


def _inputs(b: int, h: int, n_q: int, n: int, dh: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, n_q, dh, device="cuda", generator=gen, dtype=torch.bfloat16)  # [B, H, Q, Dh]
    k = torch.randn(b, h, n, dh, device="cuda", generator=gen, dtype=torch.bfloat16)  # [B, H, N, Dh]
    v = torch.randn(b, h, n, dh, device="cuda", generator=gen, dtype=torch.bfloat16)  # [B, H, N, Dh]
    present = torch.tensor([PRESENCE[i % len(PRESENCE)] for i in range(b)], device="cuda")  # [B, 3]
    mask = ~present[:, _modality_of(n).cuda()]  # [B, N] True = absent
    return q, k, v, mask


def _coalition_subsets(b: int) -> torch.Tensor:
    """``[B, 8, 3]`` bool: every subset of the 3 modalities (True = member), the empty one first."""
    present = torch.tensor([[(c >> m) & 1 for m in range(3)] for c in range(8)], device="cuda").bool()  # [8, 3]
    return present[None].expand(b, -1, -1).contiguous()


def _coalition_masks(b: int, n: int) -> torch.Tensor:
    """``[B, 8, N]`` bool (True = hidden): the keys each subset of :func:`_coalition_subsets` hides."""
    return ~_coalition_subsets(b)[:, :, _modality_of(n).cuda()]


def _methods(q, k, v, mask) -> dict[str, Callable[..., torch.Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, _, n_q, _ = q.shape
    n = k.shape[2]
    keep = ~mask  # [B, N] True = attend
    sdpa_mask = keep[:, None, None, :]  # [B, 1, 1, N]

    def mask_mod(bi, hi, qi, ki):
        return keep[bi, ki]

    block_mask = create_block_mask(mask_mod, b, None, n_q, n, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def sdpa_efficient(q, k, v):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)

    return {
        "ours": lambda q, k, v: attention(q, k, v, mask),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
        "sdpa_efficient": sdpa_efficient,
        "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
    }


def _rotating(fn: Callable[..., object], sets: list[tuple]) -> Callable[[], object]:
    """``fn`` over the input sets in turn: graph replays, which do not flush L2, then stream K/V from memory."""
    turn = itertools.count()
    return lambda: fn(*sets[next(turn) % len(sets)])


def _error(exc: Exception) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def _shape_row(shape, peaks, forward: bool, fwd_bwd: bool) -> dict:
    """Forward and/or fwd+bwd timings of every method at one shape."""
    b, h, n_q, n, dh = shape
    sets = [_inputs(b, h, n_q, n, dh, seed=s) for s in range(ROTATION)]
    q, k, v, mask = sets[0]
    methods = _methods(q, k, v, mask)  # one mask for every set (the block mask is built once)
    flops = 4 * b * h * n_q * n * dh
    dense_bytes = 2 * (2 * b * h * n_q * dh + 2 * b * h * n * dh) + b * n  # q, o, k, v bf16 + mask
    row: dict = {"B": b, "H": h, "Q": n_q, "N": n, "Dh": dh, "forward": {}, "fwd_bwd": {}}
    if forward:
        with torch.no_grad():
            want = attention_reference(q, k, v, mask).float()  # float32 arithmetic on the bf16 inputs
            for name, fn in methods.items():
                try:
                    err = float((fn(q, k, v).float() - want).norm() / want.norm())
                    ms = _median_ms(lambda fn=fn: fn(q, k, v))
                    graph = _graph_ms(_rotating(fn, [t[:3] for t in sets]))
                    row["forward"][name] = {
                        "ms": ms, "graph_ms": graph,
                        "tflops": flops / graph / 1e9,
                        "pct_peak": 100 * flops / graph / 1e9 / peaks["bf16_matmul_tflops"],
                        "gbps_dense": dense_bytes / graph / 1e6,
                        "pct_copy_bw": 100 * dense_bytes / graph / 1e6 / peaks["copy_gbps"],
                        "peak_mib": _peak_mib(lambda fn=fn: fn(q, k, v)), "rel_err_vs_fp32": err,
                    }
                except Exception as exc:  # a baseline that cannot run this shape is reported, not fatal
                    row["forward"][name] = _error(exc)
            del want
    if fwd_bwd:
        leaf_sets = [tuple(t.detach().clone().requires_grad_() for t in s[:3]) for s in sets]
        leaves = [t for s in leaf_sets for t in s]
        grad = torch.randn_like(q)
        total = 3.5 * flops
        for name, fn in methods.items():
            def step(*qkv, fn=fn):
                fn(*qkv).backward(grad)

            try:
                step(*leaf_sets[0])
                ms = _median_ms(lambda step=step: step(*leaf_sets[0]), grad_to_none=leaves)
                graph = float(triton.testing.do_bench_cudagraph(_rotating(step, leaf_sets), rep=100,
                                                                grad_to_none=leaves, return_mode="median"))
                row["fwd_bwd"][name] = {"ms": ms, "graph_ms": graph, "tflops": total / graph / 1e9,
                                        "pct_peak": 100 * total / graph / 1e9 / peaks["bf16_matmul_tflops"],
                                        "peak_mib": _peak_mib(lambda step=step: step(*leaf_sets[0]))}
            except Exception as exc:
                row["fwd_bwd"][name] = _error(exc)
            for t in leaves:
                t.grad = None
    for part in ("forward", "fwd_bwd"):
        ours = row[part].get("ours", {})
        for name, rec in row[part].items():
            if name != "ours" and "graph_ms" in rec and "graph_ms" in ours:
                rec["ratio_vs_ours"] = rec["graph_ms"] / ours["graph_ms"]  # GPU time, graph replays
                rec["events_ratio_vs_ours"] = rec["ms"] / ours["ms"]  # do_bench events, host cost included
    return row


def _coalition_row(shape, peaks) -> dict:
    """The 8 modality coalitions of every unit: one group_coalition_attention call (ours) and one
    coalition_attention call (the same 8 masks given key by key) against 8 attention calls and 8 SDPA calls."""
    b, h, n_q, n, dh = shape
    sets = [_inputs(b, h, n_q, n, dh, seed=10 + s)[:3] for s in range(ROTATION)]
    q, k, v = sets[0]
    masks = _coalition_masks(b, n)  # [B, 8, N]
    groups = _modality_of(n).cuda()  # [N]
    subsets = _coalition_subsets(b)  # [B, 8, 3]
    keeps = [(~masks[:, c])[:, None, None, :] for c in range(8)]

    def groups_call(q, k, v):
        return group_coalition_attention(q, k, v, groups, subsets)

    def one_call(q, k, v):
        return coalition_attention(q, k, v, masks)

    def separate(q, k, v):
        return [attention(q, k, v, masks[:, c]) for c in range(8)]

    def sdpa_separate(q, k, v):
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=keeps[c]) for c in range(8)]

    flops = 8 * 4 * b * h * n_q * n * dh  # the 8 masked attentions counted densely, as 8 calls would run them
    row: dict = {"B": b, "H": h, "Q": n_q, "N": n, "Dh": dh, "C": 8}
    with torch.no_grad():
        apart = separate(q, k, v)
        for name, fn in (("groups", groups_call), ("one_call", one_call)):
            got = fn(q, k, v)
            row[f"{name}_max_abs_diff_vs_separate"] = max(float((got[:, c].float() - o.float()).abs().max())
                                                          for c, o in enumerate(apart))
            del got
        del apart
        for name, fn in (("groups", groups_call), ("one_call", one_call), ("separate", separate),
                         ("sdpa_separate", sdpa_separate)):
            try:
                timed = {f"{name}_ms": _median_ms(lambda fn=fn: fn(q, k, v)),
                         f"{name}_graph_ms": _graph_ms(_rotating(fn, sets)),
                         f"{name}_peak_mib": _peak_mib(lambda fn=fn: fn(q, k, v))}
                row.update(timed)
            except Exception as exc:
                row[name] = _error(exc)
    if "groups_graph_ms" in row:
        row["groups_tflops"] = flops / row["groups_graph_ms"] / 1e9  # dense-equivalent rate
        row["groups_pct_peak"] = 100 * row["groups_tflops"] / peaks["bf16_matmul_tflops"]
        for base in ("separate", "sdpa_separate"):
            if f"{base}_graph_ms" in row:
                row[f"ratio_vs_{base}"] = row[f"{base}_ms"] / row["groups_ms"]
                row[f"graph_ratio_vs_{base}"] = row[f"{base}_graph_ms"] / row["groups_graph_ms"]
    if "one_call_graph_ms" in row and "separate_graph_ms" in row:
        row["masks_ratio_vs_separate"] = row["separate_ms"] / row["one_call_ms"]
        row["masks_graph_ratio_vs_separate"] = row["separate_graph_ms"] / row["one_call_graph_ms"]
    return row


def _summary(shapes: list[dict], coalitions: list[dict]) -> dict:
    def ratio(part: str, name: str) -> float | None:
        return geomean([r[part].get(name, {}).get("ratio_vs_ours") for r in shapes])

    def events(part: str, name: str) -> float | None:
        return geomean([r[part].get(name, {}).get("events_ratio_vs_ours") for r in shapes])

    summary = {
        "vs_sdpa": ratio("forward", "sdpa"),
        "vs_sdpa_efficient": ratio("forward", "sdpa_efficient"),
        "vs_flex": ratio("forward", "flex"),
        "vs_sdpa_events": events("forward", "sdpa"),
        "vs_flex_events": events("forward", "flex"),
        "fwd_bwd_vs_sdpa": ratio("fwd_bwd", "sdpa"),
        "fwd_bwd_vs_sdpa_efficient": ratio("fwd_bwd", "sdpa_efficient"),
        "fwd_bwd_vs_flex": ratio("fwd_bwd", "flex"),
        "fwd_bwd_vs_sdpa_events": events("fwd_bwd", "sdpa"),
        "fwd_bwd_vs_flex_events": events("fwd_bwd", "flex"),
        # GPU time only (graph replays): the 8 separate calls' host launch cost is not counted in our favour
        "coalitions_vs_separate": geomean([c.get("graph_ratio_vs_separate") for c in coalitions]),
        "coalitions_vs_separate_events": geomean([c.get("ratio_vs_separate") for c in coalitions]),
        "coalitions_vs_sdpa_separate": geomean([c.get("graph_ratio_vs_sdpa_separate") for c in coalitions]),
        # the same 8 masks given key by key (coalition_attention), for comparison
        "coalitions_masks_vs_separate": geomean([c.get("masks_graph_ratio_vs_separate") for c in coalitions]),
        "targets": TARGETS,
        "goals": GOALS,
    }
    summary["met"] = {k: summary[k] is not None and summary[k] >= t for k, t in TARGETS.items()}
    return summary


def run(out_path: str, quick: bool = False) -> dict:
    """Time the attention kernels against SDPA and FlexAttention and write the results as JSON.

    Args:
        out_path: JSON file to write (its folder is created); rewritten after every shape, so a run cut short
            still leaves the shapes it finished.
        quick: time only :data:`QUICK_SHAPES` and skip the fwd+bwd columns.

    Returns:
        ``{"machine", "commit", "command", "date", "torch", "triton", "peaks", "shapes", "coalitions",
        "summary"}``; ``summary`` holds ``vs_sdpa``, ``vs_flex`` (geometric means of baseline_ms / ours_ms over
        the shapes, forward), their fwd+bwd counterparts and ``coalitions_vs_separate``.

    Raises:
        RuntimeError: no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark needs a CUDA device; none is available")
    start = time.monotonic()
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = 64  # one compiled flex graph per shape and per fwd / fwd+bwd
    else:
        dynamo.cache_size_limit = 64
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = run_info()
    result = {
        **info,
        "timing": "bf16. ratios and TFLOP/s: medians of CUDA-graph replays cycling over 3 input sets (GPU time, "
                  "no host launch cost, no L2 reuse between calls: K+V of each shape >= 64 MiB); beside them "
                  "(ms, *_events) triton.testing.do_bench medians (CUDA events, L2 flushed before each call, "
                  "host launch cost included where it exceeds the flush)",
        "peaks": _measure_peaks(),
        "shapes": [],
        "coalitions": [],
    }
    torch.cuda.empty_cache()
    shapes = QUICK_SHAPES if quick else SHAPES
    budget = float(os.environ.get(BUDGET_ENV, TIME_BUDGET_S))

    def save() -> None:
        result["summary"] = {**_summary(result["shapes"], result["coalitions"]), **info}
        out.write_text(json.dumps(result, indent=2))

    # forward and coalitions first (the targets), then fwd+bwd while the time budget lasts
    for shape in shapes:
        result["shapes"].append(_shape_row(shape, result["peaks"], forward=True, fwd_bwd=False))
        save()
        torch.cuda.empty_cache()
    for shape in shapes:
        result["coalitions"].append(_coalition_row(shape, result["peaks"]))
        save()
        torch.cuda.empty_cache()
    for row, shape in zip(result["shapes"], shapes, strict=True):
        if quick or time.monotonic() - start > budget:
            break
        row["fwd_bwd"] = _shape_row(shape, result["peaks"], forward=False, fwd_bwd=True)["fwd_bwd"]
        save()
        torch.cuda.empty_cache()
    result["elapsed_s"] = time.monotonic() - start
    out.write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    """The benchmark as text tables (forward, fwd+bwd, coalitions, summary)."""
    lines = [f"{result['machine']} · torch {result['torch']} · triton {result['triton']} · {result['date']} · "
             f"peaks: {result['peaks']['bf16_matmul_tflops']:.0f} TFLOP/s bf16, "
             f"{result['peaks']['copy_gbps']:.0f} GB/s copy"]
    for part in ("forward", "fwd_bwd"):
        key = "graph_ms"
        lines.append(f"\n{part} (graph replays): ms (TFLOP/s, % bf16 peak; peak MiB) · speedup of ours")
        lines.append("B     H  Q   N     Dh | ours                    | sdpa      | sdpa_eff  | flex      | "
                     "x sdpa  x eff  x flex")
        for r in result["shapes"]:
            recs = r[part]
            if not recs:
                continue
            o = recs["ours"]
            if key not in o:
                lines.append(f"B{r['B']} Q{r['Q']} N{r['N']} Dh{r['Dh']}: ours failed: {o.get('error')}")
                continue
            names = ("sdpa", "sdpa_efficient", "flex")
            cells = [f"{recs[m][key]:.3f}" if key in recs.get(m, {}) else "err" for m in names]
            ratios = [f"{recs[m]['ratio_vs_ours']:.2f}" if "ratio_vs_ours" in recs.get(m, {}) else "-"
                      for m in names]
            lines.append(f"{r['B']:<5} {r['H']:<2} {r['Q']:<3} {r['N']:<5} {r['Dh']:<3}| "
                         f"{o[key]:.3f} ({o['tflops']:.0f}, {o['pct_peak']:.0f}%; {o['peak_mib']:.0f})".ljust(24) +
                         f" | {cells[0]:<9} | {cells[1]:<9} | {cells[2]:<9} | {ratios[0]:<7} {ratios[1]:<6} "
                         f"{ratios[2]}")
    lines.append("\ncoalitions (8 subsets of 3 modalities), graph-replay ms: groups (ours) | masks | "
                 "8 calls of ours | 8 SDPA calls (events ms)")
    nan = float("nan")
    for c in result["coalitions"]:
        if "graph_ratio_vs_separate" not in c:
            lines.append(f"B{c['B']} Q{c['Q']} N{c['N']} Dh{c['Dh']}: failed {c}")
            continue
        lines.append(f"B{c['B']} Q{c['Q']} N{c['N']} Dh{c['Dh']}: {c['groups_graph_ms']:.3f} | "
                     f"{c.get('one_call_graph_ms', nan):.3f} ({c.get('masks_graph_ratio_vs_separate', nan):.2f}x) | "
                     f"{c['separate_graph_ms']:.3f} ({c['graph_ratio_vs_separate']:.2f}x) | "
                     f"{c.get('sdpa_separate_graph_ms', nan):.3f} "
                     f"({c.get('graph_ratio_vs_sdpa_separate', nan):.2f}x)  "
                     f"(events {c['groups_ms']:.3f} vs {c['separate_ms']:.3f}, {c['ratio_vs_separate']:.2f}x)")
    s = result.get("summary", {})
    lines.append("\nsummary: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)))
    return "\n".join(lines)
