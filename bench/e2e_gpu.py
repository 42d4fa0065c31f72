"""End-to-end throughput: the model, the batched preprocessing, one service process and N workers, each against
its ceiling, in one run on one host.

    python bench/e2e_gpu.py --device cuda --arch composite     # -> bench/results/e2e_gpu.json
    python bench/e2e_gpu.py                                    # CPU, demo model -> bench/results/e2e_cpu.json

One embedded Tansu broker on this host, real composite units (real ELPV image, real bearing window, SKAB or
simulated temperature):

1. ``model_units_per_s``: the scoring forward (encode + every coalition, 8 rows per unit) on real prepared units
   at batch sizes up to ``--model-batches``' largest, in the service's precision (bf16 autocast on CUDA), with
   our kernels; the best size. ``model_units_per_s_eager``: the same with every kernel op on its torch reference
   (``INSPECTION_FORCE_REFERENCE=1``), not compiled. Times are medians of ``--repeats`` after a warm-up, with
   the device synchronised.
2. ``prep_ms_per_unit``: :func:`inspection.batchprep.prepare_readings` on ``--prep-units`` real units, per unit
   (decoded readings in; the model's inputs on the device out).
3. ``service_units_per_s`` / ``ceiling_units_per_s`` / ``ratio``: ``inspection serve`` (one process) drains a
   backlog of ``--units`` units; the ceiling is one plain kafka-python consumer reading the same messages (no
   decoding), measured just before.
4. ``service_units_per_s_workers`` / ``ceiling_units_per_s_workers``: ``inspection serve --workers N`` drains a
   fresh backlog on topics with ``--partitions`` partitions; its ceiling is N plain consumer processes reading
   those messages, each assigned the partitions a group member would own (assigned directly, so the ceiling
   does not include the group's join).
5. ``p50_ms`` / ``p99_ms``: ``--latency-units`` units published at 80 % of the knee (the one-process service
   throughput of step 3); latency = decision record timestamp - hand-over of the unit's last reading.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream import (  # noqa: E402  (bench/stream.py: the same broker, model and process helpers)
    DecisionReader,
    benchmark_model_store,
    ceiling,
    composite_units,
    free_port,
    http_ok,
    run_metadata,
    start_service,
    stop_service,
)


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def model_throughput(serving, units, batches: list[int], repeats: int) -> dict[int, float]:
    """Units/s of the scoring forward per batch size (real prepared units, repeated to fill a batch)."""
    import torch

    from explain.shapley import stack_coalitions
    from inspection.batchprep import prepare_readings
    from inspection.model import Batch

    model = serving.model
    readings = [{m: getattr(u, m) for m in serving.modalities} for u in units]
    out = {}
    for n in batches:
        rows = [readings[i % len(readings)] for i in range(n)]
        prepared = prepare_readings(model, rows, serving.device)
        lines = torch.tensor([model.line_slot(units[i % len(units)].line_id) for i in range(n)])
        batch = Batch(prepared.inputs, prepared.present, lines).to(serving.device)

        @torch.inference_mode()
        def once(batch=batch):
            with serving.autocast():
                stacked, masks = stack_coalitions(model.encode(batch))
                logits = model.fuse(stacked, masks).defect_logit
            logits.float().cpu()

        once()
        times = []
        for _ in range(repeats):
            if serving.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        out[n] = n / statistics.median(times)
        log(f"model forward, batch {n}: {out[n]:.0f} units/s")
    return out


def prep_cost(serving, units, repeats: int) -> float:
    """Milliseconds per unit of the batched preprocessing of ``units``."""
    import torch

    from inspection.batchprep import prepare_readings

    readings = [{m: getattr(u, m) for m in serving.modalities} for u in units]
    prepare_readings(serving.model, readings, serving.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepare_readings(serving.model, readings, serving.device)
        if serving.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(units)


def _ceiling_member(bootstrap: str, topics: list[str], partitions: list[int], start, done) -> None:
    from kafka import TopicPartition

    from services.clients import make_consumer

    consumer = make_consumer([], bootstrap, f"ceiling-{uuid.uuid4().hex[:8]}")
    try:
        consumer.assign([TopicPartition(t, p) for t in topics for p in partitions])
        start.wait()
        got, last = 0, time.monotonic()
        while time.monotonic() - last < 5.0:  # until this member's partitions run dry
            records = sum(len(r) for r in consumer.poll(timeout_ms=200, max_records=2000).values())
            if records:
                got += records
                last = time.monotonic()
        done.put((got, last))
    finally:
        consumer.close(autocommit=False)


def ceiling_group(bootstrap: str, topics, messages: int, members: int, partitions: int) -> float:
    """Seconds ``members`` plain consumer processes take to read ``messages`` records, member i reading the
    partition numbers i, i + N, ... of every input topic (the share a group member gets)."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_member, args=(bootstrap, list(topics.inputs),
                                                        list(range(i, partitions, members)), start, done))
             for i in range(members)]
    for p in procs:
        p.start()
    time.sleep(10.0)  # imports and connections before the clock starts
    t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of this host
    start.set()
    results = [done.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(30)
    total = sum(r[0] for r in results)
    if total < messages:
        raise RuntimeError(f"the {members} consumers read {total} of {messages} messages")
    return max(r[1] for r in results) - t0


def publish(bootstrap: str, topics, units, rate: float = 0.0, on_unit=None):
    from services.clients import make_producer
    from services.publish import publish_units

    producer = make_producer(bootstrap)
    try:
        return publish_units(producer, units, topics, rate=rate, on_unit=on_unit, timeout_s=600)
    finally:
        producer.close(timeout=10)


def service_config(store: Path, device: str, topics, workdir: Path, max_batch: int) -> dict:
    return {
        "model": {"store": str(store), "device": device, "reload_interval_s": 0},
        "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
        "batching": {"max_batch": max_batch, "max_delay_ms": 20, "max_queue": 8 * max_batch},
        "join": {"timeout_s": 30.0, "watermark_lag_s": 30.0},
        "kafka": {"group_id": f"e2e-{uuid.uuid4().hex[:8]}"},
        "run_dir": str(workdir),
    }


def start_workers(config: dict, bootstrap: str, workdir: Path, workers: int) -> tuple[subprocess.Popen, int]:
    path = workdir / "workers.json"
    path.write_text(json.dumps(config))
    port = free_port()
    while any(not _port_free(port + i) for i in range(workers)):
        port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(workdir / "workers.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--bootstrap", bootstrap, "--config",
                                 str(path), "--workers", str(workers), "--metrics-port", str(port), "--instance-id",
                                 "e2e"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 600
    while not all(http_ok(f"http://127.0.0.1:{port + i}/readyz") for i in range(workers)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the workers did not start:\n{(workdir / 'workers.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, port


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def service_stages(port: int) -> dict:
    """The service's own accounting from ``/metrics``: seconds and count per pipeline stage, forward passes,
    units and padding rows in them, and the batch limit it chose."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict = {"stage_seconds": {}, "stage_count": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inspection_stage_seconds_sum":
                out["stage_seconds"][sample.labels["stage"]] = round(sample.value, 3)
            elif sample.name == "inspection_stage_seconds_count":
                out["stage_count"][sample.labels["stage"]] = int(sample.value)
            elif sample.name in ("inspection_batch_size_count", "inspection_batch_size_sum",
                                 "inspection_padding_rows_total", "inspection_batch_limit"):
                out[sample.name.removeprefix("inspection_")] = sample.value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", choices=["demo", "composite"], default="demo")
    p.add_argument("--store", help="serve this model store's promoted version instead")
    p.add_argument("--model-batches", type=int, nargs="+", help="batch sizes of the model-only measurement "
                   "(default: 32 64 128 on CPU, 32 .. 2048 on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prep-units", type=int, default=128)
    p.add_argument("--units", type=int, default=1000, help="backlog of the one-process service run")
    p.add_argument("--worker-units", type=int, default=0, help="backlog of the workers run (default 4 x --units)")
    p.add_argument("--latency-units", type=int, default=300)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        ("e2e_gpu.json" if args.device == "cuda" else "e2e_cpu.json")
    command = " ".join(["python", "bench/e2e_gpu.py", *(sys.argv[1:] if argv is None else argv)])

    import torch

    from inspection.store import ModelStore
    from services.broker import EmbeddedBroker, TopicNames, create_topics
    from services.scoring import load_serving_model

    workdir = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    store, model_note = benchmark_model_store(args.arch, args.store, args.device, workdir)
    serving = load_serving_model(ModelStore(store), None, torch.device(args.device), "auto")
    log(f"model: {model_note} ({serving.precision})")
    worker_units = args.worker_units or 4 * args.units
    units = composite_units(args.units + worker_units + args.latency_units, args.seed)
    backlog, more, live = (units[:args.units], units[args.units:args.units + worker_units],
                           units[args.units + worker_units:])

    batches = args.model_batches or ([32, 64, 128] if args.device == "cpu" else [32, 128, 512, 1024, 2048])
    ours = model_throughput(serving, units[:256], batches, args.repeats)
    os.environ["INSPECTION_FORCE_REFERENCE"] = "1"
    try:
        eager = model_throughput(serving, units[:256], batches, args.repeats)
    finally:
        del os.environ["INSPECTION_FORCE_REFERENCE"]
    prep_ms = prep_cost(serving, units[:args.prep_units], args.repeats)
    log(f"batched preprocessing: {prep_ms:.2f} ms/unit")
    del serving
    if args.device == "cuda":
        torch.cuda.empty_cache()

    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        # one process
        topics = TopicNames.with_prefix(f"e2e{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics, args.partitions)
        report = publish(broker.bootstrap, topics, backlog)
        ceiling_s, _ = ceiling(broker.bootstrap, topics, report.messages)
        ceiling_ups = args.units / ceiling_s
        reader = DecisionReader(broker.bootstrap, topics.decisions)
        config = service_config(store, args.device, topics, workdir / "one", args.max_batch)
        (workdir / "one").mkdir()
        port = free_port()
        service = start_service(config, broker.bootstrap, workdir / "one", port, ready_timeout_s=600)
        try:
            t0 = time.monotonic()
            t1 = reader.wait({u.unit_id for u in backlog}, timeout_s=3600)
            service_ups = args.units / (t1 - t0)
            log(f"one process: {service_ups:.0f} units/s vs ceiling {ceiling_ups:.0f} units/s")
            stages = service_stages(port)  # where the backlog's time went, before the latency phase adds to it
            log(f"one process, per stage: {stages}")
            rate = 0.8 * service_ups
            sent_at: dict[str, float] = {}
            publish(broker.bootstrap, topics, live, rate=rate,
                    on_unit=lambda u: sent_at.__setitem__(u.unit_id, time.time()))
            reader.wait({u.unit_id for u in live}, timeout_s=900)
            latency = np.array([reader.first_ts[u.unit_id] / 1000.0 - sent_at[u.unit_id] for u in live]) * 1000.0
            p50, p99 = float(np.percentile(latency, 50)), float(np.percentile(latency, 99))
            log(f"latency at {rate:.0f} units/s (80 % of the knee): p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        finally:
            one_summary = stop_service(service, workdir / "one")
            reader.close()

        # N workers
        topics_n = TopicNames.with_prefix(f"e2n{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics_n, args.partitions)
        report_n = publish(broker.bootstrap, topics_n, more)
        ceiling_n_s = ceiling_group(broker.bootstrap, topics_n, report_n.messages, args.workers,
                                     args.partitions)
        ceiling_n_ups = worker_units / ceiling_n_s
        reader = DecisionReader(broker.bootstrap, topics_n.decisions)
        (workdir / "workers").mkdir()
        config = service_config(store, args.device, topics_n, workdir / "workers", args.max_batch)
        proc, _ = start_workers(config, broker.bootstrap, workdir / "workers", args.workers)
        try:
            t0 = time.monotonic()
            t1 = reader.wait({u.unit_id for u in more}, timeout_s=3600)
            workers_ups = worker_units / (t1 - t0)
            log(f"{args.workers} workers: {workers_ups:.0f} units/s vs {args.workers}-consumer ceiling "
                f"{ceiling_n_ups:.0f} units/s")
        finally:
            proc.send_signal(15)
            try:
                proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.kill()
            reader.close()

    result = {
        "summary": {
            "model_units_per_s": round(max(ours.values()), 1),
            "model_units_per_s_eager": round(max(eager.values()), 1),
            "prep_ms_per_unit": round(prep_ms, 3),
            "service_units_per_s": round(service_ups, 1),
            "ceiling_units_per_s": round(ceiling_ups, 1),
            "ratio": round(service_ups / ceiling_ups, 4),
            "workers": args.workers,
            "service_units_per_s_workers": round(workers_ups, 1),
            "ceiling_units_per_s_workers": round(ceiling_n_ups, 1),
            "workers_ratio": round(workers_ups / ceiling_n_ups, 4),
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            **{k: v for k, v in run_metadata(command, args.device, model_note).items()},
        },
        "details": {
            "precision": "bf16 autocast" if args.device == "cuda" else "float32",
            "model_units_per_s_by_batch": {str(k): round(v, 1) for k, v in ours.items()},
            "model_units_per_s_eager_by_batch": {str(k): round(v, 1) for k, v in eager.items()},
            "units": args.units, "worker_units": worker_units, "latency_units": args.latency_units,
            "latency_rate_units_per_s": round(rate, 1), "partitions": args.partitions,
            "max_batch": args.max_batch, "service": one_summary, "service_stages_backlog": stages,
            "ceiling_note": "plain kafka-python consumers (crc32c) reading the same messages, no decoding; "
                            "for the workers' ceiling N of them as processes, each assigned 1/N of the partitions",
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
