"""Benchmark of the fused MoE expert FFN (:func:`kernels.moe.expert_ffn`) against the usual alternatives.

Shapes: T tokens · D width · H expert hidden · E experts · K top-k · A = T*K assignments

Forward pass, bfloat16, timed side by side in one process with ``triton.testing.do_bench`` (CUDA events,
median of repeated calls after warm-up) on random (never zero) inputs:

* ``naive``: a per-expert Python loop in bfloat16 (one sort and one host read of the counts, then per expert:
  gather, three matmuls, SiLU-mul, weighting, in-place ``index_add_``), :func:`naive_moe`;
* ``grouped_mm`` and ``grouped_mm_compiled``: sort by expert, then ``torch._grouped_mm`` for the gate/up
  projection (weights pre-stacked to ``[E, D, 2H]`` outside the timing) and for the down projection, SiLU-mul,
  weighting and ``index_add_``; eager and under ``torch.compile``;
* ``liger``: Liger-Kernel's ``LigerFusedMoEFunction`` (liger-kernel 0.8.5, weights pre-laid-out as it expects,
  outside the timing), pinned to its single built-in tile config (``LIGER_FUSED_MOE_AUTOTUNE=0``: its autotuner
  would try 32 configs per kernel and shape, minutes per shape); null when the package is missing;
* ``dense``: two dense cuBLAS GEMMs of the same flop count (``[A, D] @ [D, 2H]`` and ``[A, H] @ [H, D]``),
  the upper bound for a grouped computation that moves no rows;
* ``ours``: :func:`kernels.moe.expert_ffn`.

``fwd_bwd`` times forward + backward (every gradient, the routing weights' too) of naive, grouped_mm, Liger
and ours on two large shapes, for training; it is not part of the forward summary.

Per shape it records the milliseconds (``ms``: do_bench's median, which flushes the L2 cache before each
call; ``wall_ms``: host time per call over 20 back-to-back calls), ``ratio_vs_<baseline> = baseline_ms / ours_ms``, TFLOP/s
(``6 * A * D * H`` flops), the share of the measured bf16 dense peak (an 8192^3 matmul), the peak memory of each method
(``torch.cuda.max_memory_allocated`` over one call after a reset) and its working memory (that peak minus what
was allocated before the call, so resident inputs and pre-laid-out weights do not count; the summary's memory
ratio uses it) and each method's error against the float32 reference.
:func:`sweep` times tile candidates of the two forward GEMMs; its results justify the table in
:mod:`kernels.moe`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from kernels.bench import geomean, run_info

#: (T, D, H, E, K): the model's range (T = 1k-32k tokens, D = 256-1024, E = 16-64, K = 2-4) and the published
#: DeepSeek-style record shape (E = 128, D = 2048, H = 768, K = 8, T = 32768).
SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (1024, 256, 256, 16, 2),
    (4096, 512, 512, 32, 2),
    (8192, 256, 256, 16, 2),
    (16384, 512, 256, 64, 4),
    (16384, 1024, 512, 32, 2),
    (32768, 1024, 512, 64, 4),
    (32768, 2048, 768, 128, 8),
)
QUICK_SHAPES = ((4096, 512, 512, 32, 2), (16384, 1024, 512, 32, 2))
#: Shapes that enter the summary's geometric means: T >= this many tokens.
SUMMARY_MIN_TOKENS = 8192
BASELINES = ("naive", "grouped_mm", "grouped_mm_compiled", "liger", "dense")


def _bench(fn: Callable[[], object], quick: bool) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                         return_mode="median"))


def _peak_memory(fn: Callable[[], object]) -> tuple[int, int]:
    """``torch.cuda.max_memory_allocated`` over one call after a reset, and that minus what was allocated
    before the call (the call's working memory: resident inputs and pre-laid-out weights excluded), in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return int(peak), int(peak - before)


def _working_memory(fn: Callable[[], object]) -> int:
    return _peak_memory(fn)[1]


def _wall_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Host wall time per call over back-to-back calls (no cache flush between them), in ms: where it is well
    above the do_bench time the method is bound by its launches and host syncs, not by the GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def naive_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
              w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The per-expert loop most code starts from: gather, three matmuls, weight, ``index_add_``."""
    n_tokens, top_k = indices.shape
    flat = indices.reshape(-1)  # [A]
    order = torch.argsort(flat, stable=True)  # [A]
    counts = torch.bincount(flat, minlength=w_gate.shape[0]).tolist()  # one host sync
    tokens = order // top_k  # [A]
    w_sorted = weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # [A, 1]
    out = torch.zeros_like(x)  # [T, D]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens[start:start + n]  # [n_e]
        xe = x[tok]  # [n_e, D]
        h = F.silu(xe @ w_gate[e]) * (xe @ w_up[e])  # [n_e, H]
        out.index_add_(0, tok, (h @ w_down[e]) * w_sorted[start:start + n])
        start += n
    return out


def grouped_mm_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """Sort by expert, ``torch._grouped_mm`` twice, SiLU-mul, weight, ``index_add_`` (the torchtitan recipe)."""
    n_tokens, top_k = indices.shape
    n_experts, _, two_h = w_gate_up.shape
    hidden = two_h // 2
    flat = indices.reshape(-1)  # [A]
    order = torch.argsort(flat, stable=True)  # [A]
    counts = torch.histc(flat.float(), bins=n_experts, min=0, max=n_experts)  # [E] no host sync
    offs = torch.cumsum(counts, dim=0).to(torch.int32)  # [E]
    tokens = order // top_k  # [A]
    gate_up = torch._grouped_mm(x[tokens], w_gate_up, offs=offs)  # [A, 2H]
    h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]  # [A, H]
    y = torch._grouped_mm(h, w_down, offs=offs)  # [A, D]
    y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)  # [A, D]
    return torch.zeros_like(x).index_add_(0, tokens, y)  # [T, D]


def _load_liger() -> tuple[Callable | None, str | None]:
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"{type(exc).__name__}: {exc}"
    return LigerFusedMoEFunction.apply, None


def _inputs(n_tokens: int, dim: int, hidden: int, n_experts: int, top_k: int, seed: int = 0):
    from kernels.contracts import Routing

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n_tokens, dim, generator=gen, device="cuda").bfloat16()
    w_gate = (torch.randn(n_experts, dim, hidden, generator=gen, device="cuda") / dim**0.5).bfloat16()
    w_up = (torch.randn(n_experts, dim, hidden, generator=gen, device="cuda") / dim**0.5).bfloat16()
    w_down = (torch.randn(n_experts, hidden, dim, generator=gen, device="cuda") / hidden**0.5).bfloat16()
    logits = torch.randn(n_tokens, n_experts, generator=gen, device="cuda")
    scores = logits.sigmoid()  # [T, E]; top-k of the scores, weights renormalised (the model's sigmoid router)
    weights, indices = scores.topk(top_k, dim=-1)
    routing = Routing(weights=weights / weights.sum(-1, keepdim=True), indices=indices, scores=scores)
    return x, routing, w_gate, w_up, w_down


def dense_peak_tflops(quick: bool = False) -> float:
    """bf16 TFLOP/s of one large cuBLAS matmul (8192^3) on random data: the measured matrix peak."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b, quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_shape(shape: tuple[int, int, int, int, int], peak: float, quick: bool, liger: Callable | None,
                compiled: Callable) -> dict:
    """Time every method on one shape; see the module docstring for what each entry means."""
    from kernels.moe import expert_ffn, expert_ffn_reference

    n_tokens, dim, hidden, n_experts, top_k = shape
    n_assign = n_tokens * top_k
    flops = 6.0 * n_assign * dim * hidden
    x, routing, w_gate, w_up, w_down = _inputs(*shape)
    w_gate_up = torch.cat([w_gate, w_up], dim=2).contiguous()  # [E, D, 2H] for grouped_mm
    liger_gate_up = w_gate_up.transpose(1, 2).contiguous()  # [E, 2H, D]
    liger_down = w_down.transpose(1, 2).contiguous()  # [E, D, H]
    liger_index = routing.indices.to(torch.int32)
    dense_a = torch.randn(n_assign, dim, device="cuda", dtype=torch.bfloat16)
    dense_w1 = torch.randn(dim, 2 * hidden, device="cuda", dtype=torch.bfloat16) / dim**0.5
    dense_h = torch.randn(n_assign, hidden, device="cuda", dtype=torch.bfloat16)
    dense_w2 = torch.randn(hidden, dim, device="cuda", dtype=torch.bfloat16) / hidden**0.5

    methods: dict[str, Callable[[], torch.Tensor] | None] = {
        "naive": lambda: naive_moe(x, routing.indices, routing.weights, w_gate, w_up, w_down),
        "grouped_mm": lambda: grouped_mm_moe(x, routing.indices, routing.weights, w_gate_up, w_down),
        "grouped_mm_compiled": lambda: compiled(x, routing.indices, routing.weights, w_gate_up, w_down),
        "liger": (lambda: liger(x, liger_gate_up, liger_down, liger_index, routing.weights)) if liger else None,
        "dense": lambda: (dense_a @ dense_w1, dense_h @ dense_w2),
        "ours": lambda: expert_ffn(x, routing, w_gate, w_up, w_down),
    }
    with torch.no_grad():
        want = expert_ffn_reference(x, routing, w_gate, w_up, w_down)  # float32 from the bf16 values
    row: dict = {"T": n_tokens, "D": dim, "H": hidden, "E": n_experts, "K": top_k, "gflop": flops / 1e9,
                 "ms": {}, "wall_ms": {}, "tflops": {}, "pct_of_dense_peak": {}, "working_memory_mb": {}, "peak_memory_mb": {},
                 "rel_err": {},
                 "errors": {}}
    for name, fn in methods.items():
        if fn is None:
            row["ms"][name] = None
            row["errors"][name] = "not available"
            continue
        try:
            with torch.no_grad():
                out = fn()  # warm (compiles)
                if name != "dense":
                    row["rel_err"][name] = _rel_err(out, want)
                del out
                ms = _bench(fn, quick)
                wall = _wall_ms(fn)
                peak_bytes, mem = _peak_memory(fn)
        except Exception as exc:  # noqa: BLE001 - a failing baseline is recorded, not fatal
            row["ms"][name] = None
            row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        row["ms"][name] = ms
        row["wall_ms"][name] = wall
        row["tflops"][name] = flops / (ms * 1e-3) / 1e12
        row["pct_of_dense_peak"][name] = 100.0 * row["tflops"][name] / peak
        row["working_memory_mb"][name] = mem / 2**20
        row["peak_memory_mb"][name] = peak_bytes / 2**20
    ours = row["ms"].get("ours")
    row["ratio_ours_vs"] = {b: (row["ms"][b] / ours if ours and row["ms"].get(b) else None) for b in BASELINES}
    mem_ours, mem_gmm = row["working_memory_mb"].get("ours"), row["working_memory_mb"].get("grouped_mm")
    row["memory_ours_vs_grouped_mm"] = mem_ours / mem_gmm if mem_ours and mem_gmm else None
    if not row["errors"]:
        del row["errors"]
    return row


