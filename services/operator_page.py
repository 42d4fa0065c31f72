"""The live operator page of the stream service: recent decisions, filters, links to reports, a status header.

Served by :class:`services.metrics.OpsServer` on the service's HTTP port (127.0.0.1 unless configured):

=========================  ===============================================================================
``GET /``                  the page: status header, filters, the recent decisions newest first (rendered by
                           the server with autoescaping, so it reads without JavaScript too)
``GET /operator.js``       the page's script: polls ``/api/decisions`` every ``refresh_s`` seconds and
                           updates the table in place (``textContent`` only, never markup from data)
``GET /operator.css``      the page's style sheet
``GET /api/decisions``     JSON: the status, the window's bounds, the lines seen, and the decisions with a
                           sequence number above ``after`` that pass the filters, newest first
``GET /api/status``        JSON: the status header's numbers
``GET /reports/<file>``    the report folder (``reports.dir``), read-only: ``<stem>.html``/``.json`` files and
                           ``index.html``; any other name (a path, ``..``, a hidden or escaped name) is a 404
``POST /login``            with a token: the form's token, answered by a session cookie (see :class:`OpsAuth`)
``POST /logout``           with a token: drops that cookie
=========================  ===============================================================================

Filters (query parameters of ``/`` and ``/api/decisions``): ``line`` (exact line id), ``decision``
(``ok``/``defect``/``undecided``), ``culprit`` (the modality with the largest modality-level Shapley value, as in
the explanation reports), ``from`` and ``to`` (ISO 8601 event times, inclusive; UTC when no offset is given).
An unknown parameter or a bad value answers 400 with the reason.

The window (:class:`DecisionWindow`) holds the last ``operator_page.window`` decision records the broker
acknowledged, as sent; it is fed by the service's main thread and read by the HTTP threads under a lock. A record
is parsed the first time the page asks for it, never on the decision path.

Every HTML response carries a Content-Security-Policy that allows nothing outside this server (the page's own
script, style and fetches; reports: their inline styles, scripts and ``data:`` pictures), so the page works
offline and makes no external request.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from inspection.errors import ConfigError
from inspection.records import DECISION_VALUES, MODALITIES

log = logging.getLogger(__name__)

#: Environment variable holding the bearer token unless ``metrics.token_env`` names another.
DEFAULT_TOKEN_ENV = "INSPECTION_OPS_TOKEN"
#: Fewest characters a token may have (a short token could be guessed over the network).
MIN_TOKEN_CHARS = 16
#: Name of the session cookie the login form sets.
SESSION_COOKIE = "inspection_ops_session"
#: Longest request body read (the login form).
MAX_BODY_BYTES = 4096
#: Seconds over which units/s and dead letters per minute are measured.
RATE_SPAN_S = 60.0
#: Query parameters that filter decisions.
FILTER_KEYS = ("line", "decision", "culprit", "from", "to")

_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
             "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_REPORT_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
               "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
_REPORT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}\.(html|json)$")
_REPORT_TYPES = {"html": "text/html; charset=utf-8", "json": "application/json"}
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")


# ------------------------------------------------------------------------------------------------- replies
@dataclass(frozen=True)
class Reply:
    """One HTTP response: status code, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


_COMMON = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
           ("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"))


def _html(status: int, text: str, *extra: tuple[str, str], csp: str = _PAGE_CSP) -> Reply:
    return Reply(status, text.encode("utf-8"), "text/html; charset=utf-8",
                 (("Content-Security-Policy", csp), *_COMMON, *extra))


def _json(status: int, data: Any) -> Reply:
    return Reply(status, json.dumps(data, separators=(",", ":")).encode(), "application/json", _COMMON)


