"""SKAB's published outlier-detection protocol, run with the normal-only detector.

Per labelled file: fit on its first 400 rows (normal behaviour, labels unused), predict every later row; TP, FP,
TN, FN are pooled over the 34 files (see ``../shared/data/skab/PROTOCOL.md``). The harness is checked by
reproducing the leaderboard's Hotelling T² row, which is reported beside our detector.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from inspection.anomaly import PCADetector, PCADetectorConfig
from inspection.evaluation import ANCHORS, write_result


def evaluate_skab(*, results_dir: Path | str = "bench/results", seed: int = 0, root=None,
                  config: PCADetectorConfig | None = None) -> Path:
    """Run the protocol; write ``skab.json`` (headline F1, with FAR and MAR). ``seed`` is recorded only: the
    detector is deterministic."""
    from inspection.data import skab

    config = config or PCADetectorConfig()
    files = skab.load_skab(root)
    y_true, y_pred, y_t2, per_file = [], [], [], []
    for f in files:
        train, test = skab.protocol_split(f)
        pred = PCADetector(config).fit(train.values).predict(test.values)
        y_true.append(test.anomaly)
        y_pred.append(pred)
        y_t2.append(skab.hotelling_t2_baseline(f))
        one = skab.skab_score([test.anomaly], [pred])
        per_file.append({"file": f.name, "f1": one.f1, "far": one.far, "mar": one.mar})
    ours = skab.skab_score(y_true, y_pred)
    t2 = skab.skab_score(y_true, y_t2)
    summary = {
        "metric": "F1 (pooled over the 34 files' test parts)",
        "value": ours.f1,
        "far": ours.far,
        "mar": ours.mar,
        "baselines": {**ANCHORS["skab"], "T-squared, this harness": round(t2.f1, 4)},
        "baselines_far_mar": {"Conv-AE (published)": [13.55, 28.02], "T-squared, this harness": [t2.far, t2.mar]},
        "split": "published SKAB protocol: per file, first 400 rows fit (normal only), the rest tested",
        "seed": seed,
        "model_version": "pca-t2q:" + ",".join(f"{k}={v}" for k, v in asdict(config).items()),
        "detector": asdict(config),
    }
    counts = {"tp": ours.tp, "fp": ours.fp, "tn": ours.tn, "fn": ours.fn}
    return write_result("skab", summary, {"counts": counts, "per_file": per_file}, results_dir)
