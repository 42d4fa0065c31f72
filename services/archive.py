"""Archive sink: every scored unit, as Parquet history files for re-scoring.

Units are buffered and written by a background thread with :func:`inspection.data.history.write_history`,
one file per ``rotate_units`` units or per ``rotate_s`` seconds, whichever comes first, named
``units-<instance>-<UTC time>-<sequence>.parquet`` (written under a ``.partial`` name and renamed, so a
reader never sees half a file). The readings are stored as they travel on Kafka, with their input
coordinates, so ``inspection rescore`` decodes them through the same codec as the stream.

The service counts a unit's offsets as settled only after its file is written (``on_written``), so a crash
before the write re-reads the unit instead of losing it from the archive.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inspection.data.history import ArchivedUnit, write_history
from inspection.errors import ConfigError

log = logging.getLogger(__name__)

_STOP = object()


class ArchiveSink:
    """Background Parquet writer.

    Args:
        directory: where files go (created if missing).
        instance: names the files of this service instance.
        rotate_units: units per file.
        rotate_s: longest a unit waits in the buffer, seconds.
        on_written: called from the writer thread with the ``token`` of every unit in a file once it is on disk.

    Raises:
        ConfigError: the directory cannot be created.
    """

    def __init__(self, directory: Path | str, instance: str, rotate_units: int, rotate_s: float,
                 on_written: Callable[[list[Any]], None]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"archive.path {self.directory} cannot be created: {exc}") from exc
        self.instance = instance
        self.rotate_units = rotate_units
        self.rotate_s = rotate_s
        self.on_written = on_written
        self.files_written = 0
        self.units_written = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._flush_requested = threading.Event()

    def start(self) -> ArchiveSink:
        self._thread.start()
        return self

    def put(self, unit: ArchivedUnit, token: Any) -> None:
        """Queue one unit; ``token`` comes back through ``on_written``."""
        self._queue.put((unit, token))

    def flush(self) -> None:
        """Ask the writer to write what it holds now (returns at once)."""
        self._flush_requested.set()
        self._queue.put(None)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what is buffered and stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        buffer: list[tuple[ArchivedUnit, Any]] = []
        first_at: float | None = None
        seq = 0
        while True:
            timeout = None if first_at is None else max(0.0, first_at + self.rotate_s - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            stop = item is _STOP
            if item is not None and not stop:
                buffer.append(item)
                if first_at is None:
                    first_at = time.monotonic()
            due = first_at is not None and time.monotonic() >= first_at + self.rotate_s
            if buffer and (stop or due or len(buffer) >= self.rotate_units or self._flush_requested.is_set()):
                seq += 1
                self._write(buffer, seq)
                buffer, first_at = [], None
            self._flush_requested.clear()
            if stop:
                return

    def _write(self, buffer: list[tuple[ArchivedUnit, Any]], seq: int) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.directory / f"units-{self.instance}-{stamp}-{seq:06d}.parquet"
        try:
            n = write_history(path, [u for u, _ in buffer])
        except Exception:  # noqa: BLE001 - an archive failure must not stop scoring; offsets stay held
            log.exception("could not write %d units to the archive %s; their offsets stay uncommitted and will "
                          "be re-read after a restart", len(buffer), path)
            return
        self.files_written += 1
        self.units_written += n
        log.info("archived %d units to %s", n, path)
        self.on_written([token for _, token in buffer])
