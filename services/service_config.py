"""The stream service's configuration: frozen dataclasses, loaded strictly from YAML or JSON.

Every section validates itself when built and names the offending key in its :class:`ConfigError`
(``join.timeout_s must be ...``); unknown keys are rejected with the list of valid ones, wrong types are
rejected by :func:`inspection.config.from_dict`, and a YAML mapping that repeats a key is rejected instead of
silently keeping the last value. Secrets are never written in the file: SASL and key-file passwords are read
from environment variables named by ``*_env`` keys, and :meth:`ServiceConfig.resolved` never contains them.

A minimal file::

    model:
      store: models/composite

Everything else has a default; ``docs/service.example.yaml`` shows every key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inspection.codec import CodecLimits
from inspection.config import from_dict, to_dict
from inspection.errors import ConfigError
from inspection.records import MODALITIES
from services.broker import TopicNames
from services.clients import SECURITY_PROTOCOLS, security_config, validate_bootstrap, validate_topic_name
from services.join import JoinConfig

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LOG_FORMATS: tuple[str, ...] = ("text", "json")


# ------------------------------------------------------------------------------------------------ checks
def _number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, integer: bool = False) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is a finite number in the range."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(f"{key} must be {kind}; got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low:g}; got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high:g}; got {value!r}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}; got {value!r}")


# ---------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class TopicsSection:
    """Topic names: the defaults with an optional ``prefix``, or any name set explicitly.

    Attributes:
        prefix: put in front of every default name (``"plant1."`` -> ``plant1.inspection.vision``).
        vision, vibration, temperature, decisions, dlq: explicit names; override ``prefix`` for that topic.
    """

    prefix: str = ""
    vision: str | None = None
    vibration: str | None = None
    temperature: str | None = None
    decisions: str | None = None
    dlq: str | None = None

    def __post_init__(self) -> None:
        try:
            self.names()
        except ConfigError as exc:
            raise ConfigError(f"topics: {exc}") from None

    def names(self) -> TopicNames:
        """The resolved topic names.

        Raises:
            ConfigError: an illegal or repeated name.
        """
        base = TopicNames.with_prefix(self.prefix) if self.prefix else TopicNames()
        explicit = {name: getattr(self, name) for name in ("vision", "vibration", "temperature", "decisions", "dlq")
                    if getattr(self, name) is not None}
        for name, value in explicit.items():
            try:
                validate_topic_name(value)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return TopicNames(**{**{n: getattr(base, n) for n in ("vision", "vibration", "temperature", "decisions",
                                                              "dlq")}, **explicit})


#: ``model.precision`` values (see :data:`services.scoring.PRECISIONS`).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelSection:
    """Which model scores, where, and how it is kept up to date.

    Attributes:
        store: a model store directory (one model family, e.g. ``models/composite``).
        version: pin this version; ``None`` follows the store's promoted version (hot reload).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        reload_interval_s: how often the store is polled for a newly promoted version; 0 never polls.
        threads: torch intra-op threads on CPU; ``None`` keeps torch's default.
        prepare_workers: threads that preprocess the units of a batch side by side; 0 picks
            ``min(8, CPU cores)``, 1 preprocesses them one by one in the scoring thread.
        warm_up: run the scoring forward on synthetic units before a model takes traffic (readiness waits for
            it), so GPU kernel compilation is not paid by the first units; ``None`` does it on CUDA only.
        precision: ``auto`` (bf16 autocast on CUDA, float32 on CPU), ``fp32`` or ``bf16`` (autocast on either).
    """

    store: str = ""
    version: str | None = None
    device: str = "auto"
    reload_interval_s: float = 10.0
    threads: int | None = None
    prepare_workers: int = 0
    warm_up: bool | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.store, str) or not self.store.strip():
            raise ConfigError("model.store is required: the model store directory (e.g. models/composite)")
        _choice(self.device, "model.device", DEVICES)
        _number(self.reload_interval_s, "model.reload_interval_s", low=0)
        if self.threads is not None:
            _number(self.threads, "model.threads", low=1, integer=True)
        _number(self.prepare_workers, "model.prepare_workers", low=0, high=256, integer=True)
        if self.warm_up is not None and not isinstance(self.warm_up, bool):
            raise ConfigError(f"model.warm_up must be true, false or null (CUDA only); got {self.warm_up!r}")
        _choice(self.precision, "model.precision", PRECISIONS)

    def resolved_prepare_workers(self) -> int:
        """Threads that preprocess a batch: ``prepare_workers``, or ``min(8, CPU cores)`` for 0."""
        return self.prepare_workers or min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class JoinSection:
    """How readings are joined into units (see :class:`services.join.JoinConfig`).

    Attributes:
        expected: modalities a unit should have; the model must read every one of them.
        timeout_s: processing time after a unit's first reading before it is scored with what is present.
        watermark_lag_s: event-time allowance: a unit this far behind its partition's newest event is closed.
        max_pending: units held at once (bounds memory: about this many units' decoded readings).
        late_memory: decided unit ids remembered to recognise late readings.
        align_idle_ms: how long the consumer waits for a lagging input topic before it hands the readings of
            the other topics of the same partition number to the join out of event-time order.
        buffer_records: readings buffered per owned input partition (on average) for that alignment; input
            stops while the buffers hold more.
        flush_on_shutdown: on graceful shutdown, score incomplete units with what is present (``false``: leave
            them uncommitted so the next owner of the partition joins them whole).
        max_future_skew_s: a reading whose ``ce_time`` is more than this far ahead of the service's clock is
            dead-lettered (stage ``validate``, reason ``event_time_in_future``) and never moves a watermark.
        max_event_age_s: a reading whose ``ce_time`` is more than this far behind the service's clock is
            dead-lettered (reason ``event_time_too_old``); ``None`` (the default) accepts any age, because a
            service back from an outage legitimately reads a backlog as old as the input topics' retention:
            set it to that retention to catch sensors whose clock was reset (1970, 2000).
    """

    expected: tuple[str, ...] = MODALITIES
    timeout_s: float = 5.0
    watermark_lag_s: float = 30.0
    max_pending: int = 1_000
    late_memory: int = 100_000
    align_idle_ms: float = 2_000.0
    buffer_records: int = 100
    flush_on_shutdown: bool = False
    max_future_skew_s: float = 300.0
    max_event_age_s: float | None = None

    def __post_init__(self) -> None:
        try:
            joined = self.join_config()
        except ConfigError as exc:
            raise ConfigError(f"join.{exc}") from None
        object.__setattr__(self, "expected", joined.expected)
        _number(self.max_future_skew_s, "join.max_future_skew_s", low=0)
        if self.max_event_age_s is not None:
            _number(self.max_event_age_s, "join.max_event_age_s", low=0, low_open=True)
        _number(self.align_idle_ms, "join.align_idle_ms", low=0)
        _number(self.buffer_records, "join.buffer_records", low=1, integer=True)

    def join_config(self) -> JoinConfig:
        return JoinConfig(expected=self.expected, timeout_s=self.timeout_s, watermark_lag_s=self.watermark_lag_s,
                          max_pending=self.max_pending, late_memory=self.late_memory)


@dataclass(frozen=True)
class BatchingSection:
    """Micro-batching of scoring.

    Attributes:
        max_batch: most units per forward pass.
        max_delay_ms: longest a ready unit waits for its batch to fill.
        max_queue: ready units waiting to be scored or acknowledged before input stops (it resumes at half).
        tune: measure the scoring path at batch sizes 1, 2, 4, ... up to ``max_batch`` when a model is loaded,
            and form batches of at most the smallest size within 5 % of the best throughput
            (:func:`services.scoring.tune_batch_size`), so raising ``max_batch`` never slows the service. None:
            whenever the model is warmed up (on CUDA by default).
        pad: run every forward at one of the sizes 1, 2, 4, ... up to the batch limit, padding a batch to the
            smallest that holds it (:func:`services.scoring.batch_buckets`): the device then only sees sizes
            the warm-up ran, where a new size costs seconds on CUDA. None: whenever the model is warmed up.
    """

    max_batch: int = 32
    max_delay_ms: float = 20.0
    max_queue: int = 256
    tune: bool | None = None
    pad: bool | None = None

    def __post_init__(self) -> None:
        _number(self.max_batch, "batching.max_batch", low=1, high=4096, integer=True)
        _number(self.max_delay_ms, "batching.max_delay_ms", low=0, high=60_000)
        _number(self.max_queue, "batching.max_queue", low=1, integer=True)
        for name in ("tune", "pad"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"batching.{name} must be true, false or null; got {value!r}")
        if self.max_queue < self.max_batch:
            raise ConfigError(f"batching.max_queue ({self.max_queue}) must be >= batching.max_batch "
                              f"({self.max_batch}), or no batch could ever fill")


@dataclass(frozen=True)
class LimitsSection:
    """Input size limits enforced before any large allocation (see :class:`inspection.codec.CodecLimits`)."""

    max_payload_bytes: int = CodecLimits.max_payload_bytes
    max_pixels: int = CodecLimits.max_pixels
    max_channels: int = CodecLimits.max_channels
    max_values: int = CodecLimits.max_values

    def __post_init__(self) -> None:
        from services.clients import MAX_MESSAGE_BYTES

        for name in ("max_payload_bytes", "max_pixels", "max_channels", "max_values"):
            _number(getattr(self, name), f"limits.{name}", low=1, integer=True)
        if self.max_payload_bytes > MAX_MESSAGE_BYTES:
            raise ConfigError(f"limits.max_payload_bytes must be <= {MAX_MESSAGE_BYTES} (the largest message the "
                              f"consumer fetches); got {self.max_payload_bytes}")

    def codec_limits(self) -> CodecLimits:
        return CodecLimits(self.max_payload_bytes, self.max_pixels, self.max_channels, self.max_values)


@dataclass(frozen=True)
class ArchiveSection:
    """Optional archive of every scored unit as Parquet history (for ``inspection rescore``).

    Attributes:
        path: a directory for the files; ``None`` archives nothing.
        rotate_units: units per file.
        rotate_s: a file is closed at the latest this many seconds after its first unit.
    """

    path: str | None = None
    rotate_units: int = 1_000
    rotate_s: float = 60.0

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError(f"archive.path must be a directory path or null; got {self.path!r}")
        _number(self.rotate_units, "archive.rotate_units", low=1, integer=True)
        _number(self.rotate_s, "archive.rotate_s", low=0, low_open=True)


@dataclass(frozen=True)
class MetricsSection:
    """The HTTP endpoint for ``/metrics`` (Prometheus), ``/healthz``, ``/readyz`` and the operator page.

    Attributes:
        enabled: serve the endpoint.
        host: address to bind; loopback by default, so nothing is exposed unless asked.
        port: TCP port; 0 picks a free one (logged at start).
        token_env: the environment variable holding the bearer token. When it is set (non-empty) every path but
            ``/healthz`` and ``/readyz`` requires it; a ``host`` other than loopback refuses to start without it.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108
    token_env: str = "INSPECTION_OPS_TOKEN"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"metrics.host must be an address such as 127.0.0.1; got {self.host!r}")
        _number(self.port, "metrics.port", low=0, high=65535, integer=True)
        if not isinstance(self.token_env, str) or not self.token_env.isidentifier():
            raise ConfigError(f"metrics.token_env must name an environment variable; got {self.token_env!r}")


