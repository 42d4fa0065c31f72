"""Batched preprocessing: many readings at once, as torch ops on the scoring device.

B readings · C channels · S samples · F rfft bins · L waveform length

The per-reading preprocessing of :mod:`inspection.preprocess` (numpy/SciPy/OpenCV) is the reference: training
and the level-2 input masking use it. Scoring (the stream, re-scoring) feeds the raw decoded arrays here
instead, where the expensive part, the vibration waveform's spectrum, envelope spectrum and resampling
(about 7 ms per reading in SciPy), runs as a few FFTs and one strided convolution over every reading of the
same sample rate and length together, on the GPU when the model is there.

:func:`waveform_features` computes exactly what :class:`~inspection.preprocess.WaveformPreprocess` computes:
the same Hann window, the same FFT-bin averaging onto the Hz grid (with the same interpolation of grid bins
finer than the recording's resolution), the same analytic signal (SciPy's ``hilbert``), the same polyphase
resampling filter (SciPy's ``resample_poly``: the Kaiser-windowed FIR, its padding and its delay) and the same
running median. In float64 it matches the reference to ~1e-9; in float32 (the scoring default) the log
spectra differ by at most ~1e-3 and the waveform by ~1e-5 of its RMS, well below what the encoders' feature
normalisation resolves (tests state the bounds).

Images are decoded and resized per reading with OpenCV (it releases the GIL; area resampling has no exact
batched torch equivalent) and temperature series only need cutting to length; both then travel to the
device in one copy per batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from inspection.errors import Reason, RecordError
from inspection.preprocess import WAVEFORM_MIN_RATE_HZ, WaveformPreprocess

_SILENT_RMS_G = 1e-9  # as inspection.preprocess: a channel quieter than this is silent


# ------------------------------------------------------------------------------------------ grid plans
@dataclass(frozen=True, eq=False)
class _GridPlan:
    """How the ``F`` bins of an rfft land on an ``n_bins`` Hz grid: averages of the bins inside each grid bin,
    then grid bins with no FFT bin (finer than the resolution, below Nyquist) interpolated from the filled
    ones (``np.interp``, written as a matrix)."""

    index: np.ndarray  # [F'] grid bin of each kept FFT bin
    keep: np.ndarray  # [F'] the kept FFT bins
    counts: np.ndarray  # [n_bins] FFT bins per grid bin
    filled: np.ndarray  # [G_f] filled grid bins
    targets: np.ndarray  # [G_t] interpolated grid bins
    weights: np.ndarray  # [G_f, G_t] interpolation matrix
    n_bins: int


@functools.lru_cache(maxsize=64)
def _grid_plan(n: int, rate_hz: float, f_max: float, n_bins: int) -> _GridPlan:
    freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
    edges = np.linspace(0.0, f_max, n_bins + 1)
    idx = np.searchsorted(edges, freqs, side="right") - 1
    keep = (idx >= 0) & (idx < n_bins)
    counts = np.bincount(idx[keep], minlength=n_bins).astype(np.float64)
    filled_mask = counts > 0
    filled = np.flatnonzero(filled_mask)
    targets = np.zeros(0, np.int64)
    weights = np.zeros((filled.size, 0))
    if not filled_mask.all() and filled.size >= 2:
        centres = (edges[:-1] + edges[1:]) / 2
        targets = np.flatnonzero((centres <= freqs[-1]) & ~filled_mask)
        basis = np.eye(filled.size)
        weights = np.stack([np.interp(centres[targets], centres[filled], row) for row in basis])  # [G_f, G_t]
    return _GridPlan(idx[keep], np.flatnonzero(keep), counts, filled, targets, weights, n_bins)


def _to_grid(spec: Tensor, plan: _GridPlan) -> Tensor:
    """``spec [R, F]`` -> ``[R, n_bins]`` (see :class:`_GridPlan`)."""
    t = _on_device(plan, spec.device, spec.dtype)
    out = torch.zeros(spec.shape[0], plan.n_bins, device=spec.device, dtype=spec.dtype)
    out.index_add_(1, t["index"], spec[:, t["keep"]])
    out = out / t["counts"]
    if plan.targets.size:
        out[:, t["targets"]] = out[:, t["filled"]] @ t["weights"]
    return out


# ---------------------------------------------------------------------------------------- resampling
@dataclass(frozen=True, eq=False)
class _ResamplePlan:
    up: int
    down: int
    taps: np.ndarray  # the FIR filter, already padded and scaled as resample_poly does
    start: int  # first kept output sample of the full upfirdn output
    n_out: int


@functools.lru_cache(maxsize=64)
def _resample_plan(n_in: int, up: int, down: int) -> _ResamplePlan:
    """SciPy's ``resample_poly(x, up, down)`` (Kaiser window, beta 5, constant padding) as a plan."""
    from scipy.signal import firwin

    g = math.gcd(up, down)
    up, down = up // g, down // g
    n_out = n_in * up
    n_out = n_out // down + bool(n_out % down)
    if up == down == 1:
        return _ResamplePlan(1, 1, np.ones(1), 0, n_in)
    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    n_pre_pad = down - half_len % down
    n_post_pad = 0
    n_pre_remove = (half_len + n_pre_pad) // down

    def output_len(len_h: int) -> int:
        return ((n_in - 1) * up + len_h - 1) // down + 1

    while output_len(len(h) + n_pre_pad + n_post_pad) < n_out + n_pre_remove:
        n_post_pad += 1
    h = np.concatenate([np.zeros(n_pre_pad), h, np.zeros(n_post_pad)])
    return _ResamplePlan(up, down, h, n_pre_remove, n_out)


