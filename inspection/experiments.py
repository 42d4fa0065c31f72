"""Benchmark experiments end to end: train -> store, calibrate -> store, evaluate -> bench/results.

Stores are per model family: ``<store>/<bench>`` for the full model of a bench, ``<store>/<bench>-<modality>``
for a composite model restricted to one modality (the single-modality baselines). Every stored version's card
says which bench, split seed, configs and data it was trained on, so calibration and evaluation rebuild exactly
the right splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inspection.benches import BenchData, default_model_config, load_bench
from inspection.calibration import Calibration, calibrate, fixed_calibration
from inspection.errors import ConfigError, StoreError
from inspection.evaluation import (
    ANCHORS,
    binary_metrics,
    evaluate_units,
    plot_roc_confusion,
    predict_units,
    write_result,
)
from inspection.model import InspectionModel, ModelConfig
from inspection.records import MODALITIES
from inspection.store import DEFAULT_KEEP, ModelStore, ModelVersion
from inspection.training import PreparedSet, TrainConfig, predict, train_supervised

log = logging.getLogger(__name__)


def family(bench: str, modalities: Sequence[str] | None = None) -> str:
    return bench if not modalities else f"{bench}-{'+'.join(modalities)}"


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _data_card(data: BenchData, val_fraction: float | None = None) -> dict:
    return {
        "bench": data.bench, "seed": data.seed, "notes": list(data.notes), "val_fraction": val_fraction,
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
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


def bench_data(bench: str, seed: int, card_data: dict | None = None, val_fraction: float | None = None) -> BenchData:
    """A bench split; with a model card's data section, the split that model was trained on (checked)."""
    if card_data is not None and card_data.get("val_fraction") is not None:
        val_fraction = card_data["val_fraction"]
    if val_fraction is not None and bench != "elpv":
        raise ConfigError(f"a validation fraction applies to elpv only; {bench} validates on whole recordings/sources")
    data = load_bench(bench, seed, **({} if val_fraction is None else {"val_fraction": val_fraction}))
    if card_data is not None and _ids_digest([u.unit_id for u in data.train]) != card_data["train_ids_sha256"]:
        raise ConfigError(f"the {bench} split for seed {seed} differs from the one this model was trained on")
    return data


def train_bench(bench: str, seed: int, train_cfg: TrainConfig, *, store_root: Path | str, out_root: Path | str,
                modalities: Sequence[str] | None = None, dim: int = 256, image_size: int = 224, moe: bool = True,
                resume: bool = False, progress: bool = True, overrides: Sequence[str] = (),
                val_fraction: float | None = None, keep: int = DEFAULT_KEEP) -> ModelVersion:
    """Train one model on a bench split and save it (uncalibrated) to its store, which then keeps its newest
    ``keep`` versions. ``val_fraction`` (elpv only) sets the share of the training split held out for validation;
    0 trains on all of it."""
    data = bench_data(bench, seed, val_fraction=val_fraction)
    if modalities:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ConfigError(f"unknown modalities {sorted(unknown)}; known: {MODALITIES}")
        keep = set(modalities)
        drop = [m for m in MODALITIES if m not in keep]
        data.train = [u.without(*drop) for u in data.train]
        data.val = [u.without(*drop) for u in data.val]
    cfg = default_model_config(bench, dim=dim, image_size=image_size, modalities=modalities, moe=moe,
                               overrides=overrides)
    name = family(bench, modalities)
    out_dir = Path(out_root) / f"{name}-s{seed}"
    result = train_supervised(cfg, data.train, data.val, train_cfg, out_dir, resume=resume, progress=progress)
    card = {
        "name": name, "bench": bench, "seed": seed, "mode": "supervised", "modalities": list(cfg.modalities),
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
                      keep: int = DEFAULT_KEEP) -> ModelVersion:
    """Calibrate a stored model on its bench's validation units (``method="fixed"``: set ``threshold`` for every
    line, no validation data); saves a new, promoted version (the store then keeps its newest ``keep``)."""
    store = ModelStore(Path(store_root) / name, keep=keep)
    base = store.get(version) if version else store.promoted()
    if base is None:
        raise StoreError(f"no model in {store.root}; train one first (`inspection train`)")
    model, card = load_model(store, base.version)
    if method == "fixed":
        if threshold is None:
            raise ConfigError("method 'fixed' needs a threshold (--threshold)")
        model, cal = fixed_calibration(model, threshold)
        return _save_calibrated(store, base, model, card, cal)
    if threshold is not None:
        raise ConfigError(f"a threshold is given only with method 'fixed'; {method!r} chooses it on validation data")
    data = bench_data(card["bench"], card["seed"], card["data"])
    if not data.val:
        raise ConfigError(f"model {base.version} was trained without validation units (validation fraction 0): "
                          "calibrate it with --method fixed --threshold T")
    drop = [m for m in MODALITIES if m not in card["modalities"]]
    val = [u.without(*drop) for u in data.val] if drop else data.val
    model.to(device)
    prepared = PreparedSet(model, val, model.config.class_names)
    pred = predict(model, prepared, torch.device(device))
    # a model restricted to some modalities is calibrated on the defects it can see (its culprits); the full
    # model on the unit's label
    seen = set(card["modalities"])
    labels = np.array([bool(u.label.culprits & seen) for u in val])
    model, cal = calibrate(model.cpu(), pred["score"], labels, [u.line_id for u in val], method, target_far)
    return _save_calibrated(store, base, model, card, cal)


