"""A plant's own data for training: Parquet history or an image folder, labels, and the split by time.

Two sources (see docs/own-data.md):

- **history**: Parquet files as the stream's archive sink and ``inspection produce --archive`` write them
  (:mod:`inspection.data.history`); every reading is decoded through the validating codec. Labels come from the
  history's ``label`` column, or from a labels file (CSV or Parquet: ``unit_id, label[, class][, culprits]``) that
  overrides the history's label of every unit it names.
- **folder**: images of a vision-only line, labelled by their place: ``ok/*.png|jpg``,
  ``defect/<class>/*.png|jpg`` and ``defect/*.png|jpg`` (class ``defect``).

Nothing is dropped silently: a row the codec rejects, an unreadable image, an unlabelled unit or a duplicate is a
counted skip with its reason (reported by ``inspection train`` and kept in the model card); input that cannot make
a sound model (an unknown label value, a labelled unit missing from the history, mixed sample rates, one class
only, no validation units, a pattern that matches nothing) raises :class:`~inspection.errors.ConfigError`.

Split: by unit and by time. Units are ordered by event time (a unit's earliest reading; an image's file
modification time), ties by unit id or file name, and the latest ``val_fraction`` of them validate; nothing is
shuffled across time. No test split is carved: a plant evaluates a model on later history (``inspection rescore``).

Normal-only mode (``DataSpec.mode == "normal-only"``, for :mod:`inspection.normal_only`): only units labelled good
are kept; each unit labelled defective is a counted skip (``labelled_defective``). When the data carries no label
at all (no labels file, no label in the history), every unit is taken as normal: its label source is
``assumed_normal``. The kept units are split by time as above, so the latest of them are the held-out normal units
that standardise the deviations and set the false-alarm threshold. Data with no good unit raises
:class:`~inspection.errors.ConfigError`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from inspection.data._common import ids_digest
from inspection.errors import ConfigError, DataError, Reason, RecordError
from inspection.records import MODALITIES, Label, Unit, VisionReading, check_id, sniff_image_type

log = logging.getLogger(__name__)

KINDS = ("history", "folder")
#: What the data trains: a supervised model (labels of both kinds) or a normal-only detector (good units only).
MODES = ("supervised", "normal-only")
DEFAULT_VAL_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_COLUMNS = ("unit_id", "label", "class", "culprits")
#: Label values a labels file may hold (case-insensitive), and what they mean.
LABEL_VALUES = {"0": False, "1": True, "false": False, "true": True}
#: Ids an error message lists before "and N more".
SHOWN_IDS = 5
#: Examples of each skip reason kept for the report.
SKIP_EXAMPLES = 3
#: Mixed vibration sample rates are accepted (``allow_mixed_rates``) only when every rate resolves the waveform
#: encoder's whole spectrum grid (0-20 kHz, see :class:`inspection.preprocess.WaveformPreprocess`): the encoder
#: reads each reading on a grid in Hz and resamples its waveform branch to one rate, so such readings look alike.
MIN_MIXED_RATE_HZ = 40_000.0
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_ID = 128


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class DataSpec:
    """Where a plant's training data is and how it is read; stored in the model card (``source``) so that
    calibration can rebuild the validation units.

    Attributes:
        kind: ``history`` (Parquet files) or ``folder`` (an image folder).
        paths: the history files (resolved, sorted) or the one image folder.
        labels: a labels file overriding the history's labels, or None.
        line: history: keep only this line's units; folder: the line id of its units (default: the folder's name).
        val_fraction: share of the units, the latest by event time, that validate.
        allow_mixed_rates: accept vibration readings at several sample rates (each at least
            :data:`MIN_MIXED_RATE_HZ`).
        mode: ``supervised`` (both classes needed) or ``normal-only`` (good units only; see the module docstring).
    """

    kind: str
    paths: tuple[str, ...]
    labels: str | None = None
    line: str | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    allow_mixed_rates: bool = False
    mode: str = "supervised"

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if self.kind not in KINDS:
            raise ConfigError(f"data kind must be one of {KINDS}; got {self.kind!r}")
        if self.mode not in MODES:
            raise ConfigError(f"data mode must be one of {MODES}; got {self.mode!r}")
        if not self.paths or (self.kind == "folder" and len(self.paths) != 1):
            raise ConfigError(f"{self.kind} data needs {'one folder' if self.kind == 'folder' else 'files'}; "
                              f"got {list(self.paths)}")
        if isinstance(self.val_fraction, bool) or not 0.0 < float(self.val_fraction) < 1.0:
            raise ConfigError(f"the validation fraction must be in (0, 1): calibration needs validation units; got "
                              f"{self.val_fraction!r}")
        if self.line is not None:
            _check_line(self.line, "--line")
        if self.labels is not None and self.kind == "folder":
            raise ConfigError("a labels file applies to history data; an image folder is labelled by its layout "
                              "(ok/, defect/<class>/)")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "paths": list(self.paths), "labels": self.labels, "line": self.line,
                "val_fraction": float(self.val_fraction), "allow_mixed_rates": self.allow_mixed_rates,
                "mode": self.mode}

    @classmethod
    def from_dict(cls, data: Mapping) -> DataSpec:
        known = {"kind", "paths", "labels", "line", "val_fraction", "allow_mixed_rates", "mode"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_line(line: str, what: str) -> str:
    try:
        return check_id(line, what, Reason.BAD_LINE_ID)
    except RecordError as exc:
        raise ConfigError(exc.detail) from exc


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in the image layout (it has ``ok/`` or ``defect/``)."""
    return path.is_dir() and ((path / "ok").is_dir() or (path / "defect").is_dir())


