"""``inspection demo``: what a plant's people need to see, end to end on one machine, from one command.

1. **Model.** The store's promoted calibrated model, or a model of the chosen preset trained on CPU first
   (:mod:`services.demo_model`: progress of every epoch, units/s, time left), and its single-modality baselines
   beside it, trained in the same first run and cached in the store.
2. **Stream.** The bundled Kafka-compatible broker on 127.0.0.1, the co-partitioned topics, and the stream service
   (in a thread of this process) with level-2 explanation reports of its defect decisions, the Parquet archive and
   the live operator page. The composite *test* units are published at ``rate`` units/s. A seeded share
   ``missing`` of them lack one modality (the service decides them with what is present once ``join.timeout_s``
   has passed), and ``malformed`` units each send a single malformed reading (cycling through a truncated PNG
   image, a temperature reading whose ``ce_time`` header is not a time, a vibration window with a NaN sample),
   which the codec rejects into ``inspection.dlq`` with its reason code; such a unit is never decided.
3. **Read back.** Every decision and dead letter; the decisions as Parquet (``decisions.parquet``, one row per
   decided unit, the re-scoring decision schema: ``source_file``/``source_row`` are the decision's
   ``topic[partition]`` and offset); the units as published, with where each reading went (``history.parquet``,
   Parquet history for ``inspection explain`` and ``inspection rescore``); the report index over the written
   reports (``reports/index.html``).
4. **Re-score.** The service's archive, with the local engine (:func:`services.rescore.rescore_local`) into
   ``rescore/``, compared decision by decision with the stream's.
5. **Summary.** Decisions; accuracy and F1 against the units' labels, beside the majority class of the training
   labels and the late fusion of the single-modality models on the same units; throughput; latency p50/p99;
   dead letters by reason; culprit pointing (the share of correctly flagged defects whose largest modality
   Shapley value is on a modality that carries the defect); where the index, the Parquet files and the page are.
   Said in words (stderr) and written as JSON to ``demo_summary.json`` (``inspection demo`` also prints the JSON
   on stdout).
6. ``keep_running`` leaves the broker, the service and its page up until Ctrl-C or SIGTERM.

Checks (each named in :data:`CHECKS`; the exit code is 1 when one fails): every produced unit was decided or
dead-lettered, and none twice; the dead letters are the injected readings with their reasons; every unit sent
without a modality was decided with it listed missing; every defect decision links to a report that exists and
the index lists every report; the re-scored decisions equal the stream's; the broker logged no panic.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from inspection.codec import WireMessage, encode_reading
from inspection.errors import BrokerError, ConfigError, InspectionError, Reason
from inspection.progress import Progress
from inspection.records import MODALITIES, Decision, Unit

log = logging.getLogger(__name__)

#: Seconds the service waits for a unit's missing reading before it decides with what is present.
JOIN_TIMEOUT_S = 5.0
#: Seconds after which the service's archive closes a file: re-scoring starts at most this long after the stream.
ARCHIVE_ROTATE_S = 3.0
#: Seconds without a new decision or dead letter, once everything is published, after which reading stops.
IDLE_TIMEOUT_S = 60.0
#: The malformed readings the demo injects, in order: (kind, modality, the reason the codec gives).
MALFORMED: tuple[tuple[str, str, str], ...] = (
    ("truncated_image", "vision", Reason.IMAGE_DECODE_FAILED.value),
    ("bad_time_header", "temperature", Reason.BAD_EVENT_TIME.value),
    ("non_finite_sample", "vibration", Reason.NON_FINITE.value),
)
#: The checks a run must pass for exit code 0.
CHECKS: tuple[str, ...] = ("every_unit_accounted_for", "dead_letters_are_the_injected_ones",
                           "missing_modalities_listed", "reports_linked", "rescore_matches_stream",
                           "broker_without_panic")
#: Where each output goes inside the output folder.
OUTPUTS = {"reports": "reports", "archive": "archive", "rescore": "rescore", "decisions": "decisions.parquet",
           "history": "history.parquet", "summary": "demo_summary.json", "model_runs": "demo-model"}


@dataclass(frozen=True)
class DemoOptions:
    """What ``inspection demo`` runs.

    Attributes:
        units: composite test units to produce.
        seed: composite data seed, and the seed of which units miss a modality or are malformed.
        rate: units per second to publish; 0 publishes as fast as the broker takes them.
        partitions: partitions of each input topic.
        out: output folder; the demo replaces its own outputs there (:data:`OUTPUTS`) and nothing else.
        store: model store; None: ``models/demo-<preset>``.
        preset: the recipe trained when the store has no calibrated model (:data:`services.demo_model.PRESETS`).
        missing: share of units sent without one (seeded) modality, in [0, 1).
        malformed: units that each send one malformed reading only (cycling through :data:`MALFORMED`); at most
            ``units - 1``, so at least one unit is decided.
        keep_running: keep the broker, the service and its page up after the summary until Ctrl-C or SIGTERM.
        page_port: port of the operator page, ``/metrics`` and the probes on 127.0.0.1; 0 picks a free one.
        progress: bars on a terminal, lines elsewhere (see :mod:`inspection.progress`); False is quiet.
        results: a folder to write ``demo.json`` in (``demo_synthetic.json`` without SKAB), the run's headline
            numbers as a benchmark result (:func:`write_demo_result`); None writes none.
    """

    units: int = 200
    seed: int = 0
    rate: float = 4.0
    partitions: int = 3
    out: Path = Path("runs/demo")
    store: Path | None = None
    preset: str = "standard"
    missing: float = 0.05
    malformed: int = 3
    keep_running: bool = False
    page_port: int = 0
    progress: bool = True
    results: Path | None = None

    def __post_init__(self) -> None:
        from services.demo_model import get_preset

        if self.units < 1:
            raise ConfigError(f"--units must be >= 1; got {self.units}")
        if not (np.isfinite(self.rate) and self.rate >= 0):
            raise ConfigError(f"--rate must be >= 0 units/s (0: as fast as possible); got {self.rate}")
        if self.partitions < 1:
            raise ConfigError(f"--partitions must be >= 1; got {self.partitions}")
        if not 0.0 <= self.missing < 1.0:
            raise ConfigError(f"--missing must be a share in [0, 1); got {self.missing}")
        if self.malformed < 0:
            raise ConfigError(f"--malformed must be >= 0; got {self.malformed}")
        if not 0 <= self.page_port <= 65535:
            raise ConfigError(f"--page-port must be in 0..65535; got {self.page_port}")
        get_preset(self.preset)
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "store", Path(self.store) if self.store is not None
                           else Path("models") / f"demo-{self.preset}")


@dataclass
class DemoResult:
    """What a run found: the summary (as written to ``demo_summary.json``) and the checks that failed."""

    summary: dict[str, Any]
    failed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every check passed, else 1."""
        return 1 if self.failed else 0


