"""Evaluation: metrics of a calibrated model on a test split, plots, and the benchmark result files.

Each benchmark run writes ``bench/results/<bench>.json`` whose top-level ``summary`` holds ``benchmark``,
``metric`` (the headline), ``value``, ``baselines`` ({name: value}), ``split``, ``seed``, ``model_version``,
``machine``, ``commit``, ``command`` and ``date``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from inspection.model import InspectionModel
from inspection.progress import Progress
from inspection.records import MODALITIES, Unit
from inspection.training import PreparedSet, predict

#: The command line that produced a result (set by the CLI; scripts fall back to sys.argv).
COMMAND_LINE: str | None = None

#: Published or measured reference numbers the tables compare with.
ANCHORS = {
    "elpv": {"Deitsch et al. 2019 CNN": 0.8842, "Deitsch et al. 2019 SVM": 0.8244,
             "fine-tuned EfficientNet-Lite0 (20 ep, flips/rot90, 4-rot TTA, 224 px), measured": 0.904},
    "bearings": {"WDCNN on CWRU (same load), published": 1.0},
    "skab": {"Conv-AE (published)": 0.78, "MSET (published)": 0.78, "T-squared+Q (published)": 0.76,
             "T-squared (published; reproduced here 0.66)": 0.66},
}


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, no GPU (torch {torch.__version__})"


def current_commit() -> str:
    if os.environ.get("INSPECTION_COMMIT"):
        return os.environ["INSPECTION_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def logit(p: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities, clipped to ``[1e-7, 1 - 1e-7]`` first so that 0 and 1 stay finite."""
    p = np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def margin(score: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """How far a calibrated model's scores lie above its own thresholds, in logits (> 0: a defect decision)."""
    return logit(score) - logit(threshold)


def late_fusion_score(margins: np.ndarray) -> np.ndarray:
    """Late fusion of single-modality models: per unit, the largest :func:`margin` of a modality it has.

    Args:
        margins: ``[B, M]`` each single-modality model's margin, NaN where the unit lacks the modality.

    Returns:
        ``[B]``; compared with a late-fusion threshold chosen on validation units.
    """
    return np.nanmax(np.asarray(margins, float), axis=1)


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    pred = np.asarray(scores) >= threshold
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    out = {"accuracy": (tp + tn) / len(labels), "f1": tp / (tp + 0.5 * (fp + fn)) if tp + fp + fn else 1.0,
           "tp": tp, "fp": fp, "fn": fn, "tn": tn,
           "far": fp / (fp + tn) if fp + tn else 0.0, "mar": fn / (fn + tp) if fn + tp else 0.0}
    if 0 < labels.sum() < len(labels):
        out["auroc"] = float(roc_auc_score(labels, scores))
    return out


def predict_units(model: InspectionModel, units: Sequence[Unit] | PreparedSet, device: torch.device | str = "cpu",
                  tta: bool = False, batch_size: int = 64, hide: Sequence[str] = (),
                  amp: bool = True, *, report: Progress | None = None,
                  desc: str = "evaluate") -> dict[str, np.ndarray]:
    """Scores of labelled units (or an already prepared set of them) plus their targets and thresholds
    (``amp``: bf16 autocast on CUDA, as the service scores; False keeps float32). ``report`` shows the
    preprocessing and the scoring as stages named ``desc``."""
    device = torch.device(device)
    report = report or Progress(enabled=False)
    if isinstance(units, PreparedSet):
        data = units
    else:
        stage = report.stage(f"{desc}: preprocess", len(units))
        data = PreparedSet(model, units, model.config.class_names, stage.update)
        stage.close(stage.done_line())
    model.to(device)
    stage = report.stage(f"{desc}: score", len(data))
    pred = predict(model, data, device, batch_size=batch_size, tta=tta, hide=hide, amp=amp, on_batch=stage.update)
    stage.close(stage.done_line())
    pred["defect"] = data.targets.defect.numpy() > 0.5
    pred["klass"] = data.targets.klass.numpy()
    pred["threshold"] = model.threshold_for(data.batch.line_index.to(device)).cpu().numpy()
    return pred


def evaluate_units(model: InspectionModel, units: Sequence[Unit], device: torch.device | str = "cpu",
                   tta: bool = False, *, prepared: PreparedSet | None = None,
                   hide: Sequence[str] = (), amp: bool = True, report: Progress | None = None,
                   desc: str = "evaluate") -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of a calibrated model on labelled units: binary metrics at the calibrated thresholds, class
    accuracy, and per-modality AUROC against the culprit labels. ``prepared`` (the same units, already
    preprocessed) is reused when given; ``hide`` masks modalities out at test time; ``amp``: bf16 autocast on
    CUDA (False: float32); ``report``/``desc`` as :func:`predict_units`."""
    pred = predict_units(model, prepared if prepared is not None else units, device, tta, hide=hide, amp=amp,
                         report=report, desc=desc)
    metrics = binary_metrics(pred["score"], pred["defect"], pred["threshold"])
    metrics["class_accuracy"] = float((pred["class_prob"].argmax(1) == pred["klass"]).mean())
    metrics["n"] = len(units)
    from sklearn.metrics import roc_auc_score

    per_mod = {}
    for mi, m in enumerate(MODALITIES):
        s = pred["modality_score"][:, mi]
        ok = ~np.isnan(s)
        y = np.array([m in u.label.culprits for u in units])[ok]
        if ok.any() and 0 < y.sum() < len(y):
            per_mod[m] = float(roc_auc_score(y, s[ok]))
    if per_mod:
        metrics["modality_auroc"] = per_mod
    return metrics, pred


def plot_roc_confusion(scores: np.ndarray, labels: np.ndarray, threshold, class_true: np.ndarray,
                       class_pred: np.ndarray, class_names: Sequence[str], out_prefix: Path, title: str) -> list[Path]:
    """ROC curve and class confusion matrix as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, roc_curve

    paths = []
    if 0 < np.sum(labels) < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false alarm rate")
        ax.set_ylabel("detection rate")
        ax.set_title(title)
        paths.append(_save(fig, out_prefix, "roc"))
    cm = confusion_matrix(class_true, class_pred, labels=list(range(len(class_names))))
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.1 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    paths.append(_save(fig, out_prefix, "confusion"))
    return paths


def _save(fig, out_prefix: Path, kind: str) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_prefix.with_name(f"{out_prefix.name}_{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(bench: str, summary: dict, details: dict, results_dir: Path | str = "runs/results") -> Path:
    """Write ``<results_dir>/<bench>.json`` with the required summary fields filled in."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    full = {
        "benchmark": bench,
        "machine": machine_description(),
        "commit": current_commit(),
        "command": COMMAND_LINE or " ".join(sys.argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        **summary,
    }
    path = results_dir / f"{bench}.json"
    path.write_text(json.dumps({"summary": full, **details}, indent=1, default=_json_default))
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
