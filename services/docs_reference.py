"""Reference pages generated from the code: the service configuration and the command line.

::

    python -m services.docs_reference config --out docs/configuration.md   # every field of ServiceConfig
    python -m services.docs_reference cli --out docs/cli.md                # every sub-command and argument
    python -m services.docs_reference all --check                          # exit 1 if a committed page is stale

The configuration page walks :class:`services.service_config.ServiceConfig`: one table per section with each
field's key, declared type, default (as YAML) and meaning, taken from the section's ``Attributes:`` docstring, or
from :data:`CONFIG_NOTES` where the docstring has no entry. The command-line page walks
:func:`services.cli.build_parser`: each sub-command's usage, description and example, and each argument's default,
choices and meaning (its ``help``, or :data:`CLI_NOTES`).

Exit codes: 0 written (or up to date), 1 ``--check`` found a page that differs from the code, 2 invalid usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: The folder of the committed pages (``docs/`` beside the packages).
DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"

#: Meanings of configuration fields whose section docstring has no ``Attributes:`` entry, keyed ``section.field``.
CONFIG_NOTES: dict[str, str] = {
    "security.security_protocol": "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`; every Kafka client of "
                                  "the service (consumer, producer) uses it.",
    "security.sasl_mechanism": "with a `SASL_*` protocol: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (these need "
                               "`sasl_plain_username` and `sasl_plain_password_env`), or `GSSAPI`. `OAUTHBEARER` "
                               "needs a token provider object, which a config file cannot give, so it is refused.",
    "security.sasl_plain_username": "the SASL user name (PLAIN, SCRAM).",
    "security.sasl_plain_password_env": "name of the environment variable that holds the SASL password; the "
                                        "password itself never goes in the file, the logs or the resolved config.",
    "security.sasl_kerberos_service_name": "GSSAPI: the broker's Kerberos service name (kafka-python's default "
                                           "when null).",
    "security.ssl_cafile": "with `SSL` or `SASL_SSL`: the CA certificate file (PEM) that verifies the brokers.",
    "security.ssl_certfile": "mutual TLS: this client's certificate file (PEM).",
    "security.ssl_keyfile": "mutual TLS: this client's private key file (PEM).",
    "security.ssl_password_env": "name of the environment variable that holds the password of an encrypted "
                                 "`ssl_keyfile`.",
    "security.ssl_check_hostname": "verify that the broker's certificate matches its host name (kafka-python's "
                                   "default when null).",
}

#: Additions to a docstring meaning, keyed ``section.field``: facts of validation the docstring does not state.
CONFIG_ADDITIONS: dict[str, str] = {
    "model.store": "**Required**: the service refuses to start without it, and a path that does not exist is an "
                   "error that names it.",
    "topics.prefix": "Explicit names below override it topic by topic.",
    "batching.max_queue": "Must be at least `batching.max_batch`.",
    "limits.max_payload_bytes": "At most 32 MiB (the largest message the consumer fetches).",
    "kafka.consumer": "Keys the service sets itself (`bootstrap_servers`, `group_id`, `enable_auto_commit`, the "
                      "(de)serialisers, `max_poll_records`) are refused; security keys belong in `security`.",
    "kafka.producer": "Keys the service sets itself (`bootstrap_servers`, `group_id`, `enable_auto_commit`, the "
                      "(de)serialisers, `max_poll_records`) are refused; security keys belong in `security`.",
}

#: Meanings of command-line arguments that have no ``help`` text, keyed ``"<command> <dest>"`` (for example
#: ``"demo units"``) or ``"* <dest>"`` for every command that has the argument.
CLI_NOTES: dict[str, str] = {
    "* security_protocol": "Kafka security protocol of the client",
    "* sasl_mechanism": "SASL mechanism (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `GSSAPI`, `OAUTHBEARER`); "
                        "needs a `SASL_*` protocol",
    "* sasl_username": "SASL user name (PLAIN, SCRAM); the password comes from `--sasl-password-env`",
    "* ssl_cafile": "CA certificate file (PEM) that verifies the brokers; needs `SSL` or `SASL_SSL`",
    "* ssl_certfile": "this client's certificate file (PEM), for mutual TLS",
    "* ssl_keyfile": "this client's private key file (PEM), for mutual TLS",
    "broker topic_prefix": "prefix in front of every default topic name of the topics it creates",
    "topics create partitions": "partitions of each input topic (co-partitioned: all three get the same count); "
                                "decisions and dlq get as many when they are created",
    "produce dataset": "the data set whose units are published (composite units of real data)",
    "produce split": "composite split the units come from",
    "produce seed": "seed of the composite units and of the `--drop` draws",
    "consume topic": "the topic to read; input topics are decoded through the wire codec, decisions parsed, "
                     "anything else printed as key, size and headers",
    "consume from_beginning": "start at the earliest offset (`--no-from-beginning`: only records that arrive "
                              "after it joined)",
    "data info seed": "seed of the composite pools it sizes",
    "data export seed": "seed of the composite units (or, with `--images`, of the image order)",
    "demo units": "composite units to publish and decide (at least 1)",
    "demo seed": "seed of the composite units",
    "demo rate": "units published per second (0: as fast as the broker takes them)",
    "demo partitions": "partitions of each input topic on the demo's broker",
    "train bench": "train on this benchmark's training split (elpv, bearings, composite; skab is evaluated "
                   "with `evaluate --bench skab`)",
    "train epochs": "passes over the training units",
    "train batch_size": "units per training step",
    "train lr": "learning rate of everything trained from scratch (bridge, heads, non-image encoders)",
    "train backbone_lr": "learning rate of the pretrained vision backbone",
    "train dim": "token width D of the encoders, the bridge and the experts",
    "train image_size": "side in pixels of the vision backbone's input",
    "train no_amp": "no bf16 autocast on CUDA (train in float32)",
    "train device": "where to train (`auto`: CUDA when available)",
    "calibrate bench": "calibrate the models of this benchmark",
    "calibrate modalities": "comma-separated modalities of a composite single-modality model family",
    "calibrate seeds": "calibrate the newest uncalibrated version of each of these seeds",
    "calibrate target_far": "false-alarm rate the threshold allows on good units (`--method far`, and "
                            "normal-only versions)",
    "calibrate device": "device of the calibration forward passes",
    "evaluate bench": "the benchmark whose test split is evaluated",
    "evaluate seeds": "the seeds (split seeds) whose calibrated models are evaluated (default 0)",
    "evaluate device": "device of the evaluation forward passes",
    "evaluate plots": "folder for the plots",
    "explain level": "1: modality Shapley values and interactions; 2: also image regions, vibration bands and "
                     "temperature segments",
    "explain seed": "level 2: seed of the sampled orders of groups",
    "explain device": "where to run the model (`auto`: CUDA when available)",
    "rescore device": "where to score (`auto`: CUDA when available)",
    "audit decision_id": "the decision's id (the CloudEvent `id` of a decision record)",
    "audit device": "where to score (`auto`: CUDA when available)",
    "report period": "time buckets of the global view",
    "models action": "`list` the versions, `promote` VERSION, or `rollback` to the previous promotion",
    "models version": "`promote`: the version to promote",
    "adapt epochs": "passes over the line's training units",
    "adapt batch_size": "units per training step",
    "adapt seed": "seeds the adapter's initialisation, shuffling, dropout and augmentation",
    "adapt no_amp": "no bf16 autocast on CUDA (train in float32)",
    "adapt device": "where to train (`auto`: CUDA when available)",
    "adapters action": "`list` adapter versions, `promote` VERSION of a line, or `rollback` a line's adapter",
}

_ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc):`~?([^`]+)`")


def _markdown(text: str) -> str:
    """reStructuredText roles and literals of a docstring as Markdown code spans, on one line."""
    text = _ROLE.sub(r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(text.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a Google-style class docstring, ``{name: meaning}`` (an entry naming several
    attributes, ``a, b: ...``, gives each the same meaning)."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    indent = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= indent:
            break
        if entry_indent is None:
            entry_indent = depth
        if depth == entry_indent and ":" in line:
            names, _, text = line.strip().partition(":")
            current = [text.strip()]
            for name in (n.strip() for n in names.split(",")):
                entries[name] = current
        elif current is not None:
            current.append(line.strip())
    return {name: _markdown(" ".join(parts)) for name, parts in entries.items()}


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, as Markdown."""
    doc = inspect.getdoc(cls) or ""
    return _markdown(doc.split("\n\n")[0])


