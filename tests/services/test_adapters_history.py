"""Line adapters wherever a decision is reproduced or explained: re-scoring (promoted adapters, ``--no-adapters``,
``--compare``, resume), ``inspection audit`` of adapted decisions, and ``inspection explain``.

Everything is real: the small fusion model of tests/conftest.py saved in a real model store, a LoRA adapter
trained with peft for line ``line-a`` and saved beside it (a second version of it with other weights), Parquet
history written with the history writer, and the command line run in-process through ``services.cli.main``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection.adapters import (
    AdapterConfig,
    adapted_version,
    adapter_store,
    load_adapter,
    save_adapter,
    train_adapter,
)
from inspection.data.history import ArchivedUnit, write_history
from inspection.records import InputCoordinate, Label, Unit
from inspection.store import ADAPTERS_DIR, ModelStore
from inspection.training import TrainConfig
from services.rescore import audit, read_decisions, rescore_local
from services.scoring import load_serving_model

pytestmark = [pytest.mark.slow]

#: A unit's score through the service's scoring path against the same model called on ``model.batch``: the
#: stream prepares vibration in batched float32 torch ops, training in float64 numpy (see test_scoring.py).
PREP_TOLERANCE = 1e-4
#: Two scorings of one unit by the same model and adapter in batches of other composition: float32 GEMMs of
#: other row counts sum in another order (a few 1e-7 on the probability here).
SCORE_TOLERANCE = 1e-5
#: The least score change the test adapter must make on some unit of its line, so that a unit scored with the
#: wrong adapter (or none) cannot pass the tolerances above.
ADAPTER_EFFECT = 1e-2
LINE = "line-a"
UNITS = 16  # history units: the even ones on line-a (adapter), the odd ones on line-1 (none)


def relined(unit: Unit, line: str, label: Label | None = None) -> Unit:
    parts = {m: dataclasses.replace(getattr(unit, m), line_id=line) for m in unit.present}
    return dataclasses.replace(unit, line_id=line, label=label, **parts)


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``inspection ARGV`` in this process; (exit status, stdout, stderr)."""
    from services.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_model_factory, unit_factory):
    """A store with a calibrated base, adapter versions v1 (promoted) and v2 (other weights and threshold) of
    line-a, and a history of 16 units with input coordinates (8 on line-a, 8 on line-1)."""
    tmp = tmp_path_factory.mktemp("adapters-history")
    rng = np.random.default_rng(5)
    train_units = []
    for i in range(48):
        defect = i % 3 == 0
        unit = unit_factory(1000 + i, rng)
        if defect:  # a bright corner marks a defect, so the adapter has something to learn
            from inspection.records import VisionReading

            img = np.array(unit.vision.image, copy=True)
            img[:30, :30] = 255
            v = unit.vision
            unit = dataclasses.replace(unit, vision=VisionReading.from_array(
                img, unit_id=v.unit_id, line_id=v.line_id, reading_id=v.reading_id, source=v.source,
                event_time=v.event_time))
        train_units.append(relined(unit, LINE, Label(defect, "defect" if defect else "ok",
                                                     frozenset({"vision"}) if defect else frozenset())))
    model = small_model_factory()
    model.fit_normalisation(model.batch(train_units))
    model.eval()
    with torch.no_grad():
        model.thresholds.fill_(0.5)
    root = tmp / "store"
    store = ModelStore(root, create=True)
    base = store.save(model.state_dict(), {"model_config": model.config.to_dict(), "threshold_version": "t-base"},
                      promote=True)
    result = train_adapter(model, train_units[:36], train_units[36:], LINE, AdapterConfig(rank=4),
                           TrainConfig(epochs=2, batch_size=16, lr=3e-2, device="cpu", amp=False, seed=0))
    v1 = save_adapter(store, base.version, LINE, result)
    # a second version of the line's adapter: every low-rank update 2.25 times as large, another threshold
    other = dataclasses.replace(result, state={k: 1.5 * t for k, t in result.state.items()},
                                calibration=dataclasses.replace(result.calibration, threshold=0.3,
                                                                version="t-second"))
    v2 = save_adapter(store, base.version, LINE, other, promote=False)
    units = []
    for i in range(UNITS):
        unit = unit_factory(i, rng)
        unit = relined(unit, LINE if i % 2 == 0 else "line-1")
        units.append(ArchivedUnit(unit, {m: InputCoordinate(f"inspection.{m}", i % 3, 100 + i)
                                         for m in unit.present}))
    history = tmp / "history" / "h.parquet"
    write_history(history, units)
    return {"root": root, "base": base, "model": model, "v1": v1.version, "v2": v2.version, "result": result,
            "units": [a.unit for a in units], "history": history}


