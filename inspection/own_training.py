"""Training on a plant's own data (``inspection train --data``): the model from the data, trained and stored.

The data (Parquet history or an image folder, labels, the split by time) is read by
:mod:`inspection.data.own_data`. The model is the composite bench's model restricted to the modalities the data
holds, with the data's classes and its sensors' channel counts. The stored card records the data spec
(``source``: kind, paths, labels file, line, validation fraction, unit count, digests of the unit ids and labels,
counted skips) and the split (``split``: the validation unit ids), so that ``inspection calibrate --name NAME``
rebuilds the validation units from the same files (:func:`inspection.experiments.calibrate_version`).

Normal-only mode (``inspection train --data ... --mode normal-only``, :func:`train_normal_data`) fits a
:class:`~inspection.normal_only.NormalOnlyDetector` on the data's good units instead: the oldest fit, the latest
(the validation part of the time split) are the held-out normal units that standardise the deviations and set
the threshold at the target false-alarm rate. It reads the same modalities with the same encoder specs as the
supervised model of the data would. The version is saved calibrated and promoted;
:func:`calibrate_normal_data` re-chooses its threshold at another rate on the same held-out units.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from inspection.benches import apply_overrides, default_model_config
from inspection.data.own_data import DataSpec, OwnData, load_own_data, rebuild_validation
from inspection.errors import ConfigError, Reason, RecordError
from inspection.model import ModelConfig
from inspection.normal_only import DEFECT_CLASS, MODE, NormalOnlyConfig, NormalOnlyDetector
from inspection.preprocess import WAVEFORM_MIN_RATE_HZ
from inspection.records import check_id
from inspection.store import DEFAULT_KEEP, STORE_FIELDS, ModelStore, ModelVersion
from inspection.training import TrainConfig, train_supervised

log = logging.getLogger(__name__)


def data_model_config(data: OwnData, *, dim: int = 256, image_size: int = 224, moe: bool = True,
                      overrides: Sequence[str] = ()) -> ModelConfig:
    """The model of a plant's data: ``default_model_config("composite")`` restricted to the modalities present,
    with the data's class names and channel counts; vibration below ``WAVEFORM_MIN_RATE_HZ`` (a low-rate RMS
    series) gets the series encoder. ``overrides`` (dotted keys, see :func:`inspection.benches.apply_overrides`)
    are applied last."""
    base = default_model_config("composite", dim=dim, image_size=image_size, modalities=list(data.modalities),
                                moe=moe).to_dict()
    base["class_names"] = list(data.class_names)
    _fit_encoders(base["encoders"], data)
    return ModelConfig.from_dict(apply_overrides(base, overrides) if overrides else base)


def _fit_encoders(encoders: dict, data: OwnData) -> None:
    """Give the encoder specs (dict form, composite defaults) the data's channel counts, and a series encoder to
    low-rate vibration."""
    if "vibration" in encoders:
        channels = data.channels("vibration")
        if data.sample_rate("vibration") < WAVEFORM_MIN_RATE_HZ:
            encoders["vibration"] = {"name": "series",
                                     "config": {"modality": "vibration", "preprocess": {"channels": channels}}}
        else:
            encoders["vibration"]["config"].setdefault("preprocess", {})["channels"] = channels
    if "temperature" in encoders:
        config = encoders["temperature"]["config"]
        channels = data.channels("temperature")
        if channels != config["preprocess"]["channels"]:
            config["preprocess"]["channels"] = channels
            config["channel_names"] = []  # the bench's names belong to its two probes


def normal_only_config(data: OwnData, *, image_size: int = 224) -> NormalOnlyConfig:
    """The normal-only detector of a plant's data: the encoder specs :func:`data_model_config` gives the data
    (modalities present, channel counts, a series encoder for low-rate vibration) and the detector's default
    feature settings."""
    encoders = default_model_config("composite", image_size=image_size, modalities=list(data.modalities),
                                    moe=False).to_dict()["encoders"]
    _fit_encoders(encoders, data)
    return NormalOnlyConfig.from_dict({"encoders": encoders})


def model_name(data: OwnData, name: str | None) -> str:
    """``name``, else ``line-<line>`` of the data's one line (checked as a folder-safe id)."""
    if name is None:
        lines = data.lines
        if data.spec.line is None and len(lines) > 1:
            raise ConfigError(f"the data holds lines {lines}: name the model (--name) or keep one line (--line)")
        name = f"line-{data.spec.line or lines[0]}"
    try:
        return check_id(name, "the model name", Reason.BAD_UNIT_ID)
    except RecordError as exc:
        raise ConfigError(exc.detail) from exc


