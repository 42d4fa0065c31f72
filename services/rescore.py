"""Re-scoring history: the stream's own scoring over Parquet history, decisions written as partitioned Parquet.

    inspection rescore --history 'archive/*.parquet' --store models/composite [--model VERSION] --out rescore/

History is what the stream's archive sink and ``inspection produce --archive`` write
(:mod:`inspection.data.history`): every reading exactly as it travelled on Kafka, with where it was read. Each
unit is decoded through the same validating codec and scored by :func:`services.scoring.score_units`, the
stream's scoring (batched preprocessing, one encode, every modality coalition), so a re-scored decision has the
stream's decision id (unit, model version and input coordinates) and its score up to floating-point
differences between batch compositions (see docs/rescore.md).

Output, under ``--out``::

    run.json                                  the run: history files, model and thresholds, counts, rejected rows
    decisions/model_version=V/line_id=L/day=YYYY-MM-DD/part-00000.parquet

Partitions are by line and by the unit's event day (UTC), in the hive layout that Parquet readers (pyarrow,
Spark, DuckDB, Ray) understand. A partition becomes visible only complete: it is written under
``model_version=V/_partial-<run>/`` (a prefix readers skip) and renamed into place when its last unit is
written, so an interrupted run leaves no partial partition, and a new run skips every partition already written
for that model version (resume). Memory is bounded: a few batches in flight and one row buffer per open
partition, whatever the history size.

Line adapters (:mod:`inspection.adapters`): the model's promoted adapter of each line scores that line's units
(unless the model was loaded with other adapters, e.g. none for ``--no-adapters``), as in the stream; their
decisions name ``V+<line>:<adapter version>`` and stay in the partitions of ``model_version=V``. ``run.json``
lists the adapter version each line used. A partition counts as done only when its decisions were made with the
adapter its line uses now (or with none when it uses none): otherwise it is scored again and replaced.

The local engine overlaps reading and decoding (a thread), scoring (the calling thread) and writing (a
thread) through bounded queues. The Ray engine (:func:`rescore_ray`) spreads the scoring over Ray Data actors
that each hold the model, one task per (file, row group), and writes through the same partition writer on the
driver, so both engines write the same partitions, rows and order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from inspection.data.history import ArchivedUnit, history_index, iter_history_rows
from inspection.errors import DataError, InspectionError, RecordError, StoreError
from inspection.records import MODALITIES, Decision
from inspection.store import ADAPTERS_DIR
from services.join import JoinedUnit
from services.scoring import ServingModel, batch_buckets, score_units

log = logging.getLogger(__name__)

RUN_SCHEMA = "inspection.rescore-run/1"
_INPUT = pa.struct([("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64())])
#: One row per decision. ``cloudevent`` is the decision exactly as the stream would send it (JSON).
DECISION_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("unit_id", pa.string()),
        ("line_id", pa.string()),
        ("event_time", pa.timestamp("us", tz="UTC")),
        ("decision", pa.string()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("defect_class", pa.string()),
        ("model_version", pa.string()),
        ("threshold_version", pa.string()),
        ("present", pa.list_(pa.string())),
        ("missing", pa.list_(pa.string())),
        ("inputs", pa.list_(_INPUT)),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("cloudevent", pa.string()),
    ],
    metadata={b"inspection.decisions.schema": b"1"},
)
_PARTIAL = "_partial-"


class RescoreError(InspectionError):
    """A re-scoring run that cannot start or finish (no history, a model it cannot load)."""


# ---------------------------------------------------------------------------------------------- inputs
def history_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """History files named by a path, a folder (its ``*.parquet``, recursively) or a glob; sorted.

    Raises:
        RescoreError: nothing matches.
    """
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    found: set[Path] = set()
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found |= {q for q in p.rglob("*.parquet")
                      if not any(part.startswith((".", "_")) for part in q.relative_to(p).parts)}
        elif p.is_file():
            found.add(p)
        else:
            found |= {Path(q) for q in glob.glob(str(s), recursive=True) if Path(q).is_file()}
    if not found:
        raise RescoreError(f"no history files match {spec!s}: give a Parquet file, a folder or a glob "
                           "(written by the stream's archive sink or `inspection produce --archive`)")
    return sorted(found)


def partition_key(line_id: str | None, event_time: datetime | None) -> tuple[str, str] | None:
    if line_id is None or event_time is None:
        return None
    return line_id, event_time.astimezone(UTC).date().isoformat()


def partition_dir(root: Path, model_version: str, key: tuple[str, str]) -> Path:
    return root / "decisions" / f"model_version={model_version}" / f"line_id={key[0]}" / f"day={key[1]}"


# --------------------------------------------------------------------------------------------- records
@dataclass
class Rejected:
    """A history row that produced no decision, or a reading the model's preprocessing rejected."""

    file: str
    row: int
    unit_id: str | None
    reason: str
    detail: str
    modality: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def decision_row(decision: Decision, source_file: str, source_row: int) -> dict:
    return {
        "decision_id": decision.id,
        "unit_id": decision.unit_id,
        "line_id": decision.line_id,
        "event_time": decision.event_time,
        "decision": decision.decision,
        "score": decision.score,
        "threshold": decision.threshold,
        "defect_class": decision.defect_class,
        "model_version": decision.model_version,
        "threshold_version": decision.threshold_version,
        "present": list(decision.present),
        "missing": list(decision.missing),
        "inputs": [{"topic": c.topic, "partition": c.partition, "offset": c.offset} for c in decision.inputs],
        "source_file": source_file,
        "source_row": source_row,
        "cloudevent": decision.to_json().decode(),
    }