# ------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ConfigField:
    """One configuration key.

    Attributes:
        key: dotted path in the config file (``join.timeout_s``; top-level keys have no dot).
        type: the field's declared type, as written in the code.
        default: the default value, as the loader would read it back from YAML (tuples as lists).
        meaning: what it does (Markdown, one line).
    """

    key: str
    type: str
    default: Any
    meaning: str


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return list(value) if isinstance(value, tuple) else value


def yaml_value(value: Any) -> str:
    """``value`` in YAML flow style on one line (``null``, ``true``, ``[a, b]``, ``{}``, ``''``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def config_sections() -> list[tuple[str | None, type, list[ConfigField]]]:
    """Every section of :class:`ServiceConfig` with its fields: ``(name, class, fields)``, the top-level
    scalar keys last under the name ``None``.

    Raises:
        ValueError: a field has no meaning in its docstring nor in :data:`CONFIG_NOTES`.
    """
    from inspection.codec import CodecLimits
    from services.service_config import LimitsSection, ServiceConfig

    fallback = {LimitsSection: CodecLimits}  # its docstring points at CodecLimits, whose fields it mirrors
    hints = typing.get_type_hints(ServiceConfig)
    top_docs = attribute_docs(ServiceConfig)
    sections: list[tuple[str | None, type, list[ConfigField]]] = []
    top: list[ConfigField] = []
    for f in dataclasses.fields(ServiceConfig):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            docs = attribute_docs(cls) or attribute_docs(fallback.get(cls, cls))
            rows = [_config_field(f"{f.name}.{sub.name}", sub, docs.get(sub.name)) for sub in dataclasses.fields(cls)
                    if sub.init]
            sections.append((f.name, cls, rows))
        else:
            top.append(_config_field(f.name, f, top_docs.get(f.name)))
    sections.append((None, ServiceConfig, top))
    return sections


def _config_field(key: str, f: dataclasses.Field, doc: str | None) -> ConfigField:
    meaning = doc or CONFIG_NOTES.get(key)
    if not meaning:
        raise ValueError(f"configuration key {key} has no meaning: document it in its section's Attributes or in "
                         "services.docs_reference.CONFIG_NOTES")
    meaning = re.sub(r"`?(?<![\w])None(?![\w])`?", "`null`", meaning)  # the page speaks YAML
    extra = CONFIG_ADDITIONS.get(key)
    meaning = f"{meaning} {extra}" if extra else meaning
    return ConfigField(key, str(f.type), _default(f), meaning)


_CONFIG_HEAD = """\
# Service configuration reference

