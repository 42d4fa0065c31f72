"""``inspection serve``: the stream service: consume readings, join units, score, explain, decide.

Pipeline (STYLE 12: every stage has an error policy; offsets are committed in one method, after the sinks)::

    consumer (group over the 3 co-partitioned input topics, range assignor)
      -> align   per partition number, readings in event-time order (services.align)
      -> decode  CloudEvents binary codec; a rejection   -> DLQ stage=deserialize, reason = codec reason
      -> join    UnitJoiner keyed by unit_id;  late / line mismatch / modality the model does not read
                                                          -> DLQ stage=join
      -> queue   closed units wait for a micro-batch (max_batch, max_delay_ms); a full queue pauses
                 the input partitions (backpressure)
      -> score   scorer thread: one encode + one stacked fuse per batch (decision + exact modality Shapley
                 values and interactions); preprocessing failures -> DLQ stage=score
      -> sinks   decisions topic (CloudEvent JSON, deterministic id), DLQ, optional Parquet archive
      -> commit  per input partition, the lowest offset still needed by the join, the queue, an unacked
                 decision or dead letter, or an unwritten archive file (at-least-once)

Threads: the main thread owns the consumer, the join and the offset bookkeeping; the scorer thread owns the
model (hot reload happens between its batches); producer acknowledgements, archive writes and rebalance
notifications come back to the main thread through queues. Nothing but the queues is shared.

Rebalances (eager, range assignor): every revocation resets the join, the buffers and the queue, and each
partition kept is rewound to its lowest offset still needed, so units are never half-joined across owners:
whatever was not settled is read again, and its decision, if it had been sent, is sent again with the same
id (same unit, model version and input coordinates).

Shutdown on SIGTERM (:meth:`StreamService.stop`): stop reading, score what is queued, wait for every
acknowledgement (at most ``shutdown_timeout_s``), write the archive, commit, close. Units still waiting in
the join are left uncommitted for the next owner unless ``join.flush_on_shutdown`` is set.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError

from inspection.codec import decode_reading
from inspection.data.history import ArchivedUnit
from inspection.errors import BrokerError, ConfigError, InspectionError, Reason, RecordError
from inspection.records import InputCoordinate
from inspection.store import ModelStore
from services import dlq as dlqmod
from services.align import EventTimeAligner, OffsetTracker
from services.clients import (
    UndecodableBatch,
    delivery_confirmed,
    make_consumer,
    make_producer,
    undecodable_batch,
    validate_bootstrap,
)
from services.drift import DriftMonitor
from services.join import JoinedUnit, LateReading, UnitJoiner
from services.metrics import Heartbeat, OpsServer, ServiceMetrics
from services.operator_page import DecisionWindow, OperatorPage, OpsAuth, ReportFolder, resolve_token
from services.scoring import (
    ServingModel,
    batch_buckets,
    load_serving_model,
    resolve_device,
    score_units,
    tune_batch_size,
    warm_up,
    with_latency,
)
from services.service_config import ServiceConfig

log = logging.getLogger(__name__)

#: Content type of the decision records (structured-mode CloudEvents).
DECISION_CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
#: Dead-letter warnings logged per reason per minute; the rest go to debug (counts are in the metrics).
_DLQ_LOG_PER_MINUTE = 20
_POLL_MS = 50
_RETRY_MAX_S = 5.0
#: Longest wait between two polls while polling keeps failing (it starts at a tenth of a second and doubles).
_POLL_BACKOFF_MAX_S = 2.0
#: Longest a commit (and the final commit and close at shutdown) may block the main loop, in ms.
_COMMIT_TIMEOUT_MS = 5_000
_LIVENESS_S = 60.0
#: Seconds between full garbage collections of the main loop (see :meth:`StreamService._collect_garbage`).
_GC_INTERVAL_S = 10.0
#: Seconds between two refreshes of the ``consumer_lag`` gauges (see :meth:`StreamService._update_lag`).
_LAG_INTERVAL_S = 5.0


@dataclass
class WorkItem:
    """A closed unit on its way through scoring and the sinks (times from ``time.monotonic``)."""

    joined: JoinedUnit
    first_arrival: float
    last_arrival: float
    closed_at: float
    generation: int


@dataclass
class Outgoing:
    """One record for the decisions topic or the DLQ, with what its acknowledgement settles."""

    kind: str  # "decision" or "dlq"
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    coordinates: tuple[InputCoordinate, ...]
    generation: int
    labels: tuple[str, ...]
    item: WorkItem | None = None
    attempts: int = 0
    sent_at: float = 0.0
    score: float = math.nan  # a decision's score, for the per-line histogram


#: Services of this process that froze the heap (several run side by side in one process in tests and embeddings).
_frozen_by = 0
_frozen_lock = threading.Lock()


def _freeze_heap() -> None:
    """Collect, then move every object alive now out of the collector's generations (``gc.freeze``)."""
    global _frozen_by
    with _frozen_lock:
        gc.collect()
        gc.freeze()
        _frozen_by += 1


def _thaw_heap() -> None:
    """Give the frozen objects back to the collector once the last service of the process that froze it stops,
    so that one stopping service never makes the others' periodic collections walk the whole heap."""
    global _frozen_by
    with _frozen_lock:
        _frozen_by -= 1
        if _frozen_by == 0:
            gc.unfreeze()


class _Listener(ConsumerRebalanceListener):
    """Forwards rebalance notifications to the main thread (the consumer may call it from its IO thread)."""

    def __init__(self, events: queue.SimpleQueue) -> None:
        self.events = events

    def on_partitions_revoked(self, revoked) -> None:
        self.events.put(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        self.events.put(("assigned", set(assigned)))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and the record's coordinate if any."""

    FIELDS = ("coordinate", "unit_id", "stage", "reason", "decision_id")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.FIELDS:
            if hasattr(record, key):
                out[key] = str(getattr(record, key))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    """Switch every root handler to ``json`` lines, or leave the text format."""
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())


