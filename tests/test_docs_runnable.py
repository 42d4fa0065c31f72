"""Runnable documentation: every command block marked in README.md and docs/*.md runs and does what it says.

A block is marked by an HTML comment on the line right before its fence, optionally followed by what to expect::

    <!-- runnable -->
    <!-- runnable: broker, data -->
    <!-- expect: exit 2, stderr contains "no Kafka broker reachable" -->

Options (comma-separated):

- ``broker``: a fresh embedded broker with the service's topics (3 partitions each); ``$INSPECTION_BOOTSTRAP``
  names it, as after ``inspection broker`` and ``export INSPECTION_BOOTSTRAP=...``.
- ``store``: a calibrated small model store at ``models/demo-standard`` in the working folder (where ``make
  demo`` puts its model).
- ``service``: ``broker`` and ``store``, and ``inspection serve --config service.yaml`` running against them, ready
  (the file is in the working folder).
- ``data``: the block reads the real data sets (the test is marked ``data``).
- ``no-gpu``: the block shows what happens without a CUDA device; skipped where there is one.
- ``timeout=S``: seconds the block may take (default 180).

Expectations (comma-separated, repeatable): ``exit N`` (default 0), ``stdout contains "text"``, ``stderr contains
"text"`` (``\\"`` inside the quotes for a quote).

``bash`` blocks run as ``bash -e -o pipefail``, ``python`` blocks with the project's interpreter; each in a fresh
temporary folder, with the project's ``.venv/bin`` first on ``PATH``, in a process group of its own that is ended
with the block (background jobs included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPTIONS = frozenset({"broker", "store", "service", "data", "no-gpu"})
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
DEFAULT_TIMEOUT_S = 180.0
#: Seconds ``inspection serve`` may take to load its model and join its group on a busy 2-core machine.
SERVICE_READY_S = 120.0
#: Where the ``store`` option puts the model store, relative to the working folder (the demo's store).
STORE = "models/demo-standard"

_RUNNABLE = re.compile(r"^<!--\s*runnable(?:\s*:\s*(?P<options>.*?))?\s*-->\s*$")
_EXPECT = re.compile(r"^<!--\s*expect:\s*(?P<spec>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
_EXPECT_ITEM = re.compile(r'\s*(?:exit\s+(?P<exit>\d+)|(?P<stream>stdout|stderr)\s+contains\s+"(?P<text>(?:[^"\\]|\\.)*)")'
                          r"\s*(?:,|$)")


class MarkerError(ValueError):
    """A runnable marker that is malformed or not followed by a code block."""


@dataclass(frozen=True)
class Block:
    """One marked code block.

    Attributes:
        source: the Markdown file, relative to the repository root.
        line: 1-based line of the marker.
        language: ``bash`` or ``python``.
        code: the block's text.
        options: the marker's options (see the module docstring).
        timeout_s: seconds it may take.
        exit_code: the exit status it must end with.
        contains: ``(stream, text)`` pairs its output must contain.
    """

    source: str
    line: int
    language: str
    code: str
    options: frozenset[str] = frozenset()
    timeout_s: float = DEFAULT_TIMEOUT_S
    exit_code: int = 0
    contains: tuple[tuple[str, str], ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def _parse_options(text: str | None, where: str) -> tuple[frozenset[str], float]:
    options, timeout = set(), DEFAULT_TIMEOUT_S
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        if item.startswith("timeout="):
            try:
                timeout = float(item.removeprefix("timeout="))
            except ValueError:
                raise MarkerError(f"{where}: timeout must be seconds, e.g. timeout=60; got {item!r}") from None
        elif item in OPTIONS:
            options.add(item)
        else:
            raise MarkerError(f"{where}: unknown runnable option {item!r}; known: {sorted(OPTIONS)}, timeout=S")
    if "service" in options:
        options |= {"broker", "store"}
    return frozenset(options), timeout


def _parse_expect(spec: str, where: str) -> tuple[int, tuple[tuple[str, str], ...]]:
    exit_code, contains, pos = 0, [], 0
    while pos < len(spec):
        m = _EXPECT_ITEM.match(spec, pos)
        if m is None or m.end() == pos:
            raise MarkerError(f'{where}: cannot read the expectation at {spec[pos:]!r}; write `exit N`, '
                              '`stdout contains "text"` or `stderr contains "text"`, separated by commas')
        if m.group("exit") is not None:
            exit_code = int(m.group("exit"))
        else:
            contains.append((m.group("stream"), re.sub(r"\\(.)", r"\1", m.group("text"))))
        pos = m.end()
    return exit_code, tuple(contains)


def extract_blocks(text: str, source: str) -> list[Block]:
    """The marked blocks of one Markdown text.

    Raises:
        MarkerError: a marker with an unknown option or expectation, an expectation without a marker, or a marker
            not followed by a fenced ``bash``/``python`` block.
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        if _EXPECT.match(line):
            raise MarkerError(f"{source}:{i + 1}: an expect marker must follow a runnable marker")
        m = _RUNNABLE.match(line)
        if m is None:
            i += 1
            continue
        where = f"{source}:{i + 1}"
        options, timeout = _parse_options(m.group("options"), where)
        exit_code, contains = 0, ()
        j = i + 1
        if j < len(lines) and (e := _EXPECT.match(lines[j].strip())):
            exit_code, contains = _parse_expect(e.group("spec"), where)
            j += 1
        fence = _FENCE.match(lines[j]) if j < len(lines) else None
        if fence is None:
            raise MarkerError(f"{where}: a runnable marker must be followed by a fenced code block")
        language = LANGUAGES.get(fence.group("lang"))
        if language is None:
            raise MarkerError(f"{where}: runnable blocks are {sorted(LANGUAGES)}; got ```{fence.group('lang')}")
        end = next((k for k in range(j + 1, len(lines)) if lines[k].strip() == "```"), None)
        if end is None:
            raise MarkerError(f"{where}: the code block is not closed")
        blocks.append(Block(source, i + 1, language, "\n".join(lines[j + 1:end]) + "\n", options, timeout,
                            exit_code, contains))
        i = end + 1
    return blocks


