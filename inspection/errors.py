"""The project's exception hierarchy and the stable reason codes carried by input rejections.

Every error the project raises on purpose derives from :class:`InspectionError`, so a caller can catch the
project's failures without catching programming errors. Input that fails validation raises
:class:`RecordError` with a :class:`Reason`; the reason's value is a stable string that goes into logs, the
dead-letter topic and metrics labels, so it never changes once released.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a reading or record was rejected. Values are stable wire strings."""

    # headers / envelope
    MISSING_HEADER = "missing_header"
    DUPLICATE_HEADER = "duplicate_header"
    HEADER_NOT_UTF8 = "header_not_utf8"
    BAD_SPECVERSION = "bad_specversion"
    UNKNOWN_TYPE = "unknown_type"
    TYPE_TOPIC_MISMATCH = "type_topic_mismatch"
    BAD_CONTENT_TYPE = "bad_content_type"
    BAD_UNIT_ID = "bad_unit_id"
    MISSING_KEY = "missing_key"
    KEY_SUBJECT_MISMATCH = "key_subject_mismatch"
    BAD_LINE_ID = "bad_line_id"
    BAD_READING_ID = "bad_reading_id"
    BAD_SOURCE = "bad_source"
    BAD_EVENT_TIME = "bad_event_time"
    EVENT_TIME_IN_FUTURE = "event_time_in_future"
    EVENT_TIME_TOO_OLD = "event_time_too_old"
    # payload
    EMPTY_PAYLOAD = "empty_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # images
    IMAGE_FORMAT_MISMATCH = "image_format_mismatch"
    IMAGE_HEADER_INVALID = "image_header_invalid"
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    IMAGE_DECODE_FAILED = "image_decode_failed"
    IMAGE_BAD_DEPTH = "image_bad_depth"
    IMAGE_BAD_SIZE = "image_bad_size"
    # arrays
    BAD_SHAPE = "bad_shape"
    SHAPE_MISMATCH = "shape_mismatch"
    BAD_DTYPE = "bad_dtype"
    NON_FINITE = "non_finite"
    ARRAY_TOO_LARGE = "array_too_large"
    BAD_SAMPLE_RATE = "bad_sample_rate"
    BAD_PHYSICAL_UNIT = "bad_physical_unit"
    # units and decisions
    DUPLICATE_MODALITY = "duplicate_modality"
    UNIT_MISMATCH = "unit_mismatch"
    EMPTY_UNIT = "empty_unit"
    BAD_LABEL = "bad_label"
    BAD_DECISION = "bad_decision"


class InspectionError(Exception):
    """Base class of every error the project raises deliberately."""


class ConfigError(InspectionError, ValueError):
    """A configuration value or file is invalid; the message names the key, what was expected and what came."""


class DataError(InspectionError):
    """A data set is missing, incomplete or does not match its checksum."""


class BrokerError(InspectionError):
    """The embedded broker could not be started, reached or stopped cleanly, or a Kafka call failed."""


class RecordError(InspectionError, ValueError):
    """A reading, unit or decision failed validation.

    Attributes:
        reason: the stable reason code.
        detail: human-readable explanation: what was expected, what arrived.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"[{self.reason.value}] {detail}")

    def __reduce__(self):  # keeps the reason when the error crosses a process boundary
        return (type(self), (self.reason, self.detail))


class StoreError(InspectionError):
    """The model store cannot save, find, verify or load an artifact, or cannot promote or roll back."""


class NotCalibratedError(InspectionError):
    """Calibrated state (thresholds, normalisation, baselines) was used before it was fitted."""
