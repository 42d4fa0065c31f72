"""Chaos run of ``inspection serve``: mixed codecs and malformed input while the service is killed and the broker
restarted; nothing may be lost.

    python bench/chaos.py                          # 600 units, 4 kills, 1 broker restart -> bench/results/chaos.json
    python bench/chaos.py --units 2000 --kills 6

One embedded broker on ``s3://`` storage (a local S3 emulator, ``moto[server]``, so topics, records and committed
offsets survive its restart), the demo model (trained first when ``models/demo`` has none) and the service as its
own process. A producer writes real composite units (ELPV image, bearing window, SKAB or simulated temperature)
in record batches whose codec is drawn per batch from none, gzip, snappy, lz4 and zstd (written the way
librdkafka and the Java client write them, with :mod:`services.rawbatch`). Among them it mixes malformed readings
(truncated PNGs, non-finite arrays, missing headers, keys that are not the unit id, null keys, event times in the
year 2999) and batches whose compressed payload is corrupt. Meanwhile the service is SIGKILLed and restarted at
random moments and the broker is restarted once.

Invariant: every unit is decided or dead-lettered, and every reading written appears in a decision's inputs or
in the dead-letter topic (by its coordinate, or inside an undecodable batch's offset range); a unit decided more
than once carries the same decision id each time. ``summary.lost`` counts units that break it: it must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inspection.codec import encode_reading  # noqa: E402
from inspection.records import MODALITIES, InputCoordinate  # noqa: E402
from services.broker import EmbeddedBroker, TopicNames, create_topics  # noqa: E402
from services.clients import make_consumer, wait_for_assignment  # noqa: E402
from services.rawbatch import CODECS, RawMessage, partition_for, produce_batch  # noqa: E402

PARTITIONS = 3
#: Kinds of malformed reading the producer mixes in, each with the dead-letter reason it must get.
MALFORMED: dict[str, str] = {
    "truncated_png": "image_decode_failed",
    "non_finite": "non_finite",
    "missing_header": "missing_header",
    "key_mismatch": "key_subject_mismatch",
    "null_key": "missing_key",
    "future_time": "event_time_in_future",
}


def log(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ input
def malformed(kind: str, reading) -> RawMessage:
    """``reading`` as a Kafka record, spoiled in the way ``kind`` names."""
    msg = encode_reading(reading)
    key, value, headers = msg.key, msg.value, list(msg.headers)
    if kind == "truncated_png":
        value = value[: len(value) // 2]
    elif kind == "non_finite":
        value = b"\x00\x00\xc0\x7f" + value[4:]  # a NaN as the first float32
    elif kind == "missing_header":
        headers = [(k, v) for k, v in headers if k != "ce_id"]
    elif kind == "key_mismatch":
        key = b"someone-else"
    elif kind == "null_key":
        key = None
    elif kind == "future_time":
        headers = [(k, b"2999-01-01T00:00:00Z" if k == "ce_time" else v) for k, v in headers]
    else:
        raise ValueError(f"unknown malformed kind {kind!r}")
    return RawMessage(key, value, headers, msg.timestamp_ms)


@dataclass
class Ledger:
    """What the producer wrote: every reading's coordinate and what must become of it."""

    good: dict[InputCoordinate, str] = field(default_factory=dict)  # coordinate -> unit id
    bad: dict[InputCoordinate, tuple[str, str]] = field(default_factory=dict)  # coordinate -> (unit id, reason)
    corrupt: dict[InputCoordinate, str] = field(default_factory=dict)  # coordinate -> unit id
    units: dict[str, str] = field(default_factory=dict)  # unit id -> "good" | "bad" | "corrupt"
    codecs: Counter = field(default_factory=Counter)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def produce(bootstrap: str, topics: TopicNames, units: Sequence, ledger: Ledger, rng: random.Random, *,
            malformed_share: float, corrupt_share: float, rate: float, stop: threading.Event) -> None:
    """Write every unit (and the malformed extras) in batches, one codec drawn per batch; retries until the broker
    takes each batch (it may be restarting)."""
    codecs = list(CODECS)
    i, start, n_bad = 0, time.monotonic(), 0
    while i < len(units) and not stop.is_set():
        chunk = units[i: i + rng.randint(1, 6)]
        i += len(chunk)
        # per (modality, partition): the readings of this chunk, then any extras
        groups: dict[tuple[str, int], list[tuple[RawMessage, str, str | None]]] = defaultdict(list)
        for unit in chunk:
            with ledger.lock:
                ledger.units[unit.unit_id] = "good"
            p = partition_for(unit.unit_id.encode(), PARTITIONS)
            for m in MODALITIES:
                msg = encode_reading(getattr(unit, m))
                groups[(m, p)].append((RawMessage(msg.key, msg.value, list(msg.headers), msg.timestamp_ms),
                                       unit.unit_id, None))
            if rng.random() < malformed_share:
                kind = rng.choice(sorted(MALFORMED))
                m = "vision" if kind == "truncated_png" else rng.choice(["vibration", "temperature"])
                if kind == "non_finite" and m == "vision":
                    m = "temperature"
                bad_id = f"bad-{n_bad}-{unit.unit_id}"
                n_bad += 1
                reading = dataclasses.replace(getattr(unit, m), unit_id=bad_id)
                with ledger.lock:
                    ledger.units[bad_id] = "bad"
                groups[(m, partition_for(bad_id.encode(), PARTITIONS))].append(
                    (malformed(kind, reading), bad_id, MALFORMED[kind]))
        for (m, p), items in groups.items():
            codec = rng.choice(codecs)
            _write(bootstrap, topics.for_modality(m), p, items, codec, False, ledger, stop)
        if rng.random() < corrupt_share:
            m, unit = rng.choice(MODALITIES), chunk[0]
            junk_id = f"junk-{n_bad}"
            n_bad += 1
            reading = dataclasses.replace(getattr(unit, m), unit_id=junk_id)
            msg = encode_reading(reading)
            with ledger.lock:
                ledger.units[junk_id] = "corrupt"
            _write(bootstrap, topics.for_modality(m), partition_for(junk_id.encode(), PARTITIONS),
                   [(RawMessage(msg.key, msg.value, list(msg.headers), msg.timestamp_ms), junk_id, None)],
                   rng.choice(codecs[1:]), True, ledger, stop)
        if rate > 0:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))


