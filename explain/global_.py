"""Level 3, global: what a set of explained decisions (a line, a shift, a period) leaned on, and how that moved.

From report documents (:mod:`explain.report`): the mean |φ| per modality and per group (over the units that have
them), the pairwise interactions' mean and mean absolute value, and per period (day or hour of the event time)
the units counted and each modality's mean |φ|. Filter the reports first (line, decision, time) to summarise a
subset; the summary says how many units it covers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from inspection.records import MODALITIES

PERIODS: tuple[str, ...] = ("day", "hour")


def summarize(reports: Iterable[Mapping[str, Any]], *, period: str = "day") -> dict[str, Any]:
    """Aggregate reports into the global view.

    Args:
        reports: validated report documents (:func:`explain.report.check_report`).
        period: ``day`` or ``hour``: the time buckets of the movement over time (by event time).

    Returns:
        ``units``, ``modalities`` (name, mean_abs_phi, mean_phi, units; largest first), ``groups`` (modality,
        name, mean_abs_phi, mean_phi, units; largest first), ``interactions`` (pair, mean, mean_abs, units;
        largest |mean| first), ``culprits`` (modality -> units it was the top modality of), ``periods``
        (period, units, mean_abs_phi per modality; in time order) and ``modality_names``.

    Raises:
        ValueError: an unknown period.
    """
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}; got {period!r}")
    cut = 10 if period == "day" else 13
    mods: dict[str, list[float]] = defaultdict(list)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    pairs: dict[str, list[float]] = defaultdict(list)
    culprits: dict[str, int] = defaultdict(int)
    buckets: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, int] = defaultdict(int)
    n = 0
    for report in reports:
        n += 1
        exp = report["explanation"]
        phi = exp["modality"]["phi"]
        for m, v in phi.items():
            mods[m].append(float(v))
        for k, v in exp["modality"].get("interactions", {}).items():
            pairs[k].append(float(v))
        for m, gs in exp.get("groups", {}).items():
            for g in gs:
                groups[(m, g["name"])].append(float(g["phi"]))
        culprit = report.get("summary", {}).get("culprit_modality")
        if culprit:
            culprits[culprit] += 1
        when = report.get("event_time")
        if isinstance(when, str) and len(when) >= cut:
            key = when[:cut] + ("" if period == "day" else ":00")
            counts[key] += 1
            for m, v in phi.items():
                buckets[key][m].append(abs(float(v)))

    def stats(values: list[float]) -> tuple[float, float]:
        return math.fsum(abs(v) for v in values) / len(values), math.fsum(values) / len(values)

    modalities = []
    for m, vs in mods.items():
        mean_abs, mean = stats(vs)
        modalities.append({"name": m, "mean_abs_phi": mean_abs, "mean_phi": mean, "units": len(vs)})
    modalities.sort(key=lambda r: -r["mean_abs_phi"])
    group_rows = []
    for (m, name), vs in groups.items():
        mean_abs, mean = stats(vs)
        group_rows.append({"modality": m, "name": name, "mean_abs_phi": mean_abs, "mean_phi": mean, "units": len(vs)})
    group_rows.sort(key=lambda r: -r["mean_abs_phi"])
    interactions = []
    for k, vs in pairs.items():
        mean_abs, mean = stats(vs)
        interactions.append({"pair": k, "mean": mean, "mean_abs": mean_abs, "units": len(vs)})
    interactions.sort(key=lambda r: -abs(r["mean"]))
    names = [m for m in MODALITIES if m in mods]
    periods = [{"period": key, "units": counts[key],
                "mean_abs_phi": {m: math.fsum(vs) / len(vs) for m, vs in buckets[key].items()}}
               for key in sorted(buckets)]
    return {"units": n, "modalities": modalities, "groups": group_rows, "interactions": interactions,
            "culprits": dict(culprits), "periods": periods, "modality_names": names, "period": period}


def decision_entry(decision) -> dict[str, Any]:
    """A decision (:class:`inspection.records.Decision`) as the level-1 part of a report document, for
    :func:`summarize` and the index page: its modality values and interactions, its culprit modality (the
    largest value, as in a report), event time and outcome. Decision history carries level 1 only (level-2 groups
    live in the reports)."""
    from inspection.records import format_time

    attributions = decision.attributions or {}
    phi = {m: float(v) for m, v in (attributions.get("modality") or {}).items()}
    return {
        "unit_id": decision.unit_id,
        "line_id": decision.line_id,
        "event_time": format_time(decision.event_time),
        "decision": {"id": decision.id, "decision": decision.decision, "score": decision.score,
                     "threshold": decision.threshold, "class": decision.defect_class,
                     "report_url": decision.report_url},
        "model_version": decision.model_version,
        "explanation": {"level": 1, "modality": {"phi": phi,
                                                 "interactions": dict(attributions.get("interactions") or {})},
                        "groups": {}},
        "summary": {"culprit_modality": max(phi, key=lambda m: phi[m]) if phi else None},
    }
