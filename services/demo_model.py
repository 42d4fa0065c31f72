"""A small composite model for the demo and the CPU stream benchmark, trained on CPU in about a minute.

:func:`ensure_demo_model` serves the store's promoted version when it is calibrated; otherwise it trains
the small model below on real composite training units, calibrates its thresholds on held-out training
units (max-F1) and saves it, promoted, with a card that says what it is. It is a demonstration model,
smaller and far less trained than the benchmarked one (``inspection train --bench composite``): the
architecture is the same (all three encoders, the cross-modal bridge, a sparse MoE), the sizes are not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from inspection.store import ModelStore, ModelVersion

log = logging.getLogger(__name__)

#: What the demo model is, for its card.
DEMO_NOTE = ("small demonstration model trained on CPU: 64 px images, width 64, one bridge layer, 4-expert MoE; "
             "a few epochs on a few hundred composite units. Not the benchmarked model.")


def demo_model_config():
    """The small fusion model: the benchmark architecture at demonstration size."""
    from fusion.bridge import BridgeConfig
    from fusion.moe import MoEConfig
    from inspection.benches import COMPOSITE_CLASSES
    from inspection.model import EncoderSpec, ModelConfig

    dim = 64
    encoders = {
        "vision": EncoderSpec("vision", {"drop_path": 0.0, "preprocess": {"image_size": 64}}),
        "vibration": EncoderSpec("waveform", {"band_bins": 16, "env_band_bins": 16, "wave_tokens": 4,
                                              "preprocess": {"n_bins": 128, "env_bins": 64, "wave_len": 1024}}),
        "temperature": EncoderSpec("series", {"modality": "temperature", "channel_names": ["engine", "fluid"],
                                              "preprocess": {"channels": 2, "samples": 60}}),
    }
    bridge = BridgeConfig(dim=dim, n_queries=8, n_heads=4, n_layers=1, dropout=0.0, ffn_hidden=2 * dim,
                          moe=MoEConfig(dim=dim, hidden=dim, n_experts=4, top_k=2, n_shared=1))
    return ModelConfig(encoders=encoders, bridge=bridge, class_names=COMPOSITE_CLASSES, modality_dropout=0.25)


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
