"""Scoring joined units: the model from the store, one batched forward with exact modality explanations.

B units · M modalities · R stacked coalition rows (Σ_b 2^{n_b}) · N tokens · D width

:func:`load_serving_model` loads a version from a :class:`~inspection.store.ModelStore` (hash-verified) and
refuses an uncalibrated one. :func:`score_units` turns a micro-batch of joined units into decisions:

1. the readings are preprocessed together (:func:`inspection.batchprep.prepare_readings`): vibration
   waveforms of one sample rate and length as one batch of torch ops on the model's device, images decoded
   and resized per reading with OpenCV (side by side on a thread pool when one is given: OpenCV releases the
   GIL); a reading the model's preprocessing rejects is dead-lettered and the unit goes on without it (it is
   then listed as missing);
2. one ``encode`` over the batch and one ``fuse`` over every coalition of every unit's present modalities
   (:func:`explain.shapley.coalition_masks`; 8 rows per unit), reusing the encoder tokens;
3. the grand coalition's row of each unit is the unit's own forward pass: its defect probability is the
   decision's score (the same number as ``model(model.batch([unit])).score``), its class and per-modality
   heads give the class and modality scores; the other rows give the exact Shapley values and pairwise
   interactions (:func:`explain.shapley.attribution_from_values`).

If the batched forward fails, each unit is scored alone, so one unit the model cannot take never costs the
decisions of the others; a unit that fails alone is dead-lettered.

:func:`warm_up` runs the same forward on synthetic inputs before a model takes traffic, so the one-time costs
of a GPU (Triton kernel compilation, cuDNN algorithm search: seconds) are not paid by the first units.

**Per-line adapters** (:mod:`inspection.adapters`): :func:`load_serving_model` also loads the promoted LoRA
adapter of every line of the version (hash-checked, refused when trained on another base). A micro-batch in
which some unit's line has one runs as one forward of the adapted copy, each row with its line's adapter (peft's
mixed-adapter batches; the base for other lines); an adapted unit is compared with its line's threshold and its
decision's ``model_version`` reads ``<version>+<line>:<adapter version>``, its ``threshold_version`` the
adapter's calibration. Without adapters nothing changes.

A **normal-only** version (card ``mode: normal-only``, :mod:`inspection.normal_only`) is served by the same
functions through separate helpers (``_load_normal_only``, ``_score_normal_only``): the detector's features of
each reading (a reading its preprocessing rejects is dead-lettered, as above), its per-modality standardised
deviations, and the decision's score is the **raw fused deviation** (the largest standardised deviation, a z
value, not a probability) against the calibrated threshold on the same scale. The class of a unit over the
threshold is the card's ``defect_class`` (default ``anomaly``). The modality attribution is computed like the
supervised one, by :func:`explain.shapley.attribution_from_values` over every coalition of the present
modalities, where a coalition's value is the detector's fused score on those modalities only (the largest of
their deviations) and the empty coalition's is the baseline deviation 0 (the median held-out normal unit);
the probability-scale values use the normal CDF of the deviation. Per-modality scores are the deviations.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from explain.shapley import (
    CoalitionValues,
    all_coalitions,
    attribution_from_values,
    coalition_row,
    stack_coalitions,
)
from inspection.adapters import LineAdapters, load_line_adapters
from inspection.batchprep import prepare_readings
from inspection.errors import ConfigError, NotCalibratedError, StoreError
from inspection.model import DEFAULT_LINE, Batch, InspectionModel, ModelConfig
from inspection.normal_only import MODE as NORMAL_ONLY
from inspection.normal_only import NormalOnlyDetector, coalition_scores, deviation_probability
from inspection.records import MODALITIES, Decision, InputCoordinate, RoutingPath, Unit
from inspection.store import ModelStore
from services.dlq import PREPROCESS_FAILED, SCORE_FAILED, DeadLetter, dead_letter_reading
from services.join import JoinedUnit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """A loaded, calibrated model and what decisions say about it.

    Attributes:
        model: the model, in eval mode, on ``device``; None for a normal-only version.
        version: the store's version id.
        threshold_version: the calibration's version (from the card, else a hash of the thresholds).
        device: where it runs.
        precision: ``fp32`` or ``bf16`` (the scoring forward under bf16 autocast; scores come out float32).
        batch_sizes: the sizes a forward runs at: a batch is padded (its last unit repeated, the copies'
            outputs dropped) to the smallest size that holds it. Empty: every batch runs at its own size. On
            CUDA the first forward at a new batch size costs seconds (work done once per input shape),
            so the service warms a few sizes up and pads to them (:func:`batch_buckets`).
        normal_only: the detector of a normal-only version (then ``model`` is None), else None.
    """

    model: InspectionModel | None
    version: str
    threshold_version: str
    device: torch.device
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = ()
    normal_only: NormalOnlyServing | None = None
    #: the promoted per-line LoRA adapters of this version (:mod:`inspection.adapters`); None: every line is
    #: scored by the base model
    adapters: LineAdapters | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        if self.normal_only is not None:
            return self.normal_only.detector.modalities
        return self.model.config.modalities

    def autocast(self):
        """The scoring forward's autocast context (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: ``cuda`` asked for without a CUDA device, or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is cuda but no CUDA device is available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"model.device must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


