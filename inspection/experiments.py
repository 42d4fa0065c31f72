"""Benchmark experiments end to end: train -> store, calibrate -> store, evaluate -> bench/results.

Stores are per model family: ``<store>/<bench>`` for the full model of a bench, ``<store>/<bench>-<modality>``
for a composite model restricted to one modality (the single-modality baselines). Every stored version's card
says which bench, split seed, configs and data it was trained on, so calibration and evaluation rebuild exactly
the right splits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inspection.benches import BenchData, default_model_config, load_bench
from inspection.calibration import Calibration, calibrate, choose_threshold, fixed_calibration
from inspection.data._common import ids_digest as _ids_digest
from inspection.errors import ConfigError, StoreError
from inspection.evaluation import (
    ANCHORS,
    binary_metrics,
    evaluate_units,
    late_fusion_score,
    logit,
    margin,
    plot_roc_confusion,
    predict_units,
    write_result,
)
from inspection.model import InspectionModel, ModelConfig
from inspection.progress import Progress, format_duration
from inspection.records import MODALITIES, Unit
from inspection.stats import clopper_pearson, f1_interval, grouped_accuracy_interval, seed_interval, wilson
from inspection.store import DEFAULT_KEEP, ModelStore, ModelVersion
from inspection.training import PreparedSet, TrainConfig, predict, train_supervised

log = logging.getLogger(__name__)


def family(bench: str, modalities: Sequence[str] | None = None) -> str:
    return bench if not modalities else f"{bench}-{'+'.join(modalities)}"


def _data_card(data: BenchData, val_fraction: float | None = None) -> dict:
    return {
        "bench": data.bench, "seed": data.seed, "fold": data.fold, "folds": data.folds, "notes": list(data.notes),
        "val_fraction": val_fraction, "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
        "train_ids_sha256": _ids_digest([u.unit_id for u in data.train]),
        "val_ids": [u.unit_id for u in data.val], "test_ids": [u.unit_id for u in data.test],
    }


def load_model(store: ModelStore, version: str) -> tuple[InspectionModel, dict]:
    """A stored model (hash-verified) in eval mode, and a mutable copy of its card."""
    state, card = store.load(version)
    model = InspectionModel.from_state(ModelConfig.from_dict(card["model_config"]), state)
    model.eval()
    return model, card


def model_from_version(version: ModelVersion, store: ModelStore) -> InspectionModel:
    return load_model(store, version.version)[0]


def seal(units: Sequence[Unit]) -> list[Unit]:
    """The units without their labels: what a selection step (training, epoch choice, calibration) gets of a
    test split, so that no choice can read a test label."""
    return [dataclasses.replace(u, label=None) for u in units]


def bench_data(bench: str, seed: int, card_data: dict | None = None, val_fraction: float | None = None,
               fold: int | None = None, *, test_labels: bool = False) -> BenchData:
    """A bench split; with a model card's data section, the split that model was trained on (checked).

    The test split's units come without labels (:func:`seal`) unless ``test_labels``, which only evaluation
    asks for: training, epoch selection and calibration cannot read a test label."""
    kw: dict = {}
    if card_data is not None:
        if card_data.get("val_fraction") is not None:
            val_fraction = card_data["val_fraction"]
        if card_data.get("fold") is not None:
            fold = card_data["fold"]
            kw["folds"] = card_data["folds"]
    if val_fraction is not None:
        if bench != "elpv":
            raise ConfigError(f"a validation fraction applies to elpv only; {bench} validates on whole "
                              "recordings/sources")
        kw["val_fraction"] = val_fraction
    if fold is not None:
        if bench != "bearings":
            raise ConfigError(f"folds apply to bearings only; {bench} has one split per seed")
        kw["fold"] = fold
    data = load_bench(bench, seed, **kw)
    if card_data is not None and _ids_digest([u.unit_id for u in data.train]) != card_data["train_ids_sha256"]:
        raise ConfigError(f"the {bench} split for seed {seed} differs from the one this model was trained on "
                          "(a model trained under an earlier protocol: train it again)")
    if not test_labels:
        data.test = seal(data.test)
    return data


def train_bench(bench: str, seed: int, train_cfg: TrainConfig, *, store_root: Path | str, out_root: Path | str,
                modalities: Sequence[str] | None = None, dim: int = 256, image_size: int = 224, moe: bool = True,
                resume: bool = False, progress: bool | Progress = True, overrides: Sequence[str] = (),
                val_fraction: float | None = None, keep: int = DEFAULT_KEEP, fold: int | None = None) -> ModelVersion:
    """Train one model on a bench split and save it (uncalibrated) to its store, which then keeps its newest
    ``keep`` versions. ``val_fraction`` (elpv only) sets the share of the training split held out for validation;
    0 trains on all of it. ``fold`` (bearings only) picks the cross-validation fold."""
    data = bench_data(bench, seed, val_fraction=val_fraction, fold=fold)
    if modalities:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ConfigError(f"unknown modalities {sorted(unknown)}; known: {MODALITIES}")
        wanted = set(modalities)
        drop = [m for m in MODALITIES if m not in wanted]
        data.train = [u.without(*drop) for u in data.train]
        data.val = [u.without(*drop) for u in data.val]
    cfg = default_model_config(bench, dim=dim, image_size=image_size, modalities=modalities, moe=moe,
                               overrides=overrides)
    name = family(bench, modalities)
    out_dir = Path(out_root) / (f"{name}-s{seed}" + ("" if data.fold is None else f"-f{data.fold}")
                                + ("" if train_cfg.seed == seed else f"-t{train_cfg.seed}"))
    result = train_supervised(cfg, data.train, data.val, train_cfg, out_dir, resume=resume, progress=progress)
    card = {
        "name": name, "bench": bench, "seed": seed, "fold": data.fold, "train_seed": train_cfg.seed,
        "mode": "supervised", "modalities": list(cfg.modalities),
        "model_config": cfg.to_dict(), "train_config": json.loads((out_dir / "train_config.json").read_text()),
        "data": _data_card(data, val_fraction), "history": result.history, "train_seconds": round(result.seconds, 1),
        "threshold_version": None,
    }
    store = ModelStore(Path(store_root) / name, keep=keep)
    version = store.save(result.model.state_dict(), card, promote=True)
    log.info("saved %s as %s", name, version.version)
    return version


def calibrate_version(store_root: Path | str, name: str, version: str | None = None, *, method: str = "max_f1",
                      target_far: float = 0.01, device: str = "cpu", threshold: float | None = None,
                      keep: int = DEFAULT_KEEP, progress: bool | Progress = True, data_path: str | None = None,
                      labels_path: str | None = None) -> ModelVersion:
    """Calibrate a stored model on its bench's validation units (``method="fixed"``: set ``threshold`` for every
    line, no validation data); saves a new, promoted version (the store then keeps its newest ``keep``).
    A model trained on own data (its card has ``source``) calibrates on its validation units rebuilt from the
    files it was trained on, checked by digest; ``data_path`` / ``labels_path`` say where they are now if moved.
    ``progress`` as in :func:`~inspection.training.train_supervised`: bars for preprocessing and scoring on a
    terminal, else one line when done."""
    report = Progress.of(progress)
    store = ModelStore(Path(store_root) / name, keep=keep)
    base = store.get(version) if version else store.promoted()
    if base is None:
        raise StoreError(f"no model in {store.root}; train one first (`inspection train`)")
    model, card = load_model(store, base.version)
    if method == "fixed":
        if threshold is None:
            raise ConfigError("method 'fixed' needs a threshold (--threshold)")
        model, cal = fixed_calibration(model, threshold)
        saved = _save_calibrated(store, base, model, card, cal)
        report.line(f"calibrated {name} {base.version} -> {saved.version}: fixed threshold {threshold}")
        return saved
    if threshold is not None:
        raise ConfigError(f"a threshold is given only with method 'fixed'; {method!r} chooses it on validation data")
    if card.get("source") is not None:  # trained on own data (inspection.own_training)
        from inspection.data.own_data import rebuild_validation

        val_units = rebuild_validation(card["source"], card["split"], data=data_path, labels=labels_path)
    else:
        if data_path is not None or labels_path is not None:
            raise ConfigError(f"model {base.version} was trained on the {card.get('bench')} bench; --data and "
                              "--labels apply to models trained on own data (`inspection train --data`)")
        data = bench_data(card["bench"], card["seed"], card["data"])
        if not data.val:
            raise ConfigError(f"model {base.version} was trained without validation units (validation fraction 0): "
                              "calibrate it with --method fixed --threshold T")
        val_units = data.val
    drop = [m for m in MODALITIES if m not in card["modalities"]]
    val = [u.without(*drop) for u in val_units] if drop else val_units
    model.to(device)
    started = report.clock()
    stage = report.stage("calibrate: preprocess", len(val))
    prepared = PreparedSet(model, val, model.config.class_names, stage.update)
    stage.close()
    stage = report.stage("calibrate: score", len(val))
    pred = predict(model, prepared, torch.device(device), on_batch=stage.update)
    stage.close()
    # a model restricted to some modalities is calibrated on the defects it can see (its culprits); the full
    # model on the unit's label
    seen = set(card["modalities"])
    labels = np.array([bool(u.label.culprits & seen) for u in val])
    model, cal = calibrate(model.cpu(), pred["score"], labels, [u.line_id for u in val], method, target_far)
    saved = _save_calibrated(store, base, model, card, cal)
    report.line(f"calibrated {name} {base.version} -> {saved.version}: {method} on {len(val)} validation units in "
                f"{format_duration(report.clock() - started)}")
    return saved


def _save_calibrated(store: ModelStore, base: ModelVersion, model: InspectionModel, card: dict,
                     cal: Calibration) -> ModelVersion:
    card = {k: v for k, v in card.items() if k not in ("version", "created", "weights_file", "weights_sha256",
                                                        "weights_bytes", "tensors", "format")}
    card.update(model_config=model.config.to_dict(), threshold_version=cal.version, calibration=cal.to_dict(),
                parent=base.version)
    return store.save(model.state_dict(), card, promote=True)


def _train_seed(card) -> int:
    return card.get("train_seed", card["seed"])


def _calibrated(store: ModelStore, seeds: Sequence[int], repeats: bool = False) -> dict[tuple, ModelVersion]:
    """The newest calibrated version per (split seed, fold) trained with the split's own seed; with ``repeats``
    per (split seed, fold, training seed), every training run kept."""
    found = {}
    for v in store.versions():  # oldest first: the newest wins
        c = v.card
        if not c.get("threshold_version") or c.get("seed") not in seeds:
            continue
        if repeats:
            found[(c["seed"], c.get("fold"), _train_seed(c))] = v
        elif _train_seed(c) == c["seed"]:
            found[(c["seed"], c.get("fold"))] = v
    return found


def _missing(store: ModelStore, what: str) -> StoreError:
    return StoreError(f"{store.root} has no calibrated model for {what}; run `inspection train` and "
                      "`inspection calibrate` for them")


def _calibrated_versions(store: ModelStore, seeds: Sequence[int]) -> dict[int, ModelVersion]:
    """One calibrated version per split seed (benches with one split per seed)."""
    found = {seed: v for (seed, fold), v in _calibrated(store, seeds).items() if fold is None}
    missing = [s for s in seeds if s not in found]
    if missing:
        raise _missing(store, f"seed(s) {missing}")
    return found


def _calibrated_folds(store: ModelStore, seeds: Sequence[int]) -> dict[int, list[ModelVersion]]:
    """Every fold's calibrated version per seed (cross-validated benches); all folds must be there."""
    found = _calibrated(store, seeds)
    out = {}
    for seed in seeds:
        folds = {fold: v for (s, fold), v in found.items() if s == seed and fold is not None}
        if not folds:
            raise _missing(store, f"seed {seed} (any fold)")
        n = next(iter(folds.values())).card["data"]["folds"]
        missing = [f for f in range(n) if f not in folds]
        if missing:
            raise _missing(store, f"seed {seed}, fold(s) {missing} of {n}")
        out[seed] = [folds[f] for f in range(n)]
    return out


