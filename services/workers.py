"""Many service processes on one host: ``inspection serve --workers N``.

One Python process decodes, joins and scores on one scorer thread, and the GIL caps what it can consume. With
``--workers N`` the command starts N ordinary service processes (``inspection serve`` with the same config and
consumer group, instance ids ``<id>-w0`` .. ``<id>-w<N-1>``, and ``/metrics`` on consecutive ports from
``metrics.port``) and supervises them. They share the GPU (each holds its own copy of the model) and split the
input partitions between them as any members of one consumer group do, so every delivery guarantee of a single
instance holds unchanged: the join needs a unit's readings on one member, which the co-partitioned input
topics and the group's range assignment give (see docs/service.md); a worker that dies is replaced and its
partitions' uncommitted units are read again by whoever owns them next.

SIGTERM or SIGINT to the supervisor is passed to every worker; each drains, commits and prints its summary,
and the supervisor exits 0 when all of them did. A worker that exits on its own (a crash, an out-of-memory
kill) is restarted after a backoff that doubles up to 30 s; one that fails ``max_restarts`` times within ten
minutes stops the supervisor, which then stops the others and exits 1.

With N workers there are N times the input partitions' worth of parallelism to use: give the input topics at
least N partitions (more is better for balance), and consider ``model.threads`` (CPU threads per worker).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_BACKOFF_MAX_S = 30.0
_WINDOW_S = 600.0


def worker_command(serve_args: Sequence[str], index: int, instance_id: str, metrics_port: int,
                   verbose: int = 0) -> list[str]:
    """The command line of worker ``index``: ``inspection serve`` with ``serve_args`` (config, bootstrap,
    group), its own instance id and its metrics port (``metrics_port + index``; 0 stays 0: a free port)."""
    port = metrics_port + index if metrics_port else 0
    return [sys.executable, "-m", "services.cli", *(["-" + "v" * verbose] if verbose else []), "serve",
            *serve_args, "--instance-id", f"{instance_id}-w{index}", "--metrics-port", str(port)]


class Supervisor:
    """Starts, restarts and stops N worker processes.

    Args:
        commands: one command line per worker.
        max_restarts: restarts of one worker within ten minutes before the supervisor gives up.
        env: environment of the workers (default: this process's).
    """

    def __init__(self, commands: Sequence[Sequence[str]], *, max_restarts: int = 5,
                 env: dict[str, str] | None = None) -> None:
        if not commands:
            raise ValueError("need at least one worker")
        self.commands = [list(c) for c in commands]
        self.max_restarts = max_restarts
        self.env = env
        self.procs: list[subprocess.Popen | None] = [None] * len(commands)
        self.restarts = [0] * len(commands)
        self._recent: list[deque[float]] = [deque() for _ in commands]
        self._stop = threading.Event()
        self.failed: str | None = None

    def stop(self) -> None:
        """Ask every worker to drain and stop (SIGTERM); :meth:`run` returns once all have exited."""
        self._stop.set()

    def _start(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.commands[i], env=self.env)
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)

    def run(self) -> int:
        """Run until :meth:`stop` or a worker fails too often; returns the exit code (0: every worker stopped
        cleanly after :meth:`stop`)."""
        for i in range(len(self.commands)):
            self._start(i)
        due: dict[int, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                if i in due:
                    if now >= due[i]:
                        del due[i]
                        self._start(i)
                    continue
                code = proc.poll() if proc is not None else None
                if code is None:
                    continue
                recent = self._recent[i]
                recent.append(now)
                while recent and recent[0] < now - _WINDOW_S:
                    recent.popleft()
                if len(recent) > self.max_restarts:
                    self.failed = f"worker {i} exited {len(recent)} times within {_WINDOW_S:.0f} s (last code {code})"
                    log.error("%s; stopping the others", self.failed)
                    self._stop.set()
                    break
                delay = min(_BACKOFF_MAX_S, 0.5 * 2 ** (len(recent) - 1))
                self.restarts[i] += 1
                log.warning("worker %d (pid %d) exited with code %d; restarting it in %.1f s", i, proc.pid, code,
                            delay)
                due[i] = now + delay
            self._stop.wait(0.2)
        codes = self._terminate()
        if self.failed:
            return 1
        return 0 if all(c == 0 for c in codes) else 1

    def _terminate(self) -> list[int]:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            if p is None:
                continue
            try:
                codes.append(p.wait(timeout=180))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop within 180 s; killing it", p.pid)
                p.kill()
                codes.append(p.wait())
        return codes


def run_workers(serve_args: Sequence[str], workers: int, instance_id: str, metrics_port: int,
                verbose: int = 0) -> int:
    """``inspection serve --workers N``: supervise N workers until SIGTERM/SIGINT (see the module docstring)."""
    commands = [worker_command(serve_args, i, instance_id, metrics_port, verbose) for i in range(workers)]
    # the workers import this checkout's packages even when it is not installed
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    supervisor = Supervisor(commands, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.stop())
    return supervisor.run()
