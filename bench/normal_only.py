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

from inspection.benches import default_model_config, load_bench  # noqa: E402
from inspection.evaluation import binary_metrics, current_commit, machine_description, write_result  # noqa: E402
from inspection.normal_only import NormalOnlyConfig, NormalOnlyDetector, NormalOnlyScores  # noqa: E402
from inspection.records import MODALITIES, Unit  # noqa: E402

BENCH_CHOICES = ("composite", "elpv", "bearings")


def log(msg: str) -> None:
    print(f"[normal-only] {msg}", file=sys.stderr, flush=True)


def subset(units: list[Unit], limit: int | None, seed: int) -> list[Unit]:
    """At most ``limit`` units, drawn with ``seed`` (order kept); all of them without a limit."""
    if not limit or len(units) <= limit:
        return units
    keep = np.sort(np.random.default_rng(seed).choice(len(units), limit, replace=False))
    return [units[i] for i in keep]


def supervised_reference(bench: str) -> dict | None:
    """The supervised model's committed headline numbers, labelled with their file."""
    path = ROOT / "bench" / "results" / f"{bench}.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())["summary"]
    return {"source": f"bench/results/{bench}.json (supervised model)", "metric": s.get("metric"),
            "value": s.get("value"), "auroc": s.get("auroc"), "split": s.get("split"), "seed": s.get("seed"),
            "machine": s.get("machine"), "commit": s.get("commit")}


def fit_and_calibrate(config: NormalOnlyConfig, fit_units: list[Unit], cal_units: list[Unit], target_far: float,
                      device: str) -> tuple[NormalOnlyDetector, dict]:
    det = NormalOnlyDetector(config).to(device)
    t0 = time.perf_counter()
    det.fit(fit_units)
    t1 = time.perf_counter()
    det.calibrate(cal_units, target_far)
    t2 = time.perf_counter()
    info = {"n_fit": len(fit_units), "n_calibration": len(cal_units), "target_far": target_far,
            "threshold": det.threshold, "calibration_far": det.calibration_far,
            "shrinkage": {m: g.shrinkage for m, g in det.gaussians.items()},
            "feature_dims": {m: int(g.mean.size) for m, g in det.gaussians.items()},
            "standardisation": {m: {"centre": c, "scale": s} for m, (c, s) in det.standardisation.items()},
            "fit_s": round(t1 - t0, 1), "calibrate_s": round(t2 - t1, 1)}
    return det, info


def fit_and_score(config: NormalOnlyConfig, fit_units: list[Unit], cal_units: list[Unit], test: list[Unit],
                  args) -> tuple[NormalOnlyScores, dict]:
    """Fit on ``fit_units``, calibrate on ``cal_units``, score ``test``: the scores and the result so far."""
    det, info = fit_and_calibrate(config, fit_units, cal_units, args.target_far, args.device)
    t0 = time.perf_counter()
    scores = det.score(test)
    info["score_s"] = round(time.perf_counter() - t0, 1)
    return scores, {**info, **metrics_on_test(scores, test)}


def metrics_on_test(scores: NormalOnlyScores, units: list[Unit]) -> dict:
    """AUROC and F1 / FAR / recall at the calibrated threshold, on labelled test units."""
    y = np.array([u.label.defect for u in units])
    m = binary_metrics(scores.score, y, scores.threshold)
    out = {"n_test": len(units), "n_defective": int(y.sum()), "auroc": m.get("auroc"), "f1": m["f1"],
           "far": m["far"] if (~y).any() else None, "recall": 1.0 - m["mar"] if y.any() else None,
           "accuracy": m["accuracy"], "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"]}
    return out


