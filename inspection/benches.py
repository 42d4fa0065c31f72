"""The benchmarks' data, as labelled units, and each benchmark's default model.

=========  ==========================================================================================
elpv       vision only; seeded 75/25 split stratified on (probability, type); defective = p >= 0.5;
           classes are the four probability grades (4-class accuracy reported too)
bearings   vibration only; grouped 5-fold cross-validation by recording over all 20 recordings; 3 classes
composite  all three modalities from real sources (:mod:`inspection.data.composite`); culprits known
=========  ==========================================================================================

A validation subset for calibration and model selection is carved out of the training split (by the same unit
of independence as the split: images, recordings, composite source items), never out of the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from fusion.bridge import BridgeConfig
from fusion.moe import MoEConfig
from inspection.data._common import stratified_split
from inspection.errors import ConfigError
from inspection.model import EncoderSpec, ModelConfig
from inspection.records import Label, Unit, VibrationReading, VisionReading, sniff_image_type

BENCHES = ("elpv", "bearings", "composite", "skab")
ELPV_CLASSES = ("ok", "p1_3", "p2_3", "p1")
BEARING_CLASSES = ("ok", "outer_race", "inner_race")
COMPOSITE_CLASSES = ("ok", "vision", "vibration", "temperature", "multiple")
_T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


@dataclass
class BenchData:
    """Labelled units of one benchmark split.

    Attributes:
        train, val, test: units (val is carved from the training split).
        class_names: the class head's classes, ``ok`` first.
        notes: facts a report must state (e.g. "synthetic temperature").
        fold, folds: which cross-validation fold this is, of how many (None: a single split).
    """

    bench: str
    seed: int
    train: list[Unit]
    val: list[Unit]
    test: list[Unit]
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = ()
    fold: int | None = None
    folds: int | None = None


# ------------------------------------------------------------------------------------------------ elpv
def elpv_unit(item, i: int, split: str) -> Unit:
    uid = f"elpv-{item.name}"
    data = item.read_bytes()
    vision = VisionReading(data=data, content_type=sniff_image_type(data) or "image/png", unit_id=uid, line_id="elpv",
                           reading_id=f"{uid}-vision", source="elpv/camera", event_time=_T0 + timedelta(seconds=int(i)))
    label = Label(defect=item.defective, defect_class=ELPV_CLASSES[item.grade],
                  culprits=frozenset({"vision"}) if item.defective else frozenset(), severity=item.probability)
    return Unit(uid, "elpv", vision=vision, label=label, provenance={"vision": f"elpv:{item.name}", "split": split,
                                                                    "cell_type": item.cell_type})


def elpv_bench(seed: int, val_fraction: float = 0.15, root=None) -> BenchData:
    """``val_fraction`` of the training split (stratified like the split) is held out for validation; 0 trains on
    all of it (no validation units: no epoch selection, and a fixed threshold instead of a calibrated one)."""
    from inspection.data.elpv import load_elpv

    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1); got {val_fraction}")
    ds = load_elpv(root)
    train_items, test_items = ds.split(seed)
    if val_fraction > 0:
        tr, va = stratified_split([(it.grade, it.cell_type) for it in train_items], val_fraction, seed + 1000)
    else:
        tr, va = range(len(train_items)), ()
    return BenchData(
        "elpv", seed,
        [elpv_unit(train_items[i], i, "train") for i in tr],
        [elpv_unit(train_items[i], i, "val") for i in va],
        [elpv_unit(it, i, "test") for i, it in enumerate(test_items)],
        ELPV_CLASSES,
    )


# -------------------------------------------------------------------------------------------- bearings
def bearing_units(recordings, window_s: float, hop_s: float, split: str) -> list[Unit]:
    out = []
    for rec in recordings:
        length = int(round(window_s * rec.sample_rate_hz))
        hop = max(1, int(round(hop_s * rec.sample_rate_hz)))
        for start in range(0, rec.signal.shape[0] - length + 1, hop):
            uid = f"brg-{rec.name}-{start}"
            reading = VibrationReading(values=rec.signal[None, start:start + length], sample_rate_hz=rec.sample_rate_hz,
                                       unit="g", unit_id=uid, line_id="bearings", reading_id=f"{uid}-vibration",
                                       source="bearings/accelerometer", event_time=_T0 + timedelta(seconds=len(out)))
            klass = "ok" if rec.label == "baseline" else rec.label
            label = Label(defect=klass != "ok", defect_class=klass,
                          culprits=frozenset({"vibration"}) if klass != "ok" else frozenset())
            out.append(Unit(uid, "bearings", vibration=reading, label=label,
                            provenance={"vibration": f"bearings:{rec.name}@{start}+{length}", "split": split}))
    return out


#: Folds of the bearings cross-validation: every recording is a test recording in exactly one fold.
BEARINGS_FOLDS = 5


def bearing_folds(recordings, seed: int, folds: int = BEARINGS_FOLDS) -> list[list[str]]:
    """Grouped, class-stratified folds of whole recordings: each class's recordings, shuffled with ``seed``, are
    dealt to the folds in turn, the deal carrying on from class to class (classes in name order), so every fold
    holds ``len(recordings) / folds`` recordings (±1) and no class gathers in the first folds. The seed changes
    the folds."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2; got {folds!r}")
    if folds > len(recordings):
        raise ConfigError(f"{folds} folds need at least {folds} recordings; got {len(recordings)}")
    rng = np.random.default_rng([int(seed), 2])
    out: list[list[str]] = [[] for _ in range(folds)]
    turn = 0
    for klass in sorted({r.label for r in recordings}):
        names = sorted(r.name for r in recordings if r.label == klass)
        for name in rng.permutation(names):
            out[turn % folds].append(str(name))
            turn += 1
    return [sorted(f) for f in out]