def resolve_data(path_or_glob: str | Path, *, labels: str | Path | None = None, line: str | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, allow_mixed_rates: bool = False,
                 mode: str = "supervised") -> DataSpec:
    """The spec of ``path_or_glob``: an image folder (``ok/``, ``defect/``), a history file, a folder of history
    files (its ``*.parquet``, recursively, hidden ones aside) or a glob of history files; ``mode`` as in
    :class:`DataSpec`.

    Raises:
        ConfigError: nothing matches (the message names the pattern), or the labels file does not exist.
    """
    p = Path(path_or_glob)
    if is_image_folder(p):
        kind, paths = "folder", [p.resolve()]
    elif p.is_dir():
        kind = "history"
        paths = sorted(q.resolve() for q in p.rglob("*.parquet")
                       if not any(part.startswith((".", "_")) for part in q.relative_to(p).parts))
    elif p.is_file():
        kind, paths = "history", [p.resolve()]
    else:
        kind = "history"
        paths = sorted({Path(q).resolve() for q in glob.glob(str(path_or_glob), recursive=True) if Path(q).is_file()})
    if not paths:
        raise ConfigError(f"no data matches {str(path_or_glob)!r}: give a Parquet history file, a folder of them, a "
                          "glob such as 'archive/*.parquet', or an image folder with ok/ and defect/ subfolders")
    if labels is not None:
        if not Path(labels).is_file():
            raise ConfigError(f"labels file {labels} does not exist")
        labels = str(Path(labels).resolve())
    return DataSpec(kind, tuple(str(q) for q in paths), labels, line, val_fraction, allow_mixed_rates, mode)


# ---------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class FileLabel:
    """One row of a labels file: defect or not, optionally its class and culprit modalities."""

    defect: bool
    defect_class: str | None = None
    culprits: frozenset[str] | None = None


