"""SKAB (Skoltech Anomaly Benchmark): a water-circulation rig recorded at 1 Hz, read from a local folder.

T rows (one per second) · 8 sensor channels. The folder holds 34 labelled experiments (``valve1/`` ×16,
``valve2/`` ×4, ``other/`` ×14) and ``anomaly-free/anomaly-free.csv`` (normal operation, no labels). Files are
``;``-separated with a header row; the data are GPL-3.0 and are never copied into the project.

The published outlier-detection protocol is implemented here too: :func:`protocol_split` (first 400 rows fit,
the rest scored), :func:`skab_score` (TP/FP/TN/FN pooled over files, F1, FAR, MAR) and the Hotelling T² row
of the leaderboard (:func:`hotelling_t2_baseline`), which a harness must reproduce before it scores a model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from scipy import stats

from inspection.data._common import announce_licence
from inspection.errors import DataError

__all__ = [
    "ANOMALY_FREE_ROWS",
    "FEATURES",
    "GROUPS",
    "LABELS",
    "LICENCE",
    "TEMPERATURE_CHANNELS",
    "TRAIN_ROWS",
    "VIBRATION_CHANNELS",
    "SkabFile",
    "SkabScore",
    "hotelling_t2_baseline",
    "load_skab",
    "load_skab_anomaly_free",
    "protocol_split",
    "skab_root",
    "skab_score",
]

LICENCE = (
    "GPL-3.0. SKAB - Skoltech Anomaly Benchmark (waico/SKAB); recordings of a water-circulation test rig. "
    "Read from a local folder, never redistributed with this product."
)

FEATURES: tuple[str, ...] = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
"""The 8 sensor columns, in file order."""

VIBRATION_CHANNELS: tuple[str, ...] = ("Accelerometer1RMS", "Accelerometer2RMS")
"""Vibration: RMS of the two accelerometers (g), one value per second."""

TEMPERATURE_CHANNELS: tuple[str, ...] = ("Temperature", "Thermocouple")
"""Temperature: engine body and circulating fluid (degC)."""

LABELS: tuple[str, ...] = ("anomaly", "changepoint")
"""Label columns of the labelled experiments (0/1 per row)."""

GROUPS: dict[str, int] = {"valve1": 16, "valve2": 4, "other": 14}
"""Folders of labelled experiments, in load order, with the number of files each must hold."""

ANOMALY_FREE_ROWS = 9405
"""Rows of ``anomaly-free/anomaly-free.csv``."""

TRAIN_ROWS = 400
"""Rows at the start of each labelled file that the published protocol fits on."""

_TIME_COLUMN = "datetime"
_LABELLED_HEADER = (_TIME_COLUMN, *FEATURES, *LABELS)
_FREE_HEADER = (_TIME_COLUMN, *FEATURES)
_ENV = "INSPECTION_SKAB_DIR"
_NUMERIC_NAME = re.compile(r"^\d+$")
# T² alarm rule of the published baseline: UCL at this F quantile, alarm above this multiple of the UCL
# after a trailing median over this many rows.
_T2_ALPHA = 0.999
_T2_UCL_FACTOR = 2.0
_T2_MEDIAN_ROWS = 5


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class SkabFile:
    """One SKAB recording (or a contiguous part of one).

    Attributes:
        name: ``"<group>/<number>"`` (e.g. ``"valve1/0"``) or ``"anomaly-free"``; parts made by
            :func:`protocol_split` keep the name of their file.
        times: row timestamps, ``datetime64[s]`` [T], strictly increasing.
        values: sensor readings in :data:`FEATURES` order, float64 [T, 8], read-only. Units: g (accelerometer
            RMS), A, bar, degC, degC, V, l/min.
        anomaly: 0/1 anomaly label per row, int8 [T], or None for unlabelled data.
        changepoint: 0/1 change-point label per row, int8 [T], or None for unlabelled data.
    """

    name: str
    times: np.ndarray
    values: np.ndarray
    anomaly: np.ndarray | None
    changepoint: np.ndarray | None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"SkabFile.name must be a non-empty string; got {self.name!r}")
        times, values = self.times, self.values
        if not isinstance(times, np.ndarray) or times.dtype != np.dtype("datetime64[s]") or times.ndim != 1:
            raise DataError(
                f"{self.name}: times must be a 1-D datetime64[s] array; got "
                f"{getattr(times, 'dtype', type(times).__name__)} with shape {getattr(times, 'shape', None)}"
            )
        rows = times.shape[0]
        if rows == 0:
            raise DataError(f"{self.name}: expected at least one row; got none")
        if rows > 1 and not bool(np.all(times[1:] > times[:-1])):
            raise DataError(
                f"{self.name}: timestamps must be strictly increasing; found a repeat or a step back"
            )
        if (
            not isinstance(values, np.ndarray)
            or values.dtype != np.float64
            or values.shape != (rows, len(FEATURES))
        ):
            raise DataError(
                f"{self.name}: values must be float64 [{rows}, {len(FEATURES)}]; got "
                f"{getattr(values, 'dtype', type(values).__name__)} {getattr(values, 'shape', None)}"
            )
        if not bool(np.isfinite(values).all()):
            raise DataError(f"{self.name}: values must be finite; found NaN or infinity")
        object.__setattr__(self, "times", _read_only(times))
        object.__setattr__(self, "values", _read_only(values))
        for label in LABELS:
            column = getattr(self, label)
            if column is None:
                continue
            if not isinstance(column, np.ndarray) or column.dtype != np.int8 or column.shape != (rows,):
                raise DataError(
                    f"{self.name}: {label} must be int8 [{rows}] or None; got "
                    f"{getattr(column, 'dtype', type(column).__name__)} {getattr(column, 'shape', None)}"
                )
            if not bool(np.isin(column, (0, 1)).all()):
                raise DataError(f"{self.name}: {label} must hold only 0 and 1; found {np.unique(column)}")
            object.__setattr__(self, label, _read_only(column))

    def __len__(self) -> int:
        return int(self.times.shape[0])

    def __repr__(self) -> str:
        labelled = "labelled" if self.anomaly is not None else "unlabelled"
        return f"SkabFile(name={self.name!r}, rows={len(self)}, {labelled})"

    def channels(self, names: Sequence[str] | str) -> np.ndarray:
        """Selected sensor channels, channel-major.

        Args:
            names: column names from :data:`FEATURES` (a single name is accepted too), e.g.
                :data:`VIBRATION_CHANNELS`.

        Returns:
            float64 [len(names), T], read-only.

        Raises:
            ValueError: a name is not one of :data:`FEATURES`.
        """
        wanted = (names,) if isinstance(names, str) else tuple(names)
        if not wanted:
            raise ValueError(f"expected at least one channel name from {FEATURES}; got none")
        unknown = [n for n in wanted if n not in FEATURES]
        if unknown:
            raise ValueError(f"unknown SKAB channel(s) {unknown}; valid names are {FEATURES}")
        index = [FEATURES.index(n) for n in wanted]
        return _read_only(np.ascontiguousarray(self.values[:, index].T))  # [C, T]


@dataclass(frozen=True)
class SkabScore:
    """Pooled confusion counts and the SKAB outlier-detection metrics.

    Attributes:
        tp: anomalous rows predicted anomalous.
        fp: normal rows predicted anomalous.
        tn: normal rows predicted normal.
        fn: anomalous rows predicted normal.
        f1: TP / (TP + (FP + FN) / 2); NaN when there is nothing to score.
        far: false alarm rate FP / (FP + TN), in percent; NaN without normal rows.
        mar: missed alarm rate FN / (FN + TP), in percent; NaN without anomalous rows.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    f1: float
    far: float
    mar: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, tn: int, fn: int) -> SkabScore:
        """The metrics of pooled counts."""
        tp, fp, tn, fn = int(tp), int(fp), int(tn), int(fn)
        nan = float("nan")
        return cls(tp=tp, fp=fp, tn=tn, fn=fn, f1=tp / (tp + (fp + fn) / 2) if tp + fp + fn else nan,
                   far=100.0 * fp / (fp + tn) if fp + tn else nan, mar=100.0 * fn / (fn + tp) if fn + tp else nan)