def _text(status: int, text: str, *extra: tuple[str, str]) -> Reply:
    return Reply(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8", (*_COMMON, *extra))


# ---------------------------------------------------------------------------------------------------- auth
def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, variable: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token for an HTTP endpoint bound to ``host``, read from the environment variable ``variable``.

    Returns:
        The token, or None when the variable is unset or empty and ``host`` is loopback (no authentication).

    Raises:
        ConfigError: ``host`` is not loopback and the variable is unset or empty, or the token is shorter than
            :data:`MIN_TOKEN_CHARS` or holds anything but printable ASCII without spaces. The message names the
            variable, never the token.
    """
    token = (os.environ if environ is None else environ).get(variable, "")
    if not token:
        if is_loopback(host):
            return None
        raise ConfigError(f"metrics.host is {host!r}, which is not loopback: the HTTP endpoint then requires a "
                          f"bearer token, but ${variable} (metrics.token_env) is unset or empty. Set it to a long "
                          f"random secret (e.g. `export {variable}=$(openssl rand -hex 32)`) or bind 127.0.0.1")
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.match(token):
        raise ConfigError(f"${variable} must hold at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                          f"spaces (e.g. `openssl rand -hex 32`); it holds {len(token)} characters")
    return token


class OpsAuth:
    """Bearer-token authentication of the HTTP endpoint (every path but ``/healthz`` and ``/readyz``).

    A request is allowed with ``Authorization: Bearer <token>`` or with the session cookie that ``POST /login``
    sets after checking the token typed into the page's login form. The cookie holds an HMAC of the token, not
    the token; it is ``HttpOnly`` (scripts cannot read it) and ``SameSite=Strict`` (other sites cannot make the
    browser send it). Every comparison is constant-time.

    Args:
        token: the secret (see :func:`resolve_token`).

    Raises:
        ConfigError: an empty token.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("the bearer token must not be empty")
        self._token = token.encode("utf-8")
        self._session = hmac.new(self._token, b"inspection operator session v1", hashlib.sha256).hexdigest()

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with these headers carries the token or the session cookie."""
        scheme, _, credentials = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("utf-8"), self._token):
            return True
        for part in (headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and hmac.compare_digest(value.encode("utf-8"), self._session.encode()):
                return True
        return False

    def challenge(self, path: str, *, page: bool) -> Reply:
        """The 401 answer to an unauthenticated request: the login form for the page's HTML paths, else text."""
        extra = ("WWW-Authenticate", 'Bearer realm="inspection"')
        if page and (path == "/" or path.startswith("/reports")):
            return _html(401, _templates().get_template("login").render(failed=False), extra)
        return _text(401, "401 unauthorised: send 'Authorization: Bearer <token>' (the token is in the variable "
                          "metrics.token_env names)", extra)

    def login(self, body: bytes) -> Reply:
        """``POST /login``: a form body ``token=...``; the right token gets the session cookie and ``/``."""
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not hmac.compare_digest(token.encode("utf-8"), self._token):
            return _html(401, _templates().get_template("login").render(failed=True),
                         ("WWW-Authenticate", 'Bearer realm="inspection"'))
        cookie = f"{SESSION_COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict"
        return Reply(303, b"", "text/plain; charset=utf-8", (("Location", "/"), ("Set-Cookie", cookie), *_COMMON))

    @staticmethod
    def logout() -> Reply:
        """``POST /logout``: expire the session cookie and go back to ``/`` (the login form)."""
        cookie = f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        return Reply(303, b"", "text/plain; charset=utf-8", (("Location", "/"), ("Set-Cookie", cookie), *_COMMON))


# -------------------------------------------------------------------------------------------------- window
class _Rate:
    """Events per second over the last :data:`RATE_SPAN_S` seconds, counted in one-second buckets."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._started = clock()
        self._buckets: deque[list[int]] = deque()

    def add(self, n: int = 1) -> None:
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, n])
            self._prune(second)

    def _prune(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - RATE_SPAN_S:
            self._buckets.popleft()

    def per_second(self) -> float:
        """The mean rate over the span (or over the time since the window started, when that is shorter)."""
        now = self._clock()
        self._prune(int(now))
        span = min(RATE_SPAN_S, max(1.0, now - self._started))
        return sum(n for _, n in self._buckets) / span


@dataclass
class _Entry:
    seq: int
    payload: bytes
    row: dict[str, Any] | None = None
    event_ts: float = 0.0


@dataclass(frozen=True)
class Filters:
    """Which decisions to show (every field empty or None: all).

    Attributes:
        line: an exact line id.
        decision: ``ok``, ``defect`` or ``undecided``.
        culprit: a modality name.
        start, end: event-time bounds (inclusive), POSIX seconds.
    """

    line: str = ""
    decision: str = ""
    culprit: str = ""
    start: float | None = None
    end: float | None = None

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> Filters:
        """Filters from query parameters (see the module docstring).

        Raises:
            ValueError: an unknown decision or modality, a line id over 128 characters, an unparseable time.
        """
        decision, culprit = params.get("decision", ""), params.get("culprit", "")
        if decision and decision not in DECISION_VALUES:
            raise ValueError(f"decision must be one of {list(DECISION_VALUES)}; got {decision!r}")
        if culprit and culprit not in MODALITIES:
            raise ValueError(f"culprit must be one of {list(MODALITIES)}; got {culprit!r}")
        line = params.get("line", "")
        if len(line) > 128:
            raise ValueError(f"line must be a line id of at most 128 characters; got {len(line)}")
        return cls(line, decision, culprit, _parse_time(params.get("from", ""), "from"),
                   _parse_time(params.get("to", ""), "to"))

    def accepts(self, row: Mapping[str, Any], event_ts: float) -> bool:
        return ((not self.line or row["line_id"] == self.line)
                and (not self.decision or row["decision"] == self.decision)
                and (not self.culprit or row["culprit"] == self.culprit)
                and (self.start is None or event_ts >= self.start)
                and (self.end is None or event_ts <= self.end))


def _parse_time(text: str, name: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time such as 2026-01-05T06:00 (UTC) or "
                         f"2026-01-05T07:00+01:00; got {text!r}") from None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


class DecisionWindow:
    """The last ``size`` acknowledged decision records, newest last, plus the decision and dead-letter rates.

    :meth:`add` and :meth:`dead_letter` are called by the service's main thread; :meth:`select` and
    :meth:`rates` by the HTTP threads. Sequence numbers start at 1 and grow by one per record.

    Args:
        size: records kept.
        report_link: decision id -> the page's link to its report, or None when it has none.
        clock: monotonic seconds (for the rates).

    Raises:
        ConfigError: ``size`` below 1.
    """

    def __init__(self, size: int, *, report_link: Callable[[str], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"the decision window needs a size >= 1; got {size!r}")
        self.size = size
        self._entries: deque[_Entry] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()
        self._decisions = _Rate(clock)
        self._dead = _Rate(clock)
        self._report_link = report_link

    def add(self, payload: bytes) -> None:
        """One decision record (the CloudEvent JSON as sent) was acknowledged by the broker."""
        with self._lock:
            self._seq += 1
            self._entries.append(_Entry(self._seq, payload))
            self._decisions.add()

    def dead_letter(self) -> None:
        """One dead letter was acknowledged by the broker."""
        with self._lock:
            self._dead.add()

    def rates(self) -> dict[str, float]:
        """``units_per_s`` (decisions acknowledged per second) and ``dead_letters_per_min``, over the last minute."""
        with self._lock:
            return {"units_per_s": self._decisions.per_second(),
                    "dead_letters_per_min": self._dead.per_second() * 60.0}

    def select(self, after: int = 0, filters: Filters | None = None) -> dict[str, Any]:
        """The window's decisions with a sequence number above ``after`` that pass ``filters``.

        Returns:
            ``decisions`` (rows, newest first: seq, id, unit_id, line_id, decision, score, threshold, class,
            culprit, event_time, decided_at, latency_ms, model_version, threshold_version, missing, report),
            ``oldest`` and ``newest`` (sequence numbers still in the window; 0 when empty) and ``lines``
            (the line ids in the window, sorted).
        """
        with self._lock:
            entries = list(self._entries)
        rows, lines = [], set()
        for entry in reversed(entries):
            row = self._row(entry)
            if row is None:
                continue
            lines.add(row["line_id"])
            if entry.seq > after and (filters is None or filters.accepts(row, entry.event_ts)):
                rows.append(row)
        return {"decisions": rows, "oldest": entries[0].seq if entries else 0,
                "newest": entries[-1].seq if entries else 0, "lines": sorted(lines)}

    def _row(self, entry: _Entry) -> dict[str, Any] | None:
        if entry.row is None:  # parsed once, outside the lock (a race parses twice, with the same result)
            try:
                event = json.loads(entry.payload)
                d = event["data"]
                phi = {m: float(v) for m, v in (d.get("attributions") or {}).get("modality", {}).items()}
                decision = d["decision"] if d["decision"] in DECISION_VALUES else ""
                event_time = str(d["event_time"])
                entry.event_ts = datetime.fromisoformat(event_time.replace("Z", "+00:00")).timestamp()
                entry.row = {
                    "seq": entry.seq, "id": str(event["id"]), "unit_id": str(d["unit_id"]),
                    "line_id": str(d["line_id"]), "decision": decision, "score": float(d["score"]),
                    "threshold": float(d["threshold"]), "class": str(d.get("class", "")),
                    "culprit": max(phi, key=lambda m: phi[m]) if phi else "",
                    "event_time": event_time, "decided_at": str(event.get("time", "")),
                    "latency_ms": float(d.get("latency_ms", 0.0)), "model_version": str(d.get("model_version", "")),
                    "threshold_version": str(d.get("threshold_version", "")),
                    "missing": [str(m) for m in (d.get("modalities") or {}).get("missing", [])],
                    "report": (self._report_link(str(event["id"])) if d.get("report") and self._report_link
                               else None),
                }
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.debug("operator page: decision record #%d not shown: %r", entry.seq, exc)
                return None
        return entry.row


# ------------------------------------------------------------------------------------------------- reports
class ReportFolder:
    """The report folder, read-only: one file name at a time, never a path.

    Args:
        directory: ``reports.dir``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).resolve()

    def link(self, decision_id: str) -> str | None:
        """``/reports/<stem>.html`` of a decision's report when that file exists, else None."""
        from explain.report import report_stem

        name = f"{report_stem(decision_id)}.html"
        return f"/reports/{name}" if (self.dir / name).is_file() else None

    def read(self, name: str) -> Reply | None:
        """The file ``name`` (``index.html`` for an empty name) as a reply, or None when it is not a report
        file of this folder: a name with a slash, ``..``, a leading dot or percent escapes, another suffix, a
        link leading outside the folder, or a missing file."""
        name = name or "index.html"
        match = _REPORT_NAME.match(name)
        if match is None or ".." in name:
            return None
        try:
            path = (self.dir / name).resolve(strict=True)
            if path.parent != self.dir or not path.is_file():
                return None
            body = path.read_bytes()
        except OSError:
            return None
        kind = match.group(1)
        if kind == "html":
            return Reply(200, body, _REPORT_TYPES[kind], (("Content-Security-Policy", _REPORT_CSP), *_COMMON))
        return Reply(200, body, _REPORT_TYPES[kind], _COMMON)