def _label_value(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in LABEL_VALUES:
        return LABEL_VALUES[text]
    raise ConfigError(f"{where}: unknown label value {value!r}; a label is 0/1 or true/false")


def _culprits(value: object, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    names = value if isinstance(value, list | tuple) else re.split(r"[;,]", str(value))
    out = frozenset(str(n).strip() for n in names if str(n).strip())
    unknown = sorted(out - set(MODALITIES))
    if unknown:
        raise ConfigError(f"{where}: culprits {unknown} are not modalities; culprits name some of {list(MODALITIES)}, "
                          "separated by ';' or ','")
    return out or None


def _label_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            _check_label_columns(reader.fieldnames or [], path)
            yield from reader
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"labels file {path} is not a readable Parquet file: {exc}") from exc
        _check_label_columns(table.column_names, path)
        yield from table.to_pylist()
    else:
        raise ConfigError(f"labels file {path} must be .csv or .parquet; got {suffix or 'no suffix'}")


def _check_label_columns(columns: Sequence[str], path: Path) -> None:
    columns = [c.strip() for c in columns]
    missing = [c for c in ("unit_id", "label") if c not in columns]
    unknown = [c for c in columns if c not in LABEL_COLUMNS]
    if missing or unknown:
        raise ConfigError(f"labels file {path} has columns {columns}; expected unit_id, label and optionally class, "
                          f"culprits" + (f" (missing {missing})" if missing else "") +
                          (f" (unknown {unknown})" if unknown else ""))


def read_labels(path: Path | str) -> dict[str, FileLabel]:
    """Unit id -> label of a labels file (CSV or Parquet; columns ``unit_id, label[, class][, culprits]``).

    ``label`` is 0/1 or true/false; ``class`` is the defect class (default ``defect`` for a defective unit);
    ``culprits`` lists the modalities that show the defect, separated by ``;`` or ``,``.

    Raises:
        ConfigError: unknown columns or label values, unknown culprit names, a good unit with culprits or a
            defect class, a defective unit of class ``ok``, an empty or repeated unit id.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist")
    out: dict[str, FileLabel] = {}
    repeated: list[str] = []
    for i, row in enumerate(_label_rows(path)):
        row = {str(k).strip(): v for k, v in row.items()}
        where = f"{path} row {i + 1}"
        uid = row.get("unit_id")
        uid = str(uid).strip() if uid is not None else ""
        if not uid:
            raise ConfigError(f"{where}: empty unit_id")
        where += f" (unit {uid!r})"
        defect = _label_value(row.get("label"), where)
        klass = row.get("class")
        klass = str(klass).strip() if klass is not None and str(klass).strip() else None
        culprits = _culprits(row.get("culprits"), where)
        if not defect and (culprits or klass not in (None, "ok")):
            raise ConfigError(f"{where}: a unit labelled good has class ok (or none) and no culprits; got class "
                              f"{klass!r}, culprits {sorted(culprits or ())}")
        if defect and klass == "ok":
            raise ConfigError(f"{where}: a unit labelled defective cannot have class 'ok'")
        if uid in out:
            repeated.append(uid)
        out[uid] = FileLabel(defect, klass, culprits)
    if repeated:
        raise ConfigError(f"labels file {path} names {len(repeated)} unit id(s) more than once: "
                          f"{_some(sorted(set(repeated)))}; keep one row per unit")
    if not out:
        raise ConfigError(f"labels file {path} holds no rows")
    return out


def write_labels(path: Path | str, units: Sequence[Unit]) -> int:
    """Write the labels of labelled units as a labels file (``.csv`` or ``.parquet`` by suffix): ``unit_id``,
    ``label`` (0/1), ``class``, ``culprits`` (``;``-separated). Returns the rows written."""
    path = Path(path)
    rows = [{"unit_id": u.unit_id, "label": int(u.label.defect), "class": u.label.defect_class,
             "culprits": ";".join(sorted(u.label.culprits))} for u in units if u.label is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(LABEL_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
            [("unit_id", pa.string()), ("label", pa.int8()), ("class", pa.string()), ("culprits", pa.string())])),
            path)
    else:
        raise ConfigError(f"a labels file is .csv or .parquet; got {path.name}")
    return len(rows)


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Skips:
    """Counted skips: reason -> count, and a few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < SKIP_EXAMPLES:
            self.examples[reason].append(example)

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": {k: list(v) for k, v in
                                                                         sorted(self.examples.items())}}


