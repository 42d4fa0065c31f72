"""Normal-only detection on the benchmarks: which units fit, calibrate and test, the metrics, and the stored
versions of ``inspection train|calibrate|evaluate --bench B --mode normal-only``.

For each benchmark, a :class:`~inspection.normal_only.NormalOnlyDetector` (features from the benchmark's default
model's encoders and preprocessing) is fitted on the **defect-free training units only**, calibrated (deviation
standardisation and the threshold at a target false-alarm rate) on the **validation split's defect-free units**,
and scored on the test split, whose labels are read only for the metrics:

- composite: ``ok`` units of the composite training split (:data:`COMPOSITE_SIZES` units drawn per split);
  per-modality AUROC of each modality's standardised deviation against "this modality is a culprit", and how
  often the largest deviation names the culprit of single-culprit units (the constructed pairing of real
  readings: see :mod:`inspection.data.composite`);
- elpv: p = 0 training cells (severity 0, class ``ok``); test defective = p >= 0.5 as in the supervised
  benchmark, so p = 1/3 cells count as good; AUROCs of p = 0 against p >= 0.5 and against p > 0 beside it;
- bearings: healthy windows of the training recordings of each fold of the grouped cross-validation; folds
  whose test recordings hold no healthy one have no AUROC and no false-alarm rate, only recall.

``bench/normal_only.py`` runs all of it in memory; the command line stores one calibrated detector per bench,
seed and fold in the store family ``<bench>-normal-only`` (:func:`train_normal_bench`), re-chooses its threshold
(:func:`calibrate_normal_bench`) and evaluates it (:func:`evaluate_normal_bench`) on the same units, which are
rebuilt from the card's data spec and checked by digest.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inspection.benches import BEARINGS_FOLDS, default_model_config, load_bench
from inspection.data._common import ids_digest
from inspection.errors import ConfigError, StoreError
from inspection.evaluation import binary_metrics, write_result
from inspection.normal_only import DEFECT_CLASS, MODE, NormalOnlyConfig, NormalOnlyDetector, NormalOnlyScores
from inspection.records import MODALITIES, Unit
from inspection.store import DEFAULT_KEEP, ModelStore, ModelVersion

log = logging.getLogger(__name__)

#: Benchmarks with a normal-only protocol here (SKAB has its own: :mod:`inspection.skab_protocol`).
BENCHES = ("composite", "elpv", "bearings")
#: Composite units drawn per split: the ``ok`` training units fit, the ``ok`` validation units calibrate.
COMPOSITE_SIZES = {"n_train": 1000, "n_val": 500, "n_test": 1000}
#: ELPV: share of the training split held out for validation (its p = 0 cells calibrate), as the supervised bench.
ELPV_VAL_FRACTION = 0.15
DEFAULT_TARGET_FAR = 0.01
#: The headline number of each bench in a result file.
HEADLINE = {"composite": "auroc", "elpv": "auroc", "bearings": "auroc_mean_over_folds_with_healthy_test"}
#: Result file (in a results folder) of normal-only evaluations, one entry per bench.
RESULT_NAME = "normal_only"


def family(bench: str) -> str:
    """The store family of a bench's normal-only versions (apart from its supervised ``<bench>`` family)."""
    return f"{bench}-{MODE}"


def subset(units: list[Unit], limit: int | None, seed: int) -> list[Unit]:
    """At most ``limit`` units, drawn with ``seed`` (order kept); all of them without a limit."""
    if not limit or len(units) <= limit:
        return units
    keep = np.sort(np.random.default_rng(seed).choice(len(units), limit, replace=False))
    return [units[i] for i in keep]


# --------------------------------------------------------------------------------------------- splits
@dataclass
class NormalSplit:
    """The units of one normal-only benchmark run.

    Attributes:
        bench, seed, fold: which split (``fold`` for bearings only).
        fit: defect-free training units (the Gaussians).
        calibration: defect-free validation units (the standardisation and the threshold).
        test: the test units (labelled; for the metrics only).
        config: the detector's features (the bench's default model's encoders).
        spec: what rebuilds the split: limit, image size, composite sizes.
        notes: the bench's notes.
    """

    bench: str
    seed: int
    fold: int | None
    fit: list[Unit]
    calibration: list[Unit]
    test: list[Unit]
    config: NormalOnlyConfig
    spec: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def data_card(self) -> dict:
        """The card's ``data``: the spec that rebuilds the split and digests of its unit ids."""
        return {"bench": self.bench, "seed": self.seed, "fold": self.fold, **self.spec,
                "fit_units": len(self.fit), "calibration_units": len(self.calibration), "test_units": len(self.test),
                "fit_ids_sha256": ids_digest([u.unit_id for u in self.fit]),
                "calibration_ids_sha256": ids_digest([u.unit_id for u in self.calibration]),
                "test_ids_sha256": ids_digest([u.unit_id for u in self.test]), "notes": list(self.notes)}


