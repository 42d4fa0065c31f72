"""Per-line LoRA adapters (peft) on a frozen base model: training, the adapter store and mixed-line scoring.

B batch · B_m units that have modality m · R rows of one fuse call (B, or k per unit) · r rank · D width

One base model serves many lines. A line whose units look different (another cell type, another camera, another
machine) gets a small adapter: low-rank updates ``W + (alpha / r) · B·A`` of chosen linear layers and 1x1
convolutions, trained on that line's labelled units while every base weight stays frozen, and with it the base's
batch-norm statistics, feature normalisation and MoE balancing bias. Targets come in groups
(:data:`TARGET_GROUPS`):

- ``bridge``: the query, key-value and output projections of every cross- and self-attention of the bridge (and
  the feed-forward of a dense bridge; the MoE's experts and router stay as they are);
- ``heads``: the defect, class and per-modality heads (a rank-r update of a one-output head spans every update
  of its weights; its bias stays);
- ``vision``: the vision encoder's 1x1 projection from backbone features to tokens;
- ``backbone``: the backbone's last 1x1 convolution (``conv_head``) and the 1x1 convolutions of its last
  ``backbone_stages`` stages.

Store: adapters live beside their base version, one :class:`~inspection.store.ModelStore` per (base version,
line), so each line's adapters are versioned, hash-checked, promoted and rolled back like models::

    <family store>/adapters/<base version>/<line id>/m0001-<sha>/{weights.safetensors, card.json}

The weights file holds the LoRA tensors (``<module>.lora_A.weight``, ``<module>.lora_B.weight``) and the line's
decision threshold (``thresholds``, ``[1]``), chosen on the line's validation units with the adapter in place.
The card (:func:`adapter_card`) records kind, line, base version and base SHA-256, rank and targets, the data's
digests, metrics, calibration, parameter counts and (the store's own field) when it was made. Loading checks the
weights' SHA-256 (the store) and that the card's base SHA-256 is the base version's: an adapter trained on
another base is refused.

Scoring: :func:`load_line_adapters` injects the promoted adapter of every line into one copy of the base model
(peft adapter names ``line0``, ``line1``, ...). :meth:`LineAdapters.rows` picks each unit's adapter by its line
id for one forward pass: peft's mixed-adapter batches, in which every LoRA layer takes ``adapter_names`` (one
per input row, ``__base__`` for the base), apply each row's adapter to that row only. An encoder's layers see
the units that have its modality; the bridge's and heads' layers see one row per unit or, for the coalition
rows of explanations, k rows per unit, unit after unit (as :func:`explain.shapley.stack_coalitions` lays them
out). Rows of lines without an adapter compute exactly the base model's numbers. ``load_line_adapters`` can also
load exactly given adapter versions (an audit reproduces a decision with the version it names, a re-scoring can
run without adapters), and :meth:`LineAdapters.only` puts one line's adapter on every row of any forward pass
(explanations of that line's units run forwards of other shapes than scoring).

A decision made with a line adapter names model version ``<base version>+<line>:<adapter version>``
(:func:`adapted_version`, :func:`split_model_version`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inspection.calibration import METHODS, choose_threshold
from inspection.config import from_dict, to_dict
from inspection.errors import (
    ConfigError,
    NotCalibratedError,
    Reason,
    RecordError,
    StoreError,
)
from inspection.model import InspectionModel
from inspection.progress import Meter, Progress
from inspection.records import MODALITIES, Decision, Unit, check_id
from inspection.store import ADAPTERS_DIR, DEFAULT_KEEP, ModelStore, ModelVersion
from inspection.training import PreparedSet, TrainConfig, lr_factor, predict, supervised_step

log = logging.getLogger(__name__)

#: Card field ``kind`` of an adapter version; a model card has none.
ADAPTER_KIND = "lora-adapter"
#: Target groups an adapter may adapt (see the module docstring).
TARGET_GROUPS: tuple[str, ...] = ("bridge", "heads", "vision", "backbone")
#: The default targets: bridge projections, heads and the vision projection (under 1 % of an ELPV model).
DEFAULT_TARGETS: tuple[str, ...] = ("bridge", "heads", "vision")
#: peft's adapter name of rows that take no adapter.
BASE_ROW = "__base__"
#: peft's adapter name while one adapter is trained.
TRAIN_NAME = "line"
#: Calibration methods of :func:`calibrate_line`: the validation-based ones, and ``fixed``.
LINE_METHODS: tuple[str, ...] = (*METHODS, "fixed")
_PEFT_REPEAT_WARNING = "Already found a `peft_config` attribute"


def adapted_version(base_version: str, line: str, adapter_version: str) -> str:
    """The model version a decision made with a line adapter names: ``<base version>+<line>:<adapter version>``."""
    return f"{base_version}+{line}:{adapter_version}"


def split_model_version(model_version: str) -> tuple[str, str | None, str | None]:
    """``(base version, line, adapter version)`` of a decision's model version; line and adapter are None for a
    decision of the base alone (the inverse of :func:`adapted_version`; line ids hold no ``+``, adapter versions
    no ``:``).

    Raises:
        StoreError: a ``+`` without ``<line>:<adapter version>`` after it.
    """
    base, plus, rest = model_version.partition("+")
    if not plus:
        return model_version, None, None
    line, colon, adapter = rest.rpartition(":")
    if not (base and colon and line and adapter):
        raise StoreError(f"model version {model_version!r} is neither a version id nor "
                         "'<version>+<line>:<adapter version>'")
    return base, line, adapter


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class AdapterConfig:
    """Attributes:
    rank: r, the rank of every low-rank update.
    alpha: LoRA's alpha; updates are scaled by ``alpha / rank`` (default ``2 · rank``: scale 2).
    dropout: dropout on the adapter's input in training (0: none).
    targets: target groups, some of :data:`TARGET_GROUPS`.
    backbone_stages: with ``backbone``: how many of the backbone's last stages get their 1x1 convolutions
        adapted (besides its last 1x1 convolution).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    backbone_stages: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 256:
            raise ConfigError(f"rank must be an integer in [1, 256]; got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, int | float) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0 (or None for 2 x rank); got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets must be distinct names from {list(TARGET_GROUPS)}; got {list(self.targets)}")
        if isinstance(self.backbone_stages, bool) or not isinstance(self.backbone_stages, int) \
                or self.backbone_stages < 0:
            raise ConfigError(f"backbone_stages must be an integer >= 0; got {self.backbone_stages!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> AdapterConfig:
        return from_dict(cls, dict(data), "adapter")


def target_modules(model: InspectionModel, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config``'s target groups adapt in ``model`` (see the module docstring).

    Raises:
        ConfigError: a group names nothing in this model (``vision`` or ``backbone`` without a vision encoder,
            a backbone without 1x1 convolutions where expected).
    """
    from fusion.moe import SwiGLU
    from inspection.encoders import VisionEncoder

    groups: dict[str, list[str]] = {}
    bridge = []
    for i, layer in enumerate(model.bridge.layers):
        bridge += [f"bridge.layers.{i}.{attn}.{p}" for attn in ("cross", "self_attn") for p in ("q", "kv", "out")]
        if isinstance(layer.ffn, SwiGLU):  # a dense bridge; the MoE's experts are not nn.Linear modules
            bridge += [f"bridge.layers.{i}.ffn.{p}" for p in ("gate", "up", "down")]
    groups["bridge"] = bridge
    groups["heads"] = ["defect_head", "class_head", *(f"modality_heads.{m}.1" for m in model.config.modalities)]
    vision = dict(model.encoders.items()).get("vision")
    groups["vision"] = ["encoders.vision.proj"] if isinstance(vision, VisionEncoder) else []
    backbone: list[str] = []
    if isinstance(vision, VisionEncoder):
        net = vision.backbone
        head = getattr(net, "conv_head", None)
        if _is_pointwise(head):
            backbone.append("encoders.vision.backbone.conv_head")
        blocks = getattr(net, "blocks", None)
        if isinstance(blocks, nn.Sequential) and config.backbone_stages:
            for s in range(max(0, len(blocks) - config.backbone_stages), len(blocks)):
                backbone += [f"encoders.vision.backbone.blocks.{s}.{n}" for n, mod in blocks[s].named_modules()
                             if _is_pointwise(mod)]
    groups["backbone"] = backbone
    out: list[str] = []
    for group in config.targets:
        if not groups[group]:
            raise ConfigError(f"adapter target {group!r} names no layer of this model (it reads "
                              f"{list(model.config.modalities)}); choose from the groups it has: "
                              f"{[g for g in TARGET_GROUPS if groups[g]]}")
        out += groups[group]
    return out


def _is_pointwise(module: object) -> bool:
    """A 1x1, ungrouped, undilated 2-D convolution (LoRA's low-rank pair reproduces its geometry exactly)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1 \
        and tuple(module.stride) == (1, 1)


def _inject(model: nn.Module, config: AdapterConfig, modules: Sequence[str], name: str) -> None:
    """Inject one adapter named ``name`` into ``model``'s ``modules`` in place (peft LoRA, B initialised to 0).

    Raises:
        ValueError: a module is missing or cannot be adapted.
    """
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(modules), bias="none")
    with warnings.catch_warnings():  # a second adapter in one model is what we want here
        warnings.filterwarnings("ignore", message=_PEFT_REPEAT_WARNING)
        inject_adapter_in_model(lora, model, adapter_name=name)
    adapted = {n for n, layer in _lora_layers(model) if name in layer.lora_A}
    missing = [m for m in modules if m not in adapted]  # peft skips names that match no module
    if missing:
        raise ValueError(f"{len(missing)} target module(s) are not adaptable layers of this model, e.g. {missing[:3]}")


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The adapter ``name``'s tensors: ``<module>.lora_A.weight`` ``[r, in(, 1, 1)]`` and ``<module>.lora_B.weight``
    ``[out, r(, 1, 1)]`` per adapted module (detached, on their device)."""
    out = {}
    for module_name, layer in _lora_layers(model):
        if name in layer.lora_A:
            out[f"{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return out


def _load_state(model: nn.Module, name: str, state: Mapping[str, Tensor], where: str) -> None:
    """Copy an adapter state into the injected adapter ``name``; the key sets and shapes must match exactly."""
    expected = adapter_state(model, name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StoreError(f"{where} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]} "
                         f"({len(missing)} / {len(unexpected)} in all)")
    with torch.no_grad():
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise StoreError(f"{where}: tensor {key} is {tuple(state[key].shape)}; the model expects "
                                 f"{tuple(target.shape)}")
            target.copy_(state[key].to(target.dtype))


def parameter_count(model: nn.Module) -> int:
    """Parameters of a model (no buffers)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- training
@dataclass
class FitResult:
    """Attributes:
    history: one dict per epoch (``train_loss``; ``val_loss``, ``val_auroc``, ``val_accuracy``,
        ``val_class_accuracy`` with validation units), then ``{"selected_epoch": ...}`` when one was selected.
    seconds: wall time of the epochs (without preprocessing).
    trainable: parameters trained.
    """

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0


def _prepared(model: InspectionModel, units: Sequence[Unit] | PreparedSet, soft: bool, what: str) -> PreparedSet:
    if isinstance(units, PreparedSet):
        return units
    names = model.config.class_names
    unknown = sorted({u.label.defect_class for u in units if u.label is not None} - set(names))
    if unknown:
        raise ConfigError(f"the {what} units have classes {unknown} the base model does not know (its class head "
                          f"has {list(names)}); an adapter keeps the base's heads: name the line's classes as the "
                          "base does (an image folder's defect/<class>/ subfolders)")
    reads = set(model.config.modalities)
    blind = [u.unit_id for u in units if not reads & set(u.present)]
    if blind:
        raise ConfigError(f"{len(blind)} {what} unit(s) have none of the modalities the base model reads "
                          f"({list(model.config.modalities)}), e.g. {blind[:3]}")
    try:
        return PreparedSet(model, units, names, soft_targets=soft)
    except (RecordError, ValueError) as exc:
        raise ConfigError(f"the {what} units do not fit the base model's preprocessing: {exc}") from exc


def _val_row(model: InspectionModel, val: PreparedSet, device: torch.device, cfg: TrainConfig) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    pred = predict(model, val, device, amp=cfg.amp)
    target = val.targets.defect.cpu().numpy()
    y = target > 0.5
    score = np.clip(pred["score"].astype(np.float64), 1e-7, 1 - 1e-7)
    row = {"val_loss": float(-(target * np.log(score) + (1 - target) * np.log(1 - score)).mean()),
           "val_accuracy": float(((pred["score"] >= 0.5) == y).mean()),
           "val_class_accuracy": float((pred["class_prob"].argmax(1) == val.targets.klass.cpu().numpy()).mean())}
    if 0 < y.sum() < len(y):
        row["val_auroc"] = float(roc_auc_score(y, pred["score"]))
    return row


def fine_tune(model: InspectionModel, train: Sequence[Unit] | PreparedSet, val: Sequence[Unit] | PreparedSet | None,
              cfg: TrainConfig, *, parameters: Sequence[nn.Parameter] | None = None, frozen_base: bool = True,
              progress: bool | Progress = False) -> FitResult:
    """Train some of a model's parameters on labelled units, in place, keeping the epoch with the best validation
    score (AUROC, then class accuracy, then minus the defect loss) when validation units are given.

    The loss, modality dropout, image augmentation and learning-rate schedule are those of
    :func:`inspection.training.train_supervised` (``cfg.lr`` for every parameter trained; ``backbone_lr`` and
    ``ema_decay`` do not apply). With ``frozen_base`` the model runs in eval mode while it trains (batch-norm
    statistics, dropout and the MoE balancing bias stay as the base has them; only the adapters' own dropout is
    on); without it, in train mode with the bias updated, as full training does.

    Args:
        model: the model, changed in place and left in eval mode on the CPU.
        train, val: units (preprocessed here) or sets already prepared for this model's preprocessing.
        parameters: the parameters to train (default: every parameter that requires a gradient).
        frozen_base: see above.
        progress: as in :func:`~inspection.training.train_supervised`.

    Raises:
        ConfigError: no parameter to train, a weight average asked for, or units the model cannot take.
    """
    if cfg.ema_decay:
        raise ConfigError("fine_tune trains without a weight average: set ema_decay to 0")
    report = Progress.of(progress)
    torch.manual_seed(cfg.seed)
    device = cfg.resolve_device()
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    names = {id(p): n for n, p in model.named_parameters()}
    keep = [names[id(p)] for p in params]
    train_set = _prepared(model, train, cfg.soft_targets, "training")
    val_set = _prepared(model, val, cfg.soft_targets, "validation") if val is not None and len(val) else None
    model.to(device)
    if device.type == "cuda":
        train_set.to(device)
        if val_set is not None:
            val_set.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(total * cfg.warmup_frac))
    moe_layers = [] if frozen_base else [layer.ffn for layer in model.bridge.layers if hasattr(layer.ffn, "update_bias")]
    dropouts = [m for _, layer in _lora_layers(model) for m in layer.lora_dropout.values()]
    history: list[dict] = []
    best: tuple[tuple, int, dict] | None = None
    run = Meter(len(train_set) * cfg.epochs, report.clock)
    t0 = time.monotonic()
    for epoch in range(cfg.epochs):
        if frozen_base:
            model.eval()
            for d in dropouts:
                d.train()
        else:
            model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train_set), generator=gen)
        total_loss = 0.0
        bar = report.stage(f"epoch {epoch + 1}/{cfg.epochs}", len(train_set))
        for s in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(epoch * steps_per_epoch + s, total, warmup)
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            out, parts = supervised_step(model, train_set, idx, gen, opt, cfg, device, params)
            for layer, stats in zip(moe_layers, out.router_stats, strict=False):
                layer.update_bias(stats.counts.to(layer.expert_bias.device))
            total_loss += parts["loss"]
            run.update(len(idx))
            bar.update(len(idx), loss=f"{parts['loss']:.3f}")
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch}
        if val_set is not None:
            row.update(_val_row(model, val_set, device, cfg))
            score = (row.get("val_auroc", 0.0), row["val_class_accuracy"], -row["val_loss"])
            if cfg.select_best and (best is None or score > best[0]):
                state = model.state_dict()
                snapshot = {k: state[k].detach().clone() for k in (keep if frozen_base else state)}
                best = (score, epoch + 1, snapshot)
        history.append(row)
        shown = {k: f"{row[k]:.3f}" for k in ("train_loss", "val_loss", "val_auroc") if k in row}
        bar.close(f"epoch {epoch + 1}/{cfg.epochs}  " + "".join(f"{k} {v}  " for k, v in shown.items())
                  + run.summary(), **shown)
    seconds = time.monotonic() - t0
    if best is not None:
        model.load_state_dict(best[2], strict=False)
        history.append({"selected_epoch": best[1], "selection_score": list(best[0])})
    model.cpu().eval()
    return FitResult(history, seconds, sum(p.numel() for p in params))