def bearings_bench(seed: int, fold: int = 0, folds: int = BEARINGS_FOLDS, window_s: float = 0.25,
                   train_hop_s: float = 0.05, test_hop_s: float = 0.125, root=None) -> BenchData:
    """Fold ``fold`` of the grouped cross-validation over all recordings (:func:`bearing_folds`): its recordings
    are the test split, never windows of a training recording. Validation, inside the training fold, by a rule
    fixed before any result was seen: for each class with at least two training recordings, one of them drawn
    with ``(seed, fold)``; the rest train."""
    from inspection.data.bearings import load_bearings

    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ConfigError(f"fold must be an integer in [0, {folds}); got {fold!r}")
    recordings = load_bearings(root)
    test_names = set(bearing_folds(recordings, seed, folds)[fold])
    train_recs = [r for r in recordings if r.name not in test_names]
    rng = np.random.default_rng([int(seed), int(fold), 3])
    val_names = set()
    for klass in sorted({r.label for r in train_recs}):
        names = sorted(r.name for r in train_recs if r.label == klass)
        if len(names) >= 2:
            val_names.add(str(rng.choice(names)))
    return BenchData(
        "bearings", seed,
        bearing_units([r for r in train_recs if r.name not in val_names], window_s, train_hop_s, "train"),
        bearing_units([r for r in train_recs if r.name in val_names], window_s, test_hop_s, "val"),
        bearing_units([r for r in recordings if r.name in test_names], window_s, test_hop_s, "test"),
        BEARING_CLASSES,
        fold=fold, folds=folds,
    )


# ------------------------------------------------------------------------------------------- composite
def composite_bench(seed: int, n_train: int = 3000, n_val: int = 500, n_test: int = 1000,
                    temperature_source: str = "auto") -> BenchData:
    """Composite units; validation units are drawn from held-out sources (images, recordings and files that
    neither the training nor the test units use), so thresholds chosen on them meet new sources as test does."""
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    builder = CompositeBuilder(CompositeConfig(seed=seed, temperature_source=temperature_source))
    notes = ("composite units: constructed pairing of real readings",)
    if builder.temperature_source == "synthetic":
        notes += ("synthetic temperature",)
    return BenchData(
        "composite", seed,
        builder.units("train", n_train),
        builder.units("val", n_val),
        builder.units("test", n_test),
        COMPOSITE_CLASSES,
        notes,
    )


