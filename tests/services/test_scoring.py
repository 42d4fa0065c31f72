"""Scoring a micro-batch without a broker: parallel preprocessing and the warm-up forward change no decision.

Real composite units, the small model from a real model store; the decisions are compared field by field.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from inspection.records import InputCoordinate
from inspection.store import ModelStore
from services.join import JoinedUnit
from services.scoring import load_serving_model, score_units, warm_up


def _joined(units) -> list[JoinedUnit]:
    return [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(units)]


def _outcome(result) -> list[tuple]:
    """What each decision says (its CloudEvent without the times) and each dead letter's reason."""
    rows = []
    for scored in result.scored:
        event = scored.decision.to_cloudevent()
        data = {k: v for k, v in event["data"].items() if k not in ("decided_at", "latency_ms")}
        rows.append((event["id"], data, sorted((letter.reason, letter.detail) for letter in scored.dead)))
    return rows


@pytest.fixture(scope="module")
def serving(serving_store):
    return load_serving_model(ModelStore(serving_store), None, torch.device("cpu"))


def test_preprocessing_on_a_thread_pool_gives_the_same_decisions(serving, composite_units):
    units = composite_units[:24]
    # a unit without vibration among them: both paths must agree on it too
    units[3] = units[3].without("vibration")
    joined = _joined(units)
    alone = score_units(serving, joined)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pooled = score_units(serving, joined, executor=pool)
    assert _outcome(pooled) == _outcome(alone)
    assert all(s.decision is not None for s in pooled.scored)
    assert 0.0 < pooled.prepare_seconds <= pooled.seconds
    assert "vibration" not in _outcome(pooled)[3][1]["modalities"]["present"]  # decided without vibration
    assert _outcome(pooled)[4][1]["modalities"]["present"] == ["vision", "vibration", "temperature"]


def test_warm_up_runs_every_modality_and_changes_no_score(serving, composite_units):
    joined = _joined(composite_units[24:40])
    before = score_units(serving, joined)
    seconds = warm_up(serving, (8, 1))
    assert seconds > 0.0
    after = score_units(serving, joined)
    assert _outcome(after) == _outcome(before)


def test_stream_scores_match_the_per_unit_reference_path(serving, composite_units):
    # the stream prepares vibration in batched float32 torch ops; the reference is the per-unit numpy path
    # (inspection.preprocess) that training uses. Same modalities, same ids, scores within 1e-4 (float32
    # spectra differ from the float64 reference by <= ~3e-5 in log units; see tests/inspection/test_batchprep.py)
    units = composite_units[40:72]
    result = score_units(serving, _joined(units))
    model = serving.model
    with torch.no_grad():
        reference = model(model.batch(units)).score.double().tolist()
    for scored, unit, want in zip(result.scored, units, reference, strict=True):
        assert scored.decision.unit_id == unit.unit_id
        assert scored.decision.present == unit.present
        assert scored.decision.score == pytest.approx(want, abs=1e-4)
        assert scored.decision.decision == ("defect" if want >= scored.decision.threshold else "ok") or \
            abs(want - scored.decision.threshold) < 1e-4


def test_a_bad_waveform_is_dead_lettered_and_its_unit_decided_without_it(serving, composite_units):
    import dataclasses

    units = composite_units[72:76]
    vib = units[1].vibration
    units[1] = dataclasses.replace(units[1], vibration=dataclasses.replace(vib, values=vib.values[:, :100]))
    slow = units[2].vibration
    units[2] = dataclasses.replace(units[2], vibration=dataclasses.replace(slow, sample_rate_hz=10.0))
    result = score_units(serving, _joined(units))
    reasons = [[(d.reason, d.detail) for d in s.dead] for s in result.scored]
    assert reasons[0] == [] and reasons[3] == []
    assert "needs >= 256 samples" in reasons[1][0][1]
    assert "sampled at >= 1000 Hz" in reasons[2][0][1]
    for i in (1, 2):
        assert result.scored[i].decision.present == ("vision", "temperature")
        assert "vibration" in result.scored[i].decision.missing


def test_batch_tuning_measures_every_size_and_picks_the_smallest_near_the_best(serving):
    from services.scoring import tune_batch_size

    size, rates = tune_batch_size(serving, 12, repeats=1)
    assert sorted(rates) == [1, 2, 4, 8, 12]  # powers of two, and max_batch itself
    assert all(r > 0 for r in rates.values())
    best = max(rates.values())
    assert rates[size] >= 0.95 * best
    assert all(rates[n] < 0.95 * best for n in rates if n < size)
    assert tune_batch_size(serving, 1, repeats=1)[0] == 1


def test_padding_to_a_warmed_size_changes_no_decision(serving, composite_units):
    """A batch of 5 padded to 8 rows (the last unit repeated): the same decisions, classes and attributions as
    unpadded, scores equal up to float32 rounding (the rows share a forward with other rows), and the copies
    leave no decision of their own."""
    import dataclasses

    from services.scoring import batch_buckets, padded_size

    assert batch_buckets(12) == (1, 2, 4, 8, 12) and batch_buckets(1) == (1,)
    assert [padded_size(n, (1, 2, 4, 8, 12)) for n in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12, 13]
    assert padded_size(7, ()) == 7
    units = composite_units[40:45]
    units[2] = units[2].without("temperature")
    joined = _joined(units)
    plain = score_units(serving, joined)
    padded = score_units(dataclasses.replace(serving, batch_sizes=batch_buckets(12)), joined)
    assert (plain.forward_rows, plain.forward_units) == (5, 5)
    assert (padded.forward_rows, padded.forward_units) == (8, 5)
    assert len(padded.scored) == 5
    for a, b in zip(plain.scored, padded.scored, strict=True):
        assert (a.decision.id, a.decision.decision, a.decision.defect_class, a.decision.present) == \
            (b.decision.id, b.decision.decision, b.decision.defect_class, b.decision.present)
        assert b.decision.score == pytest.approx(a.decision.score, abs=1e-5)
        assert b.attribution.phi == pytest.approx(a.attribution.phi, abs=1e-4)


def test_bf16_autocast_scores_close_to_fp32_with_the_same_decisions_in_kind(serving_store, composite_units):
    # on CUDA the service scores under bf16 autocast by default; CPU autocast runs the same code path here
    fp32 = load_serving_model(ModelStore(serving_store), None, torch.device("cpu"), "fp32")
    bf16 = load_serving_model(ModelStore(serving_store), None, torch.device("cpu"), "bf16")
    assert load_serving_model(ModelStore(serving_store), None, torch.device("cpu"), "auto").precision == "fp32"
    joined = _joined(composite_units[80:96])
    a, b = score_units(fp32, joined), score_units(bf16, joined)
    for x, y in zip(a.scored, b.scored, strict=True):
        assert x.decision.id == y.decision.id  # the id names the unit, its inputs and the model, not the score
        assert x.decision.present == y.decision.present
        assert y.decision.score == pytest.approx(x.decision.score, abs=0.03)  # bf16 keeps 8 bits of mantissa
        assert set(y.decision.attributions["modality"]) == set(x.decision.attributions["modality"])
    with pytest.raises(Exception, match="precision must be"):
        load_serving_model(ModelStore(serving_store), None, torch.device("cpu"), "fp8")