@dataclass(frozen=True)
class LineCalibration:
    """A line's threshold, chosen on its validation units with its adapter in place.

    Attributes:
        threshold: decide defect when ``score >= threshold``.
        method: one of :data:`LINE_METHODS`; target_far: for ``far``.
        version: content hash of line, threshold and method (``t-...``).
        n_units: validation units it was chosen on.
        metrics: on those units at that threshold (accuracy, F1, AUROC, counts).
    """

    threshold: float
    method: str
    target_far: float | None
    version: str
    n_units: int
    metrics: dict

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_line(model: InspectionModel, val: Sequence[Unit] | PreparedSet, line: str, *, method: str = "max_f1",
                   target_far: float = 0.01, threshold: float | None = None, device: str | torch.device = "cpu",
                   amp: bool = True) -> LineCalibration:
    """Choose a line's threshold on its validation units as scored by ``model`` (with the line's adapter in place):
    :func:`inspection.calibration.choose_threshold`, or ``threshold`` itself for method ``fixed``.

    Raises:
        ConfigError: an unknown method, no validation units, a threshold given (or missing) for ``fixed``.
    """
    from inspection.evaluation import binary_metrics

    if method not in LINE_METHODS:
        raise ConfigError(f"calibration method must be one of {list(LINE_METHODS)}; got {method!r}")
    if (threshold is not None) != (method == "fixed"):
        raise ConfigError("a threshold is given with method 'fixed' only, and method 'fixed' needs one")
    if val is None or not len(val):
        raise ConfigError(f"line {line!r} has no validation units to choose its threshold on")
    data = _prepared(model, val, False, "validation")
    pred = predict(model, data, torch.device(device), amp=amp)
    labels = data.targets.defect.cpu().numpy() > 0.5
    if method == "fixed":
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"a fixed threshold is a defect probability in (0, 1); got {threshold}")
        chosen = float(threshold)
    else:
        chosen = choose_threshold(pred["score"], labels, method, target_far)
    far = target_far if method == "far" else None
    payload = json.dumps({"line": line, "threshold": chosen, "method": method, "target_far": far}, sort_keys=True)
    version = "t-" + hashlib.sha256(payload.encode()).hexdigest()[:10]
    metrics = _plain_metrics(binary_metrics(pred["score"], labels, chosen))
    return LineCalibration(chosen, method, far, version, len(data), metrics)