def load_bench(bench: str, seed: int, **kw) -> BenchData:
    if bench == "elpv":
        return elpv_bench(seed, **kw)
    if bench == "bearings":
        return bearings_bench(seed, **kw)
    if bench == "composite":
        return composite_bench(seed, **kw)
    raise ConfigError(f"unknown bench {bench!r} for supervised training; known: elpv, bearings, composite "
                      "(skab runs its own normal-only protocol)")


# ------------------------------------------------------------------------------------------ model configs
def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in a config dict: ``["encoders.vibration.config.preprocess.env_relative=true"]``; values
    are JSON (bare words are strings). The result is validated when the config is built."""
    import copy
    import json

    out = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"overrides look like dotted.key=value; got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {k} is not an object")
        node[keys[-1]] = value
    return out


#: The bearings model's waveform preprocessing: load changes how loud a bearing is and the shape of its broadband
#: spectrum, not where its fault impacts pulse (BPFO/BPFI are fixed multiples of the shaft rate, 25 Hz in every
#: recording). So the spectrum and waveform are taken of the window divided by its RMS, and the envelope spectrum
#: (of the 1-20 kHz resonance band, the same band at either sample rate) as peak prominence over its local floor.
#: Chosen on the validation recordings: the absolute-level model classified every outer-race validation window
#: as another class once the window was made 1.5x louder; this one is unchanged by any gain.
BEARINGS_WAVEFORM = {"level_invariant": True, "env_floor_bins": 15, "env_low_pass_hz": 20_000.0}


def default_model_config(bench: str, *, dim: int = 256, image_size: int = 224, modalities: Sequence[str] | None = None,
                         moe: bool = True, overrides: Sequence[str] = ()) -> ModelConfig:
    """The model each benchmark trains by default (``modalities`` restricts a composite model, e.g. to one;
    ``overrides`` sets dotted config keys, see :func:`apply_overrides`)."""
    config = _default_model_config(bench, dim=dim, image_size=image_size, modalities=modalities, moe=moe)
    return ModelConfig.from_dict(apply_overrides(config.to_dict(), overrides)) if overrides else config


def _default_model_config(bench: str, *, dim: int, image_size: int, modalities: Sequence[str] | None,
                          moe: bool) -> ModelConfig:
    vision = EncoderSpec("vision", {"drop_path": 0.2, "preprocess": {"image_size": image_size}})
    waveform = EncoderSpec("waveform")
    temperature = EncoderSpec("series", {"modality": "temperature", "channel_names": ["engine", "fluid"],
                                         "preprocess": {"channels": 2, "samples": 60}})
    # bias rate 1e-2: our runs take ~10^3 optimizer steps, not the 10^5 the 1e-3 default is tuned for
    moe_cfg = MoEConfig(dim=dim, hidden=dim, n_experts=16, top_k=2, n_shared=1, bias_update_rate=1e-2) if moe else None
    bridge = BridgeConfig(dim=dim, n_queries=16, n_heads=8, n_layers=2, moe=moe_cfg, ffn_hidden=2 * dim)
    if bench == "elpv":
        return ModelConfig(encoders={"vision": vision}, bridge=bridge, class_names=ELPV_CLASSES, modality_dropout=0.0)
    if bench == "bearings":
        return ModelConfig(encoders={"vibration": EncoderSpec("waveform", {"preprocess": BEARINGS_WAVEFORM})},
                           bridge=bridge, class_names=BEARING_CLASSES, modality_dropout=0.0)
    if bench == "composite":
        encoders = {"vision": vision, "vibration": waveform, "temperature": temperature}
        if modalities is not None:
            encoders = {m: encoders[m] for m in modalities}
        return ModelConfig(encoders=encoders, bridge=bridge, class_names=COMPOSITE_CLASSES,
                           modality_dropout=0.25 if len(encoders) > 1 else 0.0)
    raise ConfigError(f"no default model for bench {bench!r}")
