"""Owen values over modality → group: closed forms, an independent oracle (shapiq), exact vs sampled, and the
model's level-2 explanations through the one ``explain`` API."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest

from explain.hierarchy import METHOD_OWEN_EXACT, METHOD_OWEN_PERMUTATION, groups_from_tokens, owen_values

#: Sums of float64 terms of O(1) values: efficiency and closed forms hold to rounding.
EXACT_ATOL = 1e-9
#: Permutation estimates of a game whose marginals lie in [-2, 2], from 400 orders (200 antithetic pairs) per
#: outer coalition: the standard error is below 0.1; a wrong weight or a missed term is off by far more.
SAMPLED_ATOL = 0.15


def game_of(fn):
    """Wrap ``fn(visible: dict[modality, frozenset[int]]) -> float`` as an ``evaluate`` and count its calls."""
    calls = []

    def evaluate(coalitions):
        calls.append(len(coalitions))
        return [fn({m: set(g) for m, g in c.items() if g}) for c in coalitions]

    evaluate.calls = calls
    return evaluate


def test_additive_game_gives_each_group_its_weight_in_both_modes():
    w = {"vision": [0.5, -1.0, 2.0, 0.25], "vibration": [1.5, -0.5, 0.0]}
    fn = game_of(lambda v: 3.0 + sum(w[m][g] for m, gs in v.items() for g in gs))
    for budget in (10_000, 40):  # 40 forces random orders
        out, used = owen_values(fn, {"vision": 4, "vibration": 3}, budget=budget, seed=1)
        assert used <= budget
        for m in w:
            assert out[m].phi == pytest.approx(w[m], abs=EXACT_ATOL)
            assert out[m].shapley == pytest.approx(sum(w[m]), abs=EXACT_ATOL)
    assert out["vision"].method == METHOD_OWEN_PERMUTATION


def test_pure_interaction_inside_a_modality_splits_equally():
    fn = game_of(lambda v: 2.0 if {0, 1} <= v.get("temperature", set()) else 0.0)
    out, _ = owen_values(fn, {"temperature": 3}, budget=1000)
    assert out["temperature"].method == METHOD_OWEN_EXACT
    assert out["temperature"].phi == pytest.approx((1.0, 1.0, 0.0), abs=EXACT_ATOL)


def test_owen_differs_from_flat_shapley_where_the_hierarchy_matters():
    # v = 1 when groups a, b of modality m1 and group c of m2 are all visible. Flat Shapley: 1/3 each. Owen:
    # the modalities split 1/2 : 1/2, and a and b share m1's half.
    fn = game_of(lambda v: float({0, 1} <= v.get("m1", set()) and 0 in v.get("m2", set())))
    out, _ = owen_values(fn, {"m1": 2, "m2": 1}, budget=1000)
    assert out["m1"].phi == pytest.approx((0.25, 0.25), abs=EXACT_ATOL)
    assert out["m2"].phi == pytest.approx((0.5,), abs=EXACT_ATOL)


def random_game(seed: int, sizes: dict[str, int]):
    """A random non-additive game: weights, pairwise terms within and across modalities, a saturation."""
    rng = np.random.default_rng(seed)
    names = [(m, g) for m, k in sizes.items() for g in range(k)]
    w = {x: rng.normal(0, 0.5) for x in names}
    pairs = {p: rng.normal(0, 0.5) for p in combinations(names, 2) if rng.random() < 0.3}

    def fn(visible):
        on = {(m, g) for m, gs in visible.items() for g in gs}
        x = sum(w[a] for a in on) + sum(c for (a, b), c in pairs.items() if a in on and b in on)
        return math.tanh(x)

    return fn


def test_single_modality_owen_equals_shapley_from_shapiq():
    shapiq = pytest.importorskip("shapiq")
    k = 6
    fn = random_game(3, {"vision": k})
    out, used = owen_values(game_of(fn), {"vision": k}, budget=2 ** k)
    assert out["vision"].method == METHOD_OWEN_EXACT and used == 2 ** k

    def game(matrix):
        return np.array([fn({"vision": set(np.flatnonzero(row).tolist())}) for row in matrix])

    oracle = shapiq.ExactComputer(game, n_players=k)(index="SV", order=1)
    expected = [oracle.values[oracle.interaction_lookup[(i,)]] for i in range(k)]
    assert out["vision"].phi == pytest.approx(expected, abs=EXACT_ATOL)


def test_modality_sums_equal_the_quotient_games_shapley_values_from_shapiq():
    shapiq = pytest.importorskip("shapiq")
    sizes = {"vision": 9, "vibration": 5, "temperature": 4}
    fn = random_game(4, sizes)
    out, used = owen_values(game_of(fn), sizes, budget=300, seed=7)  # groups sampled, sums exact
    assert used <= 300 and out["vision"].method == METHOD_OWEN_PERMUTATION
    mods = list(sizes)

    def quotient(matrix):
        return np.array([fn({m: set(range(sizes[m])) for m, on in zip(mods, row, strict=True) if on})
                         for row in matrix])

    oracle = shapiq.ExactComputer(quotient, n_players=3)(index="SV", order=1)
    for i, m in enumerate(mods):
        phi_m = oracle.values[oracle.interaction_lookup[(i,)]]
        assert out[m].shapley == pytest.approx(phi_m, abs=EXACT_ATOL)
        assert math.fsum(out[m].phi) == pytest.approx(phi_m, abs=EXACT_ATOL)  # efficiency inside m


def test_sampled_values_agree_with_exact_enumeration():
    sizes = {"vision": 6, "temperature": 2}
    fn = random_game(5, sizes)
    exact, _ = owen_values(game_of(fn), sizes, budget=10_000)
    sampled, used = owen_values(game_of(fn), sizes, budget=2 * 2 * 400 * 7, seed=0, enumerate_when_possible=False)
    assert exact["vision"].method == METHOD_OWEN_EXACT and sampled["vision"].method == METHOD_OWEN_PERMUTATION
    assert sampled["vision"].orders >= 400
    assert sampled["vision"].phi == pytest.approx(exact["vision"].phi, abs=SAMPLED_ATOL)
    assert sampled["vision"].phi != pytest.approx(exact["vision"].phi, abs=EXACT_ATOL)  # really sampled


def test_same_seed_same_values_other_seed_other_values():
    sizes = {"vision": 10}
    fn = random_game(6, sizes)
    a, _ = owen_values(game_of(fn), sizes, budget=60, seed=11)
    b, _ = owen_values(game_of(fn), sizes, budget=60, seed=11)
    c, _ = owen_values(game_of(fn), sizes, budget=60, seed=12)
    assert a == b
    assert a["vision"].phi != c["vision"].phi


def test_budget_below_one_order_per_modality_is_refused():
    with pytest.raises(ValueError, match="budget must be at least 48"):
        owen_values(game_of(lambda v: 0.0), {"vision": 4, "vibration": 3, "temperature": 2}, budget=47)
    with pytest.raises(ValueError, match="at least one group"):
        owen_values(game_of(lambda v: 0.0), {"vision": 0}, budget=100)


# --------------------------------------------------------------------------------------------- groups
def test_groups_partition_every_encoders_tokens(small_model_factory):
    model = small_model_factory()
    for modality, infos in model.token_info().items():
        groups = groups_from_tokens(modality, infos)
        tokens = sorted(t for g in groups for t in g.tokens)
        assert tokens == list(range(len(infos))), modality  # each token in exactly one group
        assert all(g.modality == modality and g.name for g in groups)
        kinds = {i.kind for i in infos}
        assert {g.kind for g in groups} == kinds
        if "region" in kinds:
            assert len(groups) <= 16
        assert len({g.name for g in groups}) == len(groups)


def test_band_limits_per_kind_read_the_envelope_at_token_resolution(small_model_factory):
    model = small_model_factory()
    infos = model.token_info()["vibration"]
    n_env = sum(i.kind == "envelope" for i in infos)
    n_spec = sum(i.kind == "spectrum" for i in infos)
    fine = groups_from_tokens("vibration", infos, max_bands={"envelope": n_env})
    envelope = [g for g in fine if g.kind == "envelope"]
    assert len(envelope) == n_env and all(len(g.tokens) == 1 for g in envelope)
    assert len([g for g in fine if g.kind == "spectrum"]) == min(8, n_spec)  # a kind left out keeps 8
    spans = [g.span for g in envelope]
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(spans, spans[1:], strict=False))  # contiguous bands
    one = groups_from_tokens("vibration", infos, max_bands=1)
    assert [g.kind for g in one if g.kind != "waveform"] == ["spectrum", "envelope"]


# ---------------------------------------------------------------------------------------------- model
def test_level2_token_masking_is_efficient_deterministic_and_refines_level1(small_model_factory, unit_factory):
    from explain import explain

    model = small_model_factory()
    rng = np.random.default_rng(0)
    units = [unit_factory(i, rng) for i in range(3)] + [unit_factory(3, rng, drop=("vibration",))]
    model.fit_normalisation(model.batch(units))
    level1 = explain(model, units, level=1)
    level2 = explain(model, units, level=2, budget=256, seed=3)
    again = explain(model, units, level=2, budget=256, seed=3)
    assert [json.dumps(a.to_dict(), sort_keys=True) for a in level2] == \
        [json.dumps(a.to_dict(), sort_keys=True) for a in again]
    for one, two in zip(level1, level2, strict=True):
        assert one.level == 1 and two.level == 2 and two.masking == "tokens"
        assert set(two.groups) == set(one.modality.players)
        assert two.budget <= 256 + one.modality.coalitions
        # the groups of each modality add up to its level-1 Shapley value; all of them to v(all) - v(none)
        for m, groups in two.groups.items():
            assert math.fsum(g.phi for g in groups) == pytest.approx(one.modality.phi[m], abs=1e-5)
        assert abs(two.efficiency_gap) < 1e-5
        assert two.top_groups(1)[0].phi == max((g for gs in two.groups.values() for g in gs),
                                               key=lambda g: abs(g.phi)).phi
    assert level2[3].groups.keys() == {"vision", "temperature"}


def test_explain_with_given_groups_keeps_efficiency(small_model_factory, unit_factory):
    from explain import explain
    from explain.api import model_groups

    model = small_model_factory()
    rng = np.random.default_rng(1)
    units = [unit_factory(i, rng) for i in range(2)]
    model.fit_normalisation(model.batch(units))
    n_env = sum(i.kind == "envelope" for i in model.token_info()["vibration"])
    groups = model_groups(model, max_bands={"envelope": n_env}, max_segments=2)
    level1 = explain(model, units, level=1)
    for one, two in zip(level1, explain(model, units, level=2, budget=512, groups=groups), strict=True):
        assert [g.name for g in two.groups["vibration"]] == [g.name for g in groups["vibration"]]
        assert sum(g.kind == "envelope" for g in two.groups["vibration"]) == n_env
        for m, gs in two.groups.items():
            assert math.fsum(g.phi for g in gs) == pytest.approx(one.modality.phi[m], abs=1e-5)


def test_explain_rejects_unknown_levels_maskings_and_empty_input(small_model_factory, unit_factory):
    from explain import explain

    model = small_model_factory()
    units = [unit_factory(0, np.random.default_rng(0))]
    with pytest.raises(ValueError, match="level must be one of"):
        explain(model, units, level=4)
    with pytest.raises(ValueError, match="masking must be one of"):
        explain(model, units, level=2, masking="pixels")
    with pytest.raises(ValueError, match="at least one unit"):
        explain(model, [], level=1)


def test_level2_from_existing_encoder_tokens_equals_the_full_explanation(small_model_factory, unit_factory):
    import torch

    from explain import explain
    from explain.api import explain_encoded
    from explain.shapley import explain_modalities

    model = small_model_factory()
    rng = np.random.default_rng(4)
    units = [unit_factory(i, rng) for i in range(3)] + [unit_factory(3, rng, drop=("vision",))]
    model.fit_normalisation(model.batch(units))
    model.eval()
    batch = model.batch(units)
    with torch.inference_mode():  # as the scoring pass makes them
        encoded = model.encode(batch)
    tops = explain_modalities(model, batch, [u.unit_id for u in units])
    direct = explain(model, units, level=2, budget=200, seed=5)
    for b, (top, full) in enumerate(zip(tops, direct, strict=True)):
        reused = explain_encoded(model, encoded, b, top, budget=200, seed=5)
        assert reused.budget == full.budget and reused.group_methods == full.group_methods
        for m in full.groups:
            assert [g.phi for g in reused.groups[m]] == pytest.approx([g.phi for g in full.groups[m]], abs=1e-6)
