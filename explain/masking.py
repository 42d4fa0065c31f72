"""Input masking: a group switched off by removing it from the reading itself, then the unit encoded again.

What "remove" means per kind of group (the groups of :mod:`explain.hierarchy`):

* ``region`` — the image box is replaced by a strongly blurred copy of the image (Gaussian, sigma a third of the
  box's longer side): the region's structure is gone, its mean brightness stays. The box is given in the
  model's input frame, which is the whole image resized, so it maps to the same fraction of the reading's image.
* ``spectrum`` — a band-stop filter: the band's bins of the waveform's Fourier transform are set to zero (every
  channel), then the waveform is transformed back. The envelope loses what the band carried too.
* ``envelope`` — the band's frequencies are removed from the amplitude envelope: the envelope's Fourier
  transform loses the band and the waveform is rescaled by new envelope / old envelope.
* ``waveform`` — the time segment (seconds from the start of the reading, as the waveform branch reads it) is
  replaced by the reading's mean.
* ``series`` — the channel's time segment (samples of the window the encoder reads: the last ``samples`` of the
  reading) is replaced by the straight line between the values just before and just after it.

This is slower than token masking (every coalition is preprocessed and encoded again) and closer to what an
engineer means by "without this region / band / stretch"; how far the two agree is measured in
``bench/explain.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from explain.hierarchy import Group
from inspection.records import Unit


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    x = image.astype(np.float32)
    k = int(2 * round(3 * sigma) + 1)
    return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def remove_regions(image: np.ndarray, boxes: Sequence[tuple[float, float, float, float]],
                   frame: tuple[float, float]) -> np.ndarray:
    """``image`` with every box (y0, x0, y1, x1 in a ``frame`` of (height, width)) replaced by a blur of the image."""
    if not boxes:
        return image
    h, w = image.shape[:2]
    longest = max(max(b[2] - b[0], b[3] - b[1]) / max(frame) * max(h, w) for b in boxes)
    soft = _blurred(image, max(1.0, longest / 3))
    out = image.astype(np.float32).copy()
    for y0, x0, y1, x1 in boxes:
        r0, r1 = round(y0 / frame[0] * h), round(y1 / frame[0] * h)
        c0, c1 = round(x0 / frame[1] * w), round(x1 / frame[1] * w)
        out[r0:r1, c0:c1] = soft[r0:r1, c0:c1]
    hi = 255 if image.dtype == np.uint8 else 65535
    return np.clip(np.rint(out), 0, hi).astype(image.dtype)


def band_stop(values: np.ndarray, rate_hz: float, bands: Sequence[tuple[float, float]]) -> np.ndarray:
    """``values [C, S]`` with the frequencies of every band [lo, hi) Hz removed."""
    if not bands:
        return values
    x = np.asarray(values, dtype=np.float64)
    spec = np.fft.rfft(x, axis=1)
    freqs = np.fft.rfftfreq(x.shape[1], 1.0 / rate_hz)
    for lo, hi in bands:
        spec[:, (freqs >= lo) & (freqs < hi)] = 0.0
    return np.fft.irfft(spec, n=x.shape[1], axis=1)


def envelope_stop(values: np.ndarray, rate_hz: float, bands: Sequence[tuple[float, float]]) -> np.ndarray:
    """``values [C, S]`` with the modulation of its amplitude envelope at every band [lo, hi) Hz removed."""
    from scipy.signal import hilbert

    if not bands:
        return values
    x = np.asarray(values, dtype=np.float64)
    centred = x - x.mean(axis=1, keepdims=True)
    env = np.abs(hilbert(centred, axis=1))
    floor = 1e-9 * (env.max() or 1.0)
    new_env = band_stop(env - env.mean(axis=1, keepdims=True), rate_hz, bands) + env.mean(axis=1, keepdims=True)
    return centred * (np.clip(new_env, 0.0, None) / np.maximum(env, floor)) + x.mean(axis=1, keepdims=True)


def flatten_segments(values: np.ndarray, rate_hz: float, spans_s: Sequence[tuple[float, float]]) -> np.ndarray:
    """``values [C, S]`` with every time segment [t0, t1) s from the start set to the reading's mean."""
    x = np.asarray(values, dtype=np.float64).copy()
    mean = x.mean(axis=1, keepdims=True)
    for t0, t1 in spans_s:
        a, b = round(t0 * rate_hz), round(t1 * rate_hz)
        x[:, a:b] = mean
    return x


def baseline_segments(values: np.ndarray, window: int, segments: Sequence[tuple[int, float, float]]) -> np.ndarray:
    """``values [C, S]`` with every (channel, t0, t1) segment of the last ``window`` samples replaced by the line
    between the values just before and just after it."""
    x = np.asarray(values, dtype=np.float64).copy()
    n = x.shape[1]
    offset = n - window  # negative when the reading is shorter than the window (the encoder pads its start)
    for ch, t0, t1 in segments:
        a, b = max(0, round(t0) + offset), min(n, round(t1) + offset)
        if b <= a:
            continue
        left = x[ch, a - 1] if a > 0 else x[ch, b] if b < n else x[ch, a]
        right = x[ch, b] if b < n else left
        x[ch, a:b] = np.linspace(left, right, b - a + 2)[1:-1]
    return x


def remove_groups(unit: Unit, hidden: Mapping[str, Sequence[Group]], frames: Mapping[str, float | tuple]) -> Unit:
    """The unit with the hidden groups removed from its readings (see the module docstring).

    Args:
        unit: the unit.
        hidden: modality -> the groups to remove (modalities not named are left alone).
        frames: per modality, the extent of its groups' spans: vision ``(height, width)`` of the model's input
            frame; temperature the window length in samples.

    Returns:
        A unit with new readings where something was removed. A vision reading keeps its encoded bytes: only its
        pixels change, which is what the model reads.
    """
    changes = {}
    for modality, groups in hidden.items():
        if not groups:
            continue
        reading = getattr(unit, modality)
        if reading is None:
            continue
        kinds = {g.kind for g in groups}
        if kinds == {"region"}:
            image = remove_regions(reading.image, [g.span for g in groups], frames[modality])
            changes[modality] = dataclasses.replace(reading, image=image)
            continue
        values = np.asarray(reading.values, dtype=np.float64)
        rate = reading.sample_rate_hz
        if kinds & {"spectrum", "envelope", "waveform"}:
            values = band_stop(values, rate, [g.span for g in groups if g.kind == "spectrum"])
            values = envelope_stop(values, rate, [g.span for g in groups if g.kind == "envelope"])
            values = flatten_segments(values, rate, [g.span for g in groups if g.kind == "waveform"])
        if "series" in kinds:
            values = baseline_segments(values, int(frames[modality]),
                                       [(int(g.span[0]), g.span[1], g.span[2]) for g in groups if g.kind == "series"])
        changes[modality] = dataclasses.replace(reading, values=values)
    return dataclasses.replace(unit, **changes) if changes else unit


def group_frames(groups: Mapping[str, Sequence[Group]]) -> dict[str, float | tuple]:
    """The frame of each modality's group spans (see :func:`remove_groups`), read from the spans themselves."""
    frames: dict[str, float | tuple] = {}
    for modality, gs in groups.items():
        regions = [g.span for g in gs if g.kind == "region"]
        if regions:
            frames[modality] = (max(s[2] for s in regions), max(s[3] for s in regions))
        series = [g.span for g in gs if g.kind == "series"]
        if series:
            frames[modality] = max(s[2] for s in series)
    return frames
