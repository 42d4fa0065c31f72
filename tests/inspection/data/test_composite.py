"""Composite units: seeded, labels consistent with their real sources, splits that never share a source."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from inspection.data import bearings, elpv, skab, thermal
from inspection.data.composite import CompositeBuilder, CompositeConfig
from inspection.errors import ConfigError, DataError

pytestmark = [pytest.mark.data, pytest.mark.slow]

N_TEST = 400


@pytest.fixture(scope="module")
def builder():
    try:
        skab.skab_root()
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")
    return CompositeBuilder(CompositeConfig(seed=7))


@pytest.fixture(scope="module")
def test_units(builder):
    return builder.units("test", N_TEST)


def test_sources_never_cross_splits(builder):
    sources = {split: builder.sources(split) for split in ("train", "val", "test")}
    for modality in ("vision", "vibration", "temperature"):
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert sources[a][modality] and sources[b][modality]
            assert not sources[a][modality] & sources[b][modality], (modality, a, b)
    # validation holds out one bearing recording of each class (ok, inner race, outer race)
    assert len(sources["val"]["vibration"]) == 3
    # the anomaly-free SKAB file is split in time: train rows, then validation rows, then test rows
    spans = {}
    for split, found in sources.items():
        (span,) = [s for s in found["temperature"] if s.startswith("anomaly-free@")]
        spans[split] = tuple(int(x) for x in span.split("@")[1].split("-"))
    assert spans["train"][1] < spans["val"][0] <= spans["val"][1] < spans["test"][0]


def test_validation_units_draw_only_from_held_out_sources_and_keep_test_units_as_they_were(builder):
    allowed = builder.sources("val")
    units = builder.units("val", 60)
    for u in units:
        assert u.provenance["vision"].removeprefix("elpv:") in allowed["vision"]
        assert u.provenance["vibration"].removeprefix("bearings:").split("@")[0] in allowed["vibration"]
    assert 0 < sum(u.label.defect for u in units) < len(units)
    assert {u.unit_id for u in units}.isdisjoint({u.unit_id for u in builder.units("test", 60)})
    # how much of the training split validation takes changes no test unit
    other = CompositeBuilder(CompositeConfig(seed=7, val_fraction=0.35))
    assert [dict(u.provenance) for u in other.units("test", 30)] == [dict(u.provenance)
                                                                     for u in builder.units("test", 30)]
    assert other.sources("val")["vision"] != allowed["vision"]


def test_units_draw_only_from_their_split(builder, test_units):
    allowed = builder.sources("test")
    for u in test_units:
        assert u.provenance["vision"].removeprefix("elpv:") in allowed["vision"]
        assert u.provenance["vibration"].removeprefix("bearings:").split("@")[0] in allowed["vibration"]
        name = u.provenance["temperature"].removeprefix("skab:").split("@")[0]
        assert name == "anomaly-free" or name in allowed["temperature"]


def test_culprit_labels_match_the_real_sources(test_units):
    images = {it.name: it for it in elpv.load_elpv()}
    recordings = {r.name: r for r in bearings.load_bearings()}
    files = {f.name: f for f in skab.load_skab()}
    for u in test_units:
        lab = u.label
        img = images[u.provenance["vision"].removeprefix("elpv:")]
        assert ("vision" in lab.culprits) == img.defective, u.unit_id
        assert u.vision.data == img.read_bytes()  # the real file's bytes, not a re-encoding

        rec_name, start, length = re.fullmatch(r"bearings:(.+)@(\d+)\+(\d+)", u.provenance["vibration"]).groups()
        rec = recordings[rec_name]
        assert ("vibration" in lab.culprits) == (rec.label != "baseline"), u.unit_id
        np.testing.assert_array_equal(u.vibration.values[0], rec.signal[int(start):int(start) + int(length)])
        assert u.vibration.sample_rate_hz == rec.sample_rate_hz

        name, start, length = re.fullmatch(r"skab:(.+)@(\d+)\+(\d+)", u.provenance["temperature"]).groups()
        sl = slice(int(start), int(start) + int(length))
        if name == "anomaly-free":
            assert "temperature" not in lab.culprits
            continue
        f = files[name]
        anomalous = f.anomaly[sl].mean()
        if "temperature" in lab.culprits:
            assert anomalous >= 0.5, u.unit_id
        else:
            assert anomalous == 0.0, u.unit_id
        np.testing.assert_allclose(u.temperature.values, f.channels(skab.TEMPERATURE_CHANNELS)[:, sl], rtol=1e-6)

        assert lab.defect == bool(lab.culprits)
        expected_class = "ok" if not lab.culprits else (next(iter(lab.culprits)) if len(lab.culprits) == 1
                                                        else "multiple")
        assert lab.defect_class == expected_class


def test_mix_follows_the_config(test_units):
    defect = np.mean([u.label.defect for u in test_units])
    assert abs(defect - 0.5) < 0.08  # binomial sd at n=400 is 0.025: 3 sd
    culprits = Counter(m for u in test_units for m in u.label.culprits)
    assert all(culprits[m] > 40 for m in ("vision", "vibration", "temperature"))
    multi = sum(len(u.label.culprits) == 2 for u in test_units)
    assert 0 < multi < sum(u.label.defect for u in test_units) * 0.4
    assert all(u.present == ("vision", "vibration", "temperature") for u in test_units)
    assert len({u.unit_id for u in test_units}) == N_TEST


def test_seeded_and_index_addressable(builder, test_units):
    again = CompositeBuilder(CompositeConfig(seed=7)).units("test", 10)
    assert again == test_units[:10]
    assert builder.units("test", 5, start_index=20) == test_units[20:25]
    other = CompositeBuilder(CompositeConfig(seed=8)).units("test", 10)
    assert [u.provenance["vision"] for u in other] != [u.provenance["vision"] for u in test_units[:10]]


def test_synthetic_temperature_fallback_says_so(tmp_path):
    b = CompositeBuilder(CompositeConfig(seed=1, skab_root=str(tmp_path / "no-skab-here")))
    assert b.temperature_source == "synthetic"
    units = b.units("train", 40)
    for u in units:
        assert u.provenance["temperature_source"] == "synthetic"
        assert u.provenance["temperature"].startswith(thermal.SYNTHETIC_NOTE)
        fault = u.provenance["temperature"].split(":")[1]
        assert (fault != "healthy") == ("temperature" in u.label.culprits)
        assert u.temperature.values.shape == (2, 60)
    with pytest.raises(DataError):
        CompositeBuilder(CompositeConfig(temperature_source="skab", skab_root=str(tmp_path / "missing")))


@pytest.mark.parametrize("bad", [dict(defect_rate=1.5), dict(temperature_source="sometimes"), dict(line_ids=()),
                                 dict(temperature_window=2), dict(val_fraction=0.0), dict(val_fraction=1.0)])
def test_config_is_validated(bad):
    with pytest.raises(ConfigError):
        CompositeConfig(**bad)