def _interval(values: Sequence[float], successes: int | None = None, n: int | None = None) -> dict:
    """``ci95`` of a mean over seeds (Student t); with one seed, the binomial (Wilson) interval of its test
    count instead."""
    over_seeds = seed_interval(values)
    if over_seeds is not None:
        return {"ci95": list(over_seeds), "ci95_kind": "Student t over seeds"}
    if successes is not None and n:
        return {"ci95": list(wilson(successes, n)), "ci95_kind": "Wilson, test units of the one seed"}
    return {"ci95": None, "ci95_kind": "one seed: no interval"}


def evaluate_bench(bench: str, store_root: Path | str, seeds: Sequence[int], *, device: str = "cpu",
                   tta: bool = False, results_dir: Path | str = "runs/results",
                   plots_dir: Path | str = "runs/plots", note: str | None = None,
                   progress: bool | Progress = False) -> Path:
    """Evaluate calibrated models of a bench on their test splits; write the result file. ``progress`` shows
    each model's preprocessing and scoring (:class:`~inspection.progress.Progress`)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    report = Progress.of(progress)
    if bench == "composite":
        return _evaluate_composite(store_root, seeds, device=device, results_dir=results_dir, plots_dir=plots_dir,
                                   note=note, report=report)
    if bench == "bearings":
        return _evaluate_bearings(store_root, seeds, device=device, tta=tta, results_dir=results_dir,
                                  plots_dir=plots_dir, note=note, report=report)
    store = ModelStore(Path(store_root) / bench)
    versions = _calibrated_versions(store, seeds)
    runs = []
    for seed in seeds:
        v = versions[seed]
        model = model_from_version(v, store)
        data = bench_data(bench, seed, v.card["data"], test_labels=True)
        metrics, pred = evaluate_units(model, data.test, device, tta=tta, report=report, desc=f"{bench} seed {seed}")
        plot_roc_confusion(pred["score"], pred["defect"], pred["threshold"], pred["klass"],
                           pred["class_prob"].argmax(1), model.config.class_names, plots_dir / f"{bench}_s{seed}",
                           f"{bench} seed {seed}")
        correct = metrics["tp"] + metrics["tn"]
        metrics["accuracy_ci95"] = list(wilson(correct, metrics["n"]))
        runs.append({"seed": seed, "train_seed": _train_seed(v.card), "model_version": v.version,
                     "threshold_version": v.card["threshold_version"], "metrics": metrics})
    values = [r["metrics"]["accuracy"] for r in runs]
    n_test = [r["metrics"]["n"] for r in runs]
    summary = {
        "metric": "accuracy (defective = p >= 0.5), mean over split seeds",
        "protocol": "elpv-split-seeds",
        "value": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        **_interval(values, runs[0]["metrics"]["tp"] + runs[0]["metrics"]["tn"], n_test[0]),
        "n_test": n_test[0] if len(set(n_test)) == 1 else n_test,
        "baselines": ANCHORS.get(bench, {}),
        "split": "stratified (probability, type) 75/25, defective = p >= 0.5, one split per seed",
        "seeds": list(seeds),
        "model_version": [r["model_version"] for r in runs],
        "tta": tta,
        "class_accuracy_4": float(np.mean([r["metrics"]["class_accuracy"] for r in runs])),
        "auroc": float(np.mean([r["metrics"].get("auroc", float("nan")) for r in runs])),
    }
    repeats = _repeat_spread(store, seeds, device, tta, report)
    if repeats:
        summary["same_split_repeats"] = repeats
    if note:
        summary["note"] = note
    return write_result(bench, summary, {"runs": runs}, results_dir)


def _repeat_spread(store: ModelStore, seeds: Sequence[int], device: str, tta: bool, report: Progress) -> dict:
    """Run-to-run spread: split seeds with more than one training run (``inspection train --train-seed``) are
    scored once per run on the same test split."""
    by_seed: dict[int, list[ModelVersion]] = {}
    for (seed, _fold, _train), v in _calibrated(store, seeds, repeats=True).items():
        by_seed.setdefault(seed, []).append(v)
    out = {}
    for seed, versions in sorted(by_seed.items()):
        if len(versions) < 2:
            continue
        data = bench_data(versions[0].card["bench"], seed, versions[0].card["data"], test_labels=True)
        values = {str(_train_seed(v.card)): evaluate_units(
            model_from_version(v, store), data.test, device, tta=tta, report=report,
            desc=f"seed {seed} train seed {_train_seed(v.card)}")[0]["accuracy"] for v in versions}
        acc = np.array(list(values.values()))
        out[str(seed)] = {"accuracy_by_train_seed": values, "std": float(acc.std(ddof=1)),
                          "range": float(acc.max() - acc.min())}
    return out


def _recording(unit: Unit) -> str:
    """The bearing recording a window was cut from (``bearings:<name>@<start>+<length>``)."""
    return unit.provenance["vibration"].split(":", 1)[1].split("@", 1)[0]


def _evaluate_bearings(store_root, seeds, *, device, tta, results_dir, plots_dir, note=None,
                       report: Progress | None = None) -> Path:
    """Grouped cross-validation: each seed's folds together test every recording once; window accuracy pooled
    over the folds, and recording accuracy by each recording's majority vote over its windows."""
    store = ModelStore(Path(store_root) / "bearings")
    folds = _calibrated_folds(store, seeds)
    runs, pooled_hits = [], {}
    for seed in seeds:
        parts: dict[str, list] = {"score": [], "defect": [], "threshold": [], "klass": [], "pred": [], "rec": []}
        fold_rows = []
        for v in folds[seed]:
            model = model_from_version(v, store)
            data = bench_data("bearings", seed, v.card["data"], test_labels=True)
            metrics, pred = evaluate_units(model, data.test, device, tta=tta, report=report,
                                           desc=f"bearings seed {seed} fold {v.card['data']['fold']}")
            fold_rows.append({"fold": v.card["data"]["fold"], "model_version": v.version,
                              "threshold_version": v.card["threshold_version"],
                              "test_recordings": sorted({_recording(u) for u in data.test}), "metrics": metrics})
            for key, value in (("score", pred["score"]), ("defect", pred["defect"]),
                               ("threshold", pred["threshold"]), ("klass", pred["klass"]),
                               ("pred", pred["class_prob"].argmax(1)), ("rec", [_recording(u) for u in data.test])):
                parts[key].append(np.asarray(value))
        p = {k: np.concatenate(v) for k, v in parts.items()}
        class_names = model.config.class_names
        metrics = binary_metrics(p["score"], p["defect"], p["threshold"])
        correct = p["pred"] == p["klass"]
        metrics["class_accuracy"] = float(correct.mean())
        metrics["class_accuracy_ci95"] = list(grouped_accuracy_interval(correct, p["rec"]))
        metrics["n"] = int(correct.size)
        recordings = {}
        for name in np.unique(p["rec"]):
            mine = p["rec"] == name
            vote = int(np.bincount(p["pred"][mine], minlength=len(class_names)).argmax())
            truth = int(p["klass"][mine][0])
            recordings[str(name)] = {"true": class_names[truth], "voted": class_names[vote],
                                     "windows_correct": f"{int(correct[mine].sum())}/{int(mine.sum())}"}
            pooled_hits.setdefault(str(name), []).append(correct[mine])
        k = sum(r["true"] == r["voted"] for r in recordings.values())
        metrics["recording_accuracy"] = k / len(recordings)
        metrics["recording_ci95"] = list(clopper_pearson(k, len(recordings)))
        metrics["n_recordings"] = len(recordings)
        plot_roc_confusion(p["score"], p["defect"], p["threshold"], p["klass"], p["pred"], class_names,
                           plots_dir / f"bearings_s{seed}", f"bearings seed {seed}, all folds")
        runs.append({"seed": seed, "metrics": metrics, "recordings": recordings, "folds": fold_rows})
    values = [r["metrics"]["class_accuracy"] for r in runs]
    rec_values = [r["metrics"]["recording_accuracy"] for r in runs]
    n_rec = runs[0]["metrics"]["n_recordings"]
    names = sorted(pooled_hits)
    hits = np.concatenate([np.concatenate(pooled_hits[n]) for n in names])
    groups = np.concatenate([[n] * sum(len(h) for h in pooled_hits[n]) for n in names])
    summary = {
        "metric": "3-class accuracy of windows, every recording a test recording once (grouped cross-validation)",
        "protocol": f"bearings-grouped-cv{len(folds[seeds[0]])}",
        "value": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "ci95": list(grouped_accuracy_interval(hits, groups)),
        "ci95_kind": "bootstrap over recordings (windows of a recording resampled together), all seeds pooled",
        "recording_accuracy": float(np.mean(rec_values)),
        "recording_ci95": list(clopper_pearson(int(round(np.mean(rec_values) * n_rec)), n_rec)),
        "recording_ci95_kind": f"Clopper-Pearson over the {n_rec} recordings (the mean over seeds, rounded)",
        "binary_accuracy": float(np.mean([r["metrics"]["accuracy"] for r in runs])),
        "auroc": float(np.mean([r["metrics"].get("auroc", float("nan")) for r in runs])),
        "n_test": runs[0]["metrics"]["n"],
        "n_test_recordings": n_rec,
        "baselines": ANCHORS.get("bearings", {}),
        "split": (f"grouped {len(folds[seeds[0]])}-fold cross-validation by recording over all {n_rec} recordings, "
                  "class-stratified, folds drawn per seed; validation = per class one training recording drawn "
                  "with (seed, fold)"),
        "seeds": list(seeds),
        "model_version": [[f["model_version"] for f in r["folds"]] for r in runs],
        "tta": tta,
    }
    if note:
        summary["note"] = note
    return write_result("bearings", summary, {"runs": runs}, results_dir)


