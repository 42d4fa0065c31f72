"""SKAB's published outlier-detection protocol, run with the drift-tracking normal-only detector.

Per labelled file: fit on its first 400 rows (normal behaviour, labels unused), predict every later row; TP, FP,
TN, FN are pooled over the 34 files (see ``../shared/data/skab/PROTOCOL.md``). The harness is checked by
reproducing the leaderboard's Hotelling T² row, which is reported beside our detector.

Everything the detector learns beyond a file's own first 400 rows comes from the anomaly-free recording (which
the protocol allows as extra normal data), never from the labelled files: the recording is cut into segments as
long as a labelled file, starting every ``SEGMENT_STRIDE`` rows; on each, the detector is fitted on the first 400
rows exactly as in the protocol and run on the rest. From those runs come each channel's typical deviation from
its drift-tracking baseline (the per-channel scales) and the margin, the smallest one whose false-alarm rate on
the segments is at most ``target_far`` (see :func:`inspection.anomaly.learn_normal_drift`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from inspection.anomaly import DriftTrackingConfig, DriftTrackingDetector, learn_normal_drift, normal_segments
from inspection.errors import ConfigError
from inspection.evaluation import ANCHORS, write_result

SEGMENT_ROWS = 1150  # about the length of a labelled SKAB file
SEGMENT_STRIDE = 50  # rows between the starts of overlapping normal segments (166 segments of the 9,405 rows)


def evaluate_skab(*, results_dir: Path | str = "bench/results", seed: int = 0, root=None,
                  config: DriftTrackingConfig | None = None, target_far: float | None = 0.10) -> Path:
    """Run the protocol; write ``skab.json`` (headline F1, with FAR and MAR).

    Args:
        results_dir: folder of the result file.
        seed: recorded only; the detector is deterministic.
        root: the SKAB folder (default: see :func:`inspection.data.skab.skab_root`).
        config: the detector's configuration (default :class:`DriftTrackingConfig`).
        target_far: false-alarm rate the margin is calibrated to on the anomaly-free recording, in (0, 1).
    """
    from inspection.data import skab

    if target_far is None:
        raise ConfigError("target_far is required: the margin is calibrated on the anomaly-free recording")
    config = config or DriftTrackingConfig()
    free = skab.load_skab_anomaly_free(root).values
    segments = normal_segments(free, SEGMENT_ROWS, SEGMENT_STRIDE)
    drift = learn_normal_drift(segments, config, train_rows=skab.TRAIN_ROWS, target_far=target_far)
    files = skab.load_skab(root)
    y_true, y_pred, y_t2, per_file = [], [], [], []
    for f in files:
        train, test = skab.protocol_split(f)
        pred = DriftTrackingDetector(config, drift).fit(train.values).predict(test.values)
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
        "model_version": "drift-tracking:" + ",".join(f"{k}={v}" for k, v in asdict(config).items())
        + f",margin={drift.margin:.4g}",
        "detector": asdict(config),
        "normal_drift": {
            "source": f"anomaly-free recording, {len(segments)} segments of {SEGMENT_ROWS} rows starting every "
                      f"{SEGMENT_STRIDE} rows, fit on the first {skab.TRAIN_ROWS} of each",
            "target_far": target_far,
            "far_on_normal_segments": drift.far,
            "channels": list(skab.FEATURES),
            **drift.to_dict(),
        },
    }
    counts = {"tp": ours.tp, "fp": ours.fp, "tn": ours.tn, "fn": ours.fn}
    return write_result("skab", summary, {"counts": counts, "per_file": per_file}, results_dir)
