"""Explanation reports: a versioned JSON document per unit, a self-contained HTML page per unit, and an index.

The JSON report (schema :data:`REPORT_SCHEMA`) holds what an operator and a later audit need: the unit, line and
event time; the decision, score and threshold with the model and threshold versions when known; level 1 (the
modalities' Shapley values on the logit and probability scale, pairwise interactions, v(all) and v(none)); level 2
when computed (each modality's groups with their Owen values, names and extents); the method, masking, budget,
seed and efficiency gap. Its fields are listed in ``docs/explanations.md``.

The HTML page is rendered from the JSON report and the unit's readings with jinja2 (autoescape on): a decision
banner, the modalities as a bar chart with the strongest interaction in words, the image with a heat map of its
regions' values, the vibration spectrum and envelope spectrum with their bands shaded by value, the temperature
traces with their segments shaded. Pictures are inline (a PNG as a data URI, SVG in the page): the page fetches
nothing and works offline. Unit ids and every other text are escaped; file names are derived from a hash, never
from the ids themselves.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from explain.api import Attribution
from inspection.errors import InspectionError
from inspection.records import MODALITIES, Decision, Unit

#: Identifies the JSON report format; a reader refuses other values.
REPORT_SCHEMA = "inspection.explanation-report/1"
#: Colours of positive (towards defect) and negative (towards ok) values, as RGB.
TOWARDS_DEFECT = (200, 40, 40)
TOWARDS_OK = (40, 90, 200)
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class ReportError(InspectionError, ValueError):
    """A report document is not a valid :data:`REPORT_SCHEMA` report."""


def report_stem(key: str) -> str:
    """A file-name stem for a report: a readable prefix of ``key`` limited to ``[A-Za-z0-9_-]`` plus a hash of the
    whole key, so that no unit or decision id can name a path outside the report folder or collide with another."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    prefix = _SAFE.sub("_", key)[:40].strip("_") or "unit"
    return f"{prefix}-{digest}"


def build_report(attribution: Attribution, *, unit: Unit | None = None,
                 decision: Decision | Mapping[str, Any] | None = None,
                 model_version: str | None = None) -> dict[str, Any]:
    """The JSON report of one unit's explanation.

    Args:
        attribution: the unit's explanation (level 1 or 2).
        unit: the unit (line, event time, modalities, label when known).
        decision: the decision the explanation belongs to (decision, score, threshold, versions, id): a
            :class:`~inspection.records.Decision`, or a mapping with the keys of the report's ``decision`` field.
        model_version: the model version, when there is no decision.

    Returns:
        JSON data (str, float, int, bool, None, list and dict only).
    """
    a = attribution.modality
    typed = decision if isinstance(decision, Decision) else None
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "unit_id": attribution.unit_id,
        "line_id": unit.line_id if unit is not None else (typed.line_id if typed else None),
        "event_time": (unit.event_time if unit is not None else typed.event_time if typed else None),
        "decision": None,
        "model_version": model_version,
        "explanation": attribution.to_dict(),
        "label": None,
    }
    if isinstance(report["event_time"], datetime):
        report["event_time"] = report["event_time"].isoformat()
    if typed is not None:
        report["decision"] = {"id": typed.id, "decision": typed.decision, "score": typed.score,
                              "threshold": typed.threshold, "class": typed.defect_class,
                              "threshold_version": typed.threshold_version, "missing": list(typed.missing)}
        report["model_version"] = typed.model_version
    elif decision is not None:
        keys = ("id", "decision", "score", "threshold", "class", "threshold_version", "missing")
        report["decision"] = {k: decision.get(k) for k in keys}
    if unit is not None and unit.label is not None:
        report["label"] = {"defect": bool(unit.label.defect), "class": unit.label.defect_class,
                           "culprits": sorted(unit.label.culprits)}
    report["summary"] = _summary(attribution, a.phi, a.interactions)
    return report


def _summary(attribution: Attribution, phi: Mapping[str, float], interactions: Mapping[str, float]) -> dict:
    culprit = max(phi, key=lambda m: phi[m]) if phi else None
    pair = max(interactions, key=lambda k: abs(interactions[k])) if interactions else None
    top = attribution.top_groups(3)
    return {
        "culprit_modality": culprit,
        "strongest_interaction": ({"pair": pair, "value": float(interactions[pair])} if pair else None),
        "top_groups": [g.to_dict() for g in top],
    }