@dataclass(frozen=True)
class Plan:
    """Which units are sent whole, which without a modality, which as one malformed reading.

    Attributes:
        units: the composite test units, in publishing order.
        missing: unit id -> the modality it is sent without.
        malformed: unit id -> index into :data:`MALFORMED` of the one reading it sends.
    """

    units: list[Unit]
    missing: dict[str, str]
    malformed: dict[str, int]

    @property
    def decidable(self) -> list[Unit]:
        """The units the service should decide, as sent (without their missing modality)."""
        return [u.without(self.missing[u.unit_id]) if u.unit_id in self.missing else u
                for u in self.units if u.unit_id not in self.malformed]


def plan_units(units: Sequence[Unit], *, missing: float, malformed: int, seed: int) -> Plan:
    """Choose, seeded, ``round(missing * len(units))`` units to send without one modality and ``malformed`` other
    units (at most ``len(units) - 1``) to send as one malformed reading."""
    rng = np.random.default_rng([seed, 7_2026])
    n = len(units)
    order = rng.permutation(n)
    k = min(malformed, max(0, n - 1))
    n_missing = min(int(round(missing * n)), n - k)
    bad = {units[i].unit_id: j % len(MALFORMED) for j, i in enumerate(sorted(order[:k].tolist()))}
    lacking = {units[i].unit_id: MODALITIES[int(rng.integers(len(MODALITIES)))] for i in order[k:k + n_missing]}
    return Plan(list(units), lacking, bad)