@dataclass
class OwnData:
    """Labelled units of a plant's own data, in time order, split by time.

    Attributes:
        units: every unit kept (train + val), oldest first.
        train, val: the oldest ``1 - val_fraction`` and the latest ``val_fraction`` of them.
        class_names: the class head's classes, ``ok`` first.
        skips: counted skips with their reasons.
        label_sources: where the labels came from (``labels_file`` / ``history`` / ``folder``, and
            ``assumed_normal`` for normal-only data without any label) -> units.
        other_lines: history units left out by the line filter, per line.
        rates: modality -> sample rate (Hz) -> units.
    """

    spec: DataSpec
    units: list[Unit]
    train: list[Unit]
    val: list[Unit]
    class_names: tuple[str, ...]
    skips: Skips
    label_sources: dict[str, int]
    other_lines: dict[str, int]
    rates: dict[str, dict[str, int]]

    @property
    def lines(self) -> list[str]:
        return sorted({u.line_id for u in self.units})

    @property
    def assumed_normal(self) -> bool:
        """Whether the units are taken as normal because the data holds no label at all (normal-only mode)."""
        return self.label_sources.get("assumed_normal", 0) > 0

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present in any unit, canonical order."""
        return tuple(m for m in MODALITIES if any(getattr(u, m) is not None for u in self.units))

    def channels(self, modality: str) -> int:
        """The (one) channel count of an array modality's readings."""
        return next(getattr(u, modality).channels for u in self.units if getattr(u, modality) is not None)

    def sample_rate(self, modality: str) -> float:
        """The lowest sample rate of a modality's readings (Hz)."""
        return min(getattr(u, modality).sample_rate_hz for u in self.units if getattr(u, modality) is not None)

    def source_card(self) -> dict:
        """The model card's ``source``: the spec, the unit count, digests of ids and labels, skips."""
        return {**self.spec.to_dict(), "n_units": len(self.units),
                "unit_ids_sha256": ids_digest([u.unit_id for u in self.units]),
                "labels_sha256": labels_digest(self.units), "class_names": list(self.class_names),
                "label_sources": dict(self.label_sources), "other_lines": dict(self.other_lines),
                "sample_rates_hz": self.rates, "skipped": self.skips.to_dict()}

    def split_card(self) -> dict:
        """The model card's ``split``: the rule and the validation unit ids."""
        return {"rule": "time: the latest val_fraction of the units (by event time) validate; no test split",
                "val_fraction": float(self.spec.val_fraction), "n_train": len(self.train), "n_val": len(self.val),
                "train_ids_sha256": ids_digest([u.unit_id for u in self.train]),
                "train_until": _earliest(self.train[-1]).isoformat(), "val_from": _earliest(self.val[0]).isoformat(),
                "val_ids": [u.unit_id for u in self.val]}


def labels_digest(units: Sequence[Unit]) -> str:
    """sha256 of the units' labels (id, defect, class, culprits), in id order."""
    rows = sorted(f"{u.unit_id}\t{int(u.label.defect)}\t{u.label.defect_class}\t{','.join(sorted(u.label.culprits))}"
                  for u in units)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _earliest(unit: Unit) -> datetime:
    return min(r.event_time for r in unit.readings)