def load_serving_model(store: ModelStore, version: str | None, device: torch.device,
                       precision: str = "fp32", adapters: Mapping[str, str] | None = None) -> ServingModel:
    """Load a version (``None``: the promoted one), verify it and put it on ``device``.

    ``precision``: ``fp32``, ``bf16`` (autocast), or ``auto`` (bf16 on CUDA, fp32 elsewhere). On CUDA the
    image backbone runs channels-last (NHWC), which its convolutions are faster in.

    ``adapters``: line -> the adapter version to serve for it, exactly these (``{}``: the base for every line);
    None: the promoted adapter of every line (:func:`inspection.adapters.load_line_adapters`).

    A normal-only version (card ``mode: normal-only``) loads as its detector (see the module docstring); it
    always runs in fp32.

    Raises:
        StoreError: nothing promoted, an unknown version, a tampered artifact or a card without a model config.
        NotCalibratedError: the version has no decision thresholds.
    """
    entry = store.get(version) if version is not None else store.promoted()
    if entry is None:
        raise StoreError(f"no version of the model store {store.root} is promoted; train and calibrate one "
                         "(`inspection train`, `inspection calibrate`) or promote one (`inspection models promote`)")
    if entry.card.get("mode") == NORMAL_ONLY:
        return _load_normal_only(store, entry, device, precision)
    state, card = store.load(entry.version, device="cpu")
    if "model_config" not in card:
        raise StoreError(f"version {entry.version} in {store.root} has no model_config in its card; it was not "
                         "saved by `inspection train`")
    try:
        model = InspectionModel.from_state(ModelConfig.from_dict(card["model_config"]), state)
    except (ConfigError, RuntimeError, KeyError, TypeError) as exc:
        raise StoreError(f"version {entry.version} in {store.root} cannot be rebuilt: {exc}") from exc
    if not model.calibrated:
        raise NotCalibratedError(
            f"version {entry.version} in {store.root} has no calibrated thresholds; run `inspection calibrate` "
            "and serve the calibrated version"
        )
    model.eval().to(device)
    if device.type == "cuda" and "vision" in model.encoders:
        model.encoders["vision"].to(memory_format=torch.channels_last)
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16; got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    threshold_version = card.get("threshold_version") or _thresholds_digest(model)
    adapters = load_line_adapters(store, entry, model, adapters)  # hash-checked, trained on this base
    return ServingModel(model, entry.version, str(threshold_version), device, precision, adapters=adapters)


def _thresholds_digest(model: InspectionModel) -> str:
    payload = repr((model.config.lines, model.thresholds.tolist())).encode()
    return "t-" + hashlib.sha256(payload).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Scored:
    """What scoring made of one joined unit.

    Attributes:
        joined: the unit as the join released it.
        decision: the decision, or None when nothing of the unit could be scored.
        dead: readings dead-lettered at the score stage (the decision, if any, is made without them).
        modality_scores: per scored modality, the modality head's defect probability (drift input).
        attribution: the decision's modality attribution (level 1).
        encoded: the encoder tokens of the forward pass that scored the unit (shared by its batch), and
        row: the unit's row in them; explanation reports reuse them instead of encoding the unit again.
        attention_spread: per bridge layer, the mean entropy (nats) of the fusion queries' attention weights in
            the unit's own forward pass (:func:`fusion.bridge.attention_entropy`); a health metric.
    """

    joined: JoinedUnit
    decision: Decision | None = None
    dead: list[DeadLetter] = field(default_factory=list)
    modality_scores: dict[str, float] = field(default_factory=dict)
    attribution: Any = None
    encoded: Any = None
    row: int = -1
    attention_spread: list[float] = field(default_factory=list)

    @property
    def decision_coordinates(self) -> tuple[InputCoordinate, ...]:
        return self.decision.inputs if self.decision is not None else ()


