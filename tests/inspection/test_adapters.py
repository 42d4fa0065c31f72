"""Per-line LoRA adapters: round trip through a real store, tamper and wrong-base refusal, versions per line,
and mixed-line micro-batches scored in one forward that equal one-line-at-a-time scoring.

Everything is real: the small fusion model of tests/conftest.py, adapters trained with peft on labelled units,
saved to and loaded from a real model store, scored by the service's own ``score_units``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection.adapters import (
    ADAPTER_KIND,
    AdapterConfig,
    LineAdapters,
    adapted_version,
    adapter_store,
    list_adapters,
    load_adapter,
    promoted_adapters,
    save_adapter,
    split_model_version,
    target_modules,
    train_adapter,
)
from inspection.calibration import choose_threshold
from inspection.errors import ConfigError, StoreError
from inspection.records import MODALITIES, InputCoordinate, Label, Unit
from inspection.store import ADAPTERS_DIR, ModelStore, state_dict_sha256
from inspection.training import TrainConfig
from services.join import JoinedUnit
from services.scoring import load_serving_model, score_units

#: Largest score difference between a unit scored in a mixed-line batch and the same unit scored alone. The two
#: runs multiply the same numbers in float32 GEMMs of different row counts, which sum in another order: the
#: logits differ by a few 1e-6 (measured <= 3e-6), the probabilities by less. Scoring a row with another line's
#: adapter moves its score by 1e-2 and more (asserted below), so this cannot pass by accident.
MIXED_TOLERANCE = 1e-5
#: Largest difference between a score the service computes and the same unit through ``model(model.batch(...))``:
#: the stream prepares vibration in batched float32 torch ops, training in float64 numpy (see test_scoring.py).
PREP_TOLERANCE = 1e-4
#: The least score change the trained test adapters must make on some unit of their line (they are trained with
#: a large learning rate so that a wrong adapter choice is visible).
ADAPTER_EFFECT = 1e-2


def labelled(unit: Unit, line: str, defect: bool) -> Unit:
    """The unit on ``line`` (its readings too) with a label; a defect brightens the image's top-left corner."""
    parts = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    if defect and "vision" in parts:
        img = np.array(unit.vision.image, copy=True)
        img[:30, :30] = 255
        from inspection.records import VisionReading

        v = unit.vision
        parts["vision"] = VisionReading.from_array(img, unit_id=v.unit_id, line_id=line, reading_id=v.reading_id,
                                                   source=v.source, event_time=v.event_time)
    label = Label(defect=defect, defect_class="defect" if defect else "ok",
                  culprits=frozenset({"vision"}) if defect else frozenset())
    return dataclasses.replace(unit, line_id=line, label=label, **parts)


def relined(unit: Unit, line: str) -> Unit:
    parts = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    return dataclasses.replace(unit, line_id=line, **parts)


def joined(units: list[Unit]) -> list[JoinedUnit]:
    return [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(units)]


@pytest.fixture(scope="module")
def line_units(unit_factory):
    """48 labelled units (a third defective) per line name, built fresh for each line."""
    def build(line: str, offset: int) -> list[Unit]:
        rng = np.random.default_rng(offset)
        return [labelled(unit_factory(offset + i, rng), line, i % 3 == 0) for i in range(48)]

    return build


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, small_model_factory, line_units):
    """A store with one promoted, calibrated small base model, and the adapters of lines ``line-a`` (rank 4:
    bridge, heads, vision) and ``line-b`` (rank 2 with the backbone) trained and saved beside it."""
    root = tmp_path_factory.mktemp("adapters") / "store"
    model = small_model_factory()
    model.fit_normalisation(model.batch(line_units("line-0", 1000)))
    model.eval()
    with torch.no_grad():
        model.thresholds.fill_(0.5)
    store = ModelStore(root, create=True)
    base = store.save(model.state_dict(), {"model_config": model.config.to_dict(), "threshold_version": "t-base"},
                      promote=True)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-2, device="cpu", amp=False, seed=0)
    results = {}
    for line, config, offset in (("line-a", AdapterConfig(rank=4), 0),
                                 ("line-b", AdapterConfig(rank=2, targets=("bridge", "heads", "backbone")), 100)):
        units = line_units(line, offset)
        results[line] = train_adapter(model, units[:36], units[36:], line, config,
                                      dataclasses.replace(cfg, seed=offset))
        save_adapter(store, base.version, line, results[line])
    return {"root": root, "base": base, "model": model, "results": results}


