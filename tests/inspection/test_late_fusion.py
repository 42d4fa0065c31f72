"""Late fusion of single-modality models, as the composite benchmark and the demo compute it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inspection.evaluation import late_fusion_score, logit, margin


def test_margin_is_the_log_odds_distance_above_the_models_own_threshold():
    # p = 0.8 over a threshold of 0.5: log(4) - 0; p = 0.2 under a threshold of 0.2: exactly 0
    np.testing.assert_allclose(margin(np.array([0.8, 0.2]), np.array([0.5, 0.2])), [math.log(4.0), 0.0], atol=1e-12)
    assert margin(np.array([0.3]), 0.6)[0] < 0  # under its threshold: an ok decision
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()  # clipped, never infinite


def test_late_fusion_takes_the_largest_margin_of_the_modalities_a_unit_has():
    margins = np.array([[0.5, -1.0, 2.0],
                        [np.nan, -0.3, -2.0],  # no image: the other two decide
                        [-4.0, np.nan, np.nan]])  # only an image
    np.testing.assert_array_equal(late_fusion_score(margins), [2.0, -0.3, -4.0])


def test_a_unit_without_any_modality_has_no_late_fusion_score():
    with pytest.warns(RuntimeWarning):
        assert np.isnan(late_fusion_score(np.full((1, 3), np.nan))[0])