@dataclass
class BatchResult:
    """One micro-batch: per-unit results, the router statistics of its forward pass, and its timing.
    ``forward_rows``: the units the forward ran on, padding included (``forward_units`` without it)."""

    scored: list[Scored]
    router_stats: list[Any] = field(default_factory=list)
    forward_units: int = 0
    forward_rows: int = 0
    seconds: float = 0.0
    prepare_seconds: float = 0.0


def _dead(joined: JoinedUnit, modality: str, reason: str, detail: str) -> DeadLetter:
    return dead_letter_reading(getattr(joined.unit, modality), joined.inputs[modality], stage="score",
                               reason=reason, detail=detail)


def score_units(serving: ServingModel, units: Sequence[JoinedUnit], *,
                clock=time.monotonic, executor: Executor | None = None) -> BatchResult:
    """Score a micro-batch of joined units (see the module docstring).

    Args:
        serving: the model.
        units: joined units, any mix of present modalities.
        clock: monotonic clock for the timings.
        executor: run the per-reading part of the preprocessing (image decode and resize) on it, side by side
            (e.g. a ``ThreadPoolExecutor``); None runs it in the calling thread. The results are the same
            either way.

    Returns:
        One :class:`Scored` per unit, in order; ``seconds`` the whole call, ``prepare_seconds`` its
        preprocessing.
    """
    if serving.normal_only is not None:
        return _score_normal_only(serving, units, clock=clock, executor=executor)
    t0 = clock()
    results = [Scored(j) for j in units]
    readings = [{m: getattr(res.joined.unit, m) for m in serving.modalities} for res in results]
    prepared = prepare_readings(serving.model, readings, serving.device,
                                map_fn=executor.map if executor is not None and len(results) > 1 else None)
    for b, m, detail in prepared.failures:
        results[b].dead.append(_dead(results[b].joined, m, PREPROCESS_FAILED, detail))
    prepare_seconds = clock() - t0
    live = prepared.present.any(dim=1).nonzero().flatten().tolist()
    for i, res in enumerate(results):
        if i not in live and not res.dead:  # nothing the model reads: every reading of the unit is dead
            for m in res.joined.unit.present:
                res.dead.append(_dead(res.joined, m, SCORE_FAILED,
                                      f"unit has none of the modalities the model reads ({serving.modalities})"))
    out = BatchResult(results)
    if live:
        model = serving.model
        lines = torch.tensor([model.line_slot(res.joined.unit.line_id) for res in results], dtype=torch.long)
        batch = Batch(prepared.inputs, prepared.present, lines).to(serving.device)
        rows = live + [live[-1]] * (padded_size(len(live), serving.batch_sizes) - len(live))
        try:
            out.router_stats = _forward(serving, [results[i] for i in live], batch.select(rows))
            out.forward_units, out.forward_rows = len(live), len(rows)
        except Exception as exc:  # noqa: BLE001 - isolate the unit the model cannot take
            log.warning("batched forward of %d units failed (%s: %s); scoring them one by one",
                        len(live), type(exc).__name__, exc)
            for i in live:
                try:
                    out.router_stats = _forward(serving, [results[i]], batch.select([i]))
                    out.forward_units += 1
                    out.forward_rows += 1
                except Exception as one:  # noqa: BLE001
                    res = results[i]
                    for m in (m for m, on in zip(MODALITIES, prepared.present[i].tolist(), strict=True) if on):
                        res.dead.append(_dead(res.joined, m, SCORE_FAILED, f"{type(one).__name__}: {one}"))
    out.seconds = clock() - t0
    out.prepare_seconds = prepare_seconds
    return out


