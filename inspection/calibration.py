"""Calibration: per-line decision thresholds chosen on validation data, stored as model buffers.

Three methods: ``max_f1`` (the threshold that maximises F1 on validation units), ``far`` (the lowest threshold
whose false-alarm rate on good validation units is at most ``target_far``) and ``max_accuracy`` (for benchmarks
whose headline is accuracy). :func:`fixed_calibration` instead sets one given threshold for every line, with no
validation data (for a score that is itself a probability with a meaningful cut, e.g. ELPV's p >= 0.5 on a score
trained towards the experts' defect probability). A line with too few validation units,
or without both classes for max-F1, uses the default threshold fitted on all validation units; the model's
``*`` line is that default and serves every line it has never seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from inspection.errors import ConfigError
from inspection.model import DEFAULT_LINE, InspectionModel

METHODS = ("max_f1", "far", "max_accuracy")
MIN_LINE_UNITS = 30


@dataclass(frozen=True)
class Calibration:
    """Attributes:
    thresholds: line -> score threshold (``*`` = default).
    method: ``max_f1`` or ``far``; target_far: for ``far``.
    version: content hash of the thresholds and method (``t-...``).
    n_units: validation units per line.
    """

    thresholds: dict[str, float]
    method: str
    target_far: float | None
    version: str
    n_units: dict[str, int]

    def to_dict(self) -> dict:
        return {"thresholds": self.thresholds, "method": self.method, "target_far": self.target_far,
                "version": self.version, "n_units": self.n_units}


def choose_threshold(scores: np.ndarray, labels: np.ndarray, method: str = "max_f1", target_far: float = 0.01) -> float:
    """A threshold (decide defect when ``score >= threshold``) for one set of validation scores.

    For ``max_f1`` and ``max_accuracy``: the lowest optimal score, moved down to the middle of the gap to the next
    lower validation score (the same validation decisions, the widest margin).
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {METHODS}; got {method!r}")
    if scores.size == 0:
        raise ConfigError("calibration needs validation units")
    candidates = np.unique(scores)
    if method == "far":
        if not 0.0 <= target_far < 1.0:
            raise ConfigError(f"target_far must be in [0, 1); got {target_far}")
        good = np.sort(scores[~labels])
        if good.size == 0:
            raise ConfigError("false-alarm calibration needs good (non-defective) validation units")
        # smallest threshold with (#good >= t) / #good <= target_far
        allowed = int(np.floor(target_far * good.size + 1e-9))  # 0.29 * 100 is 28.999...: still 29 allowed
        th = good[good.size - allowed - 1] if allowed < good.size else good[0]
        return float(np.nextafter(th, np.inf))
    best_i, best_value = 0, -1.0
    pos = labels.sum()
    for i, t in enumerate(candidates):
        pred = scores >= t
        tp = (pred & labels).sum()
        if method == "max_f1":
            value = 2 * tp / (pred.sum() + pos) if pred.sum() + pos else 0.0
        else:
            value = (tp + (~pred & ~labels).sum()) / len(labels)
        if value > best_value:
            best_i, best_value = i, value
    # any threshold in (next lower score, best candidate] makes the same validation decisions: take the middle
    # of that gap, the widest margin on both sides (matters when validation scores are perfectly separated)
    if best_i == 0:
        return float(candidates[0])
    return float((candidates[best_i - 1] + candidates[best_i]) / 2)


def calibrate(model: InspectionModel, scores: np.ndarray, labels: np.ndarray, line_ids: Sequence[str],
              method: str = "max_f1", target_far: float = 0.01) -> tuple[InspectionModel, Calibration]:
    """Choose thresholds per line and return a model carrying them (a new model when its lines change).

    Args:
        scores: ``[B]`` validation defect probabilities from this model.
        labels: ``[B]`` ground truth (defect or not).
        line_ids: the units' lines.
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if not (len(scores) == len(labels) == len(line_ids)):
        raise ConfigError("scores, labels and line_ids must have one entry per validation unit")
    thresholds = {DEFAULT_LINE: choose_threshold(scores, labels, method, target_far)}
    n_units = {DEFAULT_LINE: len(scores)}
    line_arr = np.asarray(line_ids)
    for line in sorted(set(line_ids)):
        sel = line_arr == line
        n_units[line] = int(sel.sum())
        usable = sel.sum() >= MIN_LINE_UNITS and (method == "far" and (~labels[sel]).any()
                                                 or method != "far" and 0 < labels[sel].sum() < sel.sum())
        if usable:
            thresholds[line] = choose_threshold(scores[sel], labels[sel], method, target_far)
    return _with_thresholds(model, thresholds, method, target_far, n_units)


def fixed_calibration(model: InspectionModel, threshold: float) -> tuple[InspectionModel, Calibration]:
    """Give a model one threshold for every line (method ``fixed``), chosen without validation data."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"a fixed threshold is a defect probability in (0, 1); got {threshold}")
    return _with_thresholds(model, {DEFAULT_LINE: float(threshold)}, "fixed", None, {DEFAULT_LINE: 0})


def _with_thresholds(model: InspectionModel, thresholds: dict[str, float], method: str, target_far: float | None,
                     n_units: dict[str, int]) -> tuple[InspectionModel, Calibration]:
    """The model carrying ``thresholds`` (``*`` first, then its lines; a new model when its lines change) and
    their :class:`Calibration`, versioned by a hash of thresholds and method."""
    lines = (DEFAULT_LINE, *sorted(k for k in thresholds if k != DEFAULT_LINE))
    if lines != model.config.lines:
        new = InspectionModel(replace(model.config, lines=lines), pretrained_weights=False)
        state = {k: v for k, v in model.state_dict().items() if k != "thresholds"}
        new.load_state_dict(state, strict=False)
        model = new
    with torch.no_grad():
        model.thresholds.copy_(torch.tensor([thresholds[line] for line in lines]))
    payload = json.dumps({"thresholds": thresholds, "method": method, "target_far": target_far}, sort_keys=True)
    version = "t-" + hashlib.sha256(payload.encode()).hexdigest()[:10]
    return model, Calibration(thresholds, method, target_far if method == "far" else None, version, n_units)