def read_decisions(path: str | Path, *, model_version: str | None = None) -> Iterator[Decision]:
    """Decisions from a re-scoring output folder (or one of its Parquet files), optionally of one model version:
    base version ``V`` gives its decisions with and without line adapters (``V`` and ``V+<line>:<adapter>``).

    Raises:
        DataError: nothing readable there, or a file that is not a decisions file.
    """
    import pyarrow.dataset as ds

    root = Path(path)
    if not root.exists():
        raise DataError(f"{root} does not exist")
    target = root / "decisions" if (root / "decisions").is_dir() else root
    try:
        # the files carry model_version and line_id themselves: no partition inference from the folder names
        # (a numeric-looking line id would be inferred as a number there); names starting "_" or "." are skipped
        dataset = ds.dataset(target, format="parquet", partitioning=None)
        columns = ["cloudevent", "model_version"]
        table = dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{target} holds no readable decisions Parquet: {exc}") from exc
    for event, version in zip(table.column("cloudevent").to_pylist(), table.column("model_version").to_pylist(),
                              strict=True):
        if model_version is None or version == model_version or version.startswith(f"{model_version}+"):
            yield Decision.from_json(event.encode())


# ---------------------------------------------------------------------------------------------- writer
class _PartitionWriter:
    """Writes each partition under the run's partial folder and renames it into place once complete."""

    def __init__(self, root: Path, model_version: str, run_id: str, planned: Counter, row_group: int = 512) -> None:
        self.root, self.model_version = root, model_version
        self.partial = root / "decisions" / f"model_version={model_version}" / f"{_PARTIAL}{run_id}"
        self.planned = planned
        self.accounted: Counter = Counter()
        self.row_group = row_group
        self._buffers: dict[tuple[str, str], list[dict]] = {}
        self._writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        self.finished: list[tuple[str, str]] = []
        self.rows_written = 0

    def _tmp_dir(self, key: tuple[str, str]) -> Path:
        return self.partial / f"line_id={key[0]}" / f"day={key[1]}"

    def add(self, key: tuple[str, str], rows: list[dict], accounted: int) -> None:
        buffer = self._buffers.setdefault(key, [])
        buffer.extend(rows)
        if len(buffer) >= self.row_group:
            self._flush(key)
        self.accounted[key] += accounted
        if self.accounted[key] >= self.planned[key]:
            self._finish(key)

    def _flush(self, key: tuple[str, str]) -> None:
        rows = self._buffers.get(key) or []
        writer = self._writers.get(key)
        if writer is None:
            folder = self._tmp_dir(key)
            folder.mkdir(parents=True, exist_ok=True)
            writer = self._writers[key] = pq.ParquetWriter(folder / "part-00000.parquet", DECISION_SCHEMA,
                                                           compression="zstd")
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=DECISION_SCHEMA))
            self.rows_written += len(rows)
        self._buffers[key] = []

    def _finish(self, key: tuple[str, str]) -> None:
        self._flush(key)  # opens the file even for a partition without decisions: it is then done, and empty
        self._writers.pop(key).close()
        self._buffers.pop(key, None)
        final = partition_dir(self.root, self.model_version, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        stale = None
        if final.exists():  # written before with another adapter of its line (or without): replaced
            stale = self.partial / "_replaced" / f"line_id={key[0]}" / f"day={key[1]}"
            stale.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, stale)
        os.replace(self._tmp_dir(key), final)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        self.finished.append(key)

    def close(self, complete: bool) -> None:
        """Finish what is open (``complete``: the whole history was read) or drop it; remove the partial folder."""
        for key in list(self._writers) + [k for k in self._buffers if k not in self._writers]:
            if complete:
                self._finish(key)
            elif key in self._writers:
                self._writers.pop(key).close()
        shutil.rmtree(self.partial, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class RescoreResult:
    """What a run did (also written to ``run.json``)."""

    out: Path
    model_version: str
    threshold_version: str
    files: list[str]
    units_in_history: int = 0
    decided: int = 0
    skipped_done: int = 0
    partitions_written: int = 0
    partitions_skipped: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    rejected_readings: list[Rejected] = field(default_factory=list)
    seconds: float = 0.0
    engine: str = "local"
    unreadable_files: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    #: the wall clock at the start of the run, and seconds from it until the first batch began scoring (on a Ray
    #: cluster of several hosts this assumes their clocks agree)
    started_wall: float = 0.0
    scoring_started_s: float | None = None
    #: line -> the adapter version that scored its units (empty: the base scored every line)
    adapters: dict[str, str] = field(default_factory=dict)
    #: with ``rescore --compare``: the other side's model_version, threshold_version and adapters
    compare: dict | None = None

    @property
    def units_per_s(self) -> float:
        return self.decided / self.seconds if self.seconds > 0 else 0.0

    @property
    def units_per_s_scoring(self) -> float | None:
        """Throughput once scoring runs: the units decided over the time from the first batch's start to the end
        (start-up -- model loads, planning, a Ray cluster and its actors -- excluded)."""
        if self.scoring_started_s is None or self.seconds <= self.scoring_started_s:
            return None
        return self.decided / (self.seconds - self.scoring_started_s)

    def to_dict(self) -> dict:
        return {
            "schema": RUN_SCHEMA, "engine": self.engine, "config": self.config, "out": str(self.out),
            "model_version": self.model_version, "adapters": dict(self.adapters),
            "threshold_version": self.threshold_version, "history_files": self.files,
            "unreadable_files": self.unreadable_files,
            "units_in_history": self.units_in_history, "decided": self.decided, "skipped_done": self.skipped_done,
            "partitions_written": self.partitions_written, "partitions_skipped": self.partitions_skipped,
            "rejected_rows": len(self.rejected), "rejected_readings": len(self.rejected_readings),
            "rejected_by_reason": dict(Counter(r.reason for r in self.rejected + self.rejected_readings)),
            "rejected": [r.to_dict() for r in self.rejected[:1000]],
            "rejected_reading_list": [r.to_dict() for r in self.rejected_readings[:1000]],
            "seconds": round(self.seconds, 3), "units_per_s": round(self.units_per_s, 2),
            "seconds_to_scoring": None if self.scoring_started_s is None else round(self.scoring_started_s, 3),
            "units_per_s_scoring": (None if self.units_per_s_scoring is None
                                    else round(self.units_per_s_scoring, 2)),
            **({"compare": self.compare} if self.compare is not None else {}),
        }

    def side(self) -> dict:
        """What scored this run: ``model_version``, ``threshold_version`` and ``adapters`` (line -> version)."""
        return {"model_version": self.model_version, "threshold_version": self.threshold_version,
                "adapters": dict(self.adapters)}


def write_run(result: RescoreResult) -> Path:
    """(Re)write ``run.json`` of a run from its result; returns its path."""
    path = Path(result.out) / "run.json"
    _write_json(path, result.to_dict())
    return path


@dataclass
class _Item:
    file: str
    row: int
    key: tuple[str, str] | None
    unit_id: str | None
    archived: ArchivedUnit | None
    error: RecordError | None


def plan(files: Sequence[Path]) -> tuple[list[Path], list[list[tuple[str, str] | None]], Counter, list[Rejected]]:
    """The readable history files, each one's rows' partition keys, the rows per partition, and the files that
    are not readable history (corrupt, not Parquet, another schema) as rejections."""
    readable, keys, bad = [], [], []
    counts: Counter = Counter()
    for f in files:
        try:
            per_row = [partition_key(line, when) for line, when in history_index(f)]
        except DataError as exc:
            log.error("skipping %s: %s", f, exc)
            bad.append(Rejected(str(f), -1, None, "unreadable_file", str(exc)))
            continue
        except (pa.ArrowException, OSError) as exc:
            log.error("skipping %s: %s", f, exc)
            bad.append(Rejected(str(f), -1, None, "unreadable_file", f"{type(exc).__name__}: {exc}"))
            continue
        readable.append(f)
        keys.append(per_row)
        counts.update(k for k in per_row if k is not None)
    return readable, keys, counts, bad


def joined_from_archive(archived: ArchivedUnit, expected: Sequence[str]) -> JoinedUnit:
    """The unit as the stream's join would have released it (every reading present, expected ones missing).

    Raises:
        RecordError-like ValueError: a present reading without its input coordinate (the decision id needs it).
    """
    unit = archived.unit
    lacking = [m for m in unit.present if m not in archived.inputs]
    if lacking:
        raise ValueError(f"readings {lacking} have no input coordinates (topic, partition, offset)")
    missing = tuple(m for m in MODALITIES if m in expected and m not in unit.present)
    return JoinedUnit(unit, dict(archived.inputs), not missing, missing, "complete" if not missing else "timeout",
                      0.0)


def _written_with(folder: Path, model_version: str) -> bool:
    """Whether every decision of a finished partition names ``model_version`` (an empty one: yes)."""
    try:
        found = {v for f in folder.glob("*.parquet")
                 for v in pq.read_table(f, columns=["model_version"]).column("model_version").to_pylist()}
    except (pa.ArrowException, OSError):
        return False
    return found <= {model_version}


def _start_run(history: str | Path | Sequence[str | Path], out: str | Path, version: str, threshold_version: str,
               config: dict, adapters: dict[str, str] | None = None
               ) -> tuple[Path, list[Path], list, set, RescoreResult, _PartitionWriter]:
    """What both engines do first: plan the partitions from the history's header columns, find the ones this
    model version already has in ``out`` with the same adapter of their line (``adapters``: line -> version;
    skipped), remove what an interrupted run left half done, and open the run's result and partition writer.
    Returns (out folder, files, per-file row keys, finished keys, result, writer)."""
    from inspection.adapters import adapted_version

    adapters = dict(adapters or {})
    wall0 = time.time()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    files, keys, planned, unreadable = plan(history_files(history))
    done = set()
    for k in planned:
        folder = partition_dir(root, version, k)
        if folder.is_dir():
            used = adapted_version(version, k[0], adapters[k[0]]) if k[0] in adapters else version
            if _written_with(folder, used):
                done.add(k)
            else:
                log.info("partition %s was written with another adapter of line %s than %s: scoring it again",
                         folder, k[0], used)
    base = root / "decisions" / f"model_version={version}"
    if base.is_dir():
        for stale in base.glob(f"{_PARTIAL}*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
    result = RescoreResult(root, version, threshold_version, [str(f) for f in files], engine=config["engine"],
                           config=config, started_wall=wall0, adapters=adapters)
    result.rejected.extend(unreadable)
    result.unreadable_files = [r.file for r in unreadable]
    result.units_in_history = sum(len(k) for k in keys)
    result.partitions_skipped = len(done)
    writer = _PartitionWriter(root, version, uuid.uuid4().hex[:12],
                              Counter({k: n for k, n in planned.items() if k not in done}))
    return root, files, keys, done, result, writer


def rescore_local(history: str | Path | Sequence[str | Path], serving: ServingModel, out: str | Path, *,
                  batch_size: int = 64, expected: Sequence[str] = MODALITIES, prepare_workers: int = 0,
                  progress: bool = True, on_batch: Callable[[int], None] | None = None,
                  reporter: Any = None) -> RescoreResult:
    """Re-score history with the local engine (see the module docstring).

    Args:
        history: history files, a folder or a glob.
        serving: the model (:func:`services.scoring.load_serving_model`).
        out: the output folder (created); partitions already there for this model version are skipped.
        batch_size: units per scoring forward.
        expected: the modalities a unit should have (a decision lists the absent ones as missing, as the stream
            does with ``join.expected``).
        prepare_workers: threads for image decoding and resizing (0: min(8, cores)).
        progress: a progress bar with units/s on stderr.
        on_batch: called with the units decided so far after every batch (tests interrupt runs with it).
        reporter: a :class:`services.reports.StreamReporter`: level-2 explanation reports of the decisions it
            selects, written before the decision (which then links to its report), as the stream does.

    Returns:
        The run's :class:`RescoreResult` (also in ``out/run.json``).

    Raises:
        RescoreError: no history files, or reports asked of a normal-only model; DataError: a file that is not
            history (named).
    """
    if reporter is not None and serving.normal_only is not None:
        raise RescoreError(f"model {serving.version} is a normal-only model: its decisions carry their modality "
                           "attributions, but explanation reports explain a supervised model's fusion; re-score it "
                           "without --reports")
    t0 = time.monotonic()
    if serving.device.type == "cuda" and not serving.batch_sizes:  # a partition's last batch is a new size:
        serving = dataclasses.replace(serving, batch_sizes=batch_buckets(batch_size))  # pad, as the stream does
    config = {"engine": "local", "batch_size": batch_size, "expected": list(expected),
              "device": str(serving.device), "precision": serving.precision,
              "prepare_workers": prepare_workers or min(8, os.cpu_count() or 1),
              "explain_level": 2 if reporter is not None else 1,
              **({"reports": {"dir": str(reporter.dir), "units": reporter.units, "budget": reporter.budget,
                              "seed": reporter.seed}} if reporter is not None else {})}
    used = {line: a.version for line, a in serving.adapters.lines.items()} if serving.adapters is not None else {}
    root, files, keys, done, result, writer = _start_run(history, out, serving.version, serving.threshold_version,
                                                         config, used)

    batches: queue.Queue = queue.Queue(maxsize=4)
    writes: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            batch: list[_Item] = []
            for f, per_row in zip(files, keys, strict=True):
                for row, unit_id, item in iter_history_rows(f):
                    if stop.is_set():
                        return
                    key = per_row[row] if row < len(per_row) else None
                    if key in done:
                        result.skipped_done += 1
                        continue
                    err = item if isinstance(item, RecordError) else None
                    batch.append(_Item(str(f), row, key, unit_id, None if err else item, err))
                    if len(batch) >= batch_size:
                        batches.put(batch)
                        batch = []
            if batch:
                batches.put(batch)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the scoring thread
            failure.append(exc)
        finally:
            batches.put(None)

    def write() -> None:
        try:
            while (job := writes.get()) is not None:
                key, rows, accounted = job
                writer.add(key, rows, accounted)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)
            stop.set()
            while writes.get() is not None:  # keep the scorer from blocking on a full queue
                pass

    reader = threading.Thread(target=read, name="rescore-read", daemon=True)
    writer_thread = threading.Thread(target=write, name="rescore-write", daemon=True)
    reader.start()
    writer_thread.start()
    workers = prepare_workers or min(8, os.cpu_count() or 1)
    bar = _progress(result.units_in_history - result.skipped_done, progress)
    complete = False
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rescore-prepare") as pool:
            while (batch := batches.get()) is not None:
                if failure:
                    break
                _score_batch(serving, batch, expected, pool, result, writes, reporter)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(result.decided)
        complete = not failure and not stop.is_set()
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                batches.get(timeout=0.1)
        writes.put(None)
        writer_thread.join()
        bar.close()
        writer.close(complete)
    if failure:
        raise failure[0]
    result.partitions_written = len(writer.finished)
    result.seconds = time.monotonic() - t0
    _write_json(root / "run.json", result.to_dict())
    return result


@dataclass
class _Outcome:
    """What scoring a batch of history rows gave: decision rows per partition, rows accounted per partition (a
    partition is complete when all its planned rows are), rejections, decided count."""

    rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    accounted: Counter = field(default_factory=Counter)
    rejected: list[Rejected] = field(default_factory=list)
    rejected_readings: list[Rejected] = field(default_factory=list)
    decided: int = 0
    started_wall: float | None = None  # time.time() when scoring the batch began


def _score_items(serving: ServingModel, batch: list[_Item], expected: Sequence[str], pool,
                 reporter: Any = None) -> _Outcome:
    out = _Outcome(started_wall=time.time())
    good: list[tuple[_Item, JoinedUnit]] = []
    for item in batch:
        if item.error is not None:
            out.rejected.append(Rejected(item.file, item.row, item.unit_id, item.error.reason.value,
                                         item.error.detail))
        elif item.key is None:
            out.rejected.append(Rejected(item.file, item.row, item.unit_id, "no_partition",
                                         "the row has no line id or no readable event time"))
        else:
            try:
                good.append((item, joined_from_archive(item.archived, expected)))
                continue
            except ValueError as exc:
                out.rejected.append(Rejected(item.file, item.row, item.unit_id, "no_input_coordinates", str(exc)))
        if item.key is not None:
            out.accounted[item.key] += 1
    if good:
        scored = score_units(serving, [j for _, j in good], executor=pool).scored
        links = _reports(serving, reporter, good, scored) if reporter is not None else {}
        for (item, _), s in zip(good, scored, strict=True):
            for letter in s.dead:
                modality = next((m for m, c in item.archived.inputs.items() if c == letter.coordinate), None)
                out.rejected_readings.append(Rejected(item.file, item.row, item.unit_id, letter.reason,
                                                      letter.detail, modality))
            out.accounted[item.key] += 1
            if s.decision is None:
                out.rejected.append(Rejected(item.file, item.row, item.unit_id, "not_scored",
                                             "no reading of the unit could be scored"))
                continue
            decision = s.decision
            if decision.id in links:
                decision = dataclasses.replace(decision, report_url=links[decision.id])
            out.rows.setdefault(item.key, []).append(decision_row(decision, item.file, item.row))
            out.decided += 1
    return out


def _apply(outcome: _Outcome, result: RescoreResult, deliver: Callable[[tuple[str, str], list[dict], int], None]
           ) -> None:
    result.rejected.extend(outcome.rejected)
    result.rejected_readings.extend(outcome.rejected_readings)
    result.decided += outcome.decided
    if outcome.started_wall is not None:
        began = outcome.started_wall - result.started_wall
        result.scoring_started_s = began if result.scoring_started_s is None else min(result.scoring_started_s, began)
    for key, n in outcome.accounted.items():
        deliver(key, outcome.rows.get(key, []), n)


def _score_batch(serving: ServingModel, batch: list[_Item], expected: Sequence[str], pool, result: RescoreResult,
                 writes: queue.Queue, reporter: Any = None) -> None:
    _apply(_score_items(serving, batch, expected, pool, reporter), result,
           lambda key, rows, n: writes.put((key, rows, n)))


def _reports(serving: ServingModel, reporter: Any, good: list[tuple[_Item, JoinedUnit]], scored: list) -> dict:
    """Level-2 reports of the selected decisions of a batch (reusing the scoring pass's tokens); id -> link."""
    chosen = [(j, s) for (_, j), s in zip(good, scored, strict=True)
              if s.decision is not None and reporter.wanted(s.decision)]
    if not chosen:
        return {}
    pairs = []
    for j, s in chosen:
        dead = [m for m in j.unit.present if m not in s.decision.present]
        pairs.append((j.unit.without(*dead) if dead else j.unit, s.decision))
    with serving.autocast():
        return reporter.write(serving.model, pairs, [s for _, s in chosen], adapters=serving.adapters)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="unit", desc="rescore", file=sys.stderr, smoothing=0.1)


