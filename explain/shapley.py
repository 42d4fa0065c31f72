"""Exact modality-level Shapley values and pairwise Shapley interactions of the fused defect score.

B units · M modalities (``MODALITIES`` order) · C_b coalitions of unit b (2^{n_b}, n_b ≤ 3 players) ·
R = B · 2^M stacked coalition rows · N tokens · D width

The players of a unit are the modalities it has. The value of a coalition S is the model's defect logit (and,
reported beside it, the defect probability) with only the modalities in S visible; the empty coalition is the
model's own baseline, every token masked. Because an absent modality is masked out of the bridge and the heads,
switching a modality off is the same computation as a unit that never had it, so every coalition is one row of
a single ``fuse`` call over encoder tokens computed once by a single ``encode`` call.

The formulas are the exact ones (no sampling, no seed):

* Shapley value: ``φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! · (v(S∪{i}) − v(S))``.
* Shapley interaction index: ``I_ij = Σ_{S ⊆ N∖{i,j}} |S|!(n−|S|−2)!/(n−1)! ·
  (v(S∪{i,j}) − v(S∪{i}) − v(S∪{j}) + v(S))``.

Efficiency, ``Σ_i φ_i = v(N) − v(∅)``, holds exactly in exact arithmetic; every attribution reports the gap left
by floating point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch
from torch import Tensor

from inspection.model import Batch, Encoded, InspectionModel
from inspection.records import MODALITIES, Unit

#: Separator of the two modality names in an interaction key, e.g. ``"vision×vibration"``.
PAIR_SEPARATOR = "×"
#: Separator of modality names in a coalition key, e.g. ``"vision+temperature"``.
COALITION_SEPARATOR = "+"
#: Key of the empty coalition (the model's all-masked baseline).
EMPTY_COALITION = "∅"
#: The only method this module implements: full enumeration of the coalitions.
METHOD_EXACT = "exact"


# ------------------------------------------------------------------------------------------- pure math
def all_coalitions(players: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of ``players``, smallest first (the empty one first, the grand coalition last).

    Args:
        players: distinct player names.

    Returns:
        ``2 ** len(players)`` coalitions.

    Raises:
        ValueError: ``players`` has duplicates.
    """
    players = _check_players(players)
    return [frozenset(c) for k in range(len(players) + 1) for c in combinations(players, k)]


def shapley_from_values(values: Mapping[frozenset[str], float], players: Sequence[str]) -> dict[str, float]:
    """Exact Shapley values of a cooperative game given by its full value table.

    Args:
        values: coalition -> v(coalition), for every subset of ``players`` (the empty set included).
        players: distinct player names; the result follows this order.

    Returns:
        Player -> φ, in the units of ``values``.

    Raises:
        ValueError: duplicate players, a missing or foreign coalition, or a non-finite value.
    """
    players = _check_players(players)
    _check_values(values, players)
    n = len(players)
    phi: dict[str, float] = {}
    for i in players:
        others = [p for p in players if p != i]
        terms = []
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in combinations(others, k):
                base = frozenset(s)
                terms.append(weight * (values[base | {i}] - values[base]))
        phi[i] = math.fsum(terms)
    return phi


def interactions_from_values(values: Mapping[frozenset[str], float],
                             players: Sequence[str]) -> dict[tuple[str, str], float]:
    """Exact pairwise Shapley interaction indices of a game given by its full value table.

    Args:
        values: coalition -> v(coalition), for every subset of ``players`` (the empty set included).
        players: distinct player names; pairs follow this order (``(players[a], players[b])`` with a < b).

    Returns:
        ``(i, j)`` -> I_ij for every unordered pair, in the units of ``values``; empty for fewer than 2 players.

    Raises:
        ValueError: duplicate players, a missing or foreign coalition, or a non-finite value.
    """
    players = _check_players(players)
    _check_values(values, players)
    n = len(players)
    out: dict[tuple[str, str], float] = {}
    for i, j in combinations(players, 2):
        others = [p for p in players if p not in (i, j)]
        terms = []
        for k in range(n - 1):
            weight = math.factorial(k) * math.factorial(n - k - 2) / math.factorial(n - 1)
            for s in combinations(others, k):
                base = frozenset(s)
                terms.append(weight * (values[base | {i, j}] - values[base | {i}] - values[base | {j}]
                                       + values[base]))
        out[(i, j)] = math.fsum(terms)
    return out