def _synthetic_readings(model: InspectionModel, seed: int = 0) -> dict[str, _Synthetic]:
    """One unit's readings for every modality the model reads, random, of the shapes and rates its
    preprocessing takes (noise: no reading of a real unit is needed)."""
    from inspection.preprocess import (
        WAVEFORM_MIN_RATE_HZ,
        SeriesPreprocess,
        VisionPreprocess,
        WaveformPreprocess,
    )

    rng = np.random.default_rng(seed)
    out: dict[str, _Synthetic] = {}
    for m in model.config.modalities:
        pre = model.encoders[m].config.preprocess
        if isinstance(pre, VisionPreprocess):
            side = pre.image_size
            out[m] = _Synthetic(image=rng.integers(0, 256, (side, side), dtype=np.uint8))
        elif isinstance(pre, WaveformPreprocess):
            rate = max(WAVEFORM_MIN_RATE_HZ, 2.5 * pre.f_max_hz, pre.wave_rate_hz)
            n = max(256, int(np.ceil(rate * pre.wave_len / pre.wave_rate_hz)) + 1)
            out[m] = _Synthetic(values=rng.standard_normal((pre.channels, n)), sample_rate_hz=rate)
        elif isinstance(pre, SeriesPreprocess):
            out[m] = _Synthetic(values=rng.standard_normal((pre.channels, pre.samples)), sample_rate_hz=1.0)
        else:
            raise ConfigError(f"cannot make a warm-up input for the {m} encoder's {type(pre).__name__}")
    return out


@dataclass(frozen=True)
class _Synthetic:
    """The attributes of a reading that the encoders' ``prepare`` read."""

    image: np.ndarray | None = None
    values: np.ndarray | None = None
    sample_rate_hz: float = 0.0


@torch.inference_mode()
def warm_up(serving: ServingModel, batch_sizes: Sequence[int] = (32, 1)) -> float:
    """Run the scoring forward (encode + every coalition) on synthetic units of every modality, once per batch
    size, so one-time compilation happens now rather than on the first real batch.

    Args:
        serving: the model.
        batch_sizes: units per warm-up forward; the service passes its ``max_batch`` and 1, which give the
            kernels the row counts they are specialised on (multiples of 16 or not).

    Returns:
        Seconds it took.

    Raises:
        ConfigError: an encoder whose preprocessing has no synthetic input.
    """
    if serving.normal_only is not None:
        return _warm_up_normal_only(serving, batch_sizes)
    t0 = time.monotonic()
    model = serving.model
    example = _synthetic_readings(model)
    for n in batch_sizes:
        prepared = prepare_readings(model, [example] * n, serving.device)
        if prepared.failures:
            raise ConfigError(f"the warm-up input does not fit the model: {prepared.failures[0][2]}")
        lines = torch.full((n,), model.line_slot(DEFAULT_LINE), dtype=torch.long)
        batch = Batch(prepared.inputs, prepared.present, lines).to(serving.device)
        with serving.autocast():
            stacked, masks = stack_coalitions(model.encode(batch))
            model.fuse(stacked, masks)
    if serving.device.type == "cuda":
        torch.cuda.synchronize(serving.device)
    return time.monotonic() - t0


@torch.inference_mode()
def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the service warms up, tunes over and pads to: 1, 2, 4, ... and ``max_batch`` itself.
    Padding to them wastes less than half of a forward, and a handful of sizes is all the device ever sees."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1; got {max_batch}")
    return tuple(sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)}))


