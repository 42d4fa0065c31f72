"""Kafka client settings in one place, and the constructors that apply them.

Every producer, consumer and admin client of the service is built here, so the settings that matter for
correctness (``acks="all"``, manual commits, message sizes large enough for camera images, short group
session timeouts) are written down once. Callers override single keys by name; unknown keys are rejected
with the list of valid ones, security keys are validated, and secrets are masked by :func:`redact` before
anything is logged.

Sizes are bytes, timeouts milliseconds (``*_ms``) or seconds (``*_s``) as the name says.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from inspection.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

_MIB = 1024 * 1024

#: Smallest request size a producer may be configured with: one camera image of up to 8 MiB plus headers.
MIN_MESSAGE_BYTES = 8 * _MIB
#: Largest message the service produces or fetches. Above the codec's 16 MiB payload limit on purpose, so
#: an oversized reading can still be fetched and dead-lettered with its bytes instead of stalling a partition.
MAX_MESSAGE_BYTES = 32 * _MIB

SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "GSSAPI", "OAUTHBEARER", "SCRAM-SHA-256", "SCRAM-SHA-512")

#: Security keys accepted by :func:`security_config` (kafka-python spelling).
SECURITY_KEYS: frozenset[str] = frozenset(
    {
        "security_protocol",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_name",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
        "ssl_context",
        "ssl_check_hostname",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_crlfile",
        "ssl_password",
        "ssl_ciphers",
    }
)
#: Keys whose values are secrets: never logged, never shown in error messages.
SECRET_KEYS: frozenset[str] = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token_provider"})
_SECRET_WORDS = ("password", "secret", "token")
REDACTED = "***"

_TOPIC_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_BOOTSTRAP_ITEM_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$")
_SASL_NEEDS_USER = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


# --------------------------------------------------------------------------------------------- validation


def validate_topic_name(name: str) -> str:
    """Check a topic name against Kafka's rule and return it.

    Args:
        name: the topic name.

    Returns:
        The same name.

    Raises:
        ConfigError: the name is not 1–249 characters of ``[a-zA-Z0-9._-]``, or is ``.`` or ``..``.
    """
    if not isinstance(name, str) or not _TOPIC_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"topic name must be 1-249 characters of [a-zA-Z0-9._-] and not '.' or '..'; got {name!r}"
        )
    return name


def validate_bootstrap(bootstrap: str) -> str:
    """Check a ``host:port[,host:port...]`` bootstrap list and return it.

    Raises:
        ConfigError: the value is empty or an item is not ``host:port`` with a port in 1–65535.
    """
    if not isinstance(bootstrap, str) or not bootstrap.strip():
        raise ConfigError(f"bootstrap must be 'host:port[,host:port...]'; got {bootstrap!r}")
    for item in bootstrap.split(","):
        item = item.strip()
        if not _BOOTSTRAP_ITEM_RE.fullmatch(item) or not 1 <= int(item.rsplit(":", 1)[1]) <= 65535:
            raise ConfigError(
                f"bootstrap item must be 'host:port' with port 1-65535; got {item!r} in {bootstrap!r}"
            )
    return bootstrap


def _is_secret(key: str) -> bool:
    return key in SECRET_KEYS or any(word in key.lower() for word in _SECRET_WORDS)


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a client config that is safe to log: secret values are replaced by ``"***"``.

    Keys listed in :data:`SECRET_KEYS`, and any key whose name contains ``password``, ``secret`` or
    ``token``, are masked when they hold a value (``None`` stays ``None``, so a log still shows that no
    secret was set).
    """
    return {
        key: (REDACTED if value is not None and _is_secret(key) else value) for key, value in config.items()
    }


