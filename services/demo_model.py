"""Demo models: the composite fusion model the demo serves, trained on CPU, and its late-fusion baselines.

:func:`ensure_demo_model` serves the store's promoted version when it is calibrated; otherwise it trains
the small model below on real composite training units, calibrates its thresholds on held-out training
units (max-F1) and saves it, promoted, with a card that says what it is. It is a demonstration model,
smaller and far less trained than the benchmarked one (``inspection train --bench composite``): the
architecture is the same (all three encoders, the cross-modal bridge, a sparse MoE), the sizes are not.
The stream benchmark and the tests use it with its defaults ("the small demo model", about half a minute).

:func:`ensure_preset_model` does the same for a named recipe of :data:`PRESETS`: ``standard`` is the model
``inspection demo`` serves, ``fast`` trains in seconds for tests of the demo's code path. A preset selects its
epoch, calibrates its threshold and fixes its late-fusion threshold on units of the composite *validation* split
(drawn from images, recordings and SKAB files that neither the training nor the test split uses), never on the
test split the demo streams. :func:`ensure_baselines` trains, beside the preset model in
``<store>/baselines/<modality>``, the same recipe restricted to one modality each (each calibrated on the
validation units' defects it can see, its card saying it is a baseline); :func:`load_baselines` adds the late
fusion of the composite bench (the largest margin of a single-modality score over its own threshold, in logits,
with a threshold of its own for maximum F1 on the validation units) and the majority class of the training labels.

How the ``standard`` preset was chosen: every recipe trained on the composite train split (seed 0), its epoch and
threshold (max F1) chosen on composite validation units 0-255, compared on validation units 256-511 (256 units,
a standard error of about 0.03) and, for the last candidates, 256-1023 (768 units). 2-core CPU shared with other
jobs: times are what they were, not a benchmark. Late fusion: the same recipe's three single-modality models,
combined as described above, thresholds on the same validation units::

    recipe (fusion model)                                   compared on  fused acc / F1   late fusion acc / F1
    320 units, 3 epochs (the small model's recipe)          256 units    0.664 / 0.705
    320 units, 8 epochs                                     256 units    0.727 / 0.696
    320 units, 8 epochs, 96 px images (3x the time)         256 units    0.750 / 0.733
    960 units, 5 epochs                                     256 units    0.754 / 0.732    0.824 / 0.816
    960 units, 5 epochs, culprit loss weight 1              256 units    0.703 / 0.727
      + modality dropout 0.5                                256 units    0.730 / 0.754    0.855 / 0.853
                                                            768 units    0.684 / 0.712
    960 units, 8 epochs, culprit loss 1, dropout 0.5        256 units    0.805 / 0.809    0.824 / 0.822
                                                            768 units    0.738 / 0.739    0.823 / 0.825
      + modality dropout 0.7 instead                        256 units    0.758 / 0.748
      + width 128                                           256 units    0.754 / 0.741
      + class loss weight 1                                 256 units    0.734 / 0.757
      + 16 fusion queries (1 / 2 bridge layers)             768 units    0.728 / 0.719, 0.729 / 0.715
    960 units, 5 epochs, culprit loss 0.3 (as above)        768 units    0.717 / 0.680
    1920 units, 4 epochs, culprit loss 1, dropout 0.5       256 units    0.773 / 0.756
    fusion fine-tuned on the baselines' trained encoders    256 units    0.754-0.797 /    0.855 / 0.853
      (3 variants, 3-4 epochs)                                           0.776-0.795

The first chosen recipe: 960 units, 8 epochs, 64 px, culprit loss weight 1, modality dropout 0.5 -- the best
fused accuracy and F1 on the 768 validation units; about 1.5 minutes for the fusion model and 1.5 for the three
baselines on two idle cores. Larger images, width, more queries or layers and more units did not do better on
these units in the time.

Late fusion beat every one of those fused recipes. On composite units the three modalities are independent by
construction (a unit is defective when any one reading is), so the largest single-modality margin is close to
the best rule there is. The fusion model's defect head, on the bridge's queries plus the mean of all 32 tokens,
under-used the image and temperature evidence: the AUROC of its defect score against image culprits was 0.64
(its image head's 0.82), against temperature culprits 0.52 (its temperature head's 0.61). Hence the model's
*modality evidence* (:class:`~inspection.model.ModelConfig`): the per-modality heads' soft OR is added to the
defect logit, so the fused head only has to learn what the modalities say beyond it. Compared on the same 768
validation units (256-1023). Each change of the training code retrained the baselines, and a retrained baseline
moves late fusion by up to 3 points on these units (0.799 / 0.796, 0.828 / 0.824, 0.798 / 0.800, 0.811 / 0.812
for the same recipe), so each row names the late fusion it was compared with::

    recipe: the first chosen one, plus                              fused acc / F1   AUROC   late fusion
    modality evidence (linear head on the mean token)               0.766 / 0.769    0.804   0.799 / 0.796
      + culprit loss weight 3                                       0.768 / 0.763    0.816   0.799 / 0.796
    evidence, heads pooled by log-mean-exp of per-token logits      0.766 / 0.774    0.815   0.799 / 0.796
      + culprit loss on every modality a unit has                   0.768 / 0.783    0.831   0.828 / 0.824
      + an MLP head (hidden 64) on each token                       0.783 / 0.771    0.829   0.828 / 0.824
        + 14 epochs instead of 8 (60 s more)                        0.784 / 0.776    0.851   0.828 / 0.824
        + culprit loss weight 5                                     0.793 / 0.774    0.852   0.798 / 0.800
        + culprit loss weight 15                                    0.792 / 0.788    0.833   0.798 / 0.800
      + four-query attention pooling + MLP instead                  0.768 / 0.782    0.827   0.798 / 0.800
    evidence (log-mean-exp, MLP) + encoders from their own heads    0.794 / 0.777    0.856   0.811 / 0.812
      + 12 epochs instead of 8 (40 s more)                          0.799 / 0.781    0.856   0.811 / 0.812
    evidence (linear head on the mean token) + own-head encoders    0.792 / 0.791    0.838   0.811 / 0.812

Why "encoders from their own heads" (``TrainConfig.encoder_grad = "own_head"``): in every variant before it the
fusion model's temperature head reached an AUROC of 0.67-0.71 against temperature culprits, where the temperature
baseline's own linear head on the mean token -- the same head on the same encoder -- reached 0.82. The difference
is what trains the encoder: in the fusion model the shared defect and class losses, which vibration (AUROC 1.0)
and the image explain, pull the temperature encoder too. With each encoder trained only by its own head's culprit
loss (the bridge and the fused heads train on top of the tokens), the temperature head reached 0.80.

Chosen (``standard``): the first recipe plus modality evidence with linear heads and own-head encoders (the last
row: the best F1 with the simplest heads; pooling and MLP heads did not help once the encoders learned from their
own heads) -- 0.792 / 0.791 where the first recipe scored 0.738 / 0.739, in the same 8 epochs. **Late fusion is
still ahead on these validation units** (0.811 / 0.812, 2 points): three single-modality models, each with its own
bridge and MoE, against one model of the same size.

Whether any fusion recipe can clearly beat late fusion on these units was then asked of the model's own parts, over
training seeds (``bench/demo_fusion.py`` repeats the check for the chosen recipe over data seeds and writes
``bench/results/demo_fusion.json``), with this module's training and calibration functions on the validation
units of seed 0 (256-1023, thresholds for maximum F1 on 0-255); training seeds 1-3 retrained the baselines too
(their late fusion is each seed's own) and read the units preprocessed once, stored in half precision; a "head" is
a per-modality head, its AUROC against that modality's culprits; "heads' max" decides by the largest head logit
alone (late fusion inside the model, threshold chosen the same way)::

    seed 0 (late fusion 0.835 / 0.830, AUROC 0.860)         fused acc / F1   AUROC   heads' max   temp. head
    chosen recipe                                           0.792 / 0.791    0.838                0.706
    each head also reads the bridge run on its modality     0.793 / 0.761    0.874   0.832 / 0.830  0.826
      alone (one more bridge pass per modality)
      + culprit loss weight 3                               0.789 / 0.775    0.857                0.826
      + 12 epochs                                           0.790 / 0.792    0.873                0.826
      + trained with the heads' max instead of soft OR      0.775 / 0.757    0.853   0.783 / 0.779  0.826

    seeds 1 / 2 / 3                         fused acc / F1             heads' max acc / F1         vision / temp. head
    late fusion                             .809/.816 .827/.824 .812/.808                          .79-.82 / .81-.83
    chosen recipe                           .780/.772 .786/.770 .801/.792  .823/.822 .818/.814 .835/.834  .81-.85 / .71
    heads also read the bridge alone        .788/.771 .762/.760 .779/.773  .786/.793 .796/.789 .818/.820  .78-.82 / .82

What this says: each of the fusion model's heads reads its modality about as well as the single-modality baseline
does (vision a little better, temperature as well once its head reads the bridge, vibration perfectly in both), and
the best decision made from the model's own parts, the largest head logit, is late fusion inside the model: on
average 0.9 / 0.7 points above late fusion, per seed -1.0 to +2.6, no clear lead. The fused head, which reads every
modality together, makes the decision worse (3-5 points below the heads' max): on composite units the readings
are independent by construction, so there is nothing for it to add, and what it learns on the training units does
not carry over. A fusion model can clearly beat late fusion only where the modalities interact, which these units,
by design, do not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inspection.errors import ConfigError, StoreError
from inspection.evaluation import late_fusion_score, margin, predict_units
from inspection.progress import Progress
from inspection.records import MODALITIES, Unit
from inspection.store import ModelStore, ModelVersion
from inspection.training import TrainConfig

log = logging.getLogger(__name__)

#: What the demo model is, for its card.
DEMO_NOTE = ("small demonstration model trained on CPU: 64 px images, width 64, one bridge layer, 4-expert MoE; "
             "a few epochs on a few hundred composite units. Not the benchmarked model.")
#: Sub-folder of a preset model's store that holds its single-modality baselines, one store per modality.
BASELINES_DIR = "baselines"
#: The late-fusion threshold of a store's baselines, cached beside them (recomputed when a baseline changes).
LATE_FUSION_FILE = "late_fusion.json"


def demo_model_config(*, image_size: int = 64, dim: int = 64, modalities: Sequence[str] = MODALITIES,
                      modality_dropout: float = 0.25, modality_evidence: bool = False):
    """The small fusion model: the benchmark architecture at demonstration size (``modalities`` restricts it to
    some encoders, as the single-modality baselines are; they train without modality dropout and without
    modality evidence, there being no other modality to weigh). ``modality_evidence``: the per-modality heads add
    their soft OR to the defect logit (see :class:`~inspection.model.ModelConfig`)."""
    from fusion.bridge import BridgeConfig
    from fusion.moe import MoEConfig
    from inspection.benches import COMPOSITE_CLASSES
    from inspection.model import EncoderSpec, ModelConfig

    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities:
        raise ConfigError(f"modalities must be some of {MODALITIES}; got {list(modalities)}")
    encoders = {
        "vision": EncoderSpec("vision", {"drop_path": 0.0, "preprocess": {"image_size": image_size}}),
        "vibration": EncoderSpec("waveform", {"band_bins": 16, "env_band_bins": 16, "wave_tokens": 4,
                                              "preprocess": {"n_bins": 128, "env_bins": 64, "wave_len": 1024}}),
        "temperature": EncoderSpec("series", {"modality": "temperature", "channel_names": ["engine", "fluid"],
                                              "preprocess": {"channels": 2, "samples": 60}}),
    }
    encoders = {m: encoders[m] for m in MODALITIES if m in modalities}
    bridge = BridgeConfig(dim=dim, n_queries=8, n_heads=4, n_layers=1, dropout=0.0, ffn_hidden=2 * dim,
                          moe=MoEConfig(dim=dim, hidden=dim, n_experts=4, top_k=2, n_shared=1))
    fusion = len(encoders) > 1
    return ModelConfig(encoders=encoders, bridge=bridge, class_names=COMPOSITE_CLASSES,
                       modality_dropout=modality_dropout if fusion else 0.0,
                       modality_evidence=modality_evidence and fusion)


def ensure_demo_model(store_root: Path | str, *, seed: int = 0, train_units: int = 320, val_units: int = 128,
                      epochs: int = 3, run_dir: Path | str = "runs/demo-model", device: str = "cpu",
                      progress: bool = False) -> ModelVersion:
    """The store's promoted calibrated version, or a freshly trained, calibrated and promoted demo model.

    Args:
        store_root: the model store.
        seed: composite data seed (training units come from the train split, never the test split).
        train_units, val_units: training units and held-out units for early stopping and calibration.
        epochs: training epochs.
        run_dir: where training writes its checkpoint and curves.
        device: where to train (``cpu``, ``cuda`` or ``auto``); the saved model is the same either way.
        progress: show progress bars.
    """
    import numpy as np
    import torch

    from inspection.calibration import calibrate
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.training import PreparedSet, TrainConfig, predict, train_supervised

    store = ModelStore(store_root, create=True)
    promoted = store.promoted()
    if promoted is not None and promoted.card.get("threshold_version"):
        return promoted
    t0 = time.monotonic()
    builder = CompositeBuilder(CompositeConfig(seed=seed))
    units = builder.units("train", train_units + val_units)
    train, val = units[:train_units], units[train_units:]
    config = demo_model_config()
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, backbone_lr=5e-4, seed=seed, device=device, amp=False)
    log.info("training the demo model on %d composite units (%d held out), %d epochs on %s", len(train),
             len(val), epochs, device)
    result = train_supervised(config, train, val, cfg, run_dir, progress=progress)
    model = result.model.cpu().eval()
    prepared = PreparedSet(model, val, config.class_names)
    scores = predict(model, prepared, torch.device("cpu"))["score"]
    labels = np.array([u.label.defect for u in val])
    model, cal = calibrate(model, scores, labels, [u.line_id for u in val], "max_f1")
    card = {
        "name": "composite-demo", "bench": "composite", "seed": seed, "mode": "supervised",
        "modalities": list(config.modalities), "model_config": model.config.to_dict(),
        "threshold_version": cal.version, "calibration": cal.to_dict(), "note": DEMO_NOTE,
        "data": {"train_units": len(train), "val_units": len(val), "split": "composite train split"},
        "history": result.history, "train_seconds": round(time.monotonic() - t0, 1),
    }
    version = store.save(model.state_dict(), card, promote=True)
    log.info("demo model %s saved to %s after %.0f s", version.version, store.root, time.monotonic() - t0)
    return version


# --------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class DemoPreset:
    """A recipe of the demo model (see the module docstring for how ``standard`` was chosen).

    Attributes:
        name: the preset's name.
        train_units: units of the composite train split it trains on.
        val_units: units of the composite validation split: epoch selection, thresholds, late fusion.
        training: the training recipe (epochs, batch size, learning rates, culprit-loss weight; validated by
            :class:`~inspection.training.TrainConfig`); seed and device are set when it trains. The epoch with the
            best validation AUROC is kept.
        image_size: image side in pixels.
        dim: model width.
        modality_dropout: the fusion model's probability of hiding each present modality in training (the
            single-modality baselines have none to hide).
        modality_evidence: the fusion model's per-modality heads add their evidence to its defect logit
            (:func:`demo_model_config`).
    """

    name: str
    train_units: int
    val_units: int
    training: TrainConfig
    image_size: int = 64
    dim: int = 64
    modality_dropout: float = 0.25
    modality_evidence: bool = False

    def __post_init__(self) -> None:
        for key in ("train_units", "val_units"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"preset {self.name}: {key} must be a positive integer; got {value!r}")

    @property
    def epochs(self) -> int:
        return self.training.epochs

    def model_config(self, modalities: Sequence[str] = MODALITIES):
        return demo_model_config(image_size=self.image_size, dim=self.dim, modalities=modalities,
                                 modality_dropout=self.modality_dropout, modality_evidence=self.modality_evidence)

    def train_config(self, seed: int, device: str) -> TrainConfig:
        """The recipe's :class:`~inspection.training.TrainConfig` with ``seed`` and ``device``."""
        return dataclasses.replace(self.training, seed=seed, device=device)

    def note(self, modalities: Sequence[str] = MODALITIES) -> str:
        what = ("fusion model (all three encoders, one bridge layer, 4-expert MoE)" if len(modalities) > 1 else
                f"single-modality baseline: the same recipe restricted to {modalities[0]}, for the demo's late "
                "fusion")
        epochs = f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}"
        return (f"demonstration {what}, preset {self.name}, trained on CPU: {self.image_size} px images, width "
                f"{self.dim}, {epochs} on {self.train_units} composite training units; epoch and "
                f"threshold chosen on {self.val_units} composite validation units (held-out sources). Not the "
                "benchmarked model.")


