"""Versioned model store: safetensors weights plus a JSON model card, promotion history and rollback.

Layout of a store rooted at ``<root>``::

    <root>/
        .lock                     fcntl lock: exclusive for writers, shared for readers
        promotions.json           [{"version": ..., "at": ...}, ...], appended on every promotion
        m0001-3fa2c1d0/
            weights.safetensors   the model's state_dict (tensors only, dtypes kept)
            card.json             the model card: the caller's fields plus the store's fields
        adapters/m0001-3fa2c1d0/<line>/   per-line adapters of that version, each line a store of this
                                  layout (:mod:`inspection.adapters`); pruning a version removes its adapters

Version ids are ``m{n:04d}-{sha256[:8]}``: ``n`` counts up across the store's life (it is never reused, even
after pruning) and the suffix is the start of the weights file's SHA-256. Nothing in the store is ever
pickled: weights are safetensors, everything else is JSON.

An artifact is immutable once saved. Its card is written with the weights and never updated: the card
records the config, data, metrics and threshold version the weights were produced with, and changing any of
them means saving a new version. :meth:`ModelStore.load` verifies the weights file against the SHA-256 in the
card before it deserialises a byte, so a tampered or corrupted artifact fails loudly.

Promotion is append-only history. The promoted version is the last entry of ``promotions.json`` whose
version still exists. :meth:`ModelStore.rollback` promotes the entry before it (skipping entries equal to
the current version, and versions that no longer exist) and records that as a new entry, so a rollback is
itself a promotion and a second rollback undoes the first (promote a, promote b, rollback -> a,
rollback -> b). :meth:`ModelStore.promote` and :meth:`ModelStore.rollback` verify the weights' SHA-256
first, and ``promote`` refuses an uncalibrated version, which a service would refuse to serve.

Only writing creates anything: :meth:`ModelStore.save` creates a missing root (as ``ModelStore(root,
create=True)`` does at once), while reading a missing store is an error that names the path. Readers never
write, so a store on a read-only mount serves and lists; writers on it fail with an error saying so.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from inspection.errors import StoreError

#: Format tag written into every card; :meth:`ModelStore.load` refuses any other.
STORE_FORMAT = "inspection.model/1"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
PROMOTIONS_FILE = "promotions.json"
LOCK_FILE = ".lock"
#: Folder of a store that holds the per-line adapters of its versions (``adapters/<version>/<line>/``).
ADAPTERS_DIR = "adapters"
#: Card field naming the calibration of the weights; empty or missing means the version is uncalibrated.
THRESHOLD_VERSION_FIELD = "threshold_version"
#: State-dict key of the model's per-line decision thresholds (NaN until calibrated).
THRESHOLDS_TENSOR = "thresholds"
#: Card fields the store writes itself; a caller's card may not use these keys.
STORE_FIELDS: tuple[str, ...] = (
    "version", "created", "weights_file", "weights_sha256", "weights_bytes", "tensors", "format",
)

_VERSION_RE = re.compile(r"^m(\d{4,})-([0-9a-f]{8})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_HASH_CHUNK_BYTES = 1 << 20
_SAFETENSORS_RESERVED_KEY = "__metadata__"


def state_dict_sha256(path: Path | str) -> str:
    """Hash a weights file.

    Args:
        path: the file, usually a version's ``weights.safetensors``.

    Returns:
        The lower-case hex SHA-256 of the file's bytes.

    Raises:
        StoreError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise StoreError(f"cannot read weights file {path} to hash it: {exc}") from exc
    return digest.hexdigest()


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _freeze(value: Any) -> Any:
    """Deep read-only view of JSON data: objects become mapping proxies, arrays tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """A mutable deep copy of data frozen by :func:`_freeze`."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelVersion:
    """One saved artifact, as the store sees it.

    Attributes:
        version: the version id, ``m{n:04d}-{sha256[:8]}``.
        path: the artifact's directory (holds ``weights.safetensors`` and ``card.json``).
        created: when it was saved, RFC 3339 in UTC (``...Z``).
        sha256: hex SHA-256 of the weights file, as recorded in the card.
        promoted: whether this is the promoted version at the time it was read.
        card: the full model card, read-only (nested objects too).
    """

    version: str
    path: Path
    created: str
    sha256: str
    promoted: bool
    card: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def number(self) -> int:
        """The sequence number ``n`` of the version id."""
        return _version_number(self.version)


