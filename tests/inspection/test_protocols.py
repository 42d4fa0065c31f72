"""Benchmark protocols: cross-validation folds by recording, and test labels kept away from every selection
step (training, epoch choice, calibration)."""


import pytest

from inspection.benches import BEARINGS_FOLDS, bearing_folds, bearings_bench
from inspection.errors import ConfigError
from inspection.experiments import bench_data

pytestmark = pytest.mark.data


def _recordings(units):
    return {u.provenance["vibration"].split(":", 1)[1].split("@", 1)[0] for u in units}


@pytest.fixture(scope="module")
def recordings():
    from inspection.data.bearings import load_bearings

    return load_bearings()


def test_every_recording_is_a_test_recording_exactly_once(recordings):
    for seed in (0, 1, 2):
        folds = bearing_folds(recordings, seed)
        names = [n for fold in folds for n in fold]
        assert sorted(names) == sorted(r.name for r in recordings)  # each once, none missing
        assert len(folds) == BEARINGS_FOLDS
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
        label = {r.name: r.label for r in recordings}
        for klass in set(label.values()):  # a class is spread over the folds, not gathered
            per_fold = [sum(label[n] == klass for n in fold) for fold in folds]
            assert max(per_fold) - min(per_fold) <= 1, (klass, per_fold)
    assert bearing_folds(recordings, 0) == bearing_folds(recordings, 0)
    assert bearing_folds(recordings, 0) != bearing_folds(recordings, 1)  # the seed changes the folds
    with pytest.raises(ConfigError, match="folds"):
        bearing_folds(recordings, 0, folds=1)


def test_a_fold_trains_validates_and_tests_on_disjoint_recordings(recordings):
    seen_as_test = set()
    for fold in range(BEARINGS_FOLDS):
        data = bearings_bench(0, fold, train_hop_s=0.25, test_hop_s=0.25)
        train, val, test = _recordings(data.train), _recordings(data.val), _recordings(data.test)
        assert not (train & val or train & test or val & test)
        assert train | val | test == {r.name for r in recordings}
        assert test == set(bearing_folds(recordings, 0)[fold])
        # validation: one recording of each class that has two or more in the training fold
        assert len(val) == 3 and {u.label.defect_class for u in data.val} == {"ok", "inner_race", "outer_race"}
        seen_as_test |= test
        assert (data.fold, data.folds) == (fold, BEARINGS_FOLDS)
    assert seen_as_test == {r.name for r in recordings}
    with pytest.raises(ConfigError, match="fold"):
        bearings_bench(0, BEARINGS_FOLDS)


def test_selection_steps_get_the_test_split_without_labels():
    sealed = bench_data("bearings", 1, fold=2)
    opened = bench_data("bearings", 1, fold=2, test_labels=True)
    assert sealed.test and all(u.label is None for u in sealed.test)
    assert all(u.label is not None for u in opened.test)
    assert [u.unit_id for u in sealed.test] == [u.unit_id for u in opened.test]
    assert all(u.label is not None for u in sealed.train + sealed.val)
    with pytest.raises(ConfigError, match="bearings only"):
        bench_data("elpv", 0, fold=1)


@pytest.mark.slow
def test_training_and_calibration_run_on_a_fold_without_any_test_label(tmp_path):
    """The whole selection path (train with epoch choice on validation, then calibrate) works from a split whose
    test units carry no label at all; a step that read one would fail on it."""
    from inspection.experiments import calibrate_version, train_bench
    from inspection.training import TrainConfig

    small = ["bridge.n_layers=1", "bridge.n_queries=4", "bridge.n_heads=4", "bridge.moe.n_experts=4",
             "bridge.moe.hidden=32"]
    version = train_bench("bearings", 0, TrainConfig(epochs=1, batch_size=64, device="cpu", seed=0),
                          store_root=tmp_path / "models", out_root=tmp_path / "runs", dim=32, overrides=small,
                          progress=False, fold=3)
    card = version.card
    assert (card["fold"], card["data"]["fold"], card["data"]["folds"]) == (3, 3, BEARINGS_FOLDS)
    assert card["data"]["test_ids"] and card["train_seed"] == 0
    calibrated = calibrate_version(tmp_path / "models", "bearings", version.version)
    assert calibrated.card["calibration"]["n_units"]["*"] == card["data"]["n_val"]
    # the calibrated model's split is rebuilt from its card, and the fold is checked against it
    assert bench_data("bearings", 0, calibrated.card["data"]).fold == 3
    # a model restricted to some modalities (the composite baselines' path) trains and saves as well
    only = train_bench("bearings", 0, TrainConfig(epochs=1, batch_size=64, device="cpu", seed=0),
                       store_root=tmp_path / "models", out_root=tmp_path / "runs", dim=32, overrides=small,
                       progress=False, fold=3, modalities=["vibration"])
    assert only.card["name"] == "bearings-vibration" and list(only.card["modalities"]) == ["vibration"]