def _plain_metrics(metrics: Mapping[str, Any]) -> dict:
    """Metrics as JSON numbers: confusion counts as int, the rest as float."""
    return {k: int(v) if k in ("tp", "fp", "fn", "tn") else float(v) for k, v in metrics.items()}


@dataclass
class AdapterResult:
    """A trained, calibrated adapter.

    Attributes:
        model: a copy of the base model with the adapter injected (peft name :data:`TRAIN_NAME`, active), eval.
        config: the adapter's config; modules: the modules it adapts.
        state: its tensors (:func:`adapter_state`).
        fit: training history, time and trainable parameters.
        calibration: the line's threshold on its validation units with the adapter in place.
        base_metrics: the base model (no adapter) on the same units at its own threshold for the line, or None
            when the base is not calibrated.
        base_parameters: parameters of the base model.
    """

    model: InspectionModel
    config: AdapterConfig
    modules: list[str]
    state: dict[str, Tensor]
    fit: FitResult
    calibration: LineCalibration
    base_metrics: dict | None
    base_parameters: int

    @property
    def trainable_share(self) -> float:
        """Adapter parameters over base parameters."""
        return self.fit.trainable / self.base_parameters


def train_adapter(base: InspectionModel, train: Sequence[Unit] | PreparedSet, val: Sequence[Unit] | PreparedSet,
                  line: str, config: AdapterConfig, cfg: TrainConfig, *, method: str = "max_f1",
                  target_far: float = 0.01, threshold: float | None = None,
                  progress: bool | Progress = False) -> AdapterResult:
    """Train a LoRA adapter for one line on a frozen copy of ``base`` (``base`` itself is not changed), select
    its epoch on ``val`` and choose the line's threshold on ``val`` with the adapter in place.

    Args:
        base: the base model (calibrated or not).
        train, val: the line's labelled units (classes the base knows; modalities it reads), or sets already
            prepared for the base's preprocessing.
        line: the line id.
        config: rank and targets.
        cfg: epochs, batch size, learning rate (``cfg.lr``), seed, device, augmentation.
        method, target_far, threshold: the line's calibration (:func:`calibrate_line`).
        progress: as in :func:`~inspection.training.train_supervised`.

    Raises:
        ConfigError: an invalid line id, targets this model lacks, no validation units, units the base cannot take.
    """
    _check_line(line)
    if not val:
        raise ConfigError(f"line {line!r} needs validation units: they select the epoch and the line's threshold")
    model = copy.deepcopy(base).cpu().eval()
    modules = target_modules(model, config)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation (A random, B zero)
    _inject(model, config, modules, TRAIN_NAME)
    val_set = _prepared(model, val, False, "validation")
    fit_val = _prepared(model, val, True, "validation") if cfg.soft_targets else val_set
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and f".{TRAIN_NAME}." in n]
    fit = fine_tune(model, train, fit_val, cfg, parameters=trainable, frozen_base=True, progress=progress)
    device = cfg.resolve_device()
    amp = cfg.amp
    calibration = calibrate_line(model.to(device), val_set, line, method=method, target_far=target_far,
                                 threshold=threshold, device=device, amp=amp)
    model.cpu()
    base_metrics = None
    if bool(torch.isfinite(base.thresholds).all()):
        from inspection.evaluation import binary_metrics

        reference = copy.deepcopy(base).to(device).eval()
        pred = predict(reference, val_set, device, amp=amp)
        labels = val_set.targets.defect.cpu().numpy() > 0.5
        base_threshold = float(base.thresholds[base.line_slot(line)])
        base_metrics = _plain_metrics(binary_metrics(pred["score"], labels, base_threshold))
        base_metrics["threshold"] = base_threshold
    state = {k: v.cpu() for k, v in adapter_state(model, TRAIN_NAME).items()}
    return AdapterResult(model, config, modules, state, fit, calibration, base_metrics, parameter_count(base))