def malformed_message(unit: Unit, kind: int) -> tuple[str, WireMessage]:
    """The malformed reading ``MALFORMED[kind]`` of a unit: ``(modality, message)``; built from the unit's real
    reading, then broken as a faulty sensor or gateway would break it."""
    name, modality, _ = MALFORMED[kind]
    msg = encode_reading(getattr(unit, modality))
    value, headers = msg.value, list(msg.headers)
    if name == "truncated_image":  # the connection dropped half-way through the upload
        value = value[: len(value) // 2]
    elif name == "bad_time_header":  # a gateway that writes its local clock text instead of RFC 3339
        headers = [(k, b"yesterday 14:03" if k == "ce_time" else v) for k, v in headers]
    else:  # one sample lost by the sensor's ADC, sent as NaN
        raw = bytearray(value)
        raw[4 * 17: 4 * 18] = struct.pack("<f", float("nan"))
        value = bytes(raw)
    return modality, WireMessage(msg.key, value, tuple(headers), msg.timestamp_ms)


# --------------------------------------------------------------------------------------------- the run
def run_demo(options: DemoOptions, *, stream: TextIO | None = None) -> DemoResult:
    """Run the demo (see the module docstring).

    Args:
        options: what to run.
        stream: where the words go (stderr when not given); the JSON summary is written to the output folder.

    Returns:
        The summary and the failed checks.

    Raises:
        ConfigError: invalid options or a store that cannot serve.
        BrokerError: the broker could not be started or reached.
        InspectionError: the stream service did not start.
    """
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from services.demo_model import ensure_preset_model, get_preset, load_baselines, preset_model_needed

    say = _Say(stream)
    progress = Progress(options.progress)
    out = options.out
    t_start = time.monotonic()
    _clear_outputs(out)
    builder = CompositeBuilder(CompositeConfig(seed=options.seed))
    preset = get_preset(options.preset)
    store = options.store
    if preset_model_needed(store, options.preset, seed=options.seed):
        say(f"no calibrated model of this recipe in {store}: training the {preset.name} demo model and its three "
            f"single-modality baselines on CPU ({preset.train_units} composite training units, {preset.epochs} "
            f"epoch{'' if preset.epochs == 1 else 's'}, {preset.image_size} px; once, then cached in the store)")
        say(f"model 1/4: the fusion model (all three modalities) -> {store}")
    version = ensure_preset_model(store, options.preset, seed=options.seed, run_dir=out / OUTPUTS["model_runs"],
                                  progress=progress, builder=builder)
    trained = {"n": 1}

    def training(modality: str) -> None:
        trained["n"] += 1
        say(f"model {trained['n']}/4: the {modality}-only baseline -> {store / 'baselines' / modality}")

    baselines = load_baselines(store, options.preset, seed=options.seed, run_dir=out / OUTPUTS["model_runs"],
                               progress=progress, builder=builder, on_train=training)
    model_s = time.monotonic() - t_start
    units = builder.units("test", options.units)
    plan = plan_units(units, missing=options.missing, malformed=options.malformed, seed=options.seed)
    temperature = ("real SKAB readings" if builder.temperature_source == "skab" else
                   "synthetic temperature: SKAB is not in ../shared/data/skab nor in $INSPECTION_SKAB_DIR")
    say(f"model {version.version} from {store} ({version.card.get('note') or 'no note'}); prepared in "
        f"{model_s:.0f} s")
    say(f"{len(units)} composite test units (real ELPV image + real bearing window + {temperature}); "
        f"{len(plan.missing)} sent without one modality, {len(plan.malformed)} as one malformed reading")
    trained_with = (version.card.get("data") or {}).get("temperature_source")
    if trained_with and trained_with != builder.temperature_source:
        say(f"note: the model was trained on {trained_with} temperature, these units carry "
            f"{builder.temperature_source} temperature (train afresh with another --store)")
    stream_part = _stream(options, plan, say, progress)
    try:
        rescored = _rescore(options, store, version.version, stream_part, say, progress)
        summary = _summarise(options, plan, stream_part, rescored, baselines, version, builder.temperature_source,
                             model_s, time.monotonic() - t_start)
        result = DemoResult(summary, [name for name in CHECKS if not summary["checks"][name]])
        summary["failed_checks"] = result.failed
        (out / OUTPUTS["summary"]).write_text(json.dumps(summary, indent=2))
        if options.results is not None:
            summary["result_file"] = str(write_demo_result(summary, options.results))
        _tell(summary, say, options.keep_running)
        if options.keep_running:
            hold(summary["operator_page"], say)
    finally:
        stream_part["stop"]()
    if stream_part["panicked"]() and "broker_without_panic" not in result.failed:
        summary["checks"]["broker_without_panic"] = False
        result.failed.append("broker_without_panic")
        (out / OUTPUTS["summary"]).write_text(json.dumps(summary, indent=2))
        say("FAILED: the broker log reports a panic")
    return result


class _Say:
    """Writes ``[demo] ...`` lines, flushed."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(f"[demo] {text}\n")
        stream.flush()


def _clear_outputs(out: Path) -> None:
    """Remove the outputs of an earlier run (only the demo's own, :data:`OUTPUTS`): re-scoring resumes and
    indexes see whatever is there."""
    out.mkdir(parents=True, exist_ok=True)
    for key in ("reports", "archive", "rescore", "decisions", "history", "summary"):
        path = out / OUTPUTS[key]
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _stream(options: DemoOptions, plan: Plan, say: Callable[[str], None], progress: Progress) -> dict[str, Any]:
    """Broker, topics, service, publish, read back. The broker and the service stay up: the returned ``stop``
    ends them, ``hold`` is the service (for :func:`hold`)."""
    from services.broker import EmbeddedBroker, TopicNames, create_topics
    from services.clients import make_consumer, wait_for_assignment
    from services.serve import StreamService
    from services.service_config import ServiceConfig

    out = options.out
    broker = EmbeddedBroker(log_path=out / "broker.log").start()
    service: StreamService | None = None
    server: threading.Thread | None = None
    failure: list[BaseException] = []

    def stop() -> None:
        if service is not None:
            service.stop()
        if server is not None:
            server.join(120)
        broker.stop()

    try:
        topics = TopicNames()
        create_topics(broker.bootstrap, topics, partitions=options.partitions)
        say(f"broker {broker.bootstrap} (log {broker.log_path}), topics {', '.join(topics.all)}")
        config = ServiceConfig.from_mapping({
            "model": {"store": str(options.store), "device": "cpu", "reload_interval_s": 0},
            # event times are 10 s apart: a replay of history, far faster than its event time advances
            "join": {"timeout_s": JOIN_TIMEOUT_S, "watermark_lag_s": 600.0},
            "metrics": {"port": options.page_port},
            "kafka": {"group_id": f"demo-serve-{uuid.uuid4().hex[:8]}", "commit_interval_ms": 500},
            "archive": {"path": str(out / OUTPUTS["archive"]), "rotate_units": 1000, "rotate_s": ARCHIVE_ROTATE_S},
            "reports": {"dir": str(out / OUTPUTS["reports"]), "units": "defects", "level": 2},
            "run_dir": str(out),
        })
        service = StreamService(config, broker.bootstrap, instance_id="demo")

        def serve() -> None:
            try:
                service.run()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failure.append(exc)

        server = threading.Thread(target=serve, name="serve", daemon=True)
        server.start()
        reader = _Reader(make_consumer([topics.decisions, topics.dlq], broker.bootstrap,
                                       f"demo-read-{uuid.uuid4().hex[:8]}"), topics.dlq)
        try:
            wait_for_assignment(reader.consumer, timeout_s=60)
            deadline = time.monotonic() + 180
            while not service.wait_ready(0.5):
                if failure or time.monotonic() > deadline:
                    raise InspectionError("the stream service did not start: "
                                          f"{failure[0] if failure else 'not ready within 180 s'}")
            page = service.summary()["operator_page"]
            say(f"stream service ready; live operator page on {page} (metrics on "
                f"http://127.0.0.1:{service.metrics_port}/metrics)")
            reader.start()
            sent = _publish(broker.bootstrap, topics, plan, options.rate, progress, reader)
            expected_decided = len(plan.units) - len(plan.malformed)
            bar = progress.stage("decisions", expected_decided)
            shown = 0
            last_change, last_count = time.monotonic(), -1
            while True:
                decided, letters = reader.counts()
                if decided > shown:
                    bar.update(min(decided, expected_decided) - shown)
                    shown = min(decided, expected_decided)
                if decided + letters != last_count:
                    last_change, last_count = time.monotonic(), decided + letters
                if decided >= expected_decided and letters >= len(plan.malformed):
                    time.sleep(1.0)  # anything beyond what was expected (a duplicate) would arrive now
                    break
                if time.monotonic() - last_change > IDLE_TIMEOUT_S or failure:
                    break
                time.sleep(0.2)
            bar.close(f"decisions {shown}/{expected_decided} read back")
            decisions, letters = reader.stop()
        except BaseException:
            reader.stop()
            raise
        if failure:
            raise failure[0]
        archived = _wait_for_archive(out / OUTPUTS["archive"], len({d.unit_id for d, _ in decisions}))
    except BaseException:
        stop()
        raise
    return {"plan": plan, "sent": sent, "decisions": decisions, "letters": letters, "archived": archived,
            "service": service.summary(), "operator_page": service.summary()["operator_page"],
            "bootstrap": broker.bootstrap, "stop": stop, "panicked": broker.panicked}


class _Reader:
    """Reads decisions and dead letters in a thread while units are published."""

    def __init__(self, consumer, dlq_topic: str) -> None:
        self.consumer = consumer
        self._dlq_topic = dlq_topic
        self._decisions: list[tuple[Decision, str]] = []
        self._letters: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="demo-read", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        """Distinct units decided so far and dead letters so far."""
        with self._lock:
            return len({d.unit_id for d, _ in self._decisions}), len(self._letters)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for records in self.consumer.poll(timeout_ms=200).values():
                    for r in records:
                        self._take(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self._failure.append(exc)

    def _take(self, record) -> None:
        if record.topic == self._dlq_topic:
            headers = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}
            letter = {"unit_id": (record.key or b"").decode("utf-8", "replace"), "reason": headers.get("dlq_reason"),
                      "stage": headers.get("dlq_stage"), "topic": headers.get("dlq_topic"),
                      "detail": headers.get("dlq_detail")}
            with self._lock:
                self._letters.append(letter)
        else:
            decision = Decision.from_json(record.value)
            with self._lock:
                self._decisions.append((decision, f"{record.topic}[{record.partition}]@{record.offset}"))

    def stop(self) -> tuple[list[tuple[Decision, str]], list[dict[str, Any]]]:
        """Stop reading; every decision (with where it was read) and dead letter read.

        Raises:
            BrokerError: reading failed.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.consumer.close(autocommit=False)
        if self._failure:
            raise BrokerError(f"reading decisions back failed: {self._failure[0]}") from self._failure[0]
        with self._lock:
            return list(self._decisions), list(self._letters)


def _publish(bootstrap: str, topics, plan: Plan, rate: float, progress: Progress, reader: _Reader) -> dict[str, Any]:
    """Publish the plan: whole units and units without a modality through the project's publisher, each malformed
    reading right after the unit that precedes it. Returns what was sent and when."""
    from services.clients import delivery_confirmed, make_producer
    from services.publish import publish_units

    after: dict[str | None, list[Unit]] = {}
    previous: str | None = None
    for u in plan.units:
        if u.unit_id in plan.malformed:
            after.setdefault(previous, []).append(u)
        else:
            previous = u.unit_id
    producer = make_producer(bootstrap)
    futures = []
    bar = progress.stage("produce", len(plan.units))

    def send_malformed(unit_id: str | None) -> None:
        for u in after.get(unit_id, ()):
            modality, msg = malformed_message(u, plan.malformed[u.unit_id])
            futures.append(producer.send(topics.for_modality(modality), key=msg.key, value=msg.value,
                                         headers=list(msg.headers), timestamp_ms=msg.timestamp_ms))
            bar.update(1)

    def on_unit(unit: Unit) -> None:
        decided, letters = reader.counts()
        bar.update(1, decided=decided, dead_letters=letters)
        send_malformed(unit.unit_id)

    started = datetime.now(UTC)
    try:
        send_malformed(None)
        report = publish_units(producer, plan.decidable, topics, rate=rate, on_unit=on_unit)
        producer.flush(timeout=30)
        for fut in futures:
            if not delivery_confirmed(fut.get(timeout=30)):
                raise BrokerError("a malformed reading was acknowledged without an offset")
    finally:
        producer.close(timeout=10)
    bar.close(f"produce {len(plan.units)} units in {report.seconds:.1f} s")
    return {"units": len(plan.units), "messages": dict(report.sent), "malformed_messages": len(futures),
            "seconds": report.seconds, "started": started, "coordinates": report.coordinates}


def _wait_for_archive(folder: Path, decided: int, timeout_s: float = 10 * ARCHIVE_ROTATE_S + 30) -> int:
    """Wait until the service's archive holds ``decided`` units (its files close ``ARCHIVE_ROTATE_S`` after their
    first unit); returns the units it holds."""
    from inspection.data.history import count_history

    deadline = time.monotonic() + timeout_s
    while True:
        held = sum(count_history(p) for p in sorted(folder.glob("*.parquet")))
        if held >= decided or time.monotonic() > deadline:
            return held
        time.sleep(0.25)


def _rescore(options: DemoOptions, store: Path, version: str, stream_part: dict, say: Callable[[str], None],
             progress: Progress) -> dict[str, Any]:
    """Write the published units as history and the stream's decisions as Parquet, index the reports, re-score
    the service's archive locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from explain.report import read_reports, report_files, write_index
    from inspection.data.history import ArchivedUnit, write_history
    from inspection.store import ModelStore
    from services.rescore import DECISION_SCHEMA, decision_row, read_decisions, rescore_local
    from services.scoring import load_serving_model, resolve_device

    out = options.out
    coordinates = stream_part["sent"]["coordinates"]
    write_history(out / OUTPUTS["history"], [ArchivedUnit(u, {m: coordinates[(u.unit_id, m)] for m in u.present})
                                             for u in stream_part["plan"].decidable])
    rows, seen = [], set()
    for decision, where in stream_part["decisions"]:
        if decision.unit_id in seen:
            continue
        seen.add(decision.unit_id)
        topic_part, offset = where.rsplit("@", 1)
        rows.append(decision_row(decision, topic_part, int(offset)))
    decisions_path = out / OUTPUTS["decisions"]
    pq.write_table(pa.Table.from_pylist(rows, schema=DECISION_SCHEMA), decisions_path, compression="zstd")
    reports_dir = out / OUTPUTS["reports"]
    index = None
    reports = []
    if any(reports_dir.glob("*.json")):
        reports = read_reports(report_files(reports_dir))
        index, _ = write_index(reports_dir, reports)
    t0 = time.monotonic()
    serving = load_serving_model(ModelStore(store), version, resolve_device("cpu"), "fp32")
    result = rescore_local(out / OUTPUTS["archive"], serving, out / OUTPUTS["rescore"],
                           progress=progress.mode == "bar")
    rescored = {d.unit_id: d for d in read_decisions(out / OUTPUTS["rescore"])}
    say(f"re-scored {result.decided} archived units locally in {time.monotonic() - t0:.1f} s "
        f"({result.units_per_s:.1f} units/s) into {out / OUTPUTS['rescore']}")
    return {"rescored": rescored, "result": result.to_dict(), "decisions_path": decisions_path, "index": index,
            "reports": reports}


# -------------------------------------------------------------------------------------------- summary
def _scores(said: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    tp, fp = int((said & truth).sum()), int((said & ~truth).sum())
    fn, tn = int((~said & truth).sum()), int((~said & ~truth).sum())
    n = len(truth)
    return {"accuracy": (tp + tn) / n if n else 0.0,
            "f1": tp / (tp + 0.5 * (fp + fn)) if tp + fp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _summarise(options: DemoOptions, plan: Plan, stream_part: dict, rescored: dict, baselines, version,
               temperature_source: str, model_s: float, total_s: float) -> dict[str, Any]:
    out = options.out
    decisions: dict[str, Decision] = {}
    duplicates = 0
    for d, _ in stream_part["decisions"]:
        if d.unit_id in decisions:
            duplicates += 1
        decisions.setdefault(d.unit_id, d)
    letters = stream_part["letters"]
    sent = {u.unit_id: u for u in plan.decidable}
    decided = [u for u in sent.values() if u.unit_id in decisions]
    n = len(plan.units)

    # quality against the labels, and the baselines on the same units (as sent)
    truth = np.array([u.label.defect for u in decided], bool)
    said = np.array([decisions[u.unit_id].decision == "defect" for u in decided], bool)
    late = baselines.late_fusion(decided) if decided else np.zeros(0, bool)
    quality = {
        "units": len(decided), "defects": int(truth.sum()),
        "fused": _scores(said, truth),
        "majority": {**_scores(baselines.majority(len(decided)), truth),
                     "class": "defect" if baselines.majority_defect else "ok",
                     "rule": f"the majority class of the {baselines.train_units} training labels "
                             f"({baselines.train_defect_share:.1%} defects), for every unit"},
        "late_fusion": {**_scores(late, truth), "threshold": baselines.late_threshold,
                        "models": baselines.versions,
                        "rule": "defect when the largest margin of a present modality's single-modality score "
                                "over its own threshold (logits) reaches a threshold chosen for maximum F1 on "
                                f"{baselines.val_units} validation units"},
    }
    flagged = [u for u in decided if u.label.defect and decisions[u.unit_id].decision == "defect"]
    pointed = sum(1 for u in flagged if _top_modality(decisions[u.unit_id]) in u.label.culprits)

    # timing
    latency = np.array([decisions[u.unit_id].latency_ms for u in decided]) if decided else np.zeros(1)
    complete = np.array([decisions[u.unit_id].latency_ms for u in decided if u.unit_id not in plan.missing])
    last = max((d.decided_at for d in decisions.values()), default=stream_part["sent"]["started"])
    span = max(1e-9, (last - stream_part["sent"]["started"]).total_seconds())

    # checks
    expected_letters = Counter({u.unit_id: 1 for u in plan.units if u.unit_id in plan.malformed})
    got_letters = Counter(letter["unit_id"] for letter in letters)
    reasons_expected = Counter(MALFORMED[k][2] for k in plan.malformed.values())
    reasons = Counter(letter["reason"] for letter in letters)
    missing_ok = all(decisions[u].missing == (plan.missing[u],) for u in plan.missing if u in decisions) \
        and all(u in decisions for u in plan.missing)
    defect_decisions = [d for d in decisions.values() if d.decision == "defect"]
    linked = [d for d in defect_decisions if d.report_url and _url_file(d.report_url).is_file()]
    reports = rescored["reports"]
    index = rescored["index"]
    index_ok = (not reports and index is None) or (
        index is not None and index.read_text(encoding="utf-8").count("<tr data-line=") == len(reports)
        and all(p.with_suffix(".html").is_file() for p, _ in reports))
    again = rescored["rescored"]
    matching = [u for u, d in decisions.items() if u in again and again[u].id == d.id
                and again[u].decision == d.decision]
    differences = [abs(again[u].score - d.score) for u, d in decisions.items() if u in again]
    checks = {
        "every_unit_accounted_for": (set(decisions) == set(sent) and got_letters == expected_letters
                                     and len(decisions) + sum(got_letters.values()) == n and duplicates == 0),
        "dead_letters_are_the_injected_ones": reasons == reasons_expected,
        "missing_modalities_listed": missing_ok,
        "reports_linked": len(linked) == len(defect_decisions) and index_ok,
        "rescore_matches_stream": len(matching) == len(decisions) == len(again),
        "broker_without_panic": not stream_part["panicked"](),
    }
    service = stream_part["service"]
    return {
        "units": {"produced": n, "decided": len(decisions), "dead_lettered": sum(got_letters.values()),
                  "sent_without_a_modality": len(plan.missing), "sent_malformed": len(plan.malformed),
                  "duplicate_decisions": duplicates},
        "messages_sent": stream_part["sent"]["messages"] | {"malformed": stream_part["sent"]["malformed_messages"]},
        "decision_counts": dict(Counter(d.decision for d in decisions.values())),
        "missing_modalities": {"sent_without": dict(Counter(plan.missing.values())),
                               "decided_with_it_listed_missing": sum(
                                   1 for u, m in plan.missing.items() if u in decisions
                                   and decisions[u].missing == (m,))},
        "dlq": {"by_reason": dict(reasons), "injected": dict(reasons_expected),
                "letters": letters},
        "quality": quality,
        "culprit_pointing": {"defects_found": len(flagged), "top_modality_is_a_culprit": pointed,
                             "share": pointed / len(flagged) if flagged else None},
        "throughput": {"units_per_s": len(decisions) / span, "seconds": span, "rate_asked": options.rate,
                       "from": "the first unit published to the last decision sent"},
        "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                       "p99_complete_units": float(np.percentile(complete, 99)) if complete.size else None,
                       "note": f"units sent without a modality wait join.timeout_s = {JOIN_TIMEOUT_S:g} s for it"},
        "rescore": {"out": str(out / OUTPUTS["rescore"]), "decided": len(again), "matching": len(matching),
                    "max_score_difference": max(differences, default=0.0), "run": rescored["result"]},
        "reports": {"dir": str(out / OUTPUTS["reports"]), "index": str(index) if index else None,
                    "written": len(reports), "defect_decisions_linked": len(linked),
                    "defect_decisions": len(defect_decisions)},
        "decisions_parquet": str(rescored["decisions_path"]), "history": str(out / OUTPUTS["history"]),
        "archive": str(out / OUTPUTS["archive"]), "archived_units": stream_part["archived"],
        "operator_page": stream_part["operator_page"],
        "temperature_source": temperature_source,
        "model": {"store": str(options.store), "version": version.version, "preset": version.card.get("preset"),
                  "note": version.card.get("note"), "prepare_s": round(model_s, 1),
                  "trained_with_temperature": (version.card.get("data") or {}).get("temperature_source")},
        "service": service,
        "broker": stream_part["bootstrap"],
        "checks": checks,
        "total_s": round(total_s, 1),
    }


def demo_result(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a run's summary, flat, as a benchmark result's summary holds them: the fused
    model's accuracy and F1 on the decided units and the baselines' on the same units, culprit pointing,
    throughput, latency and the time to prepare the model and to run everything."""
    q = summary["quality"]
    return {
        "units": summary["units"]["produced"], "decided": summary["units"]["decided"],
        "defects": q["defects"], "rate_asked": summary["throughput"]["rate_asked"],
        "accuracy": q["fused"]["accuracy"], "f1": q["fused"]["f1"],
        "late_fusion_accuracy": q["late_fusion"]["accuracy"], "late_fusion_f1": q["late_fusion"]["f1"],
        "majority_accuracy": q["majority"]["accuracy"], "majority_f1": q["majority"]["f1"],
        "culprit_share": summary["culprit_pointing"]["share"],
        "units_per_s": summary["throughput"]["units_per_s"],
        "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
        "dead_lettered": summary["units"]["dead_lettered"],
        "model": summary["model"]["version"], "preset": summary["model"]["preset"],
        "prepare_s": summary["model"]["prepare_s"], "total_s": summary["total_s"],
        "temperature_source": summary["temperature_source"], "failed_checks": summary["failed_checks"],
    }


def write_demo_result(summary: dict[str, Any], results_dir: Path | str) -> Path:
    """Write ``<results_dir>/demo.json`` (``demo_synthetic.json`` for a run on synthetic temperature):
    :func:`demo_result` with machine, commit, command and date, and the summary's quality, timing and check
    sections as details."""
    from inspection.evaluation import write_result

    details = {k: summary[k] for k in ("quality", "culprit_pointing", "throughput", "latency_ms", "model",
                                       "checks")}
    name = "demo" if summary["temperature_source"] == "skab" else "demo_synthetic"
    return write_result(name, demo_result(summary), details, results_dir)


def _top_modality(decision: Decision) -> str | None:
    phi = dict(decision.attributions.get("modality") or {})
    return max(phi.items(), key=lambda kv: kv[1])[0] if phi else None


def _url_file(url: str) -> Path:
    return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))


