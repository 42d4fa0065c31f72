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
   share whose largest modality Shapley value is the culprit's. Test units come from the composite split of the
   model's own data seed (its card), so no image, recording or SKAB file of its training is among them.
7. ``band_pointing`` (physics): a bearings model (``--bearings-store``, or trained here: the bearings default
   with 31.25 Hz envelope tokens, ~3 min on 2 CPU cores) explains its faulty held-out test windows that it decides
   ``defect`` at level 2 with the envelope read at token resolution; a hit is a top-attributed vibration group
   that is an envelope band holding 1x, 2x or 3x the fault's frequency (BPFO for outer race, BPFI for inner race,
   from the rig's bearing geometry). ``band_pointing_chance`` is the share of groups that would count as a hit.
   The class-mean envelope spectra's peaks near the fault frequencies are recorded beside it.
8. ``time_pointing``: SKAB test files of the same split: windows that contain a labelled anomaly onset (10 to
   50 s into the 60 s window, every 5 s) replace the temperature of ``ok`` composite test units; among the windows
   whose anomaly visibly moves a temperature channel (the rule the composite labels use), the share whose top
   temperature group (channel x time segment) overlaps the labelled anomaly (``time_pointing_chance``: the share
   of groups that overlap it). Every window and the ones decided ``defect`` are reported beside it.

``stream_cost_ratio`` runs the stream service twice on the same backlog (reports for defects vs none) and
divides the throughputs.
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


def top_group(attribution, modality: str):
    return max(attribution.groups[modality], key=lambda g: g.phi)


def bearings_store(store_arg: str | None, device: str, workdir: Path, seed: int) -> Path:
    """The bearings family folder of a store root holding a calibrated bearings model (trained here if none)."""
    from inspection.experiments import calibrate_version, train_bench
    from inspection.training import TrainConfig

    if store_arg:
        return Path(store_arg) / "bearings"
    root = workdir / "bearings-models"
    log("training the band-pointing bearings model (envelope tokens 31.25 Hz wide)")
    train_bench("bearings", seed, TrainConfig(seed=seed, device=device), store_root=root, out_root=workdir / "runs",
                overrides=BAND_MODEL_OVERRIDES, progress=False)
    calibrate_version(root, "bearings", device=device)
    return root / "bearings"


#: The band-pointing model: the bearings default with the envelope read in 32 tokens of 31.25 Hz (8 bins each)
#: instead of 8 of 125 Hz, so a band can hold one fault frequency and not every low harmonic of both. Chosen for
#: resolution, before any pointing result (its test accuracy is recorded beside the pointing share).
BAND_MODEL_OVERRIDES = ("encoders.vibration.config.env_band_bins=8",)