def _check_players(players: Sequence[str]) -> tuple[str, ...]:
    players = tuple(players)
    if len(set(players)) != len(players):
        raise ValueError(f"players must be distinct; got {players}")
    return players


def _check_values(values: Mapping[frozenset[str], float], players: tuple[str, ...]) -> None:
    expected = set(all_coalitions(players))
    missing = expected - set(values)
    foreign = set(values) - expected
    if missing or foreign:
        show = lambda cs: sorted(sorted(c) for c in cs)  # noqa: E731
        raise ValueError(f"values must hold exactly the {len(expected)} subsets of players {players}; "
                         f"missing {show(missing)}, not subsets of the players {show(foreign)}")
    bad = {c: v for c, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"coalition values must be finite; got {{{', '.join(f'{sorted(c)}: {v}' for c, v in bad.items())}}}")


# ------------------------------------------------------------------------------------------- records
def coalition_key(coalition: frozenset[str] | Sequence[str]) -> str:
    """Stable text key of a coalition: its modalities in ``MODALITIES`` order joined by ``+`` (``∅`` if empty)."""
    names = [m for m in MODALITIES if m in set(coalition)]
    return COALITION_SEPARATOR.join(names) if names else EMPTY_COALITION


def pair_key(a: str, b: str) -> str:
    """Text key of a modality pair, ``"a×b"`` in the order given."""
    return f"{a}{PAIR_SEPARATOR}{b}"


@dataclass(frozen=True)
class CoalitionValues:
    """The model's value of every coalition of one unit's modalities.

    Attributes:
        players: the modalities the unit has, in ``MODALITIES`` order.
        logit: coalition -> defect logit with only that coalition visible.
        prob: coalition -> defect probability (sigmoid of ``logit``), in [0, 1].
    """

    players: tuple[str, ...]
    logit: dict[frozenset[str], float]
    prob: dict[frozenset[str], float]


@dataclass(frozen=True)
class ModalityAttribution:
    """Modality-level explanation of one unit's defect score.

    Attributes:
        unit_id: the unit explained.
        players: the modalities the unit has, in ``MODALITIES`` order.
        phi: modality -> Shapley value on the logit scale (nats of log-odds).
        phi_prob: modality -> Shapley value on the probability scale (sums to the probability change).
        interactions: ``"a×b"`` -> pairwise Shapley interaction index on the logit scale; empty below 2 players.
        value_full: defect logit with every modality of the unit visible, v(N).
        value_empty: defect logit with every modality masked, v(∅) (the model's baseline).
        efficiency_gap: ``Σφ − (v(N) − v(∅))`` on the logit scale; zero up to floating-point rounding.
        coalitions: coalitions evaluated (the budget), ``2 ** len(players)``.
        values: coalition key (``"vision+temperature"``, ``"∅"``) -> defect logit of that coalition.
        method: how the values were computed; ``"exact"`` is full enumeration.

    Raises:
        ValueError: players not distinct modalities in ``MODALITIES`` order, or keys and counts that do not
            match the players.
    """

    unit_id: str
    players: tuple[str, ...]
    phi: dict[str, float]
    phi_prob: dict[str, float]
    interactions: dict[str, float]
    value_full: float
    value_empty: float
    efficiency_gap: float
    coalitions: int
    values: dict[str, float] = field(default_factory=dict)
    method: str = METHOD_EXACT

    def __post_init__(self) -> None:
        canonical = tuple(m for m in MODALITIES if m in self.players)
        if not self.players or canonical != self.players:
            raise ValueError(f"players must be distinct modalities in {MODALITIES} order; got {self.players}")
        for name, mapping in (("phi", self.phi), ("phi_prob", self.phi_prob)):
            if tuple(mapping) != self.players:
                raise ValueError(f"{name} must have one entry per player {self.players}; got {tuple(mapping)}")
        pairs = tuple(pair_key(a, b) for a, b in combinations(self.players, 2))
        if tuple(self.interactions) != pairs:
            raise ValueError(f"interactions must be keyed {pairs}; got {tuple(self.interactions)}")
        if self.coalitions != 2 ** len(self.players):
            raise ValueError(f"coalitions must be 2**{len(self.players)} = {2 ** len(self.players)} for "
                             f"players {self.players}; got {self.coalitions}")
        if self.values and len(self.values) != self.coalitions:
            raise ValueError(f"values must hold all {self.coalitions} coalitions or none; got {len(self.values)}")
        if self.method != METHOD_EXACT:
            raise ValueError(f"method must be {METHOD_EXACT!r}; got {self.method!r}")

    def to_dict(self) -> dict:
        """JSON-ready form (plain str, float, int, list and dict only)."""
        return {
            "unit_id": self.unit_id,
            "players": list(self.players),
            "phi": {k: float(v) for k, v in self.phi.items()},
            "phi_prob": {k: float(v) for k, v in self.phi_prob.items()},
            "interactions": {k: float(v) for k, v in self.interactions.items()},
            "value_full": float(self.value_full),
            "value_empty": float(self.value_empty),
            "efficiency_gap": float(self.efficiency_gap),
            "coalitions": int(self.coalitions),
            "values": {k: float(v) for k, v in self.values.items()},
            "method": self.method,
        }


