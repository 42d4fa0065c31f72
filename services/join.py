"""Joining the readings of one unit: decide when a unit is complete enough to be scored.

The stream service reads the three co-partitioned input topics (DESIGN §3, key = unit_id). The readings of
one unit arrive separately, in any order, possibly late or never. :class:`UnitJoiner` holds each unit until
one of these closes it, and says which one did (``closed_by``):

* ``complete``: every modality in :attr:`JoinConfig.expected` is present (returned by :meth:`UnitJoiner.add`);
* ``timeout``: ``timeout_s`` of processing time passed since the unit's *first* reading;
* ``watermark``: the unit's newest event time fell more than ``watermark_lag_s`` behind the newest event
  time seen on its partition;
* ``capacity``: more than ``max_pending`` units were held; the one that arrived first is closed early;
* ``flush``: graceful shutdown closed everything still held.

Policies:

* **unit_id is the key.** Readings are grouped by ``unit_id`` alone. The first reading fixes the unit's
  ``line_id``; a later reading of the same unit_id from another line cannot belong to that unit and is
  returned as a :class:`LateReading` with reason ``line_mismatch`` (the caller dead-letters it).
* **The first reading of a modality wins.** A further reading of a modality already present is ignored and
  counted in :attr:`JoinedUnit.duplicates` and the ``duplicates`` counter; its offset needs no holding, as it
  is consumed whole by being counted.
* **Extras are attached.** A modality outside ``expected`` is joined into the unit when it arrives before the
  unit closes; completion only requires ``expected``.
* **Decided units are remembered** (the last ``late_memory`` unit ids, least recently used evicted): a reading
  for one of them is returned as a :class:`LateReading` with reason ``late``. A unit id forgotten by then
  starts a new unit.
* **Watermarks are per partition number.** The input topics are co-partitioned, so all readings of a unit
  share a partition number; the watermark of a partition is the newest event time seen on that partition
  number over all input topics, minus ``watermark_lag_s``. A unit belongs to its first reading's partition.

All time is passed in: ``now`` is processing time in seconds from a monotonic clock (``time.monotonic()``)
and never goes backwards inside the joiner (a smaller ``now`` is treated as the largest seen so far); event
times come from the readings. The joiner does no I/O and keeps no reference to Kafka.

At-least-once: :meth:`UnitJoiner.held_offsets` gives, per topic-partition, the smallest offset still held by
a pending unit; the committer must not commit at or past it until that unit has been decided and its
decision acknowledged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from inspection.errors import ConfigError
from inspection.records import MODALITIES, READING_TYPES, InputCoordinate, Reading, Unit

#: Every value :attr:`JoinedUnit.closed_by` can take.
CLOSE_REASONS: tuple[str, ...] = ("complete", "timeout", "watermark", "capacity", "flush")
#: Every value :attr:`LateReading.reason` can take.
LATE_REASONS: tuple[str, ...] = ("late", "line_mismatch")


@dataclass(frozen=True)
class JoinConfig:
    """How long and how many units the joiner holds.

    Attributes:
        expected: modalities a unit of this line should have; a unit is complete when all are present.
            Stored in canonical order (:data:`~inspection.records.MODALITIES`).
        timeout_s: processing time, in seconds, after a unit's first reading before it is scored with
            whatever is present.
        watermark_lag_s: event-time allowance, in seconds: a unit whose newest event time is older than the
            newest event time seen on its partition minus this lag is closed.
        max_pending: most units held at once; beyond it the unit that arrived first is closed early.
        late_memory: how many decided unit ids are remembered to recognise late readings.
    """

    expected: tuple[str, ...] = MODALITIES
    timeout_s: float = 5.0
    watermark_lag_s: float = 30.0
    max_pending: int = 10_000
    late_memory: int = 100_000

    def __post_init__(self) -> None:
        expected = self.expected
        if isinstance(expected, str) or not isinstance(expected, Iterable):
            raise ConfigError(f"expected must be a sequence of modality names from {MODALITIES}; got {expected!r}")
        names = tuple(expected)
        unknown = [m for m in names if m not in MODALITIES]
        if unknown or not names:
            raise ConfigError(
                f"expected must name at least one modality, each one of {MODALITIES}; got {names!r}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"expected must name each modality once; got {names!r}")
        object.__setattr__(self, "expected", tuple(m for m in MODALITIES if m in names))
        for name in ("timeout_s", "watermark_lag_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number of seconds > 0; got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("max_pending", "late_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")


@dataclass(frozen=True)
class JoinedUnit:
    """A unit the joiner has decided to release for scoring.

    Attributes:
        unit: the unit built from the readings present (no label).
        inputs: per present modality, where its reading was read from.
        complete: whether every expected modality is present.
        missing: expected modalities with no reading, in canonical order.
        closed_by: what closed the unit, one of :data:`CLOSE_REASONS`.
        first_seen: processing time of the unit's first reading, seconds.
        duplicates: further readings of a modality already present, ignored (the first one is kept).
        last_seen: processing time of the unit's newest kept reading, seconds (start of decision latency).
    """

    unit: Unit
    inputs: Mapping[str, InputCoordinate]
    complete: bool
    missing: tuple[str, ...]
    closed_by: str
    first_seen: float
    duplicates: int = 0
    last_seen: float = field(default=math.nan)

    @property
    def coordinates(self) -> tuple[InputCoordinate, ...]:
        """Every input coordinate, sorted (as :class:`~inspection.records.Decision` stores them)."""
        return tuple(sorted(self.inputs.values()))


@dataclass(frozen=True)
class LateReading:
    """A reading the joiner did not attach to a pending unit.

    Attributes:
        reading: the reading as decoded.
        coordinate: where it was read from.
        unit_id: the unit it names.
        reason: ``late`` (its unit was already decided) or ``line_mismatch`` (its unit is pending under
            another line_id).
    """

    reading: Reading
    coordinate: InputCoordinate
    unit_id: str
    reason: str = "late"


@dataclass
class _Pending:
    """Mutable state of one held unit."""

    unit_id: str
    line_id: str
    partition: int
    first_seen: float
    last_seen: float
    newest_event: datetime
    readings: dict[str, Reading] = field(default_factory=dict)
    inputs: dict[str, InputCoordinate] = field(default_factory=dict)
    duplicates: int = 0


class UnitJoiner:
    """Holds the readings of each unit until the unit is complete, timed out, overtaken or evicted.

    Memory is bounded: at most ``max_pending`` units and ``late_memory`` decided unit ids. ``add`` is O(1)
    amortised; ``poll`` is O(units closed) for timeouts plus O(pending) when a watermark advanced;
    ``held_offsets`` is O(pending).

    Args:
        config: the join settings.
    """

    def __init__(self, config: JoinConfig | None = None) -> None:
        if config is None:
            config = JoinConfig()
        if not isinstance(config, JoinConfig):
            raise ConfigError(f"config must be a JoinConfig; got {type(config).__name__}")
        self.config = config
        self._expected = frozenset(config.expected)
        self._lag = timedelta(seconds=config.watermark_lag_s)
        # unit_id -> state, in order of first arrival (first_seen is non-decreasing front to back).
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._decided: OrderedDict[str, None] = OrderedDict()
        self._max_event: dict[int, datetime] = {}
        self._watermark_dirty = False
        self._clock = -math.inf
        self.completed = 0
        self.timed_out = 0
        self.watermark_closed = 0
        self.capacity_closed = 0
        self.flushed = 0
        self.late = 0
        self.line_mismatches = 0
        self.duplicates = 0

    # ------------------------------------------------------------------------------------------ inputs
    def add(self, reading: Reading, coordinate: InputCoordinate, now: float) -> list[JoinedUnit | LateReading]:
        """Add one decoded reading.

        Args:
            reading: a vision, vibration or temperature reading.
            coordinate: where it was read from.
            now: processing time, seconds.

        Returns:
            What this reading settles, in order: a :class:`LateReading` when its unit was already decided (or
            is held under another line), a complete :class:`JoinedUnit` when it brings the last expected
            modality, and any units closed early because the joiner went over ``max_pending``. Usually empty.

        Raises:
            TypeError: ``reading`` is not a reading or ``coordinate`` not an InputCoordinate.
            ValueError: ``now`` is not a finite number.
        """
        modality = getattr(reading, "modality", None)
        if modality not in READING_TYPES or not isinstance(reading, READING_TYPES[modality]):
            raise TypeError(f"reading must be one of {[t.__name__ for t in READING_TYPES.values()]}; "
                            f"got {type(reading).__name__}")
        if not isinstance(coordinate, InputCoordinate):
            raise TypeError(f"coordinate must be an InputCoordinate; got {type(coordinate).__name__}")
        now = self._tick(now)
        self._observe_event_time(coordinate.partition, reading.event_time)

        unit_id = reading.unit_id
        if unit_id in self._decided:
            self._decided.move_to_end(unit_id)
            self.late += 1
            return [LateReading(reading, coordinate, unit_id, "late")]

        state = self._pending.get(unit_id)
        if state is None:
            state = _Pending(unit_id, reading.line_id, coordinate.partition, now, now, reading.event_time)
            self._pending[unit_id] = state
        elif state.line_id != reading.line_id:
            self.line_mismatches += 1
            return [LateReading(reading, coordinate, unit_id, "line_mismatch")]
        elif modality in state.readings:
            state.duplicates += 1
            self.duplicates += 1
            return []

        state.readings[modality] = reading
        state.inputs[modality] = coordinate
        state.last_seen = now
        state.newest_event = max(state.newest_event, reading.event_time)
        if state.newest_event < self._watermark(state.partition):
            self._watermark_dirty = True

        out: list[JoinedUnit | LateReading] = []
        if self._expected <= state.readings.keys():
            out.append(self._close(unit_id, "complete"))
        while len(self._pending) > self.config.max_pending:
            out.append(self._close(next(iter(self._pending)), "capacity"))
        return out

    def poll(self, now: float) -> list[JoinedUnit]:
        """Close the units whose timeout passed or that fell behind their partition's watermark.

        A unit that qualifies for both is closed by ``timeout``.

        Args:
            now: processing time, seconds.

        Returns:
            The closed units (partial ones with ``complete=False`` and their ``missing`` modalities),
            timeouts first in order of first arrival, then watermark closes in order of first arrival.
        """
        now = self._tick(now)
        out: list[JoinedUnit] = []
        deadline = now - self.config.timeout_s
        while self._pending:
            unit_id, state = next(iter(self._pending.items()))
            if state.first_seen > deadline:
                break
            out.append(self._close(unit_id, "timeout"))
        if self._watermark_dirty:
            self._watermark_dirty = False
            behind = [
                unit_id
                for unit_id, state in self._pending.items()
                if state.newest_event < self._watermark(state.partition)
            ]
            out.extend(self._close(unit_id, "watermark") for unit_id in behind)
        return out

    def flush(self) -> list[JoinedUnit]:
        """Close every held unit (graceful shutdown), in order of first arrival, with ``closed_by="flush"``."""
        return [self._close(unit_id, "flush") for unit_id in list(self._pending)]

    # ----------------------------------------------------------------------------------------- queries
    @property
    def pending(self) -> int:
        """How many units are held."""
        return len(self._pending)

    def held_offsets(self) -> dict[tuple[str, int], int]:
        """Per ``(topic, partition)``, the smallest offset still held by a pending unit.

        Topic-partitions with nothing held are absent. The committer may commit up to, not including, this
        offset on that topic-partition.
        """
        held: dict[tuple[str, int], int] = {}
        for state in self._pending.values():
            for c in state.inputs.values():
                key = (c.topic, c.partition)
                if key not in held or c.offset < held[key]:
                    held[key] = c.offset
        return held

    def oldest_pending_coordinates(self) -> dict[tuple[str, int], int]:
        """Same as :meth:`held_offsets`."""
        return self.held_offsets()

    def watermark(self, partition: int) -> datetime | None:
        """The event-time watermark of a partition number, or None before any reading was seen on it."""
        newest = self._max_event.get(partition)
        return None if newest is None else newest - self._lag

    def stats(self) -> dict[str, int]:
        """Counters since the joiner was built, plus the current ``pending`` count."""
        return {
            "completed": self.completed,
            "timed_out": self.timed_out,
            "watermark_closed": self.watermark_closed,
            "capacity_closed": self.capacity_closed,
            "flushed": self.flushed,
            "late": self.late,
            "line_mismatches": self.line_mismatches,
            "duplicates": self.duplicates,
            "pending": self.pending,
        }

    # ---------------------------------------------------------------------------------------- internals
    def _tick(self, now: float) -> float:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite processing time in seconds; got {now!r}")
        self._clock = max(self._clock, float(now))
        return self._clock

    def _observe_event_time(self, partition: int, event_time: datetime) -> None:
        newest = self._max_event.get(partition)
        if newest is None or event_time > newest:
            self._max_event[partition] = event_time
            if newest is not None:  # the first time seen cannot put any unit behind its own watermark
                self._watermark_dirty = True

    def _watermark(self, partition: int) -> datetime:
        # Every pending unit's partition has seen a reading, so the entry exists.
        return self._max_event[partition] - self._lag

    def _close(self, unit_id: str, closed_by: str) -> JoinedUnit:
        state = self._pending.pop(unit_id)
        self._decided[unit_id] = None
        self._decided.move_to_end(unit_id)
        while len(self._decided) > self.config.late_memory:
            self._decided.popitem(last=False)
        missing = tuple(m for m in self.config.expected if m not in state.readings)
        counter = {"complete": "completed", "timeout": "timed_out", "watermark": "watermark_closed",
                   "capacity": "capacity_closed", "flush": "flushed"}[closed_by]
        setattr(self, counter, getattr(self, counter) + 1)
        return JoinedUnit(
            unit=Unit(state.unit_id, state.line_id, **state.readings),
            inputs=MappingProxyType(dict(state.inputs)),
            complete=not missing,
            missing=missing,
            closed_by=closed_by,
            first_seen=state.first_seen,
            duplicates=state.duplicates,
            last_seen=state.last_seen,
        )
