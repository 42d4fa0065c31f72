"""Prometheus metrics of the stream service and its HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``).

Each :class:`ServiceMetrics` owns its own registry, so several services (or tests) in one process never share
counters. :class:`OpsServer` serves that registry with the standard text format, plus a liveness probe (the
main loop ran recently) and a readiness probe (a model is loaded and the consumer has partitions); it binds
127.0.0.1 unless configured otherwise. It also serves the live operator page (:mod:`services.operator_page`) and,
with a bearer token, refuses every other path to requests without it.

Metric names (all prefixed ``inspection_``):

=====================================  =========  ==============================================================
``readings_total{modality}``           counter    readings decoded and handed to the join
``units_total{closed_by}``             counter    units decided, by what closed their join
``decisions_total{decision}``          counter    decisions acknowledged by the broker (ok/defect/undecided)
``line_decisions_total{line,decision}`` counter  the same, per line (``ce_lineid``; see *Lines* below)
``score{line}``                        histogram  defect score in [0, 1] of acknowledged decisions, per line
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
``attention_spread{layer}``            gauge      mean entropy (nats) of the fusion queries' attention weights over
                                                  the tokens, per bridge layer, over the last batch's units (own
                                                  forward pass); 0 = each query on one token, log(tokens) = even
``experts_active_share{layer}``        gauge      experts that got at least one token / experts, last batch
``expert_assignments_total{layer,expert}`` counter routed token assignments per expert (a ``rate()`` gives the
                                                  load over a window instead of one batch)
``drift_p_value{modality}``            gauge      p-value of the latest two-sample KS test
``drift_detected{modality}``           gauge      1 when that p-value is below alpha
``model_info{version,threshold_version}`` gauge   1 for the model in use
``model_reloads_total{result}``        counter    hot reloads (``ok``/``failed``)
``commits_total``                      counter    offset commits that succeeded
``rebalances_total``                   counter    group rebalances this member took part in
``ready``                              gauge      1 when ready to serve: ``/readyz`` would answer 200 (evaluated
                                                  at each scrape)
``main_loop_age_seconds``              gauge      seconds since the main loop last ran (evaluated at each scrape;
                                                  ``/healthz`` fails past 60 s)
``consumer_lag{topic,partition}``      gauge      records from the first one this member still needs (buffered,
                                                  joining, queued or unacknowledged; else its fetch position)
                                                  to the partition's high watermark, per owned input partition,
                                                  refreshed every few seconds from the fetch responses
=====================================  =========  ==============================================================

*Lines*: the ``line`` label takes the first :data:`MAX_LINES` distinct line ids a service decides; decisions of
any further line are counted under ``line="other"``, so a producer that invents line ids cannot grow the number
of series without bound. ``units_total``, ``decisions_total`` and ``readings_total`` export every known label
value from the start, at 0, so that ``rate()`` sees their first increase.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
from inspection.records import DECISION_VALUES, MODALITIES
from services.join import CLOSE_REASONS
from services.operator_page import MAX_BODY_BYTES, OperatorPage, OpsAuth, Reply, is_loopback

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Buckets of the per-line score histogram: [0, 1] in steps of 0.05.
_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
#: Distinct ``line`` label values one service exports; later lines are counted as :data:`OTHER_LINE`.
MAX_LINES = 64
OTHER_LINE = "other"


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
        self.attention_spread = Gauge(f"{p}attention_spread", "Mean entropy in nats of the fusion queries' "
                                      "attention weights per bridge layer (last batch)", ["layer"], registry=r)
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
        self.line_decisions = Counter(f"{p}line_decisions", "Decisions acknowledged by the broker, per line",
                                      ["line", "decision"], registry=r)
        self.score = Histogram(f"{p}score", "Defect score of acknowledged decisions, per line", ["line"],
                               buckets=_SCORE_BUCKETS, registry=r)
        self.experts_active_share = Gauge(f"{p}experts_active_share", "Experts that got at least one token / "
                                          "experts (last batch)", ["layer"], registry=r)
        self.expert_assignments = Counter(f"{p}expert_assignments", "Routed token assignments per expert",
                                          ["layer", "expert"], registry=r)
        self.main_loop_age = Gauge(f"{p}main_loop_age_seconds", "Seconds since the main loop last ran",
                                   registry=r)
        self.consumer_lag = Gauge(f"{p}consumer_lag", "Records from the first one this member still needs to "
                                  "the high watermark", ["topic", "partition"], registry=r)
        self._model_labels: tuple[str, str] | None = None
        self._lines: set[str] = set()
        self._lag_labels: set[tuple[str, str]] = set()
        # every known label value starts at 0: a series born at its first increment shows that increment to
        # no rate(), and a ratio of rates (join timeouts per unit) would divide by a missing or zero rate
        for closed_by in CLOSE_REASONS:
            self.units.labels(closed_by)
        for decision in DECISION_VALUES:
            self.decisions.labels(decision)
        for modality in MODALITIES:
            self.readings.labels(modality)

    def set_model(self, version: str, threshold_version: str) -> None:
        """Point ``model_info`` at a new version (the previous one's series is removed)."""
        if self._model_labels is not None:
            self.model_info.remove(*self._model_labels)
        self._model_labels = (version, threshold_version)
        self.model_info.labels(version, threshold_version).set(1)

    def set_router_stats(self, stats: Sequence) -> None:
        """Expert load and assignments, active share, gate entropy and load ratio per MoE layer from a forward
        pass's ``RouterStats`` (``counts`` and ``load`` ``[E]``)."""
        for layer, s in enumerate(stats):
            for expert, share in enumerate(s.load.detach().float().cpu().tolist()):
                self.expert_load.labels(str(layer), str(expert)).set(share)
            counts = s.counts.detach().cpu().tolist()
            for expert, count in enumerate(counts):
                if count:
                    self.expert_assignments.labels(str(layer), str(expert)).inc(count)
                else:  # the series exists from the first batch, so a rate() sees an idle expert as 0
                    self.expert_assignments.labels(str(layer), str(expert))
            self.experts_active_share.labels(str(layer)).set(sum(1 for c in counts if c) / len(counts))
            self.gate_entropy.labels(str(layer)).set(float(s.gate_entropy))
            self.max_load_ratio.labels(str(layer)).set(float(s.max_load_ratio))

    def set_attention_spread(self, per_unit: Sequence[Sequence[float]]) -> None:
        """``attention_spread{layer}``: the mean over a batch's units of each bridge layer's attention spread
        (``Scored.attention_spread``: per unit, one value in nats per layer). An empty batch changes nothing."""
        rows = [row for row in per_unit if len(row)]
        for layer in range(len(rows[0]) if rows else 0):
            self.attention_spread.labels(str(layer)).set(sum(row[layer] for row in rows) / len(rows))

    def line_label(self, line_id: str) -> str:
        """The ``line`` label of a line id: itself among the first :data:`MAX_LINES` lines seen, else
        :data:`OTHER_LINE`."""
        if line_id in self._lines:
            return line_id
        if len(self._lines) < MAX_LINES:
            self._lines.add(line_id)
            return line_id
        return OTHER_LINE

    def record_decision(self, line_id: str, decision: str, score: float) -> None:
        """Count one acknowledged decision (``ok``/``defect``/``undecided``) of a line and observe its score
        (in [0, 1])."""
        self.decisions.labels(decision).inc()
        line = self.line_label(line_id)
        self.line_decisions.labels(line, decision).inc()
        self.score.labels(line).observe(score)

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the ``consumer_lag`` series by ``{(topic, partition): records}``: partitions missing from
        ``lags`` (no longer owned, or no fetch yet) lose their series."""
        labels = {(topic, str(partition)): value for (topic, partition), value in lags.items()}
        for gone in self._lag_labels - labels.keys():
            self.consumer_lag.remove(*gone)
        for key, value in labels.items():
            self.consumer_lag.labels(*key).set(value)
        self._lag_labels = set(labels)

    def watch(self, loop_age_s: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Evaluate ``main_loop_age_seconds`` and ``ready`` at each scrape from these callables (called on the
        scraping thread: they must be cheap and thread-safe)."""
        self.main_loop_age.set_function(loop_age_s)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP in a daemon thread, plus the operator page.

    With ``page`` it also serves the live operator page, its JSON API and the report folder
    (:mod:`services.operator_page`). With ``auth`` every path except ``/healthz`` and ``/readyz`` (left open for
    orchestrators' probes) answers 401 unless the request carries the bearer token or the page's session cookie.

    Args:
        metrics: the registry to serve.
        host: address to bind (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`port`).
        alive: returns ``(ok, detail)`` for ``/healthz``.
        ready: returns ``(ok, detail)`` for ``/readyz``.
        page: the operator page's routes; None serves none.
        auth: the bearer-token check; required when ``host`` is not loopback.

    Raises:
        ConfigError: the address cannot be bound, or ``host`` is not loopback and there is no ``auth``.
    """

    def __init__(self, metrics: ServiceMetrics, host: str, port: int,
                 alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]], *,
                 page: OperatorPage | None = None, auth: OpsAuth | None = None) -> None:
        if auth is None and not is_loopback(host):
            raise ConfigError(f"serving HTTP on {host}, which is not loopback, needs a bearer token "
                              "(metrics.token_env names its environment variable); or bind 127.0.0.1")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # seconds a connection may stay silent (a stalled client never pins a thread for good)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path, _, query = self.path.partition("?")
                if path in ("/healthz", "/readyz"):
                    ok, detail = (outer.alive if path == "/healthz" else outer.ready)()
                    self._send(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                elif outer.auth is not None and not outer.auth.allows(self.headers):
                    self._reply(outer.auth.challenge(path, page=outer.page is not None))
                elif path == "/metrics":
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif outer.page is not None and (reply := outer.page.get(path, query)) is not None:
                    self._reply(reply)
                else:
                    self._send(404, f"not found: try {'/, ' if outer.page else ''}/metrics, /healthz or "
                                    "/readyz\n".encode(), "text/plain; charset=utf-8")

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.partition("?")[0]
                if outer.auth is None or outer.page is None or path not in ("/login", "/logout"):
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")
                    return
                length = self.headers.get("Content-Length", "0")
                if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                    self._send(413, f"the body must be at most {MAX_BODY_BYTES} bytes\n".encode(),
                               "text/plain; charset=utf-8")
                    return
                body = self.rfile.read(int(length))
                self._reply(outer.auth.login(body) if path == "/login" else outer.auth.logout())

            def _reply(self, reply: Reply) -> None:
                self._send(reply.status, reply.body, reply.content_type, reply.headers)

            def _send(self, code: int, body: bytes, content_type: str,
                      headers: Sequence[tuple[str, str]] = ()) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("ops http: " + fmt, *args)

        self.metrics = metrics
        self.alive = alive
        self.ready = ready
        self.page = page
        self.auth = auth
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

    @property
    def url(self) -> str:
        """``http://host:port/`` of this server (IPv6 addresses in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("metrics on %smetrics (also /healthz, /readyz)%s%s", self.url,
                 f"; operator page on {self.url}" if self.page is not None else "",
                 "; bearer token required" if self.auth is not None else "")
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

    @property
    def age_s(self) -> float:
        """Seconds since the last :meth:`beat`."""
        return time.monotonic() - self._last

    def check(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last
        if age > self.stale_after_s:
            return False, f"main loop stalled for {age:.1f} s (limit {self.stale_after_s:g} s)"
        return True, f"ok: main loop ran {age:.2f} s ago"
