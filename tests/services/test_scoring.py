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
