"""The fusion model: modality encoders -> cross-modal bridge (with sparse MoE) -> heads.

B batch · M modalities · N tokens (all modalities) · N_m tokens of modality m · D width · K classes · L lines

``forward(batch)`` = ``fuse(encode(batch), batch.present)``. Explanations call ``encode`` once and ``fuse`` once
per coalition of modalities, with a different ``present`` mask: an absent modality is masked out of the bridge's
attention and of the heads, so switching a modality off is exactly the same computation as a unit that never
had it (a missing modality is a normal input, trained with modality dropout).

Outputs are one dataclass, :class:`ModelOutput`, in train and eval. Calibrated state — per-line thresholds —
lives in buffers that start as NaN and raise :class:`~inspection.errors.NotCalibratedError` until calibrated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor, nn

from fusion.bridge import BridgeConfig, FusionBridge, LayerTrace
from fusion.moe import RouterStats
from inspection.config import from_dict, to_dict
from inspection.encoders import ENCODERS, Encoder, TokenInfo, create_encoder
from inspection.errors import ConfigError, NotCalibratedError
from inspection.records import MODALITIES, RoutingPath, Unit

DEFAULT_LINE = "*"


@dataclass(frozen=True)
class EncoderSpec:
    """A registry name and its config fields (JSON-friendly)."""

    name: str
    config: dict = field(default_factory=dict)

    def build(self, dim: int, pretrained_weights: bool = True) -> Encoder:
        """The encoder; ``pretrained_weights=False`` skips loading published weights (a backbone's ImageNet
        weights) where the config asks for them: for an encoder whose weights come from a saved state."""
        if self.name not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.name!r}; known: {sorted(ENCODERS)}")
        cfg_cls = ENCODERS[self.name][1]
        values = {**self.config, "embed_dim": dim}
        if not pretrained_weights and "pretrained" in {f.name for f in fields(cfg_cls)}:
            values["pretrained"] = False
        return create_encoder(self.name, from_dict(cfg_cls, values, f"encoder {self.name}"))


@dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    encoders: modality -> encoder spec; the modalities this model reads.
    bridge: the fusion bridge (its ``dim`` is every encoder's width).
    class_names: defect classes of the class head (``ok`` first).
    modality_dropout: in training, the probability of hiding each present modality (one always stays).
    head_dropout: dropout on the fused representation before the heads.
    lines: production lines with their own threshold; ``*`` is the default for any other line.
    modality_evidence: add the per-modality heads' evidence to the defect logit: their soft OR (log-sum-exp of
        the culprit logits of the modalities the unit shows) times a learned weight (starting at 1), on top of
        the fused head. For data where a unit is defective when any one reading is, the fused head then learns
        what the modalities say together beyond that. Off: the defect logit is the fused head's alone.
    """

    encoders: dict[str, EncoderSpec]
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    class_names: tuple[str, ...] = ("ok", "defect")
    modality_dropout: float = 0.25
    head_dropout: float = 0.2
    lines: tuple[str, ...] = (DEFAULT_LINE,)
    modality_evidence: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.encoders) - set(MODALITIES)
        if unknown or not self.encoders:
            raise ConfigError(f"encoders must map some of {MODALITIES} to encoder specs; got {sorted(self.encoders)}")
        if len(self.class_names) < 2 or self.class_names[0] != "ok":
            raise ConfigError(f"class_names needs >= 2 classes with 'ok' first; got {self.class_names}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError(f"modality_dropout must be in [0, 1); got {self.modality_dropout}")
        if DEFAULT_LINE not in self.lines or len(set(self.lines)) != len(self.lines):
            raise ConfigError(f"lines must be distinct and include the default {DEFAULT_LINE!r}; got {self.lines}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.encoders)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelConfig:
        return from_dict(cls, dict(data))


@dataclass
class Batch:
    """Collated model inputs.

    Attributes:
        inputs: modality -> input name -> ``[B, ...]`` tensor (zeros where the modality is absent).
        present: ``[B, M]`` bool over ``MODALITIES`` order.
        line_index: ``[B]`` long, the threshold slot of each unit's line.
    """

    inputs: dict[str, dict[str, Tensor]]
    present: Tensor
    line_index: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch({m: {k: v.to(device, non_blocking=True) for k, v in d.items()} for m, d in self.inputs.items()},
                     self.present.to(device), self.line_index.to(device))

    def __len__(self) -> int:
        return int(self.present.shape[0])

    def select(self, rows: Sequence[int]) -> Batch:
        """The batch of the given rows, in that order (on the same device)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda t: t.index_select(0, index.to(t.device))  # noqa: E731
        return Batch({m: {k: pick(v) for k, v in d.items()} for m, d in self.inputs.items()}, pick(self.present),
                     pick(self.line_index))


@dataclass
class Encoded:
    """Encoder tokens of a batch, reusable across coalitions.

    Attributes:
        tokens: ``[B, N, D]`` all modalities' tokens concatenated (zeros for absent ones).
        modality_index: ``[N]`` long, index into ``MODALITIES`` per token.
        slices: modality -> its token slice in ``tokens``.
        present: ``[B, M]`` the modalities each unit actually has.
    """

    tokens: Tensor
    modality_index: Tensor
    slices: dict[str, slice]
    present: Tensor


@dataclass
class ModelOutput:
    """One output type in train and eval.

    Attributes:
        defect_logit: ``[B]`` fused defect logit.
        class_logits: ``[B, K]``.
        modality_logits: ``[B, M]`` per-modality defect logits from each modality's own tokens (0 where absent).
        present: ``[B, M]`` the mask this output was computed with.
        pooled: ``[B, D]`` fused representation.
        router_stats: per MoE layer.
        trace: per bridge layer, the experts and gate weights of each fusion query and the spread of the
            queries' attention (:class:`~fusion.bridge.LayerTrace`) when ``fuse(..., trace=True)``, else None.
    """

    defect_logit: Tensor
    class_logits: Tensor
    modality_logits: Tensor
    present: Tensor
    pooled: Tensor
    router_stats: list[RouterStats]
    trace: list[LayerTrace] | None = None

    @property
    def score(self) -> Tensor:
        """``[B]`` defect probability."""
        return torch.sigmoid(self.defect_logit.float())


class InspectionModel(nn.Module):
    """The fusion model (see the module docstring)."""

    def __init__(self, config: ModelConfig, *, pretrained_weights: bool = True) -> None:
        """``pretrained_weights=False``: do not load published backbone weights (the model's weights will come
        from a saved state dict; see :meth:`from_state`). ``config`` is kept as given either way."""
        super().__init__()
        self.config = config
        dim = config.bridge.dim
        self.encoders = nn.ModuleDict({m: config.encoders[m].build(dim, pretrained_weights)
                                       for m in config.modalities})
        for m, enc in self.encoders.items():
            if enc.modality != m:
                raise ConfigError(f"encoder {config.encoders[m].name!r} reads {enc.modality}, not {m}")
        self.bridge = FusionBridge(config.bridge)
        self.head_norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(config.head_dropout)
        self.defect_head = nn.Linear(dim, 1)
        self.class_head = nn.Linear(dim, len(config.class_names))
        self.modality_heads = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
                                             for m in config.modalities})
        if config.modality_evidence:
            self.evidence_weight = nn.Parameter(torch.ones(()))
            # start from the modalities' evidence alone; the fused head learns what it misses
            nn.init.zeros_(self.defect_head.weight)
            nn.init.zeros_(self.defect_head.bias)
        self.register_buffer("thresholds", torch.full((len(config.lines),), float("nan")))
        self._line_slots = {line: i for i, line in enumerate(config.lines)}

    @classmethod
    def from_state(cls, config: ModelConfig, state: Mapping[str, Tensor]) -> InspectionModel:
        """A model rebuilt from its config and a saved state dict (every tensor must match). Published backbone
        weights are not loaded first: the state holds every weight, so a scoring host needs no weight package."""
        model = cls(config, pretrained_weights=False)
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------------------------------ inputs
    def prepare(self, unit: Unit) -> dict[str, dict[str, np.ndarray]]:
        """Preprocess one unit's readings (numpy, no torch): modality -> input name -> array."""
        return {m: self.encoders[m].prepare(getattr(unit, m)) for m in self.config.modalities
                if getattr(unit, m) is not None}

    def line_slot(self, line_id: str) -> int:
        return self._line_slots.get(line_id, self._line_slots[DEFAULT_LINE])

    def collate(self, prepared: Sequence[Mapping[str, Mapping[str, np.ndarray]]], line_ids: Sequence[str]) -> Batch:
        """Stack prepared units into a :class:`Batch` (absent modalities zero-filled and masked)."""
        if len(prepared) != len(line_ids) or not prepared:
            raise ValueError(f"need one line id per prepared unit and at least one unit; got {len(prepared)}/{len(line_ids)}")
        present = torch.zeros(len(prepared), len(MODALITIES), dtype=torch.bool)
        inputs: dict[str, dict[str, Tensor]] = {}
        for m in self.config.modalities:
            mi = MODALITIES.index(m)
            example = next((p[m] for p in prepared if m in p), None)
            if example is None:
                continue
            arrays = {}
            for name, ref in example.items():
                stack = np.zeros((len(prepared), *ref.shape), np.float32)
                for i, p in enumerate(prepared):
                    if m in p:
                        stack[i] = p[m][name]
                arrays[name] = torch.from_numpy(stack)
            for i, p in enumerate(prepared):
                present[i, mi] = m in p
            inputs[m] = arrays
        if not present.any(dim=1).all():
            raise ValueError("every unit needs at least one modality this model reads "
                             f"({self.config.modalities})")
        lines = torch.tensor([self.line_slot(line) for line in line_ids], dtype=torch.long)
        return Batch(inputs, present, lines)

    def batch(self, units: Sequence[Unit]) -> Batch:
        """Preprocess and collate units."""
        return self.collate([self.prepare(u) for u in units], [u.line_id for u in units])

    # ----------------------------------------------------------------------------------------- compute
    @torch.no_grad()
    def fit_normalisation(self, batch: Batch) -> None:
        """Fit every encoder's feature statistics on training inputs (units where the modality is present)."""
        for m, enc in self.encoders.items():
            if m not in batch.inputs:
                continue
            rows = batch.present[:, MODALITIES.index(m)]
            enc.fit_normalisation({k: v[rows] for k, v in batch.inputs[m].items()})

    def encode(self, batch: Batch) -> Encoded:
        """Run each encoder on the units that have its modality; returns all tokens, reusable per coalition."""
        b = len(batch)
        dim = self.config.bridge.dim
        chunks, indices, slices, start = [], [], {}, 0
        for m in self.config.modalities:
            enc = self.encoders[m]
            mi = MODALITIES.index(m)
            rows = batch.present[:, mi]
            ref = next(self.parameters())
            out = torch.zeros(b, enc.n_tokens, dim, device=ref.device, dtype=ref.dtype)
            if m in batch.inputs and bool(rows.any()):
                feats = enc({k: v[rows] for k, v in batch.inputs[m].items()})  # [B_m, N_m, D]
                out = out.to(feats.dtype).index_put((rows.nonzero(as_tuple=True)[0],), feats)
            chunks.append(out)
            indices.append(torch.full((enc.n_tokens,), mi, dtype=torch.long, device=out.device))
            slices[m] = slice(start, start + enc.n_tokens)
            start += enc.n_tokens
        dtype = functools.reduce(torch.promote_types, [c.dtype for c in chunks])
        return Encoded(torch.cat([c.to(dtype) for c in chunks], dim=1), torch.cat(indices), slices, batch.present)

    def fuse(self, encoded: Encoded, present: Tensor | None = None, visible: Tensor | None = None,
             trace: bool = False, trace_rows: Tensor | None = None) -> ModelOutput:
        """Bridge and heads for a presence mask ``[B, M]`` (default: what each unit has).

        A mask may only remove modalities a unit has; modalities it lacks stay absent. ``visible`` ``[B, N]``
        (bool) hides single tokens on top of that: a token is seen only where both allow it (explanations switch
        an image region, a frequency band or a time segment off this way). Each per-modality head reads the mean
        of its modality's visible tokens (every token of a present modality unless ``visible`` hides some; a
        modality with every token hidden counts as absent for its head). ``trace=True`` fills
        :attr:`ModelOutput.trace` (each row's routing path and attention spread) and changes no other output;
        training and benchmarks leave it off. ``trace_rows`` (``[R]`` long) traces only those rows, in that order:
        the trace's row ``r`` is the batch's ``trace_rows[r]``.
        """
        present = encoded.present if present is None else present & encoded.present
        tokens_on = present[:, encoded.modality_index]  # [B, N] True = visible
        if visible is not None:
            if visible.dtype != torch.bool or tuple(visible.shape) != tuple(tokens_on.shape):
                raise ValueError(f"visible must be a bool [B, N] = {tuple(tokens_on.shape)} token mask; got "
                                 f"{visible.dtype} {tuple(visible.shape)}")
            tokens_on = tokens_on & visible.to(tokens_on.device)
        visible = tokens_on
        bridged = self.bridge(encoded.tokens, encoded.modality_index, ~visible, trace=trace, trace_rows=trace_rows)
        # residual global pooling: the mean of every visible token (for one modality, global average pooling of
        # its features); the bridge's queries add the cross-modal interactions on top
        weights = visible.to(encoded.tokens.dtype)
        token_mean = (encoded.tokens * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
        pooled = self.head_drop(self.head_norm(bridged.pooled + token_mean.to(bridged.pooled.dtype)))  # [B, D]
        modality_logits, shown = self.modality_logits(encoded, visible)
        modality_logits = modality_logits.to(pooled.dtype)
        defect_logit = self.defect_head(pooled).squeeze(-1)
        if self.config.modality_evidence:
            # soft OR of the shown modalities' culprit logits (a finite fill keeps gradients finite for a row that
            # shows nothing, whose evidence is then 0)
            evidence = torch.logsumexp(modality_logits.float().masked_fill(~shown, -1e4), dim=1)
            evidence = torch.where(shown.any(dim=1), evidence, torch.zeros_like(evidence))
            defect_logit = defect_logit + self.evidence_weight * evidence.to(defect_logit.dtype)
        return ModelOutput(
            defect_logit=defect_logit,
            class_logits=self.class_head(pooled),
            modality_logits=modality_logits,
            present=present,
            pooled=pooled,
            router_stats=bridged.router_stats,
            trace=bridged.trace,
        )

    def modality_logits(self, encoded: Encoded, visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each per-modality head on the mean of its modality's visible tokens (``visible`` ``[B, N]`` bool;
        default: every token of a modality the unit has).

        Returns:
            ``([B, M] logits, [B, M] bool shown)`` over ``MODALITIES``: a modality is shown where at least one of
            its tokens is visible; its logit is 0 where it is not.
        """
        if visible is None:
            visible = encoded.present[:, encoded.modality_index]
        weights = visible.to(encoded.tokens.dtype)
        b = encoded.tokens.shape[0]
        zeros = torch.zeros(b, device=encoded.tokens.device, dtype=encoded.tokens.dtype)
        logits, shown = [zeros] * len(MODALITIES), [zeros.bool()] * len(MODALITIES)
        for m, sl in encoded.slices.items():
            mi = MODALITIES.index(m)
            w = weights[:, sl]  # [B, N_m]
            count = w.sum(1)  # [B]
            shown[mi] = count > 0
            mean = (encoded.tokens[:, sl] * w[..., None]).sum(1) / count.clamp_min(1.0)[:, None]  # [B, D]
            logit = self.modality_heads[m](mean).squeeze(-1)
            logits[mi] = torch.where(shown[mi], logit.to(zeros.dtype), zeros)
        return torch.stack(logits, dim=1), torch.stack(shown, dim=1)

    def forward(self, batch: Batch, present: Tensor | None = None) -> ModelOutput:
        return self.fuse(self.encode(batch), present)

    def routing_paths(self, output: ModelOutput, rows: Sequence[int]) -> list[RoutingPath | None]:
        """The routing path of each of the given rows of a traced output (``fuse(..., trace=True)``): per MoE
        layer, each fusion query's experts and gate weights, the weights rounded as
        :meth:`~inspection.records.RoutingPath.rounded` says. One device-to-host copy per MoE layer.

        Args:
            output: the traced output.
            rows: row indices into its trace (the batch's rows, or positions in ``trace_rows``).

        Returns:
            One :class:`~inspection.records.RoutingPath` per row, in order; None for each when the bridge has no
            sparse MoE.

        Raises:
            ValueError: ``output`` was computed without ``trace=True``.
        """
        if output.trace is None:
            raise ValueError("routing paths need a traced output: call fuse(..., trace=True)")
        moe = self.config.bridge.moe
        if moe is None:
            return [None] * len(rows)
        index = torch.as_tensor(list(rows), dtype=torch.long)
        layers = [(i, t.experts.index_select(0, index.to(t.experts.device)).cpu().tolist(),  # [R, Q, K]
                   t.weights.index_select(0, index.to(t.weights.device)).cpu().tolist())  # [R, Q, K]
                  for i, t in enumerate(output.trace) if t.experts is not None]
        return [RoutingPath.rounded(moe.n_experts, moe.top_k, {i: (e[r], w[r]) for i, e, w in layers})
                for r in range(len(index))]

    # ------------------------------------------------------------------------------------- calibration
    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.thresholds).all())

    def threshold_for(self, line_index: Tensor) -> Tensor:
        """``[B]`` thresholds of the given line slots.

        Raises:
            NotCalibratedError: before :func:`inspection.calibration.calibrate` set them.
        """
        th = self.thresholds[line_index]
        if not bool(torch.isfinite(th).all()):
            raise NotCalibratedError(
                "this model's decision thresholds are not calibrated; run `inspection calibrate` (or "
                "inspection.calibration.calibrate) on validation data first"
            )
        return th

    def token_info(self) -> dict[str, list[TokenInfo]]:
        return {m: self.encoders[m].token_info() for m in self.config.modalities}