#: The demo's recipes: ``standard`` is served by ``inspection demo``; ``fast`` exercises the same code in seconds.
PRESETS: dict[str, DemoPreset] = {
    # float32 on every device (no autocast), so that the stored model is the same wherever it trained
    "standard": DemoPreset("standard", train_units=960, val_units=256, modality_dropout=0.5, modality_evidence=True,
                           training=TrainConfig(epochs=8, batch_size=32, lr=2e-3, backbone_lr=5e-4,
                                                modality_weight=1.0, encoder_grad="own_head", amp=False)),
    "fast": DemoPreset("fast", train_units=48, val_units=32,
                       training=TrainConfig(epochs=1, batch_size=32, lr=2e-3, backbone_lr=5e-4, modality_weight=0.3,
                                            amp=False)),
}


def get_preset(name: str) -> DemoPreset:
    """The preset called ``name``.

    Raises:
        ConfigError: an unknown name (the known ones are listed).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown demo preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def composite_builder(seed: int, builder=None):
    """``builder`` (checked to have ``seed``), or a new :class:`~inspection.data.composite.CompositeBuilder`."""
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    builder = builder if builder is not None else CompositeBuilder(CompositeConfig(seed=seed))
    if builder.config.seed != seed:
        raise ConfigError(f"the composite builder has seed {builder.config.seed}; the preset asks for seed {seed}")
    return builder


def preset_units(preset: DemoPreset, seed: int, builder=None) -> tuple[list[Unit], list[Unit]]:
    """``(training units, validation units)`` of a preset: the first units of the composite train and
    validation splits (never the test split)."""
    builder = composite_builder(seed, builder)
    return builder.units("train", preset.train_units), builder.units("val", preset.val_units)


def _calibrated(store: ModelStore, preset: DemoPreset, seed: int, modalities: Sequence[str]) -> ModelVersion | None:
    """The store's promoted version when it is calibrated and, for a baseline store, trained by this recipe and
    seed; a fusion model that this preset trained by an older recipe is stale too (a model of any other origin is
    served as it is). A cached model is served whichever temperature source is available now; its card says which
    it had."""
    promoted = store.promoted()
    if promoted is None or not promoted.card.get("threshold_version"):
        return None
    card = promoted.card
    if card.get("preset") == preset.name and card.get("preset_config") != asdict(preset):
        return None  # this preset's model, trained by an older recipe: train the current one
    if len(modalities) == 1 and (card.get("preset_config") != asdict(preset) or card.get("seed") != seed
                                 or list(card.get("modalities", ())) != list(modalities)):
        return None  # a baseline of another recipe: train this one
    return promoted


def _train_and_save(store: ModelStore, preset: DemoPreset, seed: int, modalities: Sequence[str],
                    train: Sequence[Unit], val: Sequence[Unit], temperature_source: str, run_dir: Path | str,
                    device: str, progress: bool | Progress, extra: Mapping | None = None) -> ModelVersion:
    """Train the preset's model on ``modalities``, calibrate it (max F1) on the validation units' defects it can
    see, save it promoted with its card."""
    import torch

    from inspection.calibration import calibrate
    from inspection.training import PreparedSet, predict, train_supervised

    t0 = time.monotonic()
    drop = [m for m in MODALITIES if m not in modalities]
    if drop:
        train = [u.without(*drop) for u in train]
        val = [u.without(*drop) for u in val]
    config = preset.model_config(modalities)
    result = train_supervised(config, train, val, preset.train_config(seed, device), run_dir, progress=progress)
    model = result.model.cpu().eval()
    scores = predict(model, PreparedSet(model, val, config.class_names), torch.device("cpu"))["score"]
    seen = set(modalities)
    labels = np.array([bool(u.label.culprits & seen) for u in val])
    model, cal = calibrate(model, scores, labels, [u.line_id for u in val], "max_f1")
    defects = sum(1 for u in train if u.label.culprits & seen)
    card = {
        "name": f"composite-demo-{preset.name}" + ("" if not drop else f"-{modalities[0]}-only"),
        "role": "demo model" if not drop else "late-fusion baseline",
        "bench": "composite", "seed": seed, "mode": "supervised", "preset": preset.name,
        "preset_config": asdict(preset), "modalities": list(config.modalities),
        "model_config": model.config.to_dict(), "threshold_version": cal.version, "calibration": cal.to_dict(),
        "note": preset.note(list(config.modalities)),
        "data": {"train_units": len(train), "val_units": len(val), "train_defects": defects,
                 "temperature_source": temperature_source,
                 "split": "composite train split; validation: composite validation split (held-out sources)",
                 "labels": "defect" if not drop else f"defects with a culprit in {modalities[0]}"},
        "history": result.history, "train_seconds": round(time.monotonic() - t0, 1), **(extra or {}),
    }
    version = store.save(model.state_dict(), card, promote=True)
    log.info("%s %s saved to %s after %.0f s", card["name"], version.version, store.root, time.monotonic() - t0)
    return version


def ensure_preset_model(store_root: Path | str, preset: str = "standard", *, seed: int = 0,
                        run_dir: Path | str = "runs/demo-model", device: str = "cpu",
                        progress: bool | Progress = False, builder=None) -> ModelVersion:
    """The store's promoted calibrated version, or a freshly trained, calibrated and promoted model of ``preset``.

    Args:
        store_root: the model store (created when missing).
        preset: a name of :data:`PRESETS`.
        seed: composite data seed and training seed.
        run_dir: where training writes its checkpoint and curves.
        device: where to train (``cpu``, ``cuda`` or ``auto``).
        progress: progress of preprocessing and of every epoch (see :mod:`inspection.progress`).
        builder: a :class:`~inspection.data.composite.CompositeBuilder` of ``seed`` to reuse (else one is built).

    Raises:
        ConfigError: an unknown preset.
    """
    recipe = get_preset(preset)
    store = ModelStore(store_root, create=True)
    builder = composite_builder(seed, builder)
    found = _calibrated(store, recipe, seed, MODALITIES)
    if found is not None:
        return found
    train, val = preset_units(recipe, seed, builder)
    return _train_and_save(store, recipe, seed, MODALITIES, train, val, builder.temperature_source, run_dir, device,
                           progress)


def preset_model_needed(store_root: Path | str, preset: str = "standard", *, seed: int = 0) -> bool:
    """Whether :func:`ensure_preset_model` would train: the store (created when missing) has no calibrated model,
    or holds this preset's model of an older recipe."""
    return _calibrated(ModelStore(store_root, create=True), get_preset(preset), seed, MODALITIES) is None


