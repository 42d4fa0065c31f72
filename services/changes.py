"""What a new model version would have decided differently: the change report of a re-scoring run.

Two sets of decisions of the same history (a re-scoring with another model version, or the decisions recorded
by the stream) are matched unit by unit (unit id and input coordinates: the same readings). The report counts
the decisions that flip (ok -> defect, defect -> ok) in total and per line and day, the distribution of the
score shift (new - old), the reliability of both versions where the history carries labels (per score bin: the
mean score against the share of units that were defective; a calibrated model lies on the diagonal), and the
flipped units with the largest shifts, linked to their explanation reports when a report folder holds them.

Written as ``changes.json`` and a self-contained ``changes.html`` (inline SVG and PNG, no external fetches,
every text escaped) with ``reliability.png`` beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np

from inspection.records import Decision

SCHEMA = "inspection.change-report/1"
SHIFT_EDGES = np.linspace(-1.0, 1.0, 41)
RELIABILITY_BINS = 10


def _key(d: Decision) -> tuple:
    return d.unit_id, tuple(sorted(d.inputs))


def compare(new: Iterable[Decision], old: Iterable[Decision], *, labels: Mapping[str, bool] | None = None,
            reports: Path | None = None, top: int = 20) -> dict[str, Any]:
    """The change report of ``new`` decisions against ``old`` ones (see the module docstring).

    Args:
        new, old: decisions of the same history; matched by unit id and input coordinates (a unit decided more
            than once with the same inputs counts once: the decision ids are the same).
        labels: unit id -> defective, where known (for the reliability curves).
        reports: a folder of explanation reports (``explain.report``); a flipped unit's new decision links to
            its page there when it exists.
        top: how many flipped units to list.
    """
    from explain.report import report_stem

    new_by = {_key(d): d for d in new}
    old_by = {_key(d): d for d in old}
    both = sorted(new_by.keys() & old_by.keys())
    flips: Counter = Counter()
    by_partition: dict[tuple[str, str], Counter] = defaultdict(Counter)
    shifts = []
    flipped = []
    for k in both:
        n, o = new_by[k], old_by[k]
        shift = n.score - o.score
        shifts.append(shift)
        day = n.event_time.astimezone(UTC).date().isoformat()
        part = by_partition[(n.line_id, day)]
        part["units"] += 1
        if n.decision != o.decision:
            kind = f"{o.decision}_to_{n.decision}"
            flips[kind] += 1
            part[kind] += 1
            row = {"unit_id": n.unit_id, "line_id": n.line_id, "day": day, "old_decision": o.decision,
                   "new_decision": n.decision, "old_score": o.score, "new_score": n.score, "shift": shift,
                   "old_threshold": o.threshold, "new_threshold": n.threshold, "decision_id": n.id}
            if reports is not None and (reports / f"{report_stem(n.id)}.html").is_file():
                row["report"] = str(reports / f"{report_stem(n.id)}.html")
            flipped.append(row)
    flipped.sort(key=lambda r: -abs(r["shift"]))
    hist, _ = np.histogram(np.clip(shifts, -1.0, 1.0), bins=SHIFT_EDGES) if shifts else (np.zeros(40, int), None)
    versions = {"new": sorted({d.model_version for d in new_by.values()}),
                "old": sorted({d.model_version for d in old_by.values()})}
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "versions": versions,
        "units_compared": len(both),
        "only_new": len(new_by.keys() - old_by.keys()),
        "only_old": len(old_by.keys() - new_by.keys()),
        "flips": {"ok_to_defect": flips["ok_to_defect"], "defect_to_ok": flips["defect_to_ok"],
                  "total": flips["ok_to_defect"] + flips["defect_to_ok"]},
        "defect_rate": {"new": _rate([new_by[k] for k in both]), "old": _rate([old_by[k] for k in both])},
        "by_line_day": [{"line_id": line, "day": day, "units": c["units"], "ok_to_defect": c["ok_to_defect"],
                         "defect_to_ok": c["defect_to_ok"]} for (line, day), c in sorted(by_partition.items())],
        "score_shift": {"edges": SHIFT_EDGES.tolist(), "counts": hist.tolist(),
                        "mean": float(np.mean(shifts)) if shifts else None,
                        "mean_abs": float(np.mean(np.abs(shifts))) if shifts else None},
        "top_flipped": flipped[:top],
    }
    if labels:
        out["reliability"] = {name: _reliability([by[k] for k in both], labels)
                              for name, by in (("new", new_by), ("old", old_by))}
    return out


def _rate(decisions: list[Decision]) -> float | None:
    return sum(d.decision == "defect" for d in decisions) / len(decisions) if decisions else None


def _reliability(decisions: list[Decision], labels: Mapping[str, bool]) -> dict[str, Any]:
    known = [(d.score, labels[d.unit_id]) for d in decisions if d.unit_id in labels]
    edges = np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = [(s, y) for s, y in known if lo <= s < hi or (hi == 1.0 and s == 1.0)]
        if inside:
            rows.append({"bin": [float(lo), float(hi)], "units": len(inside),
                         "mean_score": float(np.mean([s for s, _ in inside])),
                         "defect_share": float(np.mean([y for _, y in inside]))})
    ece = sum(r["units"] * abs(r["mean_score"] - r["defect_share"]) for r in rows) / len(known) if known else None
    return {"labelled_units": len(known), "bins": rows, "expected_calibration_error": ece}


def reliability_png(report: Mapping[str, Any]) -> bytes | None:
    """The reliability plot of both versions as PNG bytes (None without labels)."""
    rel = report.get("reliability")
    if not rel:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="calibrated")
    for name, color in (("old", "#1565c0"), ("new", "#c62828")):
        bins = rel[name]["bins"]
        label = f"{name} ({', '.join(report['versions'][name])})"
        ax.plot([b["mean_score"] for b in bins], [b["defect_share"] for b in bins], marker="o", color=color,
                label=label)
    ax.set_xlabel("mean defect score in bin")
    ax.set_ylabel("share of units defective")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _histogram_svg(report: Mapping[str, Any]) -> str:
    counts = report["score_shift"]["counts"]
    edges = report["score_shift"]["edges"]
    w, h, pad = 520, 180, 30
    peak = max(counts) or 1
    bar = (w - 2 * pad) / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             'aria-label="score shift histogram">']
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * c / peak
        x = pad + i * bar
        parts.append(f'<rect x="{x:.1f}" y="{h - pad - bh:.1f}" width="{bar - 1:.1f}" height="{bh:.1f}" '
                     f'fill="#5c6bc0"><title>{edges[i]:+.2f} .. {edges[i + 1]:+.2f}: {c}</title></rect>')
    parts.append(f'<line x1="{w / 2}" y1="{pad - 5}" x2="{w / 2}" y2="{h - pad}" stroke="#333" stroke-width="1"/>')
    for x, label in ((pad, "-1"), (w / 2, "0"), (w - pad, "+1")):
        parts.append(f'<text x="{x}" y="{h - 8}" font-size="11" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{w / 2}" y="14" font-size="11" text-anchor="middle">score shift (new - old)</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_change_report(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``changes.json``, ``changes.html`` and (with labels) ``reliability.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "changes.json", out / "changes.html"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    png = reliability_png(report)
    if png is not None:
        (out / "reliability.png").write_bytes(png)
    e = html.escape
    flips = report["flips"]
    rows = "".join(
        f"<tr><td>{e(r['line_id'])}</td><td>{e(r['day'])}</td><td>{r['units']}</td><td>{r['ok_to_defect']}</td>"
        f"<td>{r['defect_to_ok']}</td></tr>" for r in report["by_line_day"])
    top = "".join(
        f"<tr><td>{_link(r, out)}</td><td>{e(r['line_id'])}</td><td>{e(r['day'])}</td>"
        f"<td>{e(r['old_decision'])} → {e(r['new_decision'])}</td><td>{r['old_score']:.3f}</td>"
        f"<td>{r['new_score']:.3f}</td><td>{r['shift']:+.3f}</td></tr>" for r in report["top_flipped"])
    picture = (f'<img alt="reliability plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
               if png else "<p>No labels in the history: no reliability plot.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Re-scoring changes</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#111}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.2rem .6rem;text-align:left;font-size:.9rem}}.meta{{color:#555}}</style>
</head><body>
<h1>What would have been decided differently</h1>
<p class="meta">new: {e(', '.join(report['versions']['new']))} · old: {e(', '.join(report['versions']['old']))} ·
{report['units_compared']} units compared ({report['only_new']} only in new, {report['only_old']} only in old)</p>
<p id="flips"><strong>{flips['total']}</strong> decisions flip: {flips['ok_to_defect']} ok → defect,
{flips['defect_to_ok']} defect → ok.</p>
<h2>Per line and day</h2>
<table id="by-line-day"><tr><th>line</th><th>day</th><th>units</th><th>ok → defect</th><th>defect → ok</th></tr>
{rows}</table>
<h2>Score shift</h2>
{_histogram_svg(report)}
<h2>Reliability</h2>
{picture}
<h2>Largest flips</h2>
<table id="top-flipped"><tr><th>unit</th><th>line</th><th>day</th><th>decision</th><th>old score</th><th>new score</th>
<th>shift</th></tr>{top}</table>
</body></html>
"""
    html_path.write_text(page)
    return json_path, html_path


def _link(row: Mapping[str, Any], out: Path) -> str:
    import os

    uid = html.escape(row["unit_id"])
    if "report" in row:
        return f'<a href="{html.escape(os.path.relpath(row["report"], out), quote=True)}">{uid}</a>'
    return uid