@dataclass(frozen=True)
class OperatorPageSection:
    """The live operator page on the metrics endpoint (``docs/operations.md``).

    Attributes:
        enabled: serve the page at ``/``, its JSON API, and ``reports.dir`` under ``/reports/`` (needs
            ``metrics.enabled``).
        window: recent decisions kept in memory for the page.
        refresh_s: seconds between two polls of the page for new decisions.
    """

    enabled: bool = True
    window: int = 500
    refresh_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"operator_page.enabled must be true or false; got {self.enabled!r}")
        _number(self.window, "operator_page.window", low=1, high=100_000, integer=True)
        _number(self.refresh_s, "operator_page.refresh_s", low=0.2, high=60)


@dataclass(frozen=True)
class DriftSection:
    """Per-modality drift test (see :mod:`services.drift`).

    Attributes:
        enabled: run the test.
        window: scores per reference window and per test window.
        alpha: a p-value below this flags drift.
    """

    enabled: bool = True
    window: int = 500
    alpha: float = 0.05

    def __post_init__(self) -> None:
        _number(self.window, "drift.window", low=20, high=1_000_000, integer=True)
        _number(self.alpha, "drift.alpha", low=0, high=0.5, low_open=True)


@dataclass(frozen=True)
class KafkaSection:
    """Kafka client settings.

    Attributes:
        bootstrap: ``host:port[,host:port]``; ``--bootstrap`` overrides it.
        group_id: the consumer group: every instance with the same id shares the partitions.
        commit_interval_ms: how often settled offsets are committed.
        max_poll_records: records one poll may return.
        consumer: extra :class:`kafka.KafkaConsumer` settings (validated by :func:`services.clients.consumer_config`).
        producer: extra :class:`kafka.KafkaProducer` settings (validated by :func:`services.clients.producer_config`).
    """

    bootstrap: str | None = None
    group_id: str = "inspection-serve"
    commit_interval_ms: float = 1_000.0
    max_poll_records: int = 200
    consumer: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)

    _RESERVED = frozenset({"bootstrap_servers", "group_id", "enable_auto_commit", "key_deserializer",
                           "value_deserializer", "key_serializer", "value_serializer", "max_poll_records"})

    def __post_init__(self) -> None:
        if self.bootstrap is not None:
            try:
                validate_bootstrap(self.bootstrap)
            except ConfigError as exc:
                raise ConfigError(f"kafka.bootstrap: {exc}") from None
        if not isinstance(self.group_id, str) or not self.group_id.strip():
            raise ConfigError(f"kafka.group_id must be a non-empty string; got {self.group_id!r}")
        _number(self.commit_interval_ms, "kafka.commit_interval_ms", low=10, high=600_000)
        _number(self.max_poll_records, "kafka.max_poll_records", low=1, integer=True)
        for section in ("consumer", "producer"):
            settings = getattr(self, section)
            reserved = sorted(self._RESERVED.intersection(settings))
            if reserved:
                raise ConfigError(f"kafka.{section} must not set {reserved}: the service sets them itself")
            from services.clients import SECURITY_KEYS

            secure = sorted(SECURITY_KEYS.intersection(settings))
            if secure:
                raise ConfigError(f"kafka.{section} must not set {secure}: put security settings in the "
                                  "security section")