def copy_store(setup, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(setup["root"], dst)
    return dst


def scores_of(model, units: list[Unit]) -> dict[str, float]:
    with torch.no_grad():
        return dict(zip([u.unit_id for u in units], model(model.batch(units)).score.double().tolist(), strict=True))


def test_rescore_scores_adapted_lines_with_their_promoted_adapters_and_base_lines_with_the_base(setup, tmp_path):
    root = copy_store(setup, tmp_path)
    base, units = setup["base"].version, setup["units"]
    adapted_units = [u for u in units if u.line_id == LINE]
    # independent expectations: the trained adapter's own model copy, and the base model, called directly
    want = {**scores_of(setup["model"], [u for u in units if u.line_id != LINE]),
            **scores_of(setup["result"].model, adapted_units)}
    plain = scores_of(setup["model"], adapted_units)
    assert max(abs(want[k] - plain[k]) for k in plain) > ADAPTER_EFFECT
    card = load_adapter(ModelStore(root), setup["base"], LINE, setup["v1"])[1]

    out = tmp_path / "out"
    rc, stdout, stderr = cli("rescore", "--history", str(setup["history"]), "--store", str(root), "--out", str(out),
                             "--no-progress", "--device", "cpu")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["adapters"] == {LINE: setup["v1"]} and summary["decided"] == UNITS
    assert json.loads((out / "run.json").read_text())["adapters"] == {LINE: setup["v1"]}
    decisions = {d.unit_id: d for d in read_decisions(out, model_version=base)}
    assert len(decisions) == UNITS  # the base version's decisions include those made with its adapters
    for u in units:
        d = decisions[u.unit_id]
        assert d.score == pytest.approx(want[u.unit_id], abs=PREP_TOLERANCE)
        if u.line_id == LINE:
            assert d.model_version == adapted_version(base, LINE, setup["v1"]) == f"{base}+{LINE}:{setup['v1']}"
            assert d.threshold == pytest.approx(card["threshold"], abs=1e-7)
            assert d.threshold_version == card["threshold_version"] != "t-base"
        else:
            assert d.model_version == base and d.threshold == 0.5 and d.threshold_version == "t-base"

    # promote v2: the next run scores line-a again (its partitions were made with v1) and skips line-1's
    rc, _, stderr = cli("adapters", "promote", setup["v2"], "--store", str(root), "--line", LINE)
    assert rc == 0, stderr
    serving = load_serving_model(ModelStore(root), None, torch.device("cpu"))
    again = rescore_local(setup["history"], serving, out, progress=False)
    assert again.adapters == {LINE: setup["v2"]}
    assert again.skipped_done == UNITS - len(adapted_units) and again.decided == len(adapted_units)
    after = list(read_decisions(out))
    assert Counter(d.unit_id for d in after) == Counter(u.unit_id for u in units)  # replaced, not added
    moved = 0.0
    for d in after:
        if d.line_id == LINE:
            assert d.model_version == f"{base}+{LINE}:{setup['v2']}" and d.threshold == pytest.approx(0.3)
            moved = max(moved, abs(d.score - decisions[d.unit_id].score))
        else:
            assert d.model_version == base and d.score == decisions[d.unit_id].score
    assert moved > ADAPTER_EFFECT  # v2's scores, not v1's
    assert rescore_local(setup["history"], serving, out, progress=False).decided == 0  # all done with v2

    # --no-adapters: every line with the base alone; the partitions made with adapters are scored again
    rc, stdout, stderr = cli("rescore", "--history", str(setup["history"]), "--store", str(root), "--out", str(out),
                             "--no-progress", "--device", "cpu", "--no-adapters")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["adapters"] == {} and summary["decided"] == len(adapted_units)
    base_only = {d.unit_id: d for d in read_decisions(out)}
    assert len(base_only) == UNITS and {d.model_version for d in base_only.values()} == {base}
    for u in adapted_units:
        assert base_only[u.unit_id].score == pytest.approx(plain[u.unit_id], abs=PREP_TOLERANCE)
        assert base_only[u.unit_id].threshold == 0.5


def test_compare_scores_each_side_with_its_own_adapters_and_says_which(setup, tmp_path):
    root = copy_store(setup, tmp_path)
    family = ModelStore(root)
    old = setup["base"].version
    # a recalibrated base (every threshold 0.4) with its own adapter of line-a (v1's weights, made for it)
    model = setup["model"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["thresholds"] = torch.full_like(state["thresholds"], 0.4)
    new = family.save(state, {"model_config": model.config.to_dict(), "threshold_version": "t-new"}, promote=True)
    result = setup["result"]
    new_adapter = save_adapter(family, new.version, LINE, dataclasses.replace(
        result, calibration=dataclasses.replace(result.calibration, threshold=0.45, version="t-new-a"))).version

    out = tmp_path / "out"
    rc, stdout, stderr = cli("rescore", "--history", str(setup["history"]), "--store", str(root), "--out", str(out),
                             "--no-progress", "--device", "cpu", "--compare", old)
    assert rc == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["model_version"], summary["adapters"]) == (new.version, {LINE: new_adapter})
    assert summary["compare"] == {"model_version": old, "threshold_version": "t-base",
                                  "adapters": {LINE: setup["v1"]}}
    run = json.loads((out / "run.json").read_text())
    assert (run["model_version"], run["adapters"], run["compare"]) == \
        (new.version, {LINE: new_adapter}, summary["compare"])
    report = json.loads((out / "changes.json").read_text())
    # like with like: every unit is compared, adapted line included, each side with its own adapter
    assert report["units_compared"] == UNITS and report["only_new"] == report["only_old"] == 0
    assert report["versions"] == {"new": sorted([new.version, f"{new.version}+{LINE}:{new_adapter}"]),
                                  "old": sorted([old, f"{old}+{LINE}:{setup['v1']}"])}
    # the same adapter weights on both sides: line-a flips exactly where the threshold change says
    new_d = {d.unit_id: d for d in read_decisions(out, model_version=new.version)}
    old_d = {d.unit_id: d for d in read_decisions(out, model_version=old)}
    flips = sum(new_d[u].decision != old_d[u].decision for u in new_d)
    expected = sum((s >= (0.45 if new_d[u].line_id == LINE else 0.4)) != (s >= old_d[u].threshold)
                   for u, s in ((u, old_d[u].score) for u in old_d))
    assert report["flips"]["total"] == flips == expected
    for u, d in new_d.items():
        assert d.score == pytest.approx(old_d[u].score, abs=SCORE_TOLERANCE)

    rc, stdout, stderr = cli("rescore", "--history", str(setup["history"]), "--store", str(root), "--out",
                             str(tmp_path / "plain"), "--no-progress", "--device", "cpu", "--compare", old,
                             "--no-adapters")
    assert rc == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["adapters"] == {} and summary["compare"]["adapters"] == {}
    report = json.loads((tmp_path / "plain" / "changes.json").read_text())
    assert report["units_compared"] == UNITS and report["versions"] == {"new": [new.version], "old": [old]}


def test_audit_reproduces_a_decision_with_the_exact_adapter_version_it_names(setup, tmp_path):
    root = copy_store(setup, tmp_path)
    base, history = setup["base"].version, str(setup["history"])
    out_v1, out_v2, out_base = tmp_path / "v1", tmp_path / "v2", tmp_path / "base"

    def rescore(out: Path, *extra: str) -> dict[str, object]:
        rc, _, stderr = cli("rescore", "--history", history, "--store", str(root), "--out", str(out),
                            "--no-progress", "--device", "cpu", *extra)
        assert rc == 0, stderr
        return {d.unit_id: d for d in read_decisions(out)}

    def run_audit(decision_id: str, decisions: Path) -> tuple[int, dict | None, str]:
        rc, stdout, stderr = cli("audit", decision_id, "--history", history, "--store", str(root), "--decisions",
                                 str(decisions))
        return rc, json.loads(stdout) if stdout.strip() else None, stderr

    made_v1 = rescore(out_v1)
    cli("adapters", "promote", setup["v2"], "--store", str(root), "--line", LINE)
    made_v2 = rescore(out_v2)
    made_base = rescore(out_base, "--no-adapters")
    unit = next(u.unit_id for u in setup["units"] if u.line_id == LINE)
    d1, d2, d0 = made_v1[unit], made_v2[unit], made_base[unit]
    assert len({d1.id, d2.id, d0.id}) == 3 and len({d1.score, d2.score, d0.score}) == 3
    # v2 is promoted now: a decision of v1 is reproduced with v1, one of the base alone with no adapter
    for decision, folder, adapter in ((d1, out_v1, setup["v1"]), (d2, out_v2, setup["v2"]), (d0, out_base, None)):
        rc, report, stderr = run_audit(decision.id, folder)
        assert rc == 0, stderr
        assert report["matches"] and report["model_version"] == decision.model_version
        assert report["adapter"] == (None if adapter is None else {"line": LINE, "version": adapter})
        assert report["base_version"] == base
        assert abs(report["score_difference"]) <= SCORE_TOLERANCE
    # rolled back to v1: the decision made with v2 is still reproduced with v2 (found without the recorded one too)
    cli("adapters", "rollback", "--store", str(root), "--line", LINE)
    assert adapter_store(ModelStore(root), base, LINE).promoted().version == setup["v1"]
    rc, report, stderr = run_audit(d2.id, out_v2)
    assert rc == 0 and report["matches"] and report["adapter"]["version"] == setup["v2"], stderr
    found = audit(d2.id, history, root)
    assert found.model_version == d2.model_version and found.rescored.score == pytest.approx(d2.score, abs=1e-5)

    # v2's weights changed on disk: a clear error, never a fall back to v1 or to the base
    weights = root / ADAPTERS_DIR / base / LINE / setup["v2"] / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    rc, report, stderr = run_audit(d2.id, out_v2)
    assert rc == 2 and report is None
    assert len(stderr.strip().splitlines()) == 1 and setup["v2"] in stderr and "fails its SHA-256 check" in stderr
    assert f"restore adapter version {setup['v2']}" in stderr
    # v2 gone from the store: a clear error naming it and what to do
    shutil.rmtree(weights.parent)
    rc, report, stderr = run_audit(d2.id, out_v2)
    assert rc == 2 and report is None
    assert len(stderr.strip().splitlines()) == 1 and setup["v2"] in stderr and "no longer holds" in stderr
    assert f"restore adapter version {setup['v2']}" in stderr
    # the other decisions are still reproduced
    assert run_audit(d1.id, out_v1)[0] == 0 and run_audit(d0.id, out_base)[0] == 0


def test_the_ray_engine_scores_with_the_adapters_the_driver_chose(setup, tmp_path):
    pytest.importorskip("ray")
    from services.rescore import rescore_ray

    root = copy_store(setup, tmp_path)
    base = setup["base"].version
    local = rescore_local(setup["history"], load_serving_model(ModelStore(root), None, torch.device("cpu")),
                          tmp_path / "local", progress=False)
    remote = rescore_ray(setup["history"], root, base, tmp_path / "ray", workers=1)
    assert remote.adapters == local.adapters == {LINE: setup["v1"]}
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["adapters"] == {LINE: setup["v1"]}
    want = {d.id: d for d in read_decisions(tmp_path / "local")}
    got = {d.id: d for d in read_decisions(tmp_path / "ray")}
    assert got.keys() == want.keys() and len(got) == UNITS  # the same ids: the same adapter versions
    assert all(abs(got[k].score - want[k].score) <= SCORE_TOLERANCE for k in got)
    # pinned to no adapters: every decision by the base alone
    bare = rescore_ray(setup["history"], root, base, tmp_path / "bare", workers=1, adapters={})
    assert bare.adapters == {} and {d.model_version for d in read_decisions(tmp_path / "bare")} == {base}


@pytest.fixture(scope="module")
def explained(setup, tmp_path_factory):
    """``inspection rescore`` and ``inspection explain --level 2`` of the history (v1 promoted): (decisions by unit,
    report folder, the explain command's answer)."""
    tmp = tmp_path_factory.mktemp("explained")
    root = copy_store(setup, tmp)
    rc, _, stderr = cli("rescore", "--history", str(setup["history"]), "--store", str(root), "--out",
                        str(tmp / "rescored"), "--no-progress", "--device", "cpu")
    assert rc == 0, stderr
    out = tmp / "reports"
    rc, stdout, stderr = cli("explain", "--history", str(setup["history"]), "--store", str(root), "--out", str(out),
                             "--level", "2", "--budget", "128")
    assert rc == 0, stderr
    return {d.unit_id: d for d in read_decisions(tmp / "rescored")}, out, json.loads(stdout)


def test_explain_applies_the_lines_adapter_and_names_it(setup, explained):
    from explain.report import report_stem

    base = setup["base"].version
    decided, out, answer = explained
    assert answer["adapters"] == {LINE: setup["v1"]}
    plain = scores_of(setup["model"], setup["units"])
    for unit in setup["units"]:
        report = json.loads((out / f"{report_stem(unit.unit_id)}.json").read_text())
        d = decided[unit.unit_id]
        exp = report["explanation"]
        # the report's decision is the stream's: the same score, threshold and versions
        assert report["model_version"] == d.model_version
        assert report["decision"]["score"] == pytest.approx(d.score, abs=SCORE_TOLERANCE)
        assert report["decision"]["threshold"] == pytest.approx(d.threshold, abs=1e-7)
        assert report["decision"]["threshold_version"] == d.threshold_version
        assert report["decision"]["decision"] == d.decision
        # every forward of the explanation ran the same model: v(all) is the decision's logit, Σφ adds up to it
        # v(all) is the decision's own logit: its baseline plus its modality Shapley values, as the stream
        # recorded them (not recomputed from the report), and the report's modality values are the stream's
        stream = d.attributions
        assert exp["modality"]["value_full"] == pytest.approx(
            stream["baseline_logit"] + sum(stream["modality"].values()), abs=1e-4)
        assert exp["modality"]["phi"] == pytest.approx(stream["modality"], abs=1e-4)
        assert abs(exp["efficiency_gap"]) < 1e-4
        if unit.line_id == LINE:
            assert report["model_version"] == f"{base}+{LINE}:{setup['v1']}"
        else:
            assert report["model_version"] == base
        page = (out / f"{report_stem(unit.unit_id)}.html").read_text()
        assert f"model {report['model_version']}" in page
    moved = [abs(decided[u.unit_id].score - plain[u.unit_id]) for u in setup["units"] if u.line_id == LINE]
    assert max(moved) > ADAPTER_EFFECT  # the base's scores would fail the score checks above


def test_the_report_page_shows_the_model_version_with_its_adapter_in_a_browser(setup, explained):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    base = setup["base"].version
    _, out, _ = explained
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto((out / "index.html").as_uri())
            rows = page.locator("#units tbody tr")
            assert rows.count() == UNITS
            shown = {}
            for i in range(UNITS):
                line = rows.nth(i).get_attribute("data-line")
                if line in shown:
                    continue
                page.goto((out / rows.nth(i).locator("a").get_attribute("href")).resolve().as_uri())
                shown[line] = page.locator("#banner .meta").inner_text()
                page.goto((out / "index.html").as_uri())
        finally:
            browser.close()
    assert f"model {base}+{LINE}:{setup['v1']}" in shown[LINE]
    assert f"model {base} " in shown["line-1"] + " " and f"model {base}+" not in shown["line-1"]
    assert errors == []
