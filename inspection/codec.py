"""Wire codec: readings <-> Kafka messages (CloudEvents Kafka binding, binary mode).

A message is ``key = unit_id`` (UTF-8), ``value`` = the payload (encoded image bytes, or little-endian
float32 ``[C, S]``), and headers:

===================  ==========================================================================
``ce_specversion``   ``1.0``
``ce_id``            unique reading id
``ce_source``        line / sensor URI-reference
``ce_type``          ``inspection.vision.v1`` | ``inspection.vibration.v1`` | ``inspection.temperature.v1``
``ce_time``          event time, RFC 3339 with offset (``Z`` allowed)
``ce_subject``       unit_id (must equal the key when a key is present)
``content-type``     ``image/png`` | ``image/jpeg`` | ``application/x-float32le``
``ce_lineid``        production line id
``ce_shape``         arrays only: ``channels,samples``
``ce_samplerate``    arrays only: Hz, decimal
``ce_unit``          arrays only: ``g`` / ``m/s2`` (vibration), ``degC`` / ``K`` (temperature)
===================  ==========================================================================

:func:`decode_reading` is the trust boundary: it checks sizes before it allocates and image dimensions
before it decompresses, and every rejection is a :class:`~inspection.errors.RecordError` with a reason code.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from inspection.errors import Reason, RecordError
from inspection.records import (
    IMAGE_CONTENT_TYPES,
    MIN_IMAGE_SIDE,
    READING_TYPES,
    Reading,
    TemperatureReading,
    VibrationReading,
    VisionReading,
    format_time,
    sniff_image_type,
)

SPECVERSION = "1.0"
ARRAY_CONTENT_TYPE = "application/x-float32le"
CE_TYPES = {m: f"inspection.{m}.v1" for m in READING_TYPES}
_TYPE_TO_MODALITY = {v: k for k, v in CE_TYPES.items()}
_REQUIRED = ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "content-type", "ce_lineid")
_REQUIRED_ARRAY = ("ce_shape", "ce_samplerate", "ce_unit")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_SHAPE = re.compile(r"^(\d{1,9}),(\d{1,12})$")
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$")
_OTHER_ARRAY_TYPES = re.compile(r"^application/x-(float|int|uint)(16|32|64)(le|be)$")

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True)
class CodecLimits:
    """Upper bounds enforced before any large allocation.

    Attributes:
        max_payload_bytes: largest message value accepted.
        max_pixels: largest ``width * height`` of an image, read from its header before decoding.
        max_channels: most channels in one array reading.
        max_values: most float32 values (channels x samples) in one array reading.
    """

    max_payload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_channels: int = 64
    max_values: int = 4_000_000

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_pixels", "max_channels", "max_values"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                from inspection.errors import ConfigError

                raise ConfigError(f"CodecLimits.{name} must be a positive integer; got {v!r}")


@dataclass(frozen=True)
class WireMessage:
    """A Kafka record's key, value and headers (topic and partition are chosen by the caller)."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode()
        return None