def _resample(x: Tensor, plan: _ResamplePlan, length: int) -> Tensor:
    """``x [R, S]`` -> the first ``length`` samples of ``resample_poly(x, up, down)`` (zero-padded if shorter)."""
    r, n_in = x.shape
    if plan.up == plan.down == 1:
        y = x
    else:
        up, down, taps = plan.up, plan.down, plan.taps
        if up > 1:
            xu = x.new_zeros(r, (n_in - 1) * up + 1)
            xu[:, ::up] = x
        else:
            xu = x
        k = len(taps)
        want = min(plan.n_out, length)
        # the full convolution y[t] = sum_j h[j] xu[t - j] is a cross-correlation of the signal, left-padded
        # with k - 1 zeros, with the flipped taps; kept output i is t = (start + i) * down
        first = plan.start * down
        span = (want - 1) * down + k
        padded = torch.nn.functional.pad(xu, (k - 1, max(0, first + span - (k - 1) - xu.shape[1])))
        weight = _on_device(plan, x.device, x.dtype)["taps"]
        y = torch.nn.functional.conv1d(padded[:, first:first + span].unsqueeze(1), weight, stride=down)[:, 0]
    if y.shape[1] >= length:
        return y[:, :length]
    return torch.nn.functional.pad(y, (0, length - y.shape[1]))