<!-- Generated by `python -m services.docs_reference config --out docs/configuration.md` from
     services/service_config.py; edit the code (or the notes in services/docs_reference.py), not this page. -->

`inspection serve --config FILE` reads one YAML or JSON file (`.json` is read as JSON, anything else as YAML)
into `services.service_config.ServiceConfig`. Loading is strict: an unknown key is refused with the list of
valid ones, a wrong type or an out-of-range value is refused with the key's path
(`batching.max_batch must be >= 1; got 0`), and a YAML mapping that repeats a key is refused. Every key
has the default below except `model.store`, so the smallest file is

```yaml
model:
  store: models/composite
```

[service.example.yaml](service.example.yaml) shows every key with its default; [service.md](service.md) explains
how the service uses them. Secrets never go in the file: the `*_env` keys name environment variables. The
command line overrides a few keys for one instance: `--bootstrap` (`kafka.bootstrap`), `--group-id`
(`kafka.group_id`) and `--metrics-port` (`metrics.port`). When `run_dir` is set the resolved configuration
(secrets left out) is written there at start.

The *type* column is the field's declared Python type (`X | None` accepts `null`); *default* is written as YAML.

Regenerate or check this page:

<!-- runnable -->
<!-- expect: exit 0, stdout contains "| `join.timeout_s` | `float` | `5.0` |" -->
```bash
python -m services.docs_reference config --out configuration.md
grep '`join.timeout_s`' configuration.md
```
"""


def config_reference() -> str:
    """The Markdown of ``docs/configuration.md``."""
    out = [_CONFIG_HEAD]
    for name, cls, rows in config_sections():
        title = f"## `{name}`" if name else "## Top-level keys"
        out.append(f"\n{title}\n\n{_summary(cls) if name else 'Keys outside any section.'}\n")
        out.append("| key | type | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        for row in rows:
            out.append(f"| `{row.key}` | `{_cell(row.type)}` | `{_cell(yaml_value(row.default))}` | "
                       f"{_cell(row.meaning)} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------- command line
@contextlib.contextmanager
def _environment_without(*names: str) -> Iterator[None]:
    """Hide environment variables while the parser is built, so defaults read from them stay unset."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def parser() -> argparse.ArgumentParser:
    """The real ``inspection`` parser, built without ``$INSPECTION_BOOTSTRAP`` (its defaults stay unset)."""
    from services.cli import build_parser

    with _environment_without("INSPECTION_BOOTSTRAP"):
        return build_parser()