def security_config(security_protocol: str = "PLAINTEXT", **settings: Any) -> dict[str, Any]:
    """Validate security settings and return them as kafka-python keyword arguments.

    Args:
        security_protocol: one of :data:`SECURITY_PROTOCOLS`.
        **settings: ``sasl_*`` and ``ssl_*`` keys from :data:`SECURITY_KEYS`, passed through unchanged.

    Returns:
        ``{"security_protocol": ..., **settings}``.

    Raises:
        ConfigError: an unknown key, an unknown protocol or mechanism, SASL settings without a SASL
            protocol (or the reverse), SSL settings without an SSL protocol, or PLAIN/SCRAM without a
            username and password. Messages never contain secret values.
    """
    unknown = sorted(set(settings) - SECURITY_KEYS)
    if unknown:
        raise ConfigError(f"unknown security keys {unknown}; valid keys are {sorted(SECURITY_KEYS)}")
    protocol = security_protocol.upper() if isinstance(security_protocol, str) else security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(
            f"security_protocol must be one of {list(SECURITY_PROTOCOLS)}; got {security_protocol!r}"
        )
    given = {key: value for key, value in settings.items() if value is not None}
    sasl = protocol.startswith("SASL_")
    ssl = protocol.endswith("SSL")
    sasl_keys = sorted(key for key in given if key.startswith("sasl_"))
    ssl_keys = sorted(key for key in given if key.startswith("ssl_"))
    if sasl_keys and not sasl:
        raise ConfigError(f"{sasl_keys} need security_protocol SASL_PLAINTEXT or SASL_SSL; got {protocol}")
    if ssl_keys and not ssl:
        raise ConfigError(f"{ssl_keys} need security_protocol SSL or SASL_SSL; got {protocol}")
    if sasl:
        mechanism = given.get("sasl_mechanism")
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"sasl_mechanism must be one of {list(SASL_MECHANISMS)} for {protocol}; got {mechanism!r}"
            )
        if mechanism in _SASL_NEEDS_USER:
            missing = [key for key in ("sasl_plain_username", "sasl_plain_password") if not given.get(key)]
            if missing:
                raise ConfigError(f"sasl_mechanism {mechanism} needs {missing}")
        if mechanism == "OAUTHBEARER" and given.get("sasl_oauth_token_provider") is None:
            raise ConfigError("sasl_mechanism OAUTHBEARER needs sasl_oauth_token_provider")
    return {"security_protocol": protocol, **given}