def band_pointing(store: Path, device: str, budget: int, seed: int, masking: str = "tokens") -> dict:
    """Band pointing of a bearings model on its held-out faulty windows (see the module docstring, item 7)."""
    import torch

    from explain import explain
    from explain.api import model_groups
    from inspection.data.bearings import fault_frequencies, load_bearings
    from inspection.experiments import bench_data
    from inspection.store import ModelStore
    from services.scoring import load_serving_model

    models = ModelStore(store)
    serving = load_serving_model(models, None, torch.device(device))
    model = serving.model
    card = models.get(serving.version).card
    # the test split of the fold this model was trained on (labels opened for scoring)
    test = bench_data("bearings", card["seed"], card["data"], test_labels=True).test
    probs = np.concatenate([probability(model, test[lo:lo + 64]) for lo in range(0, len(test), 64)])
    threshold = float(model.threshold_for(torch.tensor([model.line_slot("bearings")])).item())
    accuracy = float(np.mean((probs >= threshold) == np.array([u.label.defect for u in test])))
    shaft = {r.name: float(r.metadata["shaft_speed"]) for r in load_bearings()}  # 25 Hz on every recording

    def fault_hz(unit) -> float:
        recording = unit.provenance["vibration"].removeprefix("bearings:").split("@")[0]
        kind = {"outer_race": "BPFO", "inner_race": "BPFI"}[unit.label.defect_class]
        return fault_frequencies(shaft[recording])[kind]

    faults = fault_frequencies(25.0)
    encoder = model.encoders["vibration"]
    groups = model_groups(model, max_bands={"spectrum": 8, "envelope": encoder.n_env})

    def hits(group, f0: float) -> bool:
        lo, hi = group.span
        return group.kind == "envelope" and any(lo <= k * f0 < hi for k in (1, 2, 3))

    # the class-mean envelope spectra (the model's own envelope input) and their peaks near each fault frequency
    peaks = {}
    for klass, f0 in (("outer_race", faults["BPFO"]), ("inner_race", faults["BPFI"])):
        windows = [u for u in test if u.label.defect_class == klass]
        env = np.mean([encoder.prepare(u.vibration)["envelope"][0] for u in windows], axis=0)
        freqs = (np.arange(env.shape[0]) + 0.5) * encoder.config.preprocess.env_max_hz / env.shape[0]
        near = (freqs > 0.75 * f0) & (freqs < 1.25 * f0)
        peaks[klass] = {"fault_hz": f0, "peak_hz": float(freqs[near][np.argmax(env[near])]),
                        "bin_hz": float(freqs[1] - freqs[0]), "windows": len(windows)}

    decided = [u for u, p in zip(test, probs, strict=True) if u.label.defect and p >= threshold]
    top_hits, envelope_hits, chance, envelope_chance = [], [], [], []
    top_kinds: dict[str, int] = {}
    for lo in range(0, len(decided), 16):
        chunk = decided[lo:lo + 16]
        for unit, a in zip(chunk, explain(model, chunk, level=2, budget=budget, seed=seed, masking=masking,
                                          groups=groups), strict=True):
            f0 = fault_hz(unit)
            vib = a.groups["vibration"]
            top = max(vib, key=lambda g: g.phi)
            envelope = [g for g in vib if g.kind == "envelope"]
            top_hits.append(hits(top, f0))
            envelope_hits.append(hits(max(envelope, key=lambda g: g.phi), f0))
            chance.append(np.mean([hits(g, f0) for g in vib]))
            envelope_chance.append(np.mean([hits(g, f0) for g in envelope]))
            top_kinds[top.kind] = top_kinds.get(top.kind, 0) + 1
    n = len(decided)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "band_pointing": mean(top_hits), "band_pointing_chance": mean(chance),
        "envelope_band_pointing": mean(envelope_hits), "envelope_band_pointing_chance": mean(envelope_chance),
        "windows": n, "faulty_test_windows": sum(u.label.defect for u in test),
        "test_accuracy": accuracy, "model_version": serving.version, "groups": len(groups["vibration"]),
        "top_group_kinds": top_kinds, "fault_frequencies_hz": faults, "envelope_peaks": peaks,
        "shaft_hz": sorted(set(shaft.values())), "budget": budget, "masking": masking,
    }


