"""What the decision trace costs the scoring forward: the stacked fuse of a micro-batch's coalitions untraced,
traced on every row, and traced on the units' own rows only (what the service does).

    python bench/trace.py --device cuda          # -> bench/results/trace.json
    python bench/trace.py --device cpu --batch 16 --repeats 5

Every stream decision carries the routing path and the attention spread of the unit's own forward pass, its
grand coalition's row of the stacked batch (``services.scoring``). A micro-batch of B units with all three
modalities stacks 7 B coalition rows; the attention spread recomputes each layer's attention weights in fp32, so
tracing every row costs what tracing B rows costs 7 times over. The model is the benchmarked composite
architecture (:func:`inspection.benches.default_model_config`, untrained: the cost does not depend on the
weights); the encoders' tokens are random, as the encoders do not take part in the comparison. Each case is
timed ``--repeats`` times, interleaved, after a warm-up; the median is reported, with the ratios to the
untraced fuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explain.shapley import coalition_row, stack_coalitions  # noqa: E402
from inspection.benches import default_model_config  # noqa: E402
from inspection.evaluation import write_result  # noqa: E402
from inspection.model import Encoded, InspectionModel  # noqa: E402
from inspection.records import MODALITIES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="units of the micro-batch (7 coalition rows each)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", default=str(ROOT / "bench/results/trace.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model = InspectionModel(default_model_config("composite", image_size=128)).to(device).eval()
    dim = model.config.bridge.dim
    index = torch.cat([torch.full((model.encoders[m].n_tokens,), MODALITIES.index(m), dtype=torch.long)
                       for m in model.config.modalities]).to(device)
    slices, start = {}, 0
    for m in model.config.modalities:
        slices[m] = slice(start, start + model.encoders[m].n_tokens)
        start += model.encoders[m].n_tokens
    b = args.batch
    present = torch.ones(b, len(MODALITIES), dtype=torch.bool, device=device)
    encoded = Encoded(torch.randn(b, start, dim, device=device), index, slices, present)
    stacked, masks = stack_coalitions(encoded)
    grand = torch.tensor([coalition_row(i, frozenset(MODALITIES)) for i in range(b)], dtype=torch.long,
                         device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    cases = {
        "untraced": lambda: model.fuse(stacked, masks),
        "traced_every_row": lambda: model.fuse(stacked, masks, trace=True),
        "traced_own_rows": lambda: model.fuse(stacked, masks, trace=True, trace_rows=grand),
    }

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            out = fn()
            out.defect_logit.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in cases.values():  # warm-up: kernels compiled, allocator settled
        for _ in range(3):
            timed(fn)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            times[key].append(timed(fn))
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    summary = {
        "metric": "median ms of the stacked fuse of one micro-batch (all coalition rows), by trace mode",
        "value": ms["traced_own_rows"],
        "ms": ms,
        "own_rows_vs_every_row": ms["traced_own_rows"] / ms["traced_every_row"],
        "own_rows_vs_untraced": ms["traced_own_rows"] / ms["untraced"],
        "every_row_vs_untraced": ms["traced_every_row"] / ms["untraced"],
        "batch_units": b,
        "coalition_rows": int(stacked.tokens.shape[0]),
        "tokens_per_row": start,
        "precision": precision,
        "device": args.device,
        "repeats": args.repeats,
    }
    path = write_result(Path(args.out).stem, summary, {"times_s": times}, results_dir=Path(args.out).parent)
    print(f"[trace] fuse of {b} units ({summary['coalition_rows']} rows): untraced {ms['untraced']:.2f} ms, "
          f"every row traced {ms['traced_every_row']:.2f} ms, own rows traced {ms['traced_own_rows']:.2f} ms -> "
          f"{path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
