"""Fixtures of the stream-service tests: real composite units, a model store, a running service, readers.

Everything is real: units are drawn from the real data sets, the model is saved to and loaded from a real
model store, the service talks to the session's Tansu broker, and decisions are read back from the broker.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inspection.errors import DataError
from services.broker import TopicNames

#: Seconds a service may take to load its model and join its group (Tansu holds a join ~3 s).
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def composite_units() -> list:
    """1,000 real composite units (real ELPV image + real bearing window + SKAB or simulated temperature)."""
    from inspection.data import skab
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    try:
        skab.skab_root()
        source = "auto"
    except DataError:
        source = "synthetic"
    return CompositeBuilder(CompositeConfig(seed=5, temperature_source=source)).units("test", 1000)


@pytest.fixture(scope="session")
def serving_store(serving_store_factory) -> Path:
    """A model store with one promoted, calibrated small model (shared by the tests that only read it)."""
    return serving_store_factory()


@pytest.fixture
def service_config(topics: TopicNames, serving_store: Path, group_id: str, tmp_path: Path):
    """Build a :class:`ServiceConfig` for this test's topics, store and group; keyword args override sections."""
    from services.service_config import ServiceConfig

    def build(**sections: Any):
        data: dict[str, Any] = {
            "model": {"store": str(serving_store), "device": "cpu", "reload_interval_s": 1.0},
            "topics": {name: getattr(topics, name) for name in ("vision", "vibration", "temperature", "decisions",
                                                               "dlq")},
            "join": {"timeout_s": 3.0},
            "batching": {"max_batch": 32, "max_delay_ms": 20, "max_queue": 256},
            "metrics": {"port": 0},
            "kafka": {"group_id": group_id, "commit_interval_ms": 200},
            "run_dir": str(tmp_path / "run"),
            "shutdown_timeout_s": 60,
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return ServiceConfig.from_mapping(data)

    return build


@pytest.fixture
def run_service() -> Callable[..., contextlib.AbstractContextManager]:
    """Context manager: run a :class:`StreamService` in a thread until the block ends (graceful stop)."""
    from services.serve import StreamService

    @contextlib.contextmanager
    def run(config, bootstrap: str, **kwargs) -> Iterator[StreamService]:
        service = StreamService(config, bootstrap, **kwargs)
        failure: list[BaseException] = []

        def target() -> None:
            try:
                service.run()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                failure.append(exc)

        thread = threading.Thread(target=target, name=f"service-{service.instance}", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not service.wait_ready(0.2):
                if failure:
                    raise failure[0]
                assert time.monotonic() < deadline, "the service did not become ready"
            yield service
        finally:
            service.stop()
            thread.join(120)
            assert not thread.is_alive(), "the service did not stop"
        if failure:
            raise failure[0]

    return run


@pytest.fixture
def publish(broker) -> Callable[..., Any]:
    """Publish units (and optional faults) to the input topics with the project's publisher."""
    from services.clients import make_producer
    from services.publish import FaultPlan, publish_units

    def send(units, topics: TopicNames, faults: FaultPlan | None = None, rate: float = 0.0):
        producer = make_producer(broker.bootstrap)
        try:
            return publish_units(producer, units, topics, faults=faults or FaultPlan(), rate=rate)
        finally:
            producer.close(timeout=10)

    return send


@pytest.fixture
def read_topic(broker) -> Callable[..., list]:
    """Read a topic from the beginning with a fresh group until ``count`` records arrived or it went idle."""
    from services.clients import make_consumer, wait_for_assignment

    def read(topic: str, count: int | None = None, *, idle_s: float = 10.0, timeout_s: float = 300.0) -> list:
        consumer = make_consumer([topic], broker.bootstrap, f"reader-{uuid.uuid4().hex}")
        records: list = []
        try:
            wait_for_assignment(consumer, timeout_s=30)
            deadline = time.monotonic() + timeout_s
            last = time.monotonic()
            while time.monotonic() < deadline:
                batch = consumer.poll(timeout_ms=200)
                got = [r for recs in batch.values() for r in recs]
                records.extend(got)
                if got:
                    last = time.monotonic()
                if count is not None and len(records) >= count:
                    # keep reading briefly: anything beyond ``count`` would be a duplicate the test must see
                    if time.monotonic() - last >= 1.0:
                        break
                elif time.monotonic() - last >= idle_s:
                    break
        finally:
            consumer.close(autocommit=False)
        return records

    return read


def decisions_of(records: list) -> list:
    """Parse decision records (validating each, id included)."""
    from inspection.records import Decision

    return [Decision.from_json(r.value) for r in records]


@pytest.fixture
def parse_decisions() -> Callable[[list], list]:
    return decisions_of


@pytest.fixture
def metric_value() -> Callable[..., float]:
    """A sample value from a service's registry (0 when the series does not exist yet)."""

    def value(service, name: str, **labels: str) -> float:
        got = service.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if got is None else float(got)

    return value


def http_get(port: int, path: str) -> tuple[int, str]:
    """``(status, body)`` of ``GET path`` on ``127.0.0.1:port``; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class ServeProcess:
    """``inspection serve`` as a real child process, as deployed: started (again, on the same metrics port, after a
    kill), waited for until ``/readyz`` answers 200, its HTTP endpoints read; output goes to ``log_path``."""

    EXE = str(Path(sys.executable).parent / "inspection")
    #: A service process imports torch and timm, loads its model and joins the group: allow a minute and a half.
    START_TIMEOUT_S = 90.0

    def __init__(self, config_path: Path, bootstrap: str, log_path: Path, group: str | None = None) -> None:
        self.config_path, self.bootstrap, self.log_path, self.group = config_path, bootstrap, log_path, group
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        args = [self.EXE, "serve", "--bootstrap", self.bootstrap, "--config", str(self.config_path),
                "--metrics-port", str(self.port)]
        if self.group:
            args += ["--group-id", self.group]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.proc

    def get(self, path: str) -> tuple[int, str]:
        """``(status, body)`` of ``GET path`` on the metrics port; status 0 when nothing answers."""
        return http_get(self.port, path)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the service exited with {self.proc.returncode}:\n{self.log_tail()}"
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.25)
        pytest.fail(f"the service was not ready within {self.START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """Factory of :class:`ServeProcess`; every process still running at the end of the test is killed."""
    made: list[ServeProcess] = []

    def make(config_path: Path, bootstrap: str, log_path: Path, group: str | None = None) -> ServeProcess:
        made.append(ServeProcess(config_path, bootstrap, log_path, group))
        return made[-1]

    yield make
    for process in made:
        process.kill()


def headers_of(record) -> dict[str, str]:
    return {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in record.headers or ()}


@pytest.fixture
def dlq_headers() -> Callable[[Any], dict[str, str]]:
    return headers_of


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)[:2000]
