"""One entry point for every explanation: ``explain(model, units, level=..., budget=..., masking=..., seed=...)``.

B units · M modalities · G groups of a modality · R coalition rows of one unit · N tokens · D width

* Level 1 — modality: exact Shapley values over the unit's modalities and their pairwise interactions
  (:mod:`explain.shapley`; at most 8 coalitions, no sampling, no seed).
* Level 2 — inside each modality: Owen values of groups of encoder tokens (image regions, spectrum and envelope
  bands, waveform segments, temperature channel × time segments) under the modalities (:mod:`explain.hierarchy`).
  With ``masking="tokens"`` a group is switched off by hiding its tokens from the bridge and the pooled heads:
  the encoders run once per unit, and each coalition costs one row of a batched ``fuse`` call. With
  ``masking="input"`` the group is removed from the reading itself (:mod:`explain.masking`: a blurred region, a
  band-stop filter, a segment replaced by its baseline) and every coalition is preprocessed and encoded again.

Every :class:`Attribution` states its level, method, masking, budget (distinct model evaluations), seed and
efficiency gap: ``Σ φ − (v(all) − v(none))`` over the deepest level reported, on the logit scale.

Token masking is not the same as removing the input: a CNN token sees beyond its patch, and a band token of the
spectrum carries its neighbours' leakage. It measures what the fusion layers use, per token; it is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from explain.hierarchy import Group, GroupValues, groups_from_tokens, owen_values
from explain.hierarchy import minimum_budget as hierarchy_minimum
from explain.shapley import METHOD_EXACT, ModalityAttribution, explain_modalities
from inspection.model import Encoded, InspectionModel
from inspection.records import MODALITIES, Unit

#: Levels :func:`explain` computes.
LEVELS: tuple[int, ...] = (1, 2)
#: How a group is switched off.
MASKINGS: tuple[str, ...] = ("tokens", "input")
#: Default budget of a level-2 explanation, in distinct model evaluations per unit.
DEFAULT_BUDGET = 512
#: Rows of one ``fuse`` call (bounds memory at rows x N x D).
_CHUNK_ROWS = 256
#: Units preprocessed and encoded together by input masking.
_INPUT_CHUNK_UNITS = 32


@dataclass(frozen=True)
class GroupAttribution:
    """The Owen value of one group of one modality.

    Attributes:
        modality: its modality.
        name: what it covers, in words (``region rows 0-2, cols 3-5 (...)``, ``spectrum 0-2500 Hz``).
        kind: ``region``, ``spectrum``, ``envelope``, ``waveform`` or ``series``.
        span: its extent (see :class:`explain.hierarchy.Group`).
        phi: its Owen value on the logit scale.
    """

    modality: str
    name: str
    kind: str
    span: tuple[float, ...]
    phi: float

    def to_dict(self) -> dict:
        return {"modality": self.modality, "name": self.name, "kind": self.kind,
                "span": [float(x) for x in self.span], "phi": float(self.phi)}


@dataclass(frozen=True)
class Attribution:
    """A unit's explanation at one level.

    Attributes:
        unit_id: the unit explained.
        level: 1 (modalities) or 2 (groups inside each modality, under the modalities).
        masking: how parts were switched off (``tokens``).
        method: ``exact`` at level 1; at level 2 ``owen-exact`` when every modality's groups were enumerated,
            else ``owen-permutation`` (see ``group_methods``).
        budget: distinct model evaluations this attribution took (coalition rows).
        seed: the seed of the random orders (None when nothing was sampled).
        modality: the level-1 attribution (always present).
        groups: level 2: modality -> its groups' Owen values, in token order; empty at level 1.
        group_methods: level 2: modality -> ``owen-exact`` or ``owen-permutation``.
        efficiency_gap: ``Σ φ − (v(all) − v(none))`` over the deepest level, logit scale.
    """

    unit_id: str
    level: int
    masking: str
    method: str
    budget: int
    seed: int | None
    modality: ModalityAttribution
    groups: dict[str, tuple[GroupAttribution, ...]] = field(default_factory=dict)
    group_methods: dict[str, str] = field(default_factory=dict)
    efficiency_gap: float = 0.0

    def top_groups(self, k: int = 3) -> list[GroupAttribution]:
        """The ``k`` groups of largest |φ| over all modalities."""
        every = [g for gs in self.groups.values() for g in gs]
        return sorted(every, key=lambda g: -abs(g.phi))[:k]

    def to_dict(self) -> dict:
        """JSON-ready form (plain str, float, int, list and dict only)."""
        return {
            "unit_id": self.unit_id,
            "level": self.level,
            "masking": self.masking,
            "method": self.method,
            "budget": int(self.budget),
            "seed": self.seed,
            "efficiency_gap": float(self.efficiency_gap),
            "modality": self.modality.to_dict(),
            "groups": {m: [g.to_dict() for g in gs] for m, gs in self.groups.items()},
            "group_methods": dict(self.group_methods),
        }


def model_groups(model: InspectionModel, **limits) -> dict[str, list[Group]]:
    """The level-2 groups of each modality the model reads (:func:`explain.hierarchy.groups_from_tokens`;
    ``limits`` are its ``max_regions``, ``max_bands`` and ``max_segments``)."""
    infos = model.token_info()
    return {m: groups_from_tokens(m, infos[m], **limits) for m in model.config.modalities}


def minimum_budget(model: InspectionModel) -> int:
    """The smallest level-2 budget that explains a unit with every modality the model reads."""
    return hierarchy_minimum({m: len(g) for m, g in model_groups(model).items()})


def explain(model: InspectionModel, units: Sequence[Unit], *, level: int = 1, budget: int = DEFAULT_BUDGET,
            masking: str = "tokens", seed: int = 0, groups: dict[str, list[Group]] | None = None) -> list[Attribution]:
    """Explain each unit's defect score (see the module docstring).

    Args:
        model: the fusion model (switched to eval mode for the call, and back).
        units: the units to explain (each with at least one modality the model reads).
        level: 1 (modality) or 2 (groups inside each modality).
        budget: level 2: most distinct model evaluations per unit; ignored at level 1 (always 2^modalities).
        masking: how a group is switched off: ``tokens`` (hide its encoder tokens) or ``input`` (remove it from the
            reading and encode again; level 2 only matters, level 1 switches whole modalities off either way).
        seed: level 2: seeds the random orders of groups where enumeration does not fit the budget.
        groups: level 2: the groups of each modality (default :func:`model_groups` of the model; e.g.
            ``model_groups(model, max_bands={"envelope": 32})`` for finer envelope bands).

    Returns:
        One :class:`Attribution` per unit, in order.

    Raises:
        ValueError: an unknown level or masking, no units, a unit without a modality, or a budget below what one
            order of each modality's groups needs (the message says how much).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}; got {level!r}")
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}; got {masking!r}")
    if not units:
        raise ValueError("need at least one unit to explain; got none")
    device = next(model.parameters()).device
    batch = model.batch(units).to(device)
    top = explain_modalities(model, batch, [u.unit_id for u in units])
    if level == 1:
        n = [len(a.players) for a in top]
        return [Attribution(a.unit_id, 1, masking, METHOD_EXACT, 2 ** k, None, a, efficiency_gap=a.efficiency_gap)
                for a, k in zip(top, n, strict=True)]
    groups = groups or model_groups(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            encoded = model.encode(batch)  # [B, N, D]
            out = []
            for b, attribution in enumerate(top):
                if masking == "tokens":
                    out.append(_level2(model, encoded, b, attribution, groups, budget, masking, seed))
                else:
                    out.append(_level2_input(model, units[b], attribution, groups, budget, seed))
    finally:
        model.train(was_training)
    return out


def explain_encoded(model: InspectionModel, encoded: Encoded, row: int, top: ModalityAttribution, *,
                    budget: int = DEFAULT_BUDGET, seed: int = 0,
                    groups: dict[str, list[Group]] | None = None) -> Attribution:
    """Level 2 with token masking for one unit whose encoder tokens exist already (row ``row`` of ``encoded``,
    e.g. from the forward pass that scored it) and whose level-1 attribution is ``top``: no preprocessing and no
    encoder pass, only the coalitions' fusion rows. Same values as :func:`explain` for that unit. ``groups``
    (:func:`model_groups`) may be passed in when many units are explained with one model.

    Raises:
        ValueError: a budget below what one order of each modality's groups needs.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # the tokens may come from an inference-mode forward pass
            return _level2(model, encoded, row, top, groups or model_groups(model), budget, "tokens", seed)
    finally:
        model.train(was_training)


def _level2(model: InspectionModel, encoded: Encoded, b: int, top: ModalityAttribution,
            groups: dict[str, list[Group]], budget: int, masking: str, seed: int) -> Attribution:
    players = top.players
    sizes = {m: len(groups[m]) for m in players}
    row = Encoded(encoded.tokens[b:b + 1], encoded.modality_index, encoded.slices, encoded.present[b:b + 1])

    def evaluate(coalitions) -> list[float]:
        n_tokens = encoded.tokens.shape[1]
        present = torch.zeros(len(coalitions), len(MODALITIES), dtype=torch.bool)
        visible = torch.zeros(len(coalitions), n_tokens, dtype=torch.bool)
        for r, coalition in enumerate(coalitions):
            for m, on in coalition.items():
                if not on:
                    continue
                present[r, MODALITIES.index(m)] = True
                start = encoded.slices[m].start
                for g in on:
                    visible[r, [start + t for t in groups[m][g].tokens]] = True
        values: list[float] = []
        device = encoded.tokens.device
        for lo in range(0, len(coalitions), _CHUNK_ROWS):
            hi = min(len(coalitions), lo + _CHUNK_ROWS)
            stacked = Encoded(row.tokens.expand(hi - lo, -1, -1), row.modality_index, row.slices,
                              row.present.expand(hi - lo, -1))  # [r, N, D]
            logits = model.fuse(stacked, present[lo:hi].to(device), visible[lo:hi].to(device)).defect_logit
            values.extend(logits.double().cpu().tolist())
        return values

    per_modality, used = owen_values(evaluate, sizes, budget=budget, seed=seed)
    return _assemble(top, groups, per_modality, used, masking, seed)


def _level2_input(model: InspectionModel, unit: Unit, top: ModalityAttribution, groups: dict[str, list[Group]],
                  budget: int, seed: int) -> Attribution:
    from explain.masking import group_frames, remove_groups

    players = top.players
    sizes = {m: len(groups[m]) for m in players}
    frames = group_frames(groups)
    device = next(model.parameters()).device

    prepared: dict[tuple[str, tuple[int, ...]], dict] = {}  # (modality, hidden groups) -> encoder input

    def prepare(m: str, hidden: tuple[int, ...]) -> dict:
        key = (m, hidden)
        if key not in prepared:
            changed = remove_groups(unit, {m: [groups[m][i] for i in hidden]}, frames)
            prepared[key] = model.encoders[m].prepare(getattr(changed, m))
        return prepared[key]

    def evaluate(coalitions) -> list[float]:
        values: list[float] = []
        for lo in range(0, len(coalitions), _INPUT_CHUNK_UNITS):
            part = coalitions[lo:lo + _INPUT_CHUNK_UNITS]
            rows = []
            present = torch.zeros(len(part), len(MODALITIES), dtype=torch.bool)
            for r, coalition in enumerate(part):
                # every modality of the unit is prepared (collate needs a full row); the coalition mask hides
                # the ones switched off; a visible modality loses the groups outside the coalition
                row = {}
                for m in players:
                    on = coalition.get(m, frozenset())
                    hidden = tuple(i for i in range(len(groups[m])) if i not in on) if on else ()
                    row[m] = prepare(m, hidden)
                    present[r, MODALITIES.index(m)] = bool(on)
                rows.append(row)
            n = len(rows)
            if device.type == "cuda" and n < _INPUT_CHUNK_UNITS:
                # one batch shape for every chunk: the first encode at a new size costs seconds on CUDA
                # (work done once per input shape); the copies of the last row are dropped below
                rows.extend([rows[-1]] * (_INPUT_CHUNK_UNITS - n))
                present = torch.cat([present, present[-1:].expand(_INPUT_CHUNK_UNITS - n, -1)])
            batch = model.collate(rows, [unit.line_id] * len(rows)).to(device)
            logits = model.fuse(model.encode(batch), present.to(device)).defect_logit[:n]
            values.extend(logits.double().cpu().tolist())
        return values

    per_modality, used = owen_values(evaluate, sizes, budget=budget, seed=seed)
    return _assemble(top, groups, per_modality, used, "input", seed)


def _assemble(top: ModalityAttribution, groups: dict[str, list[Group]], per_modality: dict[str, GroupValues],
              used: int, masking: str, seed: int) -> Attribution:
    players = top.players
    out_groups: dict[str, tuple[GroupAttribution, ...]] = {}
    methods: dict[str, str] = {}
    for m in players:
        gv: GroupValues = per_modality[m]
        out_groups[m] = tuple(GroupAttribution(m, g.name, g.kind, g.span, phi)
                              for g, phi in zip(groups[m], gv.phi, strict=True))
        methods[m] = gv.method
    total = math.fsum(g.phi for gs in out_groups.values() for g in gs)
    gap = total - (top.value_full - top.value_empty)
    sampled = any(v == "owen-permutation" for v in methods.values())
    method = "owen-permutation" if sampled else "owen-exact"
    return Attribution(top.unit_id, 2, masking, method, used + top.coalitions, seed if sampled else None, top,
                       out_groups, methods, gap)
