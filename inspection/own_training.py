"""Training on a plant's own data (``inspection train --data``): the model from the data, trained and stored.

The data (Parquet history or an image folder, labels, the split by time) is read by
:mod:`inspection.data.own_data`. The model is the composite bench's model restricted to the modalities the data
holds, with the data's classes and its sensors' channel counts. The stored card records the data spec
(``source``: kind, paths, labels file, line, validation fraction, unit count, digests of the unit ids and labels,
counted skips) and the split (``split``: the validation unit ids), so that ``inspection calibrate --name NAME``
rebuilds the validation units from the same files (:func:`inspection.experiments.calibrate_version`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from inspection.benches import apply_overrides, default_model_config
from inspection.data.own_data import DataSpec, OwnData, load_own_data
from inspection.errors import ConfigError, Reason, RecordError
from inspection.model import ModelConfig
from inspection.preprocess import WAVEFORM_MIN_RATE_HZ
from inspection.records import check_id
from inspection.store import DEFAULT_KEEP, ModelStore, ModelVersion
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
    encoders = base["encoders"]
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
    return ModelConfig.from_dict(apply_overrides(base, overrides) if overrides else base)


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
