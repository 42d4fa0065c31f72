"""Scoring with a normal-only version, without a broker: the detector's own scores and decisions, exact modality
Shapley values of its fused score, a bad reading dead-lettered around the rest, warm-up and batch tuning.

A real detector (the packaged EfficientNet-Lite0 backbone, spectrum and envelope bands, temperature summaries) is
fitted on synthetic units, saved to a real model store and loaded back through ``load_serving_model``.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from itertools import permutations

import numpy as np
import pytest
import torch

from inspection.errors import StoreError
from inspection.model import EncoderSpec
from inspection.normal_only import NormalOnlyConfig, NormalOnlyDetector
from inspection.records import MODALITIES, InputCoordinate, VibrationReading
from inspection.store import ModelStore
from services.dlq import PREPROCESS_FAILED
from services.join import JoinedUnit
from services.scoring import load_serving_model, score_units, tune_batch_size, warm_up

#: Stream and direct scores run the same float64 statistics on features of the same readings; only the
#: backbone's batch-dependent CPU kernels may differ (~1e-7 relative on the pooled features).
SCORE_ATOL = 1e-6
#: Shapley values are float64 sums of differences of the same coalition values: efficiency holds to rounding.
EFFICIENCY_ATOL = 1e-9
#: Amplitude factor of the "defective" units' vibration: far outside the fitted units' spread.
SHIFT = 4.0

pytestmark = pytest.mark.slow


def _config() -> NormalOnlyConfig:
    return NormalOnlyConfig({
        "vision": EncoderSpec("vision", {"preprocess": {"image_size": 64}}),
        "vibration": EncoderSpec("waveform", {"preprocess": {"n_bins": 64, "env_bins": 32, "wave_len": 512}}),
        "temperature": EncoderSpec("series", {"modality": "temperature", "preprocess": {"samples": 20}}),
    }, spectrum_bands=16, envelope_bands=16)


def _shifted(unit):
    """The unit with its vibration amplitude multiplied by :data:`SHIFT`."""
    vib = unit.vibration
    return dataclasses.replace(unit, vibration=dataclasses.replace(vib, values=vib.values * SHIFT))


def _joined(units) -> list[JoinedUnit]:
    return [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(units)]


def _permutation_shapley(values: dict[str, float]) -> dict[str, float]:
    """Shapley values of the max game (v(∅) = 0, v(S) = max of S's values) by averaging marginal contributions
    over every order of the players: an implementation independent of the subset-weight formula."""
    players = list(values)
    phi = dict.fromkeys(players, 0.0)
    orders = list(permutations(players))
    for order in orders:
        seen: list[float] = []
        for p in order:
            before = max(seen) if seen else 0.0
            seen.append(values[p])
            phi[p] += (max(seen) - before) / len(orders)
    return phi


@pytest.fixture(scope="module")
def detector_store(tmp_path_factory, unit_factory):
    rng = np.random.default_rng(0)
    normal = [unit_factory(i, rng) for i in range(60)]
    det = NormalOnlyDetector(_config())
    det.fit(normal[:40]).calibrate(normal[40:], target_far=0.05)
    root = tmp_path_factory.mktemp("normal-store")
    version = det.save(ModelStore(root), {"defect_class": "vibration-fault"}, promote=True)
    return det, root, version


@pytest.fixture(scope="module")
def test_units(unit_factory):
    rng = np.random.default_rng(1)
    units = [unit_factory(100 + i, rng) for i in range(16)]
    return [_shifted(u) if i % 2 else u for i, u in enumerate(units)]


def test_decisions_are_the_detectors_with_exact_shapley_values(detector_store, test_units):
    det, root, version = detector_store
    serving = load_serving_model(ModelStore(root), None, torch.device("cpu"))
    assert serving.model is None and serving.normal_only is not None
    assert serving.version == version.version and serving.threshold_version == version.card["threshold_version"]
    assert serving.modalities == MODALITIES
    result = score_units(serving, _joined(test_units))
    direct = det.score(test_units)
    for k, scored in enumerate(result.scored):
        d = scored.decision
        assert not scored.dead
        assert d.score == pytest.approx(direct.score[k], abs=SCORE_ATOL)
        assert d.threshold == det.threshold
        assert d.decision == ("defect" if direct.decision[k] else "ok")
        assert d.defect_class == ("vibration-fault" if d.decision == "defect" else "ok")
        deviations = {m: float(direct.deviations[k, i]) for i, m in enumerate(MODALITIES)}
        assert d.modality_scores == pytest.approx(deviations, abs=SCORE_ATOL)
        attr = d.attributions
        assert attr["mode"] == "normal-only" and attr["scale"] == "deviation"
        assert attr["coalitions"] == 8 and attr["method"] == "exact" and attr["baseline_logit"] == 0.0
        assert attr["modality"] == pytest.approx(_permutation_shapley(deviations), abs=SCORE_ATOL)
        assert sum(attr["modality"].values()) == pytest.approx(d.score, abs=EFFICIENCY_ATOL)
        assert abs(attr["efficiency_gap"]) < EFFICIENCY_ATOL
        # probability scale: the normal CDF of each coalition's deviation, the baseline at 0.5
        cdf = {m: 0.5 * math.erfc(-v / math.sqrt(2)) for m, v in deviations.items()}
        assert sum(attr["modality_probability"].values()) == pytest.approx(max(cdf.values()) - 0.5, abs=1e-12)
    # the shifted vibration is what makes a unit deviate: it is alarmed, and vibration carries the largest value
    for scored in result.scored[1::2]:
        phi = scored.decision.attributions["modality"]
        assert scored.decision.decision == "defect"
        assert max(phi, key=phi.get) == "vibration"


def test_a_reading_the_detector_cannot_read_is_dead_lettered_and_the_unit_decided_without_it(
        detector_store, test_units):
    det, root, _ = detector_store
    serving = load_serving_model(ModelStore(root), None, torch.device("cpu"))
    units = list(test_units[:4])
    vib = units[1].vibration
    two_channels = np.concatenate([vib.values, vib.values])  # [2, S]: the detector was fitted on one channel
    units[1] = dataclasses.replace(units[1], vibration=VibrationReading(
        values=two_channels, sample_rate_hz=vib.sample_rate_hz, unit=vib.unit, unit_id=vib.unit_id,
        line_id=vib.line_id, reading_id=vib.reading_id, source=vib.source, event_time=vib.event_time))
    result = score_units(serving, _joined(units))
    bad = result.scored[1]
    assert [(letter.reason, letter.coordinate.topic) for letter in bad.dead] == [
        (PREPROCESS_FAILED, "inspection.vibration")]
    assert "1 channel" in bad.dead[0].detail and "(2, 2000)" in bad.dead[0].detail
    d = bad.decision
    assert d.present == ("vision", "temperature") and d.missing == ("vibration",)
    assert d.attributions["coalitions"] == 4
    alone = det.score([units[1].without("vibration")])
    assert d.score == pytest.approx(alone.score[0], abs=SCORE_ATOL)
    others = score_units(serving, _joined([units[0], units[2], units[3]]))
    for a, b in zip([result.scored[i] for i in (0, 2, 3)], others.scored, strict=True):
        assert a.decision.score == pytest.approx(b.decision.score, abs=SCORE_ATOL) and not a.dead


def test_thread_pool_warm_up_and_tuning_change_no_decision(detector_store, test_units):
    _, root, _ = detector_store
    serving = load_serving_model(ModelStore(root), None, torch.device("cpu"), "auto")
    assert serving.precision == "fp32"
    joined = _joined(test_units[:8])
    before = [s.decision for s in score_units(serving, joined).scored]
    assert warm_up(serving, (4, 1)) > 0.0
    size, rates = tune_batch_size(serving, 4, repeats=1)
    assert set(rates) == {1, 2, 4} and size in rates
    with ThreadPoolExecutor(max_workers=3) as pool:
        after = [s.decision for s in score_units(serving, joined, executor=pool).scored]
    for a, b in zip(before, after, strict=True):
        assert (a.id, a.decision, a.defect_class) == (b.id, b.decision, b.defect_class)
        assert a.score == pytest.approx(b.score, abs=SCORE_ATOL)


def test_a_tampered_normal_only_version_is_refused(detector_store, tmp_path):
    det, _, _ = detector_store
    store = ModelStore(tmp_path / "store")
    saved = det.save(store, promote=True)
    weights = saved.path / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="tampered or corrupted"):
        load_serving_model(store, None, torch.device("cpu"))