# ----------------------------------------------------------------------------------------------- audit
#: Gate weights of a routing path travel rounded to 4 decimals: a weight that floating-point rounding moves
#: across a half-way point rounds one unit (1e-4) the other way. Experts must be identical.
ROUTING_WEIGHT_TOLERANCE = 1e-4 + 1e-9


@dataclass
class AuditResult:
    """The outcome of :func:`audit`."""

    decision_id: str
    unit_id: str
    model_version: str
    history_file: str
    history_row: int
    recorded: Decision | None
    rescored: Decision
    tolerance: float

    @property
    def score_difference(self) -> float | None:
        return None if self.recorded is None else self.rescored.score - self.recorded.score

    @property
    def routing_matches(self) -> bool | None:
        """Whether the re-scored routing path is the recorded one: the same experts for every fusion query of
        every MoE layer, each gate weight within :data:`ROUTING_WEIGHT_TOLERANCE`. None when the recorded
        decision has no routing path (an older producer, or a model without a sparse MoE)."""
        r = self.recorded
        if r is None or r.routing is None:
            return None
        a, b = r.routing, self.rescored.routing
        if b is None or (a.n_experts, a.top_k, [x.layer for x in a.layers]) != \
                (b.n_experts, b.top_k, [x.layer for x in b.layers]):
            return False
        return all(x.experts == y.experts and all(abs(u - v) <= ROUTING_WEIGHT_TOLERANCE
                                                  for wx, wy in zip(x.weights, y.weights, strict=True)
                                                  for u, v in zip(wx, wy, strict=True))
                   for x, y in zip(a.layers, b.layers, strict=True))

    @property
    def matches(self) -> bool:
        r = self.recorded
        return r is not None and r.decision == self.rescored.decision and \
            r.model_version == self.rescored.model_version and \
            r.threshold_version == self.rescored.threshold_version and r.threshold == self.rescored.threshold and \
            abs(self.rescored.score - r.score) <= self.tolerance and self.routing_matches is not False

    def to_dict(self) -> dict:
        r = self.recorded
        base, line, adapter = _split_version(self.model_version, self.decision_id)
        return {
            "decision_id": self.decision_id, "unit_id": self.unit_id, "model_version": self.model_version,
            "base_version": base, "adapter": None if line is None else {"line": line, "version": adapter},
            "history": {"file": self.history_file, "row": self.history_row},
            "recorded": None if r is None else {"decision": r.decision, "score": r.score, "threshold": r.threshold,
                                                "threshold_version": r.threshold_version},
            "rescored": {"decision": self.rescored.decision, "score": self.rescored.score,
                         "model_version": self.rescored.model_version,
                         "threshold": self.rescored.threshold, "threshold_version": self.rescored.threshold_version},
            "score_difference": self.score_difference, "tolerance": self.tolerance,
            "routing_matches": self.routing_matches, "matches": self.matches,
        }


