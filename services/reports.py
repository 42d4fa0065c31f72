"""Explanation reports of the stream's decisions: written before the decision is sent, so its link resolves.

For the decisions the configuration selects (``reports.units``: defects, all or none) the service explains the
unit at ``reports.level`` with ``reports.budget`` model evaluations (one :func:`explain.explain` call per batch),
writes ``<stem>.json`` and ``<stem>.html`` into ``reports.dir`` (the stem derived from the decision id by
:func:`explain.report.report_stem`, written through a temporary file and renamed, so a reader never sees half a
file), and only then sets the decision's ``report`` link. A report that cannot be made is logged and counted;
its decision goes out without a link. Nothing is lost either way.

**Line adapters** (:mod:`inspection.adapters`): a decision made with its line's adapter (model version
``<version>+<line>:<adapter version>``) is explained with that adapter in place in every forward pass of the
explanation (:meth:`inspection.adapters.LineAdapters.only`), so the explanation is of the model that decided: its
v(all) is the decision's logit, and its report names the adapted model version. :func:`explain_served_units`
does the same for ``inspection explain``, by each unit's line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explain import explain
from explain.api import explain_encoded, model_groups
from explain.report import build_report, explain_to_reports, render_unit_html, report_stem
from inspection.adapters import LineAdapters, adapted_version, split_model_version
from inspection.errors import ConfigError, StoreError
from inspection.records import Decision, Unit

log = logging.getLogger(__name__)


class StreamReporter:
    """Writes the explanation reports of selected decisions (see the module docstring).

    Args:
        directory: the report folder (created).
        units: ``defects``, ``all`` or ``none``.
        level: explanation level, 1 or 2.
        budget: level-2 model evaluations per unit.
        seed: level-2 seed.
        base_url: links are ``<base_url>/<stem>.html``; ``None`` links to the file.

    Raises:
        ConfigError: the folder cannot be created.
    """

    def __init__(self, directory: str | Path, *, units: str = "defects", level: int = 2, budget: int = 256,
                 seed: int = 0, base_url: str | None = None) -> None:
        self.dir = Path(directory).resolve()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the report folder {self.dir}: {exc}") from exc
        self.units, self.level, self.budget, self.seed = units, level, budget, seed
        self.base_url = base_url.rstrip("/") if base_url else self.dir.as_uri()

    def wanted(self, decision: Decision) -> bool:
        return self.units == "all" or (self.units == "defects" and decision.decision == "defect")

    def write(self, model, pairs: Sequence[tuple[Unit, Decision]], scored: Sequence | None = None, *,
              adapters: LineAdapters | None = None) -> dict[str, str]:
        """Explain and write the reports of ``(unit, decision)`` pairs; returns decision id -> link.

        Args:
            model: the model that decided (the base model).
            pairs: the units (as scored) and their decisions.
            scored: per pair, the scoring result (:class:`services.scoring.Scored`) holding the unit's encoder
                tokens and level-1 attribution: level 2 then only runs the coalitions' fusion rows.
            adapters: the line adapters the decisions were scored with (``ServingModel.adapters``); a decision
                naming its line's adapter is explained with that adapter in place (see the module docstring).

        Raises:
            StoreError: a decision names an adapter version that ``adapters`` does not hold.
            Exception: whatever explaining or writing raised (the caller logs it and sends without links).
        """
        if not pairs:
            return {}
        units = [u for u, _ in pairs]
        attributions: list[Any] = [None] * len(pairs)
        for line, rows in _by_adapter([d for _, d in pairs], adapters).items():
            part = [units[i] for i in rows]
            done = None if scored is None else [scored[i] for i in rows]
            if line is None:
                got = self._explain(model, part, done)
            else:
                with adapters.only(line) as adapted:  # every forward of the explanation with the line's adapter
                    got = self._explain(adapted.model, part, done)
            for i, attribution in zip(rows, got, strict=True):
                attributions[i] = attribution
        links: dict[str, str] = {}
        for (unit, decision), attribution in zip(pairs, attributions, strict=True):
            report = build_report(attribution, unit=unit, decision=decision)
            stem = report_stem(decision.id)
            self._atomic_write(self.dir / f"{stem}.json", json.dumps(report, indent=1, sort_keys=True))
            self._atomic_write(self.dir / f"{stem}.html", render_unit_html(report, unit))
            links[decision.id] = f"{self.base_url}/{stem}.html"
        return links

    def _explain(self, model, units: list[Unit], scored: list | None) -> list:
        """The attributions of ``units`` by ``model`` (level 2 from the scoring pass's tokens when it has them)."""
        if scored is not None and self.level == 2 and all(s.encoded is not None for s in scored):
            groups = model_groups(model)
            return [explain_encoded(model, s.encoded, s.row, s.attribution, budget=self.budget, seed=self.seed,
                                    groups=groups) for s in scored]
        return explain(model, units, level=self.level, budget=self.budget, seed=self.seed)

    def _atomic_write(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _by_adapter(decisions: Sequence[Decision], adapters: LineAdapters | None) -> dict[str | None, list[int]]:
    """Positions of ``decisions`` by the line whose adapter made them (None: the base model).

    Raises:
        StoreError: a decision names an adapter version that ``adapters`` does not hold.
    """
    out: dict[str | None, list[int]] = {}
    for i, decision in enumerate(decisions):
        _, line, version = split_model_version(decision.model_version)
        if line is not None:
            held = adapters.lines.get(line) if adapters is not None else None
            if held is None or held.version != version:
                raise StoreError(f"decision {decision.id} was made with adapter {version} of line {line!r}; the "
                                 f"model explaining it holds {held.version if held else 'no adapter'} for that line")
        out.setdefault(line, []).append(i)
    return out


def explain_served_units(serving, units: Sequence[Unit], out_dir: str | Path, *, level: int = 2, budget: int = 512,
                         seed: int = 0) -> list[tuple[Path, dict[str, Any]]]:
    """``inspection explain``: :func:`explain.report.explain_to_reports` of a served model, each unit with the
    adapter of its line in place when ``serving`` has one.

    A unit of a line with an adapter is explained by the adapted model in every forward pass; its report's
    decision is that model's (the score it gives the unit, against the adapter's threshold and threshold version)
    and its ``model_version`` reads ``<version>+<line>:<adapter version>``, as a decision of the stream names it.
    Other units are explained by the base model with its own thresholds.

    Args:
        serving: the loaded model (:func:`services.scoring.load_serving_model`), a supervised one.
        units: the units to explain.
        out_dir: the report folder.
        level, budget, seed: as for :func:`explain.explain`.

    Returns:
        ``(json path, report)`` per unit, in the order of ``units``.
    """
    adapters: LineAdapters | None = serving.adapters
    by_line: dict[str | None, list[int]] = {}
    for i, unit in enumerate(units):
        by_line.setdefault(unit.line_id if adapters is not None and unit.line_id in adapters.lines else None,
                           []).append(i)
    written: list[Any] = [None] * len(units)
    for line, rows in by_line.items():
        part = [units[i] for i in rows]
        if line is None:
            context, model = contextlib.nullcontext(), serving.model
            named = {"model_version": serving.version, "threshold_version": serving.threshold_version}
        else:
            adapter = adapters.lines[line]
            context = adapters.only(line)
            model = context.model
            named = {"model_version": adapted_version(serving.version, line, adapter.version),
                     "threshold_version": adapter.threshold_version, "threshold": adapter.threshold}
        with context:
            got = explain_to_reports(model, part, out_dir, level=level, budget=budget, seed=seed, **named)
        for i, item in zip(rows, got, strict=True):
            written[i] = item
    return written