#: Shapes of the forward + backward timing (training; informative, not part of the forward summary).
FWD_BWD_SHAPES = ((16384, 1024, 512, 32, 2), (32768, 2048, 768, 128, 8))


def bench_fwd_bwd(shape: tuple[int, int, int, int, int], quick: bool, liger: Callable | None) -> dict:
    """Forward + backward (gradients for x, the weights and the routing weights) of naive, grouped_mm, Liger
    and ours, each with its weights as leaves in its own layout."""
    from kernels.contracts import Routing
    from kernels.moe import expert_ffn

    x0, routing, w_gate0, w_up0, w_down0 = _inputs(*shape, seed=1)
    grad = torch.randn_like(x0)

    def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.detach().clone().requires_grad_(True) for t in tensors]

    ours = leaves(x0, w_gate0, w_up0, w_down0, routing.weights)
    naive = leaves(x0, w_gate0, w_up0, w_down0, routing.weights)
    gmm = leaves(x0, torch.cat([w_gate0, w_up0], dim=2), w_down0, routing.weights)
    lig = leaves(x0, torch.cat([w_gate0, w_up0], dim=2).transpose(1, 2), w_down0.transpose(1, 2), routing.weights)
    index32 = routing.indices.to(torch.int32)
    methods = {
        "naive": (naive, lambda: naive_moe(naive[0], routing.indices, naive[4], *naive[1:4])),
        "grouped_mm": (gmm, lambda: grouped_mm_moe(gmm[0], routing.indices, gmm[3], gmm[1], gmm[2])),
        "liger": (lig, (lambda: liger(lig[0], lig[1], lig[2], index32, lig[3])) if liger else None),
        "ours": (ours, lambda: expert_ffn(ours[0], Routing(weights=ours[4], indices=routing.indices,
                                                            scores=routing.scores), *ours[1:4])),
    }
    row: dict = {"T": shape[0], "D": shape[1], "H": shape[2], "E": shape[3], "K": shape[4], "ms": {},
                 "working_memory_mb": {}}
    for name, (params, fn) in methods.items():
        if fn is None:
            row["ms"][name] = None
            continue
        step = functools.partial(lambda f: f().backward(grad), fn)
        try:
            step()
            row["ms"][name] = float(triton.testing.do_bench(
                step, warmup=10 if quick else 25, rep=40 if quick else 100, grad_to_none=params,
                return_mode="median"))
            for p in params:
                p.grad = None
            row["working_memory_mb"][name] = _working_memory(step) / 2**20
        except Exception as exc:  # a failing baseline is recorded, not fatal
            row["ms"][name] = None
            row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    ours_ms = row["ms"].get("ours")
    row["ratio_ours_vs"] = {b: (row["ms"][b] / ours_ms if ours_ms and row["ms"].get(b) else None)
                            for b in ("naive", "grouped_mm", "liger")}
    return row


