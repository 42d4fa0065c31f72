"""Progress reporting: rate and time-left arithmetic on a fake clock, the choice of bar or lines, the CLI flags."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest

from inspection.progress import Meter, Progress, format_duration, format_rate, rate_and_eta


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_closed_forms():
    assert rate_and_eta(300, 1000, 60.0) == pytest.approx((5.0, 140.0))  # 700 units left at 5/s
    assert rate_and_eta(1000, 1000, 50.0) == (20.0, 0.0)
    assert rate_and_eta(1200, 1000, 60.0) == (20.0, 0.0)  # overshoot: nothing left, never negative
    for done, elapsed in ((0, 10.0), (10, 0.0)):  # nothing done or no time passed: no estimate yet
        rate, eta = rate_and_eta(done, 1000, elapsed)
        assert math.isnan(rate) and math.isnan(eta)


def test_meter_on_a_fake_clock():
    clock = FakeClock()
    meter = Meter(total=480, clock=clock)
    assert math.isnan(meter.rate_and_eta()[0]) and meter.summary() == "? units/s  eta ?"
    clock.now += 4.0
    meter.update(96)  # 96 units in 4 s: 24 units/s, 384 left -> 16 s
    assert meter.elapsed == 4.0
    assert meter.rate_and_eta() == pytest.approx((24.0, 16.0))
    assert meter.summary() == "24 units/s  eta 16s"
    clock.now += 12.0  # a slow stretch (validation) lowers the average rate: 96 in 16 s = 6/s, 384 left -> 64 s
    assert meter.summary() == "6.0 units/s  eta 1m04s"


def test_duration_and_rate_formats():
    assert [format_duration(s) for s in (0, 44.6, 59.4, 60, 250, 3599, 3600, 7500)] == [
        "0s", "45s", "59s", "1m00s", "4m10s", "59m59s", "1h00m", "2h05m"]
    assert format_duration(math.nan) == format_duration(math.inf) == "?"
    assert format_rate(312.4) == "312 units/s" and format_rate(2.345) == "2.3 units/s"
    assert format_rate(math.nan, "steps") == "? steps/s"


def test_mode_follows_the_stream_and_lines_are_whole():
    buf = io.StringIO()  # not a terminal
    assert Progress(stream=buf).mode == "lines"
    assert Progress(stream=buf, terminal=True).mode == "bar"
    assert Progress(False, stream=buf).mode == "off"
    assert Progress.of(False).mode == "off" and Progress.of(True).enabled
    given = Progress(stream=buf)
    assert Progress.of(given) is given

    clock = FakeClock()
    lines = Progress(stream=buf, clock=clock)
    stage = lines.stage("preprocess", 48)
    for _ in range(48):
        stage.update(1)
    clock.now += 2.0
    stage.close(stage.done_line())
    lines.stage("quiet", 3).close()  # a stage closed without a line writes nothing
    Progress(False, stream=buf).line("never")
    Progress(stream=buf, terminal=True).line("never: the bar shows it")
    assert buf.getvalue() == "preprocess 48/48 units in 2s (24 units/s)\n"


@pytest.mark.parametrize("command", [["train", "--bench", "elpv"], ["calibrate", "--bench", "elpv"],
                                     ["evaluate", "--bench", "elpv"]])
def test_progress_flags(command):
    from services.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(command).progress is True
    assert parser.parse_args([*command, "--no-progress"]).progress is False
    assert parser.parse_args([*command, "--progress"]).progress is True


def test_evaluate_reports_preprocessing_and_scoring_per_model(small_model_factory, unit_factory):
    import numpy as np
    import torch

    from inspection.evaluation import predict_units

    model = small_model_factory()
    with torch.no_grad():
        model.thresholds.fill_(0.5)
    from inspection.records import Label

    ok = Label(False)
    units = [dataclasses.replace(unit_factory(i, np.random.default_rng(i)), label=ok) for i in range(5)]
    model.fit_normalisation(model.batch(units))
    buf = io.StringIO()
    pred = predict_units(model, units, batch_size=2, report=Progress(stream=buf), desc="elpv seed 3")
    assert pred["score"].shape == (5,)
    lines = buf.getvalue().splitlines()
    assert [line.split(" 5/5 units in ")[0] for line in lines] == ["elpv seed 3: preprocess", "elpv seed 3: score"]
    quiet = io.StringIO()
    predict_units(model, units, batch_size=2, report=Progress(False, stream=quiet))
    assert quiet.getvalue() == ""
