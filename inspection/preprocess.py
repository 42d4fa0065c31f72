"""Preprocessing: readings -> fixed-size float32 arrays the encoders take. numpy/opencv only, no torch.

C channels · S samples · F frequency bins · L waveform length.

Each modality has a frozen config that travels with the model's weights (it is part of the model config), so a
stream decision, a re-scored decision and a training example of the same reading see the same numbers.

- vision: gray or RGB, 8- or 16-bit -> ``[3, size, size]`` in the backbone's normalisation (gray replicated;
  each of the three input channels can carry the plain image or a local-contrast-enhanced copy).
- vibration, ``waveform`` mode (kHz accelerometers): a log-magnitude spectrum on a fixed Hz grid (so recordings
  at different sample rates give comparable tokens), the envelope spectrum of the high-passed signal (where
  bearing fault frequencies show up), and the waveform resampled to a fixed rate for the 1-D conv branch.
- vibration, ``series`` mode (low-rate RMS channels, e.g. 1 Hz) and temperature: a fixed-length series per
  channel (the most recent ``samples``; shorter windows are left-padded with their first value).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from inspection.errors import ConfigError, Reason, RecordError

WAVEFORM_MIN_RATE_HZ = 1000.0  # below this a vibration reading is a low-rate series, not a waveform
_SILENT_RMS_G = 1e-9  # a channel quieter than this (g) is treated as silent when dividing by its level


#: What one backbone input channel can carry: the image as it is, or its CLAHE (contrast-limited adaptive
#: histogram equalisation: local contrast stretched tile by tile, with a cap on how much noise it amplifies).
VISION_CHANNEL_MODES = ("raw", "clahe")


@dataclass(frozen=True)
class VisionPreprocess:
    """Resize and normalise an image for a timm backbone.

    Attributes:
        image_size: output side in pixels (square).
        mean, std: per-channel normalisation of [0, 1] pixels (the backbone's pretraining statistics).
        channels: what each of the backbone's three input channels carries, from :data:`VISION_CHANNEL_MODES`.
            A gray image is replicated into all three first; a colour channel set to ``clahe`` is equalised on
            its own. ``("raw", "clahe", "raw")`` shows the network the plain image (absolute brightness: dark,
            inactive areas) and a copy where faint thin lines (cracks, finger interruptions) are stretched to
            full local contrast.
        clahe_clip: CLAHE clip limit (the cap on each tile's histogram, in multiples of its mean bin height).
        clahe_tiles: CLAHE tiles per side of the image.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channels: tuple[str, str, str] = ("raw", "raw", "raw")
    clahe_clip: float = 2.0
    clahe_tiles: int = 8

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [32, 1024] px; got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values with std > 0; got {self.mean}, {self.std}")
        object.__setattr__(self, "channels", tuple(self.channels))  # a list from Python code compares like JSON's
        if len(self.channels) != 3 or not set(self.channels) <= set(VISION_CHANNEL_MODES):
            raise ConfigError(f"channels needs 3 entries from {VISION_CHANNEL_MODES}; got {self.channels!r}")
        if not 0.0 < self.clahe_clip <= 40.0:
            raise ConfigError(f"clahe_clip must be in (0, 40]; got {self.clahe_clip}")
        if isinstance(self.clahe_tiles, bool) or not isinstance(self.clahe_tiles, int) or not 1 <= self.clahe_tiles <= 64:
            raise ConfigError(f"clahe_tiles must be an integer in [1, 64]; got {self.clahe_tiles!r}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``[H, W]`` or ``[H, W, 3]`` uint8/uint16 -> float32 ``[3, size, size]``."""
        import cv2

        scale = 255.0 if image.dtype == np.uint8 else 65535.0
        if self.channels != ("raw", "raw", "raw"):
            image = self._fill_channels(image)
        x = image.astype(np.float32) / scale
        x = cv2.resize(x, (self.image_size, self.image_size),
                       interpolation=cv2.INTER_AREA if min(image.shape[:2]) > self.image_size else cv2.INTER_LINEAR)
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, size, size]

    def _fill_channels(self, image: np.ndarray) -> np.ndarray:
        """``[H, W]`` or ``[H, W, 3]`` -> ``[H, W, 3]`` of the same dtype, each channel as ``channels`` says."""
        import cv2

        # made per call, not kept: an OpenCV CLAHE object keeps working buffers, and a batch's units are
        # preprocessed on several threads at once
        clahe = cv2.createCLAHE(clipLimit=self.clahe_clip, tileGridSize=(self.clahe_tiles, self.clahe_tiles))
        gray = image.ndim == 2
        equalised = clahe.apply(np.ascontiguousarray(image)) if gray else None  # one equalisation serves all three
        planes = []
        for c, mode in enumerate(self.channels):
            plane = image if gray else np.ascontiguousarray(image[:, :, c])
            if mode == "clahe":
                plane = equalised if gray else clahe.apply(plane)
            planes.append(plane)
        return np.stack(planes, axis=2)


@dataclass(frozen=True)
class WaveformPreprocess:
    """Spectra and a resampled waveform of a kHz vibration reading.

    Attributes:
        channels: accelerometer channels expected.
        f_max_hz: top of the spectrum grid; ``n_bins`` linear bins cover [0, f_max_hz).
        env_high_pass_hz: the envelope is taken of the signal above this frequency (the structural resonances
            that bearing impacts excite).
        env_max_hz, env_bins: the envelope spectrum grid (fault frequencies of rotating machines live here).
        wave_rate_hz, wave_len: the waveform branch's fixed sample rate and length (L).
        env_relative: divide each envelope spectrum by its geometric mean (in log terms: subtract the mean), so
            its tokens describe where the fault frequencies stand out, not how loud the machine is (load).
        env_modulation: divide each envelope spectrum by the envelope's mean, so it reads as modulation depth
            (the share of the resonance amplitude that pulses at each frequency: an impact train at a fault
            frequency gives a peak there whatever the load does to the vibration level).
        level_invariant: divide each channel by its RMS before the spectrum and the waveform, so they describe
            the shape of the vibration, not its level (which changes with load).
        env_floor_bins: when > 0, subtract from the log envelope spectrum its running median over this many bins
            (the local noise floor), leaving peak prominence: how far each frequency stands out of its
            neighbourhood. Impact trains at fault frequencies stay peaks whatever load does to the floor.
        env_low_pass_hz: when set, the envelope is taken of the band [env_high_pass_hz, env_low_pass_hz) only, so
            recordings at different sample rates demodulate the same resonance band (default: up to Nyquist).
    """

    channels: int = 1
    f_max_hz: float = 20_000.0
    n_bins: int = 1024
    env_high_pass_hz: float = 1_000.0
    env_max_hz: float = 1_000.0
    env_bins: int = 256
    wave_rate_hz: float = 24_414.0
    wave_len: int = 4096
    env_relative: bool = False
    env_modulation: bool = False
    level_invariant: bool = False
    env_floor_bins: int = 0
    env_low_pass_hz: float | None = None

    def __post_init__(self) -> None:
        if self.env_relative and self.env_modulation:
            raise ConfigError("env_relative and env_modulation are two normalisations of the envelope; choose one")
        if self.env_relative and self.env_floor_bins:
            raise ConfigError("env_relative and env_floor_bins are two normalisations of the envelope; choose one")
        if isinstance(self.env_floor_bins, bool) or not isinstance(self.env_floor_bins, int) or \
                not 0 <= self.env_floor_bins <= self.env_bins:
            raise ConfigError(f"env_floor_bins must be an integer in [0, env_bins={self.env_bins}]; "
                              f"got {self.env_floor_bins!r}")
        if self.env_low_pass_hz is not None and not self.env_low_pass_hz > self.env_high_pass_hz:
            raise ConfigError(f"env_low_pass_hz must be above env_high_pass_hz ({self.env_high_pass_hz:g} Hz); "
                              f"got {self.env_low_pass_hz!r}")
        if self.channels < 1 or self.n_bins < 8 or self.env_bins < 8 or self.wave_len < 64:
            raise ConfigError("channels >= 1, n_bins >= 8, env_bins >= 8 and wave_len >= 64 are required")
        if not (self.env_max_hz > 0 and self.f_max_hz > 0 and self.wave_rate_hz >= 2 * self.env_max_hz):
            raise ConfigError("frequencies must be positive and wave_rate_hz at least twice env_max_hz")

    def __call__(self, values: np.ndarray, rate_hz: float) -> dict[str, np.ndarray]:
        """``values [C, S]`` at ``rate_hz`` -> ``spectrum [C, n_bins]``, ``envelope [C, env_bins]``,
        ``wave [C, wave_len]`` (float32)."""
        from scipy import signal

        values = _check_channels(values, self.channels, "vibration")
        if rate_hz < WAVEFORM_MIN_RATE_HZ:
            raise RecordError(
                Reason.BAD_SAMPLE_RATE,
                f"this model reads vibration waveforms sampled at >= {WAVEFORM_MIN_RATE_HZ:g} Hz; got {rate_hz:g} Hz "
                "(a low-rate RMS series needs a model trained in series mode)",
            )
        x = values.astype(np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        n = x.shape[1]
        if n < 256:
            raise RecordError(Reason.BAD_SHAPE, f"a vibration waveform needs >= 256 samples; got {n}")
        if self.level_invariant:
            x = x / np.maximum(np.sqrt((x**2).mean(axis=1, keepdims=True)), _SILENT_RMS_G)
        window = np.hanning(n)
        spec = np.abs(np.fft.rfft(x * window, axis=1)) * (2.0 / window.sum())  # amplitude in g
        freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
        spectrum = _to_grid(spec, freqs, self.f_max_hz, self.n_bins)

        hp = np.fft.rfft(x, axis=1)
        hp[:, freqs < self.env_high_pass_hz] = 0.0
        if self.env_low_pass_hz is not None:
            hp[:, freqs >= self.env_low_pass_hz] = 0.0
        analytic = signal.hilbert(np.fft.irfft(hp, n=n, axis=1), axis=1)
        env = np.abs(analytic)
        env_mean = env.mean(axis=1, keepdims=True)
        env = env - env_mean
        env_spec = np.abs(np.fft.rfft(env * window, axis=1)) * (2.0 / window.sum())
        if self.env_modulation:
            env_spec = env_spec / np.maximum(env_mean, _SILENT_RMS_G)
        envelope = _to_grid(env_spec, freqs, self.env_max_hz, self.env_bins)

        ratio = Fraction(self.wave_rate_hz / rate_hz).limit_denominator(1000)
        wave = signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=1)
        wave = _fit_length(wave, self.wave_len)
        log_env = np.log(envelope + 1e-6)
        if self.env_relative:
            log_env = log_env - log_env.mean(axis=1, keepdims=True)
        if self.env_floor_bins:
            from scipy.ndimage import median_filter

            log_env = log_env - median_filter(log_env, size=(1, self.env_floor_bins), mode="nearest")
        return {
            "spectrum": np.log(spectrum + 1e-6).astype(np.float32),
            "envelope": log_env.astype(np.float32),
            "wave": wave.astype(np.float32),
        }


@dataclass(frozen=True)
class SeriesPreprocess:
    """A fixed-length multi-channel series (low-rate vibration RMS, temperature).

    Attributes:
        channels: channels expected.
        samples: series length S the encoder takes (the most recent samples of the reading).
    """

    channels: int = 2
    samples: int = 60

    def __post_init__(self) -> None:
        if self.channels < 1 or self.samples < 4:
            raise ConfigError(f"channels must be >= 1 and samples >= 4; got {self.channels}, {self.samples}")

    def __call__(self, values: np.ndarray, rate_hz: float) -> np.ndarray:
        """``values [C, S_in]`` -> float32 ``[C, samples]``."""
        values = _check_channels(values, self.channels, "series")
        return _fit_length(values.astype(np.float32), self.samples, keep="last")


def _check_channels(values: np.ndarray, channels: int, what: str) -> np.ndarray:
    if values.ndim != 2 or values.shape[0] != channels:
        raise RecordError(Reason.BAD_SHAPE, f"this model's {what} input has {channels} channel(s); got shape {values.shape}")
    return values


def _to_grid(spec: np.ndarray, freqs: np.ndarray, f_max: float, n_bins: int) -> np.ndarray:
    """Average a spectrum into ``n_bins`` equal bins of [0, f_max); bins above Nyquist stay 0."""
    edges = np.linspace(0.0, f_max, n_bins + 1)
    idx = np.searchsorted(edges, freqs, side="right") - 1
    keep = (idx >= 0) & (idx < n_bins)
    out = np.zeros((spec.shape[0], n_bins))
    counts = np.bincount(idx[keep], minlength=n_bins).astype(np.float64)
    for c in range(spec.shape[0]):
        out[c] = np.bincount(idx[keep], weights=spec[c, keep], minlength=n_bins)
    filled = counts > 0
    out[:, filled] /= counts[filled]
    # bins finer than the recording's resolution: interpolate from their neighbours
    if not filled.all() and filled.sum() >= 2:
        centres = (edges[:-1] + edges[1:]) / 2
        nyquist = freqs[-1]
        inside = centres <= nyquist
        for c in range(spec.shape[0]):
            out[c, inside & ~filled] = np.interp(centres[inside & ~filled], centres[filled], out[c, filled])
    return out


def _fit_length(x: np.ndarray, length: int, keep: str = "first") -> np.ndarray:
    n = x.shape[1]
    if n >= length:
        return x[:, :length] if keep == "first" else x[:, n - length:]
    pad = np.repeat(x[:, :1], length - n, axis=1) if keep == "last" else np.zeros((x.shape[0], length - n), x.dtype)
    return np.concatenate([pad, x] if keep == "last" else [x, pad], axis=1)
