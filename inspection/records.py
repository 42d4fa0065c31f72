"""Typed, frozen records: readings of one unit, the unit itself, its ground-truth label and the decision.

Shapes: C channels · S samples · H height · W width.

Every record validates itself when built (ids, event time, dtype, rank, sizes, ranges) and raises
:class:`~inspection.errors.RecordError` with a stable reason code, so a record that exists is a record that
can be scored. Array payloads are stored as read-only C-contiguous copies: a record never aliases memory a
caller can still change.

Images are kept twice on purpose: ``data`` holds the encoded bytes exactly as they travel on the wire (so a
round trip through Kafka or Parquet is byte-identical, JPEG included), ``image`` the decoded pixels
(``[H, W]`` gray or ``[H, W, 3]`` RGB, uint8 or uint16).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import ClassVar, Literal

import numpy as np

from inspection.errors import Reason, RecordError

MODALITIES: tuple[str, ...] = ("vision", "vibration", "temperature")
Modality = Literal["vision", "vibration", "temperature"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_READING_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_SOURCE_RE = re.compile(r"^[\x21-\x7e]{1,512}$")

#: Physical units accepted per array modality (``ce_unit``). Values are kept as sent; preprocessing converts.
PHYSICAL_UNITS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"vibration": frozenset({"g", "m/s2"}), "temperature": frozenset({"degC", "K"})}
)
IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg")
MIN_IMAGE_SIDE = 8
#: The fastest sample rate a reading may claim (Hz). Anything above is a unit error (e.g. a period in ns).
MAX_SAMPLE_RATE_HZ = 1_000_000.0


def check_id(value: object, what: str, reason: Reason) -> str:
    """Validate a unit or line id: 1-128 chars of ``[A-Za-z0-9._:-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise RecordError(
            reason,
            f"{what} must be 1-128 characters of letters, digits, '.', '_', ':' or '-' starting with a letter "
            f"or digit; got {value!r}",
        )
    return value


def _check_event_time(value: object) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise RecordError(Reason.BAD_EVENT_TIME, f"event_time must be a timezone-aware datetime; got {value!r}")
    return value


def _readonly(array: np.ndarray) -> np.ndarray:
    out = np.array(array, copy=True, order="C")
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class _Envelope:
    """Fields every reading carries (the CloudEvents context attributes we use)."""

    unit_id: str
    line_id: str
    reading_id: str
    source: str
    event_time: datetime

    modality: ClassVar[str]

    def _check_envelope(self) -> None:
        check_id(self.unit_id, "unit_id", Reason.BAD_UNIT_ID)
        check_id(self.line_id, "line_id", Reason.BAD_LINE_ID)
        if not isinstance(self.reading_id, str) or not _READING_ID_RE.fullmatch(self.reading_id):
            raise RecordError(
                Reason.BAD_READING_ID, f"reading_id must be 1-200 printable ASCII characters; got {self.reading_id!r}"
            )
        if not isinstance(self.source, str) or not _SOURCE_RE.fullmatch(self.source):
            raise RecordError(
                Reason.BAD_SOURCE,
                f"source must be a URI-reference of 1-512 printable ASCII characters; got {self.source!r}",
            )
        _check_event_time(self.event_time)

    def _envelope_key(self) -> tuple:
        return (self.modality, self.unit_id, self.line_id, self.reading_id, self.source, self.event_time)


def sniff_image_type(data: bytes) -> str | None:
    """Return ``image/png`` or ``image/jpeg`` from the magic bytes, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return None


def encode_image(image: np.ndarray, content_type: str = "image/png", *, jpeg_quality: int = 95) -> bytes:
    """Encode ``[H, W]`` gray or ``[H, W, 3]`` RGB pixels (uint8, or uint16 for PNG) to PNG or JPEG bytes."""
    import cv2

    image = np.asarray(image)
    _check_pixels(image)
    if content_type == "image/jpeg" and image.dtype != np.uint8:
        raise RecordError(Reason.IMAGE_BAD_DEPTH, f"JPEG holds 8-bit pixels only; got {image.dtype}")
    if content_type not in IMAGE_CONTENT_TYPES:
        raise RecordError(Reason.BAD_CONTENT_TYPE, f"content_type must be one of {IMAGE_CONTENT_TYPES}; got {content_type!r}")
    bgr = image if image.ndim == 2 else np.ascontiguousarray(image[..., ::-1])
    ext, params = (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]) if content_type == "image/png" else (
        ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:  # pragma: no cover - opencv reports failure only for unsupported layouts, checked above
        raise RecordError(Reason.IMAGE_DECODE_FAILED, f"opencv could not encode a {image.shape} {image.dtype} image")
    return buf.tobytes()


def _check_pixels(image: np.ndarray) -> None:
    if image.dtype not in (np.uint8, np.uint16):
        raise RecordError(Reason.IMAGE_BAD_DEPTH, f"image pixels must be uint8 or uint16; got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise RecordError(Reason.BAD_SHAPE, f"image must be [H, W] gray or [H, W, 3] RGB; got shape {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise RecordError(
            Reason.IMAGE_BAD_SIZE, f"image sides must be at least {MIN_IMAGE_SIDE} px; got {image.shape[1]}x{image.shape[0]}"
        )


@dataclass(frozen=True, eq=False)
class VisionReading(_Envelope):
    """One camera image of a unit.

    Attributes:
        data: the encoded image exactly as received or sent (PNG or JPEG).
        content_type: ``image/png`` or ``image/jpeg``; must match the magic bytes of ``data``.
        image: decoded pixels, ``[H, W]`` gray or ``[H, W, 3]`` RGB, uint8 or uint16, read-only. Decoded from
            ``data`` when not given; the wire codec passes it in after decoding under its own limits.
    """

    data: bytes = b""
    content_type: str = "image/png"
    image: np.ndarray | None = None

    modality: ClassVar[str] = "vision"

    def __post_init__(self) -> None:
        self._check_envelope()
        if not isinstance(self.data, bytes) or not self.data:
            raise RecordError(Reason.EMPTY_PAYLOAD, "a vision reading needs its encoded image bytes")
        if self.content_type not in IMAGE_CONTENT_TYPES:
            raise RecordError(
                Reason.BAD_CONTENT_TYPE, f"content_type must be one of {IMAGE_CONTENT_TYPES}; got {self.content_type!r}"
            )
        if sniff_image_type(self.data) != self.content_type:
            raise RecordError(
                Reason.IMAGE_FORMAT_MISMATCH,
                f"content_type says {self.content_type} but the bytes look like {sniff_image_type(self.data) or 'neither PNG nor JPEG'}",
            )
        image = self.image
        if image is None:
            from inspection.codec import CodecLimits, decode_image

            image = decode_image(self.data, self.content_type, CodecLimits())
        image = np.asarray(image)
        _check_pixels(image)
        object.__setattr__(self, "image", _readonly(image))

    @classmethod
    def from_array(
        cls, image: np.ndarray, *, content_type: str = "image/png", jpeg_quality: int = 95, **envelope
    ) -> VisionReading:
        """Encode pixels (``[H, W]`` or ``[H, W, 3]`` RGB) and build the reading; JPEG stores the decoded pixels."""
        data = encode_image(image, content_type, jpeg_quality=jpeg_quality)
        return cls(data=data, content_type=content_type, **envelope)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VisionReading):
            return NotImplemented
        return (self._envelope_key(), self.content_type, self.data) == (
            other._envelope_key(), other.content_type, other.data)

    def __hash__(self) -> int:
        return hash((self._envelope_key(), hashlib.sha256(self.data).digest()))


@dataclass(frozen=True, eq=False)
class _ArrayReading(_Envelope):
    """A multi-channel series ``values [C, S]`` sampled at ``sample_rate_hz`` in physical unit ``unit``."""

    values: np.ndarray | None = None
    sample_rate_hz: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        self._check_envelope()
        values = self.values
        if values is None:
            raise RecordError(Reason.EMPTY_PAYLOAD, f"a {self.modality} reading needs values [channels, samples]")
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.floating):
            raise RecordError(Reason.BAD_DTYPE, f"{self.modality} values must be floating point; got {values.dtype}")
        if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
            raise RecordError(
                Reason.BAD_SHAPE, f"{self.modality} values must be [channels, samples] with both >= 1; got {values.shape}"
            )
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise RecordError(Reason.NON_FINITE, f"{self.modality} values hold {bad} NaN/Inf samples")
        rate = self.sample_rate_hz
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or not (
            0.0 < rate <= MAX_SAMPLE_RATE_HZ
        ):
            raise RecordError(
                Reason.BAD_SAMPLE_RATE, f"sample_rate_hz must be in (0, {MAX_SAMPLE_RATE_HZ:g}] Hz; got {rate!r}"
            )
        allowed = PHYSICAL_UNITS[self.modality]
        if self.unit not in allowed:
            raise RecordError(
                Reason.BAD_PHYSICAL_UNIT, f"{self.modality} unit must be one of {sorted(allowed)}; got {self.unit!r}"
            )
        object.__setattr__(self, "values", _readonly(values))
        object.__setattr__(self, "sample_rate_hz", float(rate))

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    @property
    def samples(self) -> int:
        return int(self.values.shape[1])

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate_hz

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return (
            self._envelope_key() == other._envelope_key()
            and (self.sample_rate_hz, self.unit) == (other.sample_rate_hz, other.unit)
            and self.values.shape == other.values.shape
            and self.values.tobytes() == other.values.tobytes()
        )

    def __hash__(self) -> int:
        return hash((self._envelope_key(), hashlib.sha256(self.values.tobytes()).digest()))


@dataclass(frozen=True, eq=False)
class VibrationReading(_ArrayReading):
    """Accelerometer channels: a raw waveform (kHz) or a low-rate RMS series (e.g. 1 Hz), unit ``g``."""

    modality: ClassVar[str] = "vibration"


@dataclass(frozen=True, eq=False)
class TemperatureReading(_ArrayReading):
    """Temperature probes ``[C, S]``, unit ``degC`` (or ``K``)."""

    modality: ClassVar[str] = "temperature"


Reading = VisionReading | VibrationReading | TemperatureReading
READING_TYPES: Mapping[str, type] = MappingProxyType(
    {"vision": VisionReading, "vibration": VibrationReading, "temperature": TemperatureReading}
)


@dataclass(frozen=True)
class Label:
    """Ground truth of a unit, where known (data sets, labelled history).

    Attributes:
        defect: whether the unit is defective.
        defect_class: a class name (``ok`` for good units; e.g. ``crack``, ``outer_race``, ``valve``).
        culprits: the modalities whose readings show the defect; empty exactly when ``defect`` is False.
        severity: optional graded truth in [0, 1] (ELPV's defect probability).
    """

    defect: bool
    defect_class: str = "ok"
    culprits: frozenset[str] = frozenset()
    severity: float | None = None

    def __post_init__(self) -> None:
        culprits = frozenset(self.culprits)
        object.__setattr__(self, "culprits", culprits)
        if not isinstance(self.defect, bool):
            raise RecordError(Reason.BAD_LABEL, f"defect must be a bool; got {self.defect!r}")
        unknown = culprits - set(MODALITIES)
        if unknown:
            raise RecordError(Reason.BAD_LABEL, f"culprits must be modalities {MODALITIES}; got {sorted(unknown)}")
        if self.defect != bool(culprits):
            raise RecordError(
                Reason.BAD_LABEL,
                f"a defective unit names at least one culprit and a good one none; got defect={self.defect}, "
                f"culprits={sorted(culprits)}",
            )
        if not self.defect_class or not isinstance(self.defect_class, str):
            raise RecordError(Reason.BAD_LABEL, f"defect_class must be a non-empty string; got {self.defect_class!r}")
        if self.severity is not None and not (0.0 <= float(self.severity) <= 1.0):
            raise RecordError(Reason.BAD_LABEL, f"severity must be in [0, 1]; got {self.severity!r}")


@dataclass(frozen=True)
class Unit:
    """All readings of one production unit; any modality may be absent, but not all.

    Attributes:
        provenance: where each reading came from (data set item ids, simulator notes); strings only.
    """

    unit_id: str
    line_id: str
    vision: VisionReading | None = None
    vibration: VibrationReading | None = None
    temperature: TemperatureReading | None = None
    label: Label | None = None
    provenance: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.unit_id, "unit_id", Reason.BAD_UNIT_ID)
        check_id(self.line_id, "line_id", Reason.BAD_LINE_ID)
        present = self.present
        if not present:
            raise RecordError(Reason.EMPTY_UNIT, f"unit {self.unit_id} has no reading at all")
        for name in present:
            reading = getattr(self, name)
            if not isinstance(reading, READING_TYPES[name]):
                raise RecordError(
                    Reason.UNIT_MISMATCH, f"unit.{name} must be a {READING_TYPES[name].__name__}; got {type(reading).__name__}"
                )
            if (reading.unit_id, reading.line_id) != (self.unit_id, self.line_id):
                raise RecordError(
                    Reason.UNIT_MISMATCH,
                    f"the {name} reading belongs to unit {reading.unit_id!r} on line {reading.line_id!r}, "
                    f"not {self.unit_id!r} on {self.line_id!r}",
                )
        if self.label is not None and not isinstance(self.label, Label):
            raise RecordError(Reason.BAD_LABEL, f"label must be a Label; got {type(self.label).__name__}")
        prov = dict(self.provenance)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in prov.items()):
            raise RecordError(Reason.BAD_LABEL, "provenance keys and values must be strings")
        object.__setattr__(self, "provenance", MappingProxyType(prov))

    @property
    def present(self) -> tuple[str, ...]:
        """Modalities with a reading, in canonical order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is None)

    @property
    def readings(self) -> tuple[Reading, ...]:
        return tuple(getattr(self, m) for m in self.present)

    @property
    def event_time(self) -> datetime:
        """The latest event time of its readings."""
        return max(r.event_time for r in self.readings)

    def without(self, *modalities: str) -> Unit:
        """The same unit with the given modalities removed (labels and provenance kept)."""
        kwargs = {m: (None if m in modalities else getattr(self, m)) for m in MODALITIES}
        return Unit(self.unit_id, self.line_id, label=self.label, provenance=dict(self.provenance), **kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Unit):
            return NotImplemented
        return (
            (self.unit_id, self.line_id, self.vision, self.vibration, self.temperature, self.label)
            == (other.unit_id, other.line_id, other.vision, other.vibration, other.temperature, other.label)
            and dict(self.provenance) == dict(other.provenance)
        )

    def __hash__(self) -> int:
        return hash((self.unit_id, self.line_id, self.readings))


# ----------------------------------------------------------------------------------------------- decisions
DECISION_VALUES = ("ok", "defect", "undecided")
DECISION_TYPE = "inspection.decision.v1"


@dataclass(frozen=True, order=True)
class InputCoordinate:
    """Where one reading was read from: ``topic[partition]@offset``."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def decision_id(unit_id: str, model_version: str, inputs: tuple[InputCoordinate, ...]) -> str:
    """Deterministic id of a decision: the same unit, model and input coordinates give the same id."""
    h = hashlib.sha256()
    h.update(unit_id.encode())
    h.update(b"\x00")
    h.update(model_version.encode())
    for c in sorted(inputs):
        h.update(f"\x00{c.topic}\x00{c.partition}\x00{c.offset}".encode())
    return h.hexdigest()[:32]


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` (the wire format of every event time)."""
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


#: Decimal places the gate weights of a routing path are rounded to on the wire (half a unit: 5e-5 at most).
ROUTING_WEIGHT_DECIMALS = 4

#: JSON Schema (draft 2020-12) of a decision's ``routing`` field; ``null`` for a model without a sparse MoE.
#: A decision without the field (an older producer) reads as ``null``.
ROUTING_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "inspection.decision.v1 routing: the sparse MoE path of the unit's own forward pass",
    "type": ["object", "null"],
    "additionalProperties": False,
    "required": ["n_experts", "top_k", "layers"],
    "properties": {
        "n_experts": {"type": "integer", "minimum": 1, "description": "routed experts E per MoE layer"},
        "top_k": {"type": "integer", "minimum": 1, "description": "experts K each fusion query is routed to"},
        "layers": {
            "type": "array",
            "minItems": 1,
            "description": "one entry per MoE layer of the bridge, in increasing layer order",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["layer", "experts", "weights"],
                "properties": {
                    "layer": {"type": "integer", "minimum": 0, "description": "bridge layer index"},
                    "experts": {
                        "type": "array",
                        "minItems": 1,
                        "description": "per fusion query q (in order), its K expert ids, highest biased score first",
                        "items": {"type": "array", "minItems": 1, "uniqueItems": True,
                                  "items": {"type": "integer", "minimum": 0}},
                    },
                    "weights": {
                        "type": "array",
                        "minItems": 1,
                        "description": f"per fusion query, the gate weights of its experts, rounded to "
                                       f"{ROUTING_WEIGHT_DECIMALS} decimals",
                        "items": {"type": "array", "minItems": 1, "items": {"type": "number", "minimum": 0}},
                    },
                },
            },
        },
    },
}


