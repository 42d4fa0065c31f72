"""Units as Parquet history: archived for re-scoring, read back losslessly.

Each row is one unit. A reading is stored exactly as it travels on Kafka (the message value and its CloudEvents
headers), so reading history back goes through the same validating decoder as the stream, and a re-scored unit
is byte-for-byte the unit that was scored live. Optional input coordinates (topic, partition, offset) keep the
link to the stream; labels and provenance are kept when known.

Schema (one struct column per modality, null when absent)::

    unit_id: string, line_id: string,
    vision|vibration|temperature: struct<value: binary, headers: list<struct<key: string, value: binary>>,
                                         topic: string, partition: int32, offset: int64>,
    label: struct<defect: bool, defect_class: string, culprits: list<string>, severity: double>,
    provenance: map<string, string>
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from inspection.codec import CodecLimits, decode_reading, encode_reading, parse_time
from inspection.errors import DataError, Reason, RecordError
from inspection.records import MODALITIES, InputCoordinate, Label, Unit

SCHEMA_VERSION = "1"
_HEADER = pa.struct([("key", pa.string()), ("value", pa.binary())])
_READING = pa.struct(
    [
        ("value", pa.large_binary()),
        ("headers", pa.list_(_HEADER)),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)
_LABEL = pa.struct(
    [("defect", pa.bool_()), ("defect_class", pa.string()), ("culprits", pa.list_(pa.string())), ("severity", pa.float64())]
)
SCHEMA = pa.schema(
    [("unit_id", pa.string()), ("line_id", pa.string())]
    + [(m, _READING) for m in MODALITIES]
    + [("label", _LABEL), ("provenance", pa.map_(pa.string(), pa.string()))],
    metadata={b"inspection.history.schema": SCHEMA_VERSION.encode()},
)


@dataclass(frozen=True)
class ArchivedUnit:
    """A unit and, when it came from Kafka, where each of its readings was read."""

    unit: Unit
    inputs: Mapping[str, InputCoordinate] = field(default_factory=dict)


def _row(item: Unit | ArchivedUnit) -> dict:
    archived = item if isinstance(item, ArchivedUnit) else ArchivedUnit(item)
    unit = archived.unit
    row: dict = {"unit_id": unit.unit_id, "line_id": unit.line_id}
    for m in MODALITIES:
        reading = getattr(unit, m)
        if reading is None:
            row[m] = None
            continue
        msg = encode_reading(reading)
        coord = archived.inputs.get(m)
        row[m] = {
            "value": msg.value,
            "headers": [{"key": k, "value": v} for k, v in msg.headers],
            "topic": coord.topic if coord else None,
            "partition": coord.partition if coord else None,
            "offset": coord.offset if coord else None,
        }
    lab = unit.label
    row["label"] = None if lab is None else {
        "defect": lab.defect, "defect_class": lab.defect_class, "culprits": sorted(lab.culprits), "severity": lab.severity
    }
    row["provenance"] = list(unit.provenance.items())
    return row


def write_history(path: Path | str, units: Iterable[Unit | ArchivedUnit], *, row_group_size: int = 256) -> int:
    """Write units to a Parquet file (streaming, ``row_group_size`` units in memory at a time).

    The file is written to ``<path>.partial`` and renamed when complete, so a crash never leaves a truncated
    file under the final name.

    Returns:
        The number of units written.
    """
    path = Path(path)
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1; got {row_group_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    count = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            batch: list[dict] = []
            for item in units:
                batch.append(_row(item))
                if len(batch) >= row_group_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                    count += len(batch)
                    batch.clear()
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                count += len(batch)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _unit_from_row(row: dict, limits: CodecLimits) -> ArchivedUnit:
    readings, inputs = {}, {}
    for m in MODALITIES:
        cell = row[m]
        if cell is None:
            continue
        headers = [(h["key"], h["value"]) for h in cell["headers"]]
        readings[m] = decode_reading(cell["value"], headers, expected_modality=m, limits=limits)
        if cell["topic"] is not None:
            inputs[m] = InputCoordinate(cell["topic"], int(cell["partition"]), int(cell["offset"]))
    lab = row["label"]
    label = None if lab is None else Label(
        defect=lab["defect"], defect_class=lab["defect_class"], culprits=frozenset(lab["culprits"]),
        severity=lab["severity"],
    )
    unit = Unit(row["unit_id"], row["line_id"], label=label, provenance=dict(row["provenance"] or []), **readings)
    return ArchivedUnit(unit, inputs)


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"history file {path} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file: {exc}") from exc
    meta = pf.schema_arrow.metadata or {}
    if meta.get(b"inspection.history.schema") != SCHEMA_VERSION.encode():
        raise DataError(f"{path} is not an inspection history file (schema version {meta.get(b'inspection.history.schema')!r})")
    return pf


def read_history(path: Path | str, *, limits: CodecLimits | None = None, batch_size: int = 256) -> Iterator[ArchivedUnit]:
    """Stream archived units back from a Parquet file, validating every reading as the stream would.

    Raises:
        DataError: the file is missing or not a history file; a row fails validation (names the row).
    """
    for row_no, unit_id, item in iter_history_rows(path, limits=limits, batch_size=batch_size):
        if isinstance(item, RecordError):
            raise DataError(f"{Path(path)} row {row_no} (unit {unit_id!r}): {item}") from item
        yield item


def count_history(path: Path | str) -> int:
    """Number of units in a history file, from its footer."""
    return _open(Path(path)).metadata.num_rows


def iter_history_rows(path: Path | str, *, limits: CodecLimits | None = None,
                      batch_size: int = 256) -> Iterator[tuple[int, str | None, ArchivedUnit | RecordError]]:
    """Every row of a history file, a bad one included: ``(row number, unit id, unit or error)``.

    Unlike :func:`read_history`, a row that fails validation does not end the file: its
    :class:`~inspection.errors.RecordError` is yielded in its place (re-scoring counts and reports it).

    Raises:
        DataError: the file is missing, not Parquet, or not a history file.
    """
    pf = _open(Path(path))
    limits = limits or CodecLimits()
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield row_no, row.get("unit_id"), _unit_or_error(row, limits)
            row_no += 1


def iter_history_row_group(path: Path | str, group: int, *, limits: CodecLimits | None = None
                           ) -> Iterator[tuple[int, str | None, ArchivedUnit | RecordError]]:
    """The rows of one row group of a history file, as :func:`iter_history_rows` yields them (row numbers
    counted from the file's start), for engines that split a file by row group."""
    pf = _open(Path(path))
    limits = limits or CodecLimits()
    first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    for i, row in enumerate(pf.read_row_group(group).to_pylist()):
        yield first + i, row.get("unit_id"), _unit_or_error(row, limits)


def _unit_or_error(row: dict, limits: CodecLimits) -> ArchivedUnit | RecordError:
    """A history row's unit, or the reason it is not one (a failed validation, or cells without the schema's
    shape)."""
    try:
        return _unit_from_row(row, limits)
    except RecordError as exc:
        return exc
    except (KeyError, TypeError, ValueError) as exc:
        return RecordError(Reason.BAD_SHAPE, f"{type(exc).__name__}: {exc}")


def history_index(path: Path | str) -> list[tuple[str | None, datetime | None]]:
    """Per row of a history file, its line and its unit's event time (the latest ``ce_time`` of its readings),
    read from the header columns alone (no payload is read or decoded); ``None`` where a row lacks them."""
    pf = _open(Path(path))
    table = pf.read(columns=["line_id", *(f"{m}.headers" for m in MODALITIES)])
    lines = table.column("line_id").to_pylist()
    per_modality = [table.column(m).to_pylist() for m in MODALITIES]
    out: list[tuple[str | None, datetime | None]] = []
    for i, line in enumerate(lines):
        times = []
        for cells in per_modality:
            cell = cells[i]
            if cell is None:
                continue
            for h in cell.get("headers") or ():
                if h.get("key") == "ce_time" and h.get("value") is not None:
                    with contextlib.suppress(RecordError, UnicodeDecodeError):  # the row itself reports it
                        times.append(parse_time(h["value"].decode("utf-8")))
        out.append((line, max(times) if times else None))
    return out


def history_labels(path: Path | str) -> dict[str, bool]:
    """Unit id -> whether it is defective, for the rows of a history file that carry a label (from the label
    column alone)."""
    table = _open(Path(path)).read(columns=["unit_id", "label"])
    return {uid: bool(lab["defect"]) for uid, lab in zip(table.column("unit_id").to_pylist(),
                                                         table.column("label").to_pylist(), strict=True)
            if uid is not None and lab is not None and lab.get("defect") is not None}