def load_own_data(spec: DataSpec) -> OwnData:
    """Read, label, check and split a plant's data (see the module docstring).

    Raises:
        ConfigError: bad labels, labels-file ids not in the history, mixed sample rates or channel counts, a
            line with no units, fewer than two classes, or a split without training or validation units (or
            without both good and defective validation units); in normal-only mode: no unit labelled good, or
            a split without training or validation units.
        DataError: a history file is missing or not a history file.
    """
    skips = Skips()
    if spec.kind == "folder":
        keyed, other_lines, sources = _folder_units(Path(spec.paths[0]), spec.line, skips)
    else:
        keyed, other_lines, sources = _history_units(spec, skips)
    where = spec.paths[0] if len(spec.paths) == 1 else f"{len(spec.paths)} history files ({spec.paths[0]}, ...)"
    if not keyed:
        raise ConfigError(f"{where} holds no usable unit" + (f" of line {spec.line!r}" if spec.line else "")
                          + _skip_note(skips) + (f"; lines there: {sorted(other_lines)}" if other_lines else ""))
    keyed.sort(key=lambda ku: ku[0])
    units = [u for _, u in keyed]
    if spec.mode == "normal-only":
        return _normal_data(spec, units, skips, sources, other_lines, where)
    sources = Counter(sources[u.unit_id] for u in units)
    rates = _check_readings(units, spec, where)
    classes = Counter(u.label.defect_class for u in units)
    n_defect = sum(u.label.defect for u in units)
    if n_defect == 0 or n_defect == len(units):
        raise ConfigError(f"{where}: fewer than 2 classes: all {len(units)} labelled units are "
                          f"{'defective' if n_defect else 'good'} ({dict(classes)}); supervised training needs both "
                          "good and defective units" + _skip_note(skips))
    class_names = ("ok", *sorted(set(classes) - {"ok"}))
    n_val = int(round(len(units) * spec.val_fraction))
    if n_val == 0 or n_val == len(units):
        raise ConfigError(f"{where}: {len(units)} units with validation fraction {spec.val_fraction:g} leave "
                          f"{'no validation' if n_val == 0 else 'no training'} units; give more data or another "
                          "--val-fraction")
    train, val = units[:-n_val], units[-n_val:]
    val_defects = sum(u.label.defect for u in val)
    if val_defects in (0, len(val)):
        raise ConfigError(f"{where}: the validation units (the latest {n_val} of {len(units)}, from "
                          f"{_earliest(val[0]).isoformat()}) are all {'defective' if val_defects else 'good'}; "
                          "calibration needs both good and defective units there: give a larger --val-fraction or "
                          "more history")
    return OwnData(spec, units, train, val, class_names, skips, dict(sources), dict(other_lines), rates)


def _normal_data(spec: DataSpec, units: list[Unit], skips: Skips, sources: Mapping[str, str],
                 other_lines: Counter, where: str) -> OwnData:
    """Normal-only data: the units labelled good (defective ones become counted skips), split by time."""
    normal = []
    for u in units:
        if u.label.defect:
            skips.add("labelled_defective", f"unit {u.unit_id!r}: labelled defective ({u.label.defect_class}); "
                                            "normal-only training fits good units only")
        else:
            normal.append(u)
    if not normal:
        raise ConfigError(f"{where}: no unit is labelled good: all {len(units)} labelled units are defective; "
                          "normal-only training fits defect-free units: label the good ones (label 0 in a labels "
                          "file), or give data without any label, where every unit is taken as normal"
                          + _skip_note(skips))
    rates = _check_readings(normal, spec, where)
    n_val = int(round(len(normal) * spec.val_fraction))
    if n_val == 0 or n_val == len(normal):
        raise ConfigError(f"{where}: {len(normal)} good units with validation fraction {spec.val_fraction:g} leave "
                          f"{'no held-out' if n_val == 0 else 'no fitting'} units; give more good units or another "
                          "--val-fraction" + _skip_note(skips))
    return OwnData(spec, normal, normal[:-n_val], normal[-n_val:], ("ok",), skips,
                   dict(Counter(sources[u.unit_id] for u in normal)), dict(other_lines), rates)


def _skip_note(skips: Skips) -> str:
    return f" (skipped: {dict(skips.counts)})" if skips.counts else ""


