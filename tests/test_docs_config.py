"""docs/configuration.md and docs/service.example.yaml stay true to the service's configuration dataclasses.

The page's tables are parsed and compared with :class:`services.service_config.ServiceConfig` walked directly
(not through the page's generator): every field documented once, no documented field that does not exist, the
declared type and the default as in the code, and a meaning for each. The example file and the page's YAML
snippets load with the real loader.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from services import docs_reference
from services.service_config import ServiceConfig, load_service_config

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "docs" / "service.example.yaml"

_ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| `(?P<type>(?:[^`])*)` \| `(?P<default>(?:[^`])*)` \| (?P<meaning>.*) \|$")


def code_fields() -> dict[str, tuple[str, object]]:
    """``{key: (declared type, default)}`` of every configuration key, walked from the dataclasses."""
    out: dict[str, tuple[str, object]] = {}
    hints = typing.get_type_hints(ServiceConfig)
    for f in dataclasses.fields(ServiceConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            for sub in dataclasses.fields(section):
                if sub.init:
                    out[f"{f.name}.{sub.name}"] = (str(sub.type), _default(sub))
        else:
            out[f.name] = (str(f.type), _default(f))
    return out


def _default(f: dataclasses.Field) -> object:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def documented_rows(text: str) -> list[dict[str, str]]:
    """The rows of the page's key tables (escaped pipes restored)."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            rows.append({k: v.replace("\\|", "|") for k, v in m.groupdict().items()})
    return rows


def config_doc_problems(text: str) -> list[str]:
    """What is wrong with a configuration page: undocumented or stale keys, wrong types or defaults, no meaning."""
    fields = code_fields()
    rows = documented_rows(text)
    keys = [r["key"] for r in rows]
    problems = [f"{key} is documented {keys.count(key)} times" for key in sorted(set(keys)) if keys.count(key) > 1]
    problems += [f"{key} is undocumented" for key in fields if key not in keys]
    problems += [f"{key} is documented but no longer exists" for key in keys if key not in fields]
    for row in rows:
        if row["key"] not in fields:
            continue
        declared, default = fields[row["key"]]
        if row["type"] != declared:
            problems.append(f"{row['key']}: the page says type {row['type']}, the code {declared}")
        if yaml.safe_load(row["default"]) != default or type(yaml.safe_load(row["default"])) is not type(default):
            problems.append(f"{row['key']}: the page says default {row['default']}, the code {default!r}")
        if not row["meaning"].strip():
            problems.append(f"{row['key']} has no meaning")
    return problems


# ------------------------------------------------------------------------------------------------- the page
def test_every_configuration_field_is_documented_with_its_type_and_default():
    text = PAGE.read_text(encoding="utf-8")
    assert len(documented_rows(text)) == len(code_fields())
    assert config_doc_problems(text) == []


def test_the_checker_finds_missing_stale_and_wrong_entries():
    text = PAGE.read_text(encoding="utf-8")
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `join.timeout_s` |"))
    assert config_doc_problems(without) == ["join.timeout_s is undocumented"]
    stale = text + "| `join.max_wait_s` | `float` | `1.0` | gone |\n"
    assert config_doc_problems(stale) == ["join.max_wait_s is documented but no longer exists"]
    wrong = text.replace("| `batching.max_batch` | `int` | `32` |", "| `batching.max_batch` | `int` | `64` |")
    assert config_doc_problems(wrong) == ["batching.max_batch: the page says default 64, the code 32"]
    typed = text.replace("| `drift.window` | `int` | `500` |", "| `drift.window` | `int` | `500.0` |")
    assert config_doc_problems(typed) == ["drift.window: the page says default 500.0, the code 500"]
    blank = re.sub(r"(\| `drift\.alpha` \| `float` \| `0\.05` \|).*\|", r"\1  |", text)
    assert config_doc_problems(blank) == ["drift.alpha has no meaning"]


def test_the_page_is_what_the_generator_writes_now():
    assert PAGE.read_text(encoding="utf-8") == docs_reference.config_reference(), (
        "docs/configuration.md is stale: python -m services.docs_reference config --out docs/configuration.md")


def test_notes_name_real_fields_only():
    fields = code_fields()
    assert set(docs_reference.CONFIG_NOTES) <= set(fields)
    assert set(docs_reference.CONFIG_ADDITIONS) <= set(fields)


def test_the_page_yaml_snippets_load_with_the_real_loader(tmp_path):
    snippets = re.findall(r"```yaml\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert snippets
    for i, snippet in enumerate(snippets):
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(snippet)
        assert isinstance(load_service_config(path), ServiceConfig)


# ------------------------------------------------------------------------------------------- the example file
def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and f"{name}." in {k[: len(name) + 1] for k in code_fields()}:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def test_the_example_loads_and_shows_every_key_with_its_default():
    config = load_service_config(EXAMPLE)
    assert config.model.store == "models/composite"
    shown = _flatten(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    fields = code_fields()
    assert sorted(set(fields) - set(shown)) == [], "keys missing from service.example.yaml"
    assert sorted(set(shown) - set(fields)) == []
    # the file says: every key is shown with its default except model.store
    differ = {k: v for k, v in shown.items() if k != "model.store" and v != fields[k][1]}
    assert differ == {}


@pytest.mark.parametrize("text, message, page_says", [
    ("model:\n  store: m\nbatching:\n  max_bacth: 64\n", "unknown key(s) ['max_bacth']; valid keys are",
     "an unknown key is refused with the list of valid ones"),
    ("model:\n  store: m\nbatching:\n  max_batch: 0\n", "batching.max_batch must be >= 1; got 0",
     "`batching.max_batch must be >= 1; got 0`"),
    ("model:\n  store: m\nmodel:\n  store: n\n", "key 'model' appears twice", "a YAML mapping that repeats a key is refused"),
])
def test_the_loader_refuses_what_the_page_says_it_refuses(tmp_path, text, message, page_says):
    from inspection.errors import ConfigError

    path = tmp_path / "service.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_service_config(path)
    assert page_says in " ".join(PAGE.read_text(encoding="utf-8").split())