def copy_store(base_store, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(base_store["root"], dst)
    return dst


# ------------------------------------------------------------------------------------------------ config
def test_adapter_config_is_validated():
    with pytest.raises(ConfigError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="targets"):
        AdapterConfig(targets=("bridge", "experts"))
    with pytest.raises(ConfigError, match="targets"):
        AdapterConfig(targets=())
    assert AdapterConfig(rank=4).lora_alpha == 8.0
    assert AdapterConfig.from_dict(AdapterConfig(rank=3, targets=("heads",)).to_dict()) == \
        AdapterConfig(rank=3, targets=("heads",))


def test_targets_name_the_layers_of_each_group_and_refuse_a_group_the_model_lacks(small_model_factory):
    from fusion.bridge import BridgeConfig
    from inspection.model import EncoderSpec, InspectionModel, ModelConfig

    model = small_model_factory()
    names = dict(model.named_modules())
    bridge = target_modules(model, AdapterConfig(targets=("bridge",)))
    # one layer: q, kv and out of the cross- and the self-attention; the MoE's experts are not adapted
    assert bridge == [f"bridge.layers.0.{a}.{p}" for a in ("cross", "self_attn") for p in ("q", "kv", "out")]
    heads = target_modules(model, AdapterConfig(targets=("heads",)))
    assert heads == ["defect_head", "class_head", *(f"modality_heads.{m}.1" for m in MODALITIES)]
    backbone = target_modules(model, AdapterConfig(targets=("backbone",), backbone_stages=1))
    assert backbone[0] == "encoders.vision.backbone.conv_head"
    for name in backbone:
        conv = names[name]
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
    assert all(n.startswith("encoders.vision.backbone.blocks.") for n in backbone[1:]) and len(backbone) > 1
    series_only = InspectionModel(ModelConfig(
        encoders={"temperature": EncoderSpec("series", {"patch": 5, "preprocess": {"samples": 20}})},
        bridge=BridgeConfig(dim=32, n_queries=4, n_heads=4, n_layers=1, dropout=0.0)))
    # a dense bridge: its feed-forward is adapted too
    assert "bridge.layers.0.ffn.gate" in target_modules(series_only, AdapterConfig(targets=("bridge",)))
    with pytest.raises(ConfigError, match="vision"):
        target_modules(series_only, AdapterConfig(targets=("bridge", "vision")))


# -------------------------------------------------------------------------------------------- round trip
def test_adapter_round_trip_through_the_store_scores_as_trained(base_store, line_units):
    root, base, results = base_store["root"], base_store["base"], base_store["results"]
    family = ModelStore(root)
    entries = list_adapters(family)
    assert [(e.base_version, e.line, e.version.promoted) for e in entries] == \
        [(base.version, "line-a", True), (base.version, "line-b", True)]
    res = results["line-a"]
    state, card = load_adapter(family, base, "line-a")
    # the tensors come back bit for bit; the card says what the adapter is and what it was trained on
    assert sorted(state) == sorted(res.state)
    for key, tensor in res.state.items():
        assert torch.equal(state[key], tensor), key
    assert card["kind"] == ADAPTER_KIND and card["line"] == "line-a"
    assert card["base_version"] == base.version and card["base_sha256"] == base.sha256
    assert card["adapter"]["rank"] == 4 and card["target_modules"] == res.modules
    # the threshold is stored as float32, as the base model's thresholds buffer is
    assert card["threshold"] == float(np.float32(res.calibration.threshold)) and card["threshold_version"]
    assert card["trainable_parameters"] == sum(t.numel() for t in state.values())
    assert 0 < card["trainable_share"] < 0.05
    assert card["weights_sha256"] == state_dict_sha256(entries[0].version.path / "weights.safetensors")

    serving = load_serving_model(family, None, torch.device("cpu"))
    assert sorted(serving.adapters.lines) == ["line-a", "line-b"]
    units = line_units("line-a", 500)[:12]
    served = score_units(serving, joined(units))
    with torch.no_grad():
        trained = res.model(res.model.batch(units)).score.double().tolist()
        base_scores = base_store["model"](base_store["model"].batch(units)).score.double().tolist()
    for scored, want in zip(served.scored, trained, strict=True):
        d = scored.decision
        assert d.score == pytest.approx(want, abs=PREP_TOLERANCE)
        assert d.threshold == pytest.approx(res.calibration.threshold, abs=1e-7)
        assert d.model_version == f"{base.version}+line-a:{card['version']}"
        assert d.threshold_version == res.calibration.version
    assert max(abs(a - b) for a, b in zip(trained, base_scores, strict=True)) > ADAPTER_EFFECT


def test_line_threshold_is_chosen_on_its_validation_units_with_the_adapter_in_place(base_store, line_units):
    res = base_store["results"]["line-b"]
    val = line_units("line-b", 100)[36:]
    with torch.no_grad():
        scores = res.model(res.model.batch(val)).score.double().numpy()
    labels = np.array([u.label.defect for u in val])
    assert res.calibration.threshold == pytest.approx(choose_threshold(scores, labels, "max_f1"), abs=1e-6)
    assert res.calibration.n_units == len(val)


def test_a_tampered_adapter_is_refused(base_store, tmp_path):
    root = copy_store(base_store, tmp_path)
    base = base_store["base"]
    weights = next((root / ADAPTERS_DIR / base.version / "line-a").glob("m*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one LoRA weight
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="tampered"):
        load_serving_model(ModelStore(root), None, torch.device("cpu"))
    with pytest.raises(StoreError, match="tampered"):
        load_adapter(ModelStore(root), base, "line-a")


def test_an_adapter_of_another_base_is_refused(base_store, tmp_path):
    root = copy_store(base_store, tmp_path)
    family = ModelStore(root)
    model = base_store["model"]
    with torch.no_grad():
        model_b = type(model).from_state(model.config, model.state_dict())
        model_b.defect_head.bias.add_(0.5)
    other = family.save(model_b.state_dict(), {"model_config": model.config.to_dict(), "threshold_version": "t-b"},
                        promote=True)
    # the adapter of line-a, trained on the first base, placed beside the second one
    src = root / ADAPTERS_DIR / base_store["base"].version / "line-a"
    shutil.copytree(src, root / ADAPTERS_DIR / other.version / "line-a")
    with pytest.raises(StoreError, match=f"trained on base {base_store['base'].version}.*refusing"):
        load_serving_model(family, None, torch.device("cpu"))
    # the first base still serves its own adapters
    first = load_serving_model(family, base_store["base"].version, torch.device("cpu"))
    assert sorted(first.adapters.lines) == ["line-a", "line-b"]


def test_adapter_targets_that_the_base_lacks_are_refused(base_store):
    res = base_store["results"]["line-a"]
    card = {"version": "m0001-00000000", "adapter": res.config.to_dict(), "threshold": 0.5,
            "threshold_version": "t-x", "target_modules": [*res.modules, "bridge.layers.7.cross.q"]}
    with pytest.raises(StoreError, match="line-a"):
        LineAdapters(base_store["model"], {"line-a": (res.state, card)})


# ----------------------------------------------------------------------------------------- mixed batches
def test_mixed_line_batch_is_one_forward_and_equals_one_line_at_a_time(base_store, line_units):
    serving = load_serving_model(ModelStore(base_store["root"]), None, torch.device("cpu"))
    a, b = line_units("line-a", 600), line_units("line-b", 700)
    units = [a[0], b[0], relined(a[1], "line-c"), a[2], b[1], relined(b[2], "line-2"), a[3].without("vision"),
             b[3].without("vibration", "temperature"), a[4].without("temperature"), b[4]]
    calls = []
    handle = serving.adapters.model.encoders["vision"].register_forward_hook(lambda *_: calls.append(1))
    try:
        mixed = score_units(serving, joined(units))
    finally:
        handle.remove()
    assert len(calls) == 1  # the whole mixed micro-batch went through one forward pass
    assert mixed.forward_units == len(units)
    no_adapters = score_units(dataclasses.replace(serving, adapters=None), joined(units))
    moved = 0.0
    for i, (unit, scored) in enumerate(zip(units, mixed.scored, strict=True)):
        d = scored.decision
        alone = score_units(serving, joined([unit])).scored[0].decision
        assert d.score == pytest.approx(alone.score, abs=MIXED_TOLERANCE), (i, unit.line_id)
        assert d.threshold == alone.threshold and d.model_version == alone.model_version
        assert d.present == unit.present
        plain = no_adapters.scored[i].decision
        if unit.line_id in serving.adapters.lines:
            adapter = serving.adapters.lines[unit.line_id]
            assert d.model_version == f"{serving.version}+{unit.line_id}:{adapter.version}"
            assert d.threshold == pytest.approx(adapter.threshold, abs=1e-7)
            assert d.id != plain.id
            moved = max(moved, abs(d.score - plain.score))
        else:  # a line without adapter: exactly what the service computes without adapters
            assert d.score == plain.score and d.threshold == plain.threshold
            assert d.model_version == serving.version and d.id == plain.id
            assert d.attributions["modality"] == plain.attributions["modality"]
    assert moved > ADAPTER_EFFECT


def test_a_row_scored_with_the_other_lines_adapter_differs(base_store, line_units):
    # the tolerance above is meaningful: swapping a unit's line changes its score by far more than it allows
    serving = load_serving_model(ModelStore(base_store["root"]), None, torch.device("cpu"))
    units = line_units("line-a", 800)[:8]
    as_a = score_units(serving, joined(units))
    as_b = score_units(serving, joined([relined(u, "line-b") for u in units]))
    gaps = [abs(x.decision.score - y.decision.score) for x, y in zip(as_a.scored, as_b.scored, strict=True)]
    assert max(gaps) > 100 * MIXED_TOLERANCE


def test_a_store_without_adapters_serves_as_before(tmp_path, small_model_factory, unit_factory):
    model = small_model_factory()
    rng = np.random.default_rng(3)
    units = [unit_factory(i, rng) for i in range(8)]
    model.fit_normalisation(model.batch(units))
    with torch.no_grad():
        model.thresholds.fill_(0.5)
    ModelStore(tmp_path / "s").save(model.state_dict(), {"model_config": model.config.to_dict(),
                                                          "threshold_version": "t"}, promote=True)
    serving = load_serving_model(ModelStore(tmp_path / "s"), None, torch.device("cpu"))
    assert serving.adapters is None
    model.eval()
    with torch.no_grad():
        want = model(model.batch(units)).score.double().tolist()
    got = [s.decision.score for s in score_units(serving, joined(units)).scored]
    assert got == pytest.approx(want, abs=1e-4)  # the stream's batched preprocessing (see test_scoring.py)


def test_one_lines_adapter_applies_to_any_row_count_inside_its_context(base_store, line_units):
    # explanations run forwards of other shapes than scoring (a few units, k coalition rows of one unit):
    # LineAdapters.only gives every row of every layer the line's adapter
    serving = load_serving_model(ModelStore(base_store["root"]), None, torch.device("cpu"))
    res = base_store["results"]["line-a"]
    units = line_units("line-a", 900)[:5]
    adapters = serving.adapters
    with torch.no_grad():
        trained = res.model(res.model.batch(units)).score.double()  # the adapter active in its training copy
        base = base_store["model"](base_store["model"].batch(units)).score.double()
        with adapters.only("line-a") as adapted:
            for k in (1, 2, 5):
                got = adapted.model(adapted.model.batch(units[:k])).score.double()
                assert torch.allclose(got, trained[:k], atol=MIXED_TOLERANCE, rtol=0), k
        outside = adapters.model(adapters.model.batch(units)).score.double()  # hooks gone: the base's numbers
    assert torch.allclose(outside, base, atol=MIXED_TOLERANCE, rtol=0)
    assert (trained - base).abs().max() > ADAPTER_EFFECT
    assert adapters.only("line-c") is None


def test_model_versions_name_the_adapter_and_split_back():
    assert adapted_version("m0002-d949b265", "line:b.1", "m0001-c38c3deb") == \
        "m0002-d949b265+line:b.1:m0001-c38c3deb"
    assert split_model_version("m0002-d949b265+line:b.1:m0001-c38c3deb") == \
        ("m0002-d949b265", "line:b.1", "m0001-c38c3deb")
    assert split_model_version("m0002-d949b265") == ("m0002-d949b265", None, None)
    for bad in ("m0002-d949b265+", "m0002-d949b265+line-b", "m0002-d949b265+:m0001-c38c3deb", "+line-b:m1",
                "m0002-d949b265+line-b:"):
        with pytest.raises(StoreError, match="neither a version id"):
            split_model_version(bad)


def test_exact_adapter_versions_are_served_when_asked_for(base_store, tmp_path):
    root = copy_store(base_store, tmp_path)
    family = ModelStore(root)
    base = base_store["base"]
    first = load_adapter(family, base, "line-a")[1]["version"]
    line_b = load_adapter(family, base, "line-b")[1]["version"]
    res = base_store["results"]["line-a"]
    second = save_adapter(family, base.version, "line-a", dataclasses.replace(
        res, calibration=dataclasses.replace(res.calibration, threshold=0.25, version="t-second")), promote=False)
    assert promoted_adapters(family, base.version) == {"line-a": first, "line-b": line_b}
    pinned = load_serving_model(family, None, torch.device("cpu"), adapters={"line-a": second.version})
    assert {line: a.version for line, a in pinned.adapters.lines.items()} == {"line-a": second.version}
    assert pinned.adapters.lines["line-a"].threshold == 0.25
    assert load_serving_model(family, None, torch.device("cpu"), adapters={}).adapters is None
    with pytest.raises(StoreError, match="m0009-00000000"):
        load_serving_model(family, None, torch.device("cpu"), adapters={"line-a": "m0009-00000000"})


# --------------------------------------------------------------------------------------- versions per line
def test_versions_are_promoted_and_rolled_back_per_line_and_the_service_follows(base_store, tmp_path, line_units):
    from services.cli import main

    root = copy_store(base_store, tmp_path)
    family = ModelStore(root)
    base = base_store["base"]
    first = load_adapter(family, base, "line-a")[1]
    res = base_store["results"]["line-a"]
    retrained = dataclasses.replace(res, calibration=dataclasses.replace(res.calibration, threshold=0.25,
                                                                         version="t-second"))
    second = save_adapter(family, base.version, "line-a", retrained)
    assert second.promoted
    assert load_serving_model(family, None, torch.device("cpu")).adapters.lines["line-a"].threshold == 0.25

    def cli(*argv) -> list[dict]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(list(argv)) == 0
        return [json.loads(line) for line in out.getvalue().splitlines()]

    listed = cli("adapters", "list", "--store", str(root), "--line", "line-a")
    assert [(r["version"], r["promoted"]) for r in listed] == [(first["version"], False), (second.version, True)]
    assert cli("adapters", "rollback", "--store", str(root), "--line", "line-a") == \
        [{"base": base.version, "line": "line-a", "promoted": first["version"]}]
    served = load_serving_model(family, None, torch.device("cpu")).adapters
    assert served.lines["line-a"].version == first["version"]
    assert served.lines["line-a"].threshold == pytest.approx(first["threshold"], abs=0)
    assert served.lines["line-b"].version == load_adapter(family, base, "line-b")[1]["version"]  # untouched
    cli("adapters", "promote", second.version, "--store", str(root), "--line", "line-a")
    assert adapter_store(family, base.version, "line-a").promoted().version == second.version
    with pytest.raises(StoreError, match="unknown model version"):
        adapter_store(family, base.version, "line-a").promote("m0009-00000000")


def test_pruning_a_base_version_removes_its_adapters(base_store, tmp_path):
    root = copy_store(base_store, tmp_path)
    family = ModelStore(root, keep=1)
    base = base_store["base"]
    model = base_store["model"]
    assert (root / ADAPTERS_DIR / base.version).is_dir()
    for i in range(2):  # two newer, promoted versions: the first base is neither kept nor a rollback target
        family.save(model.state_dict(), {"model_config": model.config.to_dict(), "threshold_version": f"t{i}",
                                         "n": i}, promote=True)
    assert base.version not in [v.version for v in family.versions()]
    assert not (root / ADAPTERS_DIR / base.version).exists()


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_adapt_command_trains_a_line_adapter_on_an_image_folder(base_store, tmp_path):
    import cv2

    from inspection.data.own_data import load_own_data, resolve_data
    from services.cli import main

    root = copy_store(base_store, tmp_path)
    folder = tmp_path / "line-x"
    rng = np.random.default_rng(9)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    for i in range(30):
        defect = i % 3 == 0
        img = rng.integers(0, 200, (80, 80), dtype=np.uint8)
        if defect:
            img[10:40, 10:40] = 255
        path = folder / ("defect" if defect else "ok") / f"cell{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)
        stamp = (t0 + timedelta(minutes=i)).timestamp()
        os.utime(path, (stamp, stamp))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["adapt", "--store", str(root), "--from", "promoted", "--data", str(folder), "--line", "line-x",
                   "--rank", "4", "--epochs", "2", "--lr", "1e-2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    report = json.loads(out.getvalue())
    assert report["base"] == base_store["base"].version and report["promoted"]
    assert report["units"] == {"train": 24, "val": 6} and report["rank"] == 4
    family = ModelStore(root)
    state, card = load_adapter(family, base_store["base"], "line-x")
    assert card["data"]["source"]["kind"] == "folder" and card["data"]["source"]["unit_ids_sha256"]
    assert len(card["data"]["split"]["val_ids"]) == 6
    # the line's threshold: max F1 on its validation units (the latest 6 by time) as the service scores them
    serving = load_serving_model(family, None, torch.device("cpu"))
    data = load_own_data(resolve_data(folder, line="line-x"))
    scored = score_units(serving, joined(data.val)).scored
    scores = np.array([s.decision.score for s in scored])
    labels = np.array([u.label.defect for u in data.val])
    assert card["threshold"] == pytest.approx(choose_threshold(scores, labels, "max_f1"), abs=1e-4)
    assert all(s.decision.threshold_version == card["threshold_version"] for s in scored)
    bad = tmp_path / "line-y"  # a class the base's class head does not have
    shutil.copytree(folder, bad)
    (bad / "defect").rename(tmp_path / "crack")
    (bad / "defect").mkdir()
    (tmp_path / "crack").rename(bad / "defect" / "crack")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["adapt", "--store", str(root), "--from", "promoted", "--data", str(bad), "--line", "line-y",
                   "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert rc == 2 and "['crack']" in err.getvalue() and "does not know" in err.getvalue()
    assert [e.line for e in list_adapters(family)].count("line-y") == 0
