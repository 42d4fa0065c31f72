"""Parquet history: units written and read back losslessly; a bad file or row is refused with its location."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inspection.data.history import SCHEMA, ArchivedUnit, count_history, read_history, write_history
from inspection.errors import DataError
from inspection.records import (
    InputCoordinate,
    Label,
    TemperatureReading,
    Unit,
    VibrationReading,
    VisionReading,
)

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def make_unit(i: int, rng: np.random.Generator) -> Unit:
    uid = f"h-{i:04d}"
    env = lambda m: dict(unit_id=uid, line_id=f"line-{i % 2}", reading_id=f"{uid}-{m}", source=f"plant/{m}",  # noqa: E731
                         event_time=T0 + timedelta(seconds=i))
    kinds = i % 4
    image = rng.integers(0, 255 if kinds != 1 else 65535, (32, 40) if kinds != 2 else (32, 40, 3),
                         dtype=np.uint8 if kinds != 1 else np.uint16)
    vision = None if kinds == 3 else VisionReading.from_array(
        image, content_type="image/jpeg" if kinds == 2 else "image/png", **env("vision"))
    vibration = VibrationReading(values=rng.standard_normal((2, 500)), sample_rate_hz=48828.0, unit="g", **env("vibration"))
    temperature = None if kinds == 1 else TemperatureReading(values=rng.normal(40, 2, (2, 60)), sample_rate_hz=1.0,
                                                              unit="degC", **env("temperature"))
    culprits = frozenset({"vibration"}) if i % 3 == 0 else frozenset()
    label = None if i % 5 == 4 else Label(defect=bool(culprits), defect_class="vibration" if culprits else "ok",
                                          culprits=culprits, severity=0.5 if culprits else None)
    return Unit(uid, f"line-{i % 2}", vision=vision, vibration=vibration, temperature=temperature, label=label,
                provenance={"vision": f"img{i}", "note": "ü-ok"})


def test_round_trip_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    units = [make_unit(i, rng) for i in range(23)]
    archived = [ArchivedUnit(u, {m: InputCoordinate(f"inspection.{m}", i % 3, 100 + i) for m in u.present})
                if i % 2 else u for i, u in enumerate(units)]
    path = tmp_path / "history.parquet"
    assert write_history(path, archived, row_group_size=5) == 23
    assert count_history(path) == 23
    back = list(read_history(path, batch_size=7))
    assert [b.unit for b in back] == units  # readings byte-identical (JPEG too), labels and provenance equal
    for i, b in enumerate(back):
        expected = archived[i].inputs if i % 2 else {}
        assert dict(b.inputs) == dict(expected)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    assert not list(tmp_path.glob("*.partial"))


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_history(tmp_path / "nope.parquet"))
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    with pytest.raises(DataError, match="not an inspection history file"):
        list(read_history(foreign))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        list(read_history(garbage))


def test_a_corrupted_row_names_its_position(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "h.parquet"
    write_history(path, [make_unit(i, rng) for i in range(4)])
    rows = pq.read_table(path).to_pylist()
    rows[2]["vibration"]["value"] = rows[2]["vibration"]["value"][:-4]  # payload no longer matches ce_shape
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    it = read_history(path)
    assert next(it).unit.unit_id == "h-0000"
    next(it)
    with pytest.raises(DataError, match=r"row 2 \(unit 'h-0002'\).*shape_mismatch"):
        next(it)
