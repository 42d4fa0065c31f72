"""SKAB's published outlier-detection protocol, run with one of two normal-only detectors.

N files · C configurations · Q quantiles · A factors · P persistence rules · T test rows

Per labelled file: fit on its first 400 rows (normal behaviour, labels unused), predict every later row; TP, FP,
TN, FN are pooled over the 34 files (see ``../shared/data/skab/PROTOCOL.md``). The harness is checked by
reproducing the leaderboard's Hotelling T² row, which is reported beside our detector.

``slope-t2`` (the default): :class:`inspection.anomaly.SlopeT2Detector` on the levels of the six non-thermal
channels and the ``lag``-row differences of ``Temperature`` and ``Thermocouple``. Its free parameters (lag,
smoothing, threshold quantile and factor, persistence rule) are chosen from :class:`SelectionGrid` by
leave-one-folder-out: for each folder (``valve1``, ``valve2``, ``other``) the configuration with the best pooled
F1 over the *other two* folders' files is applied to it, so the selection for a folder never sees that folder's
labels; the reported counts pool the 34 files' held-out predictions. Ties go to the first configuration in grid
order. A deployment configuration (best pooled F1 over all 34 files) is recorded as well; it is chosen
in-sample and is not a result. Scores depend only on (lag, smoothing), so they are computed once per file and the
thresholds and persistence rules are swept over them at once (:func:`sweep_grid`).

``drift``: :class:`inspection.anomaly.DriftTrackingDetector`. Everything it learns beyond a file's own first 400
rows comes from the anomaly-free recording (which the protocol allows as extra normal data), never from the
labelled files: the recording is cut into segments as long as a labelled file, starting every
``SEGMENT_STRIDE`` rows; on each, the detector is fitted on the first 400 rows exactly as in the protocol and run
on the rest. From those runs come each channel's typical deviation from its drift-tracking baseline (the
per-channel scales) and the margin, the smallest one whose false-alarm rate on the segments is at most
``target_far`` (see :func:`inspection.anomaly.learn_normal_drift`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inspection.anomaly import (
    PERSISTENCE_RULES,
    SMOOTHINGS,
    DriftTrackingConfig,
    DriftTrackingDetector,
    SlopeT2Config,
    SlopeT2Detector,
    learn_normal_drift,
    normal_segments,
    persistent_alarms,
)
from inspection.config import to_dict
from inspection.errors import ConfigError, DataError
from inspection.evaluation import ANCHORS, write_result

SEGMENT_ROWS = 1150  # about the length of a labelled SKAB file
SEGMENT_STRIDE = 50  # rows between the starts of overlapping normal segments (166 segments of the 9,405 rows)

DETECTORS: tuple[str, ...] = ("slope-t2", "drift")
"""Detectors :func:`evaluate_skab` can run; the first is the default."""

#: Count columns of :attr:`GridSweep.counts`.
COUNTS = ("tp", "fp", "tn", "fn")


def skab_slope_config(**params) -> SlopeT2Config:
    """A :class:`SlopeT2Config` for SKAB rows: the columns of ``skab.FEATURES``, the two temperature channels
    differenced, every other channel as its level; ``params`` set the free parameters."""
    from inspection.data import skab

    return SlopeT2Config(channels=skab.FEATURES, differenced=skab.TEMPERATURE_CHANNELS, **params)


@dataclass(frozen=True)
class SelectionGrid:
    """The configurations the leave-one-folder-out selection searches, in grid order (lag, smoothing, quantile,
    factor, persistence; the last varies fastest).

    Attributes:
        lags: rows between the two readings of a temperature difference.
        smoothings: ``("box", window rows)`` or ``("ewma", rate λ)`` pairs.
        quantiles: quantiles of the fitting rows' scores a threshold starts from, in (0, 1].
        factors: multipliers on that quantile.
        persistences: ``(rule, rows)`` pairs, rule ``"all"`` or ``"majority"``.
    """

    lags: tuple[int, ...] = (20, 30, 60)
    smoothings: tuple[tuple[str, float], ...] = (
        ("ewma", 0.05), ("ewma", 0.1), ("ewma", 0.2), ("box", 10), ("box", 30), ("box", 60))
    quantiles: tuple[float, ...] = (0.99, 0.999, 1.0)
    factors: tuple[float, ...] = (0.8, 1.0, 1.1, 1.2, 1.33, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
    persistences: tuple[tuple[str, int], ...] = (
        ("all", 1), ("all", 5), ("all", 10), ("all", 30), ("all", 60),
        ("majority", 5), ("majority", 15), ("majority", 30))

    def __post_init__(self) -> None:
        for name in ("lags", "smoothings", "quantiles", "factors", "persistences"):
            if not getattr(self, name):
                raise ConfigError(f"SelectionGrid.{name} must hold at least one value; got none")
        for kind, _ in self.smoothings:
            if kind not in SMOOTHINGS:
                raise ConfigError(f"SelectionGrid.smoothings: kind must be one of {SMOOTHINGS}; got {kind!r}")
        for rule, _ in self.persistences:
            if rule not in PERSISTENCE_RULES:
                raise ConfigError(f"SelectionGrid.persistences: rule must be one of {PERSISTENCE_RULES}; "
                                  f"got {rule!r}")
        # every value is validated by building the configurations once
        self.configs()

    @property
    def size(self) -> int:
        """Number of configurations."""
        return (len(self.lags) * len(self.smoothings) * len(self.quantiles) * len(self.factors)
                * len(self.persistences))

    def scorers(self) -> list[SlopeT2Config]:
        """One configuration per (lag, smoothing), in grid order; their threshold fields are placeholders."""
        out = []
        for lag in self.lags:
            for kind, value in self.smoothings:
                smooth = {"window": int(value)} if kind == "box" else {"rate": float(value)}
                out.append(skab_slope_config(lag=lag, smoothing=kind, **smooth))
        return out

    def configs(self) -> list[SlopeT2Config]:
        """All configurations, in grid order (the order of :attr:`GridSweep.counts`)."""
        return [dataclasses.replace(s, quantile=q, factor=a, rule=rule, persistence=k)
                for s in self.scorers() for q in self.quantiles for a in self.factors
                for rule, k in self.persistences]

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass(frozen=True)
class GridSweep:
    """Confusion counts of every grid configuration on every file's test part.

    Attributes:
        configs: the configurations, in grid order, [C].
        files: file names, [N].
        folders: each file's folder, [N].
        counts: TP, FP, TN, FN (see :data:`COUNTS`) of configuration c on file n, int64 [C, N, 4].
    """

    configs: tuple[SlopeT2Config, ...]
    files: tuple[str, ...]
    folders: tuple[str, ...]
    counts: np.ndarray


def _folder(name: str) -> str:
    return name.split("/", 1)[0]


def _check_files(files: Sequence) -> None:
    if not files:
        raise DataError("need at least one labelled SKAB file; got none")
    unlabelled = [f.name for f in files if f.anomaly is None]
    if unlabelled:
        raise DataError(f"every file needs anomaly labels to be scored; {unlabelled} have none")


def sweep_grid(files: Sequence, grid: SelectionGrid = SelectionGrid()) -> GridSweep:
    """Run every configuration of ``grid`` on every file with the protocol (fit on the first 400 rows, predict
    the rest) and count TP/FP/TN/FN per file.

    For each (lag, smoothing) a :class:`SlopeT2Detector` is fitted and scores the test rows once; the
    thresholds (quantile of the fitting rows' scores × factor, [Q, A]) and persistence rules ([P]) are then
    applied to those scores together. Predictions equal those of the detector built with each configuration.

    Args:
        files: labelled :class:`inspection.data.skab.SkabFile` recordings.
        grid: the configurations.

    Raises:
        DataError: no files, or a file without labels.
    """
    from inspection.data import skab

    _check_files(files)
    quantiles = np.asarray(grid.quantiles, dtype=np.float64)
    factors = np.asarray(grid.factors, dtype=np.float64)
    scorers = grid.scorers()
    per = len(quantiles) * len(factors) * len(grid.persistences)
    counts = np.zeros((len(scorers) * per, len(files), 4), dtype=np.int64)  # [C, N, 4]
    for n, file in enumerate(files):
        train, test = skab.protocol_split(file)
        truth = test.anomaly.astype(bool)  # [T]
        for s, scorer in enumerate(scorers):
            detector = SlopeT2Detector(scorer).fit(train.values)
            t2 = detector.score(test.values)  # [T]
            base = np.array([np.nanquantile(detector.fitted_scores, q) for q in quantiles])  # [Q]
            raw = t2 > (base[:, None] * factors[None, :])[..., None]  # [Q, A, T]
            alarms = np.stack([persistent_alarms(raw, rule, k) for rule, k in grid.persistences],
                              axis=-2)  # [Q, A, P, T]
            tp = (alarms & truth).sum(-1)
            fp = (alarms & ~truth).sum(-1)
            fn = truth.sum() - tp
            tn = (~truth).sum() - fp
            counts[s * per:(s + 1) * per, n] = np.stack([tp, fp, tn, fn], axis=-1).reshape(per, 4)
    return GridSweep(configs=tuple(grid.configs()), files=tuple(f.name for f in files),
                     folders=tuple(_folder(f.name) for f in files), counts=counts)


def pooled_f1(counts: np.ndarray) -> np.ndarray:
    """F1 = TP / (TP + (FP + FN) / 2) of pooled counts ``[..., 4]`` (NaN when there is nothing to score)."""
    tp, fp, _, fn = np.moveaxis(np.asarray(counts), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + (fp + fn) / 2)


@dataclass(frozen=True)
class FolderChoice:
    """The configuration chosen for one held-out folder.

    Attributes:
        folder: the held-out folder.
        index: the configuration's position in the grid.
        config: the configuration.
        f1_other_folders: its pooled F1 over the other folders' files (what it was chosen by).
        held_out: its pooled TP, FP, TN, FN on the held-out folder's files, int64 [4].
    """

    folder: str
    index: int
    config: SlopeT2Config
    f1_other_folders: float
    held_out: np.ndarray


def leave_one_folder_out(sweep: GridSweep) -> list[FolderChoice]:
    """For each folder (in order of first appearance), choose the configuration with the best pooled F1 over the
    other folders' files (the first in grid order on ties); the held-out folder's counts are never looked at
    when choosing.

    Raises:
        DataError: fewer than two folders.
    """
    folders = np.asarray(sweep.folders)
    names = list(dict.fromkeys(sweep.folders))
    if len(names) < 2:
        raise DataError(f"leave-one-folder-out needs files from at least two folders; got {names}")
    out = []
    for name in names:
        held = folders == name
        f1 = pooled_f1(sweep.counts[:, ~held].sum(axis=1))  # [C]
        if np.all(np.isnan(f1)):
            raise DataError(f"no configuration has a defined F1 on the folders other than {name!r}")
        best = int(np.nanargmax(f1))
        out.append(FolderChoice(folder=name, index=best, config=sweep.configs[best],
                                f1_other_folders=float(f1[best]), held_out=sweep.counts[best, held].sum(axis=0)))
    return out


def _protocol_summary(files: Sequence, y_true: list[np.ndarray], ours, *, metric: str, split: str, seed: int,
                      model_version: str) -> dict:
    """The summary keys both detectors report: our pooled metrics beside the anchors and this harness's
    reproduction of the leaderboard's Hotelling T² row."""
    from inspection.data import skab

    t2 = skab.skab_score(y_true, [skab.hotelling_t2_baseline(f) for f in files])
    return {
        "metric": metric,
        "value": ours.f1,
        "far": ours.far,
        "mar": ours.mar,
        "baselines": {**ANCHORS["skab"], "T-squared, this harness": round(t2.f1, 4)},
        "baselines_far_mar": {"Conv-AE (published)": [13.55, 28.02], "T-squared, this harness": [t2.far, t2.mar]},
        "split": "published SKAB protocol: per file, first 400 rows fit (normal only), the rest tested" + split,
        "seed": seed,
        "model_version": model_version,
    }


def _counts(score) -> dict[str, int]:
    return {k: getattr(score, k) for k in COUNTS}


def evaluate_skab(*, results_dir: Path | str = "runs/results", seed: int = 0, root=None,
                  detector: str = "slope-t2", config: DriftTrackingConfig | None = None,
                  target_far: float | None = 0.10, grid: SelectionGrid | None = None) -> Path:
    """Run the protocol; write ``skab.json`` (headline F1, with FAR and MAR).

    Args:
        results_dir: folder of the result file.
        seed: recorded only; both detectors are deterministic.
        root: the SKAB folder (default: see :func:`inspection.data.skab.skab_root`).
        detector: ``"slope-t2"`` (leave-one-folder-out selection over ``grid``) or ``"drift"``.
        config: the drift detector's configuration (default :class:`DriftTrackingConfig`); ``drift`` only.
        target_far: false-alarm rate the drift detector's margin is calibrated to on the anomaly-free recording,
            in (0, 1); ``drift`` only.
        grid: the configurations the slope-t2 selection searches (default :class:`SelectionGrid`).

    Raises:
        ConfigError: an unknown detector, or an option that the chosen detector does not take.
    """
    if detector not in DETECTORS:
        raise ConfigError(f"unknown SKAB detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if detector == "drift":
        if grid is not None:
            raise ConfigError("grid applies to the slope-t2 detector only; the drift detector has no selection")
        return _evaluate_drift(results_dir=results_dir, seed=seed, root=root, config=config, target_far=target_far)
    if config is not None:
        raise ConfigError("config is the drift detector's; the slope-t2 configuration is chosen from the grid")
    return _evaluate_slope_t2(results_dir=results_dir, seed=seed, root=root, grid=grid or SelectionGrid())


def _evaluate_slope_t2(*, results_dir, seed: int, root, grid: SelectionGrid) -> Path:
    from inspection.data import skab

    started = time.perf_counter()
    files = skab.load_skab(root)
    sweep = sweep_grid(files, grid)  # its counts are those of the detector built with each configuration
    choices = leave_one_folder_out(sweep)
    chosen = {c.folder: c for c in choices}
    per_file, held_out = [], []
    for n, f in enumerate(files):
        choice = chosen[_folder(f.name)]
        held_out.append(sweep.counts[choice.index, n])
        one = skab.SkabScore.from_counts(*held_out[-1])
        per_file.append({"file": f.name, "config": choice.config.label, "f1": one.f1, "far": one.far,
                         "mar": one.mar})
    ours = skab.SkabScore.from_counts(*np.sum(held_out, axis=0))
    per_folder = {c.folder: {"files": sweep.folders.count(c.folder), "config": c.config.label, "index": c.index,
                             "f1_other_folders": c.f1_other_folders,
                             "held_out": asdict(skab.SkabScore.from_counts(*c.held_out)),
                             "detector": c.config.to_dict()}
                  for c in choices}
    pooled = sweep.counts.sum(axis=1)  # [C, 4]
    best = int(np.nanargmax(pooled_f1(pooled)))
    deploy = sweep.configs[best]
    y_true = [skab.protocol_split(f)[1].anomaly for f in files]
    summary = {
        **_protocol_summary(
            files, y_true, ours, seed=seed,
            metric="F1 (pooled over the 34 files' test parts; each folder predicted with the configuration chosen "
                   "on the other two folders)",
            split="; free parameters chosen leave-one-folder-out (valve1 / valve2 / other)",
            model_version=f"slope-t2:leave-one-folder-out over {grid.size} configurations; "
                          + "; ".join(f"{c.folder}: {c.config.label}" for c in choices)),
        "runtime_s": round(time.perf_counter() - started, 1),
        "selection": {
            "protocol": "for each folder, the configuration with the best pooled F1 over the other two folders' "
                        "files (first in grid order on ties) predicts that folder; the selection never sees the "
                        "held-out folder's labels",
            "grid_size": grid.size,
            "grid": grid.to_dict(),
            "features": "levels of " + ", ".join(c for c in skab.FEATURES if c not in skab.TEMPERATURE_CHANNELS)
                        + "; lag-row differences of " + ", ".join(skab.TEMPERATURE_CHANNELS),
            "per_folder": per_folder,
            "deployment": {
                "chosen": "in-sample: best pooled F1 over all 34 files; optimistic, not a result",
                "config": deploy.label,
                "detector": deploy.to_dict(),
                "in_sample": asdict(skab.SkabScore.from_counts(*pooled[best])),
            },
        },
    }
    return write_result("skab", summary, {"counts": _counts(ours), "per_folder": per_folder, "per_file": per_file},
                        results_dir)


def _evaluate_drift(*, results_dir, seed: int, root, config: DriftTrackingConfig | None,
                    target_far: float | None) -> Path:
    from inspection.data import skab

    if target_far is None:
        raise ConfigError("target_far is required: the margin is calibrated on the anomaly-free recording")
    config = config or DriftTrackingConfig()
    free = skab.load_skab_anomaly_free(root).values
    segments = normal_segments(free, SEGMENT_ROWS, SEGMENT_STRIDE)
    drift = learn_normal_drift(segments, config, train_rows=skab.TRAIN_ROWS, target_far=target_far)
    files = skab.load_skab(root)
    y_true, y_pred, per_file = [], [], []
    for f in files:
        train, test = skab.protocol_split(f)
        pred = DriftTrackingDetector(config, drift).fit(train.values).predict(test.values)
        y_true.append(test.anomaly)
        y_pred.append(pred)
        one = skab.skab_score([test.anomaly], [pred])
        per_file.append({"file": f.name, "f1": one.f1, "far": one.far, "mar": one.mar})
    ours = skab.skab_score(y_true, y_pred)
    summary = {
        **_protocol_summary(
            files, y_true, ours, seed=seed, metric="F1 (pooled over the 34 files' test parts)", split="",
            model_version="drift-tracking:" + ",".join(f"{k}={v}" for k, v in asdict(config).items())
            + f",margin={drift.margin:.4g}"),
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
    return write_result("skab", summary, {"counts": _counts(ours), "per_file": per_file}, results_dir)