def subcommands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                         argparse.ArgumentParser]]:
    """Every sub-command of ``p`` as ``(path, parser)``, depth first in definition order."""
    out = []
    for action in p._actions:  # noqa: SLF001 - argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                out.append(((*path, name), sub))
                out += subcommands(sub, (*path, name))
    return out


def arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user can give ``p`` (help, sub-command and hidden ``help=SUPPRESS`` actions left out)."""
    return [a for a in p._actions  # noqa: SLF001
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)  # noqa: SLF001
            and a.help is not argparse.SUPPRESS]


def argument_meaning(path: tuple[str, ...], action: argparse.Action) -> str:
    """An argument's meaning: its ``help``, or its :data:`CLI_NOTES` entry.

    Raises:
        ValueError: it has neither.
    """
    if action.help and action.help is not argparse.SUPPRESS:
        return action.help.replace("%%", "%")
    for key in (f"{' '.join(path)} {action.dest}", f"* {action.dest}"):
        if key in CLI_NOTES:
            return CLI_NOTES[key]
    raise ValueError(f"`inspection {' '.join(path)}` argument {action.dest} has no help text: give it one in "
                     "services/cli.py or a note in services.docs_reference.CLI_NOTES")


def _argument_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes_value = action.nargs != 0
    metavar = ""
    if takes_value:
        metavar = action.metavar or action.dest.upper()
        if action.nargs in ("*", "+"):
            metavar = f"{metavar or action.dest.upper()} ..."
    return ", ".join(f"`{o}{' ' + metavar if metavar else ''}`" for o in action.option_strings)


def _argument_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction | argparse._CountAction):  # noqa: SLF001
        return "off"
    if action.default is None or action.default is argparse.SUPPRESS or action.default == []:
        return "—"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    return '`""`' if action.default == "" else f"`{action.default}`"


def _usage(p: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(p.prog, width=100, max_help_position=40)
    formatter.add_usage(p.usage, p._actions, p._mutually_exclusive_groups)  # noqa: SLF001
    return formatter.format_help().strip()


def exit_codes() -> str:
    """The exit-code sentence of :mod:`services.cli`'s docstring."""
    import services.cli

    for paragraph in (services.cli.__doc__ or "").split("\n\n"):
        text = " ".join(paragraph.split())
        if text.startswith("Exit codes: "):
            return text.removeprefix("Exit codes: ")
    raise ValueError("services/cli.py's docstring has no 'Exit codes: ...' paragraph")


_CLI_HEAD = """\
# Command-line reference

<!-- Generated by `python -m services.docs_reference cli --out docs/cli.md` from services/cli.py; edit the
     parser's help texts (or the notes in services/docs_reference.py), not this page. -->

Every verb of the `inspection` command (installed into `.venv/bin` by `make demo` or `make test`), its arguments
and what each means. `inspection COMMAND --help` prints the same, with an example. Where a command needs Kafka,
`--bootstrap` defaults to `$INSPECTION_BOOTSTRAP`.

**Exit codes**: {exit_codes} Commands that check something use 1: `inspection demo` when one of its checks fails (it
names them), `inspection audit` when the re-scored decision does not match the recorded one, and
`inspection serve --workers N` when a worker failed too often. Errors print one line on stderr that starts with
`inspection: error:`; a mistyped argument is refused by the parser (also exit 2) with the command's usage.

**Global option** (before the command): `-v` / `--verbose`: more logging on stderr (`-vv` for debug).

<!-- runnable -->
<!-- expect: exit 0, stdout contains "serve" -->
```bash
inspection --help
```
"""