def time_pointing(model, data_seed: int, budget: int, seed: int, masking: str = "tokens") -> dict:
    """Time pointing on SKAB windows with an anomaly onset (see the module docstring, item 8)."""
    import dataclasses

    import torch

    from explain import explain
    from inspection.data import skab
    from inspection.data.composite import SKAB_TRAIN_ROWS, CompositeBuilder, CompositeConfig

    config = CompositeConfig(seed=data_seed)
    builder = CompositeBuilder(config)
    if builder.temperature_source != "skab":
        return {"time_pointing": None, "reason": "SKAB not found: composite temperature is simulated"}
    files = {f.name: f for f in skab.load_skab()}
    test_files = sorted(n for n in builder.sources("test")["temperature"] if n in files)
    w = config.temperature_window
    templates = [u for u in builder.units("test", 400) if not u.label.defect]
    cases = []
    for name in test_files:
        f = files[name]
        temps = f.channels(skab.TEMPERATURE_CHANNELS)
        ref = temps[:, :SKAB_TRAIN_ROWS]
        mean, std = ref.mean(axis=1), np.maximum(ref.std(axis=1), 0.05)  # as the composite builder's windows
        onsets = np.flatnonzero(np.diff(f.anomaly.astype(np.int8)) == 1) + 1
        for onset in onsets:
            for offset in range(w // 6, w - w // 6 + 1, w // 12):  # the onset 10 .. 50 s into a 60 s window
                start = int(onset) - offset
                if start < 0 or start + w > len(f):
                    continue
                labels = f.anomaly[start:start + w]
                window = temps[:, start:start + w]
                z = float((np.abs(window[:, labels == 1].mean(axis=1) - mean) / std).max())
                template = templates[len(cases) % len(templates)]
                reading = dataclasses.replace(template.temperature, values=np.ascontiguousarray(window))
                cases.append((dataclasses.replace(template, temperature=reading), labels, z))
    units = [c[0] for c in cases]
    probs = np.concatenate([probability(model, units[lo:lo + 32]) for lo in range(0, len(units), 32)])
    thresholds = model.threshold_for(torch.tensor([model.line_slot(u.line_id) for u in units])).cpu().numpy()
    found: dict[str, list[bool]] = {"all": [], "visible": [], "decided": []}
    chance: dict[str, list[float]] = {k: [] for k in found}
    for lo in range(0, len(units), 16):
        chunk = units[lo:lo + 16]
        for i, a in enumerate(explain(model, chunk, level=2, budget=budget, seed=seed, masking=masking), start=lo):
            labels, z = cases[i][1], cases[i][2]

            def overlaps(g, labels=labels) -> bool:
                _, t0, t1 = g.span  # samples of the model's series, which is the window (same length)
                return bool(labels[int(t0):int(t1)].any())

            hit = overlaps(top_group(a, "temperature"))
            share = float(np.mean([overlaps(g) for g in a.groups["temperature"]]))
            for key, member in (("all", True), ("visible", z >= config.min_temperature_z),
                                ("decided", z >= config.min_temperature_z and probs[i] >= thresholds[i])):
                if member:
                    found[key].append(hit)
                    chance[key].append(share)
    rate = {k: (float(np.mean(v)) if v else None) for k, v in found.items()}
    return {
        "time_pointing": rate["visible"],
        "time_pointing_chance": float(np.mean(chance["visible"])) if chance["visible"] else None,
        "by_subset": {k: {"share": rate[k], "chance": float(np.mean(chance[k])) if chance[k] else None,
                          "windows": len(found[k])} for k in found},
        "subsets": {"all": "every window with an onset", "visible": f"the anomaly moves a temperature channel's "
                    f"mean >= {config.min_temperature_z} sd from the file's normal start (the composite labels' rule)",
                    "decided": "visible and decided defect"},
        "test_files": test_files, "window_s": w, "budget": budget, "masking": masking,
    }


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
    p.add_argument("--bearings-store", help="store root whose bearings model the band pointing uses (default: train "
                   "one here)")
    p.add_argument("--no-band-pointing", action="store_true", help="skip the bearings model and band pointing")
    p.add_argument("--pointing-budget", type=int, default=1024, help="level-2 budget of the band and time pointing")
    p.add_argument("--input-pointing-budget", type=int, default=256,
                   help="level-2 budget of the band pointing with input masking (each evaluation re-encodes)")
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
    out = Path(args.out)
    done: dict = {}  # the summary fields measured so far

    def checkpoint(stage: str, **fields) -> None:
        """Record what is measured so far, so a run stopped at a time limit still leaves its numbers."""
        done.update(fields)
        meta = run_metadata(command, args.device, model_note)
        write_run(out, args.device, {"summary": {**done, **{k: meta[k] for k in ("machine", "commit", "command",
                                                                                  "date")},
                                                 "complete": False, "last_stage": stage},
                                     "model": model_note, "device": args.device})
    # the composite split of the model's own data seed: its test units share no source with its training
    data_seed = int(ModelStore(store).get(serving.version).card.get("seed", 0))

    pool = composite_units(args.pointing_units, seed=data_seed)
    units = [u for u in pool if u.label.defect][: args.units]
    log(f"{len(pool)} composite test units; {len(units)} defective ones for the per-unit parts")

    cost = level1_cost(model, pool[:32], repeats=7)
    log(f"level 1: {cost['level1_ms']:.1f} ms vs plain {cost['plain_forward_ms']:.1f} ms -> {cost['ratio']:.2f}")
    checkpoint("level1", level1_cost_ratio=cost["ratio"])

    t0 = time.perf_counter()
    by_tokens = explain(model, units, level=2, budget=args.budget, masking="tokens", seed=args.seed)
    tokens_ms = 1000 * (time.perf_counter() - t0) / len(units)
    t0 = time.perf_counter()
    by_input = explain(model, units, level=2, budget=args.budget, masking="input", seed=args.seed)
    input_ms = 1000 * (time.perf_counter() - t0) / len(units)
    log(f"level 2: tokens {tokens_ms:.0f} ms/unit, input {input_ms:.0f} ms/unit")
    checkpoint("level2", level2_tokens_ms_per_unit=tokens_ms, level2_input_ms_per_unit=input_ms)

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
    checkpoint("deletion", report_vs_shap_speedup=float(np.mean(shap_s)) / report_s,
               **{f"deletion_auc_{k}": v for k, v in auc.items()})

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
    checkpoint("modality_pointing", modality_pointing=pointing)

    timing = {m: time_pointing(model, data_seed, args.pointing_budget, args.seed, m) for m in ("tokens", "input")}
    log(f"time pointing: { {m: t['by_subset'] for m, t in timing.items()} }")
    checkpoint("time_pointing", time_pointing=timing["tokens"]["time_pointing"],
               time_pointing_input=timing["input"]["time_pointing"])
    bands = None
    if not args.no_band_pointing:
        brg = bearings_store(args.bearings_store, args.device, workdir, args.seed)
        bands = {m: band_pointing(brg, args.device, budget, args.seed, m)
                 for m, budget in (("tokens", args.pointing_budget), ("input", args.input_pointing_budget))}
        for m, b in bands.items():
            log(f"band pointing ({m}): {b['band_pointing']} (chance {b['band_pointing_chance']}), within the "
                f"envelope {b['envelope_band_pointing']} (chance {b['envelope_band_pointing_chance']})")
        checkpoint("band_pointing", band_pointing=bands["tokens"]["band_pointing"],
                   band_pointing_input=bands["input"]["band_pointing"])

    stream = None
    if args.stream_units:
        backlog = composite_units(args.stream_units, seed=data_seed, start=args.pointing_units)
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
        "band_pointing": bands["tokens"]["band_pointing"] if bands else None,
        "band_pointing_chance": bands["tokens"]["band_pointing_chance"] if bands else None,
        "band_pointing_input": bands["input"]["band_pointing"] if bands else None,
        "time_pointing": timing["tokens"]["time_pointing"],
        "time_pointing_chance": timing["tokens"].get("time_pointing_chance"),
        "time_pointing_input": timing["input"]["time_pointing"],
        "tokens_vs_input_rank_agreement": float(np.mean(agreement)) if agreement else None,
        "stream_cost_ratio": stream["ratio"] if stream else None,
        **{k: meta[k] for k in ("machine", "commit", "command", "date")},
        "complete": True,
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
        "band_pointing": bands or "not measured (--no-band-pointing)",
        "time_pointing": timing,
        "data_seed": data_seed,
        "stream": stream,
        "notes": "composite units pair real readings; the pairing is constructed",
    }
    write_run(out, args.device, result)
    log(json.dumps(summary))
    return 0


def write_run(out: Path, device: str, result: dict) -> None:
    """Put one device's run into the result file beside the other device's; the top-level summary is this one's."""
    previous = json.loads(out.read_text()) if out.exists() else {}
    runs = previous.get("runs", {})
    runs[device] = result
    top = {"summary": result["summary"], "runs": runs}
    out.write_text(json.dumps(top, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
                   + "\n")


if __name__ == "__main__":
    sys.exit(main())
