"""Command-line traps a newcomer hits, each run through the real ``inspection`` executable as a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import build_parser
from services.clients import make_producer

EXE = str(Path(sys.executable).parent / "inspection")
#: Where nothing listens: a privileged port no test binds.
DEAD_BOOTSTRAP = "127.0.0.1:1"


def run(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "INSPECTION_BOOTSTRAP": ""}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------------ consume
@pytest.mark.slow
def test_consume_prints_at_most_max_records(broker, topics):
    producer = make_producer(broker.bootstrap)
    try:
        for i in range(20):  # one partition: a single poll returns all of them
            producer.send(topics.dlq, key=f"u{i}".encode(), value=b"x" * 10, partition=0)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    result = run("consume", "--bootstrap", broker.bootstrap, "--topic", topics.dlq, "--max", "2",
                 "--idle-timeout", "10")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["key"] for line in lines] == ["u0", "u1"]
    assert f"2 records from {topics.dlq}" in result.stderr

    zero = run("consume", "--bootstrap", broker.bootstrap, "--topic", topics.dlq, "--max", "0")
    assert zero.returncode == 2 and stderr_lines(zero) == ["inspection: error: --max must be >= 1; got 0"]


# --------------------------------------------------------------------------------------------------- demo
@pytest.mark.parametrize("units", ["0", "-3"])
def test_demo_refuses_fewer_than_one_unit(tmp_path, units):
    result = run("demo", "--units", units, "--out", str(tmp_path / "demo"), "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert stderr_lines(result) == [f"inspection: error: --units must be >= 1; got {units}"]
    assert result.stdout == ""
    assert tree(tmp_path) == set()


# --------------------------------------------------------------------------------------- unreachable broker
def _serve_config(tmp_path: Path) -> Path:
    path = tmp_path / "service.json"
    path.write_text(json.dumps({"model": {"store": str(tmp_path / "store"), "device": "cpu"},
                                "metrics": {"port": 0}, "run_dir": str(tmp_path / "run")}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["produce", "consume", "topics-create", "serve", "serve-workers"])
def test_an_unreachable_broker_fails_fast_in_one_line(tmp_path, command):
    args = {
        "produce": ["produce", "--limit", "1"],
        "consume": ["consume", "--topic", "inspection.decisions"],
        "topics-create": ["topics", "create"],
        "serve": ["serve", "--config", str(_serve_config(tmp_path))],
        "serve-workers": ["serve", "--config", str(_serve_config(tmp_path)), "--workers", "2"],
    }[command]
    before = tree(tmp_path)
    result = run(*args, "--bootstrap", DEAD_BOOTSTRAP, timeout=60)
    lines = stderr_lines(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith(f"inspection: error: no Kafka broker reachable at {DEAD_BOOTSTRAP} (")
    assert "connection refused" in lines[0] and "check that the broker is running" in lines[0]
    assert result.stdout == ""
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- busy port
@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A 127.0.0.1 port this test holds (bound and listening) while the block runs."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.slow
def test_broker_on_a_busy_port_says_so_in_one_line(tmp_path):
    with held_port() as port:
        result = run("broker", "--port", str(port), "--log", str(tmp_path / "broker.log"), timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith(f"inspection: error: port {port} is in use on 127.0.0.1")
    assert "panicked" not in result.stderr and "exited with code" not in result.stderr
    assert result.stdout == ""


def test_broker_port_out_of_range_is_refused(tmp_path):
    result = run("broker", "--port", "70000", "--log", str(tmp_path / "broker.log"))
    assert result.returncode == 2
    assert stderr_lines(result) == ["inspection: error: port must be an integer in 1-65535; got 70000"]


@pytest.mark.slow
def test_embedded_broker_on_a_busy_port_names_the_port(tmp_path):
    from inspection.errors import BrokerError
    from services.broker import EmbeddedBroker

    with held_port() as port:
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log", ready_timeout_s=10)
        with pytest.raises(BrokerError, match=f"failed: port {port} is in use; the broker process exited"):
            broker.start()
    assert not broker.running


# ------------------------------------------------------------------------------------ read-only commands
@pytest.mark.slow
@pytest.mark.parametrize("command", ["models-list", "adapters-list", "evaluate", "explain", "rescore", "audit"])
def test_read_only_commands_on_a_missing_store_name_it_and_create_nothing(tmp_path, command):
    work = tmp_path / "work"
    work.mkdir()
    store = tmp_path / "typo" / "models"
    history = tmp_path / "history.parquet"
    history.write_bytes(b"not parquet")  # never read: the store is checked first
    args = {
        "models-list": ["models", "list", "--store", str(store)],
        "adapters-list": ["adapters", "list", "--store", str(store)],
        "evaluate": ["evaluate", "--bench", "elpv", "--models-dir", str(store)],
        "explain": ["explain", "--history", str(history), "--store", str(store), "--out", "reports"],
        "rescore": ["rescore", "--history", str(history), "--store", str(store), "--out", "rescored"],
        "audit": ["audit", "d-1", "--history", str(history), "--store", str(store), "--decisions", "d.jsonl"],
    }[command]
    result = run(*args, cwd=work, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"model store {store}" in result.stderr and "does not exist" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "typo").exists()
    assert tree(work) == set(), f"{command} created {tree(work)} in its working folder"


# ----------------------------------------------------------------------------------------------------- help
def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(*path, name), *_subcommands(sub, (*path, name))]
    return out


def test_every_subcommand_help_ends_with_an_example():
    commands = _subcommands(build_parser())
    assert ("topics", "create") in commands and ("evaluate",) in commands
    for command in commands:
        result = run(*command, "--help", timeout=60)
        assert result.returncode == 0, result.stderr
        examples = [line for line in result.stdout.splitlines() if line.startswith("example: inspection ")]
        assert examples, f"`inspection {' '.join(command)} --help` has no example:\n{result.stdout}"
        assert examples[-1].split()[2] == command[0], examples[-1]


def test_help_texts_match_the_code():
    # predict(tta=True) averages both mirror images of 4 rotations each (inspection/training.py)
    result = run("evaluate", "--help")
    assert "average 8 views of each image (4 rotations, each also mirrored)" in " ".join(result.stdout.split())


def test_every_example_parses_to_its_own_subcommand():
    from services.cli import _EXAMPLES

    parser = build_parser()
    for command, example in _EXAMPLES.items():
        words = example.split()
        assert words[0] == "inspection" and " ".join(words[1:]).startswith(command), (command, example)
        parser.parse_args(words[1:])  # an unknown flag or a missing required one exits here


# ----------------------------------------------------------------------------------- one meaning per flag
def _flag(parser: argparse.ArgumentParser, command: tuple[str, ...], flag: str):
    sub = parser
    for name in command:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return next((a for a in sub._actions if flag in a.option_strings and a.help != argparse.SUPPRESS), None)


def test_shared_flags_take_the_same_values_in_every_subcommand():
    parser = build_parser()
    commands = _subcommands(parser)
    devices = {c: _flag(parser, c, "--device") for c in commands}
    devices = {c: a for c, a in devices.items() if a is not None}
    assert {("train",), ("calibrate",), ("evaluate",), ("rescore",), ("explain",), ("adapt",)} <= set(devices)
    for command, action in devices.items():  # auto | cpu | cuda wherever a device is chosen
        assert list(action.choices) == ["auto", "cpu", "cuda"], (command, action.choices)
    seeds = {c: _flag(parser, c, "--seeds") for c in commands}
    for command, action in ((c, a) for c, a in seeds.items() if a is not None):  # split seeds, a list of ints
        assert action.type is int and action.nargs in ("*", "+") and action.help, command


@pytest.mark.parametrize("command", [["train", "--bench", "elpv"], ["calibrate", "--bench", "elpv"],
                                     ["evaluate", "--bench", "elpv"]])
def test_store_names_one_model_store_so_the_bench_commands_point_to_models_dir(tmp_path, command):
    result = run(*command, "--store", str(tmp_path / "models"), cwd=tmp_path)
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and f"--models-dir {tmp_path / 'models'}" in lines[0], result.stderr
    assert tree(tmp_path) == set()  # nothing trained, nothing created