@dataclass(frozen=True)
class SecuritySection:
    """Kafka security, passed to every client (SASL and/or TLS).

    Secrets are never written in the file: ``sasl_plain_password_env`` and ``ssl_password_env`` name the
    environment variables that hold them.
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password_env: str | None = None
    sasl_kerberos_service_name: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password_env: str | None = None
    ssl_check_hostname: bool | None = None

    def __post_init__(self) -> None:
        _choice(self.security_protocol, "security.security_protocol", SECURITY_PROTOCOLS)
        for key in ("sasl_plain_password_env", "ssl_password_env"):
            name = getattr(self, key)
            if name is not None and (not isinstance(name, str) or not name.isidentifier()):
                raise ConfigError(f"security.{key} must name an environment variable; got {name!r}")
        try:  # validate the combination without secrets (placeholders stand in for unset variables)
            security_config(**self._settings(placeholder=True))
        except ConfigError as exc:
            raise ConfigError(f"security: {exc}") from None

    def _settings(self, *, placeholder: bool) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "security_protocol": self.security_protocol,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_kerberos_service_name": self.sasl_kerberos_service_name,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_check_hostname": self.ssl_check_hostname,
        }
        for key, target in (("sasl_plain_password_env", "sasl_plain_password"), ("ssl_password_env", "ssl_password")):
            name = getattr(self, key)
            if name is None:
                continue
            if placeholder:
                settings[target] = "<from environment>"
            elif name not in os.environ:
                raise ConfigError(f"security.{key} names ${name}, which is not set in the environment")
            else:
                settings[target] = os.environ[name]
        return {k: v for k, v in settings.items() if v is not None}

    def client_settings(self) -> dict[str, Any]:
        """kafka-python keyword arguments, secrets read from the environment now.

        Raises:
            ConfigError: a named environment variable is not set, or the settings do not fit together.
        """
        return security_config(**self._settings(placeholder=False))


REPORT_UNITS: tuple[str, ...] = ("defects", "all", "none")


@dataclass(frozen=True)
class ReportsSection:
    """Explanation reports written by the service (``docs/explanations.md``).

    Attributes:
        dir: folder the reports (``<stem>.json`` + ``<stem>.html``, the stem from the decision id) are written to;
            ``None`` writes none, and decisions carry no report link.
        units: which decisions get a report: ``defects``, ``all`` or ``none``. A decision gets a link only when
            its report was written, before the decision is sent.
        level: 1 (modalities only) or 2 (regions, bands, segments too).
        budget: level 2: model evaluations per unit.
        seed: level 2: seed of the sampled orders of groups.
        base_url: decisions link to ``<base_url>/<stem>.html``; ``None`` links to the file (``file://``).
    """

    dir: str | None = None
    units: str = "defects"
    level: int = 2
    budget: int = 256
    seed: int = 0
    base_url: str | None = None

    def __post_init__(self) -> None:
        if self.dir is not None and not (isinstance(self.dir, str) and self.dir.strip()):
            raise ConfigError(f"reports.dir must be a folder path or null; got {self.dir!r}")
        _choice(self.units, "reports.units", REPORT_UNITS)
        _choice(self.level, "reports.level", (1, 2))
        _number(self.budget, "reports.budget", low=16, high=1_000_000, integer=True)
        _number(self.seed, "reports.seed", low=0, integer=True)
        if self.base_url is not None and not (isinstance(self.base_url, str) and self.base_url.strip()):
            raise ConfigError(f"reports.base_url must be a URL or null; got {self.base_url!r}")

    @property
    def enabled(self) -> bool:
        return self.dir is not None and self.units != "none"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``inspection serve`` needs besides the bootstrap address.

    Attributes:
        reports: explanation reports of (defect) decisions and the decisions' links to them.
        operator_page: the live page of recent decisions on the metrics endpoint.
        shutdown_timeout_s: on SIGTERM, how long in-flight units may take to be scored and acknowledged.
        run_dir: where the resolved config is written at start; ``None`` writes nothing.
        log_format: ``text`` or ``json`` (one object per line).
    """

    model: ModelSection = field(default_factory=ModelSection)
    topics: TopicsSection = field(default_factory=TopicsSection)
    join: JoinSection = field(default_factory=JoinSection)
    batching: BatchingSection = field(default_factory=BatchingSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    archive: ArchiveSection = field(default_factory=ArchiveSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    operator_page: OperatorPageSection = field(default_factory=OperatorPageSection)
    drift: DriftSection = field(default_factory=DriftSection)
    kafka: KafkaSection = field(default_factory=KafkaSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    reports: ReportsSection = field(default_factory=ReportsSection)
    shutdown_timeout_s: float = 30.0
    run_dir: str | None = None
    log_format: str = "text"

    def __post_init__(self) -> None:
        _number(self.shutdown_timeout_s, "shutdown_timeout_s", low=0, low_open=True, high=3600)
        _choice(self.log_format, "log_format", LOG_FORMATS)

    def resolved(self) -> dict[str, Any]:
        """The whole configuration as JSON data (no secret values: only the names of their variables)."""
        return to_dict(self)

    @classmethod
    def from_mapping(cls, data: Any) -> ServiceConfig:
        """Build from parsed YAML/JSON data.

        Raises:
            ConfigError: the data is not a mapping, or a key is unknown, of the wrong type or out of range.
        """
        if data is None:
            data = {}
        return from_dict(cls, data, "config")


class _StrictLoader(yaml.SafeLoader):
    """YAML safe loader that refuses a mapping with the same key twice."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_service_config(path: Path | str) -> ServiceConfig:
    """Read and validate a service config file (``.json``, or YAML for any other suffix).

    Raises:
        ConfigError: the file is missing or unreadable, not valid YAML/JSON, or its content is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the service config {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            def pairs(items: list[tuple[str, Any]]) -> dict:
                keys = [k for k, _ in items]
                dupes = sorted({k for k in keys if keys.count(k) > 1})
                if dupes:
                    raise ConfigError(f"key(s) {dupes} appear twice in one object")
                return dict(items)

            data = json.loads(text, object_pairs_hook=pairs)
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return ServiceConfig.from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