def train_data(spec: DataSpec, train_cfg: TrainConfig, *, store_root: Path | str, out_root: Path | str,
               name: str | None = None, dim: int = 256, image_size: int = 224, moe: bool = True,
               resume: bool = False, progress: bool = True, overrides: Sequence[str] = (),
               keep: int = DEFAULT_KEEP) -> tuple[ModelVersion, OwnData]:
    """Train one supervised model on a plant's data and save it, uncalibrated and promoted, to
    ``<store_root>/<name>`` (which then keeps its newest ``keep`` versions); run files go to
    ``<out_root>/<name>-s<seed>``.

    Returns:
        The saved version and the data it was trained on (units, split, counted skips).
    """
    data = load_own_data(spec)
    name = model_name(data, name)
    cfg = data_model_config(data, dim=dim, image_size=image_size, moe=moe, overrides=overrides)
    out_dir = Path(out_root) / f"{name}-s{train_cfg.seed}"
    result = train_supervised(cfg, data.train, data.val, train_cfg, out_dir, resume=resume, progress=progress)
    card = {
        "name": name, "seed": train_cfg.seed, "train_seed": train_cfg.seed, "mode": "supervised",
        "lines": data.lines, "modalities": list(cfg.modalities), "model_config": cfg.to_dict(),
        "train_config": json.loads((out_dir / "train_config.json").read_text()),
        "source": data.source_card(), "split": data.split_card(), "history": result.history,
        "train_seconds": round(result.seconds, 1), "threshold_version": None,
    }
    version = ModelStore(Path(store_root) / name, keep=keep).save(result.model.state_dict(), card, promote=True)
    log.info("saved %s as %s", name, version.version)
    return version, data


def _normal_card(data: OwnData, name: str, det: NormalOnlyDetector) -> dict:
    """Card fields a normal-only version of own data carries beside the detector's own."""
    return {
        "name": name, "lines": data.lines, "source": data.source_card(), "split": data.split_card(),
        "assumed_normal": data.assumed_normal, "defect_class": DEFECT_CLASS,
        "units_used": {"fit": len(data.train), "calibration": len(data.val)},
        "calibration": {"method": "far", "target_far": det.target_far, "threshold": det.threshold,
                        "calibration_far": det.calibration_far, "n_units": len(data.val)},
    }


def train_normal_data(spec: DataSpec, *, store_root: Path | str, name: str | None = None, image_size: int = 224,
                      target_far: float = 0.01, device: str = "cpu",
                      keep: int = DEFAULT_KEEP) -> tuple[ModelVersion, OwnData]:
    """Fit a normal-only detector on a plant's good units and save it, calibrated at ``target_far`` and promoted,
    to ``<store_root>/<name>`` (which then keeps its newest ``keep`` versions).

    ``spec.mode`` must be ``normal-only``: the units are the data's good ones (every unit when it holds no label),
    split by time; the oldest fit the Gaussians, the latest are the held-out normal units.

    Returns:
        The saved version and the data (units, split, counted skips).

    Raises:
        ConfigError: ``spec`` is not in normal-only mode, no good unit, bad data (see
            :func:`~inspection.data.own_data.load_own_data`), ``target_far`` outside (0, 1).
        DataError: a modality with fewer than :data:`~inspection.normal_only.MIN_UNITS` units in the fitting or
            the held-out part.
    """
    if spec.mode != MODE:
        raise ConfigError(f"train_normal_data reads data in {MODE} mode; got a {spec.mode} spec")
    data = load_own_data(spec)
    name = model_name(data, name)
    det = NormalOnlyDetector(normal_only_config(data, image_size=image_size)).to(device)
    det.fit(data.train).calibrate(data.val, target_far)
    version = det.save(ModelStore(Path(store_root) / name, keep=keep), _normal_card(data, name, det), promote=True)
    log.info("saved normal-only %s as %s (threshold %.3f at target false-alarm rate %g)", name, version.version,
             det.threshold, target_far)
    return version, data


def calibrate_normal_data(store: ModelStore, version: str | None, target_far: float, *, device: str = "cpu",
                          data_path: str | None = None, labels_path: str | None = None) -> ModelVersion:
    """Re-choose the threshold of a normal-only version trained on own data at ``target_far``, on its held-out
    normal units rebuilt from the files it was trained on (checked by digest; ``data_path`` / ``labels_path`` say
    where they are now if moved). Saves a new, promoted version whose card names its ``parent``.

    Raises:
        ConfigError: the version is not a normal-only model of own data, its data changed, ``target_far``
            outside (0, 1).
        StoreError: no such version (or nothing promoted).
    """
    base = store.get(version) if version else store.promoted()
    if base is None:
        raise ConfigError(f"no promoted model in {store.root}; name a version (--version)")
    det, card = NormalOnlyDetector.load(store, base.version)
    if card.get("source") is None:
        raise ConfigError(f"version {base.version} in {store.root} was not trained on own data (no source in its card)")
    val = rebuild_validation(card["source"], card["split"], data=data_path, labels=labels_path)
    det.to(device).calibrate(val, target_far)
    return save_recalibrated(store, base, det, card, len(val))


def save_recalibrated(store: ModelStore, base: ModelVersion, det: NormalOnlyDetector, card: dict,
                      n_units: int) -> ModelVersion:
    """Save a recalibrated normal-only detector as a new, promoted version of ``store``: ``card`` (the base
    version's) with the detector's own fields rewritten, a new ``calibration`` and ``parent = base``."""
    own = set(det.card())
    extra = {k: v for k, v in card.items() if k not in own and k not in STORE_FIELDS}
    extra.update(parent=base.version, calibration={
        "method": "far", "target_far": det.target_far, "threshold": det.threshold,
        "calibration_far": det.calibration_far, "n_units": n_units})
    return det.save(store, extra, promote=True)