def baseline_store(store_root: Path | str, modality: str) -> Path:
    """Where the single-modality baseline of ``modality`` lives beside a preset model."""
    return Path(store_root) / BASELINES_DIR / modality


def ensure_baselines(store_root: Path | str, preset: str = "standard", *, seed: int = 0,
                     run_dir: Path | str = "runs/demo-model", device: str = "cpu", progress: bool | Progress = False,
                     builder=None, on_train=None) -> dict[str, ModelVersion]:
    """The single-modality baselines of ``preset`` beside the model in ``store_root``, trained where missing (or
    trained by another recipe or seed).

    Args:
        on_train: called with the modality before a baseline is trained (progress messages).

    Returns:
        modality -> the baseline's promoted version.
    """
    recipe = get_preset(preset)
    builder = composite_builder(seed, builder)
    out: dict[str, ModelVersion] = {}
    units: tuple[list[Unit], list[Unit]] | None = None
    for m in MODALITIES:
        store = ModelStore(baseline_store(store_root, m), create=True)
        found = _calibrated(store, recipe, seed, (m,))
        if found is None:
            if on_train is not None:
                on_train(m)
            units = units or preset_units(recipe, seed, builder)
            found = _train_and_save(store, recipe, seed, (m,), units[0], units[1], builder.temperature_source,
                                    Path(run_dir) / f"{m}-only", device, progress)
        out[m] = found
    return out


