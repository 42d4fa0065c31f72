"""Training: supervised fitting of the fusion model, resumable, seeded, with curves.

B batch · M modalities · K classes

Supervised loss = BCE(defect) + ``class_weight`` · CE(class) + ``modality_weight`` · BCE(per-modality culprit).
Modality dropout hides present modalities at random (one always stays); the targets are recomputed from the
culprits that remain visible, so the model never learns to report a defect it cannot see. After every optimizer
step each MoE layer's expert bias moves toward balanced load (aux-loss-free balancing).

Everything is preprocessed once (numpy) and held as tensors; vision augmentation (flips, 90° rotations) runs on
the batch on the training device. bf16 autocast on CUDA, fp32 on CPU. A checkpoint (safetensors + JSON, no pickle)
is written after every epoch; ``resume=True`` continues from it. Per-epoch shuffles derive from (seed, epoch),
so a resumed run sees the same batches as an uninterrupted one. Progress (preprocessing, then each epoch) goes to
stderr through :mod:`inspection.progress`: a bar on a terminal, one line per epoch elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from inspection.config import from_dict
from inspection.errors import ConfigError, DataError
from inspection.model import Batch, InspectionModel, ModelConfig, ModelOutput
from inspection.progress import Meter, Progress, format_duration
from inspection.records import MODALITIES, Unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    epochs: passes over the training units.
    batch_size: units per step.
    lr: learning rate of everything trained from scratch (bridge, heads, non-image encoders).
    backbone_lr: learning rate of a pretrained vision backbone.
    weight_decay: AdamW weight decay.
    warmup_frac: share of steps with a linear warm-up, then cosine decay to 0.
    class_weight, modality_weight: weights of the class and per-modality losses.
    encoder_grad: ``all`` -- every loss trains the encoders; ``own_head`` -- each encoder learns only from its
        own per-modality head's culprit loss, on every modality the unit has (also those modality dropout hides
        from the fused path: their tokens are computed either way), while the fused path (bridge, fused and
        class heads) trains on top of the encoders' tokens without changing them. A modality that separates the
        classes easily otherwise dominates what the shared losses teach the encoders, and a weak modality's
        encoder learns less than it would alone ("modality imbalance").
    label_smoothing: of the class loss.
    soft_targets: train the defect logit towards each label's graded ``severity`` (e.g. ELPV's expert defect
        probability 0, 1/3, 2/3, 1) where the label has one, instead of its 0/1 ``defect``; the score then
        estimates the graded truth, and its 0.5 crossing the p >= 0.5 rule that defines a defect.
    augment: random flips / 90° rotations of images (solar cells and most parts look alike in any orientation)
        and a mild brightness/contrast jitter.
    photometric_jitter: scales the brightness (+-0.05) and contrast (x0.9-1.1) ranges of that jitter.
    affine_jitter: strength ``a`` of a small random affine warp on top (0 = none): rotation up to ``10a``
        degrees, scale ``1 +- 0.1a``, shift up to ``5a`` % of the side, borders filled by reflection. Cells
        cropped from a module image are never perfectly aligned or scaled; the warp trains for that.
    grad_clip: global gradient norm clip.
    amp: bf16 autocast on CUDA.
    select_best: keep the epoch with the best validation score (AUROC, else loss) instead of the last one.
    ema_decay: 0 trains plain weights; in ``(0, 1)`` an exponential moving average of the weights (and
        floating-point buffers such as batch-norm statistics) is kept after every step, with the usual warm-up
        ``min(ema_decay, (1 + n) / (10 + n))`` at step ``n``; validation, epoch selection and the returned
        model then use the averaged weights. An average over the last few hundred steps smooths the noise of
        small, late learning-rate steps on small data sets.
    seed: seeds initialisation, shuffling, dropout and augmentation.
    device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 0.02
    warmup_frac: float = 0.05
    class_weight: float = 0.5
    modality_weight: float = 0.3
    encoder_grad: str = "all"
    label_smoothing: float = 0.1
    soft_targets: bool = False
    augment: bool = True
    photometric_jitter: float = 1.0
    affine_jitter: float = 0.0
    grad_clip: float = 1.0
    amp: bool = True
    select_best: bool = True
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1; got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and self.backbone_lr > 0):
            raise ConfigError("learning rates must be > 0")
        if not (0.0 <= self.photometric_jitter <= 5.0 and 0.0 <= self.affine_jitter <= 2.0):
            raise ConfigError("photometric_jitter must be in [0, 5] and affine_jitter in [0, 2]; got "
                              f"{self.photometric_jitter}, {self.affine_jitter}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.encoder_grad not in ("all", "own_head"):
            raise ConfigError(f"encoder_grad must be 'all' or 'own_head'; got {self.encoder_grad!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda; got {self.device!r}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for but no CUDA device is available")
        return torch.device(self.device)


@dataclass
class Targets:
    """Training targets of a set of units: ``defect [B]``, ``klass [B]``, ``culprit [B, M]`` (float 0/1)."""

    defect: torch.Tensor
    klass: torch.Tensor
    culprit: torch.Tensor


def targets_for(units: Sequence[Unit], class_names: Sequence[str], soft: bool = False) -> Targets:
    """Targets from labels; every unit must be labelled with a class the model knows. ``soft`` takes the defect
    target from the label's severity where it has one."""
    index = {c: i for i, c in enumerate(class_names)}
    defect, klass, culprit = [], [], []
    for u in units:
        if u.label is None:
            raise DataError(f"unit {u.unit_id} has no label; supervised training needs labelled units")
        if u.label.defect_class not in index:
            raise DataError(f"unit {u.unit_id} has class {u.label.defect_class!r}; the model knows {list(class_names)}")
        defect.append(float(u.label.severity) if soft and u.label.severity is not None else float(u.label.defect))
        klass.append(index[u.label.defect_class])
        culprit.append([float(m in u.label.culprits) for m in MODALITIES])
    return Targets(torch.tensor(defect), torch.tensor(klass, dtype=torch.long), torch.tensor(culprit))


