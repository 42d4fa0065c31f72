"""Quality checks that fail when the model degrades: a small fused model trained on real composite units must
clear bars that a constant score and the same training on shuffled labels do not."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from inspection.benches import default_model_config
from inspection.data.composite import CompositeBuilder, CompositeConfig
from inspection.records import MODALITIES
from inspection.training import PreparedSet, TrainConfig, predict, train_supervised

pytestmark = [pytest.mark.data, pytest.mark.slow]

#: AUROC of the vibration culprit score on test units from held-out recordings. Bearing faults are plain in the
#: envelope spectrum: the small model reaches 1.0; shuffled labels leave about 0.7 (a score that follows the
#: window's loudness), a constant 0.5.
VIBRATION_AUROC_BAR = 0.9
#: The defect score's AUROC over all culprits (the 32-px images carry little): above a constant's 0.5.
DEFECT_AUROC_BAR = 0.6
#: The class head must beat the majority class's share (a constant answer) by this much.
CLASS_MARGIN = 0.05
SMALL = ["bridge.n_layers=1", "bridge.n_queries=4", "bridge.n_heads=4", "bridge.moe.n_experts=4",
         "bridge.moe.hidden=32"]


@pytest.fixture(scope="module")
def composite_units():
    builder = CompositeBuilder(CompositeConfig(seed=3))
    return builder.units("train", 320), builder.units("val", 120), builder.units("test", 240)


def _quality(model, test) -> dict[str, float]:
    pred = predict(model, PreparedSet(model, test, model.config.class_names), torch.device("cpu"))
    klass = np.array([model.config.class_names.index(u.label.defect_class) for u in test])
    return {
        "defect_auroc": float(roc_auc_score([u.label.defect for u in test], pred["score"])),
        "vibration_auroc": float(roc_auc_score(["vibration" in u.label.culprits for u in test],
                                               pred["modality_score"][:, MODALITIES.index("vibration")])),
        "class_accuracy": float((pred["class_prob"].argmax(1) == klass).mean()),
    }


def _passes(q: dict[str, float], majority: float) -> bool:
    return (q["vibration_auroc"] > VIBRATION_AUROC_BAR and q["defect_auroc"] > DEFECT_AUROC_BAR
            and q["class_accuracy"] > majority + CLASS_MARGIN)


def test_fused_model_clears_bars_that_shuffled_labels_do_not(tmp_path, composite_units):
    train, val, test = composite_units
    cfg = default_model_config("composite", dim=32, image_size=32, overrides=SMALL)
    run = TrainConfig(epochs=4, batch_size=32, device="cpu", seed=0)
    majority = max(Counter(u.label.defect_class for u in test).values()) / len(test)
    trained = _quality(train_supervised(cfg, train, val, run, tmp_path / "real", progress=False).model, test)
    # the same training, with every training and validation label moved to another unit at random
    rng = np.random.default_rng(0)

    def shuffled(units):
        labels = [units[i].label for i in rng.permutation(len(units))]
        return [dataclasses.replace(u, label=lab) for u, lab in zip(units, labels, strict=True)]

    noise = _quality(train_supervised(cfg, shuffled(train), shuffled(val), run, tmp_path / "shuffled",
                                      progress=False).model, test)
    print(f"trained {trained}, shuffled labels {noise}, majority class {majority:.3f}")
    assert _passes(trained, majority), (trained, majority)
    assert not _passes(noise, majority), (noise, majority)
    assert noise["vibration_auroc"] <= VIBRATION_AUROC_BAR
