"""Re-scoring benchmark: the local engine against the model alone, its memory at two history sizes, and its
identity with the stream.

    python bench/rescore.py                  # CPU, the demo model -> bench/results/rescore.json

1. History: real composite units written as Parquet history with input coordinates (as ``produce --archive``
   writes it), ``--units`` and ``--more-units`` units in two folders.
2. ``local_units_per_s``: ``inspection rescore`` (a child process, as a user runs it) over the first folder:
   decided units / wall time of the command, read, decode, score and write included. Its peak RSS is polled
   from ``/proc`` (``VmHWM``); the second folder, ``--more-units`` long, shows whether memory grows with the
   history (``peak_rss_mb`` and ``peak_rss_mb_more``).
3. ``model_units_per_s``: the scoring forward alone (encode + every coalition) on the same units, prepared once,
   in batches of the same size, on the same machine: the ceiling of the engine.
4. ``ray_1_units_per_s`` / ``ray_2_units_per_s``: ``inspection rescore --engine ray --workers 1|2`` on the
   second, larger folder (a local Ray cluster started by the command, one CPU thread per actor), whole command;
   ``ray_2_vs_1_scoring`` the same ratio from the moment the first batch began scoring (cluster start, actor
   start and model loads excluded: ``units_per_s_scoring`` of ``run.json``). ``ray_vs_local``: 2 workers against the local
   engine on the same folder.
5. ``identical_to_stream``: the stream service decides ``--stream-units`` units with its archive sink on, then
   ``rescore`` re-scores the archive: every decision id must come back, with the same decision and class and
   the score within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream import (  # noqa: E402  (bench/stream.py: the same model and process helpers)
    benchmark_model_store,
    composite_units,
    free_port,
    proc_status,
    run_metadata,
    start_service,
    stop_service,
)


def log(msg: str) -> None:
    print(f"[rescore] {msg}", file=sys.stderr, flush=True)


def write_units(folder: Path, units, files: int = 4) -> int:
    from inspection.data.history import ArchivedUnit, write_history
    from inspection.records import InputCoordinate

    folder.mkdir(parents=True)
    per = (len(units) + files - 1) // files
    for i in range(files):
        chunk = units[i * per:(i + 1) * per]
        write_history(folder / f"units-{i:03d}.parquet", [
            ArchivedUnit(u, {m: InputCoordinate(f"inspection.{m}", (i * per + j) % 3, i * per + j) for m in u.present})
            for j, u in enumerate(chunk)])
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def run_cli(args: list[str], workdir: Path) -> tuple[dict, float, float]:
    """``inspection rescore ...`` as a child process: (its JSON summary, wall seconds, peak RSS MiB)."""
    t0 = time.monotonic()
    with open(workdir / f"rescore-{uuid.uuid4().hex[:6]}.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "rescore", *args, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        peak = 0.0
        while proc.poll() is None:
            value = proc_status(proc.pid, "VmHWM")
            if value == value:  # not NaN
                peak = max(peak, value)
            time.sleep(0.2)
        out = proc.stdout.read().decode()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rescore failed ({proc.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), seconds, peak


def model_only(store: Path, units, batch: int, device: str, repeats: int = 3) -> float:
    import torch

    from explain.shapley import stack_coalitions
    from inspection.batchprep import prepare_readings
    from inspection.model import Batch
    from inspection.store import ModelStore
    from services.scoring import load_serving_model

    serving = load_serving_model(ModelStore(store), None, torch.device(device), "auto")
    model = serving.model
    batches = []
    for lo in range(0, len(units), batch):
        chunk = units[lo:lo + batch]
        prepared = prepare_readings(model, [{m: getattr(u, m) for m in serving.modalities} for u in chunk],
                                    serving.device)
        lines = torch.tensor([model.line_slot(u.line_id) for u in chunk])
        batches.append(Batch(prepared.inputs, prepared.present, lines).to(serving.device))

    @torch.inference_mode()
    def once() -> None:
        for b in batches:
            with serving.autocast():
                stacked, masks = stack_coalitions(model.encode(b))
                model.fuse(stacked, masks).defect_logit.float().cpu()

    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return len(units) / statistics.median(times)


def stream_identity(store: Path, units, device: str, workdir: Path) -> dict:
    from inspection.records import Decision
    from services.broker import EmbeddedBroker, TopicNames, create_topics
    from services.clients import make_consumer, make_producer, wait_for_assignment
    from services.publish import publish_units
    from services.readback import drain
    from services.rescore import read_decisions

    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topics = TopicNames.with_prefix(f"rsb{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics, 3)
        config = {
            "model": {"store": str(store), "device": device, "reload_interval_s": 0},
            "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
            "join": {"timeout_s": 30.0, "watermark_lag_s": 3600.0},
            "kafka": {"group_id": f"rsb-{uuid.uuid4().hex[:8]}"},
            "archive": {"path": str(workdir / "archive"), "rotate_units": 100, "rotate_s": 5},
        }
        (workdir / "service").mkdir()
        service = start_service(config, broker.bootstrap, workdir / "service", free_port())
        try:
            producer = make_producer(broker.bootstrap)
            try:
                publish_units(producer, units, topics, timeout_s=300)
            finally:
                producer.close(timeout=10)
            consumer = make_consumer([topics.decisions], broker.bootstrap, f"read-{uuid.uuid4().hex[:8]}")
            try:
                wait_for_assignment(consumer, timeout_s=60)
                records = list(drain(consumer, max_messages=len(units), idle_timeout_s=60))
            finally:
                consumer.close(autocommit=False)
        finally:
            stop_service(service, workdir / "service")  # writes the last archive file
    stream = {d.id: d for d in (Decision.from_json(r.value) for r in records)}
    summary, _, _ = run_cli(["--history", str(workdir / "archive"), "--store", str(store), "--out",
                             str(workdir / "identity"), "--device", device], workdir)
    again = {d.id: d for d in read_decisions(workdir / "identity")}
    worst = max((abs(again[i].score - d.score) for i, d in stream.items() if i in again), default=None)
    same = (set(again) == set(stream) and worst is not None and worst <= 1e-5
            and all((again[i].decision, again[i].defect_class) == (d.decision, d.defect_class)
                    for i, d in stream.items()))
    return {"identical_to_stream": same, "stream_decisions": len(stream), "rescored": len(again),
            "largest_score_difference": worst, "rejected_rows": summary["rejected_rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--store", help="re-score with this store's promoted version (default: the demo model)")
    p.add_argument("--units", type=int, default=1000)
    p.add_argument("--more-units", type=int, default=3000, help="the second, larger history (memory)")
    p.add_argument("--stream-units", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray engine runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rescore.json"))
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/rescore.py", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="rescore-bench-"))
    store, model_note = benchmark_model_store("demo", args.store, args.device, workdir)
    log(f"model: {model_note}")
    units = composite_units(args.more_units, args.seed)
    small = units[:args.units]
    size = write_units(workdir / "history", small)
    size_more = write_units(workdir / "history-more", units)
    log(f"history: {len(small)} units ({size / 2**20:.0f} MiB), {len(units)} units ({size_more / 2**20:.0f} MiB)")

    common = ["--store", str(store), "--device", args.device, "--batch-size", str(args.batch_size)]
    local, seconds, peak = run_cli(["--history", str(workdir / "history"), "--out", str(workdir / "out"), *common],
                                   workdir)
    local_ups = local["decided"] / seconds
    log(f"local engine: {local['decided']} units in {seconds:.1f} s = {local_ups:.1f} units/s, peak RSS {peak:.0f} MiB")
    more, seconds_more, peak_more = run_cli(["--history", str(workdir / "history-more"), "--out",
                                             str(workdir / "out-more"), *common], workdir)
    log(f"local engine, {more['decided']} units: {more['decided'] / seconds_more:.1f} units/s, "
        f"peak RSS {peak_more:.0f} MiB")
    ray_runs = {}
    if not args.no_ray:
        for workers in (1, 2):
            # the larger history: Ray's start-up (cluster, actors, model loads) is fixed, the scoring is not
            got, secs, _ = run_cli(["--history", str(workdir / "history-more"), "--out",
                                    str(workdir / f"ray-{workers}"), "--engine", "ray", "--workers", str(workers),
                                    *common], workdir)
            ray_runs[workers] = {"units": got["decided"], "units_per_s": got["decided"] / secs, "seconds": secs,
                                 "engine_units_per_s": got["units_per_s"],
                                 "seconds_to_scoring": got["seconds_to_scoring"],
                                 "units_per_s_scoring": got["units_per_s_scoring"]}
            log(f"ray engine, {workers} worker(s): {got['decided'] / secs:.1f} units/s (whole command), "
                f"{got['units_per_s_scoring']} units/s once scoring began at {got['seconds_to_scoring']} s")
    model_ups = model_only(store, small, args.batch_size, args.device)
    log(f"model only: {model_ups:.1f} units/s")
    identity = stream_identity(store, composite_units(args.stream_units, args.seed + 1), args.device, workdir)
    log(f"stream identity: {identity}")

    summary = {
        "units": local["decided"],
        "local_units_per_s": round(local_ups, 2),
        "model_units_per_s": round(model_ups, 2),
        "local_vs_model": round(local_ups / model_ups, 4),
        "identical_to_stream": identity["identical_to_stream"],
        "local_units_per_s_scoring": local["units_per_s_scoring"],
        "ray_units": ray_runs[1]["units"] if ray_runs else None,
        "ray_1_units_per_s": round(ray_runs[1]["units_per_s"], 2) if ray_runs else None,
        "ray_2_units_per_s": round(ray_runs[2]["units_per_s"], 2) if ray_runs else None,
        "ray_2_vs_1": round(ray_runs[2]["units_per_s"] / ray_runs[1]["units_per_s"], 3) if ray_runs else None,
        "ray_2_vs_1_scoring": round(ray_runs[2]["units_per_s_scoring"]
                                    / ray_runs[1]["units_per_s_scoring"], 3) if ray_runs else None,
        "ray_vs_local": round(ray_runs[2]["units_per_s"] / (more["decided"] / seconds_more), 3) if ray_runs else None,
        "peak_rss_mb": round(peak, 1),
        "peak_rss_mb_more": round(peak_more, 1),
        "units_more": more["decided"],
        **{k: v for k, v in run_metadata(command, args.device, model_note).items()},
    }
    result = {"summary": summary, "details": {
        "history_mib": round(size / 2**20, 1), "history_more_mib": round(size_more / 2**20, 1),
        "local_seconds": round(seconds, 2), "local_more_seconds": round(seconds_more, 2),
        "local_more_units_per_s": round(more["decided"] / seconds_more, 2), "batch_size": args.batch_size,
        "identity": identity, "run": local, "ray": ray_runs,
        "note": "local_units_per_s is the wall time of the whole command (start-up, planning, read, decode, "
                "score, write); model_units_per_s the scoring forward alone on prepared batches",
    }}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