def cli_reference() -> str:
    """The Markdown of ``docs/cli.md``."""
    p = parser()
    head = _CLI_HEAD.format(exit_codes=exit_codes())
    exit_paragraph = next(par for par in head.split("\n\n") if par.startswith("**Exit codes**"))
    out = [head.replace(exit_paragraph, textwrap.fill(" ".join(exit_paragraph.split()), 115))]
    commands = subcommands(p)
    out.append("\n## Commands\n")
    for path, _sub in commands:
        anchor = "-".join(("inspection", *path))
        out.append(f"- [`inspection {' '.join(path)}`](#{anchor}): {_cell(_help_of(p, path))}")
    for path, sub in commands:
        out.append(f"\n## inspection {' '.join(path)}\n")
        summary = _markdown(_help_of(p, path))
        out.append(summary[:1].upper() + summary[1:] + ".")
        if sub.description:
            out.append("\n" + " ".join(sub.description.split()))
        out.append(f"\n```\n{_usage(sub)}\n```\n")
        args = arguments(sub)
        if args:
            out.append("| argument | default | meaning |")
            out.append("| --- | --- | --- |")
            for action in args:
                meaning = argument_meaning(path, action)
                if action.choices is not None and not isinstance(action.choices, dict):
                    meaning = f"{meaning.rstrip('.')}; one of {', '.join(f'`{c}`' for c in action.choices)}"
                out.append(f"| {_argument_name(action)} | {_argument_default(action)} | {_cell(meaning)} |")
        groups = [g for g in sub._mutually_exclusive_groups if g.required]  # noqa: SLF001
        for g in groups:
            names = " or ".join(f"`{a.option_strings[0]}`" for a in g._group_actions)  # noqa: SLF001
            out.append(f"\nExactly one of {names} is required.")
        if sub.epilog:
            example = sub.epilog.removeprefix("example: ")
            out.append(f"\nExample:\n\n```bash\n{example}\n```")
    return "\n".join(out) + "\n"


def _help_of(p: argparse.ArgumentParser, path: tuple[str, ...]) -> str:
    """The one-line help a sub-command was registered with."""
    parent = p
    for name in path[:-1]:
        parent = _child(parent, name)
    for action in parent._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for choice in action._choices_actions:  # noqa: SLF001
                if choice.dest == path[-1]:
                    return choice.help or ""
    return ""


def _child(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in p._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:  # noqa: SLF001
            return action.choices[name]
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------- main
PAGES = {"config": ("configuration.md", config_reference), "cli": ("cli.md", cli_reference)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.docs_reference",
                                 description="Write the reference pages generated from the code.")
    ap.add_argument("page", choices=[*PAGES, "all"], help="config: docs/configuration.md; cli: docs/cli.md")
    ap.add_argument("--out", type=Path, help="write here (one page; default: stdout)")
    ap.add_argument("--check", action="store_true",
                    help="compare with the committed page(s) in docs/ instead; exit 1 if one differs")
    args = ap.parse_args(argv)
    names = list(PAGES) if args.page == "all" else [args.page]
    if args.check:
        stale = [PAGES[n][0] for n in names if (DOCS_DIR / PAGES[n][0]).read_text(encoding="utf-8")
                 != PAGES[n][1]()]
        for name in stale:
            print(f"docs/{name} differs from the code: python -m services.docs_reference "
                  f"{'config' if name == 'configuration.md' else 'cli'} --out docs/{name}", file=sys.stderr)
        return 1 if stale else 0
    if args.out is not None and len(names) > 1:
        ap.error("--out takes one page; write `all` with --check or one page at a time")
    text = "".join(PAGES[n][1]() for n in names)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