def _routing_error(what: str, expected: str, got: object) -> RecordError:
    return RecordError(Reason.BAD_DECISION, f"{f'routing {what}' if what else 'routing'} must be {expected}; "
                       f"got {got!r}")


def _int_at_least(value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _routing_error(what, f"an integer >= {minimum}", value)
    return value


def _grid(value: object, what: str) -> tuple[tuple[object, ...], ...]:
    """A non-empty sequence of non-empty sequences, as tuples (``[Q][K]``)."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple) or not value:
        raise _routing_error(what, "a non-empty list (one entry per fusion query)", value)
    rows = []
    for q, row in enumerate(value):
        if isinstance(row, str | bytes) or not isinstance(row, list | tuple) or not row:
            raise _routing_error(f"{what}[{q}]", "a non-empty list (one entry per routed expert)", row)
        rows.append(tuple(row))
    return tuple(rows)


@dataclass(frozen=True)
class LayerRoute:
    """The routing of one MoE layer for the fusion queries of one row.

    Shapes: Q fusion queries · K experts per query.

    Attributes:
        layer: index of the bridge layer (0 = first).
        experts: ``[Q][K]`` the routed experts of each fusion query, in query order, each query's in the
            router's order (highest biased score first); distinct per query.
        weights: ``[Q][K]`` their gate weights (the router's renormalised weights, rounded to
            :data:`ROUTING_WEIGHT_DECIMALS` decimals by :meth:`RoutingPath.rounded`).

    Raises:
        RecordError: ``BAD_DECISION`` when the shapes or values are not those above (lists become tuples).
    """

    layer: int
    experts: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        _int_at_least(self.layer, 0, "layer")
        where = f"layers[layer={self.layer}]"
        experts, weights = _grid(self.experts, f"{where}.experts"), _grid(self.weights, f"{where}.weights")
        shape = [len(row) for row in experts]
        if [len(row) for row in weights] != shape:
            raise _routing_error(f"{where}.weights", f"the experts' shape [Q][K] = {len(shape)}x{shape}",
                                 [len(row) for row in weights])
        for q, row in enumerate(experts):
            for e in row:
                _int_at_least(e, 0, f"{where}.experts[{q}] entry")
            if len(set(row)) != len(row):
                raise _routing_error(f"{where}.experts[{q}]", "distinct experts", list(row))
        clean = []
        for q, row in enumerate(weights):
            for w in row:
                if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                    raise _routing_error(f"{where}.weights[{q}] entry", "a finite number >= 0", w)
            clean.append(tuple(float(w) for w in row))
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "weights", tuple(clean))

    def to_dict(self) -> dict:
        return {"layer": self.layer, "experts": [list(r) for r in self.experts],
                "weights": [list(r) for r in self.weights]}


@dataclass(frozen=True)
class RoutingPath:
    """Which sparse path produced a decision: for the unit's own forward pass (its grand coalition: every
    modality it has), the experts each fusion query was routed to in every MoE layer, and their gate weights.

    The wire form is :meth:`to_dict` (the decision's ``routing`` field, :data:`ROUTING_SCHEMA`); a routing path
    equals its JSON round trip.

    Attributes:
        n_experts: routed experts E of each MoE layer.
        top_k: experts K per fusion query.
        layers: one :class:`LayerRoute` per MoE layer, in increasing layer order, each ``[Q][K]`` with the same Q.

    Raises:
        RecordError: ``BAD_DECISION`` when a value is out of range (an expert >= E, K != top_k, ...).
    """

    n_experts: int
    top_k: int
    layers: tuple[LayerRoute, ...]

    def __post_init__(self) -> None:
        _int_at_least(self.n_experts, 1, "n_experts")
        _int_at_least(self.top_k, 1, "top_k")
        if self.top_k > self.n_experts:
            raise _routing_error("top_k", f"at most n_experts = {self.n_experts}", self.top_k)
        if not isinstance(self.layers, list | tuple) or not self.layers or \
                not all(isinstance(x, LayerRoute) for x in self.layers):
            raise _routing_error("layers", "a non-empty sequence of LayerRoute", self.layers)
        layers = tuple(self.layers)
        indices = [x.layer for x in layers]
        if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
            raise _routing_error("layers", "in increasing, distinct layer order", indices)
        n_queries = len(layers[0].experts)
        for x in layers:
            if len(x.experts) != n_queries:
                raise _routing_error(f"layers[layer={x.layer}].experts", f"{n_queries} fusion queries as in the "
                                     "first layer", len(x.experts))
            for q, row in enumerate(x.experts):
                if len(row) != self.top_k or max(row) >= self.n_experts:
                    raise _routing_error(f"layers[layer={x.layer}].experts[{q}]",
                                         f"{self.top_k} experts in [0, {self.n_experts})", list(row))
        object.__setattr__(self, "layers", layers)

    @classmethod
    def rounded(cls, n_experts: int, top_k: int, layers: Mapping[int, tuple[object, object]]) -> RoutingPath:
        """A routing path from the router's output, gate weights rounded to :data:`ROUTING_WEIGHT_DECIMALS`.

        Args:
            n_experts: E.
            top_k: K.
            layers: bridge layer index -> ``(experts, weights)``, each ``[Q][K]`` nested lists (``tolist()`` of
                the router's int64 indices and float weights of one row).

        Raises:
            RecordError: as the constructor.
        """
        return cls(n_experts, top_k, tuple(
            LayerRoute(layer, experts, [[round(float(w), ROUTING_WEIGHT_DECIMALS) for w in row] for row in weights])
            for layer, (experts, weights) in sorted(layers.items())
        ))

    def to_dict(self) -> dict:
        """The JSON-ready wire form (:data:`ROUTING_SCHEMA`)."""
        return {"n_experts": self.n_experts, "top_k": self.top_k, "layers": [x.to_dict() for x in self.layers]}

    @classmethod
    def from_dict(cls, data: object) -> RoutingPath:
        """Parse and validate the wire form.

        Raises:
            RecordError: ``BAD_DECISION`` when it is not an object of :data:`ROUTING_SCHEMA` (unknown keys
                included).
        """
        keys = ("n_experts", "top_k", "layers")
        if not isinstance(data, Mapping) or set(data) != set(keys):
            got = sorted(data) if isinstance(data, Mapping) else data
            raise _routing_error("", f"an object with exactly the keys {list(keys)}", got)
        if not isinstance(data["layers"], list | tuple):
            raise _routing_error("layers", "a list", data["layers"])
        layers = []
        for i, x in enumerate(data["layers"]):
            if not isinstance(x, Mapping) or set(x) != {"layer", "experts", "weights"}:
                got = sorted(x) if isinstance(x, Mapping) else x
                raise _routing_error(f"layers[{i}]", "an object with exactly the keys layer, experts, weights", got)
            layers.append(LayerRoute(x["layer"], x["experts"], x["weights"]))
        return cls(data["n_experts"], data["top_k"], tuple(layers))


@dataclass(frozen=True)
class Decision:
    """One decision per unit, as written to ``inspection.decisions`` (structured-mode CloudEvent, JSON).

    Attributes:
        score: defect probability in [0, 1] after calibration.
        threshold: the line's calibrated threshold the score was compared with.
        modality_scores: per-modality defect scores of the present modalities.
        attributions: explanation summary: always ``{"modality": {name: phi}}``, deeper levels when budgeted.
        inputs: coordinates of every reading the decision used.
        latency_ms: from the newest reading's arrival to the decision.
        routing: the sparse MoE path of the unit's own forward pass (:class:`RoutingPath`); None for a model
            without a sparse MoE, and for decisions of older producers, which have no ``routing`` field.
    """

    unit_id: str
    line_id: str
    decision: str
    score: float
    threshold: float
    defect_class: str
    modality_scores: Mapping[str, float]
    present: tuple[str, ...]
    missing: tuple[str, ...]
    attributions: Mapping[str, object]
    model_version: str
    threshold_version: str
    inputs: tuple[InputCoordinate, ...]
    event_time: datetime
    decided_at: datetime
    latency_ms: float
    report_url: str | None = None
    source: str = "inspection/serve"
    routing: RoutingPath | None = None

    def __post_init__(self) -> None:
        check_id(self.unit_id, "unit_id", Reason.BAD_UNIT_ID)
        check_id(self.line_id, "line_id", Reason.BAD_LINE_ID)
        if self.decision not in DECISION_VALUES:
            raise RecordError(Reason.BAD_DECISION, f"decision must be one of {DECISION_VALUES}; got {self.decision!r}")
        for name in ("score", "threshold", "latency_ms"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise RecordError(Reason.BAD_DECISION, f"{name} must be a finite number; got {v!r}")
        bad = (set(self.present) | set(self.missing)) - set(MODALITIES)
        if bad or set(self.present) & set(self.missing):
            raise RecordError(
                Reason.BAD_DECISION, f"present/missing must be disjoint modality names; got {self.present}/{self.missing}"
            )
        object.__setattr__(self, "inputs", tuple(sorted(self.inputs)))
        object.__setattr__(self, "modality_scores", MappingProxyType(dict(self.modality_scores)))
        object.__setattr__(self, "attributions", MappingProxyType(dict(self.attributions)))
        _check_event_time(self.event_time)
        _check_event_time(self.decided_at)
        if self.routing is not None and not isinstance(self.routing, RoutingPath):
            raise RecordError(Reason.BAD_DECISION, f"routing must be a RoutingPath or None; got "
                              f"{type(self.routing).__name__}")

    @property
    def id(self) -> str:
        return decision_id(self.unit_id, self.model_version, self.inputs)

    def to_cloudevent(self) -> dict:
        """The structured-mode CloudEvent (JSON-ready dict)."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": DECISION_TYPE,
            "subject": self.unit_id,
            "time": format_time(self.decided_at),
            "datacontenttype": "application/json",
            "data": {
                "unit_id": self.unit_id,
                "line_id": self.line_id,
                "decision": self.decision,
                "score": self.score,
                "threshold": self.threshold,
                "class": self.defect_class,
                "modality_scores": dict(self.modality_scores),
                "modalities": {"present": list(self.present), "missing": list(self.missing)},
                "attributions": _plain(self.attributions),
                "model_version": self.model_version,
                "threshold_version": self.threshold_version,
                "inputs": [{"topic": c.topic, "partition": c.partition, "offset": c.offset} for c in self.inputs],
                "event_time": format_time(self.event_time),
                "latency_ms": self.latency_ms,
                "report": self.report_url,
                "routing": None if self.routing is None else self.routing.to_dict(),
            },
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_cloudevent(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> Decision:
        """Parse and validate a decision CloudEvent; the embedded id must match the recomputed one."""
        try:
            ev = json.loads(payload)
            d = ev["data"]
            if ev.get("specversion") != "1.0" or ev.get("type") != DECISION_TYPE:
                raise RecordError(Reason.BAD_DECISION, f"not a {DECISION_TYPE} CloudEvent 1.0: {ev.get('type')!r}")
            out = cls(
                unit_id=d["unit_id"],
                line_id=d["line_id"],
                decision=d["decision"],
                score=d["score"],
                threshold=d["threshold"],
                defect_class=d["class"],
                modality_scores=d["modality_scores"],
                present=tuple(d["modalities"]["present"]),
                missing=tuple(d["modalities"]["missing"]),
                attributions=d["attributions"],
                model_version=d["model_version"],
                threshold_version=d["threshold_version"],
                inputs=tuple(InputCoordinate(c["topic"], int(c["partition"]), int(c["offset"])) for c in d["inputs"]),
                event_time=datetime.fromisoformat(d["event_time"]),
                decided_at=datetime.fromisoformat(ev["time"]),
                latency_ms=d["latency_ms"],
                report_url=d.get("report"),
                source=ev["source"],
                routing=None if d.get("routing") is None else RoutingPath.from_dict(d["routing"]),
            )
        except RecordError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(Reason.BAD_DECISION, f"malformed decision JSON: {exc!r}") from exc
        if ev["id"] != out.id:
            raise RecordError(Reason.BAD_DECISION, f"decision id {ev['id']} does not match its content ({out.id})")
        return out


def _plain(obj: object) -> object:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