class _RateLimitedLog:
    """At most ``per_minute`` warnings per key per minute; the rest at debug level."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._window: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        start, count = self._window.get(key, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        self._window[key] = (start, count + 1)
        return count < self.per_minute


@dataclass
class ServiceStats:
    """Counters of one run (also in the metrics), for the CLI summary and tests."""

    records: int = 0
    readings: int = 0
    decisions_sent: int = 0
    decisions_acked: int = 0
    dead_letters_acked: int = 0
    late: int = 0
    retries: int = 0
    commits: int = 0
    rebalances: int = 0
    reloads: int = 0
    batches: int = 0
    pauses: int = 0
    max_queue_depth: int = 0
    gc_collections: int = 0
    gc_collected: int = 0
    poll_errors: int = 0
    undecodable_batches: int = 0
    out_of_bounds: int = 0
    model_versions: list[str] = field(default_factory=list)


class StreamService:
    """The stream service: one member of the consumer group.

    Args:
        config: the validated service configuration.
        bootstrap: ``host:port[,host:port]`` of the Kafka cluster.
        instance_id: names this instance in client ids, logs and archive files; default ``<host>-<pid>``.

    Raises:
        ConfigError: an invalid bootstrap list.
    """

    def __init__(self, config: ServiceConfig, bootstrap: str, *, instance_id: str | None = None) -> None:
        if not isinstance(config, ServiceConfig):
            raise ConfigError(f"config must be a ServiceConfig; got {type(config).__name__}")
        self.config = config
        self.bootstrap = validate_bootstrap(bootstrap)
        self.topics = config.topics.names()
        self.instance = instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        self.stats = ServiceStats()
        self._limits = config.limits.codec_limits()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._heartbeat = Heartbeat(_LIVENESS_S)
        self._dlq_log = _RateLimitedLog(_DLQ_LOG_PER_MINUTE)
        # main-thread state
        self._joiner = UnitJoiner(config.join.join_config())
        self._aligner = EventTimeAligner(self.topics.inputs, config.join.align_idle_ms / 1000.0,
                                        config.join.watermark_lag_s * 1000.0,
                                        max_future_ms=config.join.max_future_skew_s * 1000.0)
        self._tracker = OffsetTracker()
        self._arrivals: dict[str, tuple[float, float]] = {}
        self._assignment: set[TopicPartition] = set()
        # the rebalance the next assignment completes is already counted (at its revocation; or it is the join)
        self._rebalance_counted = True
        self._resume: dict[tuple[str, int], int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._retries: list[tuple[float, int, Outgoing]] = []
        self._retry_seq = itertools.count()
        self._paused_total = 0.0
        self._paused_since: float | None = None
        self._seen_duplicates = 0
        self._poll_failing_since: float | None = None
        self._poll_failures = 0
        # shared through queues / the condition
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._rebalance_events: queue.SimpleQueue = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._queue: deque[WorkItem] = deque()
        self._scoring = 0
        self._draining = False
        self._scorer_stop = False
        self._inflight = 0  # records sent and not yet acknowledged (under self._cv)
        # built in run()
        self._serving: ServingModel | None = None
        self._store: ModelStore | None = None
        self._device = None
        self._consumer = None
        self._producer = None
        self._ops: OpsServer | None = None
        self._recent: DecisionWindow | None = None  # the operator page's recent decisions (fed in _acked)
        self._archive = None
        self._scorer: threading.Thread | None = None
        self._batch_limit = config.batching.max_batch
        self._prepare_pool: ThreadPoolExecutor | None = None
        self._drift = DriftMonitor(config.drift.window, config.drift.alpha) if config.drift.enabled else None
        self._next_reload = 0.0
        self._next_gc = 0.0
        self._next_lag = 0.0
        self._heap_frozen = False
        self._failed_version: str | None = None
        self._failed_adapters: dict[str, str] | None = None  # line -> adapter version a reload refused
        self._sinks = 1 + (1 if config.archive.path else 0)
        self._reporter = None
        if config.reports.enabled:
            from services.reports import StreamReporter

            r = config.reports
            self._reporter = StreamReporter(r.dir, units=r.units, level=r.level, budget=r.budget, seed=r.seed,
                                            base_url=r.base_url)

    # ------------------------------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask for a graceful shutdown (safe from signal handlers and other threads)."""
        self._stop.set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the model is loaded and the group assigned partitions (or the timeout passes)."""
        return self._ready.wait(timeout_s)

    @property
    def metrics_port(self) -> int | None:
        return self._ops.port if self._ops is not None else None

    @property
    def model_version(self) -> str | None:
        return self._serving.version if self._serving is not None else None

    def queue_depth(self) -> int:
        """Units closed and not yet settled: queued, being scored, or with a decision or dead letter in flight."""
        with self._cv:
            return len(self._queue) + self._scoring + self._inflight

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> ServiceStats:
        """Serve until :meth:`stop`; returns the run's counters.

        Raises:
            ConfigError: the model does not read every expected modality, or invalid client settings.
            StoreError / NotCalibratedError: no usable model in the store.
            BrokerError: the cluster cannot be reached at start.
        """
        try:
            self._setup()
            self._loop()
        finally:
            self._shutdown()
        return self.stats

    def _setup(self) -> None:
        cfg = self.config
        # first: a non-loopback endpoint without its token refuses to start before anything is loaded
        token = resolve_token(cfg.metrics.host, cfg.metrics.token_env) if cfg.metrics.enabled else None
        import torch

        if cfg.model.threads is not None:
            torch.set_num_threads(cfg.model.threads)
        self._device = resolve_device(cfg.model.device)
        self._store = ModelStore(cfg.model.store)
        workers = cfg.model.resolved_prepare_workers()
        if workers > 1:
            self._prepare_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
        self._serving = self._load_model(cfg.model.version)
        self._next_reload = time.monotonic() + cfg.model.reload_interval_s
        security = cfg.security.client_settings()
        self._producer = make_producer(self.bootstrap, client_id=f"inspection-serve-{self.instance}",
                                       reconnect_backoff_max_ms=2_000,
                                       **{**cfg.kafka.producer, **security})
        consumer_overrides = {
            "client_id": f"inspection-serve-{self.instance}",
            "partition_assignment_strategy": (RangePartitionAssignor,),
            "max_poll_records": cfg.kafka.max_poll_records,
            "reconnect_backoff_max_ms": 2_000,
            **cfg.kafka.consumer,
            **security,
        }
        self._consumer = make_consumer([], self.bootstrap, cfg.kafka.group_id, **consumer_overrides)
        try:
            self._consumer.subscribe(list(self.topics.inputs), listener=_Listener(self._rebalance_events))
        except KafkaError as exc:
            raise BrokerError(f"cannot subscribe to {list(self.topics.inputs)}: {exc}") from exc
        if cfg.archive.path:
            from services.archive import ArchiveSink

            self._archive = ArchiveSink(cfg.archive.path, self.instance, cfg.archive.rotate_units,
                                        cfg.archive.rotate_s, self._archived).start()
        self.metrics.watch(lambda: self._heartbeat.age_s, lambda: self._readiness()[0])
        if cfg.metrics.enabled:
            auth = OpsAuth(token) if token else None
            self._ops = OpsServer(self.metrics, cfg.metrics.host, cfg.metrics.port, self._heartbeat.check,
                                  self._readiness, page=self._operator_page(auth), auth=auth).start()
        self._scorer = threading.Thread(target=self._score_loop, name="scorer", daemon=True)
        self._scorer.start()
        self._write_resolved_config()
        # Everything built so far (torch, the model, the clients: several hundred thousand objects) lives as long
        # as the process: take it out of the collector's generations, so the periodic full collection walks only
        # what serving creates (milliseconds instead of a pass over the whole heap).
        _freeze_heap()
        self._heap_frozen = True
        self._next_gc = time.monotonic() + _GC_INTERVAL_S
        log.info("serving %s from %s as %s in group %s (model %s on %s, expected %s)",
                 list(self.topics.inputs), self.bootstrap, self.instance, cfg.kafka.group_id,
                 self._serving.version, self._device, list(cfg.join.expected))

    def _load_model(self, version: str | None) -> ServingModel:
        serving = load_serving_model(self._store, version, self._device, self.config.model.precision)
        lacking = [m for m in self.config.join.expected if m not in serving.modalities]
        if lacking:
            raise ConfigError(f"join.expected names {lacking}, which model {serving.version} does not read "
                              f"(it reads {list(serving.modalities)})")
        if self._reporter is not None and serving.normal_only is not None:
            raise ConfigError(f"model {serving.version} is a normal-only model: its decisions carry their modality "
                              "attributions, but explanation reports explain a supervised model's fusion; serve it "
                              "with reports off (reports.dir: null or reports.units: none)")
        if self._reporter is not None and self._reporter.level == 2:
            from explain.api import minimum_budget

            least = minimum_budget(serving.model)
            if self._reporter.budget < least:
                raise ConfigError(f"reports.budget is {self._reporter.budget}, but level-2 explanations of model "
                                  f"{serving.version} need at least {least} model evaluations per unit")
        warm = self.config.model.warm_up
        warmed = bool(warm or (warm is None and self._device.type == "cuda"))
        batching = self.config.batching
        tune = bool(batching.tune or (batching.tune is None and warmed))
        pad = bool(batching.pad or (batching.pad is None and warmed))
        if warmed and not tune:  # tuning runs every batch size of batch_buckets(max_batch): it warms them up too
            sizes = batch_buckets(batching.max_batch) if pad else {batching.max_batch, 1}
            seconds = warm_up(serving, sorted(sizes, reverse=True))
            log.info("model %s warmed up on %s in %.1f s", serving.version, self._device, seconds)
        if tune:
            size, rates = tune_batch_size(serving, batching.max_batch)
            log.info("model %s: batches of at most %d units (units/s by batch size: %s)", serving.version, size,
                     ", ".join(f"{n}: {r:.0f}" for n, r in rates.items()))
        else:
            size = batching.max_batch
        if pad:  # every forward at a size the warm-up (or tuning) already ran
            serving = replace(serving, batch_sizes=batch_buckets(size))
        self._batch_limit = size
        self.metrics.batch_limit.set(size)
        self.metrics.set_model(serving.version, serving.threshold_version)
        self.stats.model_versions.append(serving.version)
        return serving

    def _write_resolved_config(self) -> None:
        if not self.config.run_dir:
            return
        run_dir = Path(self.config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {
            "config": self.config.resolved(),
            "bootstrap": self.bootstrap,
            "instance": self.instance,
            "topics": dict(zip(("vision", "vibration", "temperature", "decisions", "dlq"), self.topics.all,
                               strict=True)),
            "model_version": self._serving.version,
            "threshold_version": self._serving.threshold_version,
            "device": str(self._device),
            "started": datetime.now(UTC).isoformat(),
        }
        (run_dir / f"service-{self.instance}.resolved.json").write_text(json.dumps(resolved, indent=2))

    def _operator_page(self, auth: OpsAuth | None) -> OperatorPage | None:
        """The live operator page (``operator_page``) over a new window of recent decisions, or None."""
        cfg = self.config
        if not cfg.operator_page.enabled:
            return None
        reports = ReportFolder(cfg.reports.dir) if cfg.reports.dir else None
        self._recent = DecisionWindow(cfg.operator_page.window, report_link=reports.link if reports else None)
        return OperatorPage(self._recent, self._page_status, reports=reports, refresh_s=cfg.operator_page.refresh_s,
                            auth=auth)

    def _page_status(self) -> dict[str, Any]:
        """The operator page's header (called from HTTP threads): model and threshold versions, queue depth,
        the latest drift test per modality (None before one ran), readiness."""
        serving = self._serving
        drift: dict[str, dict[str, Any]] = {m: {"p_value": None, "drift": None} for m in self.config.join.expected}
        for gauge, key in ((self.metrics.drift_p, "p_value"), (self.metrics.drift_flag, "drift")):
            for sample in gauge.collect()[0].samples:
                value = sample.value if key == "p_value" else sample.value >= 1.0
                drift.setdefault(sample.labels["modality"], {"p_value": None, "drift": None})[key] = value
        ready, detail = self._readiness()
        return {"instance": self.instance, "model_version": serving.version if serving else None,
                "threshold_version": serving.threshold_version if serving else None,
                "queue_depth": self.queue_depth(), "drift": drift, "ready": ready, "ready_detail": detail}

    def _readiness(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "shutting down"
        if self._serving is None:
            return False, "no model loaded"
        if not self._assignment:
            return False, "no partitions assigned yet"
        silent = self._coordinator_silence_s()
        if silent is not None:
            return False, (f"input not consumed: no heartbeat reached the group coordinator for {silent:.0f} s "
                           "(is the cluster reachable?)")
        failing = self._poll_failing_since
        if failing is not None:
            return False, (f"input not consumed: polling has failed {self._poll_failures} times in a row for "
                           f"{time.monotonic() - failing:.1f} s")
        return True, f"ok: model {self._serving.version}, {len(self._assignment)} partitions"

    def _coordinator_silence_s(self) -> float | None:
        """Seconds since this member last sent a heartbeat to its group coordinator, when that is more than twice
        the session timeout (the broker has long since given its partitions away, or cannot be reached); else
        None. Read from the client's own ``last-heartbeat-seconds-ago`` metric."""
        consumer = self._consumer
        if consumer is None:
            return None
        try:
            groups = consumer.metrics() or {}
            session_s = consumer.config["session_timeout_ms"] / 1000.0
        except Exception:  # noqa: BLE001 - a probe must answer, whatever the client's state
            return None
        for values in groups.values():
            ago = values.get("last-heartbeat-seconds-ago") if isinstance(values, dict) else None
            if isinstance(ago, int | float) and math.isfinite(ago) and ago > 2 * session_s:
                return float(ago)
        return None

    # ---------------------------------------------------------------------------------------- main loop
    def _loop(self) -> None:
        cfg = self.config
        commit_every = cfg.kafka.commit_interval_ms / 1000.0
        next_commit = time.monotonic() + commit_every
        while not self._stop.is_set():
            self._heartbeat.beat()
            polled = {}
            if self._input_open():
                polled = self._poll(cfg.kafka.max_poll_records)
            else:
                self._keep_membership()
                with self._cv:  # wait for the scorer to make room (or for the alignment to move on)
                    self._cv.wait(timeout=_POLL_MS / 1000.0)
            rewound = self._handle_rebalances()
            for tp, records in polled.items():
                if tp in rewound:
                    continue  # fetched before the rewind: they will be fetched again
                for record in records:
                    self._aligner.add(record)
                    self.stats.records += 1
            if self._paused_since is None:
                # each released reading closes at most one unit: never release more than the queue has room for
                room = max(1, cfg.batching.max_queue - self.queue_depth())
                released = list(self._aligner.release(self._join_now(), self._owned, limit=room))
                for record, decoded in zip(released, self._decode_records(released), strict=True):
                    self._handle_record(record, decoded)
                for joined in self._joiner.poll(self._join_now()):
                    self._enqueue(joined)
            self._drain_events()
            self._resend_due()
            if time.monotonic() >= next_commit:
                self._commit()
                next_commit = time.monotonic() + commit_every
            if time.monotonic() >= self._next_gc:
                self._collect_garbage()
            self._update_gauges()

    def _poll(self, max_records: int) -> dict:
        """One poll of the input topics. No error escapes: a batch the client cannot decode is queued to be
        skipped and dead-lettered (:meth:`_skip_batch`); anything else is logged, counted and retried after a
        backoff that :meth:`stop` cuts short, and makes ``/readyz`` fail until a poll succeeds again."""
        try:
            polled = self._consumer.poll(timeout_ms=_POLL_MS, max_records=max_records)
        except Exception as exc:  # noqa: BLE001 - nothing the client raises may stop the service
            batch = undecodable_batch(exc, self._consumer)
            if batch is not None and TopicPartition(batch.topic, batch.partition) in self._assignment:
                self._skip_batch(batch)
                return {}
            self._poll_failures += 1
            self.stats.poll_errors += 1
            self.metrics.poll_errors.labels(type(exc).__name__).inc()
            if self._poll_failing_since is None:
                self._poll_failing_since = time.monotonic()
            delay = min(_POLL_BACKOFF_MAX_S, 0.1 * 2 ** min(self._poll_failures - 1, 5))
            level = logging.WARNING if self._dlq_log.allow("poll") else logging.DEBUG
            log.log(level, "polling the input topics failed %d times in a row (%s: %s); retrying in %.1f s",
                    self._poll_failures, type(exc).__name__, exc, delay)
            self._stop.wait(delay)
            return {}
        self._poll_failures = 0
        self._poll_failing_since = None
        return polled

    def _skip_batch(self, batch: UndecodableBatch) -> None:
        """Move the consumer past an undecodable batch now; queue its dead letter behind the records before it."""
        tp = TopicPartition(batch.topic, batch.partition)
        log.error("cannot decode the record batch at %s[%d]@%d..%d (codec %s): %s; skipping it", batch.topic,
                  batch.partition, batch.first_offset, batch.last_offset, batch.codec, batch.error,
                  extra={"coordinate": f"{batch.topic}[{batch.partition}]@{batch.first_offset}", "stage": "fetch",
                         "reason": dlqmod.UNDECODABLE_BATCH})
        try:
            self._consumer.seek(tp, batch.next_offset)
        except (ValueError, KafkaError) as exc:  # revoked meanwhile: its next owner meets the batch itself
            log.warning("cannot seek %s[%d] past the undecodable batch: %s", batch.topic, batch.partition, exc)
            return
        self.stats.undecodable_batches += 1
        self.metrics.undecodable_batches.inc()
        self._aligner.add(batch)  # settled behind the records before it (see _settle_skipped)

    def _settle_skipped(self, b: UndecodableBatch) -> None:
        """The records before a skipped batch went through: dead-letter its marker and count it processed."""
        self._tracker.processed(b.topic, b.partition, b.last_offset)
        letter = dlqmod.batch_marker(topic=b.topic, partition=b.partition, first_offset=b.first_offset,
                                     last_offset=b.last_offset, codec=b.codec,
                                     detail=f"the record batch at offsets {b.first_offset}..{b.last_offset} "
                                            f"(codec {b.codec}) could not be decoded: {b.error}")
        self._send_dead_letter(letter, self._tracker.hold([letter.coordinate]))

    def _collect_garbage(self) -> None:
        """One full collection of cyclic garbage, every ``_GC_INTERVAL_S`` seconds.

        kafka-python leaves a reference cycle behind each time ``poll()`` waits for a fetch and times out (the
        ``KafkaTimeoutError`` traceback holds the waiting frames, which hold the in-flight fetch futures and, once
        they complete, the fetch responses with their record bytes: tens to hundreds of KB each). At a steady
        input rate most polls time out. CPython runs a full collection only once the objects promoted since the
        last one reach a quarter of all long-lived objects; with torch loaded that takes so long that the cycles
        reaching the oldest generation pin megabytes per minute. Collecting on a fixed schedule bounds that
        garbage to what ``_GC_INTERVAL_S`` seconds of polling create.
        """
        self.stats.gc_collected += gc.collect()
        self.stats.gc_collections += 1
        self._next_gc = time.monotonic() + _GC_INTERVAL_S

    def _join_now(self) -> float:
        """Processing time for the join: monotonic seconds minus the time the input was paused."""
        paused = self._paused_total + (time.monotonic() - self._paused_since if self._paused_since else 0.0)
        return time.monotonic() - paused

    def _owned(self, topic: str, partition: int) -> bool:
        return TopicPartition(topic, partition) in self._assignment

    def _input_open(self) -> bool:
        """Backpressure: whether to poll for more input now.

        Input stops while the queue is full (and resumes at half, hysteresis), and while the alignment buffers
        hold more than ``join.buffer_records`` per owned input partition and are not waiting for a topic that
        fell behind (then only more input can unblock them; the wait is bounded by ``join.align_idle_ms``).

        The service stops taking input instead of pausing partitions: kafka-python 3.0's fetcher can leave
        paused-then-resumed partitions parked and never fetch them again (measured against the embedded
        broker). The group protocol only advances inside ``poll()``, so while input is stopped
        :meth:`_keep_membership` still polls and puts back what it read.
        """
        if not self._assignment:
            return True
        cfg = self.config
        depth = self.queue_depth()
        self.stats.max_queue_depth = max(self.stats.max_queue_depth, depth)
        if self._paused_since is None and depth >= cfg.batching.max_queue:
            self._paused_since = time.monotonic()
            self.stats.pauses += 1
            log.info("queue full (%d units): input paused", depth)
        elif self._paused_since is not None and depth <= cfg.batching.max_queue // 2:
            self._paused_total += time.monotonic() - self._paused_since
            self._paused_since = None
            log.info("queue drained (%d units): input resumed", depth)
        buffered = len(self._aligner)
        aligned_full = buffered >= cfg.join.buffer_records * len(self._assignment) and not self._aligner.waiting
        paused = self._paused_since is not None or aligned_full
        self.metrics.input_paused.set(1 if paused else 0)
        return not paused

    def _keep_membership(self) -> None:
        """Poll while input is stopped, so that a rebalance of the group (a member joining or leaving) completes
        instead of waiting for this member: read at most one record and seek its partition back to it."""
        try:
            polled = self._consumer.poll(timeout_ms=0, max_records=1)
        except Exception as exc:  # noqa: BLE001 - as in _poll
            batch = undecodable_batch(exc, self._consumer)
            if batch is not None and TopicPartition(batch.topic, batch.partition) in self._assignment:
                self._skip_batch(batch)
            else:
                log.warning("polling the input topics failed (%s: %s); retrying", type(exc).__name__, exc)
            return
        for tp, records in polled.items():
            if not records:
                continue
            try:
                self._consumer.seek(tp, records[0].offset)
            except (AssertionError, ValueError, KafkaError) as exc:  # revoked meanwhile: its next owner reads it
                log.debug("not putting back %s[%d]@%d: %s", tp.topic, tp.partition, records[0].offset, exc)

    # -------------------------------------------------------------------------------------- rebalances
    def _handle_rebalances(self) -> set[TopicPartition]:
        """Apply revocations and assignments reported by the listener; returns the partitions rewound."""
        rewound: set[TopicPartition] = set()
        while True:
            try:
                kind, partitions = self._rebalance_events.get_nowait()
            except queue.Empty:
                break
            if kind == "revoked":
                self._revoke(partitions)
            else:
                rewound |= self._assign(partitions)
        return rewound

    def _revoke(self, partitions: set[TopicPartition]) -> None:
        if not partitions and not self._assignment:
            return  # the first join of the group: nothing was owned
        safe = self._tracker.safe_offsets(self._joiner.held_offsets())
        resume = dict(safe)
        for key, buffered in self._aligner.first_offsets().items():
            resume[key] = min(resume.get(key, buffered), buffered)
        self._resume.update(resume)
        dropped = self._joiner.pending
        with self._cv:
            dropped += len(self._queue)
            self._queue.clear()
        self._joiner = UnitJoiner(self.config.join.join_config())
        self._arrivals.clear()
        self._aligner.discard()
        self._tracker.reset()
        self._committed.clear()
        self._retries.clear()
        self._assignment = set()
        self._ready.clear()
        self.metrics.ready.set(0)
        self._count_rebalance()
        self._rebalance_counted = True
        log.info("partitions revoked (%d); %d units not yet settled will be read again from %s", len(partitions),
                 dropped, {f"{t}[{p}]": o for (t, p), o in sorted(resume.items())})

    def _count_rebalance(self) -> None:
        self.stats.rebalances += 1
        self.metrics.rebalances.inc()

    def _assign(self, partitions: set[TopicPartition]) -> set[TopicPartition]:
        rewound = set()
        for tp in partitions:
            offset = self._resume.get((tp.topic, tp.partition))
            if offset is not None:
                try:
                    self._consumer.seek(tp, offset)
                except (ValueError, KafkaError) as exc:
                    log.warning("cannot rewind %s[%d] to %d: %s", tp.topic, tp.partition, offset, exc)
                    continue
                rewound.add(tp)
        self._resume.clear()
        self._assignment = set(self._consumer.assignment())
        # a rebalance is counted at its revocation, as soon as the member hears of it; one whose revocation was
        # skipped (the member owned nothing, e.g. after the group went on without it) is counted here
        if not self._rebalance_counted:
            self._count_rebalance()
        self._rebalance_counted = False
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in self._assignment))
        if self._assignment:
            self._ready.set()
            self.metrics.ready.set(1)
        return rewound

    # ------------------------------------------------------------------------------------------ records
    def _decode_one(self, record: Any) -> tuple[Any, tuple[str, str] | None, float]:
        """(reading, None, seconds) or (None, (reason, detail), seconds); markers of skipped batches pass."""
        if isinstance(record, UndecodableBatch):
            return None, None, 0.0
        t0 = time.perf_counter()
        try:
            reading = decode_reading(record.value, record.headers, key=record.key, require_key=True,
                                     expected_modality=self.topics.modality_of(record.topic), limits=self._limits)
        except RecordError as exc:
            return None, (exc.reason.value, exc.detail), time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - malformed input must never stop the service
            return None, (dlqmod.DECODE_FAILED, f"{type(exc).__name__}: {exc}"), time.perf_counter() - t0
        return reading, None, time.perf_counter() - t0

    def _decode_records(self, records: list[Any]) -> list[tuple[Any, tuple[str, str] | None, float]]:
        """Decode released records, side by side on the preparation pool when there is one (image decoding
        and decompression release the GIL); the results come back in record order."""
        if self._prepare_pool is not None and len(records) > 1:
            return list(self._prepare_pool.map(self._decode_one, records))
        return [self._decode_one(r) for r in records]

    def _handle_record(self, record: Any, decoded: tuple[Any, tuple[str, str] | None, float]) -> None:
        if isinstance(record, UndecodableBatch):
            self._settle_skipped(record)
            return
        coordinate = InputCoordinate(record.topic, record.partition, record.offset)
        self._tracker.processed(record.topic, record.partition, record.offset)
        reading, problem, seconds = decoded
        if problem is not None:
            self._dead_letter_record(record, coordinate, "deserialize", *problem)
            return
        self.metrics.stage_seconds.labels("decode").observe(seconds)
        bound = self._outside_time_bounds(reading)
        if bound is not None:
            self.stats.out_of_bounds += 1
            self._dead_letter_record(record, coordinate, "validate", bound.reason.value, bound.detail)
            return
        serving = self._serving
        if reading.modality not in serving.modalities:
            self._dead_letter_record(record, coordinate, "join", dlqmod.MODALITY_NOT_SCORED,
                                     f"model {serving.version} does not read {reading.modality} "
                                     f"(it reads {list(serving.modalities)})")
            return
        self.metrics.readings.labels(reading.modality).inc()
        self.stats.readings += 1
        now = time.monotonic()
        unit_id = reading.unit_id
        previous = self._arrivals.get(unit_id)
        self._arrivals[unit_id] = (previous[0] if previous else now, now)
        for out in self._joiner.add(reading, coordinate, self._join_now()):
            if isinstance(out, LateReading):
                if previous is None:
                    self._arrivals.pop(unit_id, None)
                else:
                    self._arrivals[unit_id] = previous
                self.stats.late += 1
                self.metrics.late.labels(out.reason).inc()
                detail = (f"unit {out.unit_id} was already decided" if out.reason == dlqmod.LATE
                          else f"unit {out.unit_id} is pending under another line than {reading.line_id!r}")
                self._dead_letter_record(record, coordinate, "join", out.reason, detail)
            else:
                self._enqueue(out)
        duplicates = self._joiner.duplicates
        if duplicates > self._seen_duplicates:
            self.metrics.duplicates.inc(duplicates - self._seen_duplicates)
            log.info("duplicate %s reading of unit %s at %s ignored (the first one is kept)", reading.modality,
                     unit_id, coordinate, extra={"coordinate": coordinate, "unit_id": unit_id})
            self._seen_duplicates = duplicates

    def _outside_time_bounds(self, reading: Any) -> RecordError | None:
        """Why a reading's event time is outside the accepted window around the wall clock, or None.

        Such a reading is dead-lettered before the join, so it never moves a partition's watermark; the other
        readings of its unit are joined as usual and the unit is decided without that modality.
        """
        cfg = self.config.join
        lead = reading.event_time.timestamp() - time.time()
        if lead > cfg.max_future_skew_s:
            return RecordError(Reason.EVENT_TIME_IN_FUTURE,
                               f"ce_time {reading.event_time.isoformat()} is {lead:,.0f} s ahead of the service's "
                               f"clock; join.max_future_skew_s allows {cfg.max_future_skew_s:g} s")
        if cfg.max_event_age_s is not None and -lead > cfg.max_event_age_s:
            return RecordError(Reason.EVENT_TIME_TOO_OLD,
                               f"ce_time {reading.event_time.isoformat()} is {-lead:,.0f} s old; "
                               f"join.max_event_age_s allows {cfg.max_event_age_s:g} s")
        return None

    def _dead_letter_record(self, record: Any, coordinate: InputCoordinate, stage: str, reason: str,
                            detail: str) -> None:
        letter = dlqmod.dead_letter(key=record.key, value=record.value, headers=record.headers,
                                    coordinate=coordinate, stage=stage, reason=reason, detail=detail,
                                    timestamp_ms=getattr(record, "timestamp", None))
        generation = self._tracker.hold([coordinate])
        self._send_dead_letter(letter, generation)

    def _send_dead_letter(self, letter: dlqmod.DeadLetter, generation: int) -> None:
        level = logging.WARNING if self._dlq_log.allow(letter.reason) else logging.DEBUG
        log.log(level, "dead-lettered %s (stage %s, reason %s): %s", letter.coordinate, letter.stage, letter.reason,
                letter.detail, extra={"coordinate": letter.coordinate, "stage": letter.stage, "reason": letter.reason})
        self._send(Outgoing("dlq", self.topics.dlq, letter.key, letter.value, letter.headers,
                            (letter.coordinate,), generation, (letter.stage, letter.reason)))

    def _enqueue(self, joined: JoinedUnit) -> None:
        now = time.monotonic()
        first, last = self._arrivals.pop(joined.unit.unit_id, (now, now))
        generation = self._tracker.hold(joined.coordinates, count=self._sinks)
        self.metrics.units.labels(joined.closed_by).inc()
        if joined.closed_by == "timeout":
            self.metrics.join_timeouts.inc()
        self.metrics.stage_seconds.labels("join").observe(now - first)
        if joined.missing:
            log.info("unit %s closed by %s without %s", joined.unit.unit_id, joined.closed_by,
                     list(joined.missing), extra={"unit_id": joined.unit.unit_id})
        with self._cv:
            self._queue.append(WorkItem(joined, first, last, now, generation))
            self._cv.notify_all()

    # ------------------------------------------------------------------------------------------ sending
    def _send(self, out: Outgoing) -> None:
        """Hand one record to the producer; its acknowledgement (or failure) comes back as an event."""
        out.attempts += 1
        out.sent_at = time.monotonic()
        with self._cv:
            if out.kind == "decision" and out.attempts == 1 and self._scoring > 0:
                self._scoring -= 1  # the unit moves from being scored to being in flight
            self._inflight += 1
        try:
            future = self._producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
        except Exception as exc:  # noqa: BLE001 - buffer full, metadata unavailable, broker gone: retry later
            self._events.put(("failed", out, exc))
            return
        future.add_callback(lambda metadata: self._events.put(("acked", out, metadata)))
        future.add_errback(lambda exc: self._events.put(("failed", out, exc)))

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            kind = event[0]
            if kind == "acked":
                if not delivery_confirmed(event[2]):  # no offset: no proof the broker holds it; send again
                    self._failed(event[1], BrokerError("acknowledged without an offset"))
                else:
                    self._acked(event[1])
            elif kind == "failed":
                self._failed(event[1], event[2])
            elif kind == "release":
                _, coordinates, generation = event
                self._tracker.release(coordinates, generation)
            elif kind == "archived":
                for coordinates, generation in event[1]:
                    self._tracker.release(coordinates, generation)

    def _acked(self, out: Outgoing) -> None:
        with self._cv:
            self._inflight -= 1
        self._tracker.release(out.coordinates, out.generation)
        now = time.monotonic()
        self.metrics.stage_seconds.labels("produce").observe(now - out.sent_at)
        if out.kind == "decision":
            self.stats.decisions_acked += 1
            self.metrics.record_decision(out.labels[1], out.labels[0], out.score)
            if out.item is not None:
                self.metrics.stage_seconds.labels("end_to_end").observe(now - out.item.last_arrival)
            if self._recent is not None:
                self._recent.add(out.value)
        else:
            self.stats.dead_letters_acked += 1
            self.metrics.dlq.labels(*out.labels).inc()
            if self._recent is not None:
                self._recent.dead_letter()

    def _failed(self, out: Outgoing, exc: BaseException) -> None:
        with self._cv:
            self._inflight -= 1
        if out.generation != self._tracker.generation:
            return  # its partitions were revoked: the records are read again and re-decided
        delay = min(_RETRY_MAX_S, 0.2 * 2 ** min(out.attempts, 5))
        self.stats.retries += 1
        log.warning("writing a %s for %s to %s failed (attempt %d: %s: %s); retrying in %.1f s", out.kind,
                    ", ".join(map(str, out.coordinates)), out.topic, out.attempts, type(exc).__name__, exc, delay)
        heapq.heappush(self._retries, (time.monotonic() + delay, next(self._retry_seq), out))

    def _resend_due(self) -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, _, out = heapq.heappop(self._retries)
            if out.generation == self._tracker.generation:
                self._send(out)

    def _archived(self, tokens: list[Any]) -> None:
        """Archive writer callback (its thread): the units' offsets no longer need the archive."""
        self._events.put(("archived", tokens))

    # ------------------------------------------------------------------------------------------- commit
    def _commit(self) -> None:
        """Commit, per assigned input partition, the lowest offset still needed (the only commit site)."""
        if not self._assignment:
            return
        safe = self._tracker.safe_offsets(self._joiner.held_offsets())
        offsets = {}
        for (topic, partition), offset in safe.items():
            tp = TopicPartition(topic, partition)
            if tp in self._assignment and offset > self._committed.get(tp, -1):
                offsets[tp] = OffsetAndMetadata(offset, "", -1)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets, timeout_ms=_COMMIT_TIMEOUT_MS)
        except (KafkaError, OSError) as exc:
            log.warning("offset commit failed (%s: %s); the next one retries", type(exc).__name__, exc)
            return
        for tp, meta in offsets.items():
            self._committed[tp] = meta.offset
        self.stats.commits += 1
        self.metrics.commits.inc()
        log.debug("committed %s", {f"{tp.topic}[{tp.partition}]": m.offset for tp, m in offsets.items()})

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.pending_units.set(self._joiner.pending)
        self._update_lag()

    def _update_lag(self) -> None:
        """Every ``_LAG_INTERVAL_S``: per owned input partition, the high watermark of its last fetch response
        minus the lowest offset this member still needs there (what the next commit could commit: readings
        buffered, joining, queued or not yet acknowledged count as behind), or minus the consumer's position
        where it has taken nothing from that partition yet. No request goes to the broker; partitions not
        fetched yet are left out."""
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + _LAG_INTERVAL_S
        needed = self._tracker.safe_offsets(self._joiner.held_offsets())
        for key, first in self._aligner.first_offsets().items():
            needed[key] = min(needed.get(key, first), first)
        lags = {}
        for tp in self._assignment:
            try:
                high = self._consumer.highwater(tp)
                start = needed.get((tp.topic, tp.partition))
                if high is not None and start is None:
                    start = self._consumer.position(tp, timeout_ms=0)
            except (KafkaError, ValueError) as exc:  # revoked meanwhile: the next refresh drops it
                log.debug("no lag for %s[%d]: %s", tp.topic, tp.partition, exc)
                continue
            if high is not None and start is not None:
                lags[(tp.topic, tp.partition)] = max(0, high - start)
        self.metrics.set_consumer_lag(lags)

    # ------------------------------------------------------------------------------------------- scorer
    def _score_loop(self) -> None:
        cfg = self.config
        max_delay = cfg.batching.max_delay_ms / 1000.0
        while True:
            batch: list[WorkItem] = []
            max_batch = self._batch_limit  # tuned per loaded model
            with self._cv:
                if self._queue:
                    wait = self._queue[0].closed_at + max_delay - time.monotonic()
                    if len(self._queue) >= max_batch or wait <= 0 or self._draining:
                        batch = [self._queue.popleft() for _ in range(min(max_batch, len(self._queue)))]
                        self._scoring = len(batch)
                    else:
                        self._cv.wait(timeout=wait)
                        continue
                elif self._scorer_stop:
                    return
                else:
                    self._cv.wait(timeout=0.5)
            if not batch:
                self._maybe_reload()
                continue
            try:
                self._maybe_reload()
                self._score_batch(batch)
            except Exception:  # noqa: BLE001 - the scorer must survive anything; units stay uncommitted
                log.exception("scoring a batch of %d units failed; they will be read again after a restart",
                              len(batch))
            finally:
                with self._cv:
                    self._scoring = 0
                    self._cv.notify_all()

    def _score_batch(self, batch: list[WorkItem]) -> None:
        serving = self._serving
        start = time.monotonic()
        for item in batch:
            self.metrics.stage_seconds.labels("queue").observe(start - item.closed_at)
        result = score_units(serving, [item.joined for item in batch], executor=self._prepare_pool)
        self.stats.batches += 1
        self.metrics.stage_seconds.labels("prepare").observe(result.prepare_seconds)
        self.metrics.stage_seconds.labels("score").observe(result.seconds)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.padding_rows.inc(result.forward_rows - result.forward_units)
        if result.router_stats:
            self.metrics.set_router_stats(result.router_stats)
        self.metrics.set_attention_spread([scored.attention_spread for scored in result.scored])
        links = self._write_reports(serving, batch, result.scored)
        for item, scored in zip(batch, result.scored, strict=True):
            for letter in scored.dead:
                if self._sinks > 1:  # the dead reading will not be archived
                    self._events.put(("release", [letter.coordinate], item.generation))
                self._send_dead_letter(letter, item.generation)
            decision = scored.decision
            if decision is None:
                continue
            if decision.id in links:
                decision = replace(decision, report_url=links[decision.id])
            decision = with_latency(decision, (time.monotonic() - item.last_arrival) * 1000.0)
            self._send(Outgoing("decision", self.topics.decisions, decision.unit_id.encode(), decision.to_json(),
                                [("content-type", DECISION_CONTENT_TYPE)], decision.inputs, item.generation,
                                (decision.decision, decision.line_id), item, score=decision.score))
            self.stats.decisions_sent += 1
            log.debug("decided %s: %s (score %.4f, threshold %.4f) from %s", decision.unit_id, decision.decision,
                      decision.score, decision.threshold, ", ".join(map(str, decision.inputs)),
                      extra={"unit_id": decision.unit_id, "decision_id": decision.id})
            if self._archive is not None:
                unit = self._scored_unit(item, decision)
                inputs = {m: c for m, c in item.joined.inputs.items() if m in decision.present}
                self._archive.put(ArchivedUnit(unit, inputs), (decision.inputs, item.generation))
            if self._drift is not None:
                for modality, value in scored.modality_scores.items():
                    self._drift_add(modality, value)

    @staticmethod
    def _scored_unit(item: WorkItem, decision: Any) -> Any:
        """The unit as the decision saw it: without readings the preprocessing rejected."""
        dead = [m for m in item.joined.unit.present if m not in decision.present]
        return item.joined.unit.without(*dead) if dead else item.joined.unit

    def _write_reports(self, serving: ServingModel, batch: list[WorkItem], scored: list[Any]) -> dict[str, str]:
        """Explanation reports of the batch's selected decisions, before they are sent; decision id -> link."""
        if self._reporter is None:
            return {}
        chosen = [(item, s) for item, s in zip(batch, scored, strict=True)
                  if s.decision is not None and self._reporter.wanted(s.decision)]
        if not chosen:
            return {}
        pairs = [(self._scored_unit(item, s.decision), s.decision) for item, s in chosen]
        t0 = time.monotonic()
        try:
            with serving.autocast():  # the encoder tokens came from the scoring forward's precision
                links = self._reporter.write(serving.model, pairs, [s for _, s in chosen],
                                             adapters=serving.adapters)
        except Exception as exc:  # noqa: BLE001 - a report must never cost a decision
            self.metrics.reports.labels("failed").inc(len(pairs))
            log.error("explanation reports of %d decisions failed (%s: %s); they are sent without a link",
                      len(pairs), type(exc).__name__, exc)
            return {}
        self.metrics.reports.labels("written").inc(len(links))
        self.metrics.stage_seconds.labels("report").observe(time.monotonic() - t0)
        return links

    def _drift_add(self, modality: str, value: float) -> None:
        result = self._drift.add(modality, value)
        if result is None:
            return
        self.metrics.drift_p.labels(modality).set(result.p_value)
        self.metrics.drift_flag.labels(modality).set(1 if result.drift else 0)
        level = logging.WARNING if result.drift else logging.INFO
        log.log(level, "drift test %s: KS D=%.3f p=%.3g over %d scores vs %d reference%s", modality,
                result.statistic, result.p_value, result.n_window, result.n_reference,
                " - DRIFT" if result.drift else "")

    def _maybe_reload(self) -> None:
        cfg = self.config
        if cfg.model.version is not None or cfg.model.reload_interval_s <= 0:
            return
        now = time.monotonic()
        if now < self._next_reload:
            return
        self._next_reload = now + cfg.model.reload_interval_s
        try:
            entry = self._store.promoted()
        except InspectionError as exc:
            log.warning("cannot read the model store %s: %s", self._store.root, exc)
            return
        if entry is not None and entry.version == self._serving.version:
            self._maybe_reload_adapters()  # the same base: its lines' adapters may have been promoted or rolled back
            return
        if entry is None or entry.version == self._failed_version:
            return
        old = self._serving.version
        try:
            serving = self._load_model(entry.version)
        except InspectionError as exc:
            self._failed_version = entry.version
            self.metrics.reloads.labels("failed").inc()
            log.error("not switching to promoted model %s (keeping %s): %s", entry.version, old, exc)
            return
        self._serving = serving
        self._failed_version = None
        self.stats.reloads += 1
        self.metrics.reloads.labels("ok").inc()
        if self._drift is not None:
            self._drift.reset()
        log.info("model hot-reloaded: %s -> %s (threshold version %s)", old, serving.version,
                 serving.threshold_version)

    def _maybe_reload_adapters(self) -> None:
        """Swap in the line adapters of the served base version promoted (or rolled back) since they were loaded,
        between two batches (a set a reload refused is not tried again until the promotions change)."""
        from inspection.adapters import load_line_adapters, promoted_adapters

        serving = self._serving
        if serving.normal_only is not None:
            return
        current = {line: a.version for line, a in serving.adapters.lines.items()} if serving.adapters else {}
        try:
            wanted = promoted_adapters(self._store, serving.version)
        except InspectionError as exc:
            log.warning("cannot read the line adapters of %s in %s: %s", serving.version, self._store.root, exc)
            return
        if wanted in (current, self._failed_adapters):
            return
        try:
            adapters = load_line_adapters(self._store, self._store.get(serving.version), serving.model, wanted)
        except InspectionError as exc:
            self._failed_adapters = wanted
            self.metrics.reloads.labels("failed").inc()
            log.error("not switching the line adapters of %s to %s (keeping %s): %s", serving.version, wanted,
                      current, exc)
            return
        self._serving = replace(serving, adapters=adapters)
        self._failed_adapters = None
        self.stats.reloads += 1
        self.metrics.reloads.labels("ok").inc()
        if self._drift is not None:
            self._drift.reset()
        log.info("line adapters of %s hot-reloaded: %s -> %s", serving.version, current, wanted)

    @property
    def adapter_versions(self) -> dict[str, str]:
        """Line -> the version of the adapter served for it now (empty: the base serves every line)."""
        serving = self._serving
        adapters = serving.adapters if serving is not None else None
        return {line: a.version for line, a in adapters.lines.items()} if adapters is not None else {}

    # ----------------------------------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        cfg = self.config
        self._stop.set()
        self._ready.clear()
        self.metrics.ready.set(0)
        deadline = time.monotonic() + cfg.shutdown_timeout_s
        # no more polling from here on: nothing new is read
        if self._consumer is not None and self._assignment and cfg.join.flush_on_shutdown:
            for joined in self._joiner.flush():
                self._enqueue(joined)
        if self._scorer is not None:
            with self._cv:
                self._draining = True
                self._cv.notify_all()
            while time.monotonic() < deadline:
                self._drain_events()
                self._resend_due()
                with self._cv:
                    idle = not self._queue and not self._scoring and self._inflight == 0
                if idle and not self._retries:
                    break
                time.sleep(0.02)
            with self._cv:
                self._scorer_stop = True
                left = len(self._queue) + self._scoring
                self._cv.notify_all()
            self._scorer.join(max(0.1, deadline - time.monotonic()))
            if left:
                log.warning("shutdown timeout: %d units left unscored; they stay uncommitted", left)
        if self._archive is not None:
            self._archive.stop(max(1.0, deadline - time.monotonic()))
            self._drain_events()
        if self._consumer is not None:
            self._commit()
            try:
                self._consumer.close(autocommit=False,
                                     timeout_ms=max(1_000, int((deadline - time.monotonic()) * 1000)))
            except (KafkaError, OSError) as exc:
                log.warning("closing the consumer failed: %s", exc)
        if self._producer is not None:
            try:
                self._producer.close(timeout=max(1.0, deadline - time.monotonic()))
            except (KafkaError, OSError) as exc:
                log.warning("closing the producer failed: %s", exc)
        if self._ops is not None:
            self._ops.stop()
        if self._prepare_pool is not None:
            self._prepare_pool.shutdown(wait=True)
        if self._heap_frozen:
            _thaw_heap()
            self._heap_frozen = False
        log.info("stopped: %s", self.summary())

    def summary(self) -> dict[str, Any]:
        """The run's counters as JSON data."""
        s = self.stats
        return {
            "instance": self.instance,
            "records": s.records,
            "readings": s.readings,
            "decisions_acked": s.decisions_acked,
            "dead_letters_acked": s.dead_letters_acked,
            "late_readings": s.late,
            "send_retries": s.retries,
            "commits": s.commits,
            "rebalances": s.rebalances,
            "model_reloads": s.reloads,
            "batches": s.batches,
            "backpressure_pauses": s.pauses,
            "max_queue_depth": s.max_queue_depth,
            "gc_collections": s.gc_collections,
            "poll_errors": s.poll_errors,
            "undecodable_batches": s.undecodable_batches,
            "event_time_out_of_bounds": s.out_of_bounds,
            "model_versions": s.model_versions,
            "operator_page": self._ops.url if self._ops is not None and self._ops.page is not None else None,
        }