def normal_split(bench: str, seed: int = 0, *, fold: int | None = None, limit: int | None = None,
                 image_size: int = 224, n_train: int | None = None, n_val: int | None = None,
                 n_test: int | None = None) -> NormalSplit:
    """The fitting, calibration and test units of a bench (see the module docstring).

    Args:
        bench: ``composite``, ``elpv`` or ``bearings``.
        seed: the bench's split seed.
        fold: bearings: the cross-validation fold (required there, refused elsewhere).
        limit: at most this many units per role (fit, calibration, test), drawn with the seed.
        image_size: side of the images the vision backbone reads (composite, elpv).
        n_train, n_val, n_test: composite units drawn per split (default :data:`COMPOSITE_SIZES`).

    Raises:
        ConfigError: an unknown bench, a fold where none applies or none where one is needed, sizes outside
            composite.
    """
    if bench not in BENCHES:
        raise ConfigError(f"no normal-only protocol for bench {bench!r}; known: {', '.join(BENCHES)} (SKAB: "
                          "`inspection evaluate --bench skab`)")
    if (fold is None) == (bench == "bearings"):
        raise ConfigError("bearings needs a cross-validation fold; other benches have none" if fold is None else
                          f"--fold applies to bearings only, not {bench}")
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    if bench != "composite" and any(v is not None for v in sizes.values()):
        raise ConfigError("n_train / n_val / n_test apply to the composite bench only")
    spec: dict = {"limit": limit}
    if bench == "composite":
        sizes = {k: COMPOSITE_SIZES[k] if v is None else v for k, v in sizes.items()}
        data = load_bench("composite", seed, **sizes)
        ok = lambda u: not u.label.defect  # noqa: E731
        config = NormalOnlyConfig(default_model_config("composite", image_size=image_size).encoders)
        spec.update(sizes, image_size=image_size)
    elif bench == "elpv":
        data = load_bench("elpv", seed, val_fraction=ELPV_VAL_FRACTION)

        def ok(u: Unit) -> bool:
            return not u.label.defect and u.label.defect_class == "ok" and (u.label.severity or 0.0) == 0.0

        config = NormalOnlyConfig(default_model_config("elpv", image_size=image_size).encoders)
        spec.update(image_size=image_size, val_fraction=ELPV_VAL_FRACTION)
    else:
        data = load_bench("bearings", seed, fold=fold)
        ok = lambda u: not u.label.defect  # noqa: E731
        config = NormalOnlyConfig(default_model_config("bearings").encoders)
        spec.update(folds=data.folds)
    return NormalSplit(bench, seed, fold, subset([u for u in data.train if ok(u)], limit, seed),
                       subset([u for u in data.val if ok(u)], limit, seed + 1), subset(data.test, limit, seed + 2),
                       config, spec, list(data.notes))


def split_from_card(card: dict) -> NormalSplit:
    """The split a stored bench version was fitted and calibrated on, rebuilt from its card's ``data`` and
    checked against its digests.

    Raises:
        ConfigError: the card has no bench data, or the rebuilt units differ (the data sets changed).
    """
    data = card.get("data")
    if not isinstance(data, dict) or data.get("bench") not in BENCHES:
        raise ConfigError(f"version {card.get('version')} was not trained on a bench (`inspection train --bench B "
                          "--mode normal-only`)")
    kw = {k: data[k] for k in ("n_train", "n_val", "n_test", "image_size") if data.get(k) is not None}
    split = normal_split(data["bench"], data["seed"], fold=data.get("fold"), limit=data.get("limit"), **kw)
    got = split.data_card()
    changed = [k for k in ("fit_ids_sha256", "calibration_ids_sha256", "test_ids_sha256") if got[k] != data[k]]
    if changed:
        raise ConfigError(f"the {data['bench']} units of version {card.get('version')} differ from those it was "
                          f"trained on ({', '.join(changed)}); the data set changed: train a new version")
    return split


