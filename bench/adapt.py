"""Per-line adapters on ELPV: a base model trained on mono cells only, adapted to poly cells with n labels.

    python bench/adapt.py --device cuda                       # the protocol (GPU): n 50 100 250 500, seeds 0 1 2
    python bench/adapt.py --quick                             # CPU smoke run: tiny n, 1 seed, 1 epoch, 64 px

One ELPV split (``--split-seed``, the benchmark's 75/25 split stratified on probability and cell type) fixes the
training and test cells. The **base** is the ELPV model (:func:`inspection.benches.default_model_config`) trained
on the mono training cells only, its epoch and threshold (max F1) chosen on 15 % of them held out. The **new
line** is the poly cells: for each seed and each n, n poly training cells are drawn (seeded, stratified on the
defect probability) and 20 % of them (stratified on defective or not) are held out as their validation part.
Every choice below is made on that validation part, never on test: each method's learning rate (a small grid,
``--lrs-*``), its epoch (the best validation epoch: AUROC, then class accuracy, then loss) and its decision
threshold (max F1). The test set is every poly test cell of the split (``--limit-test`` draws fewer).

Methods, each trained on the same n - n_val cells:

- ``base``: the base unadapted, at its own (mono) threshold; ``base_recalibrated``: the same scores with the
  threshold chosen on the poly validation part;
- ``head``: the heads only (head norm, defect, class and modality heads) trained on the frozen base;
- ``lora``: a LoRA adapter (:mod:`inspection.adapters`, default targets: bridge projections, heads, vision
  projection) on the frozen base; ``lora_backbone``: the same plus the 1x1 convolutions of the backbone's last
  ``--backbone-stages`` stages; ``lora_wide``: rank ``--wide-rank`` on the same targets and every backbone stage;
- ``full``: every weight of the base fine-tuned;
- ``scratch``: the ELPV model trained on the n cells alone from the ImageNet weights
  (:func:`inspection.training.train_supervised`).

Reported per (n, seed, method): test accuracy, F1 and AUROC at the validation threshold, trainable parameters,
the training wall time of the chosen learning rate and of the whole grid.

Serving: the LoRA adapters of the first seed (one per n, at most 4) are saved as lines of a real model store
beside the base and loaded by :func:`services.scoring.load_serving_model`. ``mixed_line_batch_ratio`` is the
units/s of batches mixing those lines over the units/s of batches of one adapted line, both through
:func:`services.scoring.score_units` as a service scores (preprocessing included; the median of ``--repeats``
timed batches of ``--throughput-batch`` units); ``mixed_line_forward_ratio`` is the same for the scoring forward
alone (encode and every coalition's fuse), and ``adapted_vs_base_forward_ratio`` compares one adapted line with
the base model.

One process runs everything in turn. To spread the runs over processes that share a device, train the base once
and run a part per (seed, n), then merge (the merge measures the serving throughput alone on the device):

    python bench/adapt.py --base-store /tmp/adapt-base --base-only
    python bench/adapt.py --base-store /tmp/adapt-base --seeds 0 --n 50 --no-throughput --out /tmp/parts/s0-n50.json
    ...
    python bench/adapt.py --base-store /tmp/adapt-base --merge /tmp/parts/*.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.adapters import (  # noqa: E402
    AdapterConfig,
    calibrate_line,
    fine_tune,
    parameter_count,
    save_adapter,
    train_adapter,
)
from inspection.benches import default_model_config, elpv_unit  # noqa: E402
from inspection.calibration import choose_threshold  # noqa: E402
from inspection.data._common import stratified_split  # noqa: E402
from inspection.evaluation import binary_metrics, write_result  # noqa: E402
from inspection.records import InputCoordinate, Unit  # noqa: E402
from inspection.training import PreparedSet, TrainConfig, predict, train_supervised  # noqa: E402

HEAD_PREFIXES = ("head_norm.", "defect_head.", "class_head.", "modality_heads.")
METHODS = ("head", "lora", "lora_backbone", "lora_wide", "full", "scratch")
ALL_STAGES = 64  # more stages than any backbone has: every stage


def log(msg: str) -> None:
    print(f"[adapt] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- data
def draw(items: list, n: int, seed: int) -> list:
    """``n`` items drawn without replacement, stratified on the defect probability grade (largest remainders)."""
    if n > len(items):
        raise SystemExit(f"n = {n} exceeds the {len(items)} cells available")
    rng = np.random.default_rng([seed, n, 7])
    by_grade: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_grade.setdefault(it.grade, []).append(i)
    quota = {g: n * len(ix) / len(items) for g, ix in by_grade.items()}
    take = {g: int(np.floor(q)) for g, q in quota.items()}
    for g in sorted(quota, key=lambda g: quota[g] - take[g], reverse=True)[:n - sum(take.values())]:
        take[g] += 1
    chosen = [int(i) for g, ix in sorted(by_grade.items()) for i in rng.permutation(ix)[:take[g]]]
    return [items[i] for i in sorted(chosen)]


def carve(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) of ``items``, the validation part stratified on defective or not, both classes in each."""
    defective = [it.defective for it in items]
    train_idx, val_idx = stratified_split(defective, fraction, seed)
    for cls in (True, False):  # tiny n: keep one cell of each class on both sides where there are two
        have = [i for i in val_idx if defective[i] == cls]
        pool = [i for i in train_idx if defective[i] == cls]
        if not have and len(pool) >= 2:
            val_idx = np.sort(np.append(val_idx, pool[0]))
            train_idx = np.setdiff1d(train_idx, [pool[0]])
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def units_of(items: list, split: str) -> list[Unit]:
    return [elpv_unit(it, i, split) for i, it in enumerate(items)]