# ------------------------------------------------------------------------------------------------ benches
def run_composite(args) -> dict:
    data = load_bench("composite", args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    fit_units = subset([u for u in data.train if not u.label.defect], args.limit, args.seed)
    cal_units = subset([u for u in data.val if not u.label.defect], args.limit, args.seed + 1)
    test = subset(data.test, args.limit, args.seed + 2)
    config = NormalOnlyConfig(default_model_config("composite", image_size=args.image_size).encoders)
    log(f"composite: fit {len(fit_units)} ok training units, calibrate on {len(cal_units)} ok val units, "
        f"test {len(test)}")
    scores, out = fit_and_score(config, fit_units, cal_units, test, args)
    from sklearn.metrics import roc_auc_score

    per_mod, pointing = {}, {}
    top = scores.top_modality
    for mi, m in enumerate(MODALITIES):
        y = np.array([m in u.label.culprits for u in test])
        if 0 < y.sum() < len(y):
            per_mod[m] = float(roc_auc_score(y, scores.deviations[:, mi]))
        single = [i for i, u in enumerate(test) if u.label.culprits == frozenset({m})]
        hits = [top[i] == m for i in single]
        detected = [top[i] == m for i in single if scores.decision[i]]
        pointing[m] = {"n": len(single), "top_is_culprit": float(np.mean(hits)) if hits else None,
                       "n_detected": len(detected),
                       "top_is_culprit_detected": float(np.mean(detected)) if detected else None}
    out["modality_auroc"] = per_mod
    out["pointing_single_culprit"] = pointing
    out["recall_by_class"] = _recall_by(test, scores, lambda u: u.label.defect_class)
    false_alarms = [top[i] for i, u in enumerate(test) if scores.decision[i] and not u.label.defect]
    out["false_alarms_by_top_modality"] = {m: false_alarms.count(m) for m in MODALITIES}
    out["notes"] = list(data.notes) + ["per-modality AUROC: each modality's standardised deviation against "
                                       "'this modality is a culprit', over all test units"]
    return out


def run_elpv(args) -> dict:
    data = load_bench("elpv", args.seed, val_fraction=0.15)

    def clean(u: Unit) -> bool:
        return not u.label.defect and u.label.defect_class == "ok" and (u.label.severity or 0.0) == 0.0

    fit_units = subset([u for u in data.train if clean(u)], args.limit, args.seed)
    cal_units = subset([u for u in data.val if clean(u)], args.limit, args.seed + 1)
    test = subset(data.test, args.limit, args.seed + 2)
    config = NormalOnlyConfig(default_model_config("elpv", image_size=args.image_size).encoders)
    log(f"elpv: fit {len(fit_units)} p=0 training cells, calibrate on {len(cal_units)} p=0 val cells, "
        f"test {len(test)}")
    scores, out = fit_and_score(config, fit_units, cal_units, test, args)
    from sklearn.metrics import roc_auc_score

    sev = np.array([u.label.severity or 0.0 for u in test])
    strict = (sev == 0) | (sev >= 0.5)
    out["auroc_p0_vs_p_ge_half"] = float(roc_auc_score(sev[strict] >= 0.5, scores.score[strict]))
    out["auroc_p0_vs_p_gt0"] = float(roc_auc_score(sev > 0, scores.score))
    out["alarm_rate_by_probability"] = _recall_by(test, scores, lambda u: f"p={u.label.severity or 0.0:.2f}")
    out["notes"] = ["test defective = p >= 0.5 (as the supervised benchmark); p = 1/3 cells count as good",
                    "fit on p = 0 training cells only; calibration on p = 0 validation cells"]
    return out


def run_bearings(args) -> dict:
    folds, pooled_scores, pooled_y = {}, [], []
    config = NormalOnlyConfig(default_model_config("bearings").encoders)
    for k in args.folds:
        data = load_bench("bearings", args.seed, fold=k)
        fit_units = subset([u for u in data.train if not u.label.defect], args.limit, args.seed)
        cal_units = subset([u for u in data.val if not u.label.defect], args.limit, args.seed + 1)
        test = subset(data.test, args.limit, args.seed + 2)
        log(f"bearings fold {k}: fit {len(fit_units)} healthy windows, calibrate on {len(cal_units)}, "
            f"test {len(test)}")
        scores, res = fit_and_score(config, fit_units, cal_units, test, args)
        res["recordings"] = {
            "fit": sorted({u.provenance["vibration"].split(":")[1].split("@")[0] for u in fit_units}),
            "calibration": sorted({u.provenance["vibration"].split(":")[1].split("@")[0] for u in cal_units}),
        }
        res["alarm_rate_by_recording"] = _recall_by(
            test, scores, lambda u: u.provenance["vibration"].split(":")[1].split("@")[0])
        rates = {u.vibration.sample_rate_hz for u in test if not u.label.defect}
        same = [i for i, u in enumerate(test) if u.vibration.sample_rate_hz in rates]
        ys = np.array([test[i].label.defect for i in same])
        if same and 0 < ys.sum() < len(ys):
            from sklearn.metrics import roc_auc_score

            res["auroc_same_rate"] = float(roc_auc_score(ys, scores.score[same]))
        folds[str(k)] = res
        pooled_scores.append(scores.score)
        pooled_y.append(np.array([u.label.defect for u in test]))
    s, y = np.concatenate(pooled_scores), np.concatenate(pooled_y)
    aurocs = [f["auroc"] for f in folds.values() if f["auroc"] is not None]
    healthy = sum(f["tn"] + f["fp"] for f in folds.values())
    faulty = sum(f["tp"] + f["fn"] for f in folds.values())
    from sklearn.metrics import roc_auc_score

    return {
        "folds": folds,
        "auroc_mean_over_folds_with_healthy_test": float(np.mean(aurocs)) if aurocs else None,
        "folds_with_auroc": [k for k, f in folds.items() if f["auroc"] is not None],
        "auroc_pooled": float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None,
        "recall_pooled": sum(f["tp"] for f in folds.values()) / faulty if faulty else None,
        "far_pooled": sum(f["fp"] for f in folds.values()) / healthy if healthy else None,
        "n_test_windows": int(len(y)),
        "notes": ["split by recording (grouped folds); windows of one recording are correlated, so the number of "
                  "independent test items is the number of recordings",
                  "all healthy recordings are sampled at 97,656 Hz; auroc_same_rate compares them with faulty "
                  "recordings of the same rate only, which no sample-rate artefact can separate",
                  "auroc_pooled pools the test windows of every fold, each scored by its own fold's detector"],
    }


def _recall_by(units: list[Unit], scores: NormalOnlyScores, key) -> dict:
    """Share of units alarmed, per group."""
    groups: dict[str, list[bool]] = {}
    for u, d in zip(units, scores.decision, strict=True):
        groups.setdefault(key(u), []).append(bool(d))
    return {g: {"n": len(v), "alarm_rate": float(np.mean(v))} for g, v in sorted(groups.items())}


RUNNERS = {"composite": run_composite, "elpv": run_elpv, "bearings": run_bearings}
HEADLINE = {"composite": "auroc", "elpv": "auroc", "bearings": "auroc_mean_over_folds_with_healthy_test"}


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
    p.add_argument("--n-train", type=int, default=1000, help="composite training units drawn (ok ones fit)")
    p.add_argument("--n-val", type=int, default=500, help="composite validation units drawn (ok ones calibrate)")
    p.add_argument("--n-test", type=int, default=1000, help="composite test units")
    args = p.parse_args(argv)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    benches = dict(previous.get("benches", {}))
    for bench in (BENCH_CHOICES if args.bench == "all" else (args.bench,)):
        t0 = time.perf_counter()
        res = RUNNERS[bench](args)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res.update({"seed": args.seed, "device": args.device, "limit": args.limit, "image_size": args.image_size,
                    "machine": machine_description(), "commit": current_commit(), "command": " ".join(sys.argv),
                    "date": datetime.now(UTC).strftime("%Y-%m-%d"), "supervised": supervised_reference(bench)})
        benches[bench] = res
        log(f"{bench}: {HEADLINE[bench]} = {res[HEADLINE[bench]]} ({res['wall_s']} s)")
    summary = {
        "metric": "AUROC (normal-only: fitted on defect-free units, calibrated on defect-free validation units)",
        "value": {b: r[HEADLINE[b]] for b, r in benches.items()},
        "baselines": {b: r["supervised"] for b, r in benches.items() if r.get("supervised")},
        "method": "per-modality Gaussian (Ledoit-Wolf) Mahalanobis deviations, z of log-distance on held-out "
                  "normal units, max over modalities (inspection/normal_only.py)",
        "split": "train defect-free units fit, validation defect-free units calibrate, test split scored",
        "seed": args.seed,
    }
    path = write_result(out_path.stem, summary, {"benches": benches}, results_dir=out_path.parent)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