def _merge(
    kind: str, valid: Iterable[str], defaults: dict[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    valid = frozenset(valid)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown {kind} config keys {unknown}; valid keys are {sorted(valid)}")
    config = {**defaults, **overrides}
    security = {key: config.pop(key) for key in list(config) if key in SECURITY_KEYS}
    if security:
        config.update(security_config(**security))
    return config


def _positive_int(config: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- configs


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Producer settings: every write acknowledged by all in-sync replicas, large enough for images.

    Defaults: ``acks="all"`` with idempotence, retries bounded by a 30 s ``delivery_timeout_ms``,
    ``linger_ms=5`` (small batches without adding visible latency), ``max_request_size`` =
    :data:`MAX_MESSAGE_BYTES`, ``max_block_ms=10000`` and no topic auto-creation.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        **overrides: any :class:`kafka.KafkaProducer` key, security keys included.

    Returns:
        Keyword arguments for :class:`kafka.KafkaProducer`.

    Raises:
        ConfigError: an unknown key, invalid security settings, or ``max_request_size`` below
            :data:`MIN_MESSAGE_BYTES`.
    """
    defaults: dict[str, Any] = {
        "bootstrap_servers": validate_bootstrap(bootstrap),
        "client_id": "inspection-producer",
        "acks": "all",
        "enable_idempotence": True,
        "retries": 2_147_483_647,
        "delivery_timeout_ms": 30_000,
        "request_timeout_ms": 10_000,
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
        "max_block_ms": 10_000,
        "allow_auto_create_topics": False,
    }
    config = _merge("producer", KafkaProducer.DEFAULT_CONFIG, defaults, overrides)
    _positive_int(config, "max_request_size", MIN_MESSAGE_BYTES)
    return config


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Consumer settings: manual commits, replay from the earliest offset, fast group joins, big fetches.

    Defaults: ``session_timeout_ms=6000`` with ``heartbeat_interval_ms=1500`` (a group join and a failover
    take seconds, not the 45 s of the library default), ``enable_auto_commit=False`` (offsets are committed
    by the pipeline after its sinks flush), ``auto_offset_reset="earliest"``, ``max_partition_fetch_bytes``
    = :data:`MAX_MESSAGE_BYTES` and ``fetch_max_bytes`` twice that, and no topic auto-creation.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        group_id: the consumer group.
        **overrides: any :class:`kafka.KafkaConsumer` key, security keys included.

    Returns:
        Keyword arguments for :class:`kafka.KafkaConsumer`.

    Raises:
        ConfigError: an unknown key, an empty group id, invalid security settings, a heartbeat interval
            not below a third of the session timeout, or fetch sizes below :data:`MIN_MESSAGE_BYTES`.
    """
    if not isinstance(group_id, str) or not group_id.strip():
        raise ConfigError(f"group_id must be a non-empty string; got {group_id!r}")
    defaults: dict[str, Any] = {
        "bootstrap_servers": validate_bootstrap(bootstrap),
        "client_id": "inspection-consumer",
        "group_id": group_id,
        "session_timeout_ms": 6_000,
        "heartbeat_interval_ms": 1_500,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "fetch_max_bytes": 2 * MAX_MESSAGE_BYTES,
        "allow_auto_create_topics": False,
    }
    config = _merge("consumer", KafkaConsumer.DEFAULT_CONFIG, defaults, overrides)
    session = _positive_int(config, "session_timeout_ms")
    heartbeat = _positive_int(config, "heartbeat_interval_ms")
    if heartbeat * 3 > session:
        raise ConfigError(
            f"heartbeat_interval_ms must be at most a third of session_timeout_ms; got {heartbeat} and {session}"
        )
    partition_bytes = _positive_int(config, "max_partition_fetch_bytes", MIN_MESSAGE_BYTES)
    if _positive_int(config, "fetch_max_bytes", MIN_MESSAGE_BYTES) < partition_bytes:
        raise ConfigError(
            f"fetch_max_bytes ({config['fetch_max_bytes']}) must be >= max_partition_fetch_bytes ({partition_bytes})"
        )
    if config["auto_offset_reset"] not in ("earliest", "latest", "none"):
        raise ConfigError(
            f"auto_offset_reset must be earliest, latest or none; got {config['auto_offset_reset']!r}"
        )
    return config


def admin_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Admin client settings: 15 s request and bootstrap timeouts.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        **overrides: any :class:`kafka.KafkaAdminClient` key, security keys included.

    Raises:
        ConfigError: an unknown key or invalid security settings.
    """
    defaults: dict[str, Any] = {
        "bootstrap_servers": validate_bootstrap(bootstrap),
        "client_id": "inspection-admin",
        "request_timeout_ms": 15_000,
        "bootstrap_timeout_ms": 15_000,
    }
    return _merge("admin", KafkaAdminClient.DEFAULT_CONFIG, defaults, overrides)


#: Seconds :func:`check_reachable` waits for all bootstrap addresses together.
REACHABLE_TIMEOUT_S = 5.0


def check_reachable(bootstrap: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail fast when no bootstrap address accepts a TCP connection, before a Kafka client retries for long.

    A Kafka client given an address where nothing listens retries for tens of seconds and logs each attempt;
    this check opens (and closes) one plain TCP connection per address instead, and returns at the first that
    accepts. It proves only that something listens, not that it speaks Kafka.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        timeout_s: seconds for all addresses together (each gets what is left, at most half of it).

    Raises:
        ConfigError: ``bootstrap`` is malformed or ``timeout_s`` not positive.
        BrokerError: no address accepted a connection; one line naming each address, why, and what to check.
    """
    validate_bootstrap(bootstrap)
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be > 0 seconds; got {timeout_s!r}")
    deadline = time.monotonic() + timeout_s
    failures = []
    for item in (part.strip() for part in bootstrap.split(",")):
        host, port = item.rsplit(":", 1)
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append(f"{item}: not tried within {timeout_s:g} s")
            continue
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(left, timeout_s / 2)):
                return
        except socket.gaierror as exc:
            failures.append(f"{item}: unknown host ({exc.strerror or exc})")
        except TimeoutError:
            failures.append(f"{item}: no answer within {min(left, timeout_s / 2):g} s")
        except OSError as exc:
            failures.append(f"{item}: {(exc.strerror or str(exc)).lower()}")
    raise BrokerError(f"no Kafka broker reachable at {bootstrap} ({'; '.join(failures)}); check that the broker "
                      "is running and that --bootstrap (or $INSPECTION_BOOTSTRAP) names its host:port")


# ------------------------------------------------------------------------------------------ constructors


def _construct(cls: type, what: str, config: dict[str, Any], bootstrap: str) -> Any:
    """Build a kafka-python client, logging its settings redacted and wrapping its errors in BrokerError."""
    log.debug("creating %s with %s", what, redact(config))
    try:
        return cls(**config)
    except (KafkaError, OSError, ValueError) as exc:
        raise BrokerError(f"could not create {what} for {bootstrap}: {type(exc).__name__}: {exc}") from exc


def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """Build a producer with :func:`producer_config`.

    Raises:
        ConfigError: invalid settings.
        BrokerError: the client could not be built or could not reach the cluster.
    """
    return _construct(KafkaProducer, "a producer", producer_config(bootstrap, **overrides), bootstrap)


def make_consumer(topics: Sequence[str], bootstrap: str, group_id: str, **overrides: Any) -> KafkaConsumer:
    """Build a consumer with :func:`consumer_config` and subscribe it to ``topics``.

    Args:
        topics: topic names to subscribe to; empty leaves the consumer unsubscribed (for manual
            ``assign``).
        bootstrap: ``host:port[,host:port...]``.
        group_id: the consumer group.
        **overrides: any :class:`kafka.KafkaConsumer` key.

    Raises:
        ConfigError: invalid settings or topic names (a bare string instead of a list included).
        BrokerError: the client could not be built, reach the cluster or subscribe.
    """
    if isinstance(topics, str | bytes):
        raise ConfigError(f"topics must be a sequence of topic names, not a single string; got {topics!r}")
    names = [validate_topic_name(topic) for topic in topics]
    config = consumer_config(bootstrap, group_id, **overrides)
    log.debug("creating consumer for %s with %s", names, redact(config))
    consumer: KafkaConsumer | None = None
    try:
        consumer = KafkaConsumer(**config)
        if names:
            consumer.subscribe(names)
        return consumer
    except (KafkaError, OSError, ValueError) as exc:
        if consumer is not None:
            consumer.close(autocommit=False)
        raise BrokerError(
            f"could not create a consumer for {names} in group {group_id!r} at {bootstrap}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def make_admin(bootstrap: str, **overrides: Any) -> KafkaAdminClient:
    """Build an admin client with :func:`admin_config`.

    Raises:
        ConfigError: invalid settings.
        BrokerError: the client could not be built or could not reach the cluster.
    """
    return _construct(KafkaAdminClient, "an admin client", admin_config(bootstrap, **overrides), bootstrap)


def delivery_confirmed(metadata: object) -> bool:
    """Whether a producer acknowledgement proves the record is stored: it must carry an offset.

    kafka-python reports a broker's ``DUPLICATE_SEQUENCE_NUMBER`` answer as success with offset -1; a broker
    gave that answer across a restart for records it no longer held. Such a record must be sent again.
    """
    offset = getattr(metadata, "offset", -1)
    return isinstance(offset, int) and offset >= 0


def wait_for_assignment(consumer: KafkaConsumer, timeout_s: float) -> set[TopicPartition]:
    """Poll a subscribed consumer until the group has given it partitions, without losing records.

    A consumer must not be closed while its first group join is pending (some brokers then keep a ghost
    member that blocks the group), and tests need to know when a consumer is live. Polling may return
    records; every partition that returned some is rewound to the first offset returned, so the caller's
    next ``poll`` delivers them again and nothing is skipped.

    Args:
        consumer: a consumer that has subscribed (or been assigned partitions).
        timeout_s: seconds to wait at most.

    Returns:
        The assigned partitions.

    Raises:
        ConfigError: ``timeout_s`` is not positive.
        BrokerError: no assignment arrived within ``timeout_s``, or polling failed.
    """
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be > 0 seconds; got {timeout_s!r}")
    deadline = time.monotonic() + timeout_s
    rewind: dict[TopicPartition, int] = {}
    try:
        while True:
            batch = consumer.poll(timeout_ms=100)
            for tp, records in batch.items():
                if records and tp not in rewind:
                    rewind[tp] = records[0].offset
            assigned = set(consumer.assignment())
            if assigned:
                break
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"no partitions assigned within {timeout_s:g} s (subscription: "
                    f"{sorted(consumer.subscription() or ())}); check that the topics exist and the group "
                    "is not blocked by a member that left during its join"
                )
        for tp, offset in rewind.items():
            if tp in assigned:
                consumer.seek(tp, offset)
    except KafkaError as exc:
        raise BrokerError(f"polling for a partition assignment failed: {type(exc).__name__}: {exc}") from exc
    return assigned


def wait_for_group(consumers: Sequence[KafkaConsumer], settled: Callable[[list[set[TopicPartition]]], bool],
                   timeout_s: float) -> list[set[TopicPartition]]:
    """Poll several members of one group side by side, each from its own thread, until ``settled`` holds.

    Members of a group must each keep polling while the group forms, as separate processes do. Polling them in
    turn from one thread is not enough: kafka-python 3.0 completes a JoinGroup/SyncGroup round in the
    background, but when no ``poll()`` of that member is waiting at that moment, its next ``poll()`` discards
    the finished round and sends a new JoinGroup. A broker that holds each JoinGroup for a fixed time (the
    embedded broker holds it for half the session timeout) then answers each new round at the same phase of
    the callers' loop, so one member can miss every round and keep no partitions for as long as the loop runs.
    Records polled here are put back (each partition is rewound to its first record returned).

    Args:
        consumers: subscribed consumers of one group.
        settled: called with the members' assignments; True once the group is as expected.
        timeout_s: seconds to wait at most.

    Returns:
        The members' assignments, in the order of ``consumers``.

    Raises:
        BrokerError: the group did not settle within ``timeout_s``, or polling failed.
    """
    stop = threading.Event()
    errors: list[BaseException] = []
    rewinds: list[dict[TopicPartition, int]] = [{} for _ in consumers]

    def run(consumer: KafkaConsumer, rewind: dict[TopicPartition, int]) -> None:
        try:
            while not stop.is_set():
                for tp, records in consumer.poll(timeout_ms=100).items():
                    if records and tp not in rewind:
                        rewind[tp] = records[0].offset
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c, r), daemon=True) for c, r in zip(consumers, rewinds,
                                                                                       strict=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            assignments = [set(c.assignment()) for c in consumers]
            if settled(assignments) or errors or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if errors:
        raise BrokerError(f"polling a group member failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    assignments = [set(c.assignment()) for c in consumers]
    if not settled(assignments):
        raise BrokerError(f"the group did not settle within {timeout_s:g} s; assignments: "
                          f"{[sorted(f'{tp.topic}[{tp.partition}]' for tp in a) for a in assignments]}")
    for consumer, rewind, assigned in zip(consumers, rewinds, assignments, strict=True):
        for tp, offset in rewind.items():
            if tp in assigned:
                consumer.seek(tp, offset)
    return assignments


# ------------------------------------------------------------------------------------ undecodable batches


@dataclass(frozen=True)
class UndecodableBatch:
    """A fetched record batch the client could not decode (corrupt payload, or a codec it lacks).

    Attributes:
        topic, partition: where it lies.
        first_offset: offset of its first record not handed out (records before it in the same batch that did
            decode were delivered as usual), or the fetch position when the batch itself is unknown.
        next_offset: the offset after its last record: where reading resumes.
        first_timestamp_ms: its first record's timestamp from the batch header (-1 when unknown).
        codec: its compression codec by name (``"unknown"`` when unknown).
        error: the decoding error, as ``Type: message``.
    """

    topic: str
    partition: int
    first_offset: int
    next_offset: int
    first_timestamp_ms: int
    codec: str
    error: str

    @property
    def last_offset(self) -> int:
        return self.next_offset - 1

    # read by the alignment buffers, where a skipped batch waits in offset order like the records around it
    @property
    def offset(self) -> int:
        return self.first_offset

    @property
    def timestamp(self) -> int:
        return self.first_timestamp_ms


_CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def undecodable_batch(exc: BaseException, consumer: KafkaConsumer | None = None) -> UndecodableBatch | None:
    """Locate the record batch a ``poll()`` failed to decode, from the error it raised.

    kafka-python decodes a fetched batch lazily, inside ``poll()``: a batch whose payload cannot be
    decompressed (or fails its checksum) raises out of ``poll()`` without saying where it lies, the position
    does not move, and the same batch is fetched again forever (in kafka-python 3.0 the next ``poll()`` even
    loops without returning, as its stale parsed fetch yields nothing yet is never drained). The batch header is
    never compressed, and the failing frames of the client's own decoding still hold the batch and its
    partition: they are read from the traceback. When the batch cannot be found there, the partition and fetch
    position of the consumer's parsed fetch in flight give a one-offset range instead.

    Args:
        exc: what ``poll()`` raised.
        consumer: the consumer that raised it (for the fallback).

    Returns:
        The batch, or None when the error is not a decoding failure of a located batch (a network or broker
        error: retry).
    """
    from kafka.record.abc import ABCRecordBatch

    batch, tp, delivered = None, None, None
    tb = exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        candidate = local.get("batch")
        if candidate is None and isinstance(local.get("self"), ABCRecordBatch):
            candidate = local["self"]
        if batch is None and isinstance(candidate, ABCRecordBatch):
            batch = candidate
        if isinstance(local.get("tp"), TopicPartition) and tb.tb_frame.f_code.co_name == "_unpack_records":
            tp = local["tp"]
            # records of the batch before the broken one were already handed out: the range starts after them
            delivered = getattr(local.get("self"), "next_fetch_offset", None)
        tb = tb.tb_next
    error = f"{type(exc).__name__}: {exc}"[:500]
    if batch is not None and tp is not None:
        try:
            first, nxt = int(batch.base_offset), int(batch.next_offset)
            ts = int(getattr(batch, "first_timestamp", -1))
            codec = _CODEC_NAMES.get(int(getattr(batch, "compression_type", -1)), "unknown")
        except Exception:  # noqa: BLE001 - a header that cannot be read: fall through to the fetch position
            pass
        else:
            if isinstance(delivered, int) and first < delivered < nxt:
                first = delivered
            if nxt > first >= 0:
                return UndecodableBatch(tp.topic, tp.partition, first, nxt, ts, codec, error)
    # the parsed fetch the client is stuck on (kafka-python 3.0 keeps it in ``_next_partition_records``)
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    part_tp = getattr(part, "topic_partition", None)
    offset = getattr(part, "next_fetch_offset", None)
    if isinstance(part_tp, TopicPartition) and isinstance(offset, int) and offset >= 0 and (
            batch is not None or _is_decode_error(exc)):
        return UndecodableBatch(part_tp.topic, part_tp.partition, offset, offset + 1, -1, "unknown", error)
    return None


def _is_decode_error(exc: BaseException) -> bool:
    """Errors that come from decoding fetched bytes, not from the network or the broker."""
    from kafka.errors import CorruptRecordError, UnsupportedCodecError

    if isinstance(exc, CorruptRecordError | UnsupportedCodecError):
        return True
    return not isinstance(exc, KafkaError | OSError)
