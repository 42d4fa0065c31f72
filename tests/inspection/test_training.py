"""Training, calibration, evaluation and the normal-only detector, on real samples and closed forms."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from inspection.anomaly import PCADetector, PCADetectorConfig
from inspection.benches import bearings_bench, default_model_config
from inspection.calibration import calibrate, choose_threshold
from inspection.errors import ConfigError, NotCalibratedError
from inspection.evaluation import evaluate_units
from inspection.records import MODALITIES
from inspection.training import (
    PreparedSet,
    Targets,
    TrainConfig,
    WeightAverage,
    drop_modalities,
    predict,
    targets_for,
    train_supervised,
    visible_targets,
)

#: a tiny model on ~100 real windows still separates healthy from faulty bearings far better than chance
MIN_TEST_AUROC = 0.75
#: resuming replays the same batches and optimizer state: only float reassociation may differ
RESUME_ATOL = 1e-5


def tiny_config(**kw):
    cfg = default_model_config("bearings", dim=32)
    return cfg.__class__.from_dict({**cfg.to_dict(), "bridge": {**cfg.to_dict()["bridge"], "n_layers": 1,
                                                                 "n_queries": 4, "n_heads": 4, "dropout": 0.0,
                                                                 "moe": {**cfg.to_dict()["bridge"]["moe"],
                                                                         "n_experts": 4, "hidden": 32}},
                                    "head_dropout": 0.0, **kw})


@pytest.fixture(scope="module")
def bearing_data():
    data = bearings_bench(0, train_hop_s=0.25, test_hop_s=0.25)
    rng = np.random.default_rng(0)
    pick = lambda units, n: [units[i] for i in sorted(rng.choice(len(units), min(n, len(units)), replace=False))]  # noqa: E731
    return pick(data.train, 96), pick(data.val, 48), pick(data.test, 96)


@pytest.mark.data
@pytest.mark.slow
def test_tiny_end_to_end_beats_chance(tmp_path, bearing_data):
    train, val, test = bearing_data
    cfg = TrainConfig(epochs=4, batch_size=16, device="cpu", seed=0)
    result = train_supervised(tiny_config(), train, val, cfg, tmp_path, progress=False)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "history.json").read_text())[-1]["selected_epoch"] in range(1, 5)
    model = result.model
    prepared = PreparedSet(model, val, model.config.class_names)
    scores = predict(model, prepared, torch.device("cpu"))["score"]
    model, cal = calibrate(model, scores, prepared.targets.defect.numpy() > 0.5, [u.line_id for u in val])
    assert model.calibrated and cal.version.startswith("t-")
    metrics, _ = evaluate_units(model, test, "cpu")
    assert metrics["auroc"] > MIN_TEST_AUROC, metrics
    # a constant answer scores the majority class's share: the class head must beat that, not a third
    majority = max(Counter(u.label.defect_class for u in test).values()) / len(test)
    print(f"class accuracy {metrics['class_accuracy']:.3f}, majority class {majority:.3f}")
    assert metrics["class_accuracy"] > majority + 0.05, (metrics, majority)


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_exactly(tmp_path, bearing_data, ema_decay):
    train, val, _ = bearing_data
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", ema_decay=ema_decay)
    full = train_supervised(tiny_config(), train[:48], None, cfg, tmp_path / "full", progress=False)
    train_supervised(tiny_config(), train[:48], None, cfg, tmp_path / "part", progress=False,
                     stop_after_epoch=2)  # as if interrupted after epoch 2
    resumed = train_supervised(tiny_config(), train[:48], None, cfg, tmp_path / "part", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=RESUME_ATOL, equal_nan=True, msg=name)


#: the line a non-terminal stream gets per epoch (validation fields when there is validation data)
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train_loss (\d+\.\d{3})  val_loss (\d+\.\d{3})  val_auroc (\d\.\d{3})  "
                        r"(\d+(?:\.\d)?) units/s  eta (\S+)")


@pytest.mark.data
@pytest.mark.slow
def test_training_off_a_terminal_writes_one_line_per_epoch(tmp_path, bearing_data, capsys):
    from inspection.progress import Progress

    train, val, _ = bearing_data
    assert {u.label.defect for u in val} == {False, True}  # both classes: the AUROC field is measured
    log = io.StringIO()
    cfg = TrainConfig(epochs=2, batch_size=16, device="cpu", seed=0)
    result = train_supervised(tiny_config(), train[:48], val, cfg, tmp_path, progress=Progress(stream=log))
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == f"preprocess {48 + len(val)}/{48 + len(val)} units in " + lines[0].split(" in ")[1]
    epochs = [EPOCH_LINE.fullmatch(x) for x in lines if x.startswith("epoch ")]
    assert len(epochs) == 2 == len(lines) - 1 and all(epochs), lines
    rows = [h for h in result.history if "epoch" in h]  # the last entry is the epoch selection
    for k, (m, row) in enumerate(zip(epochs, rows, strict=True), start=1):
        assert (int(m[1]), int(m[2])) == (k, 2)
        assert float(m[3]) == pytest.approx(row["train_loss"], abs=5e-4)
        assert float(m[4]) == pytest.approx(row["val_loss"], abs=5e-4)
        assert float(m[5]) == pytest.approx(row["val_auroc"], abs=5e-4)
        assert float(m[6]) > 0
    assert epochs[-1][7] == "0s"  # nothing left after the last epoch
    assert capsys.readouterr() == ("", "")  # stdout stays free for a command's JSON; nothing else on stderr


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    run = tmp_path / "bearings-s0"
    cfg = TrainConfig(epochs=1, device="cpu")
    with pytest.raises(ConfigError, match=re.escape(str(run))) as info:
        train_supervised(tiny_config(), [], None, cfg, run, resume=True, progress=False)
    assert "checkpoint.json" in str(info.value) and "without resume" in str(info.value)
    assert not run.exists()  # refused before any work or output


def test_weight_average_follows_its_closed_form():
    net = torch.nn.BatchNorm1d(2)  # a parameter, a float buffer and an integer buffer
    average = WeightAverage(net, decay=0.5)
    start = net.weight.detach().clone()
    values = [torch.tensor([2.0, 4.0]), torch.tensor([6.0, 8.0])]
    expected = start.clone()
    for n, v in enumerate(values):
        with torch.no_grad():
            net.weight.copy_(v)
            net.num_batches_tracked += 1
        average.update(net)
        d = min(0.5, (1 + n) / (10 + n))  # warm-up: 0.1, then 0.1818...
        expected = d * expected + (1 - d) * v
    state = average.averaged_state(net)
    torch.testing.assert_close(state["weight"], expected)
    assert int(state["num_batches_tracked"]) == 2  # integer buffers are taken as they are
    assert net.weight.tolist() == [6.0, 8.0]  # the live weights are untouched
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)


def test_modality_dropout_keeps_one_and_targets_follow_visibility():
    gen = torch.Generator().manual_seed(0)
    present = torch.ones(500, 3, dtype=torch.bool)
    present[:100, 0] = False
    kept = drop_modalities(present, 0.9, gen)
    assert kept.any(dim=1).all() and not (kept & ~present).any()
    classes = ("ok", "vision", "vibration", "temperature", "multiple")
    t = Targets(defect=torch.tensor([1.0, 1.0, 1.0, 0.0]), klass=torch.tensor([4, 1, 4, 0]),
                culprit=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    visible = torch.tensor([[False, True, True], [False, True, True], [True, True, False], [True, True, True]])
    v = visible_targets(t, visible, classes)
    assert v.defect.tolist() == [1.0, 0.0, 1.0, 0.0]  # unit 1's only culprit (vision) is hidden -> ok
    assert v.klass.tolist() == [2, 0, 4, 0]  # 'multiple' with only vibration left -> 'vibration'
    assert v.culprit[0].tolist() == [0.0, 1.0, 0.0]


def test_graded_targets_keep_their_severity_and_class():
    """ELPV-style labels: a p = 1/3 cell is not a defect (no culprit) but keeps its own class and, with soft targets,
    its graded defect target; hiding nothing changes neither."""
    from datetime import UTC, datetime

    import cv2

    from inspection.records import Label, Unit, VisionReading

    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    classes = ("ok", "p1_3", "p2_3", "p1")
    grades = [(0.0, "ok"), (1 / 3, "p1_3"), (2 / 3, "p2_3"), (1.0, "p1")]
    units = []
    for i, (p, klass) in enumerate(grades):
        reading = VisionReading(data=png, content_type="image/png", unit_id=f"u{i}", line_id="l",
                                reading_id=f"u{i}-v", source="cam", event_time=datetime(2026, 1, 1, tzinfo=UTC))
        label = Label(defect=p >= 0.5, defect_class=klass, culprits=frozenset({"vision"}) if p >= 0.5 else frozenset(),
                      severity=p)
        units.append(Unit(f"u{i}", "l", vision=reading, label=label))
    hard, soft = targets_for(units, classes), targets_for(units, classes, soft=True)
    assert hard.defect.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert soft.defect.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    everything = torch.ones(4, len(MODALITIES), dtype=torch.bool)
    for t in (hard, soft):
        v = visible_targets(t, everything, classes)
        assert v.klass.tolist() == [0, 1, 2, 3]
        assert v.defect.tolist() == t.defect.tolist()
    hidden = visible_targets(soft, torch.zeros(4, len(MODALITIES), dtype=torch.bool), classes)
    assert hidden.defect.tolist() == pytest.approx([0.0, 1 / 3, 0.0, 0.0])  # defects out of sight count as ok
    assert hidden.klass.tolist() == [0, 1, 0, 0]


def test_threshold_choice_closed_forms():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1], bool)
    # F1 at t=0.3: tp 3, fp 1, fn 0 -> 6/7 (best); at 0.7: tp 2, fp 0, fn 1 -> 0.8; at 0.6: tp 2 fp 1 fn 1 -> 2/3.
    # Any t in (0.2, 0.3] decides the same: the threshold is the middle of that gap
    assert choose_threshold(scores, labels, "max_f1") == pytest.approx(0.25)
    # accuracy: 0.3 and 0.7 both give 5/6 (the best); ties go to the lowest, then the middle of its gap
    assert choose_threshold(scores, labels, "max_accuracy") == pytest.approx(0.25)
    assert choose_threshold(scores, ~labels | (scores > 0.8), "max_accuracy") == 0.1  # 4/6 at the lowest score
    separable = choose_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool), "max_f1")
    assert separable == pytest.approx(0.5)  # perfectly separated: halfway between the classes
    good = np.linspace(0, 1, 101)
    th = choose_threshold(good, np.zeros(101, bool), "far", target_far=0.05)
    assert (good >= th).sum() == 5  # at most 5 % of the good units alarm
    with pytest.raises(ConfigError):
        choose_threshold(scores, labels, "max_precision")
    with pytest.raises(ConfigError, match="good"):
        choose_threshold(scores, np.ones(6, bool), "far")
    with pytest.raises(ConfigError):
        choose_threshold(np.array([]), np.array([], bool))


def test_per_line_thresholds_with_default_fallback():
    model = __import__("inspection.model", fromlist=["InspectionModel"]).InspectionModel(tiny_config())
    rng = np.random.default_rng(0)
    n = 80
    labels = rng.random(n) < 0.5
    scores = np.where(labels, rng.uniform(0.4, 1, n), rng.uniform(0, 0.6, n))
    lines = ["line-a"] * 60 + ["line-b"] * 20  # line-b has too few units for its own threshold
    model, cal = calibrate(model, scores, labels, lines)
    assert set(cal.thresholds) == {"*", "line-a"}
    assert model.config.lines == ("*", "line-a")
    slots = torch.tensor([model.line_slot("line-a"), model.line_slot("line-b"), model.line_slot("never-seen")])
    th = model.threshold_for(slots)
    assert th[1] == th[2] == cal.thresholds["*"] and th[0] == pytest.approx(cal.thresholds["line-a"])


def test_pca_detector_on_closed_form_data():
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((4, 4))
    normal = rng.standard_normal((400, 4)) @ mix
    det = PCADetector(PCADetectorConfig(window=5, persistence=3)).fit(normal)
    later = rng.standard_normal((300, 4)) @ mix
    assert det.predict(later).mean() < 0.02  # normal rows stay quiet
    shifted = later.copy()
    shifted[150:] += 4 * mix[0]  # a sustained shift of one latent factor (4 sd)
    alarms = det.predict(shifted)
    assert alarms[160:].mean() > 0.95 and alarms[:140].mean() < 0.02
    broken = later.copy()
    broken[150:, 2] = normal[:, 2].mean()  # a sensor freezes: leaves the normal subspace (Q statistic)
    assert det.score(broken)[160:].mean() > det.score(later)[160:].mean()
    with pytest.raises(NotCalibratedError):
        PCADetector().predict(later)


@pytest.mark.data
def test_skab_protocol_writes_its_result(tmp_path):
    from inspection.data import skab
    from inspection.errors import DataError
    from inspection.skab_protocol import evaluate_skab

    try:
        skab.skab_root()
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")
    path = evaluate_skab(results_dir=tmp_path)
    summary = json.loads(path.read_text())["summary"]
    for key in ("benchmark", "metric", "value", "baselines", "split", "seed", "model_version", "machine", "commit",
                "command", "date", "far", "mar"):
        assert key in summary, key
    assert summary["baselines"]["T-squared, this harness"] == pytest.approx(0.66, abs=0.005)
    assert 0 < summary["value"] <= 1 and 0 <= summary["far"] <= 100
    # the method must beat the plain T-squared baseline of the same harness, not merely produce a number
    assert summary["value"] > summary["baselines"]["T-squared, this harness"] + 0.05
    assert len(MODALITIES) == 3


def test_fixed_threshold_calibration_and_its_errors(tmp_path):
    from inspection.calibration import fixed_calibration
    from inspection.experiments import calibrate_version
    from inspection.model import InspectionModel
    from inspection.progress import Progress
    from inspection.store import ModelStore

    model, _ = calibrate(InspectionModel(tiny_config()), np.r_[np.linspace(0, 0.4, 40), np.linspace(0.6, 1, 40)],
                         np.r_[np.zeros(40, bool), np.ones(40, bool)], ["line-a"] * 80)
    assert model.config.lines == ("*", "line-a")
    fixed, cal = fixed_calibration(model, 0.5)
    assert fixed.config.lines == ("*",) and cal.method == "fixed" and cal.thresholds == {"*": 0.5}
    slots = torch.tensor([fixed.line_slot("line-a"), fixed.line_slot("never-seen")])
    assert fixed.threshold_for(slots).tolist() == [0.5, 0.5]
    assert fixed_calibration(model, 0.5)[1].version == cal.version != fixed_calibration(model, 0.4)[1].version
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="fixed threshold"):
            fixed_calibration(model, bad)

    # through the store: a fixed threshold needs no validation data; asking for one without it is an error
    store = ModelStore(tmp_path / "bearings")
    card = {"name": "bearings", "bench": "bearings", "seed": 0, "modalities": ["vibration"],
            "model_config": tiny_config().to_dict(), "data": {"val_fraction": None}, "threshold_version": None}
    base = store.save(InspectionModel(tiny_config()).state_dict(), card, promote=True)
    with pytest.raises(ConfigError, match="needs a threshold"):
        calibrate_version(tmp_path, "bearings", base.version, method="fixed")
    with pytest.raises(ConfigError, match="only with method 'fixed'"):
        calibrate_version(tmp_path, "bearings", base.version, method="max_f1", threshold=0.5)
    log = io.StringIO()
    v = calibrate_version(tmp_path, "bearings", base.version, method="fixed", threshold=0.3,
                          progress=Progress(stream=log))
    assert v.card["calibration"]["thresholds"] == {"*": 0.3} and v.card["parent"] == base.version
    assert log.getvalue() == f"calibrated bearings {base.version} -> {v.version}: fixed threshold 0.3\n"
    assert store.promoted().version == v.version


@pytest.mark.data
def test_elpv_without_validation_trains_on_the_whole_training_split(tmp_path):
    from inspection.benches import elpv_bench
    from inspection.experiments import _data_card, calibrate_version
    from inspection.model import InspectionModel
    from inspection.store import ModelStore

    held_out, whole = elpv_bench(0), elpv_bench(0, val_fraction=0)
    assert whole.val == [] and {u.unit_id for u in whole.test} == {u.unit_id for u in held_out.test}
    assert sorted(u.unit_id for u in whole.train) == sorted(u.unit_id for u in held_out.train + held_out.val)
    with pytest.raises(ConfigError, match="val_fraction"):
        elpv_bench(0, val_fraction=1.0)
    # a model trained that way has nothing to calibrate on: only a fixed threshold is possible
    card = {"name": "elpv", "bench": "elpv", "seed": 0, "modalities": ["vibration"], "threshold_version": None,
            "model_config": tiny_config().to_dict(), "data": _data_card(whole, 0.0)}
    base = ModelStore(tmp_path / "elpv").save(InspectionModel(tiny_config()).state_dict(), card, promote=True)
    with pytest.raises(ConfigError, match="without validation units"):
        calibrate_version(tmp_path, "elpv", base.version, method="max_accuracy")


def _blob_batch(size: int = 64, radius: float = 10.0, n: int = 16):
    from inspection.model import Batch

    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disk = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= radius ** 2).float()
    img = disk.expand(n, 3, size, size).clone()  # a centred disk: flips and 90° turns leave it unchanged
    return Batch({"vision": {"image": img}}, torch.ones(n, len(MODALITIES), dtype=torch.bool),
                 torch.zeros(n, dtype=torch.long)), disk


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_affine_jitter_stays_within_its_documented_ranges(strength):
    from inspection.training import augment_images

    batch, disk = _blob_batch()
    gen = torch.Generator().manual_seed(0)
    out = augment_images(batch, gen, photometric=0.0, affine=strength).inputs["vision"]["image"][:, 0]
    size = disk.shape[-1]
    coords = torch.arange(size) + 0.5
    mass = out.sum(dim=(-1, -2))
    cy = (out.sum(-1) * coords).sum(-1) / mass
    cx = (out.sum(-2) * coords).sum(-1) / mass
    # rotation and scale act about the centre, so only the shift (<= 5a % of the side per axis) moves the disk
    assert ((cy - size / 2).abs() <= 0.05 * strength * size + 0.5).all(), cy
    assert ((cx - size / 2).abs() <= 0.05 * strength * size + 0.5).all(), cx
    # area scales by the square of a scale within 1 +- 0.1a (bilinear edges: half a pixel of slack on the radius)
    r = (mass / torch.pi).sqrt()
    assert (r >= 10.0 * (1 - 0.1 * strength) - 0.5).all() and (r <= 10.0 * (1 + 0.1 * strength) + 0.5).all(), r
    assert not torch.allclose(out, disk.expand_as(out))  # it did warp


def test_image_jitter_off_is_a_pure_flip_or_rotation():
    from inspection.training import augment_images

    batch, _ = _blob_batch(n=8)
    img = torch.rand(8, 3, 32, 32)
    batch.inputs["vision"]["image"] = img
    out = augment_images(batch, torch.Generator().manual_seed(1), photometric=0.0, affine=0.0)
    out = out.inputs["vision"]["image"]
    views = lambda x: [torch.rot90(v, r, (-2, -1)) for v in (x, x.flip(-1)) for r in range(4)]  # noqa: E731
    for i in range(8):
        assert any(torch.allclose(out[i], v, atol=1e-6) for v in views(img[i]))
    # a flat image stays flat under any warp: borders are reflected, never padded with zeros
    batch.inputs["vision"]["image"] = torch.full((8, 3, 32, 32), 0.7)
    flat = augment_images(batch, torch.Generator().manual_seed(2), photometric=0.0, affine=2.0)
    torch.testing.assert_close(flat.inputs["vision"]["image"], torch.full((8, 3, 32, 32), 0.7))
    for bad in ({"affine_jitter": 2.5}, {"affine_jitter": -0.1}, {"photometric_jitter": -1.0}):
        with pytest.raises(ConfigError, match="jitter"):
            TrainConfig(**bad)


@pytest.mark.parametrize("order", [(1, 2, 0), (3, 1, 4, 0, 2)], ids=["3-seeds", "5-seeds"])
def test_calibrating_several_seeds_keeps_every_one(tmp_path, capsys, order):
    """Seeds trained side by side land in the store in any order; calibrating them all must not let the
    store's pruning (newest 3 kept by default) delete a version that is still waiting for its threshold, however
    many seeds there are."""
    from inspection.model import InspectionModel
    from inspection.store import ModelStore
    from services.cli import main

    store = ModelStore(tmp_path / "bearings", keep=len(order))  # as `train --seeds` leaves it
    for seed in order:
        card = {"name": "bearings", "bench": "bearings", "seed": seed, "modalities": ["vibration"],
                "model_config": tiny_config().to_dict(), "data": {"val_fraction": None}, "threshold_version": None}
        store.save(InspectionModel(tiny_config()).state_dict(), card, promote=True)
    seeds = [str(s) for s in sorted(order)]
    assert main(["calibrate", "--bench", "bearings", "--seeds", *seeds, "--method", "fixed",
                 "--threshold", "0.5", "--models-dir", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == len(order)
    calibrated = [v for v in store.versions() if v.card.get("threshold_version")]
    assert sorted(v.card["seed"] for v in calibrated) == sorted(order)


@pytest.mark.parametrize("encoder_grad", ["all", "own_head"])
def test_own_head_encoder_gradients_come_from_the_modality_heads_alone(small_model_factory, unit_factory,
                                                                       encoder_grad):
    import dataclasses

    from inspection.records import Label
    from inspection.training import supervised_step

    model = small_model_factory(modality_evidence=True, class_names=("ok", "defect"))
    rng = np.random.default_rng(3)
    units = []
    for i in range(8):
        culprits = {0: (), 1: ("vision",), 2: ("temperature",), 3: ("vibration", "vision")}[i % 4]
        label = Label(bool(culprits), "defect" if culprits else "ok", frozenset(culprits))
        units.append(dataclasses.replace(unit_factory(i, rng), label=label))
    model.fit_normalisation(model.batch(units))
    prepared = PreparedSet(model, units, model.config.class_names)
    model.train()

    def grads(modality_weight: float) -> dict[str, float]:
        cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", modality_weight=modality_weight,
                          encoder_grad=encoder_grad, augment=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that changes nothing: gradients only
        supervised_step(model, prepared, torch.arange(8), torch.Generator().manual_seed(0), opt, cfg,
                        torch.device("cpu"), list(model.parameters()))
        part = lambda prefix: sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()  # noqa: E731
                                  if n.startswith(prefix) and p.grad is not None)
        return {k: part(k) for k in ("encoders.", "bridge.", "defect_head.", "modality_heads.")}

    without_culprit_loss, with_it = grads(0.0), grads(1.0)
    assert with_it["encoders."] > 0 and with_it["modality_heads."] > 0
    assert without_culprit_loss["bridge."] > 0 and without_culprit_loss["defect_head."] > 0
    if encoder_grad == "own_head":  # the fused losses reach no encoder
        assert without_culprit_loss["encoders."] == 0
    else:
        assert without_culprit_loss["encoders."] > 0


def test_encoder_grad_names_are_checked():
    with pytest.raises(ConfigError, match="encoder_grad"):
        TrainConfig(encoder_grad="some")
