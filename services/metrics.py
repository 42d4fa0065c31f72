"""Prometheus metrics of the stream service and its HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``).

Each :class:`ServiceMetrics` owns its own registry, so several services (or tests) in one process never share
counters. :class:`OpsServer` serves that registry with the standard text format, plus a liveness probe (the
main loop ran recently) and a readiness probe (a model is loaded and the consumer has partitions); it binds
127.0.0.1 unless configured otherwise.

Metric names (all prefixed ``inspection_``):

=====================================  =========  ==============================================================
``readings_total{modality}``           counter    readings decoded and handed to the join
``units_total{closed_by}``             counter    units decided, by what closed their join
``decisions_total{decision}``          counter    decisions acknowledged by the broker (ok/defect/undecided)
``join_timeouts_total``                counter    units closed by the processing-time join timeout
``late_readings_total{reason}``        counter    readings after their unit's decision (``late``, ``line_mismatch``)
``duplicate_readings_total``           counter    repeated readings of a modality already joined (ignored)
``dlq_total{stage,reason}``            counter    records dead-lettered
``undecodable_batches_total``          counter    record batches the client could not decode, skipped
``poll_errors_total{error}``           counter    polls of the input topics that failed (retried; ``/readyz``
                                                  fails until one succeeds)
``reports_total{result}``              counter    explanation reports ``written`` or ``failed`` (sent without link)
``stage_seconds{stage}``               histogram  ``decode``, ``join`` (first reading to close), ``queue``
                                                  (close to scoring), ``prepare`` (preprocessing of a batch),
                                                  ``score`` (per batch, preprocessing included), ``produce``
                                                  (send to ack), ``report`` (explanation reports of a batch),
                                                  ``end_to_end`` (newest reading to decision ack)
``batch_size``                         histogram  units per forward pass
``batch_limit``                        gauge      most units per forward pass (tuned, or ``max_batch``)
``queue_depth``                        gauge      units closed and not yet acknowledged
``pending_units``                      gauge      units waiting in the join
``input_paused``                       gauge      1 while input is held back (full queue or alignment buffers)
``expert_load{layer,expert}``          gauge      share of routed assignments per MoE expert, last batch
``gate_entropy{layer}``                gauge      mean router entropy (nats), last batch
``expert_max_load_ratio{layer}``       gauge      max(load) x experts, last batch (1 = balanced)
``drift_p_value{modality}``            gauge      p-value of the latest two-sample KS test
``drift_detected{modality}``           gauge      1 when that p-value is below alpha
``model_info{version,threshold_version}`` gauge   1 for the model in use
``model_reloads_total{result}``        counter    hot reloads (``ok``/``failed``)
``commits_total``                      counter    offset commits that succeeded
``rebalances_total``                   counter    group rebalances this member took part in
``ready``                              gauge      1 when ready to serve
=====================================  =========  ==============================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from inspection.errors import ConfigError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """Every metric of one service instance, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "inspection_"
        self.readings = Counter(f"{p}readings", "Readings decoded and joined", ["modality"], registry=r)
        self.units = Counter(f"{p}units", "Units decided, by what closed their join", ["closed_by"], registry=r)
        self.decisions = Counter(f"{p}decisions", "Decisions acknowledged by the broker", ["decision"], registry=r)
        self.join_timeouts = Counter(f"{p}join_timeouts", "Units closed by the join timeout", registry=r)
        self.late = Counter(f"{p}late_readings", "Readings after their unit was decided", ["reason"], registry=r)
        self.duplicates = Counter(f"{p}duplicate_readings", "Repeated readings of a joined modality", registry=r)
        self.dlq = Counter(f"{p}dlq", "Records dead-lettered", ["stage", "reason"], registry=r)
        self.undecodable_batches = Counter(f"{p}undecodable_batches", "Record batches skipped as undecodable",
                                           registry=r)
        self.poll_errors = Counter(f"{p}poll_errors", "Failed polls of the input topics", ["error"], registry=r)
        self.reports = Counter(f"{p}reports", "Explanation reports written or failed", ["result"], registry=r)
        self.padding_rows = Counter(f"{p}padding_rows", "Rows added to forward passes to reach a warmed batch size "
                                    "(batching.pad)", registry=r)
        self.stage_seconds = Histogram(f"{p}stage_seconds", "Latency per pipeline stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{p}batch_size", "Units per forward pass", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_limit = Gauge(f"{p}batch_limit", "Most units per forward pass (batching.tune's choice, else "
                                 "max_batch)", registry=r)
        self.queue_depth = Gauge(f"{p}queue_depth", "Units closed and not yet acknowledged", registry=r)
        self.pending_units = Gauge(f"{p}pending_units", "Units waiting in the join", registry=r)
        self.input_paused = Gauge(f"{p}input_paused", "1 while input is held back by backpressure", registry=r)
        self.expert_load = Gauge(f"{p}expert_load", "Share of routed assignments per expert (last batch)",
                                 ["layer", "expert"], registry=r)
        self.gate_entropy = Gauge(f"{p}gate_entropy", "Mean router entropy in nats (last batch)", ["layer"],
                                  registry=r)
        self.max_load_ratio = Gauge(f"{p}expert_max_load_ratio", "max(load) x experts (last batch)", ["layer"],
                                    registry=r)
        self.drift_p = Gauge(f"{p}drift_p_value", "p-value of the latest KS drift test", ["modality"], registry=r)
        self.drift_flag = Gauge(f"{p}drift_detected", "1 when the latest drift p-value is below alpha",
                                ["modality"], registry=r)
        self.model_info = Gauge(f"{p}model_info", "The model version in use", ["version", "threshold_version"],
                                registry=r)
        self.reloads = Counter(f"{p}model_reloads", "Model hot reloads", ["result"], registry=r)
        self.commits = Counter(f"{p}commits", "Offset commits that succeeded", registry=r)
        self.rebalances = Counter(f"{p}rebalances", "Group rebalances this member took part in",
                                  registry=r)
        self.ready = Gauge(f"{p}ready", "1 when the service is ready", registry=r)
        self._model_labels: tuple[str, str] | None = None

    def set_model(self, version: str, threshold_version: str) -> None:
        """Point ``model_info`` at a new version (the previous one's series is removed)."""
        if self._model_labels is not None:
            self.model_info.remove(*self._model_labels)
        self._model_labels = (version, threshold_version)
        self.model_info.labels(version, threshold_version).set(1)

    def set_router_stats(self, stats: Sequence) -> None:
        """Expert load, gate entropy and load ratio per MoE layer from a forward pass's ``RouterStats``."""
        for layer, s in enumerate(stats):
            for expert, share in enumerate(s.load.detach().float().cpu().tolist()):
                self.expert_load.labels(str(layer), str(expert)).set(share)
            self.gate_entropy.labels(str(layer)).set(float(s.gate_entropy))
            self.max_load_ratio.labels(str(layer)).set(float(s.max_load_ratio))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP in a daemon thread.

    Args:
        metrics: the registry to serve.
        host: address to bind (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`port`).
        alive: returns ``(ok, detail)`` for ``/healthz``.
        ready: returns ``(ok, detail)`` for ``/readyz``.

    Raises:
        ConfigError: the address cannot be bound.
    """

    def __init__(self, metrics: ServiceMetrics, host: str, port: int,
                 alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (outer.alive if path == "/healthz" else outer.ready)()
                    self._send(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("ops http: " + fmt, *args)

        self.metrics = metrics
        self.alive = alive
        self.ready = ready
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Heartbeat:
    """When the main loop last ran, for the liveness probe."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def check(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last
        if age > self.stale_after_s:
            return False, f"main loop stalled for {age:.1f} s (limit {self.stale_after_s:g} s)"
        return True, f"ok: main loop ran {age:.2f} s ago"
