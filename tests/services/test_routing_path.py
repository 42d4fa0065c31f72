"""The routing path in every decision and the attention-spread gauge.

Each decision carries, for the unit's own forward pass (its grand coalition), the experts every fusion query was
routed to in every MoE layer and their gate weights. The oracle is the model's router itself: the unit's
grand-coalition row is fused alone, the input of each MoE layer is captured and handed to
:func:`fusion.moe.route` with that layer's router weights and bias. The attention spread's oracle is the
entropy of softmax attention recomputed here from the queries and keys the bridge attended with.

Real parts throughout: the small model from a real model store, the session's Kafka broker, the service's
archive sink and the re-scoring of that archive.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion.bridge import masked_attention
from fusion.moe import route
from inspection.batchprep import prepare_readings
from inspection.errors import Reason, RecordError
from inspection.model import Batch, Encoded, InspectionModel
from inspection.records import (
    ROUTING_SCHEMA,
    ROUTING_WEIGHT_DECIMALS,
    Decision,
    InputCoordinate,
    RoutingPath,
    Unit,
)
from inspection.store import ModelStore
from services.join import JoinedUnit
from services.rescore import audit, read_decisions, rescore_local
from services.scoring import Scored, ServingModel, load_serving_model, score_units

#: Gate weights travel rounded to 4 decimals (at most half a unit, 5e-5, off the router's float), and the row
#: fused alone is a batch of 1 where the service fused a stacked batch of 8 rows per unit: float32 sums over
#: other shapes may round differently (1e-6 covers that; on this CPU they came out equal).
WEIGHT_TOLERANCE = 0.5 * 10.0 ** -ROUTING_WEIGHT_DECIMALS + 1e-6
#: Attention spread recomputed here in float64 from the bridge's own queries and keys vs the bridge's float32.
SPREAD_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------ oracles
def _joined(units) -> list[JoinedUnit]:
    return [JoinedUnit(u, {m: InputCoordinate(f"inspection.{m}", 0, i) for m in u.present}, True, (), "complete",
                       0.0) for i, u in enumerate(units)]


def _alone(model: InspectionModel, unit) -> Batch:
    """The unit as a batch of one, prepared as the stream prepares it."""
    device = next(model.parameters()).device
    prepared = prepare_readings(model, [{m: getattr(unit, m) for m in model.config.modalities}], device)
    assert not prepared.failures
    return Batch(prepared.inputs, prepared.present, torch.tensor([model.line_slot(unit.line_id)])).to(device)


def _encoded_alone(model: InspectionModel, source: Unit | Scored) -> Encoded:
    """One unit's encoder tokens as a batch of one row. From a :class:`Scored`, its row of the tokens its scoring
    forward encoded (the oracle then differs from the service only in fusing that row alone instead of in the
    stacked batch of every coalition); from a :class:`Unit`, the unit encoded alone after the stream's
    preprocessing."""
    if isinstance(source, Scored):
        e, r = source.encoded, source.row
        return Encoded(e.tokens[r:r + 1], e.modality_index, e.slices, e.present[r:r + 1])
    with torch.inference_mode():
        return model.encode(_alone(model, source))


def router_oracle(model: InspectionModel, unit: Unit | Scored) -> dict[int, tuple[list, list]]:
    """Fuse the unit's grand coalition alone and ask every MoE layer's router what it picks for the tokens that
    reached it: layer -> (experts ``[Q][K]``, weights ``[Q][K]``)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.ffn.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(model.bridge.layers)]
    try:
        with torch.inference_mode():
            model.fuse(_encoded_alone(model, unit))  # present = every modality the unit has: one row
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    with torch.inference_mode():
        for i, x in sorted(captured.items()):
            ffn = model.bridge.layers[i].ffn
            cfg = ffn.config
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), ffn.router.weight.float())  # [Q, E]
            routing = route(logits, ffn.expert_bias, cfg.top_k, cfg.score, cfg.route_scale)
            out[i] = (routing.indices.tolist(), routing.weights.tolist())
    return out