# ------------------------------------------------------------------------------------------- model
def _check_present(present: object) -> None:
    if not isinstance(present, Tensor) or present.dtype != torch.bool or present.dim() != 2 \
            or present.shape[1] != len(MODALITIES):
        raise ValueError(f"present must be a [B, {len(MODALITIES)}] bool tensor; got "
                         f"{getattr(present, 'dtype', type(present).__name__)} {tuple(getattr(present, 'shape', ()))}")


#: Every subset of :data:`MODALITIES`, smallest first: the coalition rows each unit gets, in this order.
SUBSETS: tuple[frozenset[str], ...] = tuple(all_coalitions(MODALITIES))
_SUBSET_INDEX = {c: i for i, c in enumerate(SUBSETS)}


def coalition_row(unit: int, coalition: frozenset[str]) -> int:
    """The row of ``unit``'s ``coalition`` in :func:`coalition_masks` / :func:`stack_coalitions`."""
    return unit * len(SUBSETS) + _SUBSET_INDEX[frozenset(coalition)]


def coalition_masks(present: Tensor) -> tuple[Tensor, Tensor]:
    """For every unit, a presence mask per subset of :data:`MODALITIES` (:data:`SUBSETS`), restricted to the
    modalities the unit has: ``2^M`` rows per unit, unit after unit.

    The shape depends only on the batch size, so building it needs no host synchronisation and compiles to
    static shapes. A subset that names a modality the unit lacks evaluates to the same value as its
    restriction to the unit's modalities (the model cannot see the missing one); such rows are spare, not
    wrong, and :func:`coalition_row` finds the row of any coalition of the unit's modalities.

    Args:
        present: ``[B, M]`` bool, the modalities each unit has.

    Returns:
        ``masks`` ``[B·2^M, M]`` bool (each a subset of its unit's row of ``present``) and ``row_unit``
        ``[B·2^M]`` long, the unit of each row.

    Raises:
        ValueError: ``present`` is not a ``[B, M]`` bool tensor with M = ``len(MODALITIES)``.
    """
    _check_present(present)
    subsets = torch.tensor([[m in c for m in MODALITIES] for c in SUBSETS], dtype=torch.bool,
                           device=present.device)  # [C, M]
    b, c = present.shape[0], len(SUBSETS)
    masks = (subsets.unsqueeze(0) & present.unsqueeze(1)).reshape(b * c, len(MODALITIES))  # [R, M]
    row_unit = torch.arange(b, device=present.device).repeat_interleave(c)  # [R]
    return masks, row_unit


def stack_coalitions(encoded: Encoded) -> tuple[Encoded, Tensor]:
    """Every coalition of every unit as one row of a stacked batch that reuses the encoder tokens.

    Args:
        encoded: one ``encode`` result ``[B, N, D]``.

    Returns:
        ``stacked`` (``[R, N, D]`` tokens, row r a copy of its unit's) and ``masks`` ``[R, M]``, the modalities
        row r may see (:func:`coalition_masks`), both on the tokens' device: ``model.fuse(stacked, masks)``
        evaluates them all.
    """
    masks, row_unit = coalition_masks(encoded.present)  # [R, M], [R]
    device = encoded.tokens.device
    stacked = Encoded(
        tokens=encoded.tokens.index_select(0, row_unit.to(device)),  # [R, N, D]
        modality_index=encoded.modality_index,  # [N]
        slices=encoded.slices,
        present=encoded.present.index_select(0, row_unit.to(encoded.present.device)),  # [R, M]
    )
    return stacked, masks.to(encoded.present.device)