# ------------------------------------------------------------------------------------------------- store
def _check_line(line: str) -> str:
    try:
        return check_id(line, "the line id", Reason.BAD_LINE_ID)
    except RecordError as exc:
        raise ConfigError(exc.detail) from exc


def adapter_store(family: ModelStore, base_version: str, line: str, *, keep: int = DEFAULT_KEEP) -> ModelStore:
    """The store of one line's adapters of one base version: ``<family>/adapters/<base_version>/<line>``."""
    _check_line(line)
    family.get(base_version)  # an unknown base is an error that lists the known versions
    return ModelStore(family.root / ADAPTERS_DIR / base_version / line, keep=keep)


def adapter_card(result: AdapterResult, *, line: str, base: ModelVersion, data: Mapping | None = None,
                 train_cfg: TrainConfig | None = None) -> dict:
    """The card of an adapter version (the store adds version, created, sha256 and sizes)."""
    import peft

    cal = result.calibration
    return {
        "kind": ADAPTER_KIND, "line": line, "base_version": base.version, "base_sha256": base.sha256,
        "adapter": result.config.to_dict(), "lora_alpha": result.config.lora_alpha,
        "target_modules": list(result.modules), "peft_version": peft.__version__,
        "trainable_parameters": result.fit.trainable, "base_parameters": result.base_parameters,
        "trainable_share": result.trainable_share,
        "data": dict(data) if data is not None else None,
        "train_config": asdict(train_cfg) if train_cfg is not None else None,
        "history": result.fit.history, "train_seconds": round(result.fit.seconds, 1),
        "metrics": {"val": cal.metrics, "val_base": result.base_metrics},
        "calibration": cal.to_dict(), "threshold_version": cal.version,
    }


