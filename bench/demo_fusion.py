"""The demo model against late fusion on composite validation units, over seeds: can fusion clearly win here?

    python bench/demo_fusion.py --results bench/results      # seeds 0 1 2, CPU (about 6 minutes a seed, 2 cores)
    python bench/demo_fusion.py --quick                        # smoke run: the fast preset, one seed, 64 units

For each seed (the composite data seed and the training seed, as ``inspection demo --seed`` uses it) it trains the
``standard`` demo preset's fusion model and its three single-modality baselines as the demo does
(:mod:`services.demo_model`: epoch, thresholds and the late-fusion threshold chosen on the preset's composite
validation units) into a store of its own, then scores the next ``--eval-units`` units of the composite
*validation* split (never the test split the demo streams). Reported per seed and as the mean over seeds:

- ``fused``: the demo model's decisions at its calibrated threshold;
- ``heads_max``: decisions by the largest per-modality culprit logit of the model (over the modalities a unit has),
  thresholded for maximum F1 on the same validation units that chose the model's threshold: late fusion made of
  the fusion model's own per-modality heads;
- ``late_fusion`` and ``majority``: the demo's baselines, as the demo's summary computes them;
- ``head_auroc`` / ``baseline_auroc``: per modality, the AUROC of the model's head (and of the baseline's margin)
  against that modality's culprits, on the units that have it.

Composite units are defective when any one reading is, and their three readings come from independent sources, so
late fusion of good single-modality models is close to the best rule there is: this measures how close the fusion
model gets to it and what its fused head adds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inspection.calibration import choose_threshold  # noqa: E402
from inspection.evaluation import binary_metrics, late_fusion_score, predict_units, write_result  # noqa: E402
from inspection.experiments import load_model  # noqa: E402
from inspection.records import MODALITIES  # noqa: E402
from inspection.store import ModelStore  # noqa: E402
from inspection.training import PreparedSet  # noqa: E402
from services import demo_model as dm  # noqa: E402

METRICS = ("accuracy", "f1", "auroc")


def _metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    m = binary_metrics(scores, labels, threshold)
    return {k: round(float(m[k]), 4) for k in METRICS if k in m}


def _head_logits(model, prepared: PreparedSet) -> np.ndarray:
    """``[B, M]`` culprit logits of the model's per-modality heads, NaN where a unit lacks the modality."""
    with torch.no_grad():
        logits, shown = model.modality_logits(model.encode(prepared.batch))
    return np.where(shown.numpy(), logits.double().numpy(), np.nan)


def run_seed(seed: int, preset: str, store: Path, eval_units: int, device: str) -> dict:
    """Train (or reuse) the preset's model and baselines in ``store`` for ``seed`` and score the held-out units."""
    recipe = dm.get_preset(preset)
    builder = dm.composite_builder(seed)
    t0 = time.monotonic()
    version = dm.ensure_preset_model(store, preset, seed=seed, run_dir=store / "runs", device=device, progress=True,
                                     builder=builder)
    base = dm.load_baselines(store, preset, seed=seed, run_dir=store / "runs", device=device, progress=True,
                             builder=builder)
    train_s = time.monotonic() - t0
    model = load_model(ModelStore(store), version.version)[0].eval()
    _, val = dm.preset_units(recipe, seed, builder)
    held = builder.units("val", eval_units, start_index=recipe.val_units)
    y_val = np.array([u.label.defect for u in val])
    y = np.array([u.label.defect for u in held])

    prepared = PreparedSet(model, held, model.config.class_names)  # preprocessed once, scored twice
    pred = predict_units(model, prepared, "cpu", amp=False)
    fused = _metrics(pred["score"], y, pred["threshold"])  # each unit's line threshold
    # the largest head logit of the modalities a unit has: late fusion's rule applied to the model's own heads
    heads_val = late_fusion_score(_head_logits(model, PreparedSet(model, val, model.config.class_names)))
    logits = _head_logits(model, prepared)
    heads = _metrics(late_fusion_score(logits), y, choose_threshold(heads_val, y_val, "max_f1"))
    margins = base.margins(held)
    late = _metrics(late_fusion_score(margins), y, base.late_threshold)
    majority = _metrics(base.majority(len(held)).astype(float), y, 0.5)
    head_auroc, base_auroc = {}, {}
    for j, m in enumerate(MODALITIES):
        culprit = np.array([m in u.label.culprits for u in held])
        for out, scores in ((head_auroc, logits[:, j]), (base_auroc, margins[:, j])):
            has = ~np.isnan(scores)
            auroc = binary_metrics(scores[has], culprit[has], 0.0).get("auroc")
            out[m] = None if auroc is None else round(float(auroc), 4)
    return {"seed": seed, "units": len(held), "defective": int(y.sum()), "fused": fused, "heads_max": heads,
            "late_fusion": late, "majority": majority, "head_auroc": head_auroc, "baseline_auroc": base_auroc,
            "temperature_source": builder.temperature_source, "train_and_load_s": round(train_s, 1),
            "model_version": version.version, "baseline_versions": base.versions}


def _mean(rows: list[dict], key: str) -> dict[str, float]:
    return {k: round(float(np.mean([r[key][k] for r in rows])), 4) for k in METRICS if all(k in r[key] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="standard", help="demo preset (services.demo_model.PRESETS)")
    p.add_argument("--eval-units", type=int, default=768,
                   help="composite validation units after the preset's own, scored for the comparison")
    p.add_argument("--store", type=Path, default=None,
                   help="root of the per-seed model stores (reused when present; default: a temporary folder)")
    p.add_argument("--device", default="cpu", help="where to train: cpu, cuda or auto (scoring runs on CPU)")
    p.add_argument("--results", type=Path, default=Path("runs/results"), help="folder of demo_fusion.json")
    p.add_argument("--quick", action="store_true", help="smoke run: the fast preset, seed 0, 64 units")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.seeds, args.eval_units = "fast", [0], 64
    with tempfile.TemporaryDirectory(prefix="demo-fusion-") as tmp:
        root = args.store or Path(tmp)
        rows = []
        for seed in args.seeds:
            rows.append(run_seed(seed, args.preset, root / f"seed-{seed}", args.eval_units, args.device))
            r = rows[-1]
            print(f"seed {seed}: fused {r['fused']}  heads' max {r['heads_max']}  late fusion {r['late_fusion']}",
                  flush=True)
    summary = {"protocol": "demo-fusion-validation", "n_test": args.eval_units, "preset": args.preset,
               "seeds": args.seeds, "eval_units": args.eval_units,
               "temperature_source": rows[0]["temperature_source"]}
    for key in ("fused", "heads_max", "late_fusion", "majority"):
        summary[key] = _mean(rows, key)
    for key in ("fused", "heads_max"):
        diffs = [r[key]["accuracy"] - r["late_fusion"]["accuracy"] for r in rows]
        f1s = [r[key]["f1"] - r["late_fusion"]["f1"] for r in rows]
        summary[f"{key}_minus_late_fusion"] = {"accuracy": [round(d, 4) for d in diffs], "f1": [round(d, 4) for d in f1s],
                                               "mean_accuracy": round(float(np.mean(diffs)), 4),
                                               "mean_f1": round(float(np.mean(f1s)), 4)}
    path = write_result("demo_fusion", summary, {"per_seed": rows}, args.results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