def _write(bootstrap: str, topic: str, partition: int, items, codec: str, corrupt: bool, ledger: Ledger,
           stop: threading.Event) -> None:
    from inspection.errors import BrokerError

    while not stop.is_set():
        try:
            first = produce_batch(bootstrap, topic, partition, [it[0] for it in items], codec, corrupt=corrupt)
            break
        except BrokerError:
            ledger.retries += 1
            time.sleep(0.5)
    else:
        return
    with ledger.lock:
        ledger.codecs[codec] += 1
        for k, (_, unit_id, reason) in enumerate(items):
            c = InputCoordinate(topic, partition, first + k)
            if corrupt:
                ledger.corrupt[c] = unit_id
            elif reason is None:
                ledger.good[c] = unit_id
            else:
                ledger.bad[c] = (unit_id, reason)


# ------------------------------------------------------------------------------------------------ output
class Outcome:
    """Reads the decisions and dead-letter topics in the background (survives a broker restart)."""

    def __init__(self, bootstrap: str, topics: TopicNames) -> None:
        self.topics = topics
        self.decisions: dict[str, list] = defaultdict(list)
        self.dead: dict[InputCoordinate, tuple[str, str]] = {}
        self.markers: list[tuple[str, int, int, int]] = []  # topic, partition, first, last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = make_consumer([topics.decisions, topics.dlq], bootstrap, f"chaos-{uuid.uuid4().hex[:8]}",
                                       reconnect_backoff_max_ms=1000)
        wait_for_assignment(self._consumer, timeout_s=60)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from inspection.records import Decision

        while not self._stop.is_set():
            try:
                batch = self._consumer.poll(timeout_ms=200)
            except Exception:  # noqa: BLE001 - the broker may be restarting
                time.sleep(0.5)
                continue
            with self._lock:
                for tp, records in batch.items():
                    for r in records:
                        if tp.topic == self.topics.decisions:
                            d = Decision.from_json(r.value)
                            self.decisions[d.unit_id].append(d)
                            continue
                        h = {k: (v or b"").decode("utf-8", "replace") for k, v in r.headers}
                        c = InputCoordinate(h["dlq_topic"], int(h["dlq_partition"]), int(h["dlq_offset"]))
                        self.dead[c] = (h["dlq_stage"], h["dlq_reason"])
                        if h["dlq_stage"] == "fetch":
                            self.markers.append((c.topic, c.partition, c.offset, int(h["dlq_last_offset"])))

    def snapshot(self):
        with self._lock:
            return dict(self.decisions), dict(self.dead), list(self.markers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(Exception):
            self._consumer.close(autocommit=False)


def account(ledger: Ledger, outcome: Outcome) -> dict:
    """Which units and readings are settled (decided or dead-lettered), and how."""
    decisions, dead, markers = outcome.snapshot()
    used = {c for ds in decisions.values() for d in ds for c in d.inputs}

    def in_marker(c: InputCoordinate) -> bool:
        return any(t == c.topic and p == c.partition and a <= c.offset <= b for t, p, a, b in markers)

    with ledger.lock:
        readings = {**{c: u for c, u in ledger.good.items()}, **{c: u for c, (u, _) in ledger.bad.items()},
                    **ledger.corrupt}
        units = dict(ledger.units)
        bad = dict(ledger.bad)
    settled_reading = {c: (c in used or c in dead or in_marker(c)) for c in readings}
    by_unit: dict[str, list[InputCoordinate]] = defaultdict(list)
    for c, u in readings.items():
        by_unit[u].append(c)
    decided = {u for u in units if decisions.get(u)}
    dead_lettered = {u for u in units if u not in decided and by_unit[u]
                     and all(c in dead or in_marker(c) for c in by_unit[u])}
    lost_units = sorted(u for u in units if u not in decided and u not in dead_lettered)
    lost_readings = sorted(str(c) for c, ok in settled_reading.items() if not ok)
    wrong_reason = sorted(str(c) for c, (_, reason) in bad.items() if c in dead and dead[c][1] != reason)
    consistent = all(len({d.id for d in ds}) == 1 for ds in decisions.values())
    repeated = sum(len(ds) - 1 for ds in decisions.values())
    incomplete = sum(1 for u, ds in decisions.items() if units.get(u) == "good" and all(d.missing for d in ds))
    return {"units": len(units), "decided": len(decided), "dead_lettered": len(dead_lettered),
            "lost": len(lost_units), "lost_readings": len(lost_readings), "lost_examples": lost_units[:10],
            "lost_reading_examples": lost_readings[:10], "wrong_reason": wrong_reason[:10],
            "duplicate_ids_consistent": consistent, "repeated_decisions": repeated,
            "decided_with_modalities_missing": incomplete,
            "dlq_by_reason": dict(Counter(reason for _, reason in dead.values())),
            "undecodable_batches": len(markers)}


# ----------------------------------------------------------------------------------------------- service
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class ServiceProcess:
    """``inspection serve`` as a child process that can be killed and started again."""

    def __init__(self, config: dict, bootstrap: str, workdir: Path) -> None:
        self.config_path = workdir / "service.json"
        self.config_path.write_text(json.dumps(config))
        self.bootstrap, self.workdir = bootstrap, workdir
        self.log_path = workdir / "service.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self, ready_timeout_s: float = 180.0) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--bootstrap",
                                          self.bootstrap, "--config", str(self.config_path), "--metrics-port",
                                          str(self.port), "--instance-id", f"chaos-{self.starts}"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env=env)
        self.starts += 1
        deadline = time.monotonic() + ready_timeout_s
        while not ready(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM; returns the exit code (SIGKILL after ``timeout_s``, then the code is -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# --------------------------------------------------------------------------------------------------- run
def run_chaos(broker: EmbeddedBroker, store: Path, units: Sequence, workdir: Path, *, kills: int = 4,
              broker_restarts: int = 1, seed: int = 0, rate: float = 20.0, malformed_share: float = 0.15,
              corrupt_share: float = 0.05, settle_timeout_s: float = 300.0) -> dict:
    """Run the chaos scenario against ``broker`` (which must keep its data across a restart: ``s3://``).

    Returns:
        The accounting of :func:`account` plus ``kills``, ``broker_restarts``, ``codecs`` and the service's
        exit code on the final SIGTERM.
    """
    rng = random.Random(seed)
    topics = TopicNames.with_prefix(f"chaos{uuid.uuid4().hex[:8]}.")
    create_topics(broker.bootstrap, topics, PARTITIONS)
    config = {
        "model": {"store": str(store), "device": "cpu", "reload_interval_s": 0},
        "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
        # the units' event times are 10 s apart but they are produced 20 a second, 200x faster than a line
        # makes them: event time alone would close units long before their readings were read
        "join": {"timeout_s": 10.0, "watermark_lag_s": 3600.0},
        "kafka": {"group_id": f"chaos-{uuid.uuid4().hex[:8]}", "commit_interval_ms": 500},
        "metrics": {"port": 0},
        "shutdown_timeout_s": 60,
    }
    service = ServiceProcess(config, broker.bootstrap, workdir)
    service.start()
    outcome = Outcome(broker.bootstrap, topics)
    ledger = Ledger()
    stop = threading.Event()
    producer = threading.Thread(target=produce, args=(broker.bootstrap, topics, units, ledger, rng),
                                kwargs={"malformed_share": malformed_share, "corrupt_share": corrupt_share,
                                        "rate": rate, "stop": stop}, daemon=True)
    producer.start()
    duration = len(units) / rate if rate > 0 else 30.0
    # the faults at random moments while the producer runs: kills, and the broker restart among them
    events = ["kill"] * kills + ["broker"] * broker_restarts
    rng.shuffle(events)
    moments = sorted(rng.uniform(0.1, 0.9) * duration for _ in events)
    t0, done = time.monotonic(), Counter()
    try:
        for at, event in zip(moments, events, strict=True):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if event == "kill":
                log(f"SIGKILL the service at {time.monotonic() - t0:.1f} s")
                service.kill()
                time.sleep(rng.uniform(0.0, 2.0))
                service.start()
            else:
                log(f"restart the broker at {time.monotonic() - t0:.1f} s")
                broker.restart()
            done[event] += 1
        producer.join()
        log(f"produced; settling (up to {settle_timeout_s:.0f} s)")
        deadline = time.monotonic() + settle_timeout_s
        while time.monotonic() < deadline:
            result = account(ledger, outcome)
            if result["lost"] == 0 and result["lost_readings"] == 0:
                break
            time.sleep(1.0)
        time.sleep(3.0)  # late duplicates arrive too
        result = account(ledger, outcome)
    finally:
        stop.set()
        rc = service.stop()
        outcome.close()
    result.update({"kills": done["kill"], "broker_restarts": done["broker"],
                   "codecs": sorted(ledger.codecs), "batches_by_codec": dict(ledger.codecs),
                   "produce_retries": ledger.retries, "service_exit_code": rc, "service_starts": service.starts})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=600)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument("--rate", type=float, default=20.0, help="units per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "chaos"),
                        help="service, broker and S3 emulator logs (emptied first)")
    args = parser.parse_args(argv)

    import boto3

    sys.path.insert(0, str(ROOT / "bench"))
    from stream import benchmark_model_store, composite_units, run_metadata

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    store, model = benchmark_model_store("demo", None, "cpu", workdir)
    units = composite_units(args.units, seed=args.seed + 100)
    port = free_port()
    env = {"AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "eu-west-2", "AWS_ALLOW_HTTP": "true"}
    with open(workdir / "moto.log", "wb") as moto_log:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=moto_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="eu-west-2")
        for _ in range(150):
            try:
                s3.create_bucket(Bucket="chaos", CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        broker = EmbeddedBroker(storage="s3://chaos/", env=env, log_path=workdir / "tansu.log",
                                ready_timeout_s=30)
        broker.start()
        try:
            result = run_chaos(broker, store, units, workdir, kills=args.kills,
                               broker_restarts=args.broker_restarts, seed=args.seed, rate=args.rate)
        finally:
            broker.stop()
    finally:
        moto.terminate()
        moto.wait(10)
    command = "python bench/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = run_metadata(command.strip(), "cpu", model)
    summary = {k: result[k] for k in ("units", "decided", "dead_lettered", "lost", "duplicate_ids_consistent",
                                      "kills", "broker_restarts", "codecs", "dlq_by_reason")}
    summary.update({k: meta[k] for k in ("machine", "commit", "command", "date")})
    out = {"summary": summary, "details": result, "model": model}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log(json.dumps(summary))
    return 0 if result["lost"] == 0 and result["lost_readings"] == 0 and result["duplicate_ids_consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