# ---------------------------------------------------------------------------------------------------- page
class OperatorPage:
    """The page's routes (see the module docstring) over a :class:`DecisionWindow`.

    Args:
        window: the recent decisions.
        status: returns the service's own numbers for the header: ``model_version``, ``threshold_version``,
            ``queue_depth``, ``drift`` ({modality: {"p_value", "drift"}}, values None before a test ran),
            ``ready``, ``ready_detail``, ``instance``.
        reports: the report folder to serve under ``/reports/``; None serves none.
        refresh_s: seconds between two polls of the page.
        auth: set when a token is required (the page then shows a sign-out button).
    """

    def __init__(self, window: DecisionWindow, status: Callable[[], Mapping[str, Any]], *,
                 reports: ReportFolder | None = None, refresh_s: float = 2.0, auth: OpsAuth | None = None) -> None:
        self.window = window
        self._status = status
        self.reports = reports
        self.refresh_s = refresh_s
        self.auth = auth

    def status(self) -> dict[str, Any]:
        """The header's numbers: the service's, plus ``units_per_s``, ``dead_letters_per_min`` and ``window``."""
        return {**self._status(), **self.window.rates(), "window": self.window.size}

    def get(self, path: str, query: str) -> Reply | None:
        """The reply to ``GET path?query``, or None when the path is not one of the page's."""
        if path == "/":
            return self._page(query)
        if path == "/operator.js":
            return Reply(200, _SCRIPT.encode(), "text/javascript; charset=utf-8", _COMMON)
        if path == "/operator.css":
            return Reply(200, _STYLE.encode(), "text/css; charset=utf-8", _COMMON)
        if path == "/api/status":
            return _json(200, self.status())
        if path == "/api/decisions":
            return self._decisions(query)
        if self.reports is not None and (path == "/reports" or path.startswith("/reports/")):
            return self.reports.read(path[len("/reports/"):]) or _text(404, "no such report")
        return None

    def _params(self, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
        parsed = parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(parsed) - set(allowed))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; valid: {list(allowed)}")
        return {k: v[-1] for k, v in parsed.items()}

    def _decisions(self, query: str) -> Reply:
        try:
            params = self._params(query, (*FILTER_KEYS, "after"))
            after_text = params.get("after", "0") or "0"
            if not after_text.isdigit():
                raise ValueError(f"after must be a sequence number >= 0; got {after_text!r}")
            filters = Filters.from_query(params)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        selected = self.window.select(int(after_text), filters)
        return _json(200, {"status": self.status(),
                           "window": {"size": self.window.size, "oldest": selected["oldest"],
                                      "newest": selected["newest"]},
                           "lines": selected["lines"], "decisions": selected["decisions"]})

    def _page(self, query: str) -> Reply:
        try:
            params = self._params(query, FILTER_KEYS)
            filters = Filters.from_query(params)
            error = ""
        except ValueError as exc:
            params, filters, error = {}, Filters(), str(exc)
        selected = self.window.select(0, filters)
        lines = list(selected["lines"])
        if filters.line and filters.line not in lines:
            lines.append(filters.line)
        text = _templates().get_template("page").render(
            status=self.status(), rows=selected["decisions"], lines=lines, params=params, error=error,
            decisions=DECISION_VALUES, modalities=MODALITIES, refresh_ms=int(self.refresh_s * 1000),
            window=self.window.size, auth=self.auth is not None)
        return _html(400 if error else 200, text)