# ----------------------------------------------------------------------------------------- late fusion
@dataclass
class Baselines:
    """The demo's baselines, ready to score units.

    Attributes:
        models: modality -> its single-modality model (calibrated, eval mode, on CPU).
        versions: modality -> the model's store version.
        late_threshold: the late-fusion threshold on the largest margin (logits), max F1 on validation units.
        val_units: how many validation units chose it.
        majority_defect: whether ``defect`` is the majority class of the preset's training labels.
        train_defect_share: the share of defects among those labels.
        train_units: how many training labels that is.
    """

    models: dict
    versions: dict[str, str]
    late_threshold: float
    val_units: int
    majority_defect: bool
    train_defect_share: float
    train_units: int

    def margins(self, units: Sequence[Unit]) -> np.ndarray:
        """Each single-modality model's margin over its own threshold, in logits, ``[B, M]`` (NaN where the
        unit lacks the modality)."""

        out = np.full((len(units), len(MODALITIES)), np.nan)
        for j, m in enumerate(MODALITIES):
            rows = [i for i, u in enumerate(units) if m in u.present]
            if not rows:
                continue
            others = [x for x in MODALITIES if x != m]
            pred = predict_units(self.models[m], [units[i].without(*others) for i in rows], "cpu")
            out[rows, j] = margin(pred["score"], pred["threshold"])
        return out

    def late_fusion(self, units: Sequence[Unit]) -> np.ndarray:
        """Late-fusion decisions (``[B]`` bool, True = defect): the largest margin of a present modality over the
        late-fusion threshold."""
        return late_fusion_score(self.margins(units)) >= self.late_threshold

    def majority(self, n: int) -> np.ndarray:
        """The majority-class decisions of ``n`` units (``[n]`` bool, True = defect)."""
        return np.full(n, self.majority_defect)