def _save_calibrated(store: ModelStore, base: ModelVersion, model: InspectionModel, card: dict,
                     cal: Calibration) -> ModelVersion:
    card = {k: v for k, v in card.items() if k not in ("version", "created", "weights_file", "weights_sha256",
                                                        "weights_bytes", "tensors", "format")}
    card.update(model_config=model.config.to_dict(), threshold_version=cal.version, calibration=cal.to_dict(),
                parent=base.version)
    return store.save(model.state_dict(), card, promote=True)


def _calibrated_versions(store: ModelStore, seeds: Sequence[int]) -> dict[int, ModelVersion]:
    found = {}
    for v in store.versions():
        if v.card.get("threshold_version") and v.card.get("seed") in seeds:
            found[v.card["seed"]] = v  # newest wins (versions are oldest first)
    missing = [s for s in seeds if s not in found]
    if missing:
        raise StoreError(f"{store.root} has no calibrated model for seed(s) {missing}; run `inspection train` and "
                         "`inspection calibrate` for them")
    return found


def evaluate_bench(bench: str, store_root: Path | str, seeds: Sequence[int], *, device: str = "cpu",
                   tta: bool = False, results_dir: Path | str = "runs/results",
                   plots_dir: Path | str = "runs/plots", note: str | None = None) -> Path:
    """Evaluate calibrated models of a bench on their test splits; write the result file."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    if bench == "composite":
        return _evaluate_composite(store_root, seeds, device=device, results_dir=results_dir, plots_dir=plots_dir,
                                   note=note)
    store = ModelStore(Path(store_root) / bench)
    versions = _calibrated_versions(store, seeds)
    runs = []
    for seed in seeds:
        v = versions[seed]
        model = model_from_version(v, store)
        data = bench_data(bench, seed, v.card["data"])
        metrics, pred = evaluate_units(model, data.test, device, tta=tta)
        plot_roc_confusion(pred["score"], pred["defect"], pred["threshold"], pred["klass"],
                           pred["class_prob"].argmax(1), model.config.class_names, plots_dir / f"{bench}_s{seed}",
                           f"{bench} seed {seed}")
        runs.append({"seed": seed, "model_version": v.version, "threshold_version": v.card["threshold_version"],
                     "metrics": metrics})
    headline = "accuracy" if bench == "elpv" else "class_accuracy"
    values = [r["metrics"][headline] for r in runs]
    summary = {
        "metric": headline if bench == "elpv" else "3-class accuracy (held-out recordings)",
        "value": float(np.mean(values)),
        "value_std": float(np.std(values)),
        "baselines": ANCHORS.get(bench, {}),
        "split": ("stratified (probability, type) 75/25, defective = p >= 0.5, mean over split seeds"
                  if bench == "elpv" else "held-out recordings (package split 14/6)"),
        "seed": list(seeds),
        "model_version": [r["model_version"] for r in runs],
        "tta": tta,
    }
    if note:
        summary["note"] = note
    if bench == "elpv":
        summary["class_accuracy_4"] = float(np.mean([r["metrics"]["class_accuracy"] for r in runs]))
    summary["auroc"] = float(np.mean([r["metrics"].get("auroc", float("nan")) for r in runs]))
    return write_result(bench, summary, {"runs": runs}, results_dir)


def _evaluate_composite(store_root, seeds, *, device, results_dir, plots_dir, note=None) -> Path:
    """Fused model vs each single-modality model vs late fusion; and the fused model with each modality removed."""
    root = Path(store_root)
    runs = []
    for seed in seeds:
        fused_store = ModelStore(root / "composite")
        fused_v = _calibrated_versions(fused_store, [seed])[seed]
        fused = model_from_version(fused_v, fused_store)
        data = bench_data("composite", seed, fused_v.card["data"])
        test = data.test
        row: dict = {"seed": seed, "model_version": fused_v.version}
        prepared = PreparedSet(fused, test, fused.config.class_names)  # preprocessed once, masked below
        metrics, pred = evaluate_units(fused, test, device, prepared=prepared)
        row["fused"] = metrics
        plot_roc_confusion(pred["score"], pred["defect"], pred["threshold"], pred["klass"],
                           pred["class_prob"].argmax(1), fused.config.class_names, plots_dir / f"composite_s{seed}",
                           f"composite fused, seed {seed}")
        if torch.device(device).type == "cuda":  # the service scores under bf16 autocast: its effect, same units
            row["fused_fp32"] = evaluate_units(fused, test, device, prepared=prepared, amp=False)[0]
        for m in MODALITIES:  # the fused model with one modality removed at test time (masked out)
            row[f"fused_without_{m}"] = evaluate_units(fused, test, device, prepared=prepared, hide=(m,))[0]
        # single-modality models, and late fusion = max over modalities of the score relative to its threshold
        margins, singles = [], {}
        for m in MODALITIES:
            store = ModelStore(root / family("composite", [m]))
            v = _calibrated_versions(store, [seed])[seed]
            model = model_from_version(v, store)
            only = [u.without(*[x for x in MODALITIES if x != m]) for u in test]
            mets, p = evaluate_units(model, only, device)
            singles[m] = mets
            margins.append(_logit(p["score"]) - _logit(p["threshold"]))
            row[f"single_{m}_version"] = v.version
        row["single"] = singles
        late = np.max(np.stack(margins), axis=0)
        late_metrics = binary_metrics(late, pred["defect"], 0.0)
        row["late_fusion"] = late_metrics
        runs.append(row)
    mean = lambda path: float(np.mean([_get(r, path) for r in runs]))  # noqa: E731
    summary = {
        "metric": "F1 (fused)",
        "value": mean("fused.f1"),
        "auroc": mean("fused.auroc"),
        "baselines": {"late_fusion": mean("late_fusion.f1"),
                      **{f"{m}_only": mean(f"single.{m}.f1") for m in MODALITIES},
                      **{f"fused_without_{m}": mean(f"fused_without_{m}.f1") for m in MODALITIES}},
        "baselines_auroc": {"late_fusion": mean("late_fusion.auroc"),
                            **{f"{m}_only": mean(f"single.{m}.auroc") for m in MODALITIES}},
        "split": "composite units: constructed pairing of real readings; train/test never share a source",
        "seed": list(seeds),
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


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _get(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


__all__ = ["bench_data", "calibrate_version", "evaluate_bench", "family", "model_from_version", "predict_units",
           "train_bench"]