# ------------------------------------------------------------------------------------------------ templates
@functools.cache
def _templates():
    """The page's jinja2 templates, autoescaping every value (made once per process)."""
    from jinja2 import DictLoader, Environment

    return Environment(loader=DictLoader({"page": _PAGE, "login": _LOGIN}), autoescape=True, trim_blocks=True,
                       lstrip_blocks=True)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Inspection: live decisions</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/operator.css">
</head>
<body data-refresh-ms="{{ refresh_ms }}" data-window="{{ window }}">
<header id="status">
  <h1>Live decisions</h1>
  <dl>
    <div><dt>model</dt><dd id="s-model">{{ status.model_version or '-' }}</dd></div>
    <div><dt>thresholds</dt><dd id="s-thresholds">{{ status.threshold_version or '-' }}</dd></div>
    <div><dt>units/s (1 min)</dt><dd id="s-rate">{{ '%.1f' % status.units_per_s }}</dd></div>
    <div><dt>queue depth</dt><dd id="s-queue">{{ status.queue_depth }}</dd></div>
    <div><dt>DLQ/min</dt><dd id="s-dlq">{{ '%.1f' % status.dead_letters_per_min }}</dd></div>
    <div><dt>drift</dt><dd id="s-drift">
    {% for m in modalities %}
      {% set d = status.drift.get(m, {}) %}
      <span class="flag {{ 'drift' if d.drift else ('ok' if d.drift is false else 'none') }}" data-modality="{{ m }}">{{ m }}: {{ 'DRIFT' if d.drift else ('ok' if d.drift is false else '-') }}</span>
    {% endfor %}
    </dd></div>
    <div><dt>ready</dt><dd id="s-ready" title="{{ status.ready_detail }}">{{ 'yes' if status.ready else 'no' }}</dd></div>
  </dl>
  {% if auth %}<form method="post" action="/logout" class="logout"><button type="submit">sign out</button></form>{% endif %}
