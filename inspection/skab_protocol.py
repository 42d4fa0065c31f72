"""SKAB's published outlier-detection protocol, run with the normal-only detector.

Per labelled file: fit on its first 400 rows (normal behaviour, labels unused), predict every later row; TP, FP,
TN, FN are pooled over the 34 files (see ``../shared/data/skab/PROTOCOL.md``). The harness is checked by
reproducing the leaderboard's Hotelling T² row, which is reported beside our detector.

The detector's limit margin is calibrated without the labelled files: the anomaly-free recording (which the
protocol allows as extra normal data) is cut into segments as long as a labelled file; on each, the detector is
fitted on the first 400 rows exactly as in the protocol, and the margin is the smallest one whose false-alarm rate
on the remaining normal rows is at most ``target_far``. Normal operation of the rig drifts well beyond what 400
rows show, and this measures how far.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from inspection.anomaly import PCADetector, PCADetectorConfig
from inspection.evaluation import ANCHORS, write_result

SEGMENT_ROWS = 1150  # about the length of a labelled SKAB file


def calibrate_margin(normal: np.ndarray, config: PCADetectorConfig, target_far: float,
                     train_rows: int = 400) -> tuple[float, float]:
    """The smallest limit margin with false-alarm rate <= ``target_far`` on normal segments; returns
    ``(margin, far)``. Bisection on a log scale (the alarm rate falls monotonically as the margin grows)."""
    segments = [normal[s:s + SEGMENT_ROWS] for s in range(0, len(normal) - SEGMENT_ROWS + 1, SEGMENT_ROWS)]
    if not segments:
        raise ValueError(f"need at least {SEGMENT_ROWS} normal rows; got {len(normal)}")

    def far(margin: float) -> float:
        alarms = rows = 0
        for seg in segments:
            pred = PCADetector(replace(config, margin=margin)).fit(seg[:train_rows]).predict(seg[train_rows:])
            alarms += int(pred.sum())
            rows += len(pred)
        return alarms / rows

    lo, hi = 1e-3, 1e4
    if far(hi) > target_far:
        return hi, far(hi)
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if far(mid) > target_far else (lo, mid)
    return hi, far(hi)


def evaluate_skab(*, results_dir: Path | str = "bench/results", seed: int = 0, root=None,
                  config: PCADetectorConfig | None = None, target_far: float | None = 0.10) -> Path:
    """Run the protocol; write ``skab.json`` (headline F1, with FAR and MAR). ``seed`` is recorded only: the
    detector is deterministic. ``target_far`` calibrates the margin on the anomaly-free recording (None keeps
    the config's margin)."""
    from inspection.data import skab

    config = config or PCADetectorConfig()
    calibration = None
    if target_far is not None:
        margin, far = calibrate_margin(skab.load_skab_anomaly_free(root).values, config, target_far)
        config = replace(config, margin=margin)
        calibration = {"source": "anomaly-free recording, segments of 1150 rows, fit on the first 400 of each",
                       "target_far": target_far, "far_on_normal_segments": far, "margin": margin}
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
        "limit_calibration": calibration,
    }
    counts = {"tp": ours.tp, "fp": ours.fp, "tn": ours.tn, "fn": ours.fn}
    return write_result("skab", summary, {"counts": counts, "per_file": per_file}, results_dir)