def skab_root(path: Path | str | None = None) -> Path:
    """Find the SKAB folder.

    Order: ``path`` if given, else ``$INSPECTION_SKAB_DIR`` if set (either must exist; neither falls back),
    else ``<repository root>/../shared/data/skab``, else ``<current directory>/../shared/data/skab``.

    Args:
        path: an explicit SKAB folder (the one holding ``valve1/``, ``valve2/``, ``other/``).

    Returns:
        The folder, resolved.

    Raises:
        DataError: the chosen folder does not exist, or no default location holds one.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_dir():
            raise DataError(
                f"SKAB folder {explicit} (given explicitly) does not exist; pass the folder that holds "
                "valve1/, valve2/, other/ and anomaly-free/"
            )
        return explicit.resolve()
    env = os.environ.get(_ENV)
    if env:
        from_env = Path(env).expanduser()
        if not from_env.is_dir():
            raise DataError(
                f"${_ENV}={env!r} does not exist; point it at the SKAB folder (the one holding "
                "valve1/, valve2/, other/ and anomaly-free/) or unset it"
            )
        return from_env.resolve()
    candidates = [
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "skab",
        Path.cwd() / ".." / "shared" / "data" / "skab",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(dict.fromkeys(str(c.resolve()) for c in candidates))
    raise DataError(
        f"SKAB data not found; looked in {looked}. Put the SKAB folder (valve1/, valve2/, other/, "
        f"anomaly-free/) at one of these places, set ${_ENV}, or pass the folder explicitly."
    )


def _read_csv(path: Path, name: str, header: tuple[str, ...]) -> SkabFile:
    try:
        with path.open("rb") as fh:
            first = fh.readline().decode("utf-8").rstrip("\r\n")
    except OSError as exc:
        raise DataError(f"cannot read SKAB file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"SKAB file {path}: header is not UTF-8 text ({exc})") from exc
    found = tuple(first.split(";"))
    if found != header:
        raise DataError(
            f"SKAB file {path}: expected the ';'-separated header {';'.join(header)!r}; found "
            f"{first!r}. Replace the file with the unchanged copy from the SKAB repository."
        )
    types = {_TIME_COLUMN: pa.timestamp("s")} | {column: pa.float64() for column in header[1:]}
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=";"),
            convert_options=pacsv.ConvertOptions(
                column_types=types, timestamp_parsers=["%Y-%m-%d %H:%M:%S"], strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"SKAB file {path}: cannot parse as ';'-separated numbers under the header "
            f"({exc}). Replace the file with the unchanged copy from the SKAB repository."
        ) from exc
    if tuple(table.column_names) != header:  # pragma: no cover - the header was checked above
        raise DataError(f"SKAB file {path}: expected columns {header}; found {tuple(table.column_names)}")
    for column in header:
        nulls = table.column(column).null_count
        if nulls:
            raise DataError(f"SKAB file {path}: column {column!r} has {nulls} empty cell(s); expected none")
    times = table.column(_TIME_COLUMN).to_numpy().astype("datetime64[s]")
    values = np.column_stack([table.column(c).to_numpy() for c in FEATURES]).astype(np.float64)  # [T, 8]
    labels: dict[str, np.ndarray | None] = {}
    for label in LABELS:
        if label not in header:
            labels[label] = None
            continue
        raw = table.column(label).to_numpy()
        if not bool(np.isin(raw, (0.0, 1.0)).all()):
            raise DataError(
                f"SKAB file {path}: column {label!r} must hold only 0 and 1; found {np.unique(raw)[:10]}"
            )
        labels[label] = raw.astype(np.int8)
    try:
        return SkabFile(name=name, times=times, values=values, **labels)
    except DataError as exc:
        raise DataError(f"SKAB file {path}: {exc}") from exc


def _announce(root: Path) -> None:
    announce_licence("SKAB", f"{LICENCE} Folder: {root}")


def load_skab(root: Path | str | None = None) -> list[SkabFile]:
    """The 34 labelled SKAB experiments.

    Args:
        root: the SKAB folder; see :func:`skab_root` for how it is found when omitted.

    Returns:
        Files ordered by group (``valve1``, ``valve2``, ``other``) and numerically within a group.

    Raises:
        DataError: the folder is missing, a group does not hold the expected number of files, or a file's
            header or contents are not SKAB's.
    """
    base = skab_root(root)
    _announce(base)
    files: list[SkabFile] = []
    for group, expected in GROUPS.items():
        folder = base / group
        paths = sorted(folder.glob("*.csv")) if folder.is_dir() else []
        if len(paths) != expected:
            raise DataError(
                f"SKAB folder {folder}: expected {expected} labelled .csv files; found {len(paths)}. "
                "Restore the unchanged SKAB data folder."
            )
        odd = [p.name for p in paths if not _NUMERIC_NAME.match(p.stem)]
        if odd:
            raise DataError(f"SKAB folder {folder}: expected files named <number>.csv; found {odd}")
        for path in sorted(paths, key=lambda p: int(p.stem)):
            files.append(_read_csv(path, f"{group}/{int(path.stem)}", _LABELLED_HEADER))
    return files


def load_skab_anomaly_free(root: Path | str | None = None) -> SkabFile:
    """SKAB's anomaly-free recording (normal operation, 9,405 rows, no labels).

    Args:
        root: the SKAB folder; see :func:`skab_root` for how it is found when omitted.

    Raises:
        DataError: the file is missing, has the wrong header or row count, or cannot be parsed.
    """
    base = skab_root(root)
    _announce(base)
    path = base / "anomaly-free" / "anomaly-free.csv"
    if not path.is_file():
        raise DataError(f"SKAB anomaly-free file {path} not found; restore the unchanged SKAB data folder")
    free = _read_csv(path, "anomaly-free", _FREE_HEADER)
    if len(free) != ANOMALY_FREE_ROWS:
        raise DataError(
            f"SKAB file {path}: expected {ANOMALY_FREE_ROWS} rows; found {len(free)}. "
            "Restore the unchanged SKAB data folder."
        )
    return free


def _part(file: SkabFile, rows: slice) -> SkabFile:
    return SkabFile(
        name=file.name,
        times=file.times[rows],
        values=file.values[rows],
        anomaly=None if file.anomaly is None else file.anomaly[rows],
        changepoint=None if file.changepoint is None else file.changepoint[rows],
    )


def protocol_split(file: SkabFile, train_rows: int = TRAIN_ROWS) -> tuple[SkabFile, SkabFile]:
    """Split one file as the published protocol does: first ``train_rows`` rows, then the rest, unshuffled.

    Args:
        file: a SKAB recording.
        train_rows: rows of the fitting part; the published protocol uses 400.

    Returns:
        (train part, test part); both are views of ``file`` and keep its name.

    Raises:
        ValueError: ``train_rows`` leaves either part empty.
    """
    if isinstance(train_rows, bool) or not isinstance(train_rows, int | np.integer):
        raise ValueError(f"train_rows must be an integer; got {train_rows!r}")
    if not 0 < train_rows < len(file):
        raise ValueError(
            f"train_rows must be in [1, {len(file) - 1}] for {file.name} ({len(file)} rows); got {train_rows}"
        )
    return _part(file, slice(0, int(train_rows))), _part(file, slice(int(train_rows), None))


def _binary(array: object, what: str) -> np.ndarray:
    flat = np.asarray(array)
    if flat.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of 0/1 per row; got shape {flat.shape}")
    if flat.dtype != np.bool_ and not bool(np.isin(flat, (0, 1)).all()):
        raise ValueError(f"{what} must hold only 0 and 1; found {np.unique(flat)[:10]}")
    return flat.astype(bool)


def skab_score(y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray]) -> SkabScore:
    """Score 0/1 row predictions the SKAB way: counts pooled over all rows of all files, then the metrics.

    Args:
        y_true: per file, the true 0/1 anomaly label of each scored row.
        y_pred: per file, the predicted 0/1 label of each row, aligned with ``y_true``.

    Returns:
        The pooled counts, F1, FAR % and MAR %.

    Raises:
        ValueError: the number of files or the rows of a file differ, or a value is not 0/1.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(
            f"expected as many prediction arrays as label arrays; got {len(y_pred)} predictions "
            f"for {len(y_true)} label arrays"
        )
    tp = fp = tn = fn = 0
    for i, (truth, pred) in enumerate(zip(y_true, y_pred, strict=True)):
        t = _binary(truth, f"y_true[{i}]")
        p = _binary(pred, f"y_pred[{i}]")
        if t.shape != p.shape:
            raise ValueError(
                f"file {i}: expected {t.shape[0]} predictions (one per labelled row); got {p.shape[0]}"
            )
        tp += int(np.count_nonzero(t & p))
        fp += int(np.count_nonzero(~t & p))
        tn += int(np.count_nonzero(~t & ~p))
        fn += int(np.count_nonzero(t & ~p))
    return SkabScore.from_counts(tp, fp, tn, fn)