def check_report(report: object) -> dict[str, Any]:
    """Validate a JSON report's shape (what the index and the global view read) and return it.

    Raises:
        ReportError: a missing or foreign schema, or a missing field.
    """
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        got = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ReportError(f"expected a report with schema {REPORT_SCHEMA!r}; got {got!r}")
    for key in ("unit_id", "explanation", "summary"):
        if key not in report:
            raise ReportError(f"report of {report.get('unit_id')!r} lacks the field {key!r}")
    exp = report["explanation"]
    if not isinstance(exp, dict) or "modality" not in exp or "level" not in exp:
        raise ReportError(f"report of {report.get('unit_id')!r} has no valid explanation")
    return report


# ------------------------------------------------------------------------------------------ pictures
def _colour(value: float, scale: float) -> tuple[int, int, int, float]:
    strength = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    rgb = TOWARDS_DEFECT if value > 0 else TOWARDS_OK
    return (*rgb, round(0.15 + 0.6 * strength, 3) if strength > 0 else 0.0)


def _png_data_uri(image: np.ndarray) -> str:
    import cv2

    bgr = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError("could not encode the heat map as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def heatmap_picture(image: np.ndarray, groups: Sequence[Mapping[str, Any]], width: int = 360) -> str:
    """The image with each region group tinted by its value (red towards defect, blue towards ok), as a PNG data
    URI. Region spans are pixel boxes in the model's input frame; they are scaled to the image's own size."""
    import cv2

    img = image.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    hi = float(img.max()) or 1.0
    img = np.clip(img / hi * 255.0, 0, 255)
    h, w = img.shape[:2]
    scale_h = width / w
    img = cv2.resize(img, (width, max(1, round(h * scale_h))), interpolation=cv2.INTER_AREA)
    out_h, out_w = img.shape[:2]
    regions = [g for g in groups if g["kind"] == "region"]
    if regions:
        frame_h = max(g["span"][2] for g in regions)
        frame_w = max(g["span"][3] for g in regions)
        scale = max(abs(g["phi"]) for g in regions)
        overlay = img.copy()
        alpha = np.zeros((out_h, out_w, 1), np.float32)
        for g in regions:
            y0, x0, y1, x1 = g["span"]
            r0, r1 = round(y0 / frame_h * out_h), round(y1 / frame_h * out_h)
            c0, c1 = round(x0 / frame_w * out_w), round(x1 / frame_w * out_w)
            *rgb, a = _colour(g["phi"], scale)
            overlay[r0:r1, c0:c1] = rgb
            alpha[r0:r1, c0:c1] = a
        img = img * (1 - alpha) + overlay * alpha
        for g in regions:  # thin grid lines between the regions
            y0, x0, y1, x1 = g["span"]
            r0, c0 = round(y0 / frame_h * out_h), round(x0 / frame_w * out_w)
            img[min(r0, out_h - 1), :] = img[min(r0, out_h - 1), :] * 0.6 + 100
            img[:, min(c0, out_w - 1)] = img[:, min(c0, out_w - 1)] * 0.6 + 100
    return _png_data_uri(np.clip(img, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Band:
    """A shaded interval of a chart: [lo, hi] on the x axis, its colour and its tooltip."""

    lo: float
    hi: float
    fill: str
    title: str


def _fill(value: float, scale: float) -> str:
    r, g, b, a = _colour(value, scale)
    return f"rgba({r},{g},{b},{a})"


def line_chart_svg(x: np.ndarray, series: Sequence[tuple[str, np.ndarray]], bands: Sequence[Band], *,
                   x_label: str, y_label: str, width: int = 640, height: int = 200) -> str:
    """A small SVG line chart (escaped labels) with shaded bands."""
    pad_l, pad_b, pad_t, pad_r = 48, 30, 10, 10
    x = np.asarray(x, dtype=np.float64)
    x0, x1 = float(x.min()), float(x.max()) if x.size else (0.0, 1.0)
    ys = np.concatenate([np.asarray(s, dtype=np.float64) for _, s in series]) if series else np.zeros(1)
    ys = ys[np.isfinite(ys)]
    y0, y1 = (float(ys.min()), float(ys.max())) if ys.size else (0.0, 1.0)
    if y1 <= y0:
        y1 = y0 + 1.0
    if x1 <= x0:
        x1 = x0 + 1.0
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return pad_t + ph - (v - y0) / (y1 - y0) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" '
             f'role="img" aria-label="{html.escape(y_label)} against {html.escape(x_label)}">']
    for band in bands:
        lo, hi = max(band.lo, x0), min(band.hi, x1)
        if hi <= lo:
            continue
        parts.append(f'<rect x="{sx(lo):.1f}" y="{pad_t}" width="{max(0.5, sx(hi) - sx(lo)):.1f}" height="{ph}" '
                     f'fill="{band.fill}"><title>{html.escape(band.title)}</title></rect>')
    colours = ("#222", "#666", "#999", "#444", "#888", "#aaa")
    for i, (name, s) in enumerate(series):
        s = np.asarray(s, dtype=np.float64)
        step = max(1, len(s) // 800)
        pts = " ".join(f"{sx(float(a)):.1f},{sy(float(b)):.1f}" for a, b in zip(x[::step], s[::step], strict=False)
                       if math.isfinite(b))
        parts.append(f'<polyline fill="none" stroke="{colours[i % len(colours)]}" stroke-width="1" points="{pts}">'
                     f'<title>{html.escape(name)}</title></polyline>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#000"/>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + ph}" stroke="#000"/>')
    parts.append(f'<text x="{pad_l + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="11">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 18}" font-size="10">{x0:g}</text>')
    parts.append(f'<text x="{pad_l + pw}" y="{height - 18}" font-size="10" text-anchor="end">{x1:g}</text>')
    parts.append(f'<text x="4" y="{pad_t + 10}" font-size="10">{html.escape(y_label)}</text>')
    # enough digits that the two ends of the axis read differently (a trace 22.10-22.14 degC is not "22.1-22.1")
    digits = 3 + min(5, max(0, int(-math.log10(max((y1 - y0) / max(abs(y0), abs(y1), 1e-12), 1e-12)))))
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 22}" font-size="10" text-anchor="end">{y1:.{digits}g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + ph}" font-size="10" text-anchor="end">{y0:.{digits}g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def vibration_pictures(values: np.ndarray, rate_hz: float, groups: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The spectrum and the envelope spectrum of the first channel with their band groups shaded."""
    from scipy.signal import hilbert

    x = np.asarray(values, dtype=np.float64)[0]
    x = x - x.mean()
    out = []
    n = len(x)
    freqs = np.fft.rfftfreq(n, 1.0 / rate_hz)
    spectrum = 20 * np.log10(np.abs(np.fft.rfft(x * np.hanning(n))) + 1e-12)
    env = np.abs(hilbert(x))
    env_spec = 20 * np.log10(np.abs(np.fft.rfft((env - env.mean()) * np.hanning(n))) + 1e-12)
    for kind, y, title in (("spectrum", spectrum, "Spectrum"), ("envelope", env_spec, "Envelope spectrum")):
        members = [g for g in groups if g["kind"] == kind]
        if not members:
            continue
        scale = max(abs(g["phi"]) for g in members) or 1.0
        top_hz = max(g["span"][1] for g in members)
        keep = freqs <= top_hz
        bands = [Band(g["span"][0], g["span"][1], _fill(g["phi"], scale), f"{g['name']}: {g['phi']:+.3f}")
                 for g in members]
        out.append({"title": title, "svg": line_chart_svg(freqs[keep], [("channel 0", y[keep])], bands,
                                                          x_label="frequency (Hz)", y_label="dB")})
    return out


def temperature_pictures(values: np.ndarray, rate_hz: float, groups: Sequence[Mapping[str, Any]],
                         unit_name: str, max_channels: int = 8) -> list[dict]:
    """One trace per channel (at most ``max_channels``) with that channel's time-segment groups shaded."""
    v = np.asarray(values, dtype=np.float64)
    t = np.arange(v.shape[1]) / rate_hz
    members = [g for g in groups if g["kind"] == "series"]
    scale = max((abs(g["phi"]) for g in members), default=1.0) or 1.0
    frame = max((g["span"][2] for g in members), default=1.0)
    duration = v.shape[1] / rate_hz
    out = []
    for c in range(min(v.shape[0], max_channels)):
        mine = [g for g in members if int(g["span"][0]) == c]
        bands = [Band(g["span"][1] / frame * duration, g["span"][2] / frame * duration, _fill(g["phi"], scale),
                      f"{g['name']}: {g['phi']:+.3f}") for g in mine]
        title = mine[0]["name"].split(",")[0] if mine else f"channel {c}"
        out.append({"title": title, "svg": line_chart_svg(t, [(title, v[c])], bands, x_label="time in the window (s)",
                                                          y_label=unit_name, height=150)})
    return out


# ------------------------------------------------------------------------------------------------ html
@functools.cache
def _env():
    """The templates' environment, made once per process (compiling a template costs more than rendering it)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("explain", "templates"), autoescape=select_autoescape(["html", "j2"]),
                       trim_blocks=True, lstrip_blocks=True)


def _interaction_sentence(report: Mapping[str, Any]) -> str | None:
    pair = report["summary"].get("strongest_interaction")
    if not pair or abs(pair["value"]) < 1e-6:
        return None
    a, b = pair["pair"].split("×")
    verb = "adds" if pair["value"] > 0 else "takes away"
    return f"{a} × {b} together {verb} {abs(pair['value']):.2f} (logit) beyond what each brings alone"


def render_unit_html(report: Mapping[str, Any], unit: Unit | None = None) -> str:
    """The self-contained HTML page of one report (pictures need the unit's readings)."""
    report = check_report(dict(report))
    exp = report["explanation"]
    phi = exp["modality"]["phi"]
    scale = max((abs(v) for v in phi.values()), default=1.0) or 1.0
    bars = [{"name": m, "value": v, "width": round(abs(v) / scale * 100, 1), "fill": _fill(v, scale)}
            for m, v in phi.items()]
    groups = {m: sorted(gs, key=lambda g: -abs(g["phi"])) for m, gs in exp.get("groups", {}).items()}
    pictures: dict[str, Any] = {}
    if unit is not None:
        if unit.vision is not None and "vision" in groups:
            pictures["vision"] = heatmap_picture(unit.vision.image, exp["groups"]["vision"])
        if unit.vibration is not None and "vibration" in groups:
            pictures["vibration"] = vibration_pictures(unit.vibration.values, unit.vibration.sample_rate_hz,
                                                       exp["groups"]["vibration"])
        if unit.temperature is not None and "temperature" in groups:
            pictures["temperature"] = temperature_pictures(unit.temperature.values, unit.temperature.sample_rate_hz,
                                                           exp["groups"]["temperature"], unit.temperature.unit)
    return _env().get_template("unit.html.j2").render(
        report=report, exp=exp, bars=bars, groups=groups, pictures=pictures, modalities=MODALITIES,
        interaction=_interaction_sentence(report), scale=scale,
        report_json=json.dumps(report, indent=1, sort_keys=True))


def render_index_html(entries: Sequence[Mapping[str, Any]], overview: Mapping[str, Any] | None = None) -> str:
    """The index page over many reports: one row per unit with filters (line, decision, culprit, time)."""
    rows = []
    for e in entries:
        report, href = e["report"], e["href"]
        d = report.get("decision") or {}
        rows.append({"unit_id": report["unit_id"], "line_id": report.get("line_id") or "",
                     "decision": d.get("decision") or "", "score": d.get("score"),
                     "culprit": report["summary"].get("culprit_modality") or "",
                     "time": report.get("event_time") or "", "href": href,
                     "level": report["explanation"]["level"]})
    lines = sorted({r["line_id"] for r in rows})
    decisions = sorted({r["decision"] for r in rows if r["decision"]})
    culprits = sorted({r["culprit"] for r in rows if r["culprit"]})
    return _env().get_template("index.html.j2").render(rows=rows, lines=lines, decisions=decisions,
                                                       culprits=culprits, overview=overview)


def write_unit_report(out_dir: Path | str, report: Mapping[str, Any], unit: Unit | None = None,
                      stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.html`` into ``out_dir`` (created); returns both paths.

    The stem defaults to :func:`report_stem` of the decision id (or the unit id without a decision).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stem is None:
        d = report.get("decision") or {}
        stem = report_stem(d.get("id") or report["unit_id"])
    if _SAFE.sub("", stem) != stem:
        raise ValueError(f"report file stems must be [A-Za-z0-9_-]; got {stem!r}")
    json_path, html_path = out / f"{stem}.json", out / f"{stem}.html"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    html_path.write_text(render_unit_html(report, unit), encoding="utf-8")
    return json_path, html_path


#: Files in a report folder that are not unit reports.
NOT_REPORTS: frozenset[str] = frozenset({"global.json"})


def report_files(source: Path | str) -> list[Path]:
    """The unit report JSON files of a folder (sorted), or the one file given.

    Raises:
        ReportError: the path does not exist, or a folder holds no report.
    """
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ReportError(f"{path} is neither a report file nor a folder of reports")
    files = sorted(p for p in path.glob("*.json") if p.name not in NOT_REPORTS)
    if not files:
        raise ReportError(f"{path} holds no report JSON files (write some with `inspection explain`)")
    return files


def read_reports(paths: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Read and validate report JSON files (skipping other JSON files would hide mistakes: they raise).

    Raises:
        ReportError: a file that is not a valid report.
    """
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"cannot read report {path}: {exc}") from exc
        try:
            out.append((Path(path), check_report(data)))
        except ReportError as exc:
            raise ReportError(f"{path}: {exc}") from None
    return out


# ------------------------------------------------------------------------------------------ batch runs
def explain_to_reports(model, units: Sequence[Unit], out_dir: Path | str, *, level: int = 2, budget: int = 512,
                       seed: int = 0, model_version: str | None = None, threshold_version: str | None = None,
                       chunk: int = 16, threshold: float | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Explain units and write a JSON and an HTML report per unit into ``out_dir``.

    The decision in each report is the model's own: score = the defect probability with every modality visible,
    threshold = ``threshold`` when given (e.g. a line adapter's, for units of that line), else the unit's line
    threshold (when the model is calibrated), decision = score ≥ threshold. The file stem derives from the unit
    id (:func:`report_stem`).

    Returns:
        ``(json path, report)`` per unit, in order.
    """
    import torch

    from explain.api import explain

    out: list[tuple[Path, dict[str, Any]]] = []
    for lo in range(0, len(units), chunk):
        part = list(units[lo:lo + chunk])
        attributions = explain(model, part, level=level, budget=budget, seed=seed)
        thresholds: list[float | None] = [threshold] * len(part)
        if threshold is None and model.calibrated:
            slots = torch.tensor([model.line_slot(u.line_id) for u in part], dtype=torch.long,
                                 device=model.thresholds.device)
            thresholds = [float(t) for t in model.threshold_for(slots).cpu().tolist()]
        for unit, attribution, cut in zip(part, attributions, thresholds, strict=True):
            score = 1.0 / (1.0 + math.exp(-attribution.modality.value_full))
            decision = None
            if cut is not None:
                decision = {"decision": "defect" if score >= cut else "ok", "score": score,
                            "threshold": cut, "threshold_version": threshold_version,
                            "missing": [m for m in MODALITIES if m not in unit.present]}
            report = build_report(attribution, unit=unit, decision=decision, model_version=model_version)
            json_path, _ = write_unit_report(out_dir, report, unit, stem=report_stem(unit.unit_id))
            out.append((json_path, report))
    return out


def write_index(out_dir: Path | str, reports: Sequence[tuple[Path, Mapping[str, Any]]], *,
                period: str = "day") -> tuple[Path, Path]:
    """Write ``index.html`` (every report, filters, the global view) and ``global.json`` into ``out_dir``.

    Each row links to the HTML page beside its JSON report (a relative link).
    """
    import os

    from explain.global_ import summarize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overview = summarize([r for _, r in reports], period=period)
    entries = [{"report": r, "href": os.path.relpath(p.with_suffix(".html"), out)} for p, r in reports]
    index = out / "index.html"
    index.write_text(render_index_html(entries, overview), encoding="utf-8")
    glob = out / "global.json"
    glob.write_text(json.dumps(overview, indent=1, sort_keys=True), encoding="utf-8")
    return index, glob
