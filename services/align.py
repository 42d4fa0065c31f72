"""Event-time alignment of the co-partitioned input topics, and the offsets that are safe to commit.

:class:`EventTimeAligner` decides the order in which consumed readings reach the join. A consumer fetches
each topic-partition separately: after a restart with a backlog, one poll may return hundreds of vibration
readings before the first image of the same units. Handed to the join in that order, the partition's
event-time watermark would race ahead and close every pending unit with modalities "missing" that are only
not fetched yet. So readings are buffered per input partition and released per partition number (the three
topics' partitions with the same number hold the same units) in Kafka-timestamp order, the smallest first,
and a topic that has fallen behind by more than the watermark lag is waited for, at most ``idle_s`` since it
last delivered (as Kafka Streams' ``max.task.idle.ms``).

:class:`OffsetTracker` records, per input partition, the next offset not yet processed and every offset
still needed by a unit that is being scored, acknowledged or archived, or by a dead letter not yet
acknowledged. With the join's held offsets it gives the commit position: the lowest offset still needed.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from inspection.records import InputCoordinate

TopicPartitionKey = tuple[str, int]


class EventTimeAligner:
    """Buffers consumer records per input partition and releases them in timestamp order per partition number.

    The record with the smallest timestamp among the partition number's buffered heads is released, unless
    a topic whose buffer is empty is *behind*: the head is more than ``lag_ms`` newer than anything that
    topic delivered (or it delivered nothing yet). Releasing the head could then move the join's watermark
    past readings that topic has not delivered: still unread in the broker after a restart, or still on
    their way (a large image trailing the small temperature readings of the same unit). A topic that is
    behind is waited for at most ``idle_s`` since it last delivered a record; after that it counts as idle
    (a sensor that is down) and the others go on without it until it delivers again.

    A topic that is not behind is never waited for: whatever it delivers next is at least as new as what it
    delivered last, so the watermark cannot pass it. In real-time operation (readings of a unit within
    seconds of each other, ``lag_ms`` of tens of seconds) nothing ever waits.

    A record's Kafka timestamp is producer-set and may be wrong: one further ahead of the wall clock than
    ``max_future_ms`` counts as the wall clock plus that skew, so a single far-future timestamp cannot make the
    alignment stop waiting for a topic on its partition for good.

    Args:
        topics: the input topics, in tie-break order.
        idle_s: longest wait for a topic that delivers nothing, in seconds of the caller's clock.
        lag_ms: the join's watermark lag in milliseconds.
        max_future_ms: largest lead of a timestamp over the wall clock that is taken as it is; None trusts every
            timestamp.
        wall_ms: the wall clock in epoch milliseconds (``time.time()``-based by default).
    """

    def __init__(self, topics: Iterable[str], idle_s: float, lag_ms: float,
                 max_future_ms: float | None = None, wall_ms: Callable[[], float] | None = None) -> None:
        self.topics = tuple(topics)
        self.idle_s = float(idle_s)
        self.lag_ms = float(lag_ms)
        self.max_future_ms = None if max_future_ms is None else float(max_future_ms)
        self._wall_ms = wall_ms or (lambda: time.time() * 1000.0)
        self._order = {t: i for i, t in enumerate(self.topics)}
        self._buffers: dict[TopicPartitionKey, deque[Any]] = {}
        self._last_ts: dict[TopicPartitionKey, int] = {}
        self._waiting_since: dict[TopicPartitionKey, float] = {}
        #: Whether the last :meth:`release` held records back to wait for a topic (more input is needed).
        self.waiting = False

    def add(self, record: Any) -> None:
        """Buffer one consumer record (``topic``, ``partition``, ``offset`` and ``timestamp`` are used)."""
        key = (record.topic, record.partition)
        self._buffers.setdefault(key, deque()).append(record)
        self._waiting_since.pop(key, None)

    def size(self, key: TopicPartitionKey) -> int:
        buf = self._buffers.get(key)
        return len(buf) if buf else 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def sizes(self) -> dict[TopicPartitionKey, int]:
        return {k: len(b) for k, b in self._buffers.items() if b}

    def first_offsets(self) -> dict[TopicPartitionKey, int]:
        """Per input partition with buffered records, the lowest buffered offset."""
        return {k: min(r.offset for r in b) for k, b in self._buffers.items() if b}

    def release(self, now: float, owned: Callable[[str, int], bool], limit: int | None = None) -> list[Any]:
        """Records ready for the join, in order.

        Args:
            now: the caller's clock, seconds.
            owned: ``(topic, partition) -> bool``: whether the consumer owns that input partition (one it
                does not own is never waited for).
            limit: release at most this many records.

        Returns:
            Records, per partition number in ascending timestamp order (ties: topic order, then offset); the
            partition numbers take turns, one record each.
        """
        out: list[Any] = []
        self.waiting = False
        ceiling = None if self.max_future_ms is None else int(self._wall_ms() + self.max_future_ms)
        active = sorted({p for (_, p), buf in self._buffers.items() if buf})
        # one record per partition number per pass, so a limit never starves the higher partition numbers
        while active and (limit is None or len(out) < limit):
            still = []
            for p in active:
                if limit is not None and len(out) >= limit:
                    still.append(p)
                    continue
                record = self._next(p, now, owned, ceiling)
                if record is not None:
                    out.append(record)
                    still.append(p)
            active = still
        return out

    def _next(self, p: int, now: float, owned: Callable[[str, int], bool], ceiling: int | None) -> Any | None:
        """The next record of partition number ``p``, or None when it is empty or must wait (timestamps capped
        at ``ceiling``)."""
        heads = [(t, self._buffers.get((t, p))) for t in self.topics]
        ready = [(t, buf) for t, buf in heads if buf]
        if not ready:
            return None
        topic, buf = min(ready, key=lambda tb: (_timestamp(tb[1][0], ceiling), self._order[tb[0]], tb[1][0].offset))
        head = _timestamp(buf[0], ceiling)
        if self._must_wait(p, head, [t for t, b in heads if not b], now, owned):
            self.waiting = True
            return None
        key = (topic, p)
        self._last_ts[key] = max(self._last_ts.get(key, head), head)
        return buf.popleft()

    def _must_wait(self, p: int, head: int, empty: list[str], now: float, owned: Callable[[str, int], bool]) -> bool:
        wait = False
        for t in empty:
            key = (t, p)
            last = self._last_ts.get(key)
            if not owned(t, p) or (last is not None and head <= last + self.lag_ms):
                continue
            since = self._waiting_since.setdefault(key, now)
            if now - since < self.idle_s:
                wait = True
        return wait

    def discard(self) -> None:
        """Drop every buffered record and what was learnt about the topics (after a revocation)."""
        self._buffers.clear()
        self._last_ts.clear()
        self._waiting_since.clear()


def _timestamp(record: Any, ceiling: int | None = None) -> int:
    ts = getattr(record, "timestamp", None)
    ts = ts if isinstance(ts, int) and ts >= 0 else 0
    return ts if ceiling is None else min(ts, ceiling)


class OffsetTracker:
    """Offsets processed and offsets still needed, per input partition.

    A coordinate is *held* (with a count, one per sink that still needs it) from the moment its reading leaves
    the join (or is dead-lettered) until every sink acknowledged it. Each hold carries the tracker's
    generation; :meth:`reset` starts a new generation, and releases of older generations are ignored, so
    acknowledgements that arrive after a rebalance cannot free offsets of the new assignment.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._next: dict[TopicPartitionKey, int] = {}
        self._held: dict[TopicPartitionKey, Counter[int]] = {}

    def processed(self, topic: str, partition: int, offset: int) -> None:
        """A record was taken out of the consumer and handed to the pipeline."""
        key = (topic, partition)
        if offset + 1 > self._next.get(key, -1):
            self._next[key] = offset + 1

    def hold(self, coordinates: Iterable[InputCoordinate], count: int = 1) -> int:
        """Hold coordinates for ``count`` sinks; returns the generation to release them with."""
        for c in coordinates:
            self._held.setdefault((c.topic, c.partition), Counter())[c.offset] += count
        return self.generation

    def release(self, coordinates: Iterable[InputCoordinate], generation: int) -> None:
        """One sink is done with these coordinates (ignored when ``generation`` is not the current one)."""
        if generation != self.generation:
            return
        for c in coordinates:
            held = self._held.get((c.topic, c.partition))
            if held is None or held.get(c.offset, 0) <= 0:
                continue
            held[c.offset] -= 1
            if held[c.offset] <= 0:
                del held[c.offset]

    def in_flight(self) -> int:
        """Coordinates still held by some sink."""
        return sum(len(h) for h in self._held.values())

    def safe_offsets(self, join_held: Mapping[TopicPartitionKey, int]) -> dict[TopicPartitionKey, int]:
        """Per processed input partition, the lowest offset still needed (the commit position).

        Args:
            join_held: the join's :meth:`~services.join.UnitJoiner.held_offsets`.
        """
        out = {}
        for key, nxt in self._next.items():
            candidates = [nxt]
            held = self._held.get(key)
            if held:
                candidates.append(min(held))
            if key in join_held:
                candidates.append(join_held[key])
            out[key] = min(candidates)
        return out

    def reset(self) -> None:
        """Forget everything and start a new generation (after the partitions were revoked)."""
        self.generation += 1
        self._next.clear()
        self._held.clear()