</header>
<form id="filters" method="get" action="/">
  <label>line <select name="line" id="f-line"><option value="">all</option>{% for v in lines %}<option value="{{ v }}"{% if params.get('line') == v %} selected{% endif %}>{{ v }}</option>{% endfor %}</select></label>
  <label>decision <select name="decision" id="f-decision"><option value="">all</option>{% for v in decisions %}<option value="{{ v }}"{% if params.get('decision') == v %} selected{% endif %}>{{ v }}</option>{% endfor %}</select></label>
  <label>culprit <select name="culprit" id="f-culprit"><option value="">all</option>{% for v in modalities %}<option value="{{ v }}"{% if params.get('culprit') == v %} selected{% endif %}>{{ v }}</option>{% endfor %}</select></label>
  <label>event time from <input name="from" id="f-from" type="text" placeholder="2026-01-05T06:00" value="{{ params.get('from', '') }}"></label>
  <label>to <input name="to" id="f-to" type="text" placeholder="2026-01-06 (UTC)" value="{{ params.get('to', '') }}"></label>
  <noscript><button type="submit">filter</button></noscript>
</form>
<p class="meta"><span id="count">{{ rows | length }}</span> decisions shown, newest first, of the last {{ window }} the service made. <span id="message" role="status">{{ error }}</span></p>
<table id="decisions">
  <thead><tr><th>unit</th><th>line</th><th>decision</th><th>score</th><th>threshold</th><th>class</th><th>culprit</th><th>event time</th><th>decided at</th><th>latency ms</th><th>model</th></tr></thead>
  <tbody>
  {% for r in rows %}
  <tr data-seq="{{ r.seq }}" data-line="{{ r.line_id }}" data-decision="{{ r.decision }}" data-culprit="{{ r.culprit }}" data-time="{{ r.event_time }}">
    <td>{% if r.report %}<a href="{{ r.report }}">{{ r.unit_id }}</a>{% else %}{{ r.unit_id }}{% endif %}</td><td>{{ r.line_id }}</td><td class="{{ r.decision }}">{{ r.decision }}</td><td>{{ '%.3f' % r.score }}</td><td>{{ '%.3f' % r.threshold }}</td><td>{{ r.class }}</td><td>{{ r.culprit }}</td><td>{{ r.event_time }}</td><td>{{ r.decided_at }}</td><td>{{ '%.0f' % r.latency_ms }}</td><td>{{ r.model_version }}</td>
  </tr>
  {% endfor %}
  </tbody>