def padded_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` units; ``n`` itself when none does (or ``sizes`` is empty)."""
    return min((s for s in sizes if s >= n), default=n)


def tune_batch_size(serving: ServingModel, max_batch: int, *, repeats: int = 3, share: float = 0.95,
                    clock=time.perf_counter) -> tuple[int, dict[int, float]]:
    """Measure the scoring path (batched preprocessing, encode, every coalition) on synthetic units at batch
    sizes 1, 2, 4, ... up to ``max_batch`` and return the smallest size within ``share`` of the best
    throughput, with the units/s of every size measured. A larger ``max_batch`` then never makes the service
    slower than a smaller one would: past the device's saturation point the chosen size stops growing.

    Raises:
        ConfigError: ``max_batch`` < 1, or an encoder whose preprocessing has no synthetic input.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1; got {max_batch}")
    if serving.normal_only is not None:
        return _tune_normal_only(serving, max_batch, repeats=repeats, share=share, clock=clock)
    model = serving.model
    example = _synthetic_readings(model)
    sizes = batch_buckets(max_batch)
    rates: dict[int, float] = {}
    for n in sizes:
        lines = torch.full((n,), model.line_slot(DEFAULT_LINE), dtype=torch.long)

        def once(n=n, lines=lines) -> None:
            prepared = prepare_readings(model, [example] * n, serving.device)
            batch = Batch(prepared.inputs, prepared.present, lines).to(serving.device)
            with serving.autocast():
                stacked, masks = stack_coalitions(model.encode(batch))
                model.fuse(stacked, masks).defect_logit.float().cpu()  # the decisions' one device-to-host copy

        once()
        times = []
        for _ in range(repeats):
            t0 = clock()
            once()
            times.append(clock() - t0)
        rates[n] = n / sorted(times)[len(times) // 2]
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= share * best), rates


@torch.inference_mode()
def _forward(serving: ServingModel, results: list[Scored], batch: Batch) -> list[Any]:
    """One encode and one stacked fuse for the given units' batch rows; fills their decisions. Returns router
    stats."""
    model = serving.model
    thresholds = model.threshold_for(batch.line_index).float().cpu().tolist()  # [B]
    adapted = _adapter_rows(serving, results, batch)  # each row's line adapter; None: the base for every row
    if adapted is not None:
        model, thresholds = adapted.model, adapted.thresholds(thresholds)
    present_rows = batch.present.cpu().tolist()
    # each unit's own forward pass is its grand coalition's row: only those rows are traced (routing path and
    # attention spread), not every coalition's
    grand = [coalition_row(b, frozenset(m for m, on in zip(MODALITIES, present_rows[b], strict=True) if on))
             for b in range(len(results))]
    with serving.autocast(), contextlib.nullcontext() if adapted is None else adapted:
        encoded = model.encode(batch)  # tokens [B, N, D]
        stacked, masks = stack_coalitions(encoded)  # [R, N, D], [R, M]
        out = model.fuse(stacked, masks, trace=True,
                         trace_rows=torch.tensor(grand, dtype=torch.long, device=stacked.tokens.device))
    logits = out.defect_logit.float()  # [R]
    probs = torch.sigmoid(logits).cpu()  # [R], as ModelOutput.score
    logit_list = logits.double().cpu().tolist()
    prob64 = torch.sigmoid(logits.double()).cpu().tolist()
    class_logits = out.class_logits.float().cpu()  # [R, K]
    modality_probs = torch.sigmoid(out.modality_logits.float()).cpu()  # [R, M]
    class_names = model.config.class_names
    decided_at = datetime.now(UTC)
    routing = model.routing_paths(out, range(len(results)))
    spread = torch.stack([t.attention_spread for t in out.trace], dim=1).cpu().tolist()  # [B, layers]
    for b, res in enumerate(results):
        players = tuple(m for m, on in zip(MODALITIES, present_rows[b], strict=True) if on)
        rows = {c: coalition_row(b, c) for c in all_coalitions(players)}
        full = rows[frozenset(players)]
        values = CoalitionValues(players, {c: logit_list[r] for c, r in rows.items()},
                                 {c: prob64[r] for c, r in rows.items()})
        attribution = attribution_from_values(res.joined.unit.unit_id, values)
        res.attribution, res.encoded, res.row = attribution, encoded, b
        score = float(probs[full])
        threshold = float(thresholds[b])
        is_defect = score >= threshold
        defect_class = class_names[1 + int(class_logits[full, 1:].argmax())] if is_defect else class_names[0]
        res.modality_scores = {m: float(modality_probs[full, MODALITIES.index(m)]) for m in players}
        res.attention_spread = spread[b]
        res.decision = _decision(res, serving, players, score, threshold, defect_class, attribution,
                                 decided_at, routing[b])
        if adapted is not None:  # the adapter's version and calibration name the decision
            res.decision = adapted.stamp(b, res.decision)
    return list(out.router_stats)


def _adapter_rows(serving: ServingModel, results: list[Scored], batch: Batch):
    """The line adapters of a forward's batch rows (padding rows repeat the last unit's line), or None when no
    row's line has one: :meth:`inspection.adapters.LineAdapters.rows`."""
    if serving.adapters is None:
        return None
    lines = [res.joined.unit.line_id for res in results]
    return serving.adapters.rows(lines + lines[-1:] * (len(batch) - len(lines)), batch.present)


def _decision(res: Scored, serving: ServingModel, players: tuple[str, ...], score: float, threshold: float,
              defect_class: str, attribution, decided_at: datetime, routing: RoutingPath | None = None) -> Decision:
    joined = res.joined
    unit: Unit = joined.unit
    inputs = tuple(joined.inputs[m] for m in players)
    # missing: what the join found missing, plus readings the preprocessing rejected (dead-lettered above)
    absent = set(joined.missing) | (set(unit.present) - set(players))
    missing = tuple(m for m in MODALITIES if m in absent)
    attributions = {
        "modality": dict(attribution.phi),
        "modality_probability": dict(attribution.phi_prob),
        "interactions": dict(attribution.interactions),
        "baseline_logit": attribution.value_empty,
        "efficiency_gap": attribution.efficiency_gap,
        "coalitions": attribution.coalitions,
        "method": attribution.method,
    }
    decision = Decision(
        unit_id=unit.unit_id,
        line_id=unit.line_id,
        decision="defect" if score >= threshold else "ok",
        score=score,
        threshold=threshold,
        defect_class=defect_class,
        modality_scores=res.modality_scores,
        present=players,
        missing=missing,
        attributions=attributions,
        model_version=serving.version,
        threshold_version=serving.threshold_version,
        inputs=inputs,
        event_time=unit.event_time,
        decided_at=decided_at,
        latency_ms=0.0,
        report_url=None,
        routing=routing,
    )
    return decision


def _with(decision: Decision, **changes) -> Decision:
    from dataclasses import replace

    return replace(decision, **changes)


def with_latency(decision: Decision, latency_ms: float) -> Decision:
    """The same decision with its latency set (the id does not depend on it)."""
    return _with(decision, latency_ms=max(0.0, float(latency_ms)))


# ------------------------------------------------------------------------------------------- normal-only
@dataclass(frozen=True)
class NormalOnlyServing:
    """A served normal-only version: its calibrated detector, and the class a unit over its threshold gets."""

    detector: NormalOnlyDetector
    defect_class: str


def _load_normal_only(store: ModelStore, entry, device: torch.device, precision: str) -> ServingModel:
    """A normal-only version of ``store`` as a :class:`ServingModel` (``model`` None), its detector on ``device``.

    Raises:
        StoreError: a tampered artifact, or one that does not hold a complete detector.
        NotCalibratedError: the detector has no threshold.
        ConfigError: an unknown ``precision``.
    """
    from inspection.normal_only import DEFECT_CLASS

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16; got {precision!r}")
    try:
        detector, card = NormalOnlyDetector.load(store, entry.version)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"version {entry.version} in {store.root} cannot be rebuilt: {exc}") from exc
    if not detector.calibrated:
        raise NotCalibratedError(f"version {entry.version} in {store.root} has no calibrated threshold; run "
                                 "`inspection calibrate --name NAME --target-far F` and serve the calibrated version")
    detector.to(device)
    threshold_version = str(card.get("threshold_version") or "")
    defect_class = str(card.get("defect_class") or DEFECT_CLASS)
    return ServingModel(None, entry.version, threshold_version, device, "fp32",
                        normal_only=NormalOnlyServing(detector, defect_class))


def _score_normal_only(serving: ServingModel, units: Sequence[JoinedUnit], *, clock=time.monotonic,
                       executor: Executor | None = None) -> BatchResult:
    """:func:`score_units` of a normal-only version (see the module docstring); ``prepare_seconds`` is the
    feature extraction (preprocessing and, for images, the backbone)."""
    t0 = clock()
    detector = serving.normal_only.detector
    results = [Scored(j) for j in units]
    map_fn = executor.map if executor is not None and len(results) > 1 else map
    feats, failures = detector.extract([res.joined.unit for res in results], map_fn)
    for b, m, detail in failures:
        results[b].dead.append(_dead(results[b].joined, m, PREPROCESS_FAILED, detail))
    prepare_seconds = clock() - t0
    live = sorted({int(b) for rows, _ in feats.values() for b in rows})
    for i, res in enumerate(results):
        if i not in live and not res.dead:  # nothing the detector reads
            for m in res.joined.unit.present:
                res.dead.append(_dead(res.joined, m, SCORE_FAILED,
                                      f"unit has none of the modalities the model reads ({serving.modalities})"))
    out = BatchResult(results)
    if live:
        try:
            _decide_normal_only(serving, [results[b] for b in live], _rows(feats, live))
            out.forward_units = out.forward_rows = len(live)
        except Exception as exc:  # noqa: BLE001 - isolate the unit the detector cannot take
            log.warning("normal-only scoring of %d units failed (%s: %s); scoring them one by one",
                        len(live), type(exc).__name__, exc)
            for b in live:
                try:
                    _decide_normal_only(serving, [results[b]], _rows(feats, [b]))
                    out.forward_units += 1
                    out.forward_rows += 1
                except Exception as one:  # noqa: BLE001
                    res = results[b]
                    for m in (m for m in MODALITIES if m in feats and b in feats[m][0]):
                        res.dead.append(_dead(res.joined, m, SCORE_FAILED, f"{type(one).__name__}: {one}"))
    out.seconds = clock() - t0
    out.prepare_seconds = prepare_seconds
    return out


def _rows(feats: dict[str, tuple[np.ndarray, np.ndarray]], keep: Sequence[int]) -> dict:
    """The features of units ``keep`` (batch indices), re-indexed ``0..len(keep)-1`` in that order."""
    pos = {b: k for k, b in enumerate(keep)}
    out = {}
    for m, (rows, x) in feats.items():
        sel = [j for j, b in enumerate(rows.tolist()) if b in pos]
        if sel:
            out[m] = (np.array([pos[rows[j]] for j in sel], dtype=np.int64), x[sel])
    return out


def _decide_normal_only(serving: ServingModel, results: list[Scored], feats: dict) -> None:
    """Fill the decisions of ``results`` (one per unit of ``feats``): score, class, exact modality attribution."""
    served = serving.normal_only
    detector = served.detector
    scores = detector.score_features(feats, len(results), [r.joined.unit.unit_id for r in results])
    decided_at = datetime.now(UTC)
    for k, res in enumerate(results):
        deviations = {m: float(scores.deviations[k, i]) for i, m in enumerate(MODALITIES)
                      if np.isfinite(scores.deviations[k, i])}
        players = tuple(deviations)  # MODALITIES order
        game = coalition_scores(deviations)  # coalition -> the fused deviation of its modalities
        values = CoalitionValues(players, dict(game), {c: deviation_probability(v) for c, v in game.items()})
        attribution = attribution_from_values(res.joined.unit.unit_id, values)
        score = game[frozenset(players)]  # the unit's fused deviation, scores.score[k]
        threshold = float(scores.threshold)
        defect_class = served.defect_class if score >= threshold else "ok"
        res.attribution, res.modality_scores = attribution, dict(deviations)
        decision = _decision(res, serving, players, score, threshold, defect_class, attribution, decided_at)
        res.decision = _with(decision, attributions={**decision.attributions, "mode": NORMAL_ONLY,
                                                      "scale": "deviation"})


def _normal_only_example(serving: ServingModel) -> SimpleNamespace:
    """One synthetic unit with every modality the detector reads (see :func:`_synthetic_readings`)."""
    extractor = serving.normal_only.detector.extractor  # has .config.modalities and .encoders[m] as a model does
    return SimpleNamespace(**_synthetic_readings(extractor))


def _normal_only_pass(serving: ServingModel, example: SimpleNamespace, n: int) -> None:
    detector = serving.normal_only.detector
    feats, failures = detector.extract([example] * n)
    if failures:
        raise ConfigError(f"the warm-up input does not fit the detector: {failures[0][2]}")
    detector.score_features(feats, n)


def _warm_up_normal_only(serving: ServingModel, batch_sizes: Sequence[int]) -> float:
    """:func:`warm_up` of a normal-only version: the feature extraction and scoring once per batch size."""
    t0 = time.monotonic()
    example = _normal_only_example(serving)
    for n in batch_sizes:
        _normal_only_pass(serving, example, n)
    if serving.device.type == "cuda":
        torch.cuda.synchronize(serving.device)
    return time.monotonic() - t0


def _tune_normal_only(serving: ServingModel, max_batch: int, *, repeats: int, share: float,
                      clock) -> tuple[int, dict[int, float]]:
    """:func:`tune_batch_size` of a normal-only version, timing the feature extraction and scoring."""
    example = _normal_only_example(serving)
    rates: dict[int, float] = {}
    for n in batch_buckets(max_batch):
        _normal_only_pass(serving, example, n)
        times = []
        for _ in range(repeats):
            t0 = clock()
            _normal_only_pass(serving, example, n)
            times.append(clock() - t0)
        rates[n] = n / sorted(times)[len(times) // 2]
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= share * best), rates
