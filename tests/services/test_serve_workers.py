"""``inspection serve --workers N``: N real service processes in one group on a real broker, supervised."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from services.workers import worker_command

from .conftest import ServeProcess, http_get

START_TIMEOUT_S = 120.0


def _free_pair() -> int:
    """A port p with p and p + 1 both free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _wait_ready(proc: subprocess.Popen, ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the supervisor exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        if all(http_get(p, "/readyz")[0] == 200 for p in ports):
            return
        time.sleep(0.25)
    pytest.fail(f"the workers were not ready within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _decided(port: int) -> float:
    body = http_get(port, "/metrics")[1]
    return sum(float(v) for v in re.findall(r'^inspection_decisions_total\{decision="[a-z]+"\} (\S+)$', body, re.M))


def _worker_pids(log: Path) -> dict[int, int]:
    """Worker index -> pid of its newest start, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", log.read_text())}


def test_worker_command_keeps_the_serve_arguments_and_numbers_the_instances():
    cmd = worker_command(["--config", "/etc/s.yaml", "--group-id", "g"], 2, "line7", 9100, verbose=1)
    assert cmd[1:] == ["-m", "services.cli", "-v", "serve", "--config", "/etc/s.yaml", "--group-id", "g",
                       "--instance-id", "line7-w2", "--metrics-port", "9102"]
    assert worker_command([], 3, "x", 0)[-1] == "0"  # a free port each


def test_two_workers_split_the_partitions_and_a_killed_worker_is_replaced(
        broker, topics, unit_factory, service_config, publish, read_topic, parse_decisions, tmp_path):
    config = tmp_path / "service.json"
    config.write_text(json.dumps(service_config(join={"timeout_s": 5.0}).resolved()))
    port = _free_pair()
    log = tmp_path / "supervisor.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([ServeProcess.EXE, "serve", "--bootstrap", broker.bootstrap, "--config", str(config),
                                 "--workers", "2", "--metrics-port", str(port), "--instance-id", "t"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, [port, port + 1], log)
        rng = np.random.default_rng(11)
        first = [unit_factory(i, rng) for i in range(24)]
        publish(first, topics)
        got = parse_decisions(read_topic(topics.decisions, len(first)))
        assert {d.unit_id for d in got} == {u.unit_id for u in first}
        deadline = time.monotonic() + 30  # the counters follow the acknowledgements
        while (_decided(port) + _decided(port + 1)) < len(first) and time.monotonic() < deadline:
            time.sleep(0.2)
        shares = [_decided(port), _decided(port + 1)]
        assert sum(shares) >= len(first) and min(shares) > 0, shares  # both workers decided units

        pids = _worker_pids(log)
        os.kill(pids[0], signal.SIGKILL)  # a worker dies (OOM-style); the supervisor replaces it
        deadline = time.monotonic() + START_TIMEOUT_S
        while _worker_pids(log).get(0) == pids[0]:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        _wait_ready(proc, [port, port + 1], log)
        second = [unit_factory(i, rng) for i in range(24, 48)]
        publish(second, topics)
        everything = parse_decisions(read_topic(topics.decisions, len(first) + len(second)))
        ids = defaultdict(set)
        for d in everything:
            ids[d.unit_id].add(d.id)
        assert set(ids) == {u.unit_id for u in first + second}  # nothing lost
        assert all(len(v) == 1 for v in ids.values())  # a unit decided twice carries one decision id

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        summaries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert len(summaries) == 2  # the two live workers drained and reported
        assert "restarting it" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _worker_pids(log).values():  # a worker the supervisor left behind (ours: checked by its command)
            with contextlib.suppress(OSError):
                if b"services.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
