"""core/metrics.py: accuracy and the AUC of learned weights against label cleanliness."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from pivotal_ray.core.metrics import accuracy, boundary_auc, weight_auc


def _pairwise_auc(w: np.ndarray, clean: np.ndarray) -> float:
    """The definition, O(n^2): P(w_clean > w_noisy) + 1/2 P(tie)."""
    score = [1.0 if a > b else 0.5 if a == b else 0.0
             for a, b in itertools.product(w[clean], w[~clean])]
    return float(np.mean(score))


# Weights on a grid, often from a handful of values, so that ties are common (and an affine map
# cannot merge two distinct weights through rounding); both classes present.
labelled = st.integers(min_value=2, max_value=60).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) | st.integers(0, 1000).map(lambda i: i / 1000),
             min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda c: 0 < sum(c) < len(c)),
))


# ---------------------------------------------------------------- accuracy


def test_accuracy_from_logits_and_from_predictions() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])  # argmax 0,1,2,0
    labels = np.array([0, 1, 1, 1])
    assert accuracy(logits, labels) == 0.5
    assert accuracy(np.array([0, 1, 2, 0]), labels) == 0.5
    assert accuracy(torch.tensor(logits), torch.tensor(labels)) == 0.5
    assert isinstance(accuracy(logits, labels), float)


@pytest.mark.parametrize("preds, labels, match", [
    (np.zeros((3, 2)), np.zeros(4, dtype=int), "align"),
    (np.zeros((0, 2)), np.zeros(0, dtype=int), "zero samples"),
    (np.zeros((2, 2, 2)), np.zeros(2, dtype=int), "shape"),
    (np.zeros(2), np.zeros((2, 1), dtype=int), "1-D"),
])
def test_accuracy_rejects_bad_input(preds, labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        accuracy(preds, labels)


# ---------------------------------------------------------------- weight_auc


@settings(max_examples=80, deadline=None)
@given(labelled)
def test_weight_auc_matches_sklearn_and_the_definition(data) -> None:
    w, clean = np.array(data[0]), np.array(data[1])
    got = weight_auc(w, clean)
    assert got == pytest.approx(roc_auc_score(clean, w), abs=1e-12)
    assert got == pytest.approx(_pairwise_auc(w, clean), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(labelled)
def test_weight_auc_ignores_the_weight_scale_and_flips_with_the_labels(data) -> None:
    w, clean = np.array(data[0]), np.array(data[1])
    auc = weight_auc(w, clean)
    assert weight_auc(3.0 * w - 7.0, clean) == pytest.approx(auc, abs=1e-12)  # order is all that counts
    assert weight_auc(w, ~clean) == pytest.approx(1.0 - auc, abs=1e-12)


def test_weight_auc_known_values() -> None:
    clean = np.array([True, True, False, False])
    assert weight_auc([0.9, 0.8, 0.1, 0.2], clean) == 1.0
    assert weight_auc([0.1, 0.2, 0.9, 0.8], clean) == 0.0
    assert weight_auc([1.0, 1.0, 1.0, 1.0], clean) == 0.5  # all tied: every pair counts 1/2
    assert weight_auc([1.0, 0.0, 0.0, 0.0], clean) == 0.75  # pairs: (1>0, 1>0, tie, tie)
    assert weight_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0


@pytest.mark.parametrize("clean", [[True, True, True], [False, False, False], []])
def test_weight_auc_is_nan_with_a_reason_when_a_class_is_absent(clean: list[bool]) -> None:
    with pytest.warns(RuntimeWarning, match="needs both clean and noisy"):
        assert math.isnan(weight_auc(np.linspace(0, 1, len(clean)), np.array(clean, dtype=bool)))


@pytest.mark.parametrize("weights, clean, match", [
    ([0.1, np.nan], [True, False], "NaN/inf"),
    ([0.1, 0.2], [True, False, True], "align"),
    ([0.1, 0.2], [2, 0], "boolean"),
    ([[0.1, 0.2]], [True, False], "1-D"),
])
def test_weight_auc_rejects_bad_input(weights, clean, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weight_auc(np.array(weights), np.array(clean))


# ---------------------------------------------------------------- boundary_auc


@settings(max_examples=40, deadline=None)
@given(labelled, st.floats(0.05, 1.0), st.data())
def test_boundary_auc_is_weight_auc_on_the_smallest_margins(data, frac: float, draw) -> None:
    w, clean = np.array(data[0]), np.array(data[1])
    n = len(w)
    margin = np.array(draw.draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
    k = max(1, math.ceil(round(frac * n, 9)))
    keep = np.argsort(np.abs(margin), kind="stable")[:k]
    if 0 < clean[keep].sum() < k:
        assert boundary_auc(w, clean, margin, frac=frac) == pytest.approx(roc_auc_score(clean[keep], w[keep]))
    else:
        with pytest.warns(RuntimeWarning, match="nearest the boundary"):
            assert math.isnan(boundary_auc(w, clean, margin, frac=frac))


def test_boundary_auc_picks_the_samples_near_the_boundary() -> None:
    # Far from the boundary (|margin| 0.9) the weights separate perfectly; near it they are
    # inverted: the near half scores 0.0 while all four score 0.75 (3 of 4 pairs ordered).
    w = np.array([0.9, 0.1, 0.2, 0.8])
    clean = np.array([True, False, True, False])
    margin = np.array([0.9, -0.9, 0.05, -0.01])
    assert boundary_auc(w, clean, margin, frac=0.5) == 0.0
    assert boundary_auc(w, clean, margin, frac=1.0) == weight_auc(w, clean) == 0.75
    # 0.1 * 30 is 3.0000000000000004 in floating point: the cut must still be 3 samples.
    w30 = np.r_[1.0, 0.0, 0.0, np.zeros(27)]
    clean30 = np.r_[True, False, False, np.ones(27, dtype=bool)]
    margin30 = np.r_[0.0, 0.1, 0.2, np.full(27, 0.9)]
    assert boundary_auc(w30, clean30, margin30, frac=0.1) == 1.0  # a 4th sample (tied 0.0, clean) would give 0.75
    # (0.1 * 30 is in fact exactly 3.0; 0.07 * 100 is 7.000000000000001, which ceil alone makes 8)
    assert 0.07 * 100 > 7
    w100 = np.r_[1.0, np.zeros(99)]
    clean100 = np.r_[True, np.zeros(6, dtype=bool), np.ones(93, dtype=bool)]  # the 8th nearest is clean, weight 0
    margin100 = np.arange(100) / 100
    assert boundary_auc(w100, clean100, margin100, frac=0.07) == 1.0  # 8 samples would give 0.75


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5])
def test_boundary_auc_rejects_bad_frac(frac: float) -> None:
    with pytest.raises(ValueError, match=r"frac=.* must be in \(0, 1\]"):
        boundary_auc([0.1, 0.2], [True, False], [0.1, 0.2], frac=frac)


def test_boundary_auc_rejects_misaligned_or_nonfinite_margin() -> None:
    with pytest.raises(ValueError, match="align"):
        boundary_auc([0.1, 0.2], [True, False], [0.1], frac=0.5)
    with pytest.raises(ValueError, match="margin holds NaN"):
        boundary_auc([0.1, 0.2], [True, False], [0.1, np.inf], frac=0.5)