def save_adapter(family: ModelStore, base_version: str, line: str, result: AdapterResult, *,
                 data: Mapping | None = None, train_cfg: TrainConfig | None = None, promote: bool = True,
                 keep: int = DEFAULT_KEEP) -> ModelVersion:
    """Save an adapter as a new version of ``line``'s adapters of ``base_version`` (safetensors + card) and
    promote it unless told otherwise.

    Raises:
        StoreError: the base version is unknown, or the adapter cannot be written.
    """
    base = family.get(base_version)
    store = adapter_store(family, base_version, line, keep=keep)
    tensors = {**result.state, "thresholds": torch.tensor([result.calibration.threshold], dtype=torch.float32)}
    card = adapter_card(result, line=line, base=base, data=data, train_cfg=train_cfg)
    return store.save(tensors, card, promote=promote)


@dataclass(frozen=True)
class AdapterEntry:
    """One stored adapter version: its base version, line and the store's view of it."""

    base_version: str
    line: str
    version: ModelVersion


def _line_dirs(family: ModelStore, base_version: str) -> list[str]:
    root = family.root / ADAPTERS_DIR / base_version
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def list_adapters(family: ModelStore, base_version: str | None = None, line: str | None = None) -> list[AdapterEntry]:
    """Every stored adapter version, by base version, line and age (oldest first).

    Raises:
        StoreError: the family store does not exist or cannot be read.
    """
    family.versions()  # a missing store is an error that names the path
    root = family.root / ADAPTERS_DIR
    bases = [base_version] if base_version else (sorted(p.name for p in root.iterdir() if p.is_dir())
                                                 if root.is_dir() else [])
    out = []
    for b in bases:
        for name in _line_dirs(family, b):
            if line is None or name == line:
                out += [AdapterEntry(b, name, v) for v in ModelStore(root / b / name).versions()]
    return out


