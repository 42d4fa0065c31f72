"""ELPV: 2,624 electroluminescence images of solar cells (300x300, 8-bit gray) with a defect probability.

The images come from the ``elpv-dataset`` package (installed with the project, read in place). Labels are the
experts' defect probability p in {0, 1/3, 2/3, 1} and the cell type (``mono``/``poly``); a cell counts as
defective when p >= 0.5 (the protocol of Deitsch et al. 2019). Licence: CC BY-NC-SA 4.0, non-commercial use.
"""

from __future__ import annotations

import importlib.resources
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspection.data._common import announce_licence, stratified_split
from inspection.errors import DataError

LICENCE = (
    "ELPV solar-cell images (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), CC BY-NC-SA 4.0 - "
    "non-commercial use only; read from the installed elpv-dataset package, never redistributed."
)
N_IMAGES = 2624
#: Expected count per grade (p = grade / 3) of the released labels.
GRADE_COUNTS = {0: 1508, 1: 295, 2: 106, 3: 715}
CELL_TYPES = ("mono", "poly")
DEFECT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ElpvItem:
    """One labelled cell image.

    Attributes:
        index: position in the label file (0-based).
        name: image file stem, e.g. ``cell0001``.
        path: the PNG file inside the installed package.
        probability: expert defect probability in {0, 1/3, 2/3, 1}.
        cell_type: ``mono`` or ``poly``.
    """

    index: int
    name: str
    path: Path
    probability: float
    cell_type: str

    @property
    def grade(self) -> int:
        """The probability as an integer class 0..3 (p = grade / 3)."""
        return int(round(self.probability * 3))

    @property
    def defective(self) -> bool:
        return self.probability >= DEFECT_THRESHOLD

    def read_bytes(self) -> bytes:
        """The PNG file's bytes, unchanged."""
        return self.path.read_bytes()

    def image(self) -> np.ndarray:
        """Decoded pixels ``[300, 300]`` uint8 (as packaged)."""
        from inspection.codec import CodecLimits, decode_image
        from inspection.records import sniff_image_type

        data = self.read_bytes()
        return decode_image(data, sniff_image_type(data) or "image/png", CodecLimits())


@dataclass(frozen=True)
class ElpvDataset:
    """The full labelled set, in label-file order."""

    items: tuple[ElpvItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ElpvItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> ElpvItem:
        return self.items[i]

    def grade_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(it.grade for it in self.items).items()))

    def split(self, seed: int, test_fraction: float = 0.25) -> tuple[tuple[ElpvItem, ...], tuple[ElpvItem, ...]]:
        """Seeded split stratified on (probability, cell type); returns (train, test)."""
        strata = [(it.grade, it.cell_type) for it in self.items]
        train, test = stratified_split(strata, test_fraction, seed)
        return tuple(self.items[i] for i in train), tuple(self.items[i] for i in test)


def _package_root() -> Path:
    try:
        root = importlib.resources.files("elpv_dataset") / "data"
    except ModuleNotFoundError as exc:
        raise DataError(
            "the elpv-dataset package is not installed; run `make install` (or pip install elpv-dataset==1.0.0.post1)"
        ) from exc
    return Path(str(root))


def load_elpv(root: Path | str | None = None) -> ElpvDataset:
    """Read the ELPV labels (and image paths) from the installed package, or from ``root`` /
    ``$INSPECTION_ELPV_DIR`` (a folder with labels.csv and the images it lists, e.g. a resized copy).

    Raises:
        DataError: when the labels or any image is missing, or a label is outside the published values.
    """
    if root is None and os.environ.get("INSPECTION_ELPV_DIR"):
        root = os.environ["INSPECTION_ELPV_DIR"]
    root = Path(root) if root is not None else _package_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV labels not found at {labels}; reinstall elpv-dataset or pass the folder holding labels.csv")
    announce_licence("elpv", LICENCE)
    items = []
    for i, line in enumerate(labels.read_text().splitlines()):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise DataError(f"{labels}:{i + 1}: expected 'path probability type', found {line!r}")
        rel, prob_text, cell_type = parts
        prob = float(prob_text)
        if not any(abs(prob - g / 3) < 1e-6 for g in range(4)) or cell_type not in CELL_TYPES:
            raise DataError(f"{labels}:{i + 1}: probability {prob_text} / type {cell_type!r} outside the published values")
        path = root / rel
        if not path.is_file():
            raise DataError(f"ELPV image {path} listed in {labels} is missing")
        items.append(ElpvItem(len(items), Path(rel).stem, path, round(prob * 3) / 3, cell_type))
    return ElpvDataset(tuple(items))