@functools.lru_cache(maxsize=128)
def _on_device(plan: _GridPlan | _ResamplePlan, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """A plan's arrays as tensors on ``device``, made once per plan, device and dtype rather than on every batch
    (on a GPU each would be a host-to-device copy). Plans are cached themselves, so they compare by identity."""
    if isinstance(plan, _ResamplePlan):
        return {"taps": torch.as_tensor(plan.taps[::-1].copy(), dtype=dtype, device=device).view(1, 1, -1)}
    return {"index": torch.as_tensor(plan.index, device=device), "keep": torch.as_tensor(plan.keep, device=device),
            "counts": torch.as_tensor(plan.counts, device=device, dtype=dtype).clamp(min=1.0),
            "filled": torch.as_tensor(plan.filled, device=device),
            "targets": torch.as_tensor(plan.targets, device=device),
            "weights": torch.as_tensor(plan.weights, device=device, dtype=dtype)}


# ------------------------------------------------------------------------------------------ waveform
def _median_filter_rows(x: Tensor, size: int) -> Tensor:
    """SciPy's ``median_filter(x, size=(1, size), mode="nearest")`` along the last axis of ``x [R, G]``."""
    left, right = size // 2, (size - 1) // 2
    padded = torch.cat([x[:, :1].expand(-1, left), x, x[:, -1:].expand(-1, right)], dim=1)
    windows = padded.unfold(1, size, 1)  # [R, G, size]
    return windows.kthvalue(size // 2 + 1, dim=-1).values


def check_waveform(values: np.ndarray, rate_hz: float, p: WaveformPreprocess) -> None:
    """The checks :class:`~inspection.preprocess.WaveformPreprocess` makes before computing anything.

    Raises:
        RecordError: wrong channel count, a rate below :data:`~inspection.preprocess.WAVEFORM_MIN_RATE_HZ`, or
            fewer than 256 samples (the reference's messages).
    """
    if values.ndim != 2 or values.shape[0] != p.channels:
        raise RecordError(Reason.BAD_SHAPE,
                          f"this model's vibration input has {p.channels} channel(s); got shape {values.shape}")
    if rate_hz < WAVEFORM_MIN_RATE_HZ:
        raise RecordError(
            Reason.BAD_SAMPLE_RATE,
            f"this model reads vibration waveforms sampled at >= {WAVEFORM_MIN_RATE_HZ:g} Hz; got {rate_hz:g} Hz "
            "(a low-rate RMS series needs a model trained in series mode)",
        )
    if values.shape[1] < 256:
        raise RecordError(Reason.BAD_SHAPE, f"a vibration waveform needs >= 256 samples; got {values.shape[1]}")


def waveform_features(p: WaveformPreprocess, x: Tensor, rate_hz: float) -> dict[str, Tensor]:
    """What ``p(values, rate_hz)`` computes, for a batch of readings of one rate and length.

    Args:
        p: the model's waveform preprocessing.
        x: ``[B, C, S]`` readings (checked with :func:`check_waveform`), float32 or float64, any device.
        rate_hz: their sample rate.

    Returns:
        ``spectrum [B, C, n_bins]``, ``envelope [B, C, env_bins]``, ``wave [B, C, wave_len]`` in ``x``'s dtype.
    """
    b, c, n = x.shape
    x = x.reshape(b * c, n)
    x = x - x.mean(dim=1, keepdim=True)
    if p.level_invariant:
        x = x / x.pow(2).mean(dim=1, keepdim=True).sqrt().clamp(min=_SILENT_RMS_G)
    window = torch.hann_window(n, periodic=False, dtype=x.dtype, device=x.device)  # np.hanning
    scale = 2.0 / window.sum()
    spec = torch.fft.rfft(x * window, dim=1).abs() * scale  # [R, F]
    spectrum = _to_grid(spec, _grid_plan(n, float(rate_hz), float(p.f_max_hz), p.n_bins))

    freqs = torch.fft.rfftfreq(n, 1.0 / rate_hz, dtype=torch.float64, device=x.device)
    hp = torch.fft.rfft(x, dim=1)  # [R, F]
    stop = freqs < p.env_high_pass_hz
    if p.env_low_pass_hz is not None:
        stop = stop | (freqs >= p.env_low_pass_hz)
    hp = hp.masked_fill(stop, 0)
    # the analytic signal of irfft(hp): the one-sided spectrum, doubled between DC and Nyquist (scipy.hilbert)
    h = torch.zeros(hp.shape[1], dtype=x.dtype, device=x.device)
    h[0] = 1.0
    if n % 2 == 0:
        h[1:n // 2] = 2.0
        h[n // 2] = 1.0
    else:
        h[1:(n + 1) // 2] = 2.0
    env = torch.fft.ifft(hp * h, n=n, dim=1).abs()  # the missing negative frequencies are zero
    env_mean = env.mean(dim=1, keepdim=True)
    env = env - env_mean
    env_spec = torch.fft.rfft(env * window, dim=1).abs() * scale
    if p.env_modulation:
        env_spec = env_spec / env_mean.clamp(min=_SILENT_RMS_G)
    envelope = _to_grid(env_spec, _grid_plan(n, float(rate_hz), float(p.env_max_hz), p.env_bins))

    ratio = Fraction(p.wave_rate_hz / rate_hz).limit_denominator(1000)
    wave = _resample(x, _resample_plan(n, ratio.numerator, ratio.denominator), p.wave_len)
    log_env = torch.log(envelope + 1e-6)
    if p.env_relative:
        log_env = log_env - log_env.mean(dim=1, keepdim=True)
    if p.env_floor_bins:
        log_env = log_env - _median_filter_rows(log_env, p.env_floor_bins)
    return {
        "spectrum": torch.log(spectrum + 1e-6).reshape(b, c, -1),
        "envelope": log_env.reshape(b, c, -1),
        "wave": wave.reshape(b, c, -1),
    }


# ------------------------------------------------------------------------------------------ batches
@dataclass
class Prepared:
    """Readings of a batch prepared for the model.

    Attributes:
        inputs: modality -> input name -> ``[B, ...]`` tensor on the device (rows of units without the
            modality are zero).
        present: ``[B, M]`` bool (CPU): which modalities of each unit were prepared.
        failures: (unit index, modality, what went wrong) for every reading the preprocessing rejected.
    """

    inputs: dict[str, dict[str, Tensor]]
    present: Tensor
    failures: list[tuple[int, str, str]] = field(default_factory=list)


def prepare_readings(model, readings: Sequence[Mapping[str, object]], device: torch.device, *,
                     dtype: torch.dtype = torch.float32,
                     map_fn: Callable | None = None) -> Prepared:
    """Prepare a batch: ``readings[b]`` maps modality -> reading for unit b (modalities the model does not read
    are ignored).

    Waveform vibration readings are checked one by one, then grouped by (sample rate, length) and computed with
    :func:`waveform_features` on ``device``; every other reading goes through its encoder's ``prepare`` (mapped
    with ``map_fn``, e.g. a thread pool's ``map``, when given) and is copied to the device in one stacked
    tensor per input. A reading whose preprocessing fails, or whose prepared shape differs from the batch's
    majority, is listed in ``failures`` and left out.
    """
    from collections import Counter

    from inspection.encoders import WaveformEncoder
    from inspection.records import MODALITIES

    n = len(readings)
    mapper = map_fn or map
    present = torch.zeros(n, len(MODALITIES), dtype=torch.bool)
    inputs: dict[str, dict[str, Tensor]] = {}
    failures: list[tuple[int, str, str]] = []
    for m in model.config.modalities:
        encoder = model.encoders[m]
        rows = [b for b in range(n) if readings[b].get(m) is not None]
        if not rows:
            continue
        if isinstance(encoder, WaveformEncoder):
            p = encoder.config.preprocess
            groups: dict[tuple[float, int], list[int]] = {}
            for b in rows:
                reading = readings[b][m]
                try:
                    values = np.asarray(reading.values)
                    check_waveform(values, reading.sample_rate_hz, p)
                except Exception as exc:  # noqa: BLE001 - one bad reading must not stop the others
                    failures.append((b, m, f"{type(exc).__name__}: {exc}"))
                    continue
                groups.setdefault((float(reading.sample_rate_hz), values.shape[1]), []).append(b)
            if not groups:
                continue
            out = {name: torch.zeros(n, c, size, dtype=dtype, device=device)
                   for name, c, size in (("spectrum", p.channels, p.n_bins), ("envelope", p.channels, p.env_bins),
                                         ("wave", p.channels, p.wave_len))}
            for (rate, _), members in groups.items():
                stacked = np.stack([np.asarray(readings[b][m].values, dtype=np.float64) for b in members])
                x = torch.from_numpy(stacked).to(device=device, dtype=dtype, non_blocking=True)
                features = waveform_features(p, x, rate)
                index = torch.as_tensor(members, device=device)
                for name, value in features.items():
                    out[name].index_copy_(0, index, value)
                present[members, MODALITIES.index(m)] = True
            inputs[m] = out
            continue

        def one(b: int, encoder=encoder, m=m):
            try:
                return encoder.prepare(readings[b][m]), None
            except Exception as error:  # noqa: BLE001
                return None, error

        results = list(mapper(one, rows))
        good = []
        for b, (arrays, problem) in zip(rows, results, strict=True):
            if problem is not None:
                failures.append((b, m, f"{type(problem).__name__}: {problem}"))
            else:
                good.append((b, arrays))
        if not good:
            continue
        shapes = Counter(tuple((k, np.shape(v)) for k, v in arrays.items()) for _, arrays in good)
        majority = dict(shapes.most_common(1)[0][0])
        kept = []
        for b, arrays in good:
            bad = [(k, np.shape(v)) for k, v in arrays.items() if np.shape(v) != majority[k]]
            if bad:
                name, shape = bad[0]
                failures.append((b, m, f"preprocessed {m} input {name!r} has shape {shape}; the model takes "
                                       f"{majority[name]}"))
            else:
                kept.append((b, arrays))
        if not kept:
            continue
        out = {}
        for name, shape in majority.items():
            stack = np.zeros((n, *shape), np.float32)
            for b, arrays in kept:
                stack[b] = arrays[name]
            out[name] = torch.from_numpy(stack).to(device=device, dtype=dtype, non_blocking=True)
        present[[b for b, _ in kept], MODALITIES.index(m)] = True
        inputs[m] = out
    return Prepared(inputs, present, failures)
