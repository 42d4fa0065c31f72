"""Composite units: one real image, one real vibration window and one real temperature window per unit.

No public data set records all three sensors of the same unit, so the fused benchmark pairs real readings from
three real sources. The pairing is constructed; the readings are real:

- vision: an ELPV solar-cell image (defective when p >= 0.5), split with ELPV's seeded stratified split;
- vibration: a window of an MFPT-layout bearing recording (defective when outer or inner race fault), split
  by recording;
- temperature: a window of SKAB's ``Temperature`` and ``Thermocouple`` channels (1 Hz), split by file (the
  anomaly-free file by time segment). A temperature window counts as defective only when it lies inside a
  labelled anomaly *and* its mean moves at least ``min_temperature_z`` training standard deviations away from
  that file's normal part (its first 400 rows): many SKAB anomalies are valve faults the temperature probes never
  see, and blaming them on temperature would teach the model, and the explanations, the wrong culprit.

Every unit carries its :class:`~inspection.records.Label` (defect, class, **culprit modalities**) and its
provenance (which image / recording / file segment), so splits can be checked for leaks. Where SKAB is not
available the temperature comes from :mod:`inspection.data.thermal` and every unit says "synthetic temperature".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np

from inspection.data import thermal
from inspection.data._common import stratified_split
from inspection.errors import ConfigError, DataError
from inspection.records import (
    MODALITIES,
    Label,
    TemperatureReading,
    Unit,
    VibrationReading,
    VisionReading,
)

log = logging.getLogger(__name__)

Split = Literal["train", "test", "val"]
#: The splits, in the order that seeds each unit's draw (``val`` last, so adding it left every test unit as it was).
SPLITS: tuple[str, ...] = ("train", "test", "val")
SKAB_TRAIN_ROWS = 400
EPOCH = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


@dataclass(frozen=True)
class CompositeConfig:
    """How composite units are drawn.

    Attributes:
        seed: seeds every split and every draw; the same seed gives the same units.
        defect_rate: fraction of defective units.
        multi_culprit_rate: fraction of defective units with two culprit modalities (the rest have one).
        vibration_window_s: vibration window length in seconds (samples = round(rate * seconds)).
        vibration_hop_s: hop between candidate vibration windows.
        temperature_window: temperature window length in samples (1 Hz, so seconds).
        temperature_hop: hop between candidate temperature windows.
        min_temperature_z: how far (in training standard deviations) a temperature window's mean must move to
            count as a temperature culprit.
        test_fraction: share of ELPV images and SKAB files held out for the test split.
        val_fraction: share of the training split's ELPV images and SKAB files held out as the validation split's
            sources (and of the anomaly-free file's training rows); the validation split also takes one training
            bearing recording per class (drawn with the seed) from every class that has two or more. Validation
            units never share a source with training or test units.
        line_ids: production lines to spread units over (round robin).
        temperature_source: ``auto`` (SKAB when its folder exists, else the simulator), ``skab`` or ``synthetic``.
        skab_root: SKAB folder (default: see :func:`inspection.data.skab.skab_root`).
        bearings_split_seed: None keeps the bearing package's own train/test recordings; an int re-splits them.
    """

    seed: int = 0
    defect_rate: float = 0.5
    multi_culprit_rate: float = 0.2
    vibration_window_s: float = 0.25
    vibration_hop_s: float = 0.125
    temperature_window: int = 60
    temperature_hop: int = 10
    min_temperature_z: float = 3.0
    test_fraction: float = 0.25
    val_fraction: float = 0.2
    line_ids: tuple[str, ...] = ("line-1",)
    temperature_source: str = "auto"
    skab_root: str | None = None
    bearings_split_seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ConfigError(f"defect_rate must be in [0, 1]; got {self.defect_rate}")
        if not 0.0 <= self.multi_culprit_rate <= 1.0:
            raise ConfigError(f"multi_culprit_rate must be in [0, 1]; got {self.multi_culprit_rate}")
        if not (self.vibration_hop_s > 0 and 0 < self.vibration_window_s <= 2.0):
            raise ConfigError("vibration_window_s must be in (0, 2] s and vibration_hop_s > 0")
        if self.temperature_window < 8 or self.temperature_hop < 1:
            raise ConfigError("temperature_window must be >= 8 samples and temperature_hop >= 1")
        if self.temperature_source not in ("auto", "skab", "synthetic"):
            raise ConfigError(f"temperature_source must be auto, skab or synthetic; got {self.temperature_source!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        if not self.line_ids:
            raise ConfigError("line_ids must name at least one line")


@dataclass(frozen=True)
class _Window:
    """A candidate window of a source: where it is and whether it is defective."""

    source: str  # recording or file name
    start: int
    length: int
    defective: bool
    klass: str


@dataclass
class _Pools:
    vision_ok: list = field(default_factory=list)
    vision_bad: list = field(default_factory=list)
    vibration_ok: list[_Window] = field(default_factory=list)
    vibration_bad: list[_Window] = field(default_factory=list)
    temperature_ok: list[_Window] = field(default_factory=list)
    temperature_bad: list[_Window] = field(default_factory=list)


class CompositeBuilder:
    """Loads the three sources once and draws seeded composite units per split.

    Example:
        >>> builder = CompositeBuilder(CompositeConfig(seed=0))
        >>> units = builder.units("test", 100)
    """

    def __init__(self, config: CompositeConfig = CompositeConfig()) -> None:
        from inspection.data import bearings, elpv, skab

        self.config = config
        self._elpv = elpv.load_elpv()
        vis_train, vis_test = self._elpv.split(config.seed, config.test_fraction)
        keep, held = stratified_split([(it.grade, it.cell_type) for it in vis_train], config.val_fraction,
                                      config.seed + 1000)
        vis_train, vis_val = [vis_train[i] for i in keep], [vis_train[i] for i in held]
        recordings = bearings.load_bearings()
        self._recordings = {r.name: r for r in recordings}
        vib_train, vib_test = bearings.split_recordings(recordings, seed=config.bearings_split_seed)
        vib_train, vib_val = _hold_out_recordings(vib_train, config.seed)

        self.temperature_source = self._resolve_temperature_source(skab)
        self._skab: dict = {}
        self._pools = {s: _Pools() for s in SPLITS}
        for split, items in (("train", vis_train), ("val", vis_val), ("test", vis_test)):
            pool = self._pools[split]
            for it in items:
                (pool.vision_bad if it.defective else pool.vision_ok).append(it)
        for split, recs in (("train", vib_train), ("val", vib_val), ("test", vib_test)):
            pool = self._pools[split]
            for rec in recs:
                length = int(round(config.vibration_window_s * rec.sample_rate_hz))
                hop = max(1, int(round(config.vibration_hop_s * rec.sample_rate_hz)))
                for start in range(0, rec.signal.shape[0] - length + 1, hop):
                    w = _Window(rec.name, start, length, rec.label != "baseline", rec.label)
                    (pool.vibration_bad if w.defective else pool.vibration_ok).append(w)
        if self.temperature_source == "skab":
            self._build_skab_pools(skab)
        for split in SPLITS:
            pool = self._pools[split]
            empty = [
                name
                for name in ("vision_ok", "vision_bad", "vibration_ok", "vibration_bad")
                + (("temperature_ok", "temperature_bad") if self.temperature_source == "skab" else ())
                if not getattr(pool, name)
            ]
            if empty:
                raise DataError(f"composite {split} split has no candidates for {empty}; change the seed or windows")

    # ------------------------------------------------------------------------------------------ sources
    def _resolve_temperature_source(self, skab) -> str:
        choice = self.config.temperature_source
        if choice == "synthetic":
            return "synthetic"
        try:
            skab.skab_root(self.config.skab_root)
            return "skab"
        except DataError:
            if choice == "skab":
                raise
            log.warning("SKAB not found: composite units use the thermal simulator (%s)", thermal.SYNTHETIC_NOTE)
            return "synthetic"

    def _build_skab_pools(self, skab) -> None:
        cfg = self.config
        files = skab.load_skab(cfg.skab_root)
        free = skab.load_skab_anomaly_free(cfg.skab_root)
        per_file: dict[str, tuple[list[_Window], list[_Window]]] = {}
        for f in files:
            temps = f.channels(skab.TEMPERATURE_CHANNELS).astype(np.float64)  # [2, T]
            self._skab[f.name] = temps
            ref = temps[:, :SKAB_TRAIN_ROWS]
            mean, std = ref.mean(axis=1), np.maximum(ref.std(axis=1), 0.05)
            ok, bad = [], []
            for start in range(0, temps.shape[1] - cfg.temperature_window + 1, cfg.temperature_hop):
                sl = slice(start, start + cfg.temperature_window)
                anomalous = f.anomaly[sl].mean()
                if anomalous == 0:
                    ok.append(_Window(f.name, start, cfg.temperature_window, False, "ok"))
                elif anomalous >= 0.5:
                    z = np.abs(temps[:, sl].mean(axis=1) - mean) / std
                    if z.max() >= cfg.min_temperature_z:
                        bad.append(_Window(f.name, start, cfg.temperature_window, True, f.name.split("/")[0]))
            per_file[f.name] = (ok, bad)
        names = sorted(per_file)
        strata = [bool(per_file[n][1]) for n in names]
        train_idx, test_idx = stratified_split(strata, self.config.test_fraction, self.config.seed)
        keep, held = stratified_split([strata[i] for i in train_idx], cfg.val_fraction, cfg.seed + 1000)
        for split, idx in (("train", train_idx[keep]), ("val", train_idx[held]), ("test", test_idx)):
            pool = self._pools[split]
            for i in idx:
                ok, bad = per_file[names[i]]
                pool.temperature_ok += ok
                pool.temperature_bad += bad
        # the anomaly-free file by time: training rows, then validation rows, then the last test_fraction of rows
        # for test; no window crosses a cut
        temps = free.channels(skab.TEMPERATURE_CHANNELS).astype(np.float64)
        self._skab[free.name] = temps
        cut = int(temps.shape[1] * (1 - cfg.test_fraction))
        val_cut = int(cut * (1 - cfg.val_fraction))
        for split, lo, hi in (("train", 0, val_cut), ("val", val_cut, cut), ("test", cut, temps.shape[1])):
            for start in range(lo, hi - cfg.temperature_window + 1, cfg.temperature_hop):
                self._pools[split].temperature_ok.append(_Window(free.name, start, cfg.temperature_window, False, "ok"))

    def sources(self, split: Split) -> dict[str, set[str]]:
        """Every underlying item a split may draw from: ELPV image names, bearing recordings, and SKAB files
        (the anomaly-free file as ``name@first_row-last_row`` segments). No two splits share one."""
        pool = self._pools[split]
        temperature: set[str] = set()
        free_rows = [(w.start, w.start + w.length - 1) for w in pool.temperature_ok if w.source == "anomaly-free"]
        for w in pool.temperature_ok + pool.temperature_bad:
            if w.source != "anomaly-free":
                temperature.add(w.source)
        if free_rows:
            temperature.add(f"anomaly-free@{min(r[0] for r in free_rows)}-{max(r[1] for r in free_rows)}")
        return {
            "vision": {it.name for it in pool.vision_ok + pool.vision_bad},
            "vibration": {w.source for w in pool.vibration_ok + pool.vibration_bad},
            "temperature": temperature,
        }

    def pool_sizes(self, split: Split) -> dict[str, int]:
        """How many candidate items each pool of a split holds (for logs and docs)."""
        pool = self._pools[split]
        return {k: len(v) for k, v in vars(pool).items()}

    # ------------------------------------------------------------------------------------------ drawing
    def units(self, split: Split, n: int, *, start_index: int = 0) -> list[Unit]:
        """The first ``n`` units of a split (the same every call for the same config)."""
        return list(self.iter_units(split, n, start_index=start_index))

    def iter_units(self, split: Split, n: int, *, start_index: int = 0) -> Iterator[Unit]:
        """Yield units ``start_index .. start_index + n - 1`` of a split; unit i depends only on (seed, split, i)."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}; got {split!r}")
        if n < 0 or start_index < 0:
            raise ConfigError(f"n and start_index must be >= 0; got {n}, {start_index}")
        for i in range(start_index, start_index + n):
            yield self._unit(split, i)

    def _unit(self, split: str, i: int) -> Unit:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
        pool = self._pools[split]
        culprits: frozenset[str] = frozenset()
        if rng.random() < cfg.defect_rate:
            k = 2 if rng.random() < cfg.multi_culprit_rate else 1
            culprits = frozenset(rng.choice(MODALITIES, size=k, replace=False).tolist())
        unit_id = f"{split}-s{cfg.seed}-{i:06d}"
        line_id = cfg.line_ids[i % len(cfg.line_ids)]
        t0 = EPOCH + timedelta(seconds=10 * i)
        env = dict(unit_id=unit_id, line_id=line_id)
        provenance: dict[str, str] = {"split": split, "temperature_source": self.temperature_source}

        item = _pick(rng, pool.vision_bad if "vision" in culprits else pool.vision_ok)
        vision = VisionReading(
            data=item.read_bytes(), content_type="image/png", reading_id=f"{unit_id}-vision",
            source=f"plant/{line_id}/camera", event_time=t0, **env,
        )
        provenance["vision"] = f"elpv:{item.name}"

        w = _pick(rng, pool.vibration_bad if "vibration" in culprits else pool.vibration_ok)
        rec = self._recordings[w.source]
        vibration = VibrationReading(
            values=rec.signal[None, w.start : w.start + w.length], sample_rate_hz=rec.sample_rate_hz, unit="g",
            reading_id=f"{unit_id}-vibration", source=f"plant/{line_id}/accelerometer",
            event_time=t0 + timedelta(milliseconds=250), **env,
        )
        provenance["vibration"] = f"bearings:{w.source}@{w.start}+{w.length}"

        if self.temperature_source == "skab":
            tw = _pick(rng, pool.temperature_bad if "temperature" in culprits else pool.temperature_ok)
            values = self._skab[tw.source][:, tw.start : tw.start + tw.length]
            provenance["temperature"] = f"skab:{tw.source}@{tw.start}+{tw.length}"
        else:
            fault = str(rng.choice(thermal.FAULTS)) if "temperature" in culprits else None
            values = thermal.simulate(rng, cfg.temperature_window, fault)
            provenance["temperature"] = f"{thermal.SYNTHETIC_NOTE}:{fault or 'healthy'}"
        temperature = TemperatureReading(
            values=values, sample_rate_hz=1.0, unit="degC", reading_id=f"{unit_id}-temperature",
            source=f"plant/{line_id}/thermocouples", event_time=t0 + timedelta(milliseconds=500), **env,
        )
        defect_class = "ok" if not culprits else (next(iter(culprits)) if len(culprits) == 1 else "multiple")
        severity = item.probability if "vision" in culprits else None
        label = Label(defect=bool(culprits), defect_class=defect_class, culprits=culprits, severity=severity)
        return Unit(unit_id, line_id, vision=vision, vibration=vibration, temperature=temperature, label=label,
                    provenance=provenance)


def _hold_out_recordings(recordings: list, seed: int) -> tuple[list, list]:
    """(training, validation) recordings: per class with two or more recordings, one drawn with ``seed``."""
    rng = np.random.default_rng([int(seed), 4])
    held = set()
    for klass in sorted({r.label for r in recordings}):
        names = sorted(r.name for r in recordings if r.label == klass)
        if len(names) >= 2:
            held.add(str(rng.choice(names)))
    return [r for r in recordings if r.name not in held], [r for r in recordings if r.name in held]


def _pick(rng: np.random.Generator, pool: list):
    return pool[int(rng.integers(0, len(pool)))]