def drop_modalities(present: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide each present modality with probability ``p``, keeping at least one per unit. ``[B, M] -> [B, M]``."""
    if p <= 0:
        return present
    keep = (torch.rand(present.shape, generator=generator).to(present.device) >= p) & present
    empty = ~keep.any(dim=1)
    if empty.any():  # restore one random present modality where everything was dropped
        scores = torch.rand(present.shape, generator=generator).to(present.device).masked_fill(~present, -1.0)
        choice = scores.argmax(dim=1)
        keep[empty, choice[empty]] = True
    return keep


def visible_targets(t: Targets, visible: torch.Tensor, class_names: Sequence[str]) -> Targets:
    """Targets after hiding modalities: a defect whose every culprit is hidden is not visible, so the unit counts
    as ``ok``; a ``multiple`` unit with one culprit left takes that culprit's class when the model has it. Units
    without culprits keep their targets (a graded ``ok`` keeps its soft defect target)."""
    culprit = t.culprit * visible.float()
    seen = culprit.sum(dim=1)
    hidden = (t.culprit.sum(dim=1) > 0) & (seen == 0)
    defect = t.defect.masked_fill(hidden, 0.0)
    klass = t.klass.clone()
    klass[hidden] = 0
    changed = (seen > 0) & (seen < t.culprit.sum(dim=1))
    for i in changed.nonzero(as_tuple=True)[0].tolist():
        if seen[i] == 1:
            m = MODALITIES[int(culprit[i].argmax())]
            if m in class_names:
                klass[i] = class_names.index(m)
    return Targets(defect, klass, culprit)


def supervised_loss(out, t: Targets, cfg: TrainConfig,
                    modality: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Defect BCE + class CE + the per-modality culprit BCE of ``out.modality_logits`` over ``out.present``, or of
    ``modality`` = ``([B, M] logits, [B, M] present)`` when given (the heads under another mask)."""
    logits, shown = (out.modality_logits, out.present) if modality is None else modality
    present = shown.float()
    bce = F.binary_cross_entropy_with_logits(out.defect_logit.float(), t.defect)
    ce = F.cross_entropy(out.class_logits.float(), t.klass, label_smoothing=cfg.label_smoothing)
    per_mod = F.binary_cross_entropy_with_logits(logits.float(), t.culprit, reduction="none")
    mod = (per_mod * present).sum() / present.sum().clamp_min(1.0)
    loss = bce + cfg.class_weight * ce + cfg.modality_weight * mod
    parts = {"loss": loss, "bce": bce, "ce": ce, "modality": mod}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class PreparedSet:
    """Units preprocessed once and collated into one big :class:`Batch` plus targets; batches are index slices."""

    def __init__(self, model: InspectionModel, units: Sequence[Unit], class_names: Sequence[str],
                 progress: Callable[[int], None] | None = None, *, soft_targets: bool = False) -> None:
        if not units:
            raise DataError("no units to prepare")
        prepared = []
        for u in units:
            prepared.append(model.prepare(u))
            if progress:
                progress(1)
        self.batch = model.collate(prepared, [u.line_id for u in units])
        self.targets = targets_for(units, class_names, soft_targets)
        self.unit_ids = [u.unit_id for u in units]

    def __len__(self) -> int:
        return len(self.unit_ids)

    def to(self, device: torch.device) -> PreparedSet:
        self.batch = self.batch.to(device)
        t = self.targets
        self.targets = Targets(t.defect.to(device), t.klass.to(device), t.culprit.to(device))
        return self

    def take(self, idx: torch.Tensor) -> tuple[Batch, Targets]:
        b = self.batch
        idx = idx.to(b.present.device)
        batch = Batch({m: {k: v[idx] for k, v in d.items()} for m, d in b.inputs.items()}, b.present[idx],
                      b.line_index[idx])
        t = self.targets
        return batch, Targets(t.defect[idx], t.klass[idx], t.culprit[idx])


def augment_images(batch: Batch, generator: torch.Generator, photometric: float = 1.0,
                   affine: float = 0.0) -> Batch:
    """Random flips, 90° rotations and a brightness/contrast jitter (ranges scaled by ``photometric``) of each
    image, then an optional small affine warp of strength ``affine`` (see :class:`TrainConfig`); on the batch's
    device."""
    if "vision" not in batch.inputs:
        return batch
    img = batch.inputs["vision"]["image"]  # [B, 3, S, S]
    b = img.shape[0]
    draw = lambda *shape: torch.rand(shape, generator=generator).to(img.device)  # noqa: E731
    out = torch.where(draw(b, 1, 1, 1) < 0.5, img.flip(-1), img)
    out = torch.where(draw(b, 1, 1, 1) < 0.5, out.flip(-2), out)
    rot = (draw(b) * 4).long().clamp_max(3)
    for r in range(1, 4):
        sel = rot == r
        if sel.any():
            out[sel] = torch.rot90(out[sel], r, dims=(-2, -1))
    gain = 1.0 + (draw(b, 1, 1, 1) - 0.5) * 0.2 * photometric  # contrast x0.9-1.1 at 1
    offset = (draw(b, 1, 1, 1) - 0.5) * 0.1 * photometric  # brightness +-0.05 (normalised units) at 1
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * gain + mean + offset
    if affine > 0:
        out = _affine_warp(out, draw(b, 4) * 2 - 1, affine)
    inputs = dict(batch.inputs)
    inputs["vision"] = {**batch.inputs["vision"], "image": out}
    return Batch(inputs, batch.present, batch.line_index)


def _affine_warp(img: torch.Tensor, u: torch.Tensor, strength: float) -> torch.Tensor:
    """Rotate by ``10·strength·u0`` degrees, scale by ``1 + 0.1·strength·u1`` and shift by ``5·strength·u2/u3``
    % of the side (``u [B, 4]`` uniform in [-1, 1]); borders reflect. ``[B, C, S, S] -> [B, C, S, S]``."""
    angle = torch.deg2rad(10.0 * strength * u[:, 0])
    scale = 1.0 + 0.1 * strength * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = 0.1 * strength * u[:, 2:]  # normalised coordinates span 2, so 0.1 = 5 % of the side
    # the grid maps output to input coordinates: input = A (output - shift), so the content moves by +shift
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # [B, 2, 2]
    theta = torch.cat([a, -(a @ shift.unsqueeze(-1))], dim=-1)  # [B, 2, 3]
    grid = F.affine_grid(theta.to(img.dtype), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class TrainResult:
    """Attributes:
    history: one dict of metrics per epoch.
    seconds: wall time of training (without preprocessing).
    """

    model: InspectionModel
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _param_groups(model: InspectionModel, cfg: TrainConfig) -> list[dict]:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        (backbone if ".backbone." in f".{name}" else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.backbone_lr})
    return groups


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` of ``total``: linear warm-up over ``warmup`` steps,
    then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers (integer buffers, such as
    batch-norm step counters, are taken as they are when swapped in).

    Args:
        model: the model being trained; the average starts from its current weights.
        decay: the long-run decay in ``(0, 1)``; step ``n`` uses ``min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.steps = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimizer step)."""
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        live = model.state_dict()
        keys = list(self.state)
        torch._foreach_lerp_([self.state[k] for k in keys], [live[k].detach() for k in keys], 1.0 - d)
        self.steps += 1

    def averaged_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict: the averaged floating-point tensors plus the model's other tensors, cloned."""
        return {k: self.state.get(k, v).detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, model: InspectionModel, opt: torch.optim.Optimizer, epoch: int,
                     history: list[dict], average: WeightAverage | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state.items()})
    state = opt.state_dict()
    for pid, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp))
    tmp.replace(path.with_suffix(".safetensors"))
    meta = {"epoch": epoch, "history": history, "ema_steps": average.steps if average is not None else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                                 for g in state["param_groups"]]}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def _load_checkpoint(path: Path, model: InspectionModel, opt: torch.optim.Optimizer,
                     average: WeightAverage | None = None) -> tuple[int, list[dict]]:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        if meta.get("ema_steps") is None:
            raise ConfigError(f"{path.with_suffix('.json')} was written without a weight average; resume with "
                              "the ema_decay it was trained with (0)")
        for k in average.state:
            average.state[k].copy_(tensors[f"ema.{k}"])
        average.steps = int(meta["ema_steps"])
    state = opt.state_dict()
    for pid in list(state["state"].keys()) or range(sum(len(g["params"]) for g in state["param_groups"])):
        entry = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{pid}.")}
        if entry:
            state["state"][pid] = entry
    for g, saved in zip(state["param_groups"], meta["param_groups"], strict=True):
        g.update(saved)
    opt.load_state_dict(state)
    return int(meta["epoch"]), list(meta["history"])


def plot_curves(history: Sequence[dict], path: Path) -> None:
    """Loss and validation metric curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in history if "epoch" in h]
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if any("val_loss" in h for h in history):
        axes[0].plot(epochs, [h.get("val_loss", float("nan")) for h in history], label="val loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for key in ("val_auroc", "val_accuracy", "val_class_accuracy"):
        if any(key in h for h in history):
            axes[1].plot(epochs, [h.get(key, float("nan")) for h in history], label=key.removeprefix("val_"))
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(0, 1.02)
    if axes[1].lines:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def predict(model: InspectionModel, data: PreparedSet, device: torch.device, batch_size: int = 64,
            tta: bool = False, amp: bool = True, hide: Sequence[str] = (),
            on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Scores of a prepared set: ``score [B]`` (defect probability), ``class_prob [B, K]``,
    ``modality_score [B, M]`` (NaN where absent). ``tta`` averages the 8 flips/rotations of images; ``hide``
    masks modalities out, which is the same computation as units without them. ``on_batch`` is called with the
    number of units of each batch once it is scored (progress)."""
    model.eval()
    shown = torch.tensor([m not in hide for m in MODALITIES], dtype=torch.bool)
    scores, probs, mods = [], [], []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch, _ = data.take(idx)
        batch = batch.to(device)
        present = batch.present & shown.to(device)
        views = [batch]
        if tta and "vision" in batch.inputs:
            img = batch.inputs["vision"]["image"]
            views = [Batch({**batch.inputs, "vision": {**batch.inputs["vision"],
                                                       "image": torch.rot90(im, r, (-2, -1))}},
                           batch.present, batch.line_index) for im in (img, img.flip(-1)) for r in range(4)]
        logit = cls = mod = 0.0
        for v in views:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                out = model(v, present)
            logit = logit + out.defect_logit.float() / len(views)
            cls = cls + torch.softmax(out.class_logits.float(), -1) / len(views)
            mod = mod + out.modality_logits.float() / len(views)
        scores.append(torch.sigmoid(logit).cpu())
        probs.append(cls.cpu())
        m = torch.sigmoid(mod).cpu()
        m[~present.cpu()] = float("nan")
        mods.append(m)
        if on_batch is not None:
            on_batch(len(idx))
    return {"score": torch.cat(scores).numpy(), "class_prob": torch.cat(probs).numpy(),
            "modality_score": torch.cat(mods).numpy()}


def _val_metrics(model, val: PreparedSet, device, cfg: TrainConfig) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    pred = predict(model, val, device, amp=cfg.amp)
    y = val.targets.defect.cpu().numpy() > 0.5  # soft targets: p >= 0.5 is a defect (no target sits at 0.5)
    out = {"val_accuracy": float(((pred["score"] >= 0.5) == y).mean()),
           "val_class_accuracy": float((pred["class_prob"].argmax(1) == val.targets.klass.cpu().numpy()).mean())}
    if 0 < y.sum() < len(y):
        out["val_auroc"] = float(roc_auc_score(y, pred["score"]))
    model.eval()
    with torch.no_grad():
        losses = []
        for start in range(0, len(val), 64):
            idx = torch.arange(start, min(start + 64, len(val)))
            batch, t = val.take(idx)
            out_v = model(batch.to(device))
            losses.append(supervised_loss(out_v, Targets(t.defect.to(device), t.klass.to(device),
                                                         t.culprit.to(device)), cfg)[0].item() * len(idx))
        out["val_loss"] = float(sum(losses) / len(val))
    return out


def train_supervised(
    model_config: ModelConfig,
    train_units: Sequence[Unit],
    val_units: Sequence[Unit] | None,
    cfg: TrainConfig,
    out_dir: Path | str,
    *,
    resume: bool = False,
    progress: bool | Progress = True,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train a model on labelled units; writes ``checkpoint.*``, ``history.json``, ``curves.png`` and
    ``train_config.json`` / ``model_config.json`` (the resolved configs) into ``out_dir``.

    ``resume`` continues from the checkpoint in ``out_dir`` and is an error when there is none (a silent fresh
    start would cost the whole run again). ``stop_after_epoch`` ends this run early, as an interruption would,
    leaving the checkpoint for ``resume`` (for time-limited jobs); the schedule still spans ``cfg.epochs``.
    ``progress``: True reports preprocessing and epochs on stderr (a bar on a terminal, else one line per epoch:
    ``epoch 3/20  train_loss 0.412  val_loss 0.388  val_auroc 0.913  312 units/s  eta 4m10s``, the validation
    fields when measured), False is quiet, a :class:`Progress` chooses the stream and form.
    """
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    if resume:
        missing = [p.name for p in (ckpt.with_suffix(".json"), ckpt.with_suffix(".safetensors")) if not p.exists()]
        if missing:
            raise ConfigError(f"resume asked for, but the run folder {out_dir} has no checkpoint "
                              f"({', '.join(missing)} missing); train without resume to start afresh, or resume "
                              "with the run folder root, seed, fold and training seed of the interrupted run "
                              "(they name its folder)")
    report = Progress.of(progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = cfg.resolve_device()
    model = InspectionModel(model_config)
    (out_dir / "model_config.json").write_text(json.dumps(model_config.to_dict(), indent=1))
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    prep = report.stage("preprocess", len(train_units) + len(val_units or ()))
    soft = cfg.soft_targets
    train = PreparedSet(model, train_units, model_config.class_names, prep.update, soft_targets=soft)
    val = (PreparedSet(model, val_units, model_config.class_names, prep.update, soft_targets=soft)
           if val_units else None)
    prep.close(prep.done_line())
    fit_n = min(len(train), 2048)
    model.fit_normalisation(train.take(torch.arange(fit_n))[0])
    model.to(device)
    if device.type == "cuda":  # the whole prepared set lives on the GPU: no host copies per step
        train.to(device)
        if val is not None:
            val.to(device)

    opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(total * cfg.warmup_frac))
    history: list[dict] = []
    start_epoch = 0
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if resume:
        start_epoch, history = _load_checkpoint(ckpt, model, opt, average)
        log.info("resumed from epoch %d", start_epoch)
    moe_layers = [layer.ffn for layer in model.bridge.layers if hasattr(layer.ffn, "update_bias")]

    t_start = time.monotonic()
    best: tuple[tuple, int, dict] | None = None
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    run = Meter(len(train) * max(0, last_epoch - start_epoch), report.clock)  # the whole run's rate and ETA
    for epoch in range(start_epoch, last_epoch):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=gen)
        sums: dict[str, float] = {}
        bar = report.stage(f"epoch {epoch + 1}/{cfg.epochs}", len(train))
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * lr_factor(step, total, warmup)
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            out, parts = supervised_step(model, train, idx, gen, opt, cfg, device, model.parameters())
            if average is not None:
                average.update(model)
            for layer, stats in zip(moe_layers, out.router_stats, strict=True):
                layer.update_bias(stats.counts.to(layer.expert_bias.device))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            run.update(len(idx))
            bar.update(len(idx), batch=f"{s + 1}/{steps_per_epoch}", loss=f"{parts['loss']:.3f}",
                       run_eta=format_duration(run.rate_and_eta()[1]))
        row = {"epoch": epoch + 1, "train_loss": sums["loss"] / steps_per_epoch,
               **{f"train_{k}": v / steps_per_epoch for k, v in sums.items() if k != "loss"}}
        if out.router_stats:
            row["max_load_ratio"] = float(max(s.max_load_ratio for s in out.router_stats))
        live = None
        if average is not None:  # validate (and select) the averaged weights
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(average.averaged_state(model))
        if val is not None:
            row.update(_val_metrics(model, val, device, cfg))
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        shown = {k: f"{row[k]:.3f}" for k in ("train_loss", "val_loss", "val_auroc") if k in row}
        bar.close(f"epoch {epoch + 1}/{cfg.epochs}  " + "".join(f"{k} {v}  " for k, v in shown.items())
                  + run.summary(), **shown, run_eta=format_duration(run.rate_and_eta()[1]))
        if val is not None and cfg.select_best:
            score = _selection_score(row)
            if best is None or score > best[0]:
                best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if live is not None:
            model.load_state_dict(live)
        _save_checkpoint(ckpt, model, opt, epoch + 1, history, average)
    seconds = time.monotonic() - t_start
    if best is not None:
        model.load_state_dict(best[2])
        history.append({"selected_epoch": best[1], "selection_score": list(best[0])})
        log.info("selected epoch %d (validation score %s)", best[1], best[0])
    elif average is not None:
        model.load_state_dict(average.averaged_state(model))
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    try:
        plot_curves(history, out_dir / "curves.png")
    except ImportError:  # pragma: no cover - plotting is optional on minimal machines
        log.warning("matplotlib is not installed: no curves.png")
    model.cpu().eval()
    return TrainResult(model, history, seconds)


def supervised_step(model: InspectionModel, prepared: PreparedSet, idx: torch.Tensor, gen: torch.Generator,
                    opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
                    params) -> tuple[ModelOutput, dict[str, float]]:
    """One optimizer step of the supervised loss on the prepared rows ``idx``: modality dropout (targets follow
    what stays visible), image augmentation on ``device``, bf16 autocast on CUDA when ``cfg.amp``, gradients
    clipped to ``cfg.grad_clip`` over ``params`` (the parameters being trained). Returns the forward's output
    (its router stats feed the experts' bias update) and the loss parts (floats)."""
    batch, t = prepared.take(idx)
    present = drop_modalities(batch.present, model.config.modality_dropout, gen)
    culprit = t.culprit
    t = visible_targets(t, present, model.config.class_names)
    batch = batch.to(device)
    if cfg.augment:
        batch = augment_images(batch, gen, cfg.photometric_jitter, cfg.affine_jitter)
    t = Targets(t.defect.to(device), t.klass.to(device), t.culprit.to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        encoded = model.encode(batch)
        if cfg.encoder_grad == "all":
            out = model.fuse(encoded, present.to(device))
            loss, parts = supervised_loss(out, t, cfg)
        else:  # the fused path on detached tokens; the heads on every modality the unit has, against its culprits
            out = model.fuse(dataclasses.replace(encoded, tokens=encoded.tokens.detach()), present.to(device))
            own = (model.modality_logits(encoded)[0], encoded.present)
            loss, parts = supervised_loss(out, Targets(t.defect, t.klass, culprit.to(device)), cfg, modality=own)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return out, parts


def _selection_score(row: dict) -> tuple[float, float, float]:
    """Higher is better: validation AUROC (when both classes are present), then class accuracy (AUROC often
    saturates at 1.0), then minus the validation loss."""
    return (row.get("val_auroc", 0.0), row["val_class_accuracy"], -row["val_loss"])


def load_train_config(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data)