# ---------------------------------------------------------------------------------------------- metrics
def fit_and_calibrate(config: NormalOnlyConfig, fit_units: list[Unit], cal_units: list[Unit], target_far: float,
                      device: str) -> tuple[NormalOnlyDetector, dict]:
    """A detector fitted on ``fit_units`` and calibrated on ``cal_units``, and what the result records of it."""
    det = NormalOnlyDetector(config).to(device)
    t0 = time.perf_counter()
    det.fit(fit_units)
    t1 = time.perf_counter()
    det.calibrate(cal_units, target_far)
    t2 = time.perf_counter()
    info = detector_info(det, len(fit_units), len(cal_units))
    info.update(fit_s=round(t1 - t0, 1), calibrate_s=round(t2 - t1, 1))
    return det, info


def detector_info(det: NormalOnlyDetector, n_fit: int, n_calibration: int) -> dict:
    """Unit counts, threshold and fitted state of a calibrated detector, as a result records them."""
    return {"n_fit": n_fit, "n_calibration": n_calibration,
            "target_far": det.target_far, "threshold": det.threshold, "calibration_far": det.calibration_far,
            "shrinkage": {m: g.shrinkage for m, g in det.gaussians.items()},
            "feature_dims": {m: int(g.mean.size) for m, g in det.gaussians.items()},
            "standardisation": {m: {"centre": c, "scale": s} for m, (c, s) in det.standardisation.items()}}


def metrics_on_test(scores: NormalOnlyScores, units: list[Unit]) -> dict:
    """AUROC and F1 / FAR / recall at the calibrated threshold, on labelled test units."""
    y = np.array([u.label.defect for u in units])
    m = binary_metrics(scores.score, y, scores.threshold)
    return {"n_test": len(units), "n_defective": int(y.sum()), "auroc": m.get("auroc"), "f1": m["f1"],
            "far": m["far"] if (~y).any() else None, "recall": 1.0 - m["mar"] if y.any() else None,
            "accuracy": m["accuracy"], "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"]}


def rate_by(units: list[Unit], scores: NormalOnlyScores, key: Callable[[Unit], str]) -> dict:
    """Share of units alarmed, per group."""
    groups: dict[str, list[bool]] = {}
    for u, d in zip(units, scores.decision, strict=True):
        groups.setdefault(key(u), []).append(bool(d))
    return {g: {"n": len(v), "alarm_rate": float(np.mean(v))} for g, v in sorted(groups.items())}


def _recording(u: Unit) -> str:
    return u.provenance["vibration"].split(":")[1].split("@")[0]


def bench_metrics(split: NormalSplit, scores: NormalOnlyScores) -> dict:
    """The bench's own measures beside :func:`metrics_on_test` (see the module docstring)."""
    from sklearn.metrics import roc_auc_score

    test = split.test
    out: dict = {}
    if split.bench == "composite":
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
        out["recall_by_class"] = rate_by(test, scores, lambda u: u.label.defect_class)
        false_alarms = [top[i] for i, u in enumerate(test) if scores.decision[i] and not u.label.defect]
        out["false_alarms_by_top_modality"] = {m: false_alarms.count(m) for m in MODALITIES}
        out["notes"] = list(split.notes) + ["per-modality AUROC: each modality's standardised deviation against "
                                            "'this modality is a culprit', over all test units"]
    elif split.bench == "elpv":
        sev = np.array([u.label.severity or 0.0 for u in test])
        strict = (sev == 0) | (sev >= 0.5)
        out["auroc_p0_vs_p_ge_half"] = float(roc_auc_score(sev[strict] >= 0.5, scores.score[strict]))
        out["auroc_p0_vs_p_gt0"] = float(roc_auc_score(sev > 0, scores.score))
        out["alarm_rate_by_probability"] = rate_by(test, scores, lambda u: f"p={u.label.severity or 0.0:.2f}")
        out["notes"] = ["test defective = p >= 0.5 (as the supervised benchmark); p = 1/3 cells count as good",
                        "fit on p = 0 training cells only; calibration on p = 0 validation cells"]
    else:
        out["recordings"] = {"fit": sorted({_recording(u) for u in split.fit}),
                             "calibration": sorted({_recording(u) for u in split.calibration})}
        out["alarm_rate_by_recording"] = rate_by(test, scores, _recording)
        rates = {u.vibration.sample_rate_hz for u in test if not u.label.defect}
        same = [i for i, u in enumerate(test) if u.vibration.sample_rate_hz in rates]
        ys = np.array([test[i].label.defect for i in same])
        if same and 0 < ys.sum() < len(ys):
            out["auroc_same_rate"] = float(roc_auc_score(ys, scores.score[same]))
    return out


