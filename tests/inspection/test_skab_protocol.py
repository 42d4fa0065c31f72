"""The slope-T² detector and SKAB's leave-one-folder-out selection: closed forms, causality, streaming, real SKAB
rows with injected faults, the evaluate command against the published reproduction anchors, the a-priori
configuration, false alarms on long normal runs and the bootstrap interval."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from inspection.anomaly import SlopeT2Config, SlopeT2Detector, persistent_alarms
from inspection.errors import ConfigError, DataError, NotCalibratedError

TRAIN_ROWS = 400
#: Rows of an anomaly-free segment: about a labelled file.
SEGMENT_ROWS = 1150
#: Injected step: test rows FAULT_START..FAULT_STOP of each segment, this many fitting-part standard deviations.
FAULT_START, FAULT_STOP, FAULT_SIZE = 170, 570, 6.0
#: A fault counts as caught when at least this share of its rows alarm once the 60-row window has filled.
CAUGHT_SHARE = 0.9
#: "Mostly quiet": at most this share of an unmodified normal run's rows alarm. Normal SKAB operation drifts
#: after the 400 fitting rows, so a T² fitted on them alarms on some of it; a third is the most we accept.
QUIET_SHARE = 1 / 3
#: Scores of chunked and one-call streams: the same arithmetic on the same windows, so equal up to rounding of
#: the quadratic form (far below any threshold gap that matters).
STREAM_RTOL = 1e-12

#: Published reproduction anchors of the leave-one-folder-out protocol over the 4,752-configuration grid.
ANCHOR_COUNTS = {"tp": 9824, "fp": 1213, "tn": 9817, "fn": 2947}
ANCHOR_CHOICES = {
    "valve1": {"lag": 20, "smoothing": "box", "window": 30, "quantile": 0.999, "factor": 1.2, "rule": "all",
               "persistence": 1},
    "valve2": {"lag": 60, "smoothing": "box", "window": 60, "quantile": 1.0, "factor": 0.8, "rule": "all",
               "persistence": 1},
    "other": {"lag": 60, "smoothing": "box", "window": 60, "quantile": 0.999, "factor": 1.1, "rule": "all",
              "persistence": 1},
}
SUMMARY_KEYS = {"benchmark", "metric", "value", "far", "mar", "baselines", "split", "seed", "model_version",
                "machine", "commit", "command", "date", "protocol", "n_test", "ci95", "seeds", "a_priori",
                "normal_runs", "selection"}
#: The cross-validated F1 must beat this harness's own Hotelling T² reproduction by at least this much.
MARGIN_OVER_T2 = 0.05


def _skab():
    from inspection.data import skab

    return skab


@pytest.fixture(scope="module")
def skab_files():
    try:
        return _skab().load_skab()
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")


@pytest.fixture(scope="module")
def free_segments() -> list[np.ndarray]:
    try:
        free = _skab().load_skab_anomaly_free().values
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")
    return [free[s:s + SEGMENT_ROWS] for s in range(0, len(free) - SEGMENT_ROWS + 1, SEGMENT_ROWS)]


@pytest.fixture(scope="module")
def free_rows() -> np.ndarray:
    try:
        return _skab().load_skab_anomaly_free().values
    except DataError as exc:
        pytest.skip(f"SKAB folder not available: {exc}")


@pytest.fixture(scope="module")
def skab_result(skab_files, tmp_path_factory) -> dict:
    """``skab.json`` as the evaluate command writes it (run once for the module)."""
    from services.cli import main

    folder = tmp_path_factory.mktemp("skab_results")
    assert main(["evaluate", "--bench", "skab", "--results", str(folder)]) == 0
    return json.loads((folder / "skab.json").read_text())


def flipped(files, folders=None):
    """The files with every scored label (rows after the fitting part) flipped, in ``folders`` (default all)."""
    skab = _skab()
    out = []
    for f in files:
        if folders is None or f.name.split("/", 1)[0] in folders:
            labels = np.array(f.anomaly)
            labels[TRAIN_ROWS:] = 1 - labels[TRAIN_ROWS:]
            f = skab.SkabFile(name=f.name, times=f.times, values=f.values, anomaly=labels,
                              changepoint=f.changepoint)
        out.append(f)
    return out


def skab_config(**params) -> SlopeT2Config:
    from inspection.skab_protocol import skab_slope_config

    return skab_slope_config(**params)


def plant(rng: np.random.Generator, rows: int = 900) -> tuple[np.ndarray, tuple[str, ...]]:
    """[rows, 4] synthetic rows: two steady channels, one warming channel, one noisy channel."""
    t = np.arange(rows)
    x = np.column_stack([
        5.0 + rng.normal(0, 1.0, rows),
        -1.0 + rng.normal(0, 0.3, rows),
        20.0 + 0.01 * t + rng.normal(0, 0.2, rows),
        rng.normal(0, 2.0, rows),
    ])
    return x, ("a", "b", "temp", "c")


# ------------------------------------------------------------------------------------------ closed forms
def test_persistence_rules_match_their_definitions():
    raw = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    np.testing.assert_array_equal(persistent_alarms(raw, "all", 1), raw)
    # all 3: rows 0 and 1 have fewer than 3 rows; row 5 is the only one closing three set rows
    np.testing.assert_array_equal(persistent_alarms(raw, "all", 3), [0, 0, 0, 0, 0, 1, 0, 0, 0])
    # majority 3: more than half of the available rows (1, 2, then 3)
    np.testing.assert_array_equal(persistent_alarms(raw, "majority", 3), [1, 1, 1, 1, 1, 1, 1, 0, 0])
    stacked = persistent_alarms(np.stack([raw, ~raw]), "all", 2)  # rules act on the last axis
    np.testing.assert_array_equal(stacked[1], persistent_alarms(~raw, "all", 2))
    with pytest.raises(ConfigError, match="rule"):
        persistent_alarms(raw, "any", 3)


def test_a_level_shift_scores_as_its_closed_form_t2():
    """One channel, box window 1, no ridge: T² of a row is ((x − mean) / std − c)² / var of the standardised
    fitting rows (ddof 1), i.e. ((x − mean)² / var_ddof1) since c = 0."""
    rng = np.random.default_rng(0)
    fit = rng.normal(3.0, 2.0, (200, 1))
    det = SlopeT2Detector(SlopeT2Config(channels=("a",), window=1, ridge=0.0, quantile=1.0)).fit(fit)
    rows = np.array([[3.0], [7.0], [-1.0]])
    expected = (rows[:, 0] - fit.mean()) ** 2 / fit.var(ddof=1)
    np.testing.assert_allclose(det.score(rows), expected, rtol=1e-10)
    assert det.threshold == pytest.approx(float(np.max(det.fitted_scores)))


# ------------------------------------------------------------------------------------------ causality, streams
@pytest.mark.parametrize("params", [
    {"lag": 20, "smoothing": "box", "window": 30},
    {"lag": 60, "smoothing": "ewma", "rate": 0.1, "rule": "majority", "persistence": 15, "quantile": 0.99},
    {"lag": 30, "smoothing": "box", "window": 10, "rule": "all", "persistence": 10, "factor": 0.8},
])
def test_predictions_use_only_earlier_rows(params):
    rng = np.random.default_rng(1)
    x, names = plant(rng)
    config = SlopeT2Config(channels=names, differenced=("temp",), **params)
    test = x[TRAIN_ROWS:]
    ref_scores = SlopeT2Detector(config).fit(x[:TRAIN_ROWS]).score(test)
    ref = SlopeT2Detector(config).fit(x[:TRAIN_ROWS]).predict(test)
    for i in (0, 37, 250):
        changed = test.copy()
        changed[i + 1:] = rng.normal(50.0, 30.0, changed[i + 1:].shape)  # a wild future
        det = SlopeT2Detector(config).fit(x[:TRAIN_ROWS])
        scores = det.score(changed)
        np.testing.assert_array_equal(scores[:i + 1], ref_scores[:i + 1])
        assert not np.allclose(scores[i + 1:], ref_scores[i + 1:])  # the future did change
        pred = SlopeT2Detector(config).fit(x[:TRAIN_ROWS]).predict(changed)
        np.testing.assert_array_equal(pred[:i + 1], ref[:i + 1])


@pytest.mark.data
@pytest.mark.parametrize("params", [
    {"lag": 20, "smoothing": "box", "window": 30, "quantile": 0.999, "factor": 1.2},
    {"lag": 30, "smoothing": "ewma", "rate": 0.05, "quantile": 0.99, "factor": 1.5, "rule": "majority",
     "persistence": 15},
    {"lag": 60, "smoothing": "box", "window": 60, "quantile": 1.0, "factor": 0.8, "rule": "all",
     "persistence": 30},
])
def test_feeding_rows_in_chunks_equals_one_call(skab_files, params):
    config = skab_config(**params)
    checked = 0
    for f in skab_files[::5]:
        train, test = f.values[:TRAIN_ROWS], f.values[TRAIN_ROWS:]
        whole = SlopeT2Detector(config).fit(train)
        one_pred = whole.predict(test)
        one_scores = SlopeT2Detector(config).fit(train).score(test)
        for cuts in ((1,), (7, 8, 300), (len(test) // 2,)):
            det = SlopeT2Detector(config).fit(train)
            parts = np.split(np.arange(len(test)), cuts)
            pred = np.concatenate([det.predict(test[p]) for p in parts])
            np.testing.assert_array_equal(pred, one_pred, err_msg=f"{f.name} cut at {cuts}")
            det = SlopeT2Detector(config).fit(train)
            scores = np.concatenate([det.score(test[p]) for p in parts])
            np.testing.assert_allclose(scores, one_scores, rtol=STREAM_RTOL)
        # scoring a chunk advances the persistence history just like predicting it
        det = SlopeT2Detector(config).fit(train)
        det.score(test[:100])
        np.testing.assert_array_equal(det.predict(test[100:]), one_pred[100:])
        checked += int(one_pred.any())
    assert checked > 0  # some files alarm, so the persistence history was exercised


# ------------------------------------------------------------------------------------------ real SKAB rows
@pytest.mark.data
def test_a_step_fault_on_real_normal_rows_alarms_and_unmodified_rows_stay_mostly_quiet(free_segments):
    skab = _skab()
    config = skab_config(**ANCHOR_CHOICES["other"])
    settle = config.window  # rows for the trailing mean to fill with faulty rows
    caught, quiet, unmodified_in_window = [], [], []
    for seg in free_segments:
        clean = SlopeT2Detector(config).fit(seg[:TRAIN_ROWS]).predict(seg[TRAIN_ROWS:])
        quiet.append(clean)
        unmodified_in_window.append(clean[FAULT_START + settle:FAULT_STOP])
        for channel in ("Current", "Pressure"):
            j = skab.FEATURES.index(channel)
            x = seg.copy()
            rows = slice(TRAIN_ROWS + FAULT_START, TRAIN_ROWS + FAULT_STOP)
            x[rows, j] += FAULT_SIZE * seg[:TRAIN_ROWS, j].std()
            pred = SlopeT2Detector(config).fit(x[:TRAIN_ROWS]).predict(x[TRAIN_ROWS:])
            caught.append(pred[FAULT_START + settle:FAULT_STOP])
    assert len(free_segments) >= 8
    hit = np.concatenate(caught).mean()
    assert hit >= CAUGHT_SHARE
    assert np.concatenate(quiet).mean() <= QUIET_SHARE
    assert hit - np.concatenate(unmodified_in_window).mean() >= 0.5


@pytest.mark.data
def test_the_grid_sweep_counts_what_each_configured_detector_predicts(skab_files):
    """The evaluation reports the sweep's counts, so they must be exactly those of the streaming detector built
    with each configuration, fitted and run by the protocol."""
    from inspection.skab_protocol import SelectionGrid, sweep_grid

    skab = _skab()
    files = [next(f for f in skab_files if f.name.startswith(g + "/")) for g in ("valve1", "valve2", "other")]
    grid = SelectionGrid(lags=(20,), smoothings=(("ewma", 0.1), ("box", 30)), quantiles=(0.999, 1.0),
                         factors=(0.8, 1.5), persistences=(("all", 1), ("all", 10), ("majority", 15)))
    sweep = sweep_grid(files, grid)
    assert sweep.counts.shape == (grid.size, 3, 4) and sweep.configs == tuple(grid.configs())
    for c, config in enumerate(sweep.configs):
        for n, f in enumerate(files):
            train, test = skab.protocol_split(f)
            pred = SlopeT2Detector(config).fit(train.values).predict(test.values)
            score = skab.skab_score([test.anomaly], [pred])
            assert sweep.counts[c, n].tolist() == [score.tp, score.fp, score.tn, score.fn], (config.label, f.name)
    # the grid's thresholds and rules do change the counts, so the comparison above can tell them apart
    assert len({tuple(sweep.counts[c].ravel()) for c in range(grid.size)}) > grid.size // 2


@pytest.mark.data
def test_selection_never_looks_at_the_held_out_folders_labels(skab_files):
    from inspection.skab_protocol import SelectionGrid, leave_one_folder_out, sweep_grid

    skab = _skab()
    grid = SelectionGrid()
    before = {c.folder: c for c in leave_one_folder_out(sweep_grid(skab_files, grid))}
    for held in ("valve2", "other"):
        rng = np.random.default_rng(7)
        changed = []
        for f in skab_files:
            if f.name.startswith(held + "/"):
                labels = np.array(f.anomaly)
                labels[TRAIN_ROWS:] = 1 - labels[TRAIN_ROWS:]  # flip every scored label ...
                labels[TRAIN_ROWS + rng.integers(0, 50, 10)] ^= 1  # ... and perturb a few back
                f = skab.SkabFile(name=f.name, times=f.times, values=f.values, anomaly=labels,
                                  changepoint=f.changepoint)
            changed.append(f)
        after = {c.folder: c for c in leave_one_folder_out(sweep_grid(changed, grid))}
        assert after[held].config == before[held].config
        assert after[held].f1_other_folders == before[held].f1_other_folders
        assert not np.array_equal(after[held].held_out, before[held].held_out)  # its labels did change
        others = [g for g in before if g != held]
        # the other folders' selections do see these labels
        assert any(after[g].f1_other_folders != before[g].f1_other_folders for g in others)


@pytest.mark.data
def test_evaluate_command_writes_skab_json_reproducing_the_anchors(skab_result):
    result = skab_result
    summary = result["summary"]
    assert set(summary) >= SUMMARY_KEYS
    assert summary["benchmark"] == "skab"
    assert summary["value"] > 0.78
    # a degraded detector must fail here: the selection has to beat this harness's plain Hotelling T² clearly
    assert summary["value"] >= summary["baselines"]["T-squared, this harness"] + MARGIN_OVER_T2
    assert result["counts"] == ANCHOR_COUNTS
    tp, fp, tn, fn = (ANCHOR_COUNTS[k] for k in ("tp", "fp", "tn", "fn"))
    assert summary["value"] == pytest.approx(tp / (tp + (fp + fn) / 2))
    assert summary["far"] == pytest.approx(100 * fp / (fp + tn))
    assert summary["mar"] == pytest.approx(100 * fn / (fn + tp))
    assert summary["baselines"]["T-squared, this harness"] == pytest.approx(0.66, abs=0.005)
    selection = summary["selection"]
    assert selection["grid_size"] == 4752
    for folder, expected in ANCHOR_CHOICES.items():
        chosen = SlopeT2Config.from_dict(selection["per_folder"][folder]["detector"])
        assert {k: getattr(chosen, k) for k in expected} == expected, folder
    per_folder_counts = {k: sum(v["held_out"][k] for v in selection["per_folder"].values())
                         for k in ANCHOR_COUNTS}
    assert per_folder_counts == ANCHOR_COUNTS
    assert "in-sample" in selection["deployment"]["chosen"]
    assert "selected on test (optimistic)" in selection["deployment"]["chosen"]
    assert len(result["per_file"]) == 34


@pytest.mark.data
def test_summary_reports_protocol_sample_size_and_intervals(skab_result, skab_files):
    from inspection.skab_protocol import PROTOCOL

    summary = skab_result["summary"]
    assert summary["protocol"] == PROTOCOL
    assert summary["seeds"] == [summary["seed"]]
    scored = sum(len(f) - TRAIN_ROWS for f in skab_files)
    assert summary["n_test"] == scored == sum(skab_result["counts"].values())
    prior = summary["a_priori"]
    assert sum(prior[k] for k in ("tp", "fp", "tn", "fn")) == scored
    for value, (lo, hi) in ((summary["value"], summary["ci95"]), (prior["f1"], prior["ci95"])):
        assert 0 < lo <= value <= hi < 1
        assert hi - lo > 0  # the files differ, so resampling them moves the pooled F1
    assert prior["normal_run_far"] == summary["normal_runs"]["a_priori"]["far"]
    folders = summary["selection"]["per_folder"]
    assert set(summary["normal_runs"]["per_folder"]) == set(folders)
    for folder, run in summary["normal_runs"]["per_folder"].items():
        assert run["config"] == folders[folder]["config"]
        assert run["far"] == folders[folder]["normal_run_far"]
    for run in (summary["normal_runs"]["a_priori"], *summary["normal_runs"]["per_folder"].values()):
        assert run["segments"] == len(run["per_segment"]) >= 8
        assert min(run["per_segment"]) >= 0 and max(run["per_segment"]) == run["max_segment"] <= 100
        assert run["far"] == pytest.approx(100 * run["alarms"] / run["rows"])
        # equal segments: the pooled rate is the mean of the segments' rates
        assert run["far"] == pytest.approx(np.mean(run["per_segment"]))


@pytest.mark.data
def test_a_priori_counts_are_those_of_its_detector_run_by_the_protocol(skab_result, skab_files):
    from inspection.skab_protocol import A_PRIORI, a_priori_config

    skab = _skab()
    prior = skab_result["summary"]["a_priori"]
    config = SlopeT2Config.from_dict(prior["detector"])
    assert config == a_priori_config()
    assert {k: getattr(config, k) for k in A_PRIORI} == dict(A_PRIORI)
    assert prior["config"] == config.label
    y_true, y_pred = [], []
    for f in skab_files:
        train, test = skab.protocol_split(f)
        y_pred.append(SlopeT2Detector(config).fit(train.values).predict(test.values))
        y_true.append(test.anomaly)
    score = skab.skab_score(y_true, y_pred)
    assert [prior[k] for k in ("tp", "fp", "tn", "fn")] == [score.tp, score.fp, score.tn, score.fn]
    assert prior["f1"] == pytest.approx(score.f1)
    assert prior["far"] == pytest.approx(score.far)
    assert prior["mar"] == pytest.approx(score.mar)


def test_a_priori_configuration_is_the_label_free_default():
    """The class defaults are the a-priori rule, so a user who builds a detector without choosing parameters gets
    the label-free configuration, not one tuned on the labelled files."""
    from inspection.skab_protocol import A_PRIORI, a_priori_config, skab_slope_config

    assert a_priori_config() == skab_slope_config()
    defaults = SlopeT2Config(channels=("a",))
    assert {k: getattr(defaults, k) for k in A_PRIORI} == dict(A_PRIORI)


@pytest.mark.data
def test_a_priori_configuration_does_not_depend_on_labels(skab_result, skab_files, free_rows):
    """Flipping every scored label of every labelled file leaves the a-priori configuration and its false alarms
    on normal runs as they are; only its score changes, and exactly as flipped labels must: TP <-> FP,
    TN <-> FN."""
    from inspection.skab_protocol import slope_t2_result

    before = skab_result["summary"]["a_priori"]
    after_summary, _ = slope_t2_result(flipped(skab_files), free_rows)
    after = after_summary["a_priori"]
    assert after["detector"] == before["detector"] and after["config"] == before["config"]
    assert after_summary["normal_runs"]["a_priori"] == skab_result["summary"]["normal_runs"]["a_priori"]
    assert (after["tp"], after["fp"], after["tn"], after["fn"]) == (before["fp"], before["tp"], before["fn"],
                                                                    before["tn"])
    assert after["f1"] != pytest.approx(before["f1"])


@pytest.mark.data
def test_normal_run_far_equals_a_hand_computation(skab_result, free_rows):
    from inspection.skab_protocol import SEGMENT_ROWS, a_priori_config, normal_run_far

    summary = skab_result["summary"]
    runs = {"a_priori": (a_priori_config(), summary["normal_runs"]["a_priori"])}
    for folder, info in summary["selection"]["per_folder"].items():
        runs[folder] = (SlopeT2Config.from_dict(info["detector"]), summary["normal_runs"]["per_folder"][folder])
    segments = len(free_rows) // SEGMENT_ROWS
    for name, (config, reported) in runs.items():
        assert reported["segments"] == segments, name
        assert reported["rows"] == segments * (SEGMENT_ROWS - TRAIN_ROWS), name
        for k in (1, segments - 1):  # one segment by hand: fit on its first 400 rows, predict the rest
            seg = free_rows[k * SEGMENT_ROWS:(k + 1) * SEGMENT_ROWS]
            pred = SlopeT2Detector(config).fit(seg[:TRAIN_ROWS]).predict(seg[TRAIN_ROWS:])
            assert reported["per_segment"][k] == pytest.approx(100 * pred.mean()), (name, k)
    computed = normal_run_far(a_priori_config(), free_rows)
    assert computed.to_dict() == summary["normal_runs"]["a_priori"]
    # a threshold far above every score never alarms; one below every score always does
    quiet = normal_run_far(dataclasses.replace(a_priori_config(), quantile=1.0, factor=1e9), free_rows)
    loud = normal_run_far(dataclasses.replace(a_priori_config(), factor=1e-9), free_rows)
    assert quiet.far == quiet.max_segment == 0.0 and loud.far == loud.max_segment == 100.0


def test_bootstrap_interval_of_pooled_f1():
    from inspection.skab_protocol import bootstrap_f1_ci, pooled_f1

    same = np.array([[8, 2, 30, 4]] * 5)
    f1 = float(pooled_f1(same[0]))
    assert bootstrap_f1_ci(same) == pytest.approx((f1, f1))  # resampling identical files changes nothing
    # two files: a resample is AA, AB or BB (a quarter of the draws each), so the 2.5 % and 97.5 % quantiles are
    # the two files' own F1 values
    two = np.array([[9, 1, 20, 0], [1, 5, 20, 8]])
    lo, hi = bootstrap_f1_ci(two)
    assert (lo, hi) == pytest.approx(tuple(sorted(pooled_f1(two))))
    spread = np.random.default_rng(3).integers(0, 50, (30, 4))  # 30 files with varied counts
    assert bootstrap_f1_ci(spread) == bootstrap_f1_ci(spread)  # fixed seed: reproducible
    assert bootstrap_f1_ci(spread) != bootstrap_f1_ci(spread, seed=1)
    with pytest.raises(ConfigError, match=r"\[N, 4\]"):
        bootstrap_f1_ci(np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad, match", [
    ({"channels": ()}, "at least one"),
    ({"channels": "abc"}, "sequence of channel names"),
    ({"channels": ("a", "a")}, "distinct"),
    ({"differenced": ("zz",)}, "not among the channels"),
    ({"lag": 0}, "lag"),
    ({"window": 2.5}, "window"),
    ({"persistence": True}, "persistence"),
    ({"smoothing": "median"}, "smoothing"),
    ({"rule": "any"}, "rule"),
    ({"rate": 0.0}, "rate"),
    ({"quantile": 1.5}, "quantile"),
    ({"factor": -1.0}, "factor"),
    ({"ridge": float("nan")}, "ridge"),
])
def test_config_rejects_bad_values(bad, match):
    params = {"channels": ("a", "b", "temp"), "differenced": ("temp",)} | bad
    with pytest.raises(ConfigError, match=match):
        SlopeT2Config(**params)


def test_config_round_trips_and_rejects_unknown_keys():
    config = SlopeT2Config(channels=("a", "temp"), differenced=("temp",), lag=20, smoothing="ewma", rate=0.2)
    assert SlopeT2Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match=r"SlopeT2Config: unknown key.*threshold.*valid keys"):
        SlopeT2Config.from_dict({**config.to_dict(), "threshold": 3.0})


def test_detector_fails_loudly_on_bad_rows_and_before_fit():
    rng = np.random.default_rng(2)
    x, names = plant(rng)
    config = SlopeT2Config(channels=names, differenced=("temp",), lag=20, window=30)
    with pytest.raises(NotCalibratedError, match="fit"):
        SlopeT2Detector(config).predict(x)
    with pytest.raises(ConfigError, match="fitting rows"):
        SlopeT2Detector(config).fit(x[:30])
    with pytest.raises(DataError, match=r"\[T, 4\]"):
        SlopeT2Detector(config).fit(x[:TRAIN_ROWS, :3])
    bad = x[:TRAIN_ROWS].copy()
    bad[17, 2] = np.nan
    with pytest.raises(DataError, match="row 17"):
        SlopeT2Detector(config).fit(bad)
    det = SlopeT2Detector(config).fit(x[:TRAIN_ROWS])
    with pytest.raises(DataError, match=r"\[T, 4\]"):
        det.predict(x[TRAIN_ROWS:, :2])
    constant = np.column_stack([np.ones(TRAIN_ROWS), np.full(TRAIN_ROWS, 2.0), np.full(TRAIN_ROWS, 3.0),
                                np.zeros(TRAIN_ROWS)])
    with pytest.raises(ConfigError, match="constant"):
        SlopeT2Detector(config).fit(constant)
    # a constant channel is dropped, the rest still scores
    partly = x[:TRAIN_ROWS].copy()
    partly[:, 0] = 5.0
    det = SlopeT2Detector(config).fit(partly)
    assert det.features == ["b", "c", "d20 temp"]


def test_evaluate_rejects_unknown_detector_and_mixed_options(tmp_path):
    from inspection.anomaly import DriftTrackingConfig
    from inspection.skab_protocol import SelectionGrid, evaluate_skab

    with pytest.raises(ConfigError, match="slope-t2, drift"):
        evaluate_skab(results_dir=tmp_path, detector="conv-ae")
    with pytest.raises(ConfigError, match="drift detector's"):
        evaluate_skab(results_dir=tmp_path, config=DriftTrackingConfig())
    with pytest.raises(ConfigError, match="slope-t2 detector only"):
        evaluate_skab(results_dir=tmp_path, detector="drift", grid=SelectionGrid())
    with pytest.raises(ConfigError, match="persistences"):
        dataclasses.replace(SelectionGrid(), persistences=(("any", 3),))


@pytest.mark.data
def test_evaluate_writes_into_the_run_folder_unless_told_otherwise(skab_files, tmp_path, monkeypatch):
    """A user's evaluation must not overwrite the published record in bench/results."""
    from services.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--bench", "skab"]) == 0
    written = json.loads((tmp_path / "runs" / "results" / "skab.json").read_text())
    assert written["summary"]["benchmark"] == "skab"
    assert not (tmp_path / "bench").exists()