def hotelling_t2_baseline(file: SkabFile, train_rows: int = TRAIN_ROWS) -> np.ndarray:
    """The leaderboard's Hotelling T² detector, fitted on the first rows of a file; the harness sanity check.

    Fit on the training part: drop channels that are constant there, standardise with its mean and standard
    deviation, invert the covariance of the standardised part (``np.cov``, ddof 1). The control limit is
    UCL = m(n-1)(n+1) / (n(n-m)) · F⁻¹(0.999; m, n-m) for m kept channels and n training rows. Each test row's
    T² is smoothed by a trailing median over 5 rows of the test part; a row alarms when that median exceeds
    2·UCL, and the first 4 test rows (no full window) are 0. Pooled over the 34 labelled files this gives
    F1 0.66, FAR 19.20 %, MAR 42.60 % (published: 0.66 / 19.21 / 42.60).

    Args:
        file: a SKAB recording.
        train_rows: rows of the fitting part (the protocol's 400).

    Returns:
        0/1 predictions for the test part, int8 [T - train_rows].

    Raises:
        ValueError: ``train_rows`` leaves either part empty.
        DataError: fewer training rows than kept channels + 1, or a singular training covariance.
    """
    train, test = protocol_split(file, train_rows)
    fit = train.values  # [n, 8]
    keep = ~np.all(fit == fit[0], axis=0)
    fit, score = fit[:, keep], test.values[:, keep]  # [n, m], [T', m]
    n, m = fit.shape
    if m == 0:
        raise DataError(
            f"{file.name}: every channel is constant over the first {n} rows; T² cannot be fitted"
        )
    if n <= m:
        raise DataError(
            f"{file.name}: T² needs more training rows than channels; got {n} rows for {m} channels"
        )
    mean, std = fit.mean(axis=0), fit.std(axis=0, ddof=1)
    fit_z, score_z = (fit - mean) / std, (score - mean) / std
    try:
        inverse = np.linalg.inv(np.atleast_2d(np.cov(fit_z, rowvar=False)))  # [m, m]
    except np.linalg.LinAlgError as exc:
        raise DataError(
            f"{file.name}: the covariance of the training part is singular; T² cannot be fitted"
        ) from exc
    ucl = m * (n - 1) * (n + 1) / (n * (n - m)) * float(stats.f.ppf(_T2_ALPHA, m, n - m))
    t2 = np.einsum("ij,jk,ik->i", score_z, inverse, score_z)  # [T']
    alarms = np.zeros(t2.shape[0], dtype=np.int8)
    if t2.shape[0] >= _T2_MEDIAN_ROWS:
        smoothed = np.median(np.lib.stride_tricks.sliding_window_view(t2, _T2_MEDIAN_ROWS), axis=1)
        alarms[_T2_MEDIAN_ROWS - 1 :] = smoothed > _T2_UCL_FACTOR * ucl
    return alarms