def _check_readings(units: Sequence[Unit], spec: DataSpec, where: str) -> dict[str, dict[str, int]]:
    """One channel count per array modality and one sample rate (vibration: several when allowed and all high
    enough); returns modality -> rate -> units."""
    out: dict[str, dict[str, int]] = {}
    for m in ("vibration", "temperature"):
        readings = [getattr(u, m) for u in units if getattr(u, m) is not None]
        if not readings:
            continue
        channels = Counter(r.channels for r in readings)
        if len(channels) > 1:
            raise ConfigError(f"{where}: {m} readings come with different channel counts "
                              f"({_counts(channels, 'channel(s)')}); one model reads one sensor set-up: keep one "
                              "line (--line) or train one model per set-up")
        rates = Counter(r.sample_rate_hz for r in readings)
        out[m] = {f"{rate:.10g}": n for rate, n in sorted(rates.items())}
        if len(rates) == 1:
            continue
        text = _counts(rates, "Hz")
        if m == "temperature":
            raise ConfigError(f"{where}: temperature readings come at mixed sample rates ({text}); one model reads "
                              "one sample rate: keep one line (--line) or train one model per rate")
        if not spec.allow_mixed_rates:
            raise ConfigError(f"{where}: vibration readings come at mixed sample rates ({text}); one model reads one "
                              "accelerometer set-up: keep one line (--line), or, when every rate is a kHz waveform "
                              f"of at least {MIN_MIXED_RATE_HZ:g} Hz, pass --allow-mixed-rates")
        low = sorted(r for r in rates if r < MIN_MIXED_RATE_HZ)
        if low:
            raise ConfigError(f"{where}: vibration readings come at mixed sample rates ({text}); mixed rates are "
                              f"accepted only when each is at least {MIN_MIXED_RATE_HZ:g} Hz (the waveform "
                              f"encoder's spectrum grid), and {', '.join(f'{r:g}' for r in low)} Hz is not")
    return out


def _counts(counter: Counter, what: str) -> str:
    return ", ".join(f"{k:.10g} {what}: {n} units" for k, n in sorted(counter.items()))


# -------------------------------------------------------------------------------------------- history
def _history_units(spec: DataSpec, skips: Skips) -> tuple[list, Counter, dict[str, str]]:
    """((earliest event time, unit id), labelled unit) of the history files, line filter applied; units left
    out by the line filter, per line; unit id -> where its label came from."""
    from inspection.data.history import iter_history_rows

    file_labels = read_labels(spec.labels) if spec.labels else {}
    units: list[Unit] = []
    seen: set[str] = set()  # every unit id in the history, rejected rows' ids included
    other_lines: Counter = Counter()
    for path in spec.paths:
        if not Path(path).is_file():
            raise DataError(f"history file {path} does not exist (moved? point --data at its new place)")
        for row_no, unit_id, item in iter_history_rows(path):
            if isinstance(item, RecordError):
                skips.add(item.reason.value, f"{path} row {row_no} (unit {unit_id!r}): {item.detail}")
                if unit_id is not None:
                    seen.add(unit_id)
                continue
            unit = item.unit
            if unit.unit_id in seen:
                skips.add("duplicate_unit", f"{path} row {row_no}: unit {unit.unit_id!r} seen before (first kept)")
                continue
            seen.add(unit.unit_id)
            if spec.line is not None and unit.line_id != spec.line:
                other_lines[unit.line_id] += 1
                continue
            units.append(unit)
    unknown = sorted(set(file_labels) - seen)
    if unknown:
        raise ConfigError(f"labels file {spec.labels} names {len(unknown)} unit id(s) that are not in the history: "
                          f"{_some(unknown)}; check the ids (or the history files given)")
    sources: dict[str, str] = {}
    keyed = []
    # normal-only data without any label: every unit is taken as normal
    assume_normal = spec.mode == "normal-only" and not file_labels and all(u.label is None for u in units)
    for unit in units:
        if unit.unit_id in file_labels:
            label, source = _file_label(file_labels[unit.unit_id], unit), "labels_file"
        elif unit.label is not None:
            label, source = unit.label, "history"
            if label.defect and label.defect_class == "ok":
                label = replace(label, defect_class="defect")
        elif assume_normal:
            label, source = Label(defect=False), "assumed_normal"
        else:
            skips.add("unlabelled", f"unit {unit.unit_id!r}: no label in the history" +
                      (" nor in the labels file" if spec.labels else ""))
            continue
        if label.defect and not label.culprits & set(unit.present):
            skips.add("culprit_absent", f"unit {unit.unit_id!r}: labelled defective in {sorted(label.culprits)}, "
                                        f"but it has only {list(unit.present)}")
            continue
        sources[unit.unit_id] = source
        keyed.append(((_earliest(unit), unit.unit_id), replace(unit, label=label)))
    return keyed, other_lines, sources


