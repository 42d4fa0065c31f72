"""Explanation benchmark: cost, faithfulness and truth checks of ``explain(...)`` on real composite units.

    python bench/explain.py                              # CPU, the demo model -> bench/results/explain.json
    python bench/explain.py --store models/composite --device cuda

One process, one model (``--store``'s promoted version, or the small demo model, trained first when missing):

1. ``level1_cost_ratio``: the modality level as the stream computes it (one encode, one fused pass over every
   coalition of every unit) against one plain forward of the same batch (median of repeats, same process).
2. ``level2_tokens_ms_per_unit`` / ``level2_input_ms_per_unit``: level-2 explanations at ``--budget``.
3. ``report_vs_shap_speedup``: a full report (level 2, token masking, JSON + HTML with pictures) per unit against
   shap's Partition explainer at ``--shap-evals`` evaluations per image (its default 500; blur masker; the image
   alone is explained, the other readings held fixed), both timed on the same units.
4. Deletion curves (image regions): regions are removed from the image (blurred, in input space) in the order a
   method ranks them, most defect-ward first, and the defect probability is read after each step; the curve's
   mean is its area (lower = the ranking found what drove the score). Methods: ours with token masking, ours
   with input masking, shap Partition (its pixel values summed per region), and random orders.
5. ``tokens_vs_input_rank_agreement``: Spearman correlation of the group values of the two maskings, per unit
   and modality, averaged.
6. ``modality_pointing``: on test units with exactly one culprit modality that the model decides ``defect``, the
   share whose largest modality Shapley value is the culprit's.

``band_pointing`` (the bearing rig's fault frequencies) needs a model trained on the bearing recordings and is
reported as null when ``--bearings-store`` is not given. ``stream_cost_ratio`` runs the stream service twice on
the same backlog (reports for defects vs none) and divides the throughputs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream import (  # noqa: E402  (bench/stream.py: the same model and process helpers)
    DecisionReader,
    benchmark_model_store,
    composite_units,
    free_port,
    run_metadata,
    start_service,
    stop_service,
)


def log(msg: str) -> None:
    print(f"[explain] {msg}", file=sys.stderr, flush=True)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def level1_cost(model, units, repeats: int) -> dict:
    import torch

    from explain.shapley import stack_coalitions

    batch = model.batch(units).to(next(model.parameters()).device)

    def plain():
        with torch.no_grad():
            model.fuse(model.encode(batch))

    def level1():
        with torch.no_grad():
            stacked, masks = stack_coalitions(model.encode(batch))
            model.fuse(stacked, masks)

    t_plain, t_level1 = median_time(plain, repeats), median_time(level1, repeats)
    return {"plain_forward_ms": 1000 * t_plain, "level1_ms": 1000 * t_level1, "ratio": t_level1 / t_plain,
            "batch": len(units)}


def probability(model, units, present=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        batch = model.batch(units).to(next(model.parameters()).device)
        return torch.sigmoid(model.fuse(model.encode(batch), present).defect_logit.double()).cpu().numpy()


def deletion_curve(model, unit, order: list[int], regions, frame) -> list[float]:
    """Defect probability after removing the first k regions of ``order`` from the image, k = 0..K."""
    import dataclasses

    from explain.masking import remove_regions

    variants = []
    for k in range(len(order) + 1):
        boxes = [regions[i].span for i in order[:k]]
        image = remove_regions(unit.vision.image, boxes, frame)
        variants.append(dataclasses.replace(unit, vision=dataclasses.replace(unit.vision, image=image)))
    return probability(model, variants).tolist()


def shap_partition(model, unit, max_evals: int):
    """shap's Partition explainer on the unit's image (other readings fixed); returns per-pixel values, seconds."""
    import dataclasses

    import shap

    image = unit.vision.image
    gray = image.ndim == 2
    x = (image[..., None] if gray else image).astype(np.float64)

    def f(batch: np.ndarray) -> np.ndarray:
        imgs = [np.clip(np.rint(b[..., 0] if gray else b), 0, 255 if image.dtype == np.uint8 else 65535)
                .astype(image.dtype) for b in batch]
        variants = [dataclasses.replace(unit, vision=dataclasses.replace(unit.vision, image=i)) for i in imgs]
        p = probability(model, variants)
        return np.log(p / (1 - p))  # the defect logit, as ours

    masker = shap.maskers.Image("blur(16,16)", x.shape)
    explainer = shap.Explainer(f, masker, algorithm="partition")
    t0 = time.perf_counter()
    values = explainer(x[None], max_evals=max_evals, batch_size=64)
    seconds = time.perf_counter() - t0
    return np.asarray(values.values[0]).sum(axis=-1), seconds  # [H, W]


def region_sums(pixels: np.ndarray, regions, frame) -> list[float]:
    h, w = pixels.shape
    out = []
    for g in regions:
        y0, x0, y1, x1 = g.span
        out.append(float(pixels[round(y0 / frame[0] * h):round(y1 / frame[0] * h),
                                round(x0 / frame[1] * w):round(x1 / frame[1] * w)].sum()))
    return out


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def stream_throughput(store: Path, units, device: str, workdir: Path, reports: str) -> dict:
    """Units/s of ``inspection serve`` draining a backlog of ``units``, with reports for ``reports`` decisions."""
    from services.broker import EmbeddedBroker, TopicNames, create_topics
    from services.clients import make_producer
    from services.publish import publish_units

    with EmbeddedBroker(log_path=workdir / f"broker-{reports}.log") as broker:
        topics = TopicNames.with_prefix(f"ex{uuid.uuid4().hex[:6]}.")
        create_topics(broker.bootstrap, topics, 3)
        producer = make_producer(broker.bootstrap)
        try:
            publish_units(producer, units, topics, timeout_s=300)
        finally:
            producer.close(timeout=10)
        config = {
            "model": {"store": str(store), "device": device, "reload_interval_s": 0},
            "topics": {n: getattr(topics, n) for n in ("vision", "vibration", "temperature", "decisions", "dlq")},
            "join": {"timeout_s": 30.0, "watermark_lag_s": 3600.0},
            "kafka": {"group_id": f"ex-{uuid.uuid4().hex[:8]}"},
            "reports": {"dir": str(workdir / f"reports-{reports}"), "units": reports},
        }
        reader = DecisionReader(broker.bootstrap, topics.decisions)
        service_dir = workdir / f"service-{reports}"
        service_dir.mkdir()
        service = start_service(config, broker.bootstrap, service_dir, free_port())
        try:
            t0 = time.monotonic()
            done = reader.wait({u.unit_id for u in units}, timeout_s=1800)
        finally:
            stop_service(service, service_dir)
            reader.close()
    written = len(list((workdir / f"reports-{reports}").glob("*.html")))
    return {"units_per_s": len(units) / (done - t0), "reports_written": written}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="explain this store's promoted version (default: the demo model)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--units", type=int, default=12, help="units for the level-2, report, shap and deletion parts")
    p.add_argument("--pointing-units", type=int, default=600, help="test units scanned for modality pointing")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--shap-evals", type=int, default=500)
    p.add_argument("--random-orders", type=int, default=20)
    p.add_argument("--stream-units", type=int, default=300, help="backlog of the stream cost run (0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "explain.json"))
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/explain.py", *(sys.argv[1:] if argv is None else argv)])

    import torch

    from explain import explain
    from explain.api import model_groups
    from explain.masking import group_frames
    from explain.report import explain_to_reports
    from inspection.store import ModelStore
    from services.scoring import load_serving_model

    workdir = Path(tempfile.mkdtemp(prefix="explain-bench-"))
    store, model_note = benchmark_model_store("demo", args.store, args.device, workdir)
    serving = load_serving_model(ModelStore(store), None, torch.device(args.device))
    model = serving.model
    log(f"model: {model_note}")
    rng = np.random.default_rng(args.seed)

    pool = composite_units(args.pointing_units, seed=args.seed + 1000)
    units = [u for u in pool if u.label.defect][: args.units]
    log(f"{len(pool)} composite test units; {len(units)} defective ones for the per-unit parts")

    cost = level1_cost(model, pool[:32], repeats=7)
    log(f"level 1: {cost['level1_ms']:.1f} ms vs plain {cost['plain_forward_ms']:.1f} ms -> {cost['ratio']:.2f}")

    t0 = time.perf_counter()
    by_tokens = explain(model, units, level=2, budget=args.budget, masking="tokens", seed=args.seed)
    tokens_ms = 1000 * (time.perf_counter() - t0) / len(units)
    t0 = time.perf_counter()
    by_input = explain(model, units, level=2, budget=args.budget, masking="input", seed=args.seed)
    input_ms = 1000 * (time.perf_counter() - t0) / len(units)
    log(f"level 2: tokens {tokens_ms:.0f} ms/unit, input {input_ms:.0f} ms/unit")

    t0 = time.perf_counter()
    explain_to_reports(model, units, workdir / "reports", level=2, budget=args.budget, seed=args.seed,
                       model_version=serving.version, threshold_version=serving.threshold_version)
    report_s = (time.perf_counter() - t0) / len(units)

    groups = model_groups(model)
    regions = [g for g in groups["vision"] if g.kind == "region"]
    frame = group_frames(groups)["vision"]
    curves: dict[str, list[list[float]]] = {"tokens": [], "input": [], "shap": [], "random": []}
    shap_s = []
    agreement = []
    for unit, a_tok, a_in in zip(units, by_tokens, by_input, strict=True):
        tok = [g.phi for g in a_tok.groups["vision"]]
        inp = [g.phi for g in a_in.groups["vision"]]
        pixels, seconds = shap_partition(model, unit, args.shap_evals)
        shap_s.append(seconds)
        sh = region_sums(pixels, regions, frame)
        for name, values in (("tokens", tok), ("input", inp), ("shap", sh)):
            curves[name].append(deletion_curve(model, unit, list(np.argsort(values)[::-1]), regions, frame))
        for _ in range(args.random_orders):
            curves["random"].append(deletion_curve(model, unit, rng.permutation(len(regions)).tolist(), regions,
                                                   frame))
        for m in a_tok.groups:
            rho = spearman([g.phi for g in a_tok.groups[m]], [g.phi for g in a_in.groups[m]])
            if rho is not None:
                agreement.append(rho)
    auc = {name: float(np.mean([np.mean(c) for c in cs])) for name, cs in curves.items()}
    log(f"report {report_s:.2f} s/unit, shap {np.mean(shap_s):.2f} s/image; deletion AUC {auc}")

    pointing_units = [u for u in pool if u.label.defect and len(u.label.culprits) == 1]
    hits = total = 0
    for lo in range(0, len(pointing_units), 32):
        chunk = pointing_units[lo:lo + 32]
        probs = probability(model, chunk)
        thresholds = model.threshold_for(torch.tensor([model.line_slot(u.line_id) for u in chunk])).cpu().numpy()
        for unit, attribution, prob, th in zip(chunk, explain(model, chunk, level=1), probs, thresholds,
                                               strict=True):
            if prob < th:
                continue
            total += 1
            phi = attribution.modality.phi
            hits += max(phi, key=lambda m: phi[m]) == next(iter(unit.label.culprits))
    pointing = hits / total if total else None
    log(f"modality pointing: {hits}/{total}")

    stream = None
    if args.stream_units:
        backlog = composite_units(args.stream_units, seed=args.seed + 2000)
        without = stream_throughput(store, backlog, args.device, workdir, "none")
        with_reports = stream_throughput(store, backlog, args.device, workdir, "defects")
        stream = {"without_reports": without, "with_defect_reports": with_reports,
                  "ratio": with_reports["units_per_s"] / without["units_per_s"]}
        log(f"stream: {without['units_per_s']:.1f} vs {with_reports['units_per_s']:.1f} units/s with reports")

    meta = run_metadata(command, args.device, model_note)
    summary = {
        "level1_cost_ratio": cost["ratio"],
        "level2_tokens_ms_per_unit": tokens_ms,
        "level2_input_ms_per_unit": input_ms,
        "report_vs_shap_speedup": float(np.mean(shap_s)) / report_s,
        "deletion_auc_tokens": auc["tokens"],
        "deletion_auc_input": auc["input"],
        "deletion_auc_shap": auc["shap"],
        "deletion_auc_random": auc["random"],
        "modality_pointing": pointing,
        "band_pointing": None,
        "tokens_vs_input_rank_agreement": float(np.mean(agreement)) if agreement else None,
        "stream_cost_ratio": stream["ratio"] if stream else None,
        **{k: meta[k] for k in ("machine", "commit", "command", "date")},
    }
    result = {
        "summary": summary,
        "model": model_note,
        "device": args.device,
        "budget": args.budget,
        "level1": cost,
        "report_s_per_unit": report_s,
        "shap_s_per_image": float(np.mean(shap_s)),
        "shap_evals": args.shap_evals,
        "deletion": {"units": len(units), "regions": len(regions), "random_orders": args.random_orders,
                     "mean_curves": {k: np.mean(np.array(v), axis=0).tolist() for k, v in curves.items()}},
        "modality_pointing": {"hits": hits, "units": total},
        "band_pointing": "not measured: needs a model trained on the bearing recordings",
        "stream": stream,
        "notes": "composite units pair real readings; the pairing is constructed",
    }
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    runs = previous.get("runs", {})
    runs[args.device] = result
    top = {"summary": summary, "runs": runs}
    out.write_text(json.dumps(top, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
                   + "\n")
    log(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
