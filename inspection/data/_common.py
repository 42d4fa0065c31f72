"""Shared helpers of the data sets: cache folder, licence notices, seeded stratified splits."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_announced: set[str] = set()
_lock = threading.Lock()


def cache_dir() -> Path:
    """Folder for fetched data (``$INSPECTION_CACHE``, else ``~/.cache/inspection``); created on demand."""
    root = Path(os.environ.get("INSPECTION_CACHE") or Path.home() / ".cache" / "inspection")
    root.mkdir(parents=True, exist_ok=True)
    return root


def announce_licence(dataset: str, text: str) -> None:
    """Print a data set's licence once per process (to stderr, so piped outputs stay clean)."""
    with _lock:
        if dataset in _announced:
            return
        _announced.add(dataset)
    print(f"[data] {dataset}: {text}", file=sys.stderr)
    log.info("data set %s: %s", dataset, text)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the sorted ids, one per line: what a model card records of the units it was trained on."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def stratified_split(
    strata: Sequence[Hashable], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of item indices; each stratum contributes ``round(n * test_fraction)`` to test.

    Returns:
        (train_indices, test_indices), both sorted, disjoint, covering every item.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups[s].append(i)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for key in sorted(groups, key=repr):
        idx = np.array(groups[key])
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * test_fraction))].tolist())
    test_arr = np.array(sorted(test), dtype=np.int64)
    train_arr = np.setdiff1d(np.arange(len(strata)), test_arr)
    return train_arr, test_arr