def _file_label(row: FileLabel, unit: Unit) -> Label:
    """A labels-file row as the unit's label: a defect without culprits is blamed on every reading the unit has."""
    if not row.defect:
        return Label(defect=False)
    return Label(defect=True, defect_class=row.defect_class or "defect",
                 culprits=row.culprits if row.culprits is not None else frozenset(unit.present))


# --------------------------------------------------------------------------------------------- folder
def folder_unit_id(rel: Path) -> str:
    """A unit id from an image's path inside the folder (``defect/crack/a 1.png`` -> ``defect:crack:a_1.png``);
    over-long names keep a hash of the path."""
    text = ":".join(_ID_UNSAFE.sub("_", part) for part in rel.parts)
    if len(text) > _MAX_ID:
        text = text[:_MAX_ID - 17] + "-" + hashlib.sha256(str(rel).encode()).hexdigest()[:16]
    return text


def _folder_units(root: Path, line: str | None, skips: Skips) -> tuple[list, Counter, dict[str, str]]:
    """((modification time, relative name), labelled unit) of an image folder."""
    if not is_image_folder(root):
        raise ConfigError(f"{root} is not an image folder: expected ok/ and defect/ subfolders")
    line = line or _check_line(_ID_UNSAFE.sub("_", root.name), "the folder's name as a line id (give --line)")
    files: list[tuple[Path, str, bool]] = []  # (file, class, defect)
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file():
            skips.add("outside_layout", f"{child}: a file beside ok/ and defect/")
        elif child.name not in ("ok", "defect"):
            raise ConfigError(f"{root} holds a folder {child.name!r}; the layout is ok/*.png|jpg, "
                              "defect/<class>/*.png|jpg and defect/*.png|jpg")
    for top, defect in (("ok", False), ("defect", True)):
        folder = root / top
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_file():
                files.append((child, "defect" if defect else "ok", defect))
                continue
            if not defect:
                raise ConfigError(f"{child}: ok/ holds images only, no subfolders (classes are defect/<class>/)")
            if child.name == "ok":
                raise ConfigError(f"{child}: a defect class cannot be named 'ok'")
            for item in sorted(child.iterdir()):
                if item.name.startswith("."):
                    continue
                if not item.is_file():
                    raise ConfigError(f"{item}: defect/<class>/ holds images only, no deeper folders")
                files.append((item, child.name, True))
    keyed = []
    for path, klass, defect in files:
        rel = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skips.add("unsupported_file", f"{rel}: not {'/'.join(IMAGE_SUFFIXES)}")
            continue
        stat = path.stat()
        when = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, UTC)
        uid = folder_unit_id(rel)
        data = path.read_bytes()
        content_type = sniff_image_type(data) or ("image/png" if path.suffix.lower() == ".png" else "image/jpeg")
        try:
            reading = VisionReading(data=data, content_type=content_type, unit_id=uid, line_id=line,
                                    reading_id=f"{uid}-vision", source=f"folder/{line}/camera", event_time=when)
        except RecordError as exc:
            skips.add(exc.reason.value, f"{rel}: {exc.detail}")
            continue
        label = Label(defect=defect, defect_class=klass, culprits=frozenset({"vision"}) if defect else frozenset())
        unit = Unit(uid, line, vision=reading, label=label, provenance={"vision": f"file:{rel.as_posix()}"})
        keyed.append(((stat.st_mtime_ns, rel.as_posix()), unit))
    return keyed, Counter(), {unit.unit_id: "folder" for _, unit in keyed}