</table>
<script src="/operator.js"></script>
</body>
</html>
"""

_LOGIN = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Inspection: sign in</title>
<link rel="icon" href="data:,">
</head>
<body>
<h1>Inspection: live decisions</h1>
<form method="post" action="/login" id="login">
  <p><label>access token <input type="password" name="token" id="token" autocomplete="current-password" required></label>
  <button type="submit">sign in</button></p>
  {% if failed %}<p id="login-failed" role="alert">That token is not the service's.</p>{% endif %}
</form>
<p>The token is the value of the environment variable the service's <code>metrics.token_env</code> names.</p>
</body>
</html>
"""

_STYLE = """body { font-family: system-ui, sans-serif; margin: 1.2rem; color: #111; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem 0; }
#status { border-bottom: 1px solid #ccc; padding-bottom: .5rem; display: flex; flex-wrap: wrap; gap: 1rem;
  align-items: flex-start; justify-content: space-between; }
#status dl { display: flex; flex-wrap: wrap; gap: .4rem 1.4rem; margin: 0; }
#status dt { font-size: .75rem; color: #555; }
#status dd { margin: 0; font-weight: 600; }
.flag { margin-right: .5rem; } .flag.drift { color: #b71c1c; } .flag.ok { color: #2e7d32; } .flag.none { color: #777; }
#filters { display: flex; gap: 1rem; margin: .8rem 0; flex-wrap: wrap; }
.meta { color: #555; font-size: .85rem; } #message { color: #b71c1c; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: .2rem .6rem; text-align: left; font-size: .9rem; white-space: nowrap; }
td.defect { color: #b71c1c; font-weight: 600; } td.ok { color: #2e7d32; } td.undecided { color: #8a6d00; }
"""

