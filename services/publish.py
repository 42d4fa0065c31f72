"""Publish units' readings to the three co-partitioned input topics, at a rate, with test faults on request.

Each reading becomes one message (key = unit_id, CloudEvents headers, see :mod:`inspection.codec`) on its
modality's topic; the default partitioner hashes the key, so all readings of a unit land on the same partition
number of each topic. ``drop`` and ``delay`` simulate a flaky line for tests and demos: a dropped reading is
never sent, a delayed one is sent that many milliseconds after the rest of its unit.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from inspection.codec import encode_reading
from inspection.errors import BrokerError, ConfigError
from inspection.records import MODALITIES, InputCoordinate, Unit
from services.broker import TopicNames
from services.clients import delivery_confirmed

log = logging.getLogger(__name__)

#: Sends of one reading before an acknowledgement without an offset (see
#: :func:`services.clients.delivery_confirmed`) counts as a failure.
_SEND_ROUNDS = 3


@dataclass(frozen=True)
class FaultPlan:
    """Per-modality test faults.

    Attributes:
        drop: probability in [0, 1] that a modality's reading is not sent.
        delay_ms: extra delay before a modality's reading is sent.
        seed: seeds the drop draws.
    """

    drop: Mapping[str, float] = field(default_factory=dict)
    delay_ms: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, table in (("drop", self.drop), ("delay", self.delay_ms)):
            unknown = set(table) - set(MODALITIES)
            if unknown:
                raise ConfigError(f"{name} names unknown modalities {sorted(unknown)}; known: {MODALITIES}")
        for m, p in self.drop.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"drop probability of {m} must be in [0, 1]; got {p}")
        for m, d in self.delay_ms.items():
            if d < 0:
                raise ConfigError(f"delay of {m} must be >= 0 ms; got {d}")


def parse_modality_values(items: Iterable[str], what: str) -> dict[str, float]:
    """Parse ``["vision=0.1", "vibration=0.5"]`` into ``{"vision": 0.1, ...}`` (CLI helper)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in MODALITIES:
            raise ConfigError(f"{what} must look like MODALITY=NUMBER with MODALITY in {MODALITIES}; got {item!r}")
        try:
            out[name] = float(value)
        except ValueError as exc:
            raise ConfigError(f"{what} value of {name} must be a number; got {value!r}") from exc
    return out


@dataclass
class PublishReport:
    """What a publish run sent."""

    units: int = 0
    sent: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    coordinates: dict[tuple[str, str], InputCoordinate] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def messages(self) -> int:
        return sum(self.sent.values())


def publish_units(
    producer,
    units: Iterable[Unit],
    topics: TopicNames,
    *,
    rate: float = 0.0,
    faults: FaultPlan = FaultPlan(),
    on_unit: Callable[[Unit], None] | None = None,
    timeout_s: float = 60.0,
) -> PublishReport:
    """Send every reading of every unit and wait until the broker acknowledged all of them with an offset (a
    reading acknowledged without one is sent again, up to three times in all).

    Args:
        producer: a ``kafka.KafkaProducer`` (see :func:`services.clients.make_producer`).
        units: the units to send, in order.
        topics: topic names; readings go to ``topics.for_modality(m)``.
        rate: units per second; 0 sends as fast as the broker takes them.
        faults: drops and delays for tests and demos.
        on_unit: called after each unit has been handed to the producer (progress bars).
        timeout_s: how long to wait for the last acknowledgements.

    Returns:
        Counts per modality and each reading's coordinates, keyed by (unit_id, modality).

    Raises:
        BrokerError: a send failed, was not acknowledged in time, or was never acknowledged with an offset.
    """
    if rate < 0:
        raise ConfigError(f"rate must be >= 0 units/s; got {rate}")
    rng = np.random.default_rng(faults.seed)
    report = PublishReport()
    futures: list[tuple[tuple[str, str], object]] = []
    delayed: list[tuple[float, int, str, Unit]] = []  # (due, tiebreak, modality, unit)
    start = time.monotonic()
    seq = 0

    sent_units: dict[str, Unit] = {}

    def hand_over(unit: Unit, modality: str) -> None:
        msg = encode_reading(getattr(unit, modality))
        fut = producer.send(
            topics.for_modality(modality), key=msg.key, value=msg.value, headers=list(msg.headers),
            timestamp_ms=msg.timestamp_ms,
        )
        futures.append(((unit.unit_id, modality), fut))
        sent_units[unit.unit_id] = unit

    def send(unit: Unit, modality: str) -> None:
        hand_over(unit, modality)
        report.sent[modality] += 1

    def flush_due(now: float) -> None:
        while delayed and delayed[0][0] <= now:
            _, _, modality, unit = heapq.heappop(delayed)
            send(unit, modality)

    for unit in units:
        if rate > 0:
            due = start + report.units / rate
            while True:
                now = time.monotonic()
                flush_due(now)
                if now >= due:
                    break
                time.sleep(min(due - now, delayed[0][0] - now if delayed else due - now, 0.05))
        flush_due(time.monotonic())
        for modality in unit.present:
            if rng.random() < faults.drop.get(modality, 0.0):
                report.dropped[modality] += 1
                continue
            delay = faults.delay_ms.get(modality, 0.0)
            if delay > 0:
                seq += 1
                heapq.heappush(delayed, (time.monotonic() + delay / 1000.0, seq, modality, unit))
            else:
                send(unit, modality)
        report.units += 1
        if on_unit:
            on_unit(unit)
    while delayed:
        now = time.monotonic()
        flush_due(now)
        if delayed:
            time.sleep(max(0.0, min(delayed[0][0] - now, 0.05)))
    try:
        for _ in range(_SEND_ROUNDS):
            producer.flush(timeout=timeout_s)
            pending, futures = futures, []
            for (unit_id, modality), fut in pending:
                md = fut.get(timeout=timeout_s)
                if delivery_confirmed(md):
                    report.coordinates[(unit_id, modality)] = InputCoordinate(md.topic, md.partition, md.offset)
                else:  # acknowledged without an offset: no proof the broker holds it
                    hand_over(sent_units[unit_id], modality)
            if not futures:
                break
            log.warning("%d readings were acknowledged without an offset; sending them again", len(futures))
        else:
            raise BrokerError(f"{len(futures)} readings were still acknowledged without an offset after "
                              f"{_SEND_ROUNDS} sends")
    except BrokerError:
        raise
    except Exception as exc:  # kafka-python raises its own KafkaError family and timeouts
        raise BrokerError(f"publishing failed after {report.messages} messages: {exc}") from exc
    report.seconds = time.monotonic() - start
    log.info("published %d units (%s) in %.1f s", report.units, dict(report.sent), report.seconds)
    return report
