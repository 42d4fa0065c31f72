"""The stream service with a normal-only model, against the real broker: one decision per unit with the
detector's own deviation scores, its calibrated threshold and class, and exact modality Shapley values of the
fused deviation, for complete units and units whose temperature never arrives.

The detector is fitted on real composite units (real ELPV images, real bearing windows, SKAB or simulated
temperature) of the training split's good units, calibrated on the validation split's good units, saved to a real
model store; the service loads it from there like any version.
"""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest

from inspection.codec import decode_reading, encode_reading
from inspection.errors import DataError
from inspection.records import MODALITIES, Unit
from inspection.store import ModelStore
from services.publish import FaultPlan

pytestmark = [pytest.mark.slow, pytest.mark.data]

#: Stream and direct scores compute the same float64 statistics from features of the same decoded readings; the
#: backbone's batch-dependent CPU kernels move the pooled image features by ~1e-7 relative, which the
#: standardisation (1 / scale of the log-distance) can enlarge to ~1e-6 on a deviation.
SCORE_ATOL = 1e-5
#: The Shapley values are float64 sums of differences of the coalitions' values: efficiency to rounding.
EFFICIENCY_ATOL = 1e-9
#: Image side the detector reads (small: the test fits and scores on CPU).
IMAGE_SIZE = 64


def _wire(unit: Unit) -> Unit:
    """The unit as the service decodes it: every reading through the wire codec and back."""
    readings = {}
    for m in unit.present:
        msg = encode_reading(getattr(unit, m))
        readings[m] = decode_reading(msg.value, list(msg.headers), key=msg.key, expected_modality=m)
    return Unit(unit.unit_id, unit.line_id, **readings)


def _max_game_shapley(values: dict[str, float]) -> dict[str, float]:
    """Shapley values of v(∅) = 0, v(S) = max of S's deviations, by averaging marginal contributions over every
    order of the players (independent of the subset-weight formula the service uses)."""
    orders = list(permutations(values))
    phi = dict.fromkeys(values, 0.0)
    for order in orders:
        best = 0.0
        for i, p in enumerate(order):
            now = max(values[q] for q in order[:i + 1])
            phi[p] += (now - best) / len(orders)
            best = now
    return phi


@pytest.fixture(scope="module")
def normal_model(tmp_path_factory):
    """A calibrated normal-only detector of composite units in a model store; the builder of its units."""
    from inspection.benches import default_model_config
    from inspection.data import skab
    from inspection.data.composite import CompositeBuilder, CompositeConfig
    from inspection.normal_only import NormalOnlyConfig, NormalOnlyDetector

    try:
        skab.skab_root()
        source = "auto"
    except DataError:
        source = "synthetic"
    try:
        builder = CompositeBuilder(CompositeConfig(seed=3, temperature_source=source))
        train, val = builder.units("train", 120), builder.units("val", 80)
    except DataError as exc:
        pytest.skip(f"composite sources unavailable: {exc}")
    det = NormalOnlyDetector(NormalOnlyConfig(default_model_config("composite", image_size=IMAGE_SIZE).encoders))
    det.fit([u for u in train if not u.label.defect]).calibrate([u for u in val if not u.label.defect], 0.05)
    root = tmp_path_factory.mktemp("normal-only-store")
    version = det.save(ModelStore(root), {"defect_class": "anomaly"}, promote=True)
    return det, root, version, builder


def test_a_normal_only_model_decides_every_unit_with_exact_modality_attributions(
        broker, topics, normal_model, service_config, run_service, publish, read_topic, parse_decisions,
        metric_value):
    det, root, version, builder = normal_model
    units = builder.units("test", 48)
    no_temperature, whole = units[:12], units[12:]
    config = service_config(model={"store": str(root)}, join={"timeout_s": 3.0})
    with run_service(config, broker.bootstrap) as service:
        publish(no_temperature, topics, FaultPlan(drop={"temperature": 1.0}))
        publish(whole, topics)
        records = read_topic(topics.decisions, len(units))
        acked = service.stats.decisions_acked
    decisions = parse_decisions(records)
    assert len(decisions) == len(units) == acked  # one decision per unit
    by_unit = {d.unit_id: d for d in decisions}
    assert set(by_unit) == {u.unit_id for u in units}

    seen = [_wire(u.without("temperature")) for u in no_temperature] + [_wire(u) for u in whole]
    direct = det.score(seen)
    for k, unit in enumerate(seen):
        d = by_unit[unit.unit_id]
        players = ("vision", "vibration") if k < len(no_temperature) else MODALITIES
        assert d.present == players and d.missing == tuple(m for m in MODALITIES if m not in players)
        assert d.model_version == version.version and d.threshold_version == version.card["threshold_version"]
        assert d.score == pytest.approx(direct.score[k], abs=SCORE_ATOL)
        assert d.threshold == det.threshold
        assert d.decision == ("defect" if d.score >= d.threshold else "ok")
        assert d.defect_class == ("anomaly" if d.decision == "defect" else "ok")
        deviations = {m: float(direct.deviations[k, MODALITIES.index(m)]) for m in players}
        assert d.modality_scores == pytest.approx(deviations, abs=SCORE_ATOL)
        attr = d.attributions
        assert attr["mode"] == "normal-only" and attr["method"] == "exact"
        assert attr["coalitions"] == 2 ** len(players) and set(attr["modality"]) == set(players)
        assert attr["modality"] == pytest.approx(_max_game_shapley(deviations), abs=SCORE_ATOL)
        # efficiency: the modality values add up to the fused deviation minus the baseline 0
        assert math.fsum(attr["modality"].values()) == pytest.approx(d.score, abs=EFFICIENCY_ATOL)
        assert abs(attr["efficiency_gap"]) < EFFICIENCY_ATOL
        assert set(attr["interactions"]) == {f"{a}×{b}" for i, a in enumerate(players) for b in players[i + 1:]}
    assert np.mean([by_unit[u.unit_id].decision == "defect" for u in units if not u.label.defect]) < 0.5
    assert metric_value(service, "inspection_decisions_total", decision="ok") \
        + metric_value(service, "inspection_decisions_total", decision="defect") == len(units)


def test_the_service_refuses_reports_with_a_normal_only_model(broker, topics, normal_model, service_config,
                                                              run_service, tmp_path):
    from inspection.errors import ConfigError

    _, root, _, _ = normal_model
    config = service_config(model={"store": str(root)}, reports={"dir": str(tmp_path / "reports")})
    with pytest.raises(ConfigError, match="normal-only model"), run_service(config, broker.bootstrap):
        pass
