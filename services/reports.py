"""Explanation reports of the stream's decisions: written before the decision is sent, so its link resolves.

For the decisions the configuration selects (``reports.units``: defects, all or none) the service explains the
unit at ``reports.level`` with ``reports.budget`` model evaluations (one :func:`explain.explain` call per batch),
writes ``<stem>.json`` and ``<stem>.html`` into ``reports.dir`` (the stem derived from the decision id by
:func:`explain.report.report_stem`, written through a temporary file and renamed, so a reader never sees half a
file), and only then sets the decision's ``report`` link. A report that cannot be made is logged and counted;
its decision goes out without a link. Nothing is lost either way.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from explain import explain
from explain.api import explain_encoded, model_groups
from explain.report import build_report, render_unit_html, report_stem
from inspection.errors import ConfigError
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

    def write(self, model, pairs: Sequence[tuple[Unit, Decision]], scored: Sequence | None = None) -> dict[str, str]:
        """Explain and write the reports of ``(unit, decision)`` pairs; returns decision id -> link.

        Args:
            model: the model that decided.
            pairs: the units (as scored) and their decisions.
            scored: per pair, the scoring result (:class:`services.scoring.Scored`) holding the unit's encoder
                tokens and level-1 attribution: level 2 then only runs the coalitions' fusion rows.

        Raises:
            Exception: whatever explaining or writing raised (the caller logs it and sends without links).
        """
        if not pairs:
            return {}
        units = [u for u, _ in pairs]
        if scored is not None and self.level == 2 and all(s.encoded is not None for s in scored):
            groups = model_groups(model)
            attributions = [explain_encoded(model, s.encoded, s.row, s.attribution, budget=self.budget,
                                            seed=self.seed, groups=groups) for s in scored]
        else:
            attributions = explain(model, units, level=self.level, budget=self.budget, seed=self.seed)
        links: dict[str, str] = {}
        for (unit, decision), attribution in zip(pairs, attributions, strict=True):
            report = build_report(attribution, unit=unit, decision=decision)
            stem = report_stem(decision.id)
            self._atomic_write(self.dir / f"{stem}.json", json.dumps(report, indent=1, sort_keys=True))
            self._atomic_write(self.dir / f"{stem}.html", render_unit_html(report, unit))
            links[decision.id] = f"{self.base_url}/{stem}.html"
        return links

    def _atomic_write(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