_SCRIPT = r"""// The operator page: poll /api/decisions, put new rows on top, drop rows that left the window.
// Data only ever reaches the page through textContent and setAttribute; never as markup.
(function () {
  "use strict";
  const body = document.body;
  const refreshMs = Math.max(200, Number(body.dataset.refreshMs) || 2000);
  const windowSize = Number(body.dataset.window) || 500;
  const tbody = document.querySelector("#decisions tbody");
  const form = document.getElementById("filters");
  const count = document.getElementById("count");
  const message = document.getElementById("message");
  const lineSelect = document.getElementById("f-line");
  const FILTERS = ["line", "decision", "culprit", "from", "to"];
  const DECISIONS = ["ok", "defect", "undecided"];
  let after = 0;
  let generation = 0;
  let timer = null;
  let inFlight = false;
  let again = false;
  let halted = false;  // after a 400 (bad filter) or a 401 (signed out): no more polls until the filters change
  for (const tr of tbody.rows) after = Math.max(after, Number(tr.dataset.seq) || 0);

  function show(text) { message.textContent = text; }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function makeRow(d) {
    const tr = document.createElement("tr");
    tr.dataset.seq = String(d.seq);
    tr.dataset.line = d.line_id;
    tr.dataset.decision = d.decision;
    tr.dataset.culprit = d.culprit;
    tr.dataset.time = d.event_time;
    const unit = cell(tr, "");
    if (typeof d.report === "string" && d.report.startsWith("/reports/")) {
      const a = document.createElement("a");
      a.setAttribute("href", d.report);
      a.textContent = d.unit_id;
      unit.appendChild(a);
    } else {
      unit.textContent = d.unit_id;
    }
    cell(tr, d.line_id);
    cell(tr, d.decision, DECISIONS.includes(d.decision) ? d.decision : "");
    cell(tr, Number(d.score).toFixed(3));
    cell(tr, Number(d.threshold).toFixed(3));
    cell(tr, d.class);
    cell(tr, d.culprit);
    cell(tr, d.event_time);
    cell(tr, d.decided_at);
    cell(tr, Number(d.latency_ms).toFixed(0));
    cell(tr, d.model_version);
    return tr;
  }

  function setLines(lines) {
    const chosen = lineSelect.value;
    const wanted = lines.slice();
    if (chosen && !wanted.includes(chosen)) wanted.push(chosen);
    const have = Array.from(lineSelect.options).slice(1).map((o) => o.value);
    if (have.length === wanted.length && have.every((v, i) => v === wanted[i])) return;
    while (lineSelect.options.length > 1) lineSelect.remove(1);
    for (const v of wanted) {
      const option = document.createElement("option");
      option.value = v;
      option.textContent = v;
      lineSelect.appendChild(option);
    }
    lineSelect.value = chosen;
  }

  function setStatus(s) {
    document.getElementById("s-model").textContent = s.model_version || "-";
    document.getElementById("s-thresholds").textContent = s.threshold_version || "-";
    document.getElementById("s-rate").textContent = Number(s.units_per_s).toFixed(1);
    document.getElementById("s-queue").textContent = String(s.queue_depth);
    document.getElementById("s-dlq").textContent = Number(s.dead_letters_per_min).toFixed(1);
    const ready = document.getElementById("s-ready");
    ready.textContent = s.ready ? "yes" : "no";
    ready.title = s.ready_detail || "";
    for (const flag of document.querySelectorAll("#s-drift .flag")) {
      const d = (s.drift || {})[flag.dataset.modality] || {};
      const state = d.drift === true ? "drift" : d.drift === false ? "ok" : "none";
      flag.className = "flag " + state;
      flag.textContent = flag.dataset.modality + ": " + (state === "drift" ? "DRIFT" : state === "ok" ? "ok" : "-");
    }
  }

  function query() {
    const p = new URLSearchParams();
    for (const name of FILTERS) {
      const value = form.elements[name].value.trim();
      if (value) p.set(name, value);
    }
    p.set("after", String(after));
    return p;
  }

  async function poll() {
    const mine = generation;
    let response;
    try {
      response = await fetch("/api/decisions?" + query().toString(),
                             {credentials: "same-origin", cache: "no-store", headers: {Accept: "application/json"}});
    } catch (err) {
      show("connection to the service lost; retrying");
      return;
    }
    if (mine !== generation) return;
    if (response.status === 401) {
      halted = true;
      show("signed out: reload the page to sign in again");
      return;
    }
    let data;
    try {
      data = await response.json();
    } catch (err) {
      show("the service answered HTTP " + response.status);
      return;
    }
    if (mine !== generation) return;
    if (!response.ok) {
      halted = response.status === 400;
      show(String(data.error || "HTTP " + response.status));
      return;
    }
    show("");
    const present = new Set(Array.from(tbody.rows, (tr) => tr.dataset.seq));
    const fresh = document.createDocumentFragment();
    for (const d of data.decisions) {
      if (!present.has(String(d.seq))) fresh.appendChild(makeRow(d));
    }
    tbody.insertBefore(fresh, tbody.firstChild);
    for (const tr of Array.from(tbody.rows)) {
      if (Number(tr.dataset.seq) < data.window.oldest) tr.remove();
    }
    while (tbody.rows.length > windowSize) tbody.deleteRow(-1);
    after = Math.max(after, data.window.newest);
    count.textContent = String(tbody.rows.length);
    setLines(data.lines);
    setStatus(data.status);
  }

  async function tick() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    clearTimeout(timer);
    try {
      await poll();
    } finally {
      inFlight = false;
      if (again) { again = false; tick(); } else if (!halted) { timer = setTimeout(tick, refreshMs); }
    }
  }

  function refilter(event) {
    if (event) event.preventDefault();
    generation += 1;
    halted = false;
    after = 0;
    tbody.replaceChildren();
    count.textContent = "0";
    tick();
  }

  form.addEventListener("change", () => refilter());
  form.addEventListener("submit", refilter);
  timer = setTimeout(tick, refreshMs);
})();
"""
