"""Training on a plant's own data: history and labels files, image folders, the time split, bad input, and one
tiny run through the command line (export -> train -> calibrate -> a servable store)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inspection.data.history import SCHEMA, write_history
from inspection.data.own_data import (
    DataSpec,
    OwnData,
    Skips,
    folder_unit_id,
    load_own_data,
    read_labels,
    rebuild_validation,
    resolve_data,
    write_labels,
)
from inspection.errors import ConfigError, DataError
from inspection.model import InspectionModel
from inspection.own_training import data_model_config
from inspection.records import Label, TemperatureReading, Unit, VibrationReading, VisionReading
from services.cli import main

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
#: a kHz accelerometer rate below MIN_MIXED_RATE_HZ, and two above it
RATE_HZ = 25_600.0
HIGH_RATES_HZ = (48_828.0, 97_656.0)
#: the model of the end-to-end run: small enough to train one epoch on 60 units in well under a minute on one core
SMALL = ["bridge.n_layers=1", "bridge.n_queries=4", "bridge.n_heads=4", "bridge.moe.n_experts=4",
         "bridge.moe.hidden=32"]


def make_unit(i: int, *, line: str = "line-1", minutes: float | None = None, defect: bool | None = None,
              klass: str | None = None, culprits=None, modalities=("vision", "vibration", "temperature"),
              rate: float = RATE_HZ, vib_channels: int = 1, temp_channels: int = 2, labelled: bool = True) -> Unit:
    """Unit ``i`` with small random readings at ``T0 + minutes`` (default ``i`` minutes); every third unit is
    defective (class ``vibration``, culprit vibration) unless told otherwise."""
    rng = np.random.default_rng(i)
    uid = f"u{i:04d}"
    when = T0 + timedelta(minutes=i if minutes is None else minutes)

    def env(m: str, seconds: float = 0.0) -> dict:
        return dict(unit_id=uid, line_id=line, reading_id=f"{uid}-{m}", source=f"plant/{line}/{m}",
                    event_time=when + timedelta(seconds=seconds))

    readings = {}
    if "vision" in modalities:
        readings["vision"] = VisionReading.from_array(rng.integers(0, 255, (16, 16), dtype=np.uint8), **env("vision"))
    if "vibration" in modalities:
        readings["vibration"] = VibrationReading(values=rng.normal(size=(vib_channels, 512)).astype(np.float32),
                                                 sample_rate_hz=rate, unit="g", **env("vibration", 0.25))
    if "temperature" in modalities:
        values = 20 + rng.normal(size=(temp_channels, 60)).astype(np.float32)
        readings["temperature"] = TemperatureReading(values=values, sample_rate_hz=1.0, unit="degC",
                                                     **env("temperature", 0.5))
    label = None
    if labelled:
        defect = i % 3 == 0 if defect is None else defect
        label = Label(defect=defect, defect_class=klass or ("vibration" if defect else "ok"),
                      culprits=frozenset(culprits if culprits is not None else ({"vibration"} if defect else ())))
    return Unit(uid, line, label=label, **readings)


def unlabelled(units):
    return [dataclasses.replace(u, label=None) for u in units]


def history(path: Path, units) -> Path:
    write_history(path, units)
    return path


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_labels_file_round_trip(tmp_path, suffix):
    units = [make_unit(i) for i in range(20)]
    units[3] = make_unit(3, defect=True, klass="multiple", culprits={"vision", "temperature"})
    path = history(tmp_path / "h.parquet", unlabelled(units))
    labels = tmp_path / f"labels{suffix}"
    assert write_labels(labels, units) == 20
    data = load_own_data(resolve_data(path, labels=labels))
    assert data.label_sources == {"labels_file": 20}
    assert {u.unit_id: u.label for u in data.units} == {u.unit_id: u.label for u in units}
    assert data.class_names == ("ok", "multiple", "vibration")
    card = data.source_card()
    assert card["kind"] == "history" and card["labels"] == str(labels.resolve()) and card["n_units"] == 20


def test_labels_file_values_and_defaults(tmp_path):
    """0/1/true/false in any case; a defect without class is class 'defect'; without culprits, every reading the
    unit has is a culprit; culprits separated by ';' or ','."""
    path = history(tmp_path / "h.parquet", [make_unit(i, labelled=False) for i in range(6)])
    labels = tmp_path / "labels.csv"
    labels.write_text('unit_id,label,class,culprits\nu0000,TRUE,,\nu0001,false,,\nu0002,1,crack,vision;vibration\n'
                      'u0003,0,ok,\nu0004,true,crack,"vision, temperature"\nu0005,0,,\n', encoding="utf-8")
    data = load_own_data(resolve_data(path, labels=labels, val_fraction=0.5))
    got = {u.unit_id: u.label for u in data.units}
    assert got["u0000"] == Label(True, "defect", frozenset({"vision", "vibration", "temperature"}))
    assert got["u0002"] == Label(True, "crack", frozenset({"vision", "vibration"}))
    assert got["u0004"] == Label(True, "crack", frozenset({"vision", "temperature"}))
    assert [got[f"u000{i}"] for i in (1, 3, 5)] == [Label(False)] * 3
    assert data.class_names == ("ok", "crack", "defect")


def test_labels_file_overrides_the_history_per_unit(tmp_path):
    units = [make_unit(i) for i in range(10)]
    path = history(tmp_path / "h.parquet", units)
    labels = tmp_path / "labels.csv"
    labels.write_text("unit_id,label,class\nu0001,1,scratch\nu0003,0,\n", encoding="utf-8")
    data = load_own_data(resolve_data(path, labels=labels))
    got = {u.unit_id: u.label for u in data.units}
    assert got["u0001"].defect_class == "scratch" and not got["u0003"].defect
    assert got["u0006"] == units[6].label  # not named: the history's own label
    assert data.label_sources == {"labels_file": 2, "history": 8}


@pytest.mark.parametrize("text, match", [
    ("unit_id,label\nu0000,maybe\n", "unknown label value 'maybe'"),
    ("unit_id,label\nu0000,\n", "unknown label value"),
    ("unit_id,label,culprits\nu0000,1,camera\n", r"culprits \['camera'\] are not modalities"),
    ("unit_id,label,culprits\nu0000,0,vision\n", "labelled good"),
    ("unit_id,label,class\nu0000,1,ok\n", "cannot have class 'ok'"),
    ("unit_id,label\nu0000,1\nu0000,0\n", "more than once"),
    ("unit_id,defect\nu0000,1\n", "missing"),
    ("unit_id,label,comment\nu0000,1,x\n", "unknown"),
])
def test_bad_labels_files_say_what_is_wrong(tmp_path, text, match):
    labels = tmp_path / "labels.csv"
    labels.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        read_labels(labels)


def test_labels_file_ids_not_in_history_are_listed(tmp_path):
    path = history(tmp_path / "h.parquet", [make_unit(i) for i in range(6)])
    labels = tmp_path / "labels.csv"
    labels.write_text("unit_id,label\nu0001,1\nu9998,0\nu9999,1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"2 unit id\(s\) that are not in the history: 'u9998', 'u9999'"):
        load_own_data(resolve_data(path, labels=labels))


# ----------------------------------------------------------------------------------------------- split
def test_split_by_time_validates_on_the_latest_units(tmp_path):
    """Units come in any file order, over two files (a glob); the split sorts them by their earliest reading's
    event time, and the latest 20 % validate."""
    rng = np.random.default_rng(0)
    minutes = rng.permutation(50) * 7.0
    units = [make_unit(i, minutes=float(m)) for i, m in enumerate(minutes)]
    history(tmp_path / "a.parquet", units[:25])
    history(tmp_path / "b.parquet", units[25:])
    data = load_own_data(resolve_data(str(tmp_path / "*.parquet")))
    assert len(data.spec.paths) == 2
    assert len(data.val) == 10 and len(data.train) == 40
    assert not {u.unit_id for u in data.val} & {u.unit_id for u in data.train}
    first = lambda u: min(r.event_time for r in u.readings)  # noqa: E731
    assert max(first(u) for u in data.train) < min(first(u) for u in data.val)
    assert [first(u) for u in data.units] == sorted(first(u) for u in units)
    order = sorted(units, key=first)
    assert [u.unit_id for u in data.val] == [u.unit_id for u in order[-10:]]
    split = data.split_card()
    assert split["val_ids"] == [u.unit_id for u in data.val] and split["n_train"] == 40


def test_split_orders_by_the_earliest_reading(tmp_path):
    """A unit whose camera fired first but whose vibration came last sorts by its camera time."""
    units = [make_unit(i) for i in range(10)]
    late = units[0]
    vib = dataclasses.replace(late.vibration, event_time=T0 + timedelta(hours=5))
    units[0] = dataclasses.replace(late, vibration=vib)
    data = load_own_data(resolve_data(history(tmp_path / "h.parquet", units), val_fraction=0.3))
    assert data.units[0].unit_id == "u0000" and "u0000" not in {u.unit_id for u in data.val}


def test_line_filter_keeps_one_line(tmp_path):
    units = [make_unit(i, line="line-1" if i % 2 else "line-7") for i in range(40)]
    path = history(tmp_path / "h.parquet", units)
    data = load_own_data(resolve_data(path, line="line-7"))
    assert data.lines == ["line-7"] and len(data.units) == 20
    assert data.other_lines == {"line-1": 20}
    with pytest.raises(ConfigError, match=r"no usable unit of line 'line-3'.*lines there: \['line-1', 'line-7'\]"):
        load_own_data(resolve_data(path, line="line-3"))


# ------------------------------------------------------------------------------------------ bad history
def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _write_rows(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def test_rows_the_codec_rejects_and_unlabelled_units_are_counted_skips(tmp_path):
    units = [make_unit(i) for i in range(30)]
    units[4] = dataclasses.replace(units[4], label=None)
    path = history(tmp_path / "h.parquet", units)
    rows = _rows(path)
    rows[7]["vision"]["value"] = rows[7]["vision"]["value"][:40]  # a truncated PNG
    for m in ("vision", "vibration", "temperature"):  # a unit without readings
        rows[9][m] = None
    rows.append(dict(rows[12]))  # archived twice
    _write_rows(path, rows)
    data = load_own_data(resolve_data(path))
    counts = data.skips.counts
    assert counts["unlabelled"] == 1 and counts["empty_unit"] == 1 and counts["duplicate_unit"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("image_")) == 1, counts
    assert len(data.units) == 27
    card = data.source_card()["skipped"]
    assert card["counts"] == dict(sorted(counts.items())) and "u0004" in card["examples"]["unlabelled"][0]


def test_a_defect_whose_culprits_are_all_absent_is_skipped(tmp_path):
    units = [make_unit(i, modalities=("vision", "vibration")) for i in range(10)]
    units[3] = make_unit(3, modalities=("vision", "vibration"), defect=True, culprits={"temperature"})
    data = load_own_data(resolve_data(history(tmp_path / "h.parquet", units)))
    assert data.skips.counts == {"culprit_absent": 1}


def test_mixed_sample_rates_are_an_error_naming_them(tmp_path):
    units = [make_unit(i, rate=RATE_HZ if i % 2 else 12_800.0) for i in range(20)]
    path = history(tmp_path / "h.parquet", units)
    with pytest.raises(ConfigError, match="mixed sample rates .*12800 Hz: 10 units, 25600 Hz: 10 units"):
        load_own_data(resolve_data(path))
    with pytest.raises(ConfigError, match="at least 40000 Hz"):  # allowed only where every rate covers the grid
        load_own_data(resolve_data(path, allow_mixed_rates=True))
    high = history(tmp_path / "high.parquet", [make_unit(i, rate=HIGH_RATES_HZ[i % 2]) for i in range(20)])
    with pytest.raises(ConfigError, match="--allow-mixed-rates"):
        load_own_data(resolve_data(high))
    assert load_own_data(resolve_data(high, allow_mixed_rates=True)).rates["vibration"] == {"48828": 10,
                                                                                            "97656": 10}


def test_mixed_channel_counts_are_an_error(tmp_path):
    units = [make_unit(i, temp_channels=2 if i % 2 else 3) for i in range(20)]
    with pytest.raises(ConfigError, match="temperature readings come with different channel counts"):
        load_own_data(resolve_data(history(tmp_path / "h.parquet", units)))


def test_one_class_or_no_validation_units_are_errors(tmp_path):
    good = history(tmp_path / "good.parquet", [make_unit(i, defect=False) for i in range(10)])
    with pytest.raises(ConfigError, match="fewer than 2 classes"):
        load_own_data(resolve_data(good))
    few = history(tmp_path / "few.parquet", [make_unit(i) for i in range(4)])
    with pytest.raises(ConfigError, match="leave no validation units"):
        load_own_data(resolve_data(few, val_fraction=0.1))
    # the latest units are all good: calibration could not choose a threshold on them
    late_good = history(tmp_path / "late.parquet", [make_unit(i, defect=i < 5) for i in range(20)])
    with pytest.raises(ConfigError, match="validation units .* are all good"):
        load_own_data(resolve_data(late_good))
    with pytest.raises(ConfigError, match=r"validation fraction must be in \(0, 1\)"):
        resolve_data(good, val_fraction=0.0)


def test_an_empty_glob_is_an_error_naming_it(tmp_path):
    pattern = str(tmp_path / "archive" / "*.parquet")
    with pytest.raises(ConfigError, match=f"no data matches {re.escape(repr(pattern))}"):
        resolve_data(pattern)


# ------------------------------------------------------------------------------------------ normal-only
def test_normal_only_data_keeps_the_good_units_and_splits_them_by_time(tmp_path):
    """Every third unit is defective: those are counted skips; the 20 good ones, in time order, split 15 / 5."""
    rng = np.random.default_rng(3)
    units = [make_unit(i, minutes=float(m)) for i, m in enumerate(rng.permutation(30) * 5.0)]
    path = history(tmp_path / "h.parquet", units)
    data = load_own_data(resolve_data(path, val_fraction=0.25, mode="normal-only"))
    good = sorted((u for u in units if not u.label.defect), key=lambda u: min(r.event_time for r in u.readings))
    assert [u.unit_id for u in data.units] == [u.unit_id for u in good] and len(good) == 20
    assert [u.unit_id for u in data.train] == [u.unit_id for u in good[:15]]
    assert [u.unit_id for u in data.val] == [u.unit_id for u in good[15:]]
    assert data.skips.counts == {"labelled_defective": 10} and data.class_names == ("ok",)
    assert data.label_sources == {"history": 20} and not data.assumed_normal
    card = data.source_card()
    assert card["mode"] == "normal-only" and card["n_units"] == 20
    assert data.split_card()["val_ids"] == [u.unit_id for u in good[15:]]


def test_normal_only_data_without_any_label_takes_every_unit_as_normal(tmp_path):
    units = unlabelled([make_unit(i) for i in range(20)])
    path = history(tmp_path / "h.parquet", units)
    data = load_own_data(resolve_data(path, mode="normal-only"))
    assert len(data.units) == 20 and data.assumed_normal and data.label_sources == {"assumed_normal": 20}
    assert all(u.label is not None and not u.label.defect for u in data.units) and not data.skips.counts
    # a labels file is a label: then only the units it (or the history) labels good are kept
    labels = tmp_path / "labels.csv"
    labels.write_text("unit_id,label\n" + "".join(f"u{i:04d},{int(i < 3)}\n" for i in range(12)), encoding="utf-8")
    labelled = load_own_data(resolve_data(path, labels=labels, mode="normal-only"))
    assert not labelled.assumed_normal and labelled.label_sources == {"labels_file": 9}
    assert labelled.skips.counts == {"labelled_defective": 3, "unlabelled": 8}
    # the supervised reading of the same files never assumes a label
    with pytest.raises(ConfigError, match="no usable unit"):
        load_own_data(resolve_data(path))


def test_normal_only_data_without_a_good_unit_or_held_out_units_is_an_error(tmp_path):
    bad = history(tmp_path / "bad.parquet", [make_unit(i, defect=True) for i in range(8)])
    with pytest.raises(ConfigError, match=r"no unit is labelled good: all 8 labelled units are defective.*"
                                          r"labelled_defective"):
        load_own_data(resolve_data(bad, mode="normal-only"))
    few = history(tmp_path / "few.parquet", [make_unit(i, defect=False) for i in range(3)])
    with pytest.raises(ConfigError, match="leave no held-out units"):
        load_own_data(resolve_data(few, val_fraction=0.1, mode="normal-only"))
    with pytest.raises(ConfigError, match="data mode must be one of"):
        resolve_data(bad, mode="anomaly")


def test_normal_only_validation_units_rebuild_from_the_card(tmp_path):
    path = history(tmp_path / "h.parquet", [make_unit(i) for i in range(30)])
    data = load_own_data(resolve_data(path, mode="normal-only"))
    again = rebuild_validation(data.source_card(), data.split_card())
    assert [u.unit_id for u in again] == [u.unit_id for u in data.val]
    assert all(not u.label.defect for u in again)


# ---------------------------------------------------------------------------------------------- folder
def _png(seed: int) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8))[1].tobytes()


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _put(path: Path, data: bytes, minute: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = (T0 + timedelta(minutes=minute)).timestamp()
    os.utime(path, (stamp, stamp))


def test_image_folder_layout_decodes_through_the_reading_types(tmp_path):
    root = tmp_path / "cells"
    for i in range(6):
        _put(root / "ok" / f"good{i}.png", _png(i), minute=2 * i)
    _put(root / "ok" / "good-jpeg.jpg", _jpeg(10), minute=1)
    _put(root / "defect" / "crack" / "c1.png", _png(20), minute=3)
    _put(root / "defect" / "crack" / "c 2.jpeg", _jpeg(21), minute=11)
    _put(root / "defect" / "d1.png", _png(22), minute=5)
    _put(root / "defect" / "d2.png", _png(23), minute=12)
    _put(root / "ok" / "broken.png", _png(30)[:60], minute=4)  # PNG magic, truncated data
    _put(root / "ok" / "notes.txt", b"camera 2 re-aimed on Tuesday", minute=0)
    spec = resolve_data(root, line="line-9", val_fraction=0.3)
    assert spec.kind == "folder"
    data = load_own_data(spec)
    assert data.class_names == ("ok", "crack", "defect")
    assert data.skips.counts["unsupported_file"] == 1
    assert sum(v for k, v in data.skips.counts.items() if k.startswith("image_")) == 1, data.skips.counts
    by_id = {u.unit_id: u for u in data.units}
    assert len(by_id) == 11 and data.lines == ["line-9"]
    jpeg = by_id["ok:good-jpeg.jpg"].vision
    assert isinstance(jpeg, VisionReading) and jpeg.content_type == "image/jpeg" and jpeg.image.shape == (24, 24, 3)
    assert by_id["defect:crack:c_2.jpeg"].label == Label(True, "crack", frozenset({"vision"}))
    assert by_id["defect:d1.png"].label.defect_class == "defect"
    assert by_id["ok:good0.png"].label == Label(False)
    # time order = modification time; the latest 3 of 11 validate
    assert [u.unit_id for u in data.val] == ["ok:good5.png", "defect:crack:c_2.jpeg", "defect:d2.png"]
    assert folder_unit_id(Path("defect/crack/a b.png")) == "defect:crack:a_b.png"


def test_image_folder_errors(tmp_path):
    root = tmp_path / "cells"
    _put(root / "ok" / "a.png", _png(0), 0)
    _put(root / "misc" / "b.png", _png(1), 1)
    with pytest.raises(ConfigError, match="holds a folder 'misc'"):
        load_own_data(resolve_data(root))
    with pytest.raises(ConfigError, match="labelled by its layout"):
        resolve_data(root, labels=__file__)


@pytest.mark.data
def test_elpv_export_is_an_image_folder_that_loads(tmp_path):
    out = tmp_path / "cells"
    assert main(["data", "export", "--images", "--out", str(out), "--limit", "40"]) == 0
    files = sorted(p.relative_to(out).parts[:-1] for p in out.rglob("*.png"))
    assert len(files) == 40 and set(files) <= {("ok",), ("defect", "p1"), ("defect", "p2_3")}
    data = load_own_data(resolve_data(out, val_fraction=0.5))
    assert data.lines == ["cells"] and len(data.units) == 40 and not data.skips.counts
    assert main(["data", "export", "--images", "--out", str(out), "--limit", "4"]) == 2  # not empty


# --------------------------------------------------------------------------------------- model config
def test_model_config_follows_the_data():
    units = [make_unit(i, modalities=("vibration", "temperature"), vib_channels=2, temp_channels=3, klass=None)
             for i in range(10)]
    spec = DataSpec("history", ("unused.parquet",))
    data = OwnData(spec, units, units[:8], units[8:], ("ok", "vibration"), Skips(), {}, {}, {})
    cfg = data_model_config(data, dim=32, overrides=["bridge.n_layers=1"])
    assert cfg.modalities == ("vibration", "temperature") and cfg.class_names == ("ok", "vibration")
    assert cfg.encoders["vibration"].config["preprocess"]["channels"] == 2
    assert cfg.encoders["temperature"].config["preprocess"]["channels"] == 3 and cfg.bridge.n_layers == 1
    batch = InspectionModel(cfg, pretrained_weights=False).batch(units[:2])
    assert batch.inputs["temperature"]["series"].shape == (2, 3, 60)  # [B, C, S]
    slow = [make_unit(i, modalities=("vibration",), rate=1.0) for i in range(4)]
    data = OwnData(spec, slow, slow[:3], slow[3:], ("ok", "vibration"), Skips(), {}, {}, {})
    cfg = data_model_config(data, dim=32)
    assert cfg.encoders["vibration"].name == "series"  # a 1 Hz RMS series
    assert InspectionModel(cfg, pretrained_weights=False).batch(slow[:2]).inputs["vibration"]["series"].shape == (
        2, 1, 60)


# ---------------------------------------------------------------------------------------- calibration
def test_rebuilding_the_validation_units_checks_the_data(tmp_path):
    units = [make_unit(i) for i in range(20)]
    path = history(tmp_path / "h.parquet", unlabelled(units))
    labels = tmp_path / "labels.csv"
    write_labels(labels, units)
    data = load_own_data(resolve_data(path, labels=labels))
    source, split = data.source_card(), data.split_card()
    assert [u.unit_id for u in rebuild_validation(source, split)] == split["val_ids"]
    moved = tmp_path / "moved"
    moved.mkdir()
    path.rename(moved / "h.parquet")
    with pytest.raises(DataError, match="does not exist"):
        rebuild_validation(source, split)
    assert len(rebuild_validation(source, split, data=str(moved / "h.parquet"))) == 4
    history(moved / "h.parquet", unlabelled(units) + [make_unit(20)])
    with pytest.raises(ConfigError, match="not what this model was trained on: 21 units now, 20 then"):
        rebuild_validation(source, split, data=str(moved / "h.parquet"))
    history(moved / "h.parquet", unlabelled(units))
    relabelled = tmp_path / "relabelled.csv"
    write_labels(relabelled, [dataclasses.replace(units[1], label=Label(True, "dent", frozenset({"vision"})))]
                 + units[:1] + units[2:])
    with pytest.raises(ConfigError, match="labels .* changed"):
        rebuild_validation(source, split, data=str(moved / "h.parquet"), labels=str(relabelled))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_needs_exactly_one_source_and_flags_of_its_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["train", "--bench", "elpv", "--data", str(tmp_path)])
    assert main(["train", "--data", str(tmp_path / "h.parquet"), "--target-far", "0.05"]) == 2
    assert "--target-far applies to --mode normal-only" in capsys.readouterr().err
    assert main(["train", "--bench", "elpv", "--mode", "normal-only", "--line", "line-1"]) == 2
    assert "apply to --data" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "h.parquet"), "--mode", "normal-only", "--seeds", "1", "2"]) == 2
    assert "apply to supervised training" in capsys.readouterr().err
    assert main(["train", "--bench", "elpv", "--line", "line-1"]) == 2
    assert "apply to --data" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none-*.parquet")]) == 2
    assert "no data matches" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_train_calibrate_and_serve_a_line_model_from_history(tmp_path, capsys):
    """Bundled composite units exported as history plus a labels file -> train 1 epoch of a tiny model ->
    calibrate by name (the validation units rebuilt from the files) -> a promoted, calibrated, servable version."""
    import torch

    from inspection.store import ModelStore
    from services.scoring import load_serving_model

    hist, labels, store = tmp_path / "hist.parquet", tmp_path / "labels.csv", tmp_path / "models"
    assert main(["data", "export", "--out", str(hist), "--labels-out", str(labels), "--limit", "60"]) == 0
    capsys.readouterr()
    argv = ["train", "--data", str(hist), "--labels", str(labels), "--line", "line-1", "--allow-mixed-rates",
            "--epochs", "1", "--dim", "32", "--image-size", "32", "--device", "cpu", "--models-dir", str(store),
            "--out", str(tmp_path / "runs")]
    for item in SMALL:
        argv += ["--model-set", item]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["model"] == "line-line-1" and trained["units"] == {"train": 48, "val": 12}
    assert trained["label_sources"] == {"labels_file": 60}
    assert main(["calibrate", "--name", "line-line-1", "--models-dir", str(store)]) == 0
    calibrated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    family = ModelStore(store / "line-line-1")
    promoted = family.promoted()
    assert promoted.version == calibrated["version"] != trained["version"]
    card = promoted.card
    assert card["threshold_version"] and card["source"]["kind"] == "history"
    assert list(card["source"]["paths"]) == [str(hist.resolve())] and card["source"]["labels"] == str(labels.resolve())
    assert card["source"]["n_units"] == 60 and len(card["source"]["unit_ids_sha256"]) == 64
    assert len(card["split"]["val_ids"]) == 12
    serving = load_serving_model(family, None, torch.device("cpu"))
    assert serving.version == promoted.version and serving.model.calibrated


@pytest.mark.data
@pytest.mark.slow
def test_train_calibrate_and_serve_a_normal_only_line_model(tmp_path, capsys):
    """Composite units exported as history plus a labels file -> ``train --mode normal-only`` on the good units
    (the latest of them held out) -> ``calibrate --target-far`` by name -> served by ``score_units``; the same
    history without labels takes every unit as normal; labels with no good unit are an error."""
    import csv

    import torch

    from inspection.data.history import read_history
    from inspection.normal_only import MODE, NormalOnlyDetector
    from inspection.records import InputCoordinate
    from inspection.store import ModelStore
    from services.join import JoinedUnit
    from services.scoring import load_serving_model, score_units

    hist, labels, store = tmp_path / "hist.parquet", tmp_path / "labels.csv", tmp_path / "models"
    assert main(["data", "export", "--out", str(hist), "--labels-out", str(labels), "--limit", "120"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(labels.open(encoding="utf-8")))
    n_good = sum(r["label"] == "0" for r in rows)
    n_held_out = round(n_good * 0.2)
    base = ["train", "--data", str(hist), "--line", "line-1", "--allow-mixed-rates", "--mode", "normal-only",
            "--image-size", "32", "--device", "cpu", "--models-dir", str(store)]
    assert main([*base, "--labels", str(labels)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["mode"] == MODE and trained["model"] == "line-line-1" and not trained["assumed_normal"]
    assert trained["units"] == {"fit": n_good - n_held_out, "calibration": n_held_out}
    assert trained["skipped"]["counts"] == {"labelled_defective": len(rows) - n_good}
    assert trained["label_sources"] == {"labels_file": n_good} and trained["target_far"] == 0.01

    family = ModelStore(store / "line-line-1")
    card = family.promoted().card
    assert card["version"] == trained["version"] and card["mode"] == MODE and "Mahalanobis" in card["method"]
    assert card["target_far"] == 0.01 and card["units_used"] == trained["units"]
    assert set(card["features"]["encoders"]) == set(card["modalities"]) == {"vision", "vibration", "temperature"}
    assert card["source"]["mode"] == MODE and card["defect_class"] == "anomaly"
    held_out = rebuild_validation(card["source"], card["split"])
    assert len(held_out) == n_held_out and all(not u.label.defect for u in held_out)

    assert main(["calibrate", "--name", "line-line-1", "--target-far", "0.25", "--models-dir", str(store)]) == 0
    calibrated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    promoted = family.promoted()
    assert promoted.version == calibrated["version"] != trained["version"]
    assert promoted.card["parent"] == trained["version"] and promoted.card["target_far"] == 0.25
    det, _ = NormalOnlyDetector.load(family)
    alarmed = det.score(held_out).score >= det.threshold
    assert alarmed.mean() <= 0.25 and promoted.card["calibration_far"] == pytest.approx(alarmed.mean())
    assert det.threshold <= card["threshold"]  # a higher false-alarm rate never raises the threshold

    serving = load_serving_model(family, None, torch.device("cpu"))
    units = [a.unit for a in read_history(hist)][:10]
    joined = [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                         0.0) for i, u in enumerate(units)]
    direct = det.score(units)
    for k, scored in enumerate(score_units(serving, joined).scored):
        d = scored.decision
        assert d.model_version == promoted.version and d.threshold == det.threshold
        assert d.score == pytest.approx(direct.score[k], abs=1e-6)
        assert d.defect_class == ("anomaly" if d.score >= d.threshold else "ok")
    # batch re-scoring takes the same version (history with input coordinates, as the archive sink writes it)
    from inspection.data.history import ArchivedUnit

    archive = tmp_path / "archive.parquet"
    write_history(archive, [ArchivedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present})
                            for i, u in enumerate(units)])
    assert main(["rescore", "--history", str(archive), "--store", str(store / "line-line-1"), "--out",
                 str(tmp_path / "rescored"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    from services.rescore import read_decisions

    rescored = {d.unit_id: d for d in read_decisions(tmp_path / "rescored")}
    assert sorted(rescored) == sorted(u.unit_id for u in units)
    for k, u in enumerate(units):
        assert rescored[u.unit_id].score == pytest.approx(direct.score[k], abs=1e-6)
        assert rescored[u.unit_id].model_version == promoted.version
        assert rescored[u.unit_id].attributions["mode"] == MODE
    assert main(["explain", "--history", str(archive), "--store", str(store / "line-line-1"), "--out",
                 str(tmp_path / "reports")]) == 2
    assert "is a normal-only model" in capsys.readouterr().err

    # no label anywhere: every unit is normal, and the card says so
    assert main([*base, "--name", "unlabelled"]) == 0
    unlabelled_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert unlabelled_run["assumed_normal"] and unlabelled_run["label_sources"] == {"assumed_normal": len(rows)}
    assert sum(unlabelled_run["units"].values()) == len(rows)
    assert ModelStore(store / "unlabelled").promoted().card["assumed_normal"] is True

    everything_defective = tmp_path / "bad.csv"
    everything_defective.write_text("unit_id,label\n" + "".join(f"{r['unit_id']},1\n" for r in rows), encoding="utf-8")
    assert main([*base, "--name", "bad", "--labels", str(everything_defective)]) == 2
    assert "no unit is labelled good" in capsys.readouterr().err