def relined(unit: Unit, line: str) -> Unit:
    """The unit on another line (its readings too)."""
    parts = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    return dataclasses.replace(unit, line_id=line, **parts)


# -------------------------------------------------------------------------------------------- evaluation
def test_metrics(model, val: PreparedSet, test: PreparedSet, device: torch.device, threshold: float | None = None
                 ) -> dict:
    """Test accuracy / F1 / AUROC at ``threshold``, default the max-F1 threshold on ``val``."""
    if threshold is None:
        pv = predict(model, val, device)
        threshold = choose_threshold(pv["score"], val.targets.defect.cpu().numpy() > 0.5, "max_f1")
    pt = predict(model, test, device)
    m = binary_metrics(pt["score"], test.targets.defect.cpu().numpy() > 0.5, threshold)
    return {"accuracy": m["accuracy"], "f1": m["f1"], "auroc": m.get("auroc"), "threshold": float(threshold),
            "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"]}


def selection(history: list[dict]) -> tuple:
    """The validation score of the epoch a run kept (higher is better)."""
    chosen = next((h for h in reversed(history) if "selection_score" in h), None)
    if chosen is not None:
        return tuple(chosen["selection_score"])
    last = [h for h in history if "epoch" in h][-1]
    return (last.get("val_auroc", 0.0), last.get("val_class_accuracy", 0.0), -last.get("val_loss", 0.0))


def epochs_for(args, n_train: int) -> int:
    """``--epochs``, raised so that a run takes at least ``--min-steps`` optimizer steps."""
    steps = max(1, int(np.ceil(n_train / args.batch_size)))
    return max(args.epochs, int(np.ceil(args.min_steps / steps)))


def run_grid(name: str, make, lrs, train: PreparedSet, val: PreparedSet, cfg: TrainConfig):
    """Train ``make(lr, cfg)`` for every learning rate; keep the run with the best validation score."""
    best, total_s = None, 0.0
    for lr in lrs:
        model, seconds, trainable, history = make(lr, dataclasses.replace(cfg, lr=lr))
        total_s += seconds
        score = selection(history)
        log(f"  {name} lr {lr:g}: validation {tuple(round(x, 4) for x in score)} in {seconds:.1f} s")
        if best is None or score > best[0]:
            best = (score, lr, model, seconds, trainable, history)
    score, lr, model, seconds, trainable, history = best
    return model, {"lr": lr, "selection_score": list(score), "train_s": round(seconds, 2),
                   "grid_train_s": round(total_s, 2), "trainable": int(trainable),
                   "selected_epoch": next((h["selected_epoch"] for h in history if "selected_epoch" in h), None)}