def _version_number(version: str) -> int:
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise StoreError(f"not a version id: expected 'm<number>-<8 hex digits>', got {version!r}")
    return int(match.group(1))


def _check_json(value: Any, where: str) -> None:
    """Reject anything that would not survive a strict JSON round trip unchanged, naming where it sits."""
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"card value at {where} is {value!r}, which JSON cannot hold; use null or a number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"card key {key!r} inside {where} must be a str; got {type(key).__name__}")
            _check_json(item, f"{where}.{key}")
        return
    raise StoreError(
        f"card value at {where} is a {type(value).__module__}.{type(value).__qualname__}, which is not "
        "JSON-serialisable; convert it to null, bool, int, float, str, list or dict (e.g. float(x), x.tolist())"
    )


def _check_card(card: object) -> dict[str, Any]:
    if not isinstance(card, Mapping):
        raise StoreError(f"card must be a mapping of str to JSON values; got {type(card).__name__}")
    for key, value in card.items():
        if not isinstance(key, str):
            raise StoreError(f"card key {key!r} must be a str; got {type(key).__name__}")
        if key in STORE_FIELDS:
            raise StoreError(
                f"card key {key!r} is written by the store itself; reserved keys are {', '.join(STORE_FIELDS)}"
            )
        _check_json(value, key)
    return dict(card)


def _prepare_tensors(state_dict: object) -> dict[str, torch.Tensor]:
    """Validate a state_dict and copy it into contiguous, unshared CPU tensors with the original dtypes."""
    if not isinstance(state_dict, Mapping):
        raise StoreError(f"state_dict must be a mapping of str to torch.Tensor; got {type(state_dict).__name__}")
    if not state_dict:
        raise StoreError("state_dict is empty; a model artifact needs at least one tensor")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"state_dict keys must be non-empty str; got {key!r} ({type(key).__name__})")
        if key == _SAFETENSORS_RESERVED_KEY:
            raise StoreError(f"state_dict key {key!r} is reserved by the safetensors format; rename it")
        if not isinstance(value, torch.Tensor):
            raise StoreError(f"state_dict[{key!r}] must be a torch.Tensor; got {type(value).__name__}")
        if value.layout != torch.strided:
            raise StoreError(f"state_dict[{key!r}] has layout {value.layout}; only dense tensors can be saved")
        if value.is_meta:
            raise StoreError(f"state_dict[{key!r}] is on the meta device and holds no data; materialise it first")
        # a fresh copy: contiguous, on the CPU, sharing memory with nothing (safetensors refuses shared storage)
        tensors[key] = value.detach().to(device="cpu", copy=True, memory_format=torch.contiguous_format)
    return tensors


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise StoreError(f"{what} {path} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{what} {path} cannot be read as JSON: {exc}") from exc


#: How many of the newest versions a store keeps by default (besides the promoted one and the rollback target).
DEFAULT_KEEP = 3


