"""ELPV from the installed package: counts, labels, the seeded stratified split, real image decoding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from inspection.data.elpv import load_elpv

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def elpv():
    return load_elpv()


def test_count_and_published_label_distribution(elpv):
    assert len(elpv) == 2624
    # {0: 1508, 1/3: 295, 2/3: 106, 1: 715}, as released by Buerhop-Lutz et al.
    assert elpv.grade_counts() == {0: 1508, 1: 295, 2: 106, 3: 715}
    assert Counter(it.cell_type for it in elpv) == {"mono": 1074, "poly": 1550}
    assert sum(it.defective for it in elpv) == 106 + 715


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_disjoint_complete_and_stratified(elpv, seed):
    train, test = elpv.split(seed)
    train_names, test_names = {it.name for it in train}, {it.name for it in test}
    assert not train_names & test_names
    assert len(train_names | test_names) == 2624
    assert len(test) == pytest.approx(656, abs=4)
    whole = Counter((it.grade, it.cell_type) for it in elpv)
    held = Counter((it.grade, it.cell_type) for it in test)
    for stratum, n in whole.items():  # every (probability, type) stratum contributes a quarter, rounded
        assert held[stratum] == round(n * 0.25), stratum


def test_split_is_seeded(elpv):
    a, b = elpv.split(0), elpv.split(0)
    assert [it.name for it in a[1]] == [it.name for it in b[1]]
    assert {it.name for it in elpv.split(1)[1]} != {it.name for it in a[1]}


def test_images_decode_as_300px_gray(elpv):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(elpv), 40, replace=False):
        image = elpv[int(i)].image()
        assert image.shape == (300, 300) and image.dtype == np.uint8
        assert image.std() > 1.0  # a real picture, not a blank


@pytest.mark.slow
def test_every_image_decodes(elpv):
    shapes = Counter(elpv[i].image().shape for i in range(len(elpv)))
    assert shapes == {(300, 300): 2624}
