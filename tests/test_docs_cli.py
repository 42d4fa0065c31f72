"""docs/cli.md stays true to the real ``inspection`` parser: every verb, every argument, their defaults, exit codes.

The page is parsed and compared with :func:`services.cli.build_parser` walked directly; a second test checks
that the page is exactly what ``python -m services.docs_reference cli`` writes now, so a help text changed in the
code shows up as a stale page.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services import docs_reference
from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
EXE = str(Path(sys.executable).parent / "inspection")


def real_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...],
                                                                                       argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[(*path, name)] = sub
                out |= real_commands(sub, (*path, name))
    return out


def page_sections(text: str) -> dict[tuple[str, ...], str]:
    """``{command path: section text}`` for every ``## inspection ...`` heading."""
    parts = re.split(r"^## inspection (.+)$", text, flags=re.M)
    return {tuple(parts[i].split()): parts[i + 1] for i in range(1, len(parts), 2)}


def cli_doc_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Verbs or arguments of the parser the page lacks, verbs it documents that do not exist, wrong defaults."""
    commands = real_commands(parser)
    sections = page_sections(text)
    problems = [f"`inspection {' '.join(p)}` is undocumented" for p in commands if p not in sections]
    problems += [f"`inspection {' '.join(p)}` is documented but does not exist" for p in sections if p not in commands]
    for path, sub in commands.items():
        section = sections.get(path)
        if section is None:
            continue
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (`.+?`) \| (.+?) \|", section, re.M)}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue  # hidden arguments are not documented
            names = action.option_strings or [action.metavar or action.dest]
            row = next((cell for key, cell in rows.items() if f"`{names[0]}" in key.split(", ")[0]), None)
            if row is None:
                problems.append(f"`inspection {' '.join(path)}`: {names[0]} is undocumented")
                continue
            if (action.default not in (None, False, [], argparse.SUPPRESS) and not action.required
                    and not isinstance(action, argparse.BooleanOptionalAction)
                    and row not in (f"`{action.default}`", '`""`' if action.default == "" else None)):
                problems.append(f"`inspection {' '.join(path)}` {names[0]}: the page says default {row}, the "
                                f"parser {action.default!r}")
    return problems


@pytest.fixture
def parser(monkeypatch) -> argparse.ArgumentParser:
    monkeypatch.delenv("INSPECTION_BOOTSTRAP", raising=False)  # --bootstrap's default comes from it
    return build_parser()


def test_every_verb_and_argument_of_the_parser_is_on_the_page(parser):
    text = PAGE.read_text(encoding="utf-8")
    commands = real_commands(parser)
    assert ("topics", "create") in commands and ("serve",) in commands
    assert cli_doc_problems(text, parser) == []


def test_the_checker_finds_missing_stale_and_wrong_entries(parser):
    text = PAGE.read_text(encoding="utf-8")
    without_audit = re.sub(r"^## inspection audit$.*?(?=^## inspection )", "", text, flags=re.M | re.S)
    assert cli_doc_problems(without_audit, parser) == ["`inspection audit` is undocumented"]
    extra = text + "\n## inspection frobnicate\n\nGone.\n"
    assert cli_doc_problems(extra, parser) == ["`inspection frobnicate` is documented but does not exist"]
    no_workers = "\n".join(line for line in text.splitlines() if not line.startswith("| `--workers WORKERS` | `1` |"))
    assert cli_doc_problems(no_workers, parser) == ["`inspection serve`: --workers is undocumented"]
    wrong = text.replace("| `--units UNITS` | `200` |", "| `--units UNITS` | `100` |")
    assert cli_doc_problems(wrong, parser) == ["`inspection demo` --units: the page says default `100`, the parser 200"]


def test_the_page_is_what_the_generator_writes_now():
    assert PAGE.read_text(encoding="utf-8") == docs_reference.cli_reference(), (
        "docs/cli.md is stale: python -m services.docs_reference cli --out docs/cli.md")


def test_every_argument_has_a_meaning_and_every_note_a_real_argument(parser):
    named = set()
    for path, sub in real_commands(parser).items():
        for action in docs_reference.arguments(sub):
            assert docs_reference.argument_meaning(path, action)
            named |= {f"{' '.join(path)} {action.dest}", f"* {action.dest}"}
    assert set(docs_reference.CLI_NOTES) - named == set(), "notes for arguments that do not exist"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INSPECTION_BOOTSTRAP"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def test_the_exit_codes_on_the_page_are_the_commands(tmp_path):
    text = " ".join(PAGE.read_text(encoding="utf-8").split())
    assert "0 success, 1 a check failed" in text and "2 invalid input or an error the message explains" in text
    assert _run("--help").returncode == 0
    missing = _run("models", "list", "--store", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.startswith("inspection: error: ")
    mistyped = _run("models", "list", "--no-such-flag", "x")
    assert mistyped.returncode == 2 and "usage: inspection models" in mistyped.stderr
