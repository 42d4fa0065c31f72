"""Normal-only benchmark: fit on defect-free training units only, score test units by deviation.

    python bench/normal_only.py --bench composite --n-train 1000 --n-test 1000   # CPU, ~5 min on 2 cores
    python bench/normal_only.py --bench bearings --folds 0 1 2 3 4
    python bench/normal_only.py --bench elpv [--limit 300]
    python bench/normal_only.py --bench all --device cuda

For each benchmark, :class:`inspection.normal_only.NormalOnlyDetector` (features from the benchmark's default
model's encoders and preprocessing) is fitted on the **defect-free training units only**, calibrated (deviation
standardisation and the threshold at ``--target-far``) on the **validation split's defect-free units**, and
scored on the test split, whose labels are read only here, for the metrics:

- composite: ``ok`` units of the composite training split; per-modality AUROC of each modality's standardised
  deviation against "this modality is a culprit", and how often the largest deviation names the culprit of
  single-culprit units (the constructed pairing of real readings: see inspection.data.composite);
- elpv: p = 0 training cells (severity 0, class ``ok``); test defective = p >= 0.5 as in the supervised
  benchmark, so p = 1/3 cells count as good; AUROCs of p = 0 against p >= 0.5 and against p > 0 beside it;
- bearings: healthy windows of the training recordings of each fold of the grouped cross-validation; folds
  whose test recordings hold no healthy one (3 and 4 with seed 0) have no AUROC and no false-alarm rate, only
  recall.

Beside each result stands the supervised model's committed number (``bench/results/<bench>.json``), labelled
with that file, its machine and its split. Results are merged into ``--out`` per benchmark, so benchmarks can
be run one at a time.

The splits, the detector's fitting and the metrics are :mod:`inspection.normal_experiments`, which
``inspection train|calibrate|evaluate --bench B --mode normal-only`` use too: this script is the same run
without a model store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.evaluation import current_commit, machine_description  # noqa: E402
from inspection.normal_experiments import (  # noqa: E402
    BENCHES,
    COMPOSITE_SIZES,
    HEADLINE,
    fit_and_calibrate,
    normal_split,
    pool_folds,
    record_result,
    score_split,
    supervised_reference,
)

BENCH_CHOICES = BENCHES


def log(msg: str) -> None:
    print(f"[normal-only] {msg}", file=sys.stderr, flush=True)


def fit_and_score(split, args) -> tuple:
    """Fit on the split's defect-free training units, calibrate on its defect-free validation units, score its
    test units: the scores and the result."""
    det, info = fit_and_calibrate(split.config, split.fit, split.calibration, args.target_far, args.device)
    scores, res = score_split(det, split)
    return scores, {**info, **res}


# ------------------------------------------------------------------------------------------------ benches
def run_composite(args) -> dict:
    split = normal_split("composite", args.seed, limit=args.limit, image_size=args.image_size, n_train=args.n_train,
                         n_val=args.n_val, n_test=args.n_test)
    log(f"composite: fit {len(split.fit)} ok training units, calibrate on {len(split.calibration)} ok val units, "
        f"test {len(split.test)}")
    return fit_and_score(split, args)[1]


def run_elpv(args) -> dict:
    split = normal_split("elpv", args.seed, limit=args.limit, image_size=args.image_size)
    log(f"elpv: fit {len(split.fit)} p=0 training cells, calibrate on {len(split.calibration)} p=0 val cells, "
        f"test {len(split.test)}")
    return fit_and_score(split, args)[1]


def run_bearings(args) -> dict:
    folds, pooled_scores, pooled_y = {}, [], []
    for k in args.folds:
        split = normal_split("bearings", args.seed, fold=k, limit=args.limit)
        log(f"bearings fold {k}: fit {len(split.fit)} healthy windows, calibrate on {len(split.calibration)}, "
            f"test {len(split.test)}")
        scores, folds[str(k)] = fit_and_score(split, args)
        pooled_scores.append(scores.score)
        pooled_y.append(np.array([u.label.defect for u in split.test]))
    return pool_folds(folds, pooled_scores, pooled_y)


RUNNERS = {"composite": run_composite, "elpv": run_elpv, "bearings": run_bearings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", choices=[*BENCH_CHOICES, "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "normal_only.json"))
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many units per split role (fit, calibration, test), drawn with the seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="bearings folds")
    p.add_argument("--target-far", type=float, default=0.01)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-train", type=int, default=COMPOSITE_SIZES["n_train"],
                   help="composite training units drawn (ok ones fit)")
    p.add_argument("--n-val", type=int, default=COMPOSITE_SIZES["n_val"],
                   help="composite validation units drawn (ok ones calibrate)")
    p.add_argument("--n-test", type=int, default=COMPOSITE_SIZES["n_test"], help="composite test units")
    p.add_argument("--refresh-supervised", action="store_true",
                   help="re-read the supervised models' headline numbers (bench/results/<bench>.json) into the "
                        "existing result file's baselines, leaving every normal-only number as it is")
    args = p.parse_args(argv)
    out_path = Path(args.out)
    if args.refresh_supervised:
        benches = json.loads(out_path.read_text())["benches"]
        for bench, res in benches.items():
            res["supervised"] = supervised_reference(bench, ROOT / "bench" / "results",
                                                     shown_as=f"bench/results/{bench}.json")
            res["supervised_read"] = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
            path = record_result(out_path, bench, res, res.get("seed", args.seed))
        log(f"supervised baselines of {', '.join(benches)} re-read into {path}")
        return 0
    for bench in (BENCH_CHOICES if args.bench == "all" else (args.bench,)):
        t0 = time.perf_counter()
        res = RUNNERS[bench](args)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res.update({"seed": args.seed, "device": args.device, "limit": args.limit, "image_size": args.image_size,
                    "machine": machine_description(), "commit": current_commit(), "command": " ".join(sys.argv),
                    "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                    "supervised": supervised_reference(bench, ROOT / "bench" / "results",
                                                       shown_as=f"bench/results/{bench}.json")})
        path = record_result(out_path, bench, res, args.seed)
        log(f"{bench}: {HEADLINE[bench]} = {res[HEADLINE[bench]]} ({res['wall_s']} s); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