def doc_files() -> list[Path]:
    """README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    """Every marked block of the docs (a malformed marker raises)."""
    return [b for path in doc_files() for b in extract_blocks(path.read_text(encoding="utf-8"),
                                                                 str(path.relative_to(ROOT)))]


# ------------------------------------------------------------------------------------------ the extractor
SAMPLE = '''\
Intro.

<!-- runnable -->
```bash
inspection --help
```

<!-- runnable: broker, data, timeout=30 -->
<!-- expect: exit 2, stderr contains "no \\"broker\\"", stdout contains "a, b" -->
```python
print("x")
```

```bash
not marked
```

<!-- runnable: service -->
```sh
true
```
'''


def test_extract_blocks_reads_options_expectations_and_code():
    blocks = extract_blocks(SAMPLE, "sample.md")
    assert [(b.line, b.language) for b in blocks] == [(3, "bash"), (8, "python"), (18, "bash")]
    assert blocks[0].code == "inspection --help\n" and blocks[0].exit_code == 0 and blocks[0].contains == ()
    assert blocks[1].options == {"broker", "data"} and blocks[1].timeout_s == 30
    assert blocks[1].exit_code == 2
    assert blocks[1].contains == (("stderr", 'no "broker"'), ("stdout", "a, b"))
    assert blocks[2].options == {"service", "broker", "store"}


@pytest.mark.parametrize("text, message", [
    ("<!-- runnable: brokr -->\n```bash\ntrue\n```\n", "unknown runnable option 'brokr'"),
    ("<!-- runnable -->\n\n```bash\ntrue\n```\n", "must be followed by a fenced code block"),
    ("<!-- runnable -->\n```yaml\na: 1\n```\n", "runnable blocks are"),
    ("<!-- runnable -->\n```bash\ntrue\n", "not closed"),
    ("<!-- runnable -->\n<!-- expect: exits 0 -->\n```bash\ntrue\n```\n", "cannot read the expectation"),
    ("<!-- expect: exit 0 -->\n```bash\ntrue\n```\n", "must follow a runnable marker"),
    ("<!-- runnable: timeout=soon -->\n```bash\ntrue\n```\n", "timeout must be seconds"),
])
def test_a_malformed_marker_is_refused_with_its_line(text, message):
    with pytest.raises(MarkerError, match=re.escape(message)) as info:
        extract_blocks(text, "page.md")
    assert str(info.value).startswith("page.md:1:")


def test_the_docs_mark_the_blocks_a_newcomer_runs():
    blocks = all_blocks()
    by_page = {b.source for b in blocks}
    for page in ("docs/quickstart.md", "docs/wire-contract.md", "docs/troubleshooting.md", "docs/cli.md",
                 "docs/configuration.md", "docs/scale.md", "docs/concepts.md"):
        assert page in by_page, f"{page} has no runnable block"
    # the wire contract's example publishes and reads with a client that is not this project's
    assert any("service" in b.options and "from confluent_kafka import" in b.code for b in blocks)


# -------------------------------------------------------------------------------------------- running them
@pytest.fixture(scope="session")
def docs_store(tmp_path_factory, serving_store_factory) -> Path:
    """A calibrated small model store (real model, thresholds set to the median score of 16 units)."""
    return serving_store_factory(tmp_path_factory.mktemp("docs-store"), threshold_version="t-docs")


def _end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group we started for ``proc`` (the block and its background jobs), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else "(no log)"


class _Service:
    """``inspection serve --config service.yaml`` in the block's working folder, until :meth:`stop`."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        (work / "service.yaml").write_text(
            f"model:\n  store: {STORE}\n  device: cpu\n"
            f"kafka:\n  group_id: docs-{uuid.uuid4().hex[:8]}\n"
            "metrics:\n  port: 0\n")
        self.log = work.parent / "serve.log"  # stderr: the service's log
        self.out = work.parent / "serve.out"  # stdout: its summary line at exit
        with open(self.log, "wb") as log, open(self.out, "wb") as out:
            self.proc = subprocess.Popen([str(BIN / "inspection"), "serve", "--config", "service.yaml"], cwd=work,
                                         env=env, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVICE_READY_S
        port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"inspection serve exited with {self.proc.returncode}:\n{_tail(self.log)}")
            if port is None:
                m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", _tail(self.log, 100_000))
                port = int(m.group(1)) if m else None
            if port is not None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                        if answer.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.5)
        pytest.fail(f"inspection serve was not ready within {SERVICE_READY_S:g} s:\n{_tail(self.log)}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        _end_group(self.proc)
        return self.proc.wait()


def _params() -> list:
    try:
        blocks = all_blocks()
    except MarkerError as exc:  # reported by the test below, not as a collection error of the whole file
        return [pytest.param(None, id="markers", marks=pytest.mark.skip(reason=f"malformed marker: {exc}"))]
    params = []
    for b in blocks:
        marks = [pytest.mark.slow]
        if "broker" in b.options:
            marks.append(pytest.mark.kafka)
        if "data" in b.options:
            marks.append(pytest.mark.data)
        params.append(pytest.param(b, id=b.id, marks=marks))
    return params


def test_every_marker_in_the_docs_is_well_formed():
    all_blocks()  # raises MarkerError naming the file and line


@pytest.mark.parametrize("block", _params())
def test_runnable_block(block: Block, tmp_path: Path, request):
    if "no-gpu" in block.options:
        import torch

        if torch.cuda.is_available():
            pytest.skip("the block shows the behaviour without a CUDA device")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "INSPECTION_BOOTSTRAP"}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if "store" in block.options:
        shutil.copytree(request.getfixturevalue("docs_store"), work / STORE)
    broker = service = None
    try:
        if "broker" in block.options:
            from services.broker import EmbeddedBroker, TopicNames, create_topics

            broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
            create_topics(broker.bootstrap, TopicNames(), 3)
            env["INSPECTION_BOOTSTRAP"] = broker.bootstrap
        if "service" in block.options:
            service = _Service(work, env)
            service.wait_ready()
        suffix = ".py" if block.language == "python" else ".sh"
        script = tmp_path / f"block{suffix}"
        script.write_text(block.code, encoding="utf-8")
        argv = [sys.executable, str(script)] if block.language == "python" else \
            ["bash", "-e", "-o", "pipefail", str(script)]
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=block.timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{block.id} ran past {block.timeout_s:g} s\n--- stdout\n{stdout[-3000:]}\n"
                        f"--- stderr\n{stderr[-3000:]}")
        finally:
            _end_group(proc)
    finally:
        served = service.stop() if service is not None else None
        if broker is not None:
            broker.stop()
    shown = f"\n--- {block.id}\n{block.code}--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    assert proc.returncode == block.exit_code, f"exit {proc.returncode}, expected {block.exit_code}{shown}"
    for stream, text in block.contains:
        assert text in (stdout if stream == "stdout" else stderr), f"{stream} lacks {text!r}{shown}"
    if service is not None:
        assert served == 0, f"inspection serve ended with {served}:\n{_tail(service.log)}"
        summary = json.loads(service.out.read_text().strip().splitlines()[-1])
        assert summary["records"] > 0, f"the service read nothing:\n{_tail(service.log)}"
    if broker is not None:
        assert not broker.panicked(), f"the broker panicked:\n{broker.log_text()[-3000:]}"