def _evaluate_composite(store_root, seeds, *, device, results_dir, plots_dir, note=None,
                        report: Progress | None = None) -> Path:
    """The fused model against baselines whose thresholds are all chosen on the validation units (drawn from
    held-out sources): each single-modality model, late fusion (the largest calibrated margin, with a threshold
    for the combination) and stacking (logistic regression on the single-modality scores); and the fused model
    with each modality removed at test time."""
    root = Path(store_root)
    runs = []
    for seed in seeds:
        fused_store = ModelStore(root / "composite")
        fused_v = _calibrated_versions(fused_store, [seed])[seed]
        fused = model_from_version(fused_v, fused_store)
        data = bench_data("composite", seed, fused_v.card["data"], test_labels=True)
        test = data.test
        row: dict = {"seed": seed, "model_version": fused_v.version}
        report = report or Progress(enabled=False)
        stage = report.stage(f"composite seed {seed}: preprocess", len(test))
        prepared = PreparedSet(fused, test, fused.config.class_names, stage.update)  # once, masked below
        stage.close(stage.done_line())
        desc = f"composite seed {seed}"
        metrics, pred = evaluate_units(fused, test, device, prepared=prepared, report=report, desc=desc)
        metrics["f1_ci95"] = list(f1_interval(pred["score"], pred["defect"], pred["threshold"]))
        row["fused"] = metrics
        plot_roc_confusion(pred["score"], pred["defect"], pred["threshold"], pred["klass"],
                           pred["class_prob"].argmax(1), fused.config.class_names, plots_dir / f"composite_s{seed}",
                           f"composite fused, seed {seed}")
        if torch.device(device).type == "cuda":  # the service scores under bf16 autocast: its effect, same units
            row["fused_fp32"] = evaluate_units(fused, test, device, prepared=prepared, amp=False, report=report,
                                               desc=f"{desc} fp32")[0]
        for m in MODALITIES:  # the fused model with one modality removed at test time (masked out)
            row[f"fused_without_{m}"] = evaluate_units(fused, test, device, prepared=prepared, hide=(m,),
                                                       report=report, desc=f"{desc} without {m}")[0]
        row.update(_composite_baselines(root, seed, data, device, report))
        row["margin_vs_best"] = row["fused"]["f1"] - max(row["baselines"][b]["f1"] for b in row["baselines"])
        runs.append(row)
    mean = lambda path: float(np.mean([_get(r, path) for r in runs]))  # noqa: E731
    names = list(runs[0]["baselines"])
    best = max(names, key=lambda b: mean(f"baselines.{b}.f1"))
    values = [r["fused"]["f1"] for r in runs]
    margins = [r["margin_vs_best"] for r in runs]
    over_seeds = seed_interval(values)
    summary = {
        "metric": "F1 (fused)",
        "protocol": "composite-heldout-sources",
        "value": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "ci95": list(over_seeds) if over_seeds else runs[0]["fused"]["f1_ci95"],
        "ci95_kind": "Student t over seeds" if over_seeds else "bootstrap over the test units of the one seed",
        "auroc": mean("fused.auroc"),
        "n_test": len(test),
        "seeds": list(seeds),
        "baselines": {b: mean(f"baselines.{b}.f1") for b in names},
        "baselines_auroc": {b: mean(f"baselines.{b}.auroc") for b in names},
        "best_baseline": best,
        "margin_vs_best": {"mean": float(np.mean(margins)), "std": float(np.std(margins, ddof=1))
                           if len(margins) > 1 else 0.0, "per_seed": margins,
                           "against": "per seed, the baseline with the highest test F1 of that seed"},
        "ablations": {f"fused_without_{m}": mean(f"fused_without_{m}.f1") for m in MODALITIES},
        "thresholds": "fused: calibrated (max F1) on the validation units; every baseline: max F1 on the same "
                      "validation units against the unit's label; validation units come from sources neither "
                      "training nor test uses",
        "split": "composite units: constructed pairing of real readings; train, validation and test never share "
                 "a source (image, recording, file or time segment)",
        "model_version": [r["model_version"] for r in runs],
    }
    if all("fused_fp32" in r for r in runs):
        summary["bf16_effect"] = {"precision": "bf16 autocast (value, auroc) vs float32 on the same test units",
                                  "f1_fp32": mean("fused_fp32.f1"), "auroc_fp32": mean("fused_fp32.auroc"),
                                  "f1_delta": mean("fused.f1") - mean("fused_fp32.f1"),
                                  "auroc_delta": mean("fused.auroc") - mean("fused_fp32.auroc")}
    if note:
        summary["note"] = note
    return write_result("composite", summary, {"runs": runs}, results_dir)


