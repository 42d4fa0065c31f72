"""Progress of long jobs (preprocessing, training epochs, calibration): a bar on a terminal, plain lines elsewhere.

Training a model on a CPU takes minutes to hours; without feedback a run cannot be told from a hung one. On a
terminal each stage gets a tqdm bar that redraws in place (units done / total, units/s, time left). Where stderr
is not a terminal (CI logs, ``nohup``, files) bars would fill the log with carriage returns, so the same stages
write whole lines instead, flushed as they are written: one when a stage ends, one per training epoch.
Progress goes to stderr only: commands keep stdout for their JSON results. Like a tqdm bar, this reports on the
work; it is not an output of it.

Rates and times left are averages over the job so far (units done / seconds elapsed), so the validation passes
between epochs are part of the estimate.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

from tqdm import tqdm

#: a monotonic clock in seconds (``time.monotonic``; tests pass a fake one)
Clock = Callable[[], float]


def rate_and_eta(done: float, total: float, elapsed: float) -> tuple[float, float]:
    """Throughput and time left of a job that has done ``done`` of ``total`` units in ``elapsed`` seconds, if
    it keeps its average pace.

    Returns:
        ``(units per second, seconds left)``; both NaN while nothing is done or no time has passed (no estimate
        yet). Seconds left are 0 once ``done`` reaches ``total``.
    """
    if done <= 0 or elapsed <= 0:
        return math.nan, math.nan
    rate = done / elapsed
    return rate, max(0.0, total - done) / rate


def format_duration(seconds: float) -> str:
    """A short human duration: ``'45s'``, ``'4m10s'``, ``'2h05m'``; ``'?'`` when unknown (NaN or infinite)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_second: float, unit: str = "units") -> str:
    """``'312 units/s'``; one decimal below 10/s so slow jobs do not read as 0; ``'? units/s'`` when unknown."""
    if not math.isfinite(per_second):
        return f"? {unit}/s"
    return f"{per_second:.1f} {unit}/s" if per_second < 10 else f"{per_second:.0f} {unit}/s"


class Meter:
    """Units done of a job of known size, timed by a clock from the meter's creation.

    Args:
        total: units the whole job has.
        clock: monotonic seconds.
    """

    def __init__(self, total: float, clock: Clock = time.monotonic) -> None:
        self.total = total
        self.done = 0.0
        self._clock = clock
        self._start = clock()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units as done."""
        self.done += n

    @property
    def elapsed(self) -> float:
        """Seconds since the meter was created."""
        return self._clock() - self._start

    def rate_and_eta(self) -> tuple[float, float]:
        """Units per second so far and seconds left, as :func:`rate_and_eta`."""
        return rate_and_eta(self.done, self.total, self.elapsed)

    def summary(self, unit: str = "units") -> str:
        """``'312 units/s  eta 4m10s'``."""
        rate, eta = self.rate_and_eta()
        return f"{format_rate(rate, unit)}  eta {format_duration(eta)}"


class Stage:
    """One stage of a job (preprocessing, an epoch): a bar in bar mode, a silent meter otherwise.

    Created by :meth:`Progress.stage`; its :attr:`meter` times the stage on the progress's clock.
    """

    def __init__(self, progress: Progress, desc: str, total: int, unit: str) -> None:
        self.desc = desc
        self.progress = progress
        self.meter = Meter(total, progress.clock)
        self._bar = (tqdm(total=total, desc=desc, unit=unit, file=progress.stream, dynamic_ncols=True)
                     if progress.mode == "bar" else None)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss="0.41"``) is shown after the bar in bar mode."""
        self.meter.update(n)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self, line: str | None = None, **postfix: Any) -> None:
        """End the stage: the bar stays on screen with ``postfix`` as its last word; in line mode ``line`` (when
        given) is written."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.close()
        elif line is not None:
            self.progress.line(line)

    def done_line(self, unit: str = "units") -> str:
        """``'<desc> 480/480 units in 12s (40 units/s)'``: the usual line of a stage that has ended."""
        rate, _ = self.meter.rate_and_eta()
        return (f"{self.desc} {self.meter.done:.0f}/{self.meter.total:.0f} {unit} in "
                f"{format_duration(self.meter.elapsed)} ({format_rate(rate, unit)})")


class Progress:
    """Where progress goes and in which form.

    Args:
        enabled: False reports nothing (library callers and tests that want quiet runs).
        stream: where bars and lines go; stderr when not given (looked up when used, so redirections made later
            are followed).
        terminal: bars (True) or lines (False); by default bars exactly when the stream is a terminal.
        clock: monotonic seconds for the rates and times left of line mode.
    """

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, terminal: bool | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.enabled = enabled
        self._stream = stream
        self._terminal = terminal
        self.clock = clock

    @classmethod
    def of(cls, progress: bool | Progress) -> Progress:
        """The reporter a ``progress`` argument asks for: True reports on stderr, False reports nothing, a
        :class:`Progress` is taken as it is."""
        return progress if isinstance(progress, Progress) else cls(enabled=bool(progress))

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def mode(self) -> Literal["off", "bar", "lines"]:
        """``off`` when disabled, ``bar`` on a terminal, ``lines`` elsewhere."""
        if not self.enabled:
            return "off"
        terminal = self._terminal
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            terminal = bool(isatty and isatty())
        return "bar" if terminal else "lines"

    def stage(self, desc: str, total: int, unit: str = "unit") -> Stage:
        """A stage of ``total`` units (a bar in bar mode)."""
        return Stage(self, desc, total, unit)

    def line(self, text: str) -> None:
        """Write one whole line, flushed, in line mode; nothing in the other modes (a bar already shows it)."""
        if self.mode == "lines":
            self.stream.write(text.rstrip("\n") + "\n")
            self.stream.flush()
