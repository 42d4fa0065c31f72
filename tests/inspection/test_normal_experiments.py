"""Normal-only detection of the benchmarks through the command line: ``train --bench B --mode normal-only`` stores
one calibrated detector per fold, ``calibrate --name`` re-chooses a threshold, ``evaluate --mode normal-only``
scores the test split; the metrics are recomputed here from the stored detectors and the real bearing data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inspection.errors import ConfigError, DataError
from inspection.normal_experiments import family, normal_split, split_from_card
from inspection.normal_only import MODE, NormalOnlyDetector
from inspection.store import ModelStore
from services.cli import main

#: Bearings folds of seed 0 (grouped 5-fold cross-validation by recording).
FOLDS = 5


def _bearings_available() -> None:
    from inspection.data.bearings import load_bearings

    try:
        load_bearings()
    except DataError as exc:
        pytest.skip(f"bearing recordings unavailable: {exc}")


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_bench_splits_refuse_what_does_not_apply():
    with pytest.raises(ConfigError, match="no normal-only protocol for bench 'skab'"):
        normal_split("skab")
    with pytest.raises(ConfigError, match="needs a cross-validation fold"):
        normal_split("bearings")
    with pytest.raises(ConfigError, match="--fold applies to bearings only"):
        normal_split("elpv", fold=1)
    with pytest.raises(ConfigError, match="composite bench only"):
        normal_split("elpv", n_train=10)
    with pytest.raises(ConfigError, match="not trained on a bench"):
        split_from_card({"version": "m0001-00000000", "source": {}})


@pytest.mark.data
@pytest.mark.slow
def test_train_calibrate_and_evaluate_the_bearings_bench(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    _bearings_available()
    store, results = tmp_path / "models", tmp_path / "results"
    assert main(["train", "--bench", "bearings", "--mode", "normal-only", "--models-dir", str(store),
                 "--device", "cpu"]) == 0
    trained = _lines(capsys)
    assert [t["fold"] for t in trained] == list(range(FOLDS)) and {t["model"] for t in trained} == {family("bearings")}
    bench_store = ModelStore(store / family("bearings"))
    assert main(["evaluate", "--bench", "bearings", "--mode", "normal-only", "--models-dir", str(store),
                 "--results", str(results)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((results / "normal_only.json").read_text())
    assert printed["result"] == str(results / "normal_only.json")
    folds = result["benches"]["bearings"]["folds"]
    assert sorted(folds) == [str(k) for k in range(FOLDS)]

    scores, labels = [], []
    for t in trained:
        det, card = NormalOnlyDetector.load(bench_store, t["version"])
        assert card["mode"] == MODE and card["bench"] == "bearings" and card["fold"] == t["fold"]
        split = normal_split("bearings", 0, fold=t["fold"])
        assert card["units_used"] == {"fit": len(split.fit), "calibration": len(split.calibration)}
        # fitted and calibrated on healthy windows only, of recordings the test split never uses
        assert not any(u.label.defect for u in split.fit + split.calibration)
        recordings = {u.provenance["vibration"].split("@")[0] for u in split.fit + split.calibration}
        assert not recordings & {u.provenance["vibration"].split("@")[0] for u in split.test}
        assert (det.score(split.calibration).score >= det.threshold).mean() <= card["target_far"] == 0.01
        test = det.score(split.test)
        y = np.array([u.label.defect for u in split.test])
        got = folds[str(t["fold"])]
        assert got["n_test"] == len(y) and got["tp"] == int((test.decision & y).sum())
        assert got["fp"] == int((test.decision & ~y).sum())
        if 0 < y.sum() < len(y):
            assert got["auroc"] == pytest.approx(roc_auc_score(y, test.score), abs=1e-12)
        else:
            assert got["auroc"] is None
        scores.append(test.score)
        labels.append(y)
    pooled = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert result["benches"]["bearings"]["auroc_pooled"] == pytest.approx(pooled, abs=1e-12)
    assert result["summary"]["value"]["bearings"] == result["benches"]["bearings"][
        "auroc_mean_over_folds_with_healthy_test"]

    # a new threshold for the promoted version (the last fold), on the same calibration windows
    promoted = bench_store.promoted()
    assert main(["calibrate", "--name", family("bearings"), "--target-far", "0.1", "--models-dir", str(store)]) == 0
    calibrated = _lines(capsys)[-1]
    after = bench_store.promoted()
    assert calibrated["from"] == promoted.version and after.version == calibrated["version"] != promoted.version
    assert after.card["parent"] == promoted.version and after.card["fold"] == promoted.card["fold"]
    assert after.card["calibration"]["target_far"] == 0.1 and after.card["threshold"] <= promoted.card["threshold"]
    assert main(["calibrate", "--name", family("bearings"), "--method", "max_f1", "--models-dir", str(store)]) == 2
    assert "--method max_f1 do not apply to normal-only" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_evaluate_needs_every_fold_and_train_refuses_foreign_flags(tmp_path, capsys):
    _bearings_available()
    store = tmp_path / "models"
    assert main(["train", "--bench", "bearings", "--fold", "2", "--mode", "normal-only", "--models-dir", str(store),
                 "--device", "cpu"]) == 0
    assert [t["fold"] for t in _lines(capsys)] == [2]
    assert main(["evaluate", "--bench", "bearings", "--mode", "normal-only", "--models-dir", str(store),
                 "--results", str(tmp_path / "results")]) == 2
    assert "no normal-only version for seed 0 folds [0, 1, 3, 4]" in capsys.readouterr().err
    assert main(["train", "--bench", "elpv", "--fold", "1", "--mode", "normal-only", "--models-dir", str(store)]) == 2
    assert "--fold applies to bearings only" in capsys.readouterr().err
    assert main(["evaluate", "--bench", "skab", "--mode", "normal-only", "--models-dir", str(store)]) == 2
    assert "without --mode" in capsys.readouterr().err