def score_split(det: NormalOnlyDetector, split: NormalSplit) -> tuple[NormalOnlyScores, dict]:
    """Score the split's test units: the scores, and the timing, :func:`metrics_on_test` and
    :func:`bench_metrics` of them."""
    t0 = time.perf_counter()
    scores = det.score(split.test)
    out = {"score_s": round(time.perf_counter() - t0, 1)}
    out.update(metrics_on_test(scores, split.test))
    out.update(bench_metrics(split, scores))
    return scores, out


def pool_folds(folds: dict[str, dict], scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict:
    """The bearings result over its folds: each fold's result, the mean AUROC of the folds that have one, and the
    pooled AUROC, recall and false-alarm rate of every fold's test windows (each scored by its own detector)."""
    from sklearn.metrics import roc_auc_score

    s, y = np.concatenate(scores), np.concatenate(labels)
    aurocs = [f["auroc"] for f in folds.values() if f["auroc"] is not None]
    healthy = sum(f["tn"] + f["fp"] for f in folds.values())
    faulty = sum(f["tp"] + f["fn"] for f in folds.values())
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


def supervised_reference(bench: str, results_dir: Path | str, shown_as: str | None = None) -> dict | None:
    """The supervised model's headline numbers from ``<results_dir>/<bench>.json``, labelled with that file (or
    ``shown_as``); None when there is none."""
    path = Path(results_dir) / f"{bench}.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())["summary"]
    return {"source": f"{shown_as or path} (supervised model)", "metric": s.get("metric"), "value": s.get("value"),
            "auroc": s.get("auroc"), "split": s.get("split"), "seed": s.get("seed"), "machine": s.get("machine"),
            "commit": s.get("commit")}


def record_result(path: Path | str, bench: str, result: dict, seed: int) -> Path:
    """Merge one bench's result into the normal-only result file ``path`` (other benches' entries are kept) and
    rewrite its summary."""
    path = Path(path)
    previous = json.loads(path.read_text()) if path.exists() else {}
    benches = dict(previous.get("benches", {}))
    benches[bench] = result
    summary = {
        "metric": "AUROC (normal-only: fitted on defect-free units, calibrated on defect-free validation units)",
        "value": {b: r[HEADLINE[b]] for b, r in benches.items()},
        "baselines": {b: r["supervised"] for b, r in benches.items() if r.get("supervised")},
        "method": "per-modality Gaussian (Ledoit-Wolf) Mahalanobis deviations, z of log-distance on held-out "
                  "normal units, max over modalities (inspection/normal_only.py)",
        "split": "train defect-free units fit, validation defect-free units calibrate, test split scored",
        "seed": seed,
    }
    return write_result(path.stem, summary, {"benches": benches}, results_dir=path.parent)


# ------------------------------------------------------------------------------------------ model store
def _folds(bench: str, fold: int | None) -> list[int | None]:
    if bench != "bearings":
        if fold is not None:
            raise ConfigError(f"--fold applies to bearings only, not {bench}")
        return [None]
    return list(range(BEARINGS_FOLDS)) if fold is None else [fold]


def train_normal_bench(bench: str, seed: int = 0, *, store_root: Path | str, fold: int | None = None,
                       target_far: float = DEFAULT_TARGET_FAR, image_size: int = 224, device: str = "cpu",
                       keep: int = DEFAULT_KEEP) -> list[ModelVersion]:
    """Fit and calibrate a bench's normal-only detector (every bearings fold unless ``fold`` names one) and save
    each, calibrated and promoted, to ``<store_root>/<bench>-normal-only``, which then keeps its newest ``keep``.

    Returns:
        The saved versions, in fold order.

    Raises:
        ConfigError: an unknown bench, a fold outside bearings, ``target_far`` outside (0, 1).
        DataError: the bench's data is not installed.
    """
    store = ModelStore(Path(store_root) / family(bench), keep=keep)
    saved = []
    for k in _folds(bench, fold):
        split = normal_split(bench, seed, fold=k, image_size=image_size)
        det, info = fit_and_calibrate(split.config, split.fit, split.calibration, target_far, device)
        card = {"name": family(bench), "bench": bench, "seed": seed, "fold": k, "data": split.data_card(),
                "defect_class": DEFECT_CLASS,
                "units_used": {"fit": len(split.fit), "calibration": len(split.calibration)},
                "calibration": {"method": "far", "target_far": det.target_far, "threshold": det.threshold,
                                "calibration_far": det.calibration_far, "n_units": len(split.calibration)},
                "fit_seconds": info["fit_s"] + info["calibrate_s"]}
        saved.append(det.save(store, card, promote=True))
        log.info("saved normal-only %s seed %d%s as %s", bench, seed, "" if k is None else f" fold {k}",
                 saved[-1].version)
    return saved


def calibrate_normal_bench(store: ModelStore, version: str | None, target_far: float, *,
                           device: str = "cpu") -> ModelVersion:
    """Re-choose the threshold of a bench's normal-only version at ``target_far`` on its calibration units
    (rebuilt and checked by digest); saves a new, promoted version whose card names its ``parent``.

    Raises:
        ConfigError: not a bench's normal-only version, its units changed, ``target_far`` outside (0, 1).
    """
    from inspection.own_training import save_recalibrated

    base = store.get(version) if version else store.promoted()
    if base is None:
        raise ConfigError(f"no promoted model in {store.root}; name a version (--version)")
    det, card = NormalOnlyDetector.load(store, base.version)
    split = split_from_card(card)
    det.to(device).calibrate(split.calibration, target_far)
    return save_recalibrated(store, base, det, card, len(split.calibration))


def _newest(store: ModelStore, seed: int) -> dict[int | None, ModelVersion]:
    """The newest normal-only version per fold of a split seed."""
    found: dict[int | None, ModelVersion] = {}
    for v in store.versions():  # oldest first: the newest wins
        if v.card.get("mode") == MODE and v.card.get("seed") == seed:
            found[v.card.get("fold")] = v
    return found


def evaluate_normal_bench(bench: str, store_root: Path | str, seed: int = 0, *, results_dir: Path | str,
                          device: str = "cpu", reference_dir: Path | str | None = None) -> Path:
    """Score the test split of a bench with its newest stored normal-only version (per fold for bearings: every
    fold must be there) and merge the result into ``<results_dir>/normal_only.json``, beside the supervised
    model's result in ``<reference_dir>/<bench>.json`` (default: ``results_dir``) where there is one.

    Raises:
        StoreError: no stored version for the seed (or a fold without one).
        ConfigError: a version's units differ from the data now.
    """
    store = ModelStore(Path(store_root) / family(bench))
    found = _newest(store, seed) if store.root.exists() else {}
    wanted = _folds(bench, None)
    missing = [k for k in wanted if k not in found]
    if missing:
        what = f"seed {seed}" + (f" folds {missing}" if bench == "bearings" else "")
        raise StoreError(f"{store.root} has no normal-only version for {what}; run `inspection train --bench {bench} "
                         f"--mode normal-only --seed {seed}` first")
    t0 = time.perf_counter()
    results, pooled_scores, pooled_y = {}, [], []
    for k in wanted:
        det, card = NormalOnlyDetector.load(store, found[k].version)
        split = split_from_card(card)
        scores, res = score_split(det.to(device), split)
        info = detector_info(det, len(split.fit), len(split.calibration))
        results[k] = {**info, **res, "version": found[k].version}
        pooled_scores.append(scores.score)
        pooled_y.append(np.array([u.label.defect for u in split.test]))
    if bench == "bearings":
        result = pool_folds({str(k): r for k, r in results.items()}, pooled_scores, pooled_y)
    else:
        result = results[None]
    from inspection.evaluation import current_commit, machine_description

    result.update(wall_s=round(time.perf_counter() - t0, 1), seed=seed, device=device, machine=machine_description(),
                  commit=current_commit(), supervised=supervised_reference(bench, reference_dir or results_dir))
    return record_result(Path(results_dir) / f"{RESULT_NAME}.json", bench, result, seed)


__all__ = [
    "BENCHES", "COMPOSITE_SIZES", "DEFAULT_TARGET_FAR", "HEADLINE", "NormalSplit", "bench_metrics",
    "calibrate_normal_bench", "detector_info", "evaluate_normal_bench", "family", "fit_and_calibrate",
    "metrics_on_test", "normal_split", "pool_folds", "rate_by", "record_result", "score_split", "split_from_card",
    "subset", "supervised_reference", "train_normal_bench",
]