def recorded_decisions(path: str | Path) -> Iterator[Decision]:
    """Decisions from a re-scoring output (Parquet) or a file of decision CloudEvents, one JSON per line (as
    ``inspection consume --topic inspection.decisions`` prints them: its ``at`` field is ignored)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    event = json.loads(line)
                    event.pop("at", None)
                    yield Decision.from_json(json.dumps(event).encode())
                except (ValueError, InspectionError) as exc:
                    raise DataError(f"{path} line {n} is not a decision CloudEvent: {exc}") from exc
        return
    yield from read_decisions(path)


def audit(decision_id: str, history: str | Path | Sequence[str | Path], store_root: str | Path,
          decisions: str | Path | None = None, *, device: str = "cpu", tolerance: float = 1e-5,
          expected: Sequence[str] = MODALITIES) -> AuditResult:
    """Reproduce one decision: find its unit in history by the decision id (unit, model version and input
    coordinates), re-score it with that model version from the store, and compare it with the recorded decision
    (from ``decisions``: a re-scoring output folder or a JSON-lines file of decision CloudEvents).

    A decision made with a line adapter (model version ``V+<line>:<adapter version>``) is re-scored with base
    version V and exactly that adapter version, whichever adapter of the line is promoted now; a decision of the
    base alone is re-scored with no adapter, even where its line has one now. Without ``decisions`` every stored
    base version and every stored adapter version of the unit's line are tried for the id.

    Raises:
        RescoreError: no unit of the history and no version of the store give that id, the model version or the
            adapter version is missing from the store or fails its hash check (never scored with something else
            instead), or the recorded decision is not in ``decisions``.
    """
    from itertools import combinations

    import torch

    from inspection.adapters import adapted_version, list_adapters
    from inspection.records import decision_id as make_id
    from inspection.store import ModelStore
    from services.scoring import load_serving_model

    store = ModelStore(store_root, create=False)
    bases = [v.version for v in store.versions()]
    recorded = None
    by_line: dict[str, list[str]] = {}  # line -> the model versions its units' decisions may name
    if decisions is not None:
        recorded = next((d for d in recorded_decisions(decisions) if d.id == decision_id), None)
        if recorded is None:
            raise RescoreError(f"decision {decision_id} is not in {decisions}")
        base, line, adapter = _split_version(recorded.model_version, decision_id)
        if base not in bases:
            raise RescoreError(f"decision {decision_id} was made by model {base}, which the store "
                               f"{store.root} does not hold (it holds {bases})")
        if line is not None:
            _check_adapter(store, base, line, adapter, decision_id)
        versions: list[str] | None = [recorded.model_version]
    else:
        versions = None
        for e in list_adapters(store):
            if e.base_version in bases:
                by_line.setdefault(e.line, []).append(adapted_version(e.base_version, e.line, e.version.version))
    found = None
    for f in history_files(history):
        for row, _, item in iter_history_rows(f):
            if isinstance(item, RecordError) or (recorded is not None and item.unit.unit_id != recorded.unit_id):
                continue
            candidates = versions if versions is not None else bases + by_line.get(item.unit.line_id, [])
            present = [m for m in item.unit.present if m in item.inputs]
            for size in range(len(present), 0, -1):
                for used in combinations(present, size):
                    coords = tuple(item.inputs[m] for m in used)
                    for version in candidates:
                        if make_id(item.unit.unit_id, version, coords) == decision_id:
                            found = (f, row, item, version)
                            break
                    if found:
                        break
                if found:
                    break
            if found:
                break
        if found:
            break
    if found is None:
        raise RescoreError(f"no unit of the history with any model version of {store.root} gives decision id "
                           f"{decision_id}")
    f, row, item, version = found
    base, line, adapter = _split_version(version, decision_id)
    if line is not None and recorded is None:
        _check_adapter(store, base, line, adapter, decision_id)
    try:  # exactly the adapter the decision names, or none at all
        serving = load_serving_model(store, base, torch.device(device), adapters={line: adapter} if line else {})
    except StoreError as exc:
        if line is None:
            raise
        raise RescoreError(f"decision {decision_id} was made with adapter {adapter} of line {line!r} on model "
                           f"{base}, which cannot be loaded to reproduce it (it is not re-scored without it): "
                           f"{exc}") from exc
    scored = score_units(serving, [joined_from_archive(item, expected)]).scored[0]
    if scored.decision is None:
        raise RescoreError(f"unit {item.unit.unit_id} could not be scored again: "
                           f"{[d.detail for d in scored.dead]}")
    return AuditResult(decision_id, item.unit.unit_id, version, str(f), row, recorded, scored.decision, tolerance)


def _check_adapter(store, base: str, line: str, adapter: str, decision_id: str) -> None:
    """Refuse, in one line that says what to do, an adapter version a decision names that the store no longer
    holds or whose weights file does not have the SHA-256 its card records.

    Raises:
        RescoreError: either of those.
    """
    from inspection.adapters import list_adapters
    from inspection.store import state_dict_sha256

    made = f"decision {decision_id} was made with adapter {adapter} of line {line!r} on model {base}"
    folder = store.root / ADAPTERS_DIR / base / line
    held = {e.version.version: e.version for e in list_adapters(store, base, line)}
    if adapter not in held:
        raise RescoreError(f"{made}, which the store {store.root} no longer holds (line {line!r} of {base} has "
                           f"{sorted(held) or 'no adapter'}); restore adapter version {adapter} into {folder} to "
                           "reproduce this decision")
    entry = held[adapter]
    weights = entry.path / str(entry.card.get("weights_file", "weights.safetensors"))
    try:
        actual = state_dict_sha256(weights)
    except StoreError:
        actual = "unreadable"
    if actual != entry.sha256:
        raise RescoreError(f"{made}, whose weights file {weights} fails its SHA-256 check (expected "
                           f"{entry.sha256[:16]}..., found {actual[:16]}...): it changed after it was saved; restore "
                           f"adapter version {adapter} from a backup into {folder / adapter} to reproduce this "
                           "decision")


def _split_version(model_version: str, decision_id: str) -> tuple[str, str | None, str | None]:
    """:func:`inspection.adapters.split_model_version`, its error as a :class:`RescoreError` naming the decision."""
    from inspection.adapters import split_model_version

    try:
        return split_model_version(model_version)
    except StoreError as exc:
        raise RescoreError(f"decision {decision_id}: {exc}") from exc


# ------------------------------------------------------------------------------------------- ray engine
def _outcome_to_json(outcome: _Outcome) -> str:
    def row(r: dict) -> dict:
        return {**r, "event_time": r["event_time"].isoformat()}

    return json.dumps({
        "rows": [[list(k), [row(r) for r in rs]] for k, rs in outcome.rows.items()],
        "accounted": [[list(k), n] for k, n in outcome.accounted.items()],
        "rejected": [vars(r) for r in outcome.rejected],
        "rejected_readings": [vars(r) for r in outcome.rejected_readings],
        "decided": outcome.decided,
        "started_wall": outcome.started_wall,
    })


def _outcome_from_json(text: str) -> _Outcome:
    data = json.loads(text)
    out = _Outcome(decided=data["decided"], started_wall=data.get("started_wall"))
    for k, rs in data["rows"]:
        out.rows[tuple(k)] = [{**r, "event_time": datetime.fromisoformat(r["event_time"])} for r in rs]
    for k, n in data["accounted"]:
        out.accounted[tuple(k)] = n
    out.rejected = [Rejected(**r) for r in data["rejected"]]
    out.rejected_readings = [Rejected(**r) for r in data["rejected_readings"]]
    return out


class _RayScorer:
    """A Ray actor holding the model: scores the history rows of (file, row group) tasks."""

    def __init__(self, store_root: str, version: str, device: str, precision: str, expected: list[str],
                 threads: int, adapters: dict[str, str] | None = None) -> None:
        import torch

        from inspection.store import ModelStore
        from services.scoring import load_serving_model

        torch.set_num_threads(threads)
        self.serving = load_serving_model(ModelStore(store_root, create=False), version, torch.device(device),
                                          precision, adapters)
        self.expected = expected

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from inspection.data.history import iter_history_row_group

        outs = []
        for file, group, keys in zip(batch["file"], batch["group"], batch["keys"], strict=True):
            keys = json.loads(keys)
            items = []
            for row, unit_id, item in iter_history_row_group(file, int(group)):
                key = keys.get(str(row))
                if key == "done":
                    continue
                err = item if isinstance(item, RecordError) else None
                items.append(_Item(str(file), row, tuple(key) if key else None, unit_id, None if err else item, err))
            outs.append(_outcome_to_json(_score_items(self.serving, items, self.expected, None)))
        return {"outcome": np.array(outs, dtype=object)}


def rescore_ray(history: str | Path | Sequence[str | Path], store_root: str | Path, version: str, out: str | Path,
                *, address: str | None = None, workers: int = 2, device: str = "cpu", precision: str = "auto",
                expected: Sequence[str] = MODALITIES, threads_per_worker: int = 1,
                adapters: dict[str, str] | None = None) -> RescoreResult:
    """Re-score history on Ray Data: the same plan, scoring and partition writing as :func:`rescore_local`, with
    the scoring spread over a pool of ``workers`` actors that each hold the model (one GPU each on CUDA).

    ``adapters``: line -> the adapter version every actor loads for it (``{}``: none); None: the adapters promoted
    when the run starts (read once by the driver, so every actor scores with the same ones).

    The driver plans the partitions and turns every (file, row group) into a task; ``map_batches`` runs the
    tasks on the actor pool (in order, so the output is the local engine's); the driver streams the results into
    the same partition writer, which publishes a partition only once it is complete. ``address`` joins an
    existing cluster (``ray://`` or ``host:port``); without it a local one is started.
    """
    import pyarrow.parquet as pqm

    try:
        import ray
    except ImportError as exc:
        raise RescoreError("the ray engine needs Ray: pip install 'inspection[ray]' (or use --engine local)") from exc

    from inspection.adapters import promoted_adapters
    from inspection.store import ModelStore

    t0 = time.monotonic()
    family = ModelStore(store_root, create=False)
    card = family.get(version).card  # the actors load the model; the driver needs what decisions say about it
    if not card.get("threshold_version"):
        raise RescoreError(f"model {version} in {store_root} has no calibrated thresholds; calibrate it first")
    adapters = promoted_adapters(family, version) if adapters is None else dict(adapters)
    config = {"engine": "ray", "address": address, "workers": workers, "device": device, "precision": precision,
              "expected": list(expected), "threads_per_worker": threads_per_worker}
    root, files, keys, done, result, writer = _start_run(history, out, version, str(card["threshold_version"]),
                                                         config, adapters)
    tasks = []
    for f, per_row in zip(files, keys, strict=True):
        meta = pqm.ParquetFile(f).metadata
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            marks = {}
            for row in range(first, first + n):
                k = per_row[row] if row < len(per_row) else None
                if k in done:
                    marks[str(row)] = "done"
                    result.skipped_done += 1
                else:
                    marks[str(row)] = list(k) if k else None
            first += n
            tasks.append({"file": str(f), "group": g, "keys": json.dumps(marks)})
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(workers, 1)}))
        started = True
    complete = False
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        if tasks:
            ds = ray.data.from_items(tasks).map_batches(
                _RayScorer, batch_size=1, concurrency=workers,
                fn_constructor_args=(str(store_root), version, device, precision, list(expected), threads_per_worker,
                                     adapters),
                **({"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}))
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                for text in batch["outcome"]:
                    _apply(_outcome_from_json(text), result, writer.add)
        complete = True
    finally:
        writer.close(complete)
        if started:
            ray.shutdown()
    result.partitions_written = len(writer.finished)
    result.seconds = time.monotonic() - t0
    _write_json(root / "run.json", result.to_dict())
    return result