def coalition_values(model: InspectionModel, batch: Batch) -> list[CoalitionValues]:
    """Evaluate every coalition of every unit with one ``encode`` and one ``fuse`` call.

    The model is switched to eval mode for the call (and restored afterwards) and runs without gradients.

    Args:
        model: the fusion model.
        batch: collated units (``model.batch(units)``).

    Returns:
        One :class:`CoalitionValues` per unit, in batch order.

    Raises:
        ValueError: an empty batch, a presence mask of the wrong shape, or a unit with no modality.
    """
    if not isinstance(model, InspectionModel):
        raise ValueError(f"model must be an InspectionModel; got {type(model).__name__}")
    if not isinstance(batch, Batch) or len(batch) == 0:
        raise ValueError("batch must be a non-empty Batch (build it with model.batch(units))")
    _check_present(batch.present)
    empty_units = (~batch.present.any(dim=1)).nonzero(as_tuple=True)[0].tolist()
    if empty_units:
        raise ValueError(f"every unit needs at least one modality to explain; units at {empty_units} have none")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            encoded = model.encode(batch)  # tokens [B, N, D]
            stacked, masks = stack_coalitions(encoded)  # [R, N, D], [R, M]
            logits = model.fuse(stacked, masks).defect_logit  # [R]
    finally:
        model.train(was_training)
    logit_list = logits.double().cpu().tolist()
    prob_list = torch.sigmoid(logits.double()).cpu().tolist()
    out: list[CoalitionValues] = []
    for b, flags in enumerate(batch.present.tolist()):
        players = tuple(m for m, on in zip(MODALITIES, flags, strict=True) if on)
        rows = {c: coalition_row(b, c) for c in all_coalitions(players)}
        out.append(CoalitionValues(players, {c: logit_list[r] for c, r in rows.items()},
                                   {c: prob_list[r] for c, r in rows.items()}))
    return out


def attribution_from_values(unit_id: str, values: CoalitionValues) -> ModalityAttribution:
    """Shapley values, interactions and the efficiency gap of one unit from its coalition values."""
    players = values.players
    phi = shapley_from_values(values.logit, players)
    phi_prob = shapley_from_values(values.prob, players)
    pairs = interactions_from_values(values.logit, players)
    full, empty = values.logit[frozenset(players)], values.logit[frozenset()]
    return ModalityAttribution(
        unit_id=unit_id,
        players=players,
        phi=phi,
        phi_prob=phi_prob,
        interactions={pair_key(a, b): v for (a, b), v in pairs.items()},
        value_full=full,
        value_empty=empty,
        efficiency_gap=math.fsum(phi.values()) - (full - empty),
        coalitions=len(values.logit),
        values={coalition_key(c): v for c, v in values.logit.items()},
    )


def explain_modalities(model: InspectionModel, batch: Batch,
                       unit_ids: Sequence[str] | None = None) -> list[ModalityAttribution]:
    """Exact modality Shapley values and pairwise interactions of each unit's defect score.

    One ``encode`` call over the batch and one ``fuse`` call over all units' coalitions stacked
    (``R = Σ_b 2^{n_b}`` rows); see :func:`coalition_values`.

    Args:
        model: the fusion model.
        batch: collated units (``model.batch(units)``).
        unit_ids: one id per unit for the reports; the batch position (``"0"``, ``"1"``, ...) when omitted.

    Returns:
        One :class:`ModalityAttribution` per unit, in batch order.

    Raises:
        ValueError: an empty batch, ``unit_ids`` of the wrong length, or a unit with no modality.
    """
    if isinstance(batch, Batch) and unit_ids is not None and len(unit_ids) != len(batch):
        raise ValueError(f"need one unit id per unit in the batch ({len(batch)}); got {len(unit_ids)}")
    per_unit = coalition_values(model, batch)
    ids = [str(i) for i in range(len(per_unit))] if unit_ids is None else [str(u) for u in unit_ids]
    return [attribution_from_values(uid, vals) for uid, vals in zip(ids, per_unit, strict=True)]


def explain_units(model: InspectionModel, units: Sequence[Unit]) -> list[ModalityAttribution]:
    """Preprocess, collate and explain units (see :func:`explain_modalities`); reports carry the unit ids.

    Raises:
        ValueError: no units, or a unit with no modality the model reads.
    """
    if not units:
        raise ValueError("need at least one unit to explain; got none")
    return explain_modalities(model, model.batch(units), [u.unit_id for u in units])