def _tell(s: dict[str, Any], say: Callable[[str], None], keep_running: bool) -> None:
    """The summary in words."""
    u, q = s["units"], s["quality"]
    f, m, late = q["fused"], q["majority"], q["late_fusion"]
    say("---------------------------------------------------------------- summary")
    rate = s["throughput"]["rate_asked"]
    pace = f"at {rate:g} units/s" if rate else "as fast as the broker took them"
    say(f"{u['produced']} units produced {pace} "
        f"({u['sent_without_a_modality']} without one modality, {u['sent_malformed']} as one malformed reading); "
        f"{s['missing_modalities']['decided_with_it_listed_missing']} of the former were decided with it listed "
        "missing")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s["decision_counts"].items()))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dlq"]["by_reason"].items())) or "none"
    say(f"{u['decided']} decided by the stream service ({counts}); {u['dead_lettered']} dead-lettered "
        f"(by reason: {reasons})")
    say(f"against the units' labels ({q['units']} units, {q['defects']} defective): the fused model: accuracy "
        f"{f['accuracy']:.3f}, F1 {f['f1']:.3f}; the majority class ('{m['class']}' for every unit): accuracy "
        f"{m['accuracy']:.3f}, F1 {m['f1']:.3f}; late fusion of the three single-modality models: accuracy "
        f"{late['accuracy']:.3f}, F1 {late['f1']:.3f}")
    c = s["culprit_pointing"]
    if c["defects_found"]:
        say(f"culprit pointing: {c['top_modality_is_a_culprit']} of {c['defects_found']} correctly flagged defects "
            f"({c['share']:.0%}) have their largest modality attribution on the modality that carries the defect")
    t, lat = s["throughput"], s["latency_ms"]
    say(f"throughput {t['units_per_s']:.2f} units/s over {t['seconds']:.1f} s (first unit published to last "
        f"decision); latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms ({lat['note']})")
    r = s["rescore"]
    say(f"re-scoring the archive ({s['archived_units']} units) locally: {r['matching']} of {u['decided']} decisions "
        f"equal the stream's (largest score difference {r['max_score_difference']:.1e})")
    say("temperature: " + ("real SKAB readings (Temperature, Thermocouple)" if s["temperature_source"] == "skab"
                           else "synthetic temperature (SKAB is not in ../shared/data/skab nor in "
                                "$INSPECTION_SKAB_DIR): the thermal simulator's readings"))
    rep = s["reports"]
    say(f"report index: {rep['index'] or 'none (no defect decisions)'} ({rep['written']} level-2 reports)")
    say(f"decisions Parquet: {s['decisions_parquet']}; re-scored decisions: {r['out']}/decisions; summary: "
        f"{Path(s['reports']['dir']).parent / OUTPUTS['summary']}")
    say(f"operator page: {s['operator_page']}" + ("" if keep_running else
                                                   " (it ends with the demo; --keep-running keeps it up)"))
    failed = s["failed_checks"]
    say("OK: every check passed" if not failed else f"FAILED checks: {', '.join(failed)}")


def hold(url: str | None, say: Callable[[str], None]) -> None:
    """Block until Ctrl-C or SIGTERM while the service keeps serving its operator page at ``url``."""
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    say(f"the broker, the stream service and the live operator page stay up: {url} (each defect links to its "
        "explanation report); Ctrl-C ends the demo")
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["CHECKS", "MALFORMED", "DemoOptions", "DemoResult", "Plan", "demo_result", "hold", "malformed_message",
           "plan_units", "run_demo", "write_demo_result"]