def load_adapter(family: ModelStore, base: ModelVersion, line: str,
                 version: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Load a line's adapter of ``base`` (``version`` None: the promoted one), verified.

    The store checks the weights' SHA-256 against the card; the card must name this base's SHA-256 and hold a
    finite threshold.

    Raises:
        StoreError: no such adapter, a tampered file, an adapter of another base, or a card that is not an
            adapter's.
    """
    store = ModelStore(family.root / ADAPTERS_DIR / base.version / _check_line(line))
    state, card = store.load(version)
    where = f"adapter {card['version']} of line {line!r} in {store.root}"
    if card.get("kind") != ADAPTER_KIND:
        raise StoreError(f"{where} has kind {card.get('kind')!r}; expected {ADAPTER_KIND!r}")
    if card.get("base_sha256") != base.sha256 or card.get("base_version") != base.version:
        raise StoreError(
            f"{where} was trained on base {card.get('base_version')} (sha256 {str(card.get('base_sha256'))[:16]}...), "
            f"not on {base.version} (sha256 {base.sha256[:16]}...): refusing it. An adapter only fits the exact "
            f"weights it was trained on; adapt the line again on {base.version} (`inspection adapt --from "
            f"{base.version} ...`)")
    if card.get("line") != line:
        raise StoreError(f"{where} names line {card.get('line')!r}; its folder is {line!r}")
    thresholds = state.pop("thresholds", None)
    if thresholds is None or thresholds.numel() != 1 or not bool(torch.isfinite(thresholds).all()):
        raise NotCalibratedError(f"{where} has no finite line threshold; adapt the line again")
    card["threshold"] = float(thresholds.reshape(()))
    return state, card


# ----------------------------------------------------------------------------------------------- serving
@dataclass(frozen=True)
class LineAdapter:
    """One line's adapter as served.

    Attributes:
        line: the line id; name: its peft adapter name in the served copy.
        version: the adapter's version in its store; threshold, threshold_version: the line's calibration.
        card: the adapter's card (read-only use).
    """

    line: str
    name: str
    version: str
    threshold: float
    threshold_version: str
    card: Mapping[str, Any] = field(repr=False, compare=False)


class LineAdapters:
    """The adapters of one base version, injected into one copy of the base model (see the module docstring).

    Args:
        model: the base model, on its device (not changed: it is copied).
        adapters: ``(state, card)`` per line, as :func:`load_adapter` returns them.

    Raises:
        StoreError: a card's targets or tensors do not fit the model.
    """

    def __init__(self, model: InspectionModel, adapters: Mapping[str, tuple[Mapping[str, Tensor], Mapping]]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        copy_ = copy.deepcopy(model).eval()
        self.lines: dict[str, LineAdapter] = {}
        for i, (line, (state, card)) in enumerate(sorted(adapters.items())):
            name = f"line{i}"
            where = f"adapter {card.get('version')} of line {line!r}"
            try:
                config = AdapterConfig.from_dict(card["adapter"])
                modules = list(card["target_modules"])
            except (ConfigError, KeyError, TypeError) as exc:
                raise StoreError(f"{where} has no valid adapter config in its card: {exc}") from exc
            try:
                _inject(copy_, config, modules, name)
            except ValueError as exc:  # peft: a target module the model does not have
                raise StoreError(f"{where} targets modules this base does not have: {exc}") from exc
            _load_state(copy_, name, state, where)
            self.lines[line] = LineAdapter(line, name, str(card["version"]), float(card["threshold"]),
                                           str(card["threshold_version"]), card)
        for module in copy_.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter([])  # without rows(): the base model's numbers
        for p in copy_.parameters():
            p.requires_grad_(False)
        self.model = copy_
        self._scopes = {name: _scope(name) for name, _ in _lora_layers(copy_)}

    def __len__(self) -> int:
        return len(self.lines)

    def only(self, line: str) -> AdaptedRows | None:
        """Line ``line``'s adapter for every row of every forward pass of the adapted copy inside the context,
        whatever the row count (an explanation's encode of a few units of that line, the coalition rows of one
        unit, its input-masked copies), or None when the line has no adapter (then the base model explains it)."""
        adapter = self.lines.get(line)
        return None if adapter is None else AdaptedRows(self, [adapter], None)

    def rows(self, line_ids: Sequence[str], present: Tensor) -> AdaptedRows | None:
        """Each unit's adapter for one forward pass of the adapted copy, or None when no unit's line has one
        (then the base model scores the batch as it would without adapters).

        Args:
            line_ids: ``[B]`` the line of each batch row.
            present: ``[B, M]`` bool, the modalities each row has (which units each encoder sees).
        """
        chosen = [self.lines.get(line) for line in line_ids]
        if all(a is None for a in chosen):
            return None
        if present.shape[0] != len(line_ids):
            raise ValueError(f"need one line id per batch row; got {len(line_ids)} for {present.shape[0]} rows")
        return AdaptedRows(self, chosen, present.detach().cpu())

    def summary(self) -> dict[str, dict]:
        """Line -> adapter version, threshold and threshold version (for logs and status pages)."""
        return {a.line: {"version": a.version, "threshold": a.threshold, "threshold_version": a.threshold_version}
                for a in self.lines.values()}


def _scope(module_name: str) -> str | None:
    """The modality whose encoder holds a module (its layers see that modality's units only), else None."""
    parts = module_name.split(".")
    return parts[1] if parts[0] == "encoders" and len(parts) > 1 else None


class AdaptedRows:
    """One forward pass's per-row adapters: a context manager that hands every LoRA layer of the adapted copy its
    ``adapter_names`` (see :meth:`LineAdapters.rows`), or one adapter for every row (:meth:`LineAdapters.only`).

    Attributes:
        model: the adapted copy to run inside the context.
        adapters: ``[B]`` each row's :class:`LineAdapter`, None for the base; one adapter for ``only``.
    """

    def __init__(self, owner: LineAdapters, adapters: list[LineAdapter | None], present: Tensor | None) -> None:
        self.model = owner.model
        self.adapters = adapters
        self._scopes = owner._scopes
        self._units = [a.name if a is not None else BASE_ROW for a in adapters]
        self._uniform = present is None  # one adapter for every row of every layer
        self._by_modality = {} if present is None else {
            m: [n for n, on in zip(self._units, present[:, i].tolist(), strict=True) if on]
            for i, m in enumerate(MODALITIES)}
        self._handles: list = []

    def names_for(self, scope: str | None, rows: int) -> list[str]:
        """The adapter names of a layer's ``rows`` input rows: an encoder's layer sees its modality's units; the
        others one row per unit or k rows per unit, unit after unit.

        Raises:
            ValueError: the rows fit neither layout.
        """
        if self._uniform:
            return self._units * rows
        if scope is not None:
            names = self._by_modality[scope]
            if rows != len(names):
                raise ValueError(f"the {scope} encoder got {rows} rows; {len(names)} units of the batch have {scope}")
            return names
        b = len(self._units)
        if rows % b:
            raise ValueError(f"a fuse call of {rows} rows over a batch of {b} units: expected k rows per unit")
        k = rows // b
        return self._units if k == 1 else [n for n in self._units for _ in range(k)]

    def __enter__(self) -> AdaptedRows:
        cache: dict[tuple[str | None, int], list[str]] = {}

        def hook(module, args, kwargs, scope):
            key = (scope, int(args[0].shape[0]))
            if key not in cache:
                cache[key] = self.names_for(*key)
            kwargs["adapter_names"] = cache[key]
            return args, kwargs

        for name, layer in _lora_layers(self.model):
            self._handles.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs, scope=self._scopes[name]: hook(module, args, kwargs, scope),
                with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def thresholds(self, base: Sequence[float]) -> list[float]:
        """Each row's threshold: its line adapter's, else the base model's (``base``, one per row)."""
        return [a.threshold if a is not None else t for a, t in zip(self.adapters, base, strict=True)]

    def stamp(self, row: int, decision: Decision) -> Decision:
        """The decision of ``row`` naming its adapter: model version ``<base>+<line>:<adapter version>`` (the
        decision id changes with the adapter) and the adapter's threshold version; unchanged for the base."""
        adapter = self.adapters[row]
        if adapter is None:
            return decision
        return replace(decision, model_version=adapted_version(decision.model_version, adapter.line,
                                                               adapter.version),
                       threshold_version=adapter.threshold_version)


def promoted_adapters(family: ModelStore, base_version: str) -> dict[str, str]:
    """Line -> the version of its promoted adapter, for every line of ``base_version`` that has one (read from the
    stores' promotion records; no weights are read).

    Raises:
        StoreError: an adapter store that cannot be read.
    """
    out = {}
    for line in _line_dirs(family, base_version):
        promoted = ModelStore(family.root / ADAPTERS_DIR / base_version / line).promoted()
        if promoted is not None:
            out[line] = promoted.version
    return out


def load_line_adapters(family: ModelStore, base: ModelVersion, model: InspectionModel,
                       versions: Mapping[str, str] | None = None) -> LineAdapters | None:
    """Line adapters of ``base`` (each verified by :func:`load_adapter`) in one copy of ``model``; None when there
    are none.

    Args:
        family, base, model: the base version's store, its entry and the loaded base model.
        versions: line -> the adapter version to load, exactly these (e.g. the ones a recorded decision names;
            ``{}``: none); None: the promoted adapter of every line.

    Raises:
        StoreError: an adapter version the store does not hold, a tampered adapter, an adapter of another base,
            or one that does not fit the model.
    """
    if versions is None:
        versions = promoted_adapters(family, base.version)
    found = {line: load_adapter(family, base, line, version) for line, version in sorted(versions.items())}
    if not found:
        return None
    device = next(model.parameters()).device
    adapters = LineAdapters(model, {line: ({k: v.to(device) for k, v in st.items()}, card)
                                    for line, (st, card) in found.items()})
    log.info("line adapters of %s: %s", base.version, adapters.summary())
    return adapters


# -------------------------------------------------------------------------------------------- own data
def adapt_data(store_root: Path | str, base_version: str, spec, config: AdapterConfig, cfg: TrainConfig, *,
               method: str = "max_f1", target_far: float = 0.01, threshold: float | None = None,
               promote: bool = True, keep: int = DEFAULT_KEEP,
               progress: bool | Progress = True) -> tuple[ModelVersion, AdapterResult, Any]:
    """``inspection adapt``: train, calibrate and save one line's adapter on a plant's own data.

    Args:
        store_root: the base model's family store (e.g. ``models/elpv``).
        base_version: the base version in it (its weights are frozen), or ``promoted``.
        spec: the line's data (:class:`inspection.data.own_data.DataSpec`; its ``line`` is the adapter's line).
        config, cfg: the adapter and its training.
        method, target_far, threshold: the line's calibration.
        promote: promote the new adapter version (the service serves promoted adapters).
        keep: adapter versions the line's store keeps.

    Returns:
        The saved version, the result and the data it was trained on (units, split, counted skips).

    Raises:
        ConfigError: no line given, data that does not fit the base, bad settings.
        StoreError: an unknown or tampered base version.
    """
    from inspection.data.own_data import load_own_data

    if spec.line is None:
        raise ConfigError("an adapter is for one line: give --line")
    family = ModelStore(store_root)
    entry = family.promoted() if base_version == "promoted" else family.get(base_version)
    if entry is None:
        raise StoreError(f"no version of {family.root} is promoted; name the base version")
    base_version = entry.version
    state, card = family.load(base_version)
    if card.get("kind") == ADAPTER_KIND or "model_config" not in card:
        raise StoreError(f"version {base_version} in {family.root} is not a model saved by `inspection train`")
    from inspection.model import ModelConfig

    base = InspectionModel.from_state(ModelConfig.from_dict(card["model_config"]), state).eval()
    data = load_own_data(spec)
    line = spec.line
    result = train_adapter(base, data.train, data.val, line, config, cfg, method=method, target_far=target_far,
                           threshold=threshold, progress=progress)
    saved = save_adapter(family, entry.version, line, result, data={"source": data.source_card(),
                                                                     "split": data.split_card()},
                         train_cfg=cfg, promote=promote, keep=keep)
    log.info("saved the adapter of line %s on %s as %s", line, entry.version, saved.version)
    return saved, result, data


__all__ = [
    "ADAPTER_KIND", "AdaptedRows", "AdapterConfig", "AdapterEntry", "AdapterResult", "DEFAULT_TARGETS", "FitResult",
    "LineAdapter", "LineAdapters", "LineCalibration", "TARGET_GROUPS", "adapt_data", "adapted_version",
    "adapter_card", "adapter_state", "adapter_store", "calibrate_line", "fine_tune", "list_adapters", "load_adapter",
    "load_line_adapters", "parameter_count", "promoted_adapters", "save_adapter", "split_model_version",
    "target_modules", "train_adapter",
]
