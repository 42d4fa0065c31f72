"""Wire codec: round trips for every modality, property tests, and the bad-input table with reason codes."""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inspection.codec import CodecLimits, WireMessage, decode_reading, encode_reading, parse_time
from inspection.errors import Reason, RecordError
from inspection.records import TemperatureReading, VibrationReading, VisionReading

#: quality-95 JPEG of a smooth gradient stays within ~1 level; 3 leaves room for encoder versions, not for
#: swapped channels or a wrong decode (those err by tens of levels)
JPEG_MEAN_ABS_ERROR = 3.0
T0 = datetime(2026, 3, 1, 8, 30, 0, 123456, tzinfo=UTC)


def envelope(modality: str, unit_id: str = "unit-0001") -> dict:
    return dict(unit_id=unit_id, line_id="line-1", reading_id=f"{unit_id}-{modality}",
                source=f"plant/line-1/{modality}", event_time=T0)


def gray_image(h: int = 48, w: int = 64, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    hi = 255 if dtype == np.uint8 else 65535
    return rng.integers(0, hi, (h, w), dtype=dtype)


def smooth_image(h: int = 48, w: int = 64, colour: bool = False) -> np.ndarray:
    """A smooth scene (gradients) on which JPEG's error is small and predictable."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 255 // (w - 1)), (y * 255 // (h - 1)), ((x + y) * 255 // (w + h - 2))]
    return (np.dstack(planes) if colour else planes[0]).astype(np.uint8)


def vision_msg(image=None, content_type="image/png") -> WireMessage:
    image = gray_image() if image is None else image
    return encode_reading(VisionReading.from_array(image, content_type=content_type, **envelope("vision")))


def vibration_msg(values=None) -> WireMessage:
    values = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32) if values is None else values
    return encode_reading(VibrationReading(values=values, sample_rate_hz=48828.0, unit="g", **envelope("vibration")))


def decode(msg: WireMessage, modality: str | None = None, limits: CodecLimits | None = None):
    return decode_reading(msg.value, msg.headers, key=msg.key, expected_modality=modality, limits=limits)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "image, content_type",
    [
        (gray_image(), "image/png"),
        (gray_image(dtype=np.uint16), "image/png"),
        (np.dstack([gray_image(), gray_image()[::-1], gray_image()[:, ::-1]]), "image/png"),
        (np.dstack([gray_image(), gray_image()[::-1], gray_image()[:, ::-1]]).astype(np.uint16) * 257, "image/png"),
        (smooth_image(), "image/jpeg"),
        (smooth_image(colour=True), "image/jpeg"),
    ],
    ids=["png8-gray", "png16-gray", "png8-rgb", "png16-rgb", "jpeg-gray", "jpeg-rgb"],
)
def test_vision_round_trip(image, content_type):
    reading = VisionReading.from_array(image, content_type=content_type, **envelope("vision"))
    msg = encode_reading(reading)
    back = decode(msg, "vision")
    assert back == reading
    assert back.data == msg.value  # the wire bytes are kept verbatim
    assert back.image.shape == image.shape and back.image.dtype == image.dtype
    if content_type == "image/png":  # lossless: the pixels come back exactly, channel order included
        np.testing.assert_array_equal(back.image, image)
    else:  # JPEG at quality 95 on a smooth scene: within a few grey levels on average
        assert np.abs(back.image.astype(int) - image.astype(int)).mean() < JPEG_MEAN_ABS_ERROR


def test_colour_channel_order_is_rgb():
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 200  # red
    reading = VisionReading.from_array(image, **envelope("vision"))
    bgr = cv2.imdecode(np.frombuffer(reading.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr[0, 0].tolist() == [0, 0, 200]  # on disk: opencv's BGR, red last
    assert reading.image[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("cls, unit, rate", [(VibrationReading, "g", 97656.0), (VibrationReading, "m/s2", 1.0),
                                              (TemperatureReading, "degC", 1.0), (TemperatureReading, "K", 0.2)])
def test_array_round_trip(cls, unit, rate):
    values = np.random.default_rng(2).normal(20, 5, (3, 101)).astype(np.float32)
    reading = cls(values=values, sample_rate_hz=rate, unit=unit, **envelope(cls.modality))
    msg = encode_reading(reading)
    assert msg.header("ce_shape") == "3,101" and msg.header("content-type") == "application/x-float32le"
    assert msg.header("ce_type") == f"inspection.{cls.modality}.v1"
    back = decode(msg, cls.modality)
    assert back == reading
    np.testing.assert_array_equal(back.values, values)
    assert not back.values.flags.writeable


def test_message_matches_the_documented_contract():
    msg = vibration_msg()
    names = [k for k, _ in msg.headers]
    assert sorted(names) == sorted(["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject",
                                    "ce_lineid", "content-type", "ce_shape", "ce_samplerate", "ce_unit"])
    assert msg.key == b"unit-0001" and msg.header("ce_subject") == "unit-0001"
    assert msg.header("ce_time") == "2026-03-01T08:30:00.123456Z"
    assert msg.header("ce_samplerate") == "48828"
    assert msg.timestamp_ms == int(T0.timestamp() * 1000)
    assert len(msg.value) == 2 * 256 * 4


def test_float32_little_endian_on_the_wire():
    values = np.array([[1.5, -2.0, 3.25]], np.float32)
    msg = encode_reading(TemperatureReading(values=values, sample_rate_hz=1.0, unit="degC", **envelope("temperature")))
    assert msg.value == struct.pack("<3f", 1.5, -2.0, 3.25)


@pytest.mark.parametrize("text, expected", [
    ("2026-01-31T08:00:00Z", datetime(2026, 1, 31, 8, tzinfo=UTC)),
    ("2026-01-31t08:00:00.5+01:00", datetime(2026, 1, 31, 8, 0, 0, 500000, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-01-31T08:00:00.123456789-05:30", datetime(2026, 1, 31, 8, 0, 0, 123456,
                                                      tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
])
def test_rfc3339_times(text, expected):
    assert parse_time(text) == expected


# -------------------------------------------------------------------------------------- property tests
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,40}", fullmatch=True)
printable = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)
times = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                      elements=st.floats(allow_nan=False, allow_infinity=False, width=32)),
    rate=st.floats(1e-3, 1e6, allow_nan=False),
    unit_id=ids, line_id=ids, reading_id=printable, source=printable, when=times,
    temperature=st.booleans(),
)
def test_array_property_round_trip(values, rate, unit_id, line_id, reading_id, source, when, temperature):
    cls, unit = (TemperatureReading, "degC") if temperature else (VibrationReading, "g")
    reading = cls(values=values, sample_rate_hz=rate, unit=unit, unit_id=unit_id, line_id=line_id,
                  reading_id=reading_id, source=source, event_time=when)
    back = decode(encode_reading(reading), cls.modality)
    assert back == reading
    assert back.values.tobytes() == values.tobytes()  # bit-exact, signed zeros included
    assert back.sample_rate_hz == rate


@settings(max_examples=300, deadline=None)
@given(
    value=st.binary(max_size=512),
    headers=st.lists(st.tuples(st.sampled_from(["ce_specversion", "ce_type", "ce_id", "ce_time", "ce_subject",
                                                "content-type", "ce_shape", "ce_samplerate", "ce_unit", "ce_lineid",
                                                "ce_source", "x"]),
                               st.one_of(st.binary(max_size=40), st.sampled_from(
                                   [b"1.0", b"inspection.vibration.v1", b"inspection.vision.v1", b"image/png",
                                    b"application/x-float32le", b"2,3", b"g", b"2026-01-01T00:00:00Z", b"u1"]))),
                     max_size=14),
)
def test_arbitrary_input_only_raises_record_errors(value, headers):
    try:
        decode_reading(value, headers)
    except RecordError as exc:
        assert isinstance(exc.reason, Reason)


# ------------------------------------------------------------------------------------------- bad inputs
def mutate(msg: WireMessage, *, drop=(), set_=None, value=None, key=...) -> WireMessage:
    headers = [(k, v) for k, v in msg.headers if k not in drop]
    for k, v in (set_ or {}).items():
        headers = [(hk, hv) for hk, hv in headers if hk != k] + [(k, v)]
    return WireMessage(key=msg.key if key is ... else key, value=msg.value if value is None else value,
                       headers=tuple(headers), timestamp_ms=msg.timestamp_ms)


def png_with_ihdr(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A real small PNG whose IHDR is rewritten (with a valid CRC) to claim other dimensions or depth."""
    data = bytearray(vision_msg().value)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def flat_png(side: int) -> bytes:
    """A genuine, fully valid PNG of side x side zeros: a few kB that decode to side^2 bytes."""
    ok, buf = cv2.imencode(".png", np.zeros((side, side), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return buf.tobytes()


def corrupt_idat(data: bytes) -> bytes:
    i = data.index(b"IDAT") + 8
    return data[:i] + bytes(b ^ 0x5A for b in data[i:i + 16]) + data[i + 16:]


V, B, T = "vision", "vibration", "temperature"
SMALL = CodecLimits(max_payload_bytes=4096, max_pixels=1_000_000, max_channels=4, max_values=1000)
NAN = np.array([[0.0, np.nan, 1.0]], np.float32)
INF = np.array([[0.0, np.inf, 1.0]], np.float32)

BAD_INPUTS = [
    # id, message factory, topic modality, limits, reason
    ("no-ce_type", lambda: mutate(vision_msg(), drop=["ce_type"]), V, None, Reason.MISSING_HEADER),
    ("no-ce_time", lambda: mutate(vision_msg(), drop=["ce_time"]), V, None, Reason.MISSING_HEADER),
    ("no-ce_shape", lambda: mutate(vibration_msg(), drop=["ce_shape"]), B, None, Reason.MISSING_HEADER),
    ("header-none", lambda: mutate(vision_msg(), set_={"ce_source": None}), V, None, Reason.MISSING_HEADER),
    ("dup-header", lambda: WireMessage(b"unit-0001", vision_msg().value,
                                       vision_msg().headers + (("ce_id", b"again"),), 0), V, None,
     Reason.DUPLICATE_HEADER),
    ("header-not-utf8", lambda: mutate(vision_msg(), set_={"ce_source": b"\xff\xfe"}), V, None, Reason.HEADER_NOT_UTF8),
    ("specversion", lambda: mutate(vision_msg(), set_={"ce_specversion": b"0.3"}), V, None, Reason.BAD_SPECVERSION),
    ("unknown-type", lambda: mutate(vision_msg(), set_={"ce_type": b"inspection.audio.v1"}), V, None,
     Reason.UNKNOWN_TYPE),
    ("wrong-topic", lambda: vision_msg(), B, None, Reason.TYPE_TOPIC_MISMATCH),
    ("vision-content-type", lambda: mutate(vision_msg(), set_={"content-type": b"text/plain"}), V, None,
     Reason.BAD_CONTENT_TYPE),
    ("array-content-type", lambda: mutate(vibration_msg(), set_={"content-type": b"image/png"}), B, None,
     Reason.BAD_CONTENT_TYPE),
    ("float64-dtype", lambda: mutate(vibration_msg(), set_={"content-type": b"application/x-float64le"}), B, None,
     Reason.BAD_DTYPE),
    ("unit-id-format", lambda: mutate(vision_msg(), set_={"ce_subject": b"unit 1; drop"}, key=b"unit 1; drop"), V,
     None, Reason.BAD_UNIT_ID),
    ("key-not-subject", lambda: mutate(vision_msg(), key=b"unit-9999"), V, None, Reason.KEY_SUBJECT_MISMATCH),
    ("line-id", lambda: mutate(vision_msg(), set_={"ce_lineid": b""}), V, None, Reason.BAD_LINE_ID),
    ("reading-id", lambda: mutate(vision_msg(), set_={"ce_id": b"has space"}), V, None, Reason.BAD_READING_ID),
    ("source", lambda: mutate(vision_msg(), set_={"ce_source": b"line 1 camera"}), V, None, Reason.BAD_SOURCE),
    ("time-garbage", lambda: mutate(vision_msg(), set_={"ce_time": b"yesterday"}), V, None, Reason.BAD_EVENT_TIME),
    ("time-no-offset", lambda: mutate(vision_msg(), set_={"ce_time": b"2026-01-01T00:00:00"}), V, None,
     Reason.BAD_EVENT_TIME),
    ("time-impossible", lambda: mutate(vision_msg(), set_={"ce_time": b"2026-02-30T00:00:00Z"}), V, None,
     Reason.BAD_EVENT_TIME),
    ("empty-payload", lambda: mutate(vision_msg(), value=b""), V, None, Reason.EMPTY_PAYLOAD),
    ("payload-too-large", lambda: vision_msg(gray_image(200, 200)), V, SMALL, Reason.PAYLOAD_TOO_LARGE),
    ("png-is-jpeg", lambda: mutate(vision_msg(content_type="image/jpeg"), set_={"content-type": b"image/png"}), V,
     None, Reason.IMAGE_FORMAT_MISMATCH),
    ("not-an-image", lambda: mutate(vision_msg(), value=b"GIF89a" + b"\x00" * 100), V, None,
     Reason.IMAGE_FORMAT_MISMATCH),
    ("png-no-ihdr", lambda: mutate(vision_msg(), value=vision_msg().value[:12] + b"JUNK" + vision_msg().value[16:]),
     V, None, Reason.IMAGE_HEADER_INVALID),
    ("jpeg-no-sof", lambda: mutate(vision_msg(content_type="image/jpeg"), value=b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 64),
     V, None, Reason.IMAGE_HEADER_INVALID),
    ("bomb-header", lambda: mutate(vision_msg(), value=png_with_ihdr(100_000, 100_000)), V, None,
     Reason.IMAGE_TOO_MANY_PIXELS),
    ("bomb-real-png", lambda: mutate(vision_msg(), value=flat_png(2000)), V, SMALL, Reason.IMAGE_TOO_MANY_PIXELS),
    ("png-1bit", lambda: mutate(vision_msg(), value=png_with_ihdr(64, 48, depth=1)), V, None, Reason.IMAGE_BAD_DEPTH),
    ("png-truncated", lambda: mutate(vision_msg(), value=vision_msg().value[:-40]), V, None, Reason.IMAGE_DECODE_FAILED),
    ("jpeg-truncated", lambda: mutate(vision_msg(content_type="image/jpeg"),
                                      value=vision_msg(content_type="image/jpeg").value[:-200]), V, None,
     Reason.IMAGE_DECODE_FAILED),
    ("png-corrupt-data", lambda: mutate(vision_msg(), value=corrupt_idat(vision_msg().value)), V, None,
     Reason.IMAGE_DECODE_FAILED),
    ("image-too-small", lambda: mutate(vision_msg(), value=png_with_ihdr(4, 4)), V, None, Reason.IMAGE_BAD_SIZE),
    ("shape-syntax", lambda: mutate(vibration_msg(), set_={"ce_shape": b"2x256"}), B, None, Reason.BAD_SHAPE),
    ("shape-zero", lambda: mutate(vibration_msg(), set_={"ce_shape": b"0,256"}), B, None, Reason.BAD_SHAPE),
    ("shape-mismatch", lambda: mutate(vibration_msg(), value=vibration_msg().value[:-4]), B, None,
     Reason.SHAPE_MISMATCH),
    ("shape-lies-bigger", lambda: mutate(vibration_msg(), set_={"ce_shape": b"2,512"}), B, None,
     Reason.SHAPE_MISMATCH),
    ("too-many-channels", lambda: mutate(vibration_msg(), set_={"ce_shape": b"128,4"}), B, SMALL,
     Reason.ARRAY_TOO_LARGE),
    ("nan", lambda: vibration_msg_raw(NAN), B, None, Reason.NON_FINITE),
    ("inf", lambda: vibration_msg_raw(INF), B, None, Reason.NON_FINITE),
    ("rate-negative", lambda: mutate(vibration_msg(), set_={"ce_samplerate": b"-48828"}), B, None,
     Reason.BAD_SAMPLE_RATE),
    ("rate-zero", lambda: mutate(vibration_msg(), set_={"ce_samplerate": b"0"}), B, None, Reason.BAD_SAMPLE_RATE),
    ("rate-absurd", lambda: mutate(vibration_msg(), set_={"ce_samplerate": b"5e9"}), B, None, Reason.BAD_SAMPLE_RATE),
    ("rate-text", lambda: mutate(vibration_msg(), set_={"ce_samplerate": b"fast"}), B, None, Reason.BAD_SAMPLE_RATE),
    ("rate-nan", lambda: mutate(vibration_msg(), set_={"ce_samplerate": b"nan"}), B, None, Reason.BAD_SAMPLE_RATE),
    ("physical-unit", lambda: mutate(vibration_msg(), set_={"ce_unit": b"furlongs"}), B, None,
     Reason.BAD_PHYSICAL_UNIT),
    ("temperature-in-g", lambda: mutate(encode_reading(TemperatureReading(
        values=np.ones((1, 8), np.float32), sample_rate_hz=1.0, unit="degC", **envelope("temperature"))),
        set_={"ce_unit": b"g"}), T, None, Reason.BAD_PHYSICAL_UNIT),
]


def vibration_msg_raw(values: np.ndarray) -> WireMessage:
    """A vibration message whose payload bypasses the record checks (as a foreign producer could send)."""
    good = vibration_msg()
    return mutate(good, value=values.astype("<f4").tobytes(),
                  set_={"ce_shape": f"{values.shape[0]},{values.shape[1]}".encode()})


def test_bad_input_table_is_broad():
    assert len(BAD_INPUTS) >= 20
    assert len({r for *_, r in BAD_INPUTS}) >= 20  # at least 20 distinct reasons, not 20 variants of one


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_with_its_reason(case):
    _, factory, modality, limits, reason = case
    msg = factory()
    with pytest.raises(RecordError) as info:
        decode(msg, modality, limits)
    assert info.value.reason is reason, info.value.detail
    assert str(reason.value) in str(info.value)


def test_pixel_limit_is_checked_before_decoding():
    # a 30000 x 30000 PNG would need 900 MB to decode: the header check must reject it in microseconds
    ihdr_only = png_with_ihdr(30_000, 30_000)
    with pytest.raises(RecordError) as info:
        decode_reading(ihdr_only, vision_msg().headers, expected_modality="vision")
    assert info.value.reason is Reason.IMAGE_TOO_MANY_PIXELS
    assert "900,000,000" in info.value.detail
