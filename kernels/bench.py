"""Kernel benchmarks on a CUDA device: ours against the baselines, side by side in one process.

    python -m kernels.bench                       # both, full shape sweep -> bench/results/kernels_*.json
    python -m kernels.bench --only moe --quick    # a short sweep of one op (smoke run)

Each op's module (``kernels._bench_moe``, ``kernels._bench_attention``) times every method on the same inputs
with CUDA-synchronised repeats and reports medians, ratios (baseline time / our time), TFLOP/s, the share of the
measured bf16 matmul peak and the peak GPU memory, and writes one JSON file whose top-level ``summary`` holds
the headline ratios. The commit recorded is ``$INSPECTION_COMMIT`` when set (a copy of the tree without git
history), else ``git rev-parse``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

#: op name -> (module, result file name)
OPS: dict[str, tuple[str, str]] = {
    "moe": ("kernels._bench_moe", "kernels_moe.json"),
    "attention": ("kernels._bench_attention", "kernels_attention.json"),
}


def commit() -> str:
    """``$INSPECTION_COMMIT`` when set, else the checkout's short commit (``+dirty`` with uncommitted changes)."""
    if os.environ.get("INSPECTION_COMMIT"):
        return os.environ["INSPECTION_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info() -> dict[str, str]:
    """What every result file records about its run: ``machine``, ``commit``, ``command``, ``date``,
    ``torch``, ``triton`` (needs a CUDA device)."""
    import torch
    import triton

    return {
        "machine": torch.cuda.get_device_name(),
        "commit": commit(),
        "command": " ".join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def geomean(values: list[float | None]) -> float | None:
    """Geometric mean of the finite positive values (missing measurements are None); None when there are none."""
    kept = [v for v in values if v and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in kept) / len(kept)) if kept else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(OPS), action="append", help="run only this op (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a few small shapes and fewer repeats")
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON files")
    args = ap.parse_args(argv)

    import importlib

    import torch

    if not torch.cuda.is_available():
        print("kernels.bench: no CUDA device; the benchmarks time GPU kernels and have no CPU mode", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for op in args.only or sorted(OPS):
        module, filename = OPS[op]
        bench = importlib.import_module(module)
        result = bench.run(str(args.out / filename), quick=args.quick)
        print(bench.format_table(result), flush=True)
        print(f"{op} summary: {json.dumps(result.get('summary', {}), default=str)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
