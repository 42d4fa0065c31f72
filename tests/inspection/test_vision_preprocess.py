"""Vision preprocessing: what each backbone input channel carries (plain image or CLAHE copy)."""

from __future__ import annotations

import numpy as np
import pytest

from inspection.config import from_dict
from inspection.data.elpv import load_elpv
from inspection.encoders import VisionEncoderConfig
from inspection.errors import ConfigError
from inspection.preprocess import VisionPreprocess

MIXED = ("raw", "clahe", "raw")


def faint_line_image(side: int = 240, dtype=np.uint8) -> np.ndarray:
    """A flat gray cell (47 % of full scale) with one faint dark vertical line 1.2 % of full scale deep (a crack)
    and mild sensor noise, as 8- or 16-bit pixels."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(0)
    img = np.full((side, side), 0.47 * top) + rng.normal(0, 0.002 * top, (side, side))
    img[:, side // 2 - 1: side // 2 + 1] -= 0.012 * top
    return np.clip(np.round(img), 0, top).astype(dtype)


def line_contrast(channel: np.ndarray) -> float:
    """Depth of the centre line below its neighbourhood, in the channel's (normalised) units."""
    mid = channel.shape[1] // 2
    line = channel[:, mid - 1: mid + 1].mean()
    around = np.concatenate([channel[:, mid - 12: mid - 6], channel[:, mid + 6: mid + 12]], axis=1).mean()
    return float(around - line)


def test_default_replicates_gray_and_mixed_keeps_the_plain_channels_bit_exact():
    image = load_elpv()[0].image()
    plain = VisionPreprocess(image_size=300)(image)
    mixed = VisionPreprocess(image_size=300, channels=MIXED)(image)
    assert plain.shape == mixed.shape == (3, 300, 300) and mixed.dtype == np.float32
    np.testing.assert_array_equal(plain[0], plain[1])
    np.testing.assert_array_equal(plain[0], plain[2])
    np.testing.assert_array_equal(mixed[0], plain[0])
    np.testing.assert_array_equal(mixed[2], plain[2])
    assert not np.allclose(mixed[1], plain[1], atol=0.05)


def test_clahe_channel_stretches_a_faint_line():
    image = faint_line_image()
    out = VisionPreprocess(image_size=240, channels=MIXED)(image)
    raw_depth, clahe_depth = line_contrast(out[0]), line_contrast(out[1])
    assert raw_depth == pytest.approx(2 * 0.012, rel=0.2)  # 1.2 % of full scale in [-1, 1] units (std 0.5)
    assert clahe_depth > 2 * raw_depth


def test_clahe_does_not_blow_up_a_flat_image():
    flat = np.full((200, 200), 90, np.uint8)
    out = VisionPreprocess(image_size=100, channels=("clahe",) * 3)(flat)
    assert np.ptp(out) == 0.0


@pytest.mark.parametrize("channels", [("raw", "raw", "raw"), MIXED, ("clahe",) * 3])
def test_a_colour_image_of_equal_planes_reads_like_its_gray_version(channels):
    gray = load_elpv()[1].image()
    colour = np.repeat(gray[:, :, None], 3, axis=2)
    pre = VisionPreprocess(image_size=128, channels=channels)
    np.testing.assert_array_equal(pre(colour), pre(gray))


def test_sixteen_bit_images_are_equalised_too():
    out = VisionPreprocess(image_size=240, channels=MIXED)(faint_line_image(dtype=np.uint16))
    assert line_contrast(out[0]) == pytest.approx(2 * 0.012, rel=0.2)
    assert line_contrast(out[1]) > 2 * line_contrast(out[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=("raw", "clahe")), "3 entries"),
    (dict(channels=("raw", "hist", "raw")), "'hist'"),
    (dict(clahe_clip=0.0), "clahe_clip"),
    (dict(clahe_tiles=0), "clahe_tiles"),
    (dict(clahe_tiles=True), "clahe_tiles"),
])
def test_invalid_channel_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VisionPreprocess(**kwargs)


def test_channel_settings_travel_through_the_model_config_json():
    cfg = from_dict(VisionEncoderConfig, {"preprocess": {"image_size": 300, "channels": list(MIXED), "clahe_clip": 3}})
    assert cfg.preprocess.channels == MIXED and cfg.preprocess.clahe_clip == 3.0
    assert VisionPreprocess(channels=list(MIXED)) == VisionPreprocess(channels=MIXED)  # Python lists too
    old = from_dict(VisionEncoderConfig, {"preprocess": {"image_size": 300}})  # cards written before the option
    assert old.preprocess.channels == ("raw", "raw", "raw")