def spread_oracle(model: InspectionModel, unit: Unit | Scored) -> list[float]:
    """Per bridge layer: the mean over heads and fusion queries of the entropy of the queries' softmax attention
    over the unit's tokens, recomputed in float64 from the queries and keys the bridge's cross-attention used."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(q, k, v, mask=None, top_k=None):
        if mask is not None:  # the cross-attention (self-attention among the queries has no mask)
            calls.append((q.detach().double(), k.detach().double(), mask))
        return masked_attention(q, k, v, mask, top_k)

    bridge = model.bridge
    kept = bridge.attention
    bridge.attention = recording
    try:
        with torch.inference_mode():
            model.fuse(_encoded_alone(model, unit))
    finally:
        bridge.attention = kept
    assert model.config.bridge.attn_top_k is None
    spreads = []
    for q, k, mask in calls:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [1, H, Q, N]
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        logp = torch.log_softmax(scores, dim=-1)
        entropy = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)  # [1, H, Q]
        spreads.append(float(entropy.mean()))
    assert len(spreads) == model.config.bridge.n_layers
    return spreads


def assert_routing_is_the_routers(decision: Decision, oracle: dict[int, tuple[list, list]], model) -> None:
    moe = model.config.bridge.moe
    path = decision.routing
    assert isinstance(path, RoutingPath)
    assert (path.n_experts, path.top_k) == (moe.n_experts, moe.top_k)
    assert [x.layer for x in path.layers] == sorted(oracle)
    for layer in path.layers:
        experts, weights = oracle[layer.layer]
        assert [list(row) for row in layer.experts] == experts, (decision.unit_id, layer.layer)
        assert len(layer.weights) == model.config.bridge.n_queries
        for got_row, want_row in zip(layer.weights, weights, strict=True):
            for got, want in zip(got_row, want_row, strict=True):
                assert abs(got - want) <= WEIGHT_TOLERANCE, (decision.unit_id, layer.layer, got, want)
                assert round(got, ROUTING_WEIGHT_DECIMALS) == got  # rounded as documented


def validate(routing_field) -> None:
    jsonschema.Draft202012Validator.check_schema(ROUTING_SCHEMA)
    jsonschema.Draft202012Validator(ROUTING_SCHEMA).validate(routing_field)


@pytest.fixture(scope="module")
def serving(serving_store) -> ServingModel:
    return load_serving_model(ModelStore(serving_store), None, torch.device("cpu"))


def _units(unit_factory, n: int, seed: int, start: int = 0) -> list:
    rng = np.random.default_rng(seed)
    units = [unit_factory(i, rng) for i in range(start, start + n)]
    units[1] = units[1].without("vibration")  # grand coalition of two modalities
    units[2] = units[2].without("vision").without("temperature")  # of one
    return units


# ------------------------------------------------------------------------------------ scoring, no broker
def test_the_routing_path_of_each_decision_is_what_the_router_picks_for_the_unit_fused_alone(serving, unit_factory):
    units = _units(unit_factory, 10, seed=71)
    result = score_units(serving, _joined(units))
    model = serving.model
    for scored, unit in zip(result.scored, units, strict=True):
        assert scored.decision is not None and scored.decision.present == unit.present
        assert_routing_is_the_routers(scored.decision, router_oracle(model, scored), model)
        np.testing.assert_allclose(scored.attention_spread, spread_oracle(model, scored), rtol=0,
                                   atol=SPREAD_TOLERANCE)
        # the unit encoded alone too: the stream's batched preprocessing and encoder give it the same path
        assert_routing_is_the_routers(scored.decision, router_oracle(model, unit), model)
    # one path per unit, not one per batch: the units' paths differ
    assert len({s.decision.routing for s in result.scored}) > 1


def test_the_routing_field_is_schema_valid_and_survives_the_wire_codec(serving, unit_factory):
    units = _units(unit_factory, 6, seed=72)
    for scored in score_units(serving, _joined(units)).scored:
        decision = scored.decision
        event = json.loads(decision.to_json())
        validate(event["data"]["routing"])
        again = Decision.from_json(decision.to_json())
        assert again.routing == decision.routing and again.id == decision.id
        assert again.to_json() == decision.to_json()
        moe = serving.model.config.bridge.moe
        for layer in event["data"]["routing"]["layers"]:
            # each query's gate weights are renormalised (times route_scale), each off by at most 5e-5
            for row in layer["weights"]:
                assert sum(row) == pytest.approx(moe.route_scale, abs=moe.top_k * 0.5e-4 + 1e-9)


def test_decisions_without_routing_still_decode_and_malformed_routing_is_refused(serving, unit_factory):
    decision = score_units(serving, _joined(_units(unit_factory, 3, seed=73))).scored[0].decision
    event = json.loads(decision.to_json())
    older = json.loads(decision.to_json())
    del older["data"]["routing"]  # a producer from before the field existed
    assert Decision.from_json(json.dumps(older).encode()).routing is None
    nulled = json.loads(decision.to_json())
    nulled["data"]["routing"] = None  # a model without a sparse MoE
    assert Decision.from_json(json.dumps(nulled).encode()).routing is None
    validate(None)

    routing = event["data"]["routing"]
    layer = routing["layers"][0]
    bad = {
        "unknown key": {**routing, "extra": 1},
        "repeated expert": {**routing, "layers": [{**layer, "experts": [[0, 0]] + layer["experts"][1:]}]},
        "negative weight": {**routing, "layers": [{**layer, "weights": [[-0.1, 1.1]] + layer["weights"][1:]}]},
        "missing weights": {**routing, "layers": [{"layer": 0, "experts": layer["experts"]}]},
    }
    beyond = {**routing, "layers": [{**layer, "experts": [[0, routing["n_experts"]]] + layer["experts"][1:]}]}
    short = {**routing, "layers": [{**layer, "weights": layer["weights"][1:]}]}
    for name, value in {**bad, "expert beyond E": beyond, "weights of fewer queries": short}.items():
        if name in bad:  # what the JSON schema alone can say
            with pytest.raises(jsonschema.ValidationError):
                validate(value)
        forged = json.loads(decision.to_json())
        forged["data"]["routing"] = value
        with pytest.raises(RecordError) as info:
            Decision.from_json(json.dumps(forged).encode())
        assert info.value.reason == Reason.BAD_DECISION, name


def test_a_model_without_a_sparse_moe_decides_with_routing_null(serving, unit_factory):
    config = serving.model.config
    dense = InspectionModel(replace(config, bridge=replace(config.bridge, moe=None)), pretrained_weights=False)
    units = _units(unit_factory, 4, seed=74)
    dense.fit_normalisation(dense.batch(units))
    dense.eval()
    with torch.no_grad():
        dense.thresholds.fill_(0.5)
    result = score_units(ServingModel(dense, "m-dense", "t-dense", torch.device("cpu")), _joined(units))
    for scored, unit in zip(result.scored, units, strict=True):
        assert scored.decision.present == unit.present and scored.decision.routing is None
        event = json.loads(scored.decision.to_json())
        assert event["data"]["routing"] is None
        validate(event["data"]["routing"])
        assert Decision.from_json(scored.decision.to_json()).routing is None
        np.testing.assert_allclose(scored.attention_spread, spread_oracle(dense, scored), rtol=0,
                                   atol=SPREAD_TOLERANCE)
    assert result.router_stats == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_routing_path_is_the_routers_choice_through_the_triton_kernels(serving_store, unit_factory):
    from kernels._launch import use_triton

    cuda = load_serving_model(ModelStore(serving_store), None, torch.device("cuda"), precision="fp32")
    assert use_triton(next(cuda.model.parameters()))  # routing kernel, grouped experts, fused attention
    units = _units(unit_factory, 12, seed=76)
    result = score_units(cuda, _joined(units))
    for scored, unit in zip(result.scored, units, strict=True):
        assert scored.decision.present == unit.present
        assert_routing_is_the_routers(scored.decision, router_oracle(cuda.model, scored), cuda.model)
        validate(json.loads(scored.decision.to_json())["data"]["routing"])
        np.testing.assert_allclose(scored.attention_spread, spread_oracle(cuda.model, scored), rtol=0,
                                   atol=SPREAD_TOLERANCE)


# ---------------------------------------------------------------------------- the stream and re-scoring
def _wait(condition, timeout_s: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_stream_decisions_carry_the_routers_path_rescoring_reproduces_it_and_metrics_show_spread(
        broker, topics, serving_store, serving, unit_factory, service_config, run_service, publish, read_topic,
        parse_decisions, tmp_path):
    units = _units(unit_factory, 24, seed=75)
    archive = tmp_path / "archive"
    config = service_config(archive={"path": str(archive), "rotate_units": 10, "rotate_s": 60})
    with run_service(config, broker.bootstrap) as service:
        publish(units, topics)
        _wait(lambda: service.stats.decisions_acked == len(units), what="decisions")
        with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
    records = read_topic(topics.decisions, len(units))
    stream = {d.unit_id: d for d in parse_decisions(records)}
    assert set(stream) == {u.unit_id for u in units}
    model = serving.model

    # every decision read back from Kafka: schema-valid, and the router's own choice for the unit alone
    for record in records:
        validate(json.loads(record.value)["data"]["routing"])
    for unit in units:
        assert_routing_is_the_routers(stream[unit.unit_id], router_oracle(model, unit), model)

    # the gauge: one series per bridge layer, the mean over the last batch's units of a value each unit has in
    # [0, log(tokens it shows)]
    spread = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("inspection_attention_spread{")}
    assert set(spread) == {str(i) for i in range(model.config.bridge.n_layers)}
    n_tokens = sum(enc.n_tokens for enc in model.encoders.values())
    assert all(0.0 < v <= math.log(n_tokens) + 1e-6 for v in spread.values()), spread
    per_unit = [spread_oracle(model, u) for u in units]
    assert all(min(row[i] for row in per_unit) - SPREAD_TOLERANCE <= v <= max(row[i] for row in per_unit)
               + SPREAD_TOLERANCE for i, v in ((int(k), v) for k, v in spread.items()))

    # re-scoring the archive with the same model reproduces every routing path exactly
    result = rescore_local(archive, serving, tmp_path / "out", batch_size=5, progress=False)
    assert result.decided == len(units)
    again = {d.unit_id: d for d in read_decisions(tmp_path / "out")}
    for unit_id, decision in stream.items():
        assert again[unit_id].id == decision.id
        assert again[unit_id].routing == decision.routing, unit_id

    # the audit compares the routing path too, and notices one that is not the model's
    jsonl = tmp_path / "decisions.jsonl"
    jsonl.write_text("".join(r.value.decode() + "\n" for r in records))
    target = stream[units[1].unit_id]
    checked = audit(target.id, archive, serving_store, jsonl)
    assert checked.matches and checked.routing_matches is True and checked.to_dict()["routing_matches"] is True
    events = [json.loads(r.value) for r in records]
    forged = next(e for e in events if e["id"] == target.id)
    first = forged["data"]["routing"]["layers"][0]
    first["experts"][0] = first["experts"][0][::-1]  # query 0's experts in the wrong order: another path
    (tmp_path / "forged.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    forged_audit = audit(target.id, archive, serving_store, tmp_path / "forged.jsonl")
    assert forged_audit.routing_matches is False and forged_audit.matches is False
    assert abs(forged_audit.score_difference) <= 1e-5  # the score alone would have passed