def run(out_path: str, quick: bool = False) -> dict:
    """Benchmark every method on every shape and write the results as JSON.

    Args:
        out_path: where the JSON goes (its folder is created).
        quick: two shapes and shorter timing windows.

    Returns:
        ``{"shapes": [...], "summary": {...}, "dense_peak_tflops": ...}``; ``summary`` holds ``vs_naive``,
        ``vs_grouped_mm``, ``vs_grouped_mm_compiled``, ``vs_liger`` and ``vs_dense`` (geometric means over
        the shapes with T >= 8192 of baseline_ms / ours_ms), ``peak_mem_vs_grouped_mm`` (geometric mean of
        ours / grouped_mm working memory over the same shapes), ``machine``, ``commit``, ``command``, ``date``.

    Raises:
        RuntimeError: no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the MoE benchmark needs a CUDA device; none is available")
    torch.manual_seed(0)
    peak = dense_peak_tflops(quick)
    liger, liger_error = _load_liger()
    compiled = torch.compile(grouped_mm_moe)
    rows: list[dict] = []
    training: list[dict] = []

    def save() -> dict:
        result = _result(rows, training, peak, liger_error)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as fh:  # after every shape: a cut-short run still leaves its numbers
            json.dump(result, fh, indent=2)
        return result

    for shape in QUICK_SHAPES if quick else SHAPES:
        rows.append(bench_shape(shape, peak, quick, liger, compiled))
        save()
    for shape in FWD_BWD_SHAPES[:1] if quick else FWD_BWD_SHAPES:
        training.append(bench_fwd_bwd(shape, quick, liger))
    return save()


def _result(rows: list[dict], training: list[dict], peak: float, liger_error: str | None) -> dict:
    big = [r for r in rows if r["T"] >= SUMMARY_MIN_TOKENS]
    summary = {f"vs_{b}": geomean([r["ratio_ours_vs"][b] for r in big]) for b in BASELINES}
    summary["peak_mem_vs_grouped_mm"] = geomean([r["memory_ours_vs_grouped_mm"] for r in big])
    summary.update(run_info())
    summary.update(
        summary_shapes=f"T >= {SUMMARY_MIN_TOKENS}",
        timing="forward, bf16, triton.testing.do_bench median (CUDA events, L2 flushed before each call); "
               "ratio = baseline_ms / ours_ms",
        memory="working memory: max_memory_allocated over one call after a reset, minus memory allocated "
               "before it",
        liger_config="LIGER_FUSED_MOE_AUTOTUNE=" + os.environ.get("LIGER_FUSED_MOE_AUTOTUNE", ""),
    )
    if liger_error:
        summary["liger_unavailable"] = liger_error
    return {"summary": summary, "dense_peak_tflops": peak, "shapes": rows, "fwd_bwd": training}


#: Shapes of the tile sweep: a launch-sized model shape, a mid-size one and the record shape.
SWEEP_SHAPES = ((8192, 256, 256, 16, 2), (16384, 512, 256, 64, 4), (32768, 2048, 768, 128, 8))


def sweep(out_path: str, quick: bool = False,
          shapes: tuple[tuple[int, int, int, int, int], ...] = SWEEP_SHAPES) -> dict:
    """Time the forward pass with candidate tiles for the gate/up and the down GEMM (one varied at a time).

    Args:
        out_path: where the JSON goes.
        quick: fewer candidates.
        shapes: (T, D, H, E, K) to sweep.

    Returns:
        ``{shape: {"gate_up": {config: ms}, "down": {config: ms}}}``.
    """
    from dataclasses import replace

    from kernels.moe import _HOPPER_16BIT, GemmTiles, _forward
    from kernels.routing import _block_plan_triton

    gate_up = {64: [(64, 64, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4), (64, 64, 8, 4)],
               128: [(64, 64, 8, 4), (64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3)]}
    down = {64: [(128, 64, 4, 4), (128, 64, 4, 3), (256, 64, 8, 3), (64, 64, 4, 4)],
            128: [(128, 64, 8, 4), (128, 64, 8, 3), (256, 64, 8, 3), (64, 64, 8, 4)]}
    out: dict = {}
    for shape in shapes:
        x, routing, w_gate, w_up, w_down = _inputs(*shape)
        res: dict = {}
        for block_m in (64, 128):
            base = _HOPPER_16BIT[block_m]
            plan = _block_plan_triton(routing.indices, shape[3], block_m)
            for kind, cands in (("gate_up", gate_up[block_m]), ("down", down[block_m])):
                for cand in cands[: 2 if quick else None]:
                    tiles = replace(base, **{kind: GemmTiles(*cand)})
                    key = f"{kind} BM={block_m} BN={cand[0]} BK={cand[1]} warps={cand[2]} stages={cand[3]}"
                    fn = functools.partial(_forward, x, routing.weights, w_gate, w_up, w_down, plan, tiles,
                                           x.dtype, False)
                    try:
                        with torch.no_grad():
                            res[key] = _bench(fn, quick)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is recorded
                        res[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out["T={} D={} H={} E={} K={}".format(*shape)] = res
        with open(out_path, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def format_table(result: dict) -> str:
    cols = ("naive", "grouped_mm", "grouped_mm_compiled", "liger", "dense", "ours")
    lines = ["T      D    H    E   K  | " + " | ".join(f"{c[:12]:>12s}" for c in cols)
             + " | ours TF/s  %peak  mem/gmm  wall ours/gmm"]
    for r in result["shapes"]:
        ms = " | ".join(f"{r['ms'][c]:12.3f}" if r["ms"].get(c) else f"{'-':>12s}" for c in cols)
        mem = r.get("memory_ours_vs_grouped_mm")
        lines.append(f"{r['T']:<6d} {r['D']:<4d} {r['H']:<4d} {r['E']:<3d} {r['K']:<2d} | {ms} | "
                     f"{r['tflops'].get('ours', 0):9.1f} {r['pct_of_dense_peak'].get('ours', 0):6.1f} "
                     f"{mem if mem else float('nan'):8.2f}  {r['wall_ms'].get('ours', 0):.3f}/"
                     f"{r['wall_ms'].get('grouped_mm', 0):.3f}")
    for r in result.get("fwd_bwd", []):
        lines.append(f"fwd+bwd T={r['T']} D={r['D']} H={r['H']} E={r['E']} K={r['K']}: "
                     + ", ".join(f"{k} {v:.3f} ms" for k, v in r["ms"].items() if v) + f" {r.get('errors', '')}")
    lines.append(json.dumps({k: v for k, v in result["summary"].items()}, indent=1))
    return "\n".join(lines)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "kernels_moe.json"
    if "--sweep" in sys.argv:
        picked = tuple(tuple(int(v) for v in a.split("=", 1)[1].split(",")) for a in sys.argv
                       if a.startswith("--shape="))
        print(json.dumps(sweep(target, quick="--quick" in sys.argv, shapes=picked or SWEEP_SHAPES), indent=1))
    else:
        print(format_table(run(target, quick="--quick" in sys.argv)))