def load_baselines(store_root: Path | str, preset: str = "standard", *, seed: int = 0,
                   run_dir: Path | str = "runs/demo-model", device: str = "cpu", progress: bool | Progress = False,
                   builder=None, on_train=None) -> Baselines:
    """The baselines of ``preset`` beside the model in ``store_root`` (trained where missing, see
    :func:`ensure_baselines`), with the late-fusion threshold (cached in ``baselines/late_fusion.json``, chosen
    again when a baseline changed) and the training labels' majority class.

    Raises:
        StoreError: a baseline store that cannot be read.
    """
    from inspection.calibration import choose_threshold
    from inspection.experiments import load_model

    recipe = get_preset(preset)
    builder = composite_builder(seed, builder)
    versions = ensure_baselines(store_root, preset, seed=seed, run_dir=run_dir, device=device, progress=progress,
                                builder=builder, on_train=on_train)
    models = {m: load_model(ModelStore(baseline_store(store_root, m)), v.version)[0] for m, v in versions.items()}
    ids = {m: v.version for m, v in versions.items()}
    cache = Path(store_root) / BASELINES_DIR / LATE_FUSION_FILE
    cached = None
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"cannot read {cache}: {exc}; delete it to choose the late-fusion threshold again") \
                from exc
    if not (isinstance(cached, dict) and cached.get("versions") == ids and cached.get("seed") == seed):
        train, val = preset_units(recipe, seed, builder)
        base = Baselines(models, ids, float("nan"), len(val), False, 0.0, len(train))
        late = late_fusion_score(base.margins(val))
        threshold = choose_threshold(late, np.array([u.label.defect for u in val]), "max_f1")
        share = float(np.mean([u.label.defect for u in train]))
        cached = {"versions": ids, "seed": seed, "preset": recipe.name, "temperature_source": builder.temperature_source,
                  "threshold": threshold, "method": "max_f1",
                  "val_units": len(val), "train_units": len(train), "train_defect_share": share,
                  "rule": "defect when the largest single-modality margin over its own threshold (logits) is >= "
                          "threshold"}
        cache.write_text(json.dumps(cached, indent=1))
    return Baselines(models, ids, float(cached["threshold"]), int(cached["val_units"]),
                     cached["train_defect_share"] > 0.5, float(cached["train_defect_share"]),
                     int(cached["train_units"]))


__all__ = ["DEMO_NOTE", "PRESETS", "Baselines", "DemoPreset", "baseline_store", "demo_model_config",
           "ensure_baselines", "ensure_demo_model", "ensure_preset_model", "get_preset", "load_baselines",
           "preset_model_needed", "preset_units"]