def method_runner(method: str, base, train_units, val_units, train: PreparedSet, val: PreparedSet, args,
                  tmp: Path, seed: int):
    """A ``make(lr, cfg) -> (model, seconds, trainable, history)`` for ``method``."""
    device = torch.device(args.device)

    def tuned(params_of, frozen):
        def make(lr, cfg):
            model = copy.deepcopy(base)
            params = params_of(model)
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            fit = fine_tune(model, train, val, cfg, parameters=params, frozen_base=frozen)
            return model.to(device), fit.seconds, fit.trainable, fit.history
        return make

    if method == "head":
        return tuned(lambda m: [p for n, p in m.named_parameters() if n.startswith(HEAD_PREFIXES)], True)
    if method == "full":
        return tuned(lambda m: list(m.parameters()), False)
    if method in ("lora", "lora_backbone", "lora_wide"):
        targets = ("bridge", "heads", "vision", "backbone") if method != "lora" else None
        config = AdapterConfig(rank=args.wide_rank if method == "lora_wide" else args.rank,
                               backbone_stages=ALL_STAGES if method == "lora_wide" else args.backbone_stages,
                               **({"targets": targets} if targets else {}))

        def make(lr, cfg):
            res = train_adapter(base, train, val, "poly", config, cfg)
            make.results[lr] = res
            return res.model.to(device), res.fit.seconds, res.fit.trainable, res.fit.history
        make.results = {}
        return make
    if method == "scratch":
        def make(lr, cfg):
            mc = default_model_config("elpv", image_size=args.image_size)
            cfg = dataclasses.replace(cfg, lr=lr, backbone_lr=lr * args.scratch_backbone_ratio)
            res = train_supervised(mc, train_units, val_units, cfg, tmp / f"scratch-{seed}-{lr:g}", progress=False)
            return res.model.to(device), res.seconds, parameter_count(res.model), res.history
        return make
    raise ValueError(method)