# ------------------------------------------------------------------------------------------------- encode
def format_decimal(x: float) -> str:
    """A decimal string that parses back to exactly ``x`` (integers without a fraction)."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))  # shortest string that round-trips, e.g. '97656.25' or '1e-05'


def encode_reading(reading: Reading) -> WireMessage:
    """Encode a reading as a binary-mode CloudEvent Kafka message."""
    headers = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", reading.reading_id),
        ("ce_source", reading.source),
        ("ce_type", CE_TYPES[reading.modality]),
        ("ce_time", format_time(reading.event_time)),
        ("ce_subject", reading.unit_id),
        ("ce_lineid", reading.line_id),
    ]
    if isinstance(reading, VisionReading):
        headers.append(("content-type", reading.content_type))
        value = reading.data
    else:
        headers += [
            ("content-type", ARRAY_CONTENT_TYPE),
            ("ce_shape", f"{reading.channels},{reading.samples}"),
            ("ce_samplerate", format_decimal(reading.sample_rate_hz)),
            ("ce_unit", reading.unit),
        ]
        value = reading.values.astype("<f4", copy=False).tobytes()
    ts = int(reading.event_time.timestamp() * 1000)
    return WireMessage(
        key=reading.unit_id.encode(), value=value, headers=tuple((k, v.encode()) for k, v in headers), timestamp_ms=ts
    )


# ------------------------------------------------------------------------------------------------- decode
def parse_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Headers as a dict of UTF-8 strings; duplicate or undecodable headers are rejected."""
    out: dict[str, str] = {}
    for key, raw in headers or ():
        if key in out:
            raise RecordError(Reason.DUPLICATE_HEADER, f"header {key!r} appears more than once")
        if raw is None:
            raise RecordError(Reason.MISSING_HEADER, f"header {key!r} has no value")
        try:
            out[key] = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(Reason.HEADER_NOT_UTF8, f"header {key!r} is not valid UTF-8") from exc
    return out


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset."""
    if not _RFC3339.fullmatch(text):
        raise RecordError(Reason.BAD_EVENT_TIME, f"ce_time must be RFC 3339 with an offset, e.g. 2026-01-31T08:00:00Z; got {text!r}")
    main, frac_tz = text[:19], text[19:]
    frac = ""
    if frac_tz.startswith("."):
        m = re.match(r"\.(\d+)", frac_tz)
        frac, frac_tz = m.group(1), frac_tz[m.end():]
    tz = "+00:00" if frac_tz in ("Z", "z") else frac_tz
    try:
        return datetime.fromisoformat(f"{main.replace('t', 'T')}.{(frac + '000000')[:6]}{tz}")
    except ValueError as exc:
        raise RecordError(Reason.BAD_EVENT_TIME, f"ce_time is not a real date/time: {text!r} ({exc})") from exc


def image_dimensions(data: bytes, content_type: str) -> tuple[int, int, int]:
    """``(width, height, bits per sample)`` read from the PNG IHDR or JPEG SOF header, without decoding."""
    if content_type == "image/png":
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise RecordError(Reason.IMAGE_HEADER_INVALID, "PNG does not start with an IHDR chunk")
        width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
        if colour not in (0, 2, 3, 4, 6):
            raise RecordError(Reason.IMAGE_HEADER_INVALID, f"PNG colour type {colour} is not defined")
        return width, height, depth
    # JPEG: walk the marker segments up to the first start-of-frame
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise RecordError(Reason.IMAGE_HEADER_INVALID, f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            break
        if marker in (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)):
            if i + 9 > n:
                break
            depth, height, width = struct.unpack(">BHH", data[i + 4 : i + 9])
            return width, height, depth
        i += 2 + length
    raise RecordError(Reason.IMAGE_HEADER_INVALID, "JPEG has no start-of-frame header before its scan data")


def _check_trailer(data: bytes, content_type: str) -> None:
    if content_type == "image/png":
        if data[-12:] != b"\x00\x00\x00\x00IEND\xaeB`\x82":
            raise RecordError(Reason.IMAGE_DECODE_FAILED, "PNG is truncated: it does not end with an IEND chunk")
    elif data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise RecordError(Reason.IMAGE_DECODE_FAILED, "JPEG is truncated: it does not end with an EOI marker")


def decode_image(data: bytes, content_type: str, limits: CodecLimits) -> np.ndarray:
    """Decode PNG/JPEG bytes to ``[H, W]`` gray or ``[H, W, 3]`` RGB (uint8/uint16) under ``limits``."""
    import cv2

    if content_type not in IMAGE_CONTENT_TYPES:
        raise RecordError(Reason.BAD_CONTENT_TYPE, f"content-type must be one of {IMAGE_CONTENT_TYPES}; got {content_type!r}")
    if sniff_image_type(data) != content_type:
        raise RecordError(
            Reason.IMAGE_FORMAT_MISMATCH,
            f"content-type says {content_type} but the bytes look like {sniff_image_type(data) or 'neither PNG nor JPEG'}",
        )
    width, height, depth = image_dimensions(data, content_type)
    if width == 0 or height == 0:
        raise RecordError(Reason.IMAGE_HEADER_INVALID, f"image header declares {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise RecordError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"image declares {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}",
        )
    if depth not in (8, 16) or (content_type == "image/jpeg" and depth != 8):
        raise RecordError(Reason.IMAGE_BAD_DEPTH, f"{content_type} with {depth}-bit samples; expected 8 (or 16 for PNG)")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise RecordError(Reason.IMAGE_BAD_SIZE, f"image is {width}x{height}; sides must be at least {MIN_IMAGE_SIDE} px")
    _check_trailer(data, content_type)
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise RecordError(Reason.IMAGE_DECODE_FAILED, f"opencv could not decode the {content_type}: {exc}") from exc
    if pixels is None:
        raise RecordError(Reason.IMAGE_DECODE_FAILED, f"opencv could not decode the {content_type} image")
    if pixels.ndim == 3:
        if pixels.shape[2] == 4:
            pixels = pixels[..., :3]
        elif pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        if pixels.ndim == 3:
            pixels = pixels[..., ::-1]  # BGR -> RGB
    if pixels.shape[:2] != (height, width):
        raise RecordError(
            Reason.IMAGE_DECODE_FAILED, f"decoded {pixels.shape[1]}x{pixels.shape[0]} but the header says {width}x{height}"
        )
    return np.ascontiguousarray(pixels)


def _require(h: dict[str, str], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in h]
    if missing:
        raise RecordError(Reason.MISSING_HEADER, f"required header(s) missing: {', '.join(missing)}")


def decode_reading(
    value: bytes | None,
    headers: Headers | None,
    *,
    key: bytes | None = None,
    require_key: bool = False,
    expected_modality: str | None = None,
    limits: CodecLimits | None = None,
) -> Reading:
    """Validate and decode one Kafka message into a reading.

    Args:
        value: the message value (payload).
        headers: the message headers as ``(name, bytes)`` pairs.
        key: the message key; when present it must equal ``ce_subject``.
        require_key: reject a message without a key (the wire contract: key = unit_id) instead of only
            checking a key that is present.
        expected_modality: the modality of the topic the message came from; a different ``ce_type`` is rejected.
        limits: size limits; defaults to :class:`CodecLimits()`.

    Raises:
        RecordError: with the reason code of the first check that failed.
    """
    limits = limits or CodecLimits()
    h = parse_headers(headers)
    _require(h, ("ce_specversion", "ce_type"))
    if h["ce_specversion"] != SPECVERSION:
        raise RecordError(Reason.BAD_SPECVERSION, f"ce_specversion must be {SPECVERSION}; got {h['ce_specversion']!r}")
    modality = _TYPE_TO_MODALITY.get(h["ce_type"])
    if modality is None:
        raise RecordError(Reason.UNKNOWN_TYPE, f"ce_type must be one of {sorted(_TYPE_TO_MODALITY)}; got {h['ce_type']!r}")
    if expected_modality is not None and modality != expected_modality:
        raise RecordError(
            Reason.TYPE_TOPIC_MISMATCH, f"a {h['ce_type']} event arrived on the {expected_modality} topic"
        )
    _require(h, _REQUIRED)
    if modality != "vision":
        _require(h, _REQUIRED_ARRAY)
    if key is None and require_key:
        raise RecordError(Reason.MISSING_KEY, f"message has no key; the key must be the unit id ({h['ce_subject']!r})")
    if key is not None:
        try:
            key_text = bytes(key).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(Reason.BAD_UNIT_ID, "message key is not valid UTF-8") from exc
        if key_text != h["ce_subject"]:
            raise RecordError(
                Reason.KEY_SUBJECT_MISMATCH, f"message key {key_text!r} differs from ce_subject {h['ce_subject']!r}"
            )
    envelope = dict(
        unit_id=h["ce_subject"],
        line_id=h["ce_lineid"],
        reading_id=h["ce_id"],
        source=h["ce_source"],
        event_time=parse_time(h["ce_time"]),
    )
    content_type = h["content-type"]
    if not value:
        raise RecordError(Reason.EMPTY_PAYLOAD, f"{modality} message has an empty value")
    if len(value) > limits.max_payload_bytes:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"value is {len(value):,} bytes; the limit is {limits.max_payload_bytes:,}"
        )
    value = bytes(value)
    if modality == "vision":
        image = decode_image(value, content_type, limits)
        return VisionReading(data=value, content_type=content_type, image=image, **envelope)

    if content_type != ARRAY_CONTENT_TYPE:
        reason = Reason.BAD_DTYPE if _OTHER_ARRAY_TYPES.fullmatch(content_type) else Reason.BAD_CONTENT_TYPE
        raise RecordError(reason, f"{modality} payload must be {ARRAY_CONTENT_TYPE}; got {content_type!r}")
    m = _SHAPE.fullmatch(h["ce_shape"].strip())
    if not m:
        raise RecordError(Reason.BAD_SHAPE, f"ce_shape must be 'channels,samples' as decimal integers; got {h['ce_shape']!r}")
    channels, samples = int(m.group(1)), int(m.group(2))
    if channels == 0 or samples == 0:
        raise RecordError(Reason.BAD_SHAPE, f"ce_shape needs at least one channel and one sample; got {channels},{samples}")
    if channels > limits.max_channels or channels * samples > limits.max_values:
        raise RecordError(
            Reason.ARRAY_TOO_LARGE,
            f"{channels}x{samples} exceeds the limits ({limits.max_channels} channels, {limits.max_values:,} values)",
        )
    if len(value) != channels * samples * 4:
        raise RecordError(
            Reason.SHAPE_MISMATCH,
            f"ce_shape {channels},{samples} needs {channels * samples * 4:,} bytes of float32; the value has {len(value):,}",
        )
    rate_text = h["ce_samplerate"].strip()
    if not _DECIMAL.fullmatch(rate_text):
        raise RecordError(Reason.BAD_SAMPLE_RATE, f"ce_samplerate must be a positive decimal number of Hz; got {rate_text!r}")
    rate = float(rate_text)
    if not math.isfinite(rate):
        raise RecordError(Reason.BAD_SAMPLE_RATE, f"ce_samplerate is not finite: {rate_text!r}")
    values = np.frombuffer(value, dtype="<f4").reshape(channels, samples)
    cls = VibrationReading if modality == "vibration" else TemperatureReading
    return cls(values=values, sample_rate_hz=rate, unit=h["ce_unit"], **envelope)