def _composite_baselines(root: Path, seed: int, data: BenchData, device: str, report: Progress) -> dict:
    """Each single-modality model, late fusion and stacking, every threshold chosen on ``data.val``."""
    val_defect = np.array([u.label.defect for u in data.val])
    test_defect = np.array([u.label.defect for u in data.test])
    val_logits, test_logits, val_margins, test_margins = [], [], [], []
    baselines, versions = {}, {}
    for m in MODALITIES:
        store = ModelStore(root / family("composite", [m]))
        v = _calibrated_versions(store, [seed])[seed]
        model = model_from_version(v, store)
        others = [x for x in MODALITIES if x != m]
        p_val = predict_units(model, [u.without(*others) for u in data.val], device, report=report,
                              desc=f"composite seed {seed} {m} only, validation")
        p_test = predict_units(model, [u.without(*others) for u in data.test], device, report=report,
                               desc=f"composite seed {seed} {m} only, test")
        threshold = choose_threshold(p_val["score"], val_defect, "max_f1")
        baselines[f"{m}_only"] = {**binary_metrics(p_test["score"], test_defect, threshold), "threshold": threshold}
        versions[m] = v.version
        val_logits.append(logit(p_val["score"]))
        test_logits.append(logit(p_test["score"]))
        # a margin over the model's own calibrated threshold (set on the validation units' culprits it can see)
        val_margins.append(margin(p_val["score"], p_val["threshold"]))
        test_margins.append(margin(p_test["score"], p_test["threshold"]))
    late_val = late_fusion_score(np.stack(val_margins, axis=1))
    late_test = late_fusion_score(np.stack(test_margins, axis=1))
    threshold = choose_threshold(late_val, val_defect, "max_f1")
    baselines["late_fusion"] = {**binary_metrics(late_test, test_defect, threshold), "threshold": threshold}
    baselines["stacking"] = _stacking(np.stack(val_logits, 1), val_defect, np.stack(test_logits, 1), test_defect,
                                      seed)
    return {"baselines": baselines, "single_versions": versions,
            "late_fusion_at_zero": binary_metrics(late_test, test_defect, 0.0)}


def _stacking(x_val: np.ndarray, y_val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> dict:
    """Logistic regression on the per-modality score logits, fitted on the validation units; its threshold is the
    max-F1 one of out-of-fold (5-fold) probabilities on the same units, so it is not chosen on the fitted rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    lr = LogisticRegression(C=1.0, max_iter=1000)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    oof = cross_val_predict(lr, x_val, y_val, cv=folds, method="predict_proba")[:, 1]
    threshold = choose_threshold(oof, y_val, "max_f1")
    lr.fit(x_val, y_val)
    prob = lr.predict_proba(x_test)[:, 1]
    return {**binary_metrics(prob, y_test, threshold), "threshold": threshold,
            "coefficients": dict(zip(MODALITIES, lr.coef_[0].tolist(), strict=True)),
            "intercept": float(lr.intercept_[0])}


def _get(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


__all__ = ["bench_data", "calibrate_version", "evaluate_bench", "family", "model_from_version", "predict_units",
           "train_bench"]