# ----------------------------------------------------------------------------------------------- throughput
def throughput(store_root: Path, base_version: str, test_units: list[Unit], lines: list[str], args) -> dict:
    """Units/s of the scoring path with the line adapters in a real store: mixed-line vs one-line batches."""
    from explain.shapley import stack_coalitions
    from inspection.store import ModelStore
    from services.join import JoinedUnit
    from services.scoring import load_serving_model, score_units

    device = torch.device(args.device)
    serving = load_serving_model(ModelStore(store_root), base_version, device, args.precision)
    b = args.throughput_batch
    pool = [test_units[i % len(test_units)] for i in range(b)]

    def joined(units):
        return [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                           0.0) for i, u in enumerate(units)]

    batches = {
        "mixed": joined([relined(u, lines[i % len(lines)]) for i, u in enumerate(pool)]),
        "one_line": joined([relined(u, lines[-1]) for u in pool]),
        "base": joined([relined(u, "no-adapter") for u in pool]),
    }

    model = serving.model
    batch = model.batch(pool).to(device)

    def forward(lines_of_rows):
        rows = serving.adapters.rows(lines_of_rows, batch.present) if lines_of_rows else None
        net = rows.model if rows is not None else model
        with torch.inference_mode(), serving.autocast(), rows if rows is not None else contextlib.nullcontext():
            net.fuse(*stack_coalitions(net.encode(batch))).defect_logit.float().cpu()

    cases = {
        ("service", "mixed"): lambda: score_units(serving, batches["mixed"]),
        ("service", "one_line"): lambda: score_units(serving, batches["one_line"]),
        ("service", "base"): lambda: score_units(serving, batches["base"]),
        ("forward", "mixed"): lambda: forward([lines[i % len(lines)] for i in range(b)]),
        ("forward", "one_line"): lambda: forward([lines[-1]] * b),
        ("forward", "base"): lambda: forward(None),
    }
    times: dict[tuple, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved, so that drift of a shared machine hits every case alike
        for key, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    rate = {k: b / float(np.median(v)) for k, v in times.items()}
    service = {k[1]: r for k, r in rate.items() if k[0] == "service"}
    fwd = {k[1]: r for k, r in rate.items() if k[0] == "forward"}
    return {"batch": b, "lines": lines, "repeats": args.repeats, "precision": serving.precision,
            "service_units_s": service, "forward_units_s": fwd,
            "mixed_line_batch_ratio": service["mixed"] / service["one_line"],
            "mixed_line_forward_ratio": fwd["mixed"] / fwd["one_line"],
            "adapted_vs_base_forward_ratio": fwd["one_line"] / fwd["base"]}


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: n 12 16 20 24, 1 seed, 1 epoch, 64 px, few cells, one learning rate per method")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, nargs="+", help="labelled poly training cells (default 50 100 250 500)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every run (the best validation epoch is kept)")
    p.add_argument("--min-steps", type=int, default=300, help="raise the epochs of small n to this many steps")
    p.add_argument("--base-epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--backbone-stages", type=int, default=2,
                   help="lora_backbone: how many of the backbone's last stages get their 1x1 convolutions adapted")
    p.add_argument("--wide-rank", type=int, default=16, help="lora_wide: the rank")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the n cells held out for validation")
    p.add_argument("--lrs-head", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--lrs-lora", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--lrs-wide", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--lrs-full", type=float, nargs="+", default=[1e-4, 3e-4])
    p.add_argument("--lrs-scratch", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--scratch-backbone-ratio", type=float, default=0.3,
                   help="scratch: the backbone's learning rate as a share of the rest's")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--limit-mono", type=int, help="train the base on at most this many mono cells")
    p.add_argument("--limit-test", type=int, help="at most this many poly test cells (seeded draw)")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--base-store", type=Path,
                   help="model store of the base: loaded when it holds one (checked against this run's split and "
                        "image size), else trained and saved there, so that several processes share one base")
    p.add_argument("--base-only", action="store_true", help="train the base into --base-store and stop")
    p.add_argument("--no-throughput", action="store_true",
                   help="skip the serving measurement (a part of a run split over processes)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="PART",
                   help="merge the result files of parts run with --base-store and --no-throughput into one "
                        "result, measuring the serving throughput from the adapters they saved in --base-store")
    p.add_argument("--out", help="result file (default bench/results/adapt.json; --quick: runs/results/adapt.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.min_steps, args.base_epochs = [args.seeds[0]], 1, 0, 1
        args.n = args.n or [12, 16, 20, 24]
        args.image_size, args.limit_mono, args.limit_test = 64, 64, 32
        args.lrs_head, args.lrs_lora, args.lrs_full, args.lrs_scratch = [3e-3], [3e-3], [3e-4], [3e-3]
        args.throughput_batch, args.repeats = 16, 5
    args.n = args.n or [50, 100, 250, 500]
    if (args.base_only or args.merge) and args.base_store is None:
        p.error("--base-only and --merge need --base-store")
    return args


def elpv_cells(args) -> tuple[list, list, list, list]:
    """(mono train, mono validation, poly training pool, poly test) of the run's split."""
    from inspection.data.elpv import load_elpv

    train_items, test_items = load_elpv().split(args.split_seed)
    mono = [it for it in train_items if it.cell_type == "mono"]
    poly_train = [it for it in train_items if it.cell_type == "poly"]
    poly_test = [it for it in test_items if it.cell_type == "poly"]
    if args.limit_mono:
        mono = draw(mono, min(args.limit_mono, len(mono)), args.split_seed)
    if args.limit_test:
        poly_test = draw(poly_test, min(args.limit_test, len(poly_test)), args.split_seed + 1)
    mono_train, mono_val = carve(mono, 0.15, args.split_seed + 1000)
    return mono_train, mono_val, poly_train, poly_test


def base_identity(args) -> dict:
    return {"split_seed": args.split_seed, "image_size": args.image_size, "base_epochs": args.base_epochs,
            "batch_size": args.batch_size, "limit_mono": args.limit_mono}


def get_base(args, store_root: Path, mono_train: list, mono_val: list, device: torch.device):
    """The base model (calibrated on its mono validation cells, on the CPU), its version in the store at
    ``store_root`` and its details; trained and saved there unless the store already holds it."""
    from inspection.experiments import load_model
    from inspection.store import ModelStore

    if store_root.exists():
        store = ModelStore(store_root)
        entry = store.promoted()
        if entry is not None:
            base, card = load_model(store, entry.version)
            info = card.get("adapt_base") or {}
            if info.get("identity") != base_identity(args):
                raise SystemExit(f"the base in {store_root} was trained for {info.get('identity')}, not for "
                                 f"{base_identity(args)}: use another --base-store")
            log(f"base: {entry.version} from {store_root}")
            return base.cpu(), entry.version, info["details"]
    t0 = time.perf_counter()
    base_cfg = TrainConfig(epochs=args.base_epochs, batch_size=args.batch_size, seed=args.split_seed,
                           device=args.device)
    model_config = default_model_config("elpv", image_size=args.image_size)
    tmp = Path(tempfile.mkdtemp(prefix="adapt-base-"))
    base_res = train_supervised(model_config, units_of(mono_train, "train"), units_of(mono_val, "val"), base_cfg,
                                tmp, progress=False)
    shutil.rmtree(tmp, ignore_errors=True)
    base = base_res.model.eval()
    mono_val_set = PreparedSet(base, units_of(mono_val, "val"), base.config.class_names)
    base_cal = calibrate_line(base.to(device), mono_val_set, "*", device=device)
    with torch.no_grad():
        base.thresholds.fill_(base_cal.threshold)
    base.cpu()
    details = {"parameters": parameter_count(base), "train_s": round(time.perf_counter() - t0, 1),
               "mono_train": len(mono_train), "mono_val": len(mono_val), "calibration": base_cal.to_dict(),
               "history": base_res.history}
    from inspection.store import ModelStore

    store = ModelStore(store_root, create=True)
    card = {"model_config": base.config.to_dict(), "threshold_version": base_cal.version,
            "adapt_base": {"identity": base_identity(args), "details": details}}
    version = store.save(base.state_dict(), card, promote=True).version
    log(f"base: {details['parameters']} parameters, mono validation F1 {base_cal.metrics['f1']:.3f} at "
        f"{base_cal.threshold:.3f} ({details['train_s']:.0f} s), saved as {version}")
    return base, version, details


def run_cells(args, base, poly_train: list, test_set: PreparedSet, base_test: dict, store, base_version: str,
              device: torch.device, tmp: Path, on_row) -> list[dict]:
    """Every (seed, n, method) run of this process; ``on_row(runs)`` after each method."""
    n_base = parameter_count(base)
    runs: list[dict] = []
    for seed in args.seeds:
        for n in args.n:
            cells = draw(poly_train, n, seed)
            tr, va = carve(cells, args.val_fraction, seed)
            train_units, val_units = units_of(tr, "train"), units_of(va, "val")
            train_set = PreparedSet(base, train_units, base.config.class_names)
            val_set = PreparedSet(base, val_units, base.config.class_names)
            cfg = TrainConfig(epochs=epochs_for(args, len(tr)), batch_size=args.batch_size, seed=seed,
                              device=args.device)
            log(f"seed {seed}, n {n}: {len(tr)} train + {len(va)} validation poly cells, {cfg.epochs} epochs")
            row = {"seed": seed, "n": n, "n_train": len(tr), "n_val": len(va),
                   "n_val_defective": int(sum(it.defective for it in va)), "epochs": cfg.epochs, "methods": {}}
            recal = test_metrics(base.to(device), val_set, test_set, device)
            base.cpu()
            row["methods"]["base"] = {**base_test, "trainable": 0, "train_s": 0.0}
            row["methods"]["base_recalibrated"] = {**recal, "trainable": 0, "train_s": 0.0}
            for method in args.methods:
                lrs = {"head": args.lrs_head, "lora": args.lrs_lora, "lora_backbone": args.lrs_lora,
                       "lora_wide": args.lrs_wide,
                       "full": args.lrs_full, "scratch": args.lrs_scratch}[method]
                make = method_runner(method, base, train_units, val_units, train_set, val_set, args, tmp, seed)
                model, info = run_grid(method, make, lrs, train_set, val_set, cfg)
                metrics = test_metrics(model, val_set, test_set, device)
                info["trainable_share"] = info["trainable"] / n_base
                row["methods"][method] = {**metrics, **info}
                log(f"  {method}: test F1 {metrics['f1']:.3f}, accuracy {metrics['accuracy']:.3f} "
                    f"({info['trainable']} trainable, {info['train_s']:.1f} s)")
                if method == "lora" and seed == min(args.seeds) and store is not None:
                    save_adapter(store, base_version, f"poly-n{n}", make.results[info["lr"]])
                del model
                on_row([*runs, row])
            runs.append(row)
    return runs


def summarize(args, runs: list[dict], base_test: dict, through: dict | None, n_test: int, wall_s: float,
              parts: int = 1) -> dict:
    n_values = sorted({r["n"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    methods = [m for m in METHODS if any(m in r["methods"] for r in runs)]
    largest = max(n_values) if n_values else None

    def values(method: str, key: str, n: int) -> list[float]:
        return [r["methods"][method][key] for r in runs if r["n"] == n and method in r["methods"]]

    def mean_at(method: str, key: str = "f1", n: int | None = largest):
        v = values(method, key, n)
        return float(np.mean(v)) if v else None

    table = {str(n): {m: {"f1": mean_at(m, "f1", n), "accuracy": mean_at(m, "accuracy", n),
                          "f1_std": float(np.std(values(m, "f1", n), ddof=1)) if len(values(m, "f1", n)) > 1
                          else 0.0, "seeds": len(values(m, "f1", n))}
                      for m in ("base", "base_recalibrated", *methods)} for n in n_values}
    lora_share = next((r["methods"]["lora"]["trainable_share"] for r in runs if "lora" in r["methods"]), None)
    f1_lora, f1_full = mean_at("lora"), mean_at("full")
    return {
        "metric": f"F1 of the defect decision on the ELPV poly test cells, LoRA adapter at n = {largest}, "
                  "mean over seeds (threshold chosen on the validation part of the n cells)",
        "value": f1_lora,
        "n": n_values,
        "largest_n": largest,
        "seeds": seeds,
        "f1_base": base_test["f1"],
        "f1_lora_500": f1_lora,
        "f1_full_500": f1_full,
        "f1_scratch_500": mean_at("scratch"),
        "f1_head_500": mean_at("head"),
        "f1_lora_backbone_500": mean_at("lora_backbone"),
        "f1_lora_wide_500": mean_at("lora_wide"),
        "lora_wide_trainable_share": next((r["methods"]["lora_wide"]["trainable_share"] for r in runs
                                           if "lora_wide" in r["methods"]), None),
        "lora_minus_full_500": None if f1_lora is None or f1_full is None else f1_lora - f1_full,
        "lora_trainable_share": lora_share,
        "mixed_line_batch_ratio": through["mixed_line_batch_ratio"] if through else None,
        "mixed_line_forward_ratio": through["mixed_line_forward_ratio"] if through else None,
        "goal": "LoRA at n = 500 within 1 F1 point of full fine-tuning with <= 5 % of the parameters trainable; "
                "mixed_line_batch_ratio >= 0.8",
        "by_n": table,
        "n_test": n_test,
        "split": f"ELPV split seed {args.split_seed} (75/25 stratified on probability and type): base on its mono "
                 "training cells; n poly cells drawn per seed from its poly training cells; test = its poly test "
                 "cells" + (f" ({n_test} drawn)" if args.limit_test else ""),
        "selection": "per method and (n, seed): learning rate from a grid, epoch and max-F1 threshold, all on the "
                     f"{args.val_fraction:.0%} validation part of the n cells; the base's epoch and threshold on "
                     "15 % of its mono cells",
        "f1_keys": "f1_*_500 are at the largest n of the run (largest_n); 500 in the protocol",
        "timing": "train_s is the wall time of one run" + (
            f", measured while other parts ran on the same device ({parts} parts merged; slower than alone: "
            "compare methods with each other, not with other benchmarks)" if parts > 1 else ""),
        "image_size": args.image_size,
        "device": args.device,
        "quick": args.quick,
        "wall_s": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or (ROOT / ("runs/results/adapt.json" if args.quick else "bench/results/adapt.json")))
    device = torch.device(args.device)
    t_start = time.perf_counter()
    from inspection.store import ModelStore

    mono_train, mono_val, poly_train, poly_test = elpv_cells(args)
    log(f"split {args.split_seed}: base on {len(mono_train)} mono cells (+{len(mono_val)} validation); "
        f"{len(poly_train)} poly training cells to draw from; {len(poly_test)} poly test cells")
    tmp = Path(tempfile.mkdtemp(prefix="adapt-bench-"))
    store_root = args.base_store or tmp / "store"
    base, base_version, base_details = get_base(args, store_root, mono_train, mono_val, device)
    if args.base_only:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    store = ModelStore(store_root)
    test_units = units_of(poly_test, "test")
    test_set = PreparedSet(base, test_units, base.config.class_names)
    mono_val_set = PreparedSet(base, units_of(mono_val, "val"), base.config.class_names)
    base_test = test_metrics(base.to(device), mono_val_set, test_set, device,
                             threshold=base_details["calibration"]["threshold"])
    base.cpu()
    log(f"base unadapted on poly test: F1 {base_test['f1']:.3f}, accuracy {base_test['accuracy']:.3f}")
    details_base = {**base_details, "poly_test": base_test}

    if args.merge:
        by_key, config, parts = {}, None, len(args.merge)
        for part in args.merge:
            data = json.loads(part.read_text())
            config = config or data["config"]
            if data["config"].get("split_seed") != args.split_seed or data["config"].get("image_size") != \
                    args.image_size:
                raise SystemExit(f"{part} was run on another split or image size than this merge")
            for r in data["runs"]:  # parts may split one (seed, n) by method, never train one method twice
                row = by_key.setdefault((r["seed"], r["n"]), {**r, "methods": {}})
                trained = set(row["methods"]) & set(r["methods"]) - {"base", "base_recalibrated"}
                if trained:
                    raise SystemExit(f"the parts overlap: seed {r['seed']}, n {r['n']}: {sorted(trained)} twice")
                row["methods"] = {**r["methods"], **row["methods"]}
        runs = [by_key[k] for k in sorted(by_key)]
        from inspection.adapters import list_adapters

        lines = sorted({e.line for e in list_adapters(store, base_version)}, key=lambda s: int(s.split("n")[-1]))
    else:
        parts, config = 1, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}

        def on_row(done: list[dict]) -> None:  # the result so far after every method: a cut run keeps its runs
            summary = summarize(args, done, base_test, None, len(poly_test), time.perf_counter() - t_start)
            write_result(out.stem, summary, {"base": details_base, "runs": done, "throughput": None,
                                             "config": config}, results_dir=out.parent)

        runs = run_cells(args, base, poly_train, test_set, base_test, store, base_version, device, tmp, on_row)
        lines = [f"poly-n{n}" for n in args.n] if "lora" in args.methods else []
    through = None
    if lines and not args.no_throughput:
        log(f"throughput: {len(lines[:4])} line adapters served from a real store")
        through = throughput(store_root, base_version, test_units, lines[:4], args)
        log(f"  mixed / one-line units/s: service {through['mixed_line_batch_ratio']:.3f}, forward "
            f"{through['mixed_line_forward_ratio']:.3f}; adapted / base forward "
            f"{through['adapted_vs_base_forward_ratio']:.3f}")
    summary = summarize(args, runs, base_test, through, len(poly_test), time.perf_counter() - t_start, parts)
    path = write_result(out.stem, summary, {"base": details_base, "runs": runs, "throughput": through,
                                            "config": config}, results_dir=out.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # the run's models and (without --base-store) its store
    log(f"wrote {path} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