# ---------------------------------------------------------------------------------------- calibration
def rebuild_validation(source: Mapping, split: Mapping, *, data: str | Path | None = None,
                       labels: str | Path | None = None) -> list[Unit]:
    """The validation units of a model trained on own data, rebuilt from its card's ``source`` and ``split``.

    ``data`` and ``labels`` point at the files' new place when they moved. The units read must be the ones the
    model was trained on (same ids, same labels), checked by their digests.

    Raises:
        ConfigError: the data or its labels changed since training, or a validation unit is missing.
    """
    spec = DataSpec.from_dict(source)
    if labels is not None:
        if not Path(labels).is_file():
            raise ConfigError(f"labels file {labels} does not exist")
        spec = replace(spec, labels=str(Path(labels).resolve()))
    if data is not None:
        moved = resolve_data(data)
        if moved.kind != spec.kind:
            raise ConfigError(f"this model was trained on {spec.kind} data; {data} is {moved.kind} data")
        spec = replace(spec, paths=moved.paths)
    own = load_own_data(spec)
    now = own.source_card()
    where = ", ".join(spec.paths[:3]) + (" ..." if len(spec.paths) > 3 else "")
    if now["unit_ids_sha256"] != source["unit_ids_sha256"]:
        raise ConfigError(f"the data at {where} is not what this model was trained on: {now['n_units']} units now, "
                          f"{source['n_units']} then (the unit ids differ); point --data at the original files, or "
                          "train a new model")
    if now["labels_sha256"] != source.get("labels_sha256"):
        raise ConfigError(f"the labels of the data at {where} changed since this model was trained; calibrate it on "
                          "the labels it was trained with (--labels), or train a new model")
    by_id = {u.unit_id: u for u in own.units}
    missing = [uid for uid in split["val_ids"] if uid not in by_id]
    if missing:
        raise ConfigError(f"{len(missing)} validation unit(s) of this model are not in the data: {_some(missing)}")
    return [by_id[uid] for uid in split["val_ids"]]


# ------------------------------------------------------------------------------------------ examples
#: ELPV grades written by :func:`export_elpv_folder`: p = 0 -> ok/, p = 2/3 and 1 -> defect/<ELPV class>/
#: (p = 1/3 cells, good by the p >= 0.5 rule but not clean, are left out).
ELPV_FOLDER_CLASSES = {0: None, 2: "p2_3", 3: "p1"}
_EXAMPLE_T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def export_elpv_folder(out: Path | str, limit: int, seed: int = 0) -> dict[str, int]:
    """Write ``limit`` ELPV cells (seeded draw) as an image folder in the own-data layout, their modification
    times one minute apart in draw order (so the time split is reproducible). Returns class -> images.

    Raises:
        ConfigError: ``out`` exists and is not an empty folder, or ``limit`` < 1.
    """
    import numpy as np

    from inspection.data.elpv import load_elpv

    out = Path(out)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {limit}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; give a new --out")
    items = [it for it in load_elpv() if it.grade in ELPV_FOLDER_CLASSES]
    order = np.random.default_rng(seed).permutation(len(items))[:limit]
    written: Counter = Counter()
    for i, k in enumerate(order.tolist()):
        item = items[k]
        klass = ELPV_FOLDER_CLASSES[item.grade]
        folder = out / "ok" if klass is None else out / "defect" / klass
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{item.name}.png"
        path.write_bytes(item.read_bytes())
        stamp = (_EXAMPLE_T0 + timedelta(minutes=i)).timestamp()
        os.utime(path, (stamp, stamp))
        written[klass or "ok"] += 1
    return dict(sorted(written.items()))
