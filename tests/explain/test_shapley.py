"""Exact modality Shapley values: closed forms on value tables, then the real fusion model's batched coalitions."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explain.shapley import (
    EMPTY_COALITION,
    ModalityAttribution,
    all_coalitions,
    coalition_masks,
    coalition_row,
    coalition_values,
    explain_modalities,
    explain_units,
    interactions_from_values,
    shapley_from_values,
)
from inspection.records import MODALITIES

#: Value tables are float64 and the exact formulas sum at most 4 weighted terms with math.fsum: only float64
#: rounding of the weights and differences remains (~1e-16 relative), so 1e-12 absolute on O(1) values.
MATH_ATOL = 1e-12
#: Random tables hold values up to VALUE_BOUND; efficiency must hold to float64 rounding relative to that scale.
VALUE_BOUND = 1e3
RANDOM_TABLE_ATOL = 1e-12 * VALUE_BOUND
#: The model's logits are fp32, but they are converted to float64 before the Shapley sums, so the efficiency
#: gap is float64 rounding only; 1e-9 is far above that and far below any wrong weight (O(0.1) on real logits).
EFFICIENCY_ATOL = 1e-9
#: A coalition row of the stacked fuse call against its own forward pass: same fp32 computation at a different
#: batch size, so only the CPU kernels' batch-dependent blocking/reassociation may differ (~1e-7 on O(1) logits).
BATCH_ATOL = 1e-5

T0 = datetime(2026, 2, 1, tzinfo=UTC)
DIM = 32


# -------------------------------------------------------------------------------------------- helpers
def table(players: tuple[str, ...], v) -> dict[frozenset[str], float]:
    return {c: float(v(c)) for c in all_coalitions(players)}






@pytest.fixture(scope="module")
def model_and_units(small_model_factory, unit_factory):
    model = small_model_factory()
    rng = np.random.default_rng(0)
    units = [unit_factory(i, rng) for i in range(6)]
    model.fit_normalisation(model.batch(units))
    model.eval()
    # a mixed batch: full units, one without vibration, one with vision only
    mixed = units[:3] + [unit_factory(10, rng, drop=("vibration",)), unit_factory(11, rng, drop=("vibration", "temperature"))]
    return model, mixed


# ------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("players", [("a",), ("a", "b"), ("a", "b", "c")])
def test_linear_game_gives_its_weights_and_no_interaction(players):
    weights = {"a": 1.5, "b": -0.25, "c": 3.0}
    bias = 0.7
    values = table(players, lambda s: bias + sum(weights[p] for p in s))
    phi = shapley_from_values(values, players)
    assert list(phi) == list(players)
    for p in players:
        assert phi[p] == pytest.approx(weights[p], abs=MATH_ATOL)
    inter = interactions_from_values(values, players)
    assert len(inter) == math.comb(len(players), 2)
    assert all(v == pytest.approx(0.0, abs=MATH_ATOL) for v in inter.values())


@pytest.mark.parametrize("players", [("a", "b"), ("a", "b", "c")])
def test_pure_pair_interaction_is_split_evenly(players):
    c = 2.4
    values = table(players, lambda s: c * ("a" in s and "b" in s))
    phi = shapley_from_values(values, players)
    assert phi["a"] == pytest.approx(c / 2, abs=MATH_ATOL)
    assert phi["b"] == pytest.approx(c / 2, abs=MATH_ATOL)
    inter = interactions_from_values(values, players)
    assert inter[("a", "b")] == pytest.approx(c, abs=MATH_ATOL)
    if "c" in players:
        assert phi["c"] == pytest.approx(0.0, abs=MATH_ATOL)
        assert inter[("a", "c")] == pytest.approx(0.0, abs=MATH_ATOL)
        assert inter[("b", "c")] == pytest.approx(0.0, abs=MATH_ATOL)


def test_three_way_interaction_closed_form():
    # v = [a, b, c all present]: φ = 1/3 each; I_ab = Σ_{S ⊆ {c}} w(S)·Δ = (1/2)·1 = 1/2
    players = ("a", "b", "c")
    values = table(players, lambda s: float(len(s) == 3))
    phi = shapley_from_values(values, players)
    assert all(v == pytest.approx(1 / 3, abs=MATH_ATOL) for v in phi.values())
    assert all(v == pytest.approx(0.5, abs=MATH_ATOL) for v in interactions_from_values(values, players).values())


def test_symmetric_players_get_equal_values_and_a_dummy_gets_zero():
    players = ("a", "b", "c")
    # a and b are interchangeable (v depends on how many of them are in S); c adds a constant
    values = table(players, lambda s: [0.0, 1.3, 4.1][len(s & {"a", "b"})] + 0.9 * ("c" in s))
    phi = shapley_from_values(values, players)
    assert phi["a"] == pytest.approx(phi["b"], abs=MATH_ATOL)
    assert phi["c"] == pytest.approx(0.9, abs=MATH_ATOL)
    # a dummy never changes v: zero value, zero interaction with anyone
    dummy = table(("a", "b", "d"), lambda s: 2.0 * ("a" in s) - 1.1 * ("a" in s and "b" in s))
    phi = shapley_from_values(dummy, ("a", "b", "d"))
    assert phi["d"] == pytest.approx(0.0, abs=MATH_ATOL)
    inter = interactions_from_values(dummy, ("a", "b", "d"))
    assert inter[("a", "d")] == pytest.approx(0.0, abs=MATH_ATOL)
    assert inter[("b", "d")] == pytest.approx(0.0, abs=MATH_ATOL)
    assert inter[("a", "b")] == pytest.approx(-1.1, abs=MATH_ATOL)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3), data=st.data())
def test_efficiency_holds_on_random_tables(n, data):
    players = MODALITIES[:n]
    coalitions = all_coalitions(players)
    draws = data.draw(st.lists(st.floats(-VALUE_BOUND, VALUE_BOUND, allow_nan=False), min_size=len(coalitions),
                               max_size=len(coalitions)))
    values = dict(zip(coalitions, draws, strict=True))
    phi = shapley_from_values(values, players)
    gap = math.fsum(phi.values()) - (values[frozenset(players)] - values[frozenset()])
    assert abs(gap) <= RANDOM_TABLE_ATOL


def test_value_tables_are_validated():
    players = ("a", "b")
    good = table(players, len)
    with pytest.raises(ValueError, match="distinct"):
        shapley_from_values(good, ("a", "a"))
    with pytest.raises(ValueError, match="missing"):
        shapley_from_values({k: v for k, v in good.items() if k}, players)
    with pytest.raises(ValueError, match="not subsets"):
        interactions_from_values({**good, frozenset({"z"}): 1.0}, players)
    with pytest.raises(ValueError, match="finite"):
        shapley_from_values({**good, frozenset(): math.nan}, players)


def test_coalition_masks_stack_only_each_units_subsets():
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    masks, row_unit = coalition_masks(present)
    assert masks.shape == (3 * 8, 3) and row_unit.shape == (24,)  # [R, M], [R]: 2^M rows per unit
    assert row_unit.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert not (masks & ~present[row_unit]).any()  # every row is a subset of its unit's modalities
    for b in range(3):
        rows = {tuple(r) for r in masks[row_unit == b].tolist()}
        assert len(rows) == 2 ** int(present[b].sum())  # every subset of the unit's modalities, spares repeat
        players = [m for m, on in zip(MODALITIES, present[b].tolist(), strict=True) if on]
        for coalition in all_coalitions(players):
            assert masks[coalition_row(b, coalition)].tolist() == [m in coalition for m in MODALITIES]
    with pytest.raises(ValueError, match="bool tensor"):
        coalition_masks(torch.ones(2, 2, dtype=torch.bool))


def test_attribution_record_checks_itself():
    kw = dict(unit_id="u", players=("vision", "temperature"), phi={"vision": 1.0, "temperature": 0.5},
              phi_prob={"vision": 0.1, "temperature": 0.05}, interactions={"vision×temperature": 0.2},
              value_full=1.0, value_empty=-0.5, efficiency_gap=0.0, coalitions=4)
    ModalityAttribution(**kw)
    with pytest.raises(ValueError, match="MODALITIES|order"):
        ModalityAttribution(**{**kw, "players": ("temperature", "vision")})
    with pytest.raises(ValueError, match="coalitions"):
        ModalityAttribution(**{**kw, "coalitions": 8})
    with pytest.raises(ValueError, match="interactions"):
        ModalityAttribution(**{**kw, "interactions": {}})


# ------------------------------------------------------------------------------------- real model
def test_real_model_attributions_are_efficient_and_cover_present_modalities(model_and_units):
    model, units = model_and_units
    reports = explain_units(model, units)
    assert [r.unit_id for r in reports] == [u.unit_id for u in units]
    for r, u in zip(reports, units, strict=True):
        assert r.players == u.present
        assert set(r.phi) == set(u.present) and set(r.phi_prob) == set(u.present)
        assert r.coalitions == 2 ** len(u.present) == len(r.values)
        assert abs(r.efficiency_gap) < EFFICIENCY_ATOL
        prob_gap = math.fsum(r.phi_prob.values()) - (_sigmoid(r.value_full) - _sigmoid(r.value_empty))
        assert abs(prob_gap) < EFFICIENCY_ATOL
        assert r.method == "exact"
        json.dumps(r.to_dict())
    lacking = reports[3]
    assert lacking.players == ("vision", "temperature") and "vibration" not in lacking.phi
    assert list(lacking.interactions) == ["vision×temperature"] and lacking.coalitions == 4
    single = reports[4]
    assert single.players == ("vision",) and single.interactions == {}
    assert single.phi["vision"] == pytest.approx(single.value_full - single.value_empty, abs=EFFICIENCY_ATOL)
    # the baseline is the same for every unit (everything masked) and the model's output actually moves
    empties = [r.value_empty for r in reports]
    assert max(empties) - min(empties) < BATCH_ATOL  # equal up to fp32 reassociation across rows
    assert max(abs(v) for r in reports for v in r.phi.values()) > BATCH_ATOL


def test_batched_coalitions_equal_separate_forward_passes(model_and_units):
    model, units = model_and_units
    batch = model.batch(units)
    per_unit = coalition_values(model, batch)
    with torch.no_grad():
        for b, values in enumerate(per_unit):
            one = model.batch([units[b]])
            for coalition, logit in values.logit.items():
                mask = torch.tensor([[m in coalition for m in MODALITIES]], dtype=torch.bool)
                ref = model(one, mask)
                assert logit == pytest.approx(float(ref.defect_logit[0]), abs=BATCH_ATOL), (b, sorted(coalition))
                assert values.prob[coalition] == pytest.approx(float(ref.score[0]), abs=BATCH_ATOL)
    reports = explain_modalities(model, batch)
    for r, values in zip(reports, per_unit, strict=True):
        assert r.values[EMPTY_COALITION] == values.logit[frozenset()] == r.value_empty
        assert r.phi == shapley_from_values(values.logit, values.players)


def test_explanations_are_deterministic(model_and_units):
    model, units = model_and_units
    first = [r.to_dict() for r in explain_units(model, units)]
    second = [r.to_dict() for r in explain_units(model, units)]
    assert first == second  # same inputs, eval mode, no sampling: bit-identical floats, no tolerance


def test_one_encode_and_one_fuse_call(model_and_units, monkeypatch):
    model, units = model_and_units
    calls = {"encode": 0, "fuse": 0}
    for name in calls:
        bound = getattr(model, name)

        def counted(*args, _bound=bound, _name=name, **kwargs):
            calls[_name] += 1
            return _bound(*args, **kwargs)

        monkeypatch.setattr(model, name, counted)
    reports = explain_modalities(model, model.batch(units))
    assert calls == {"encode": 1, "fuse": 1}
    assert len(reports) == len(units)


def test_training_mode_is_restored_and_inputs_are_validated(model_and_units):
    model, units = model_and_units
    model.train()
    try:
        eval_reports = explain_units(model, units[:1])
        assert model.training
    finally:
        model.eval()
    assert eval_reports[0].to_dict() == explain_units(model, units[:1])[0].to_dict()
    with pytest.raises(ValueError, match="at least one unit"):
        explain_units(model, [])
    with pytest.raises(ValueError, match="one unit id per unit"):
        explain_modalities(model, model.batch(units[:2]), ["only-one"])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
