"""Soak test of ``inspection serve``: a fixed input rate for ten minutes or more, memory and queue sampled.

    python bench/soak.py                          # 10 min at 10 units/s on CPU -> bench/results/soak.json
    python bench/soak.py --minutes 30 --rate 20

An embedded broker, the demo model (trained first when ``models/demo`` has none) and the service as its own
process (``python -m services.cli serve``, default settings apart from topics and group). Real composite
units are generated and published at ``--rate`` units/s for ``--minutes``; every ``--sample-s`` seconds the
service's RSS (``/proc/<pid>/status``) and its ``inspection_queue_depth`` / ``inspection_pending_units``
gauges (``/metrics``) are recorded. After the last unit the run waits for the decisions to drain, then
counts units without a decision (``lost_units``, which must be 0) and stops the service with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream import (  # noqa: E402  (bench/stream.py: the same broker, model and process helpers)
    ROOT,
    DecisionReader,
    benchmark_model_store,
    free_port,
    proc_status,
    run_metadata,
    start_service,
    stop_service,
)

from services.broker import EmbeddedBroker, TopicNames, create_topics  # noqa: E402
from services.clients import make_producer  # noqa: E402
from services.publish import publish_units  # noqa: E402


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def gauges(port: int) -> dict[str, float]:
    """The service's queue and join gauges from /metrics."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        for name in ("inspection_queue_depth", "inspection_pending_units", "inspection_input_paused"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=10.0, help="units per second")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    p.add_argument("--check", action="store_true", help="allow a run under 10 minutes (to check the script)")
    args = p.parse_args(argv)
    if args.minutes < 10 and not args.check:
        p.error("a soak runs for at least 10 minutes (--check allows a shorter run that is no soak)")
    command = " ".join(["python", "bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    store, model_note = benchmark_model_store("demo", None, args.device, workdir)
    total = int(round(args.rate * args.minutes * 60))
    log(f"soak: {total} units at {args.rate} units/s for {args.minutes} min; model: {model_note}; work in {workdir}")
    from inspection.data.composite import CompositeBuilder, CompositeConfig

    builder = CompositeBuilder(CompositeConfig(seed=args.seed))
    samples: list[dict] = []
    sent_at: dict[str, float] = {}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topics = TopicNames.with_prefix(f"soak{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics, 3)
        config = {
            "model": {"store": str(store), "device": args.device, "reload_interval_s": 10},
            "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
            "kafka": {"group_id": f"soak-{uuid.uuid4().hex[:8]}"},
            "run_dir": str(workdir),
        }
        reader = DecisionReader(broker.bootstrap, topics.decisions)
        port = free_port()
        service = start_service(config, broker.bootstrap, workdir, port, ready_timeout_s=300)
        stop_sampling = threading.Event()
        try:
            t0 = time.monotonic()

            def sample() -> None:
                while not stop_sampling.is_set():
                    g = gauges(port)
                    samples.append({"t_s": round(time.monotonic() - t0, 1),
                                    "rss_mb": round(proc_status(service.pid, "VmRSS"), 1),
                                    "queue_depth": g.get("inspection_queue_depth", float("nan")),
                                    "pending_units": g.get("inspection_pending_units", float("nan")),
                                    "input_paused": g.get("inspection_input_paused", float("nan")),
                                    "decided": len(reader.first_ts)})
                    stop_sampling.wait(args.sample_s)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            producer = make_producer(broker.bootstrap)
            try:
                report = publish_units(producer, builder.iter_units("test", total), topics, rate=args.rate,
                                       on_unit=lambda u: sent_at.__setitem__(u.unit_id, time.time()), timeout_s=300)
            finally:
                producer.close(timeout=10)
            publish_s = time.monotonic() - t0
            log(f"published {report.units} units in {publish_s / 60:.1f} min; waiting for the last decisions")
            try:
                reader.wait(set(sent_at), timeout_s=300)
            except TimeoutError as exc:
                log(f"not every unit was decided: {exc}")
            stop_sampling.set()
            sampler.join(30)
            peak_rss = proc_status(service.pid, "VmHWM")
        finally:
            stop_sampling.set()
            service_summary = stop_service(service, workdir)
            reader.close()
    decided = set(reader.first_ts) & set(sent_at)
    latency = np.array([reader.first_ts[u] / 1000.0 - sent_at[u] for u in decided]) * 1000.0
    depths = [s["queue_depth"] for s in samples if s["queue_depth"] == s["queue_depth"]]
    rss = [s["rss_mb"] for s in samples if s["rss_mb"] == s["rss_mb"]]
    result = {
        "summary": {
            "benchmark": "soak",
            "minutes": round(publish_s / 60.0, 2),
            "rate": args.rate,
            "rss_start_mb": rss[0] if rss else None,
            "rss_end_mb": rss[-1] if rss else None,
            "rss_max_sampled_mb": max(rss) if rss else None,
            "peak_rss_mb": round(peak_rss, 1),
            "max_queue_depth": max(depths + [service_summary.get("max_queue_depth", 0)]) if depths else None,
            "lost_units": total - len(decided),
            "units": total,
            "duplicate_decisions": reader.records - len(reader.first_ts),
            "p50_ms": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
            "p99_ms": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
            **run_metadata(command, args.device, model_note),
        },
        "service": service_summary,
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    log(f"wrote {out}")
    return 0 if result["summary"]["lost_units"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