class ModelStore:
    """A directory of versioned model artifacts with promotion, rollback and pruning.

    Each artifact is ``<root>/<version>/`` with ``weights.safetensors`` and ``card.json``; see the module
    docstring for the layout and the promotion semantics. Artifacts and their cards are immutable once saved:
    there is no way to edit a card, so a card always describes the weights it was saved with; save a new
    version instead.

    Pruning runs after every :meth:`save` (and on :meth:`prune`): the newest ``keep`` versions stay, and so
    do the promoted version and the rollback target (the version :meth:`rollback` would return to), even
    when they are older. At most ``keep + 2`` artifacts are therefore on disk after a save.

    Writers (save, promote, rollback, prune) hold an exclusive ``fcntl`` lock on ``<root>/.lock``, readers a
    shared one, so several processes may share a store. A save is written into a temporary directory inside
    ``root`` and renamed into place, so a version directory is either complete or absent.

    Readers (load, get, versions, promoted) create and write nothing: they open ``.lock`` read-only, and read
    without it when it is absent (no writer ever ran, and writers only rename complete files into place) or
    cannot be locked in a store this process cannot write (a read-only mount). A missing ``root`` is an
    error for every method but :meth:`save`, so a mistyped path never turns into a new, empty store.

    Args:
        root: the store's directory.
        keep: how many of the newest versions pruning keeps (at least 1), besides the promoted version and
            the rollback target.
        create: create ``root`` (and its parents) now if it is missing, for a writer that reads a store it
            may be about to start (e.g. to see whether a model is there yet). Without it nothing is created
            before the first :meth:`save`.

    Raises:
        StoreError: ``keep`` is not a positive integer, ``root`` is not a directory, or it cannot be created.
    """

    def __init__(self, root: Path | str, keep: int = DEFAULT_KEEP, *, create: bool = False) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise StoreError(f"keep must be an integer >= 1 (how many newest versions to keep); got {keep!r}")
        self.root = Path(root)
        self.keep = keep
        if create:
            self._make_root()
        elif self.root.exists() and not self.root.is_dir():
            raise StoreError(f"model store root {self.root} exists but is not a directory; expected a store directory")

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r}, keep={self.keep})"

    # ------------------------------------------------------------------------------------------------ public

    def save(
        self, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any], *, promote: bool = False
    ) -> ModelVersion:
        """Save a new version, optionally promote it, then prune old versions.

        Args:
            state_dict: the model's ``state_dict()``: str keys, dense tensors of any device and dtype
                (float16, bfloat16 and integer buffers included). Tensors are copied to contiguous CPU
                memory; shared and non-contiguous tensors are fine.
            card: the model card (config, data, metrics, threshold version, ...): JSON values only, and none
                of the keys in :data:`STORE_FIELDS`, which the store adds.
            promote: promote the new version once it is saved. Unlike :meth:`promote` this does not require a
                calibrated version: training promotes its model before ``inspection calibrate`` saves the
                calibrated one.

        Returns:
            The saved version.

        Raises:
            StoreError: a key or value of ``state_dict`` or ``card`` is invalid (the message names it), the
                store is read-only, or the artifact cannot be written.
        """
        card_fields = _check_card(card)
        tensors = _prepare_tensors(state_dict)
        self._make_root()
        with self._lock(exclusive=True, action="save a new version"):
            tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                tmp.mkdir()
                weights_path = tmp / WEIGHTS_FILE
                try:
                    save_file(tensors, weights_path, metadata={"format": "pt"})
                except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
                    raise StoreError(f"cannot serialise the state_dict to safetensors: {exc}") from exc
                sha = state_dict_sha256(weights_path)
                history = self._read_promotions()
                numbers = [_version_number(v) for v in self._version_dirs()]
                numbers += [_version_number(e["version"]) for e in history if _VERSION_RE.fullmatch(e["version"])]
                version = f"m{max(numbers, default=0) + 1:04d}-{sha[:8]}"
                full_card = {
                    **card_fields,
                    "version": version,
                    "created": _utc_now(),
                    "weights_file": WEIGHTS_FILE,
                    "weights_sha256": sha,
                    "weights_bytes": weights_path.stat().st_size,
                    "tensors": len(tensors),
                    "format": STORE_FORMAT,
                }
                _write_json(tmp / CARD_FILE, full_card)
                _fsync_dir(tmp)
                os.rename(tmp, self.root / version)
                _fsync_dir(self.root)
            except OSError as exc:
                raise StoreError(f"cannot write a new version into {self.root}: {exc}") from exc
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            if promote:
                self._promote_locked(version)
            self._prune_locked()
            return self._get_locked(version)

    def load(
        self, version: str | None = None, *, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Verify and load a version's weights and card.

        The weights file's SHA-256 and size are checked against the card before the file is deserialised.

        Args:
            version: the version id; ``None`` loads the promoted version.
            device: where to place the loaded tensors.

        Returns:
            ``(state_dict, card)``: the tensors, with the dtypes they were saved with, and a mutable copy of
            the card.

        Raises:
            StoreError: the store does not exist, nothing is promoted (for ``version=None``), the version is
                unknown, the card's format is not :data:`STORE_FORMAT`, or the weights are tampered or corrupted.
        """
        with self._lock(exclusive=False):
            if version is None:
                current = self._current_locked()
                if current is None:
                    raise StoreError(
                        f"no version of the model store {self.root} is promoted; promote one with "
                        f"ModelStore.promote(version) or save(..., promote=True) (known versions: "
                        f"{self._known_list()})"
                    )
                version = current
            entry = self._get_locked(version)
            card = entry.card
            weights_path = self._verify_weights_locked(
                entry, "restore the file or save the model again as a new version"
            )
            try:
                state_dict = load_file(weights_path, device=str(device))
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise StoreError(f"cannot load weights file {weights_path} of version {version}: {exc}") from exc
        if len(state_dict) != card["tensors"]:
            raise StoreError(
                f"weights file {weights_path} holds {len(state_dict)} tensors; its card says {card['tensors']}"
            )
        return state_dict, _thaw(card)

    def versions(self) -> list[ModelVersion]:
        """All versions on disk, oldest first.

        Raises:
            StoreError: the store does not exist or cannot be read.
        """
        with self._lock(exclusive=False):
            current = self._current_locked()
            return [self._read_version(v, promoted=v == current) for v in self._version_dirs()]

    def get(self, version: str) -> ModelVersion:
        """One version.

        Raises:
            StoreError: the store does not exist, or the version is not in it (the message lists the known ones).
        """
        with self._lock(exclusive=False):
            return self._get_locked(version)

    def promoted(self) -> ModelVersion | None:
        """The promoted version, or ``None`` when nothing (still existing) was ever promoted.

        Raises:
            StoreError: the store does not exist or cannot be read.
        """
        with self._lock(exclusive=False):
            current = self._current_locked()
            return None if current is None else self._read_version(current, promoted=True)

    def promote(self, version: str) -> ModelVersion:
        """Make ``version`` the promoted one, appending it to the promotion history.

        The version's weights are verified against the SHA-256 in its card, and it must be calibrated: its
        card names a ``threshold_version`` and its ``thresholds`` tensor, if it has one, is finite. A
        service refuses an uncalibrated model, so promoting one would fail every running service's hot
        reload. Promoting the version that is already promoted changes nothing.

        Raises:
            StoreError: the store does not exist or is read-only, the version is not in it, its weights are
                tampered or corrupted, or it is not calibrated.
        """
        with self._lock(exclusive=True, action=f"promote {version}"):
            entry = self._get_locked(version)
            weights_path = self._verify_weights_locked(
                entry, "refusing to promote it; restore the file or save the model again as a new version"
            )
            self._check_calibrated_locked(entry, weights_path)
            self._promote_locked(version)
            return self._get_locked(version)

    def rollback(self) -> ModelVersion:
        """Promote the previously promoted version again.

        The target is the latest history entry before the current one that names a different, still
        existing version. The rollback is recorded as a new promotion, so rolling back twice returns to the
        version promoted before the first rollback. The target's weights are verified against the SHA-256 in
        its card first.

        Raises:
            StoreError: the store does not exist or is read-only, nothing is promoted, no earlier, different
                version was ever promoted, or the target's weights are tampered or corrupted.
        """
        with self._lock(exclusive=True, action="roll back"):
            current = self._current_locked()
            if current is None:
                raise StoreError(f"cannot roll back: no version of the model store {self.root} is promoted")
            target = self._rollback_target_locked()
            if target is None:
                raise StoreError(
                    f"cannot roll back from {current}: no other existing version was promoted before it "
                    f"(known versions: {self._known_list()}); promote one explicitly with ModelStore.promote"
                )
            self._verify_weights_locked(
                self._get_locked(target),
                f"refusing to roll back to it from {current}; restore the file, or promote another version",
            )
            self._promote_locked(target)
            return self._get_locked(target)

    def prune(self) -> list[str]:
        """Delete old versions now (as after every save), plus leftovers of interrupted saves.

        Returns:
            The deleted version ids, oldest first.

        Raises:
            StoreError: the store does not exist or is read-only.
        """
        with self._lock(exclusive=True, action="prune old versions"):
            return self._prune_locked()

    # ----------------------------------------------------------------------------------------------- private

    def _make_root(self) -> None:
        if self.root.is_dir():
            return
        if self.root.exists():
            raise StoreError(f"model store root {self.root} exists but is not a directory; expected a store directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create model store directory {self.root}: {exc}") from exc

    def _require_root(self) -> None:
        if self.root.is_dir():
            return
        if self.root.exists():
            raise StoreError(f"model store root {self.root} exists but is not a directory; expected a store directory")
        raise StoreError(
            f"model store {self.root} does not exist; expected a store directory written by `inspection train` "
            "(or ModelStore.save). Check the path (--store, or model.store in the service config); nothing was "
            "created"
        )

    def _writable(self) -> bool:
        kwargs = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
        return os.access(self.root, os.W_OK | os.X_OK, **kwargs)

    def _read_only_error(self, action: str, detail: str = "not writable by this process") -> StoreError:
        return StoreError(
            f"model store {self.root} is read-only ({detail}): cannot {action}. Reading it (serving, "
            "`inspection models list`) works; to change it, run against a writable copy of the store or "
            "mount it read-write"
        )

    @contextmanager
    def _lock(self, *, exclusive: bool, action: str = "read it") -> Iterator[None]:
        """Hold the store's lock: exclusive for writers, shared for readers, which open nothing for writing."""
        self._require_root()
        path = self.root / LOCK_FILE
        fd: int | None
        if exclusive:
            if not self._writable():
                raise self._read_only_error(action)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise self._read_only_error(action, f"{path}: {exc.strerror}") from exc
                raise StoreError(f"cannot open the lock file {path} of model store {self.root}: {exc}") from exc
        else:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None  # no writer ever ran here (each creates the lock first); read unlocked, create nothing
            except OSError as exc:
                if self._writable():
                    raise StoreError(
                        f"cannot open the lock file {path} of model store {self.root} for reading: {exc}; make "
                        "it readable by this process"
                    ) from exc
                fd = None  # a store we cannot write: no writer of ours can run, read unlocked
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                except OSError as exc:
                    if exclusive or self._writable():
                        raise StoreError(f"cannot lock {path} of model store {self.root}: {exc}") from exc
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the lock

    def _verify_weights_locked(self, entry: ModelVersion, what_next: str) -> Path:
        """Check a version's weights file against the size and SHA-256 in its card; return its path."""
        card = entry.card
        weights_path = entry.path / card["weights_file"]
        expected_bytes = card["weights_bytes"]
        try:
            actual_bytes = weights_path.stat().st_size
        except OSError as exc:
            raise StoreError(
                f"weights file {weights_path} of version {entry.version} cannot be read: {exc}; {what_next}"
            ) from exc
        actual = state_dict_sha256(weights_path)
        if actual != entry.sha256 or actual_bytes != expected_bytes:
            raise StoreError(
                f"weights file {weights_path} of version {entry.version} is tampered or corrupted: expected sha256 "
                f"{entry.sha256} ({expected_bytes} bytes), found sha256 {actual} ({actual_bytes} bytes); "
                f"{what_next}"
            )
        return weights_path

    def _check_calibrated_locked(self, entry: ModelVersion, weights_path: Path) -> None:
        """Refuse a version a service would refuse: no threshold version in its card, or non-finite thresholds."""
        what_next = (
            f"run `inspection calibrate` on it first (it saves and promotes a calibrated version); a service "
            f"refuses an uncalibrated model, so promoting {entry.version} would fail every running service's "
            "hot reload"
        )
        threshold_version = entry.card.get(THRESHOLD_VERSION_FIELD)
        if threshold_version is None or threshold_version == "":
            raise StoreError(
                f"version {entry.version} in {self.root} is not calibrated: its card has {THRESHOLD_VERSION_FIELD} "
                f"{threshold_version!r}, expected the version of its calibration; {what_next}"
            )
        try:
            with safe_open(weights_path, framework="pt") as weights:
                names = set(weights.keys())
                thresholds = weights.get_tensor(THRESHOLDS_TENSOR) if THRESHOLDS_TENSOR in names else None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise StoreError(f"cannot read {THRESHOLDS_TENSOR!r} from weights file {weights_path}: {exc}") from exc
        if thresholds is not None and not bool(torch.isfinite(thresholds).all()):
            bad = int((~torch.isfinite(thresholds)).sum())
            raise StoreError(
                f"version {entry.version} in {self.root} is not calibrated: {bad} of {thresholds.numel()} values "
                f"of its {THRESHOLDS_TENSOR!r} tensor are NaN or infinite (expected all finite; its card names "
                f"{THRESHOLD_VERSION_FIELD} {threshold_version!r}); {what_next}"
            )

    def _version_dirs(self) -> list[str]:
        """Version ids on disk, ordered by their sequence number (oldest first)."""
        try:
            names = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name)]
        except OSError as exc:
            raise StoreError(f"cannot list model store {self.root}: {exc}") from exc
        return sorted(names, key=_version_number)

    def _known_list(self) -> str:
        known = self._version_dirs()
        return ", ".join(known) if known else "none; the store is empty"

    def _read_version(self, version: str, *, promoted: bool) -> ModelVersion:
        path = self.root / version
        card_path = path / CARD_FILE
        card = _read_json(card_path, f"card of version {version}")
        if not isinstance(card, dict):
            raise StoreError(f"card {card_path} must hold a JSON object; found {type(card).__name__}")
        if card.get("format") != STORE_FORMAT:
            raise StoreError(
                f"card {card_path} has format {card.get('format')!r}; this store reads {STORE_FORMAT!r} only"
            )
        if card.get("version") != version:
            raise StoreError(f"card {card_path} names version {card.get('version')!r}; its directory is {version}")
        sha = card.get("weights_sha256")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise StoreError(f"card {card_path} has weights_sha256 {sha!r}; expected 64 lower-case hex digits")
        if card.get("weights_file") != WEIGHTS_FILE:
            raise StoreError(
                f"card {card_path} names weights file {card.get('weights_file')!r}; expected {WEIGHTS_FILE!r}"
            )
        for key in ("weights_bytes", "tensors"):
            if isinstance(card.get(key), bool) or not isinstance(card.get(key), int) or card[key] < 0:
                raise StoreError(f"card {card_path} has {key} {card.get(key)!r}; expected a non-negative integer")
        created = card.get("created")
        if not isinstance(created, str):
            raise StoreError(f"card {card_path} has created {created!r}; expected an RFC 3339 UTC timestamp")
        return ModelVersion(
            version=version, path=path, created=created, sha256=sha, promoted=promoted, card=_freeze(card)
        )

    def _get_locked(self, version: str) -> ModelVersion:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or not (self.root / version).is_dir():
            raise StoreError(f"unknown model version {version!r} in {self.root}; known versions: {self._known_list()}")
        return self._read_version(version, promoted=version == self._current_locked())

    def _read_promotions(self) -> list[dict[str, str]]:
        path = self.root / PROMOTIONS_FILE
        if not path.exists():
            return []
        history = _read_json(path, "promotion history")
        if not isinstance(history, list) or not all(
            isinstance(e, dict) and isinstance(e.get("version"), str) and isinstance(e.get("at"), str)
            for e in history
        ):
            raise StoreError(
                f"promotion history {path} must be a JSON list of {{\"version\": str, \"at\": str}} objects"
            )
        return history

    def _current_index(self, history: list[dict[str, str]], existing: set[str]) -> int | None:
        for i in range(len(history) - 1, -1, -1):
            if history[i]["version"] in existing:
                return i
        return None

    def _current_locked(self) -> str | None:
        history = self._read_promotions()
        index = self._current_index(history, set(self._version_dirs()))
        return None if index is None else history[index]["version"]

    def _rollback_target_locked(self) -> str | None:
        history = self._read_promotions()
        existing = set(self._version_dirs())
        index = self._current_index(history, existing)
        if index is None:
            return None
        current = history[index]["version"]
        for entry in reversed(history[:index]):
            if entry["version"] != current and entry["version"] in existing:
                return entry["version"]
        return None

    def _promote_locked(self, version: str) -> None:
        if self._current_locked() == version:
            return
        history = self._read_promotions()
        history.append({"version": version, "at": _utc_now()})
        path = self.root / PROMOTIONS_FILE
        tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}.json"
        try:
            _write_json(tmp, history)
            os.replace(tmp, path)
            _fsync_dir(self.root)
        except OSError as exc:
            raise StoreError(f"cannot record the promotion of {version} in {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _prune_locked(self) -> list[str]:
        # leftovers of interrupted saves: no writer is active while we hold the exclusive lock
        for leftover in self.root.iterdir():
            if leftover.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        versions = self._version_dirs()
        protected = set(versions[-self.keep:])
        protected.update(v for v in (self._current_locked(), self._rollback_target_locked()) if v is not None)
        removed = [v for v in versions if v not in protected]
        for version in removed:
            trash = self.root / f"{_TRASH_PREFIX}{version}-{uuid.uuid4().hex}"
            try:
                os.rename(self.root / version, trash)  # the version disappears atomically for readers
            except OSError as exc:
                raise StoreError(f"cannot remove old version {version} from {self.root}: {exc}") from exc
            shutil.rmtree(trash, ignore_errors=True)
            adapters = self.root / ADAPTERS_DIR / version  # adapters fit their base version only
            if adapters.is_dir():
                trash = self.root / f"{_TRASH_PREFIX}{ADAPTERS_DIR}-{version}-{uuid.uuid4().hex}"
                try:
                    os.rename(adapters, trash)
                except OSError as exc:
                    raise StoreError(f"cannot remove the adapters of old version {version}: {exc}") from exc
                shutil.rmtree(trash, ignore_errors=True)
        return removed
