"""``bench/demo_fusion.py`` on the fast preset: the demo model, its heads' max rule and late fusion, each scored on
held-out composite validation units; the late-fusion numbers are the demo's own baselines' decisions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from inspection.evaluation import binary_metrics
from services import demo_model as dm

pytestmark = [pytest.mark.slow]

SCRIPT = Path(__file__).parents[2] / "bench" / "demo_fusion.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_demo_fusion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_scores_the_model_and_its_baselines_on_held_out_units(tmp_path):
    script = load_script()
    assert script.main(["--quick", "--store", str(tmp_path / "stores"), "--results", str(tmp_path / "results")]) == 0
    data = json.loads((tmp_path / "results" / "demo_fusion.json").read_text())
    summary, (row,) = data["summary"], data["per_seed"]
    assert summary["protocol"] == "demo-fusion-validation" and summary["seeds"] == [0] and row["units"] == 64
    for key in ("fused", "heads_max", "late_fusion", "majority"):
        assert summary[key] == {k: row[key][k] for k in ("accuracy", "f1", "auroc")}  # the mean of one seed
        assert 0.0 <= row[key]["accuracy"] <= 1.0
    assert summary["heads_max_minus_late_fusion"]["accuracy"] == [
        round(row["heads_max"]["accuracy"] - row["late_fusion"]["accuracy"], 4)]
    # the late-fusion numbers are those of the demo's baselines, reloaded from the store, on the units after the
    # preset's validation units (never the ones that chose the thresholds)
    store = tmp_path / "stores" / "seed-0"
    base = dm.load_baselines(store, "fast", seed=0)
    recipe = dm.get_preset("fast")
    held = dm.composite_builder(0).units("val", 64, start_index=recipe.val_units)
    assert held[0].unit_id not in {u.unit_id for u in dm.preset_units(recipe, 0)[1]}
    labels = np.array([u.label.defect for u in held])
    late = base.late_fusion(held)
    assert row["late_fusion"]["accuracy"] == round(float((late == labels).mean()), 4)
    assert row["late_fusion"]["f1"] == round(binary_metrics(late.astype(float), labels, 0.5)["f1"], 4)
    assert row["defective"] == int(labels.sum())
