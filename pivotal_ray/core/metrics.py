"""Evaluation metrics: accuracy, and how well learned sample weights separate clean from noisy.

The paper's Table 3 reports the AUC of the learned per-sample weights ``w_j`` against label
cleanliness (``y_obs == y_true``): the probability that a random clean sample gets a higher
weight than a random noisy one, ties counting 1/2. A perfect re-weighting scores 1.0, weights
unrelated to cleanliness 0.5::

    from pivotal_ray.core.metrics import accuracy, weight_auc, boundary_auc
    acc = accuracy(logits, y_true)                        # (n, C) logits or (n,) predictions
    auc = weight_auc(weights, y_obs == y_true)            # paper: random 0.922, RBC 0.958
    near = boundary_auc(weights, y_obs == y_true, margin, frac=0.1)

Inputs may be numpy arrays, lists or torch tensors (moved to the CPU); results are Python floats.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["accuracy", "weight_auc", "boundary_auc"]


def _as_numpy(x: Any, name: str) -> np.ndarray:
    # Duck-typed torch support keeps this module free of a torch import.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like (numpy array, list or torch tensor): {err}") from err


def _vector(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {arr.shape}; pass one value per sample")
    return arr


def _clean_mask(is_clean: Any, n: int) -> np.ndarray:
    mask = _vector(is_clean, "is_clean")
    if mask.shape[0] != n:
        raise ValueError(f"weights has {n} samples but is_clean has {mask.shape[0]}; they must align by sample")
    if mask.dtype != np.bool_:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError("is_clean must be boolean (or 0/1), e.g. `y_obs == y_true`; "
                             f"got values {np.unique(mask)[:5].tolist()}")
        mask = mask.astype(bool)
    return mask


def _finite_weights(weights: Any) -> np.ndarray:
    w = _vector(weights, "weights").astype(np.float64)
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise ValueError(f"weights holds {bad} NaN/inf value(s); the re-weighting diverged or the "
                         "weights were not initialised: fix the training run (lower reweight.meta_lr)")
    return w


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (n,), tied values sharing the mean of their ranks."""
    n = values.shape[0]
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    # A tie group occupies sorted positions [start, end); its ranks are start+1 .. end.
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_vals)) + 1))
    ends = np.concatenate((starts[1:], [n]))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _auc(w: np.ndarray, clean: np.ndarray, where: str) -> float:
    n_clean = int(clean.sum())
    n_noisy = int(clean.shape[0] - n_clean)
    if n_clean == 0 or n_noisy == 0:
        warnings.warn(f"weight AUC undefined{where}: it needs both clean and noisy samples, got "
                      f"{n_clean} clean and {n_noisy} noisy; returning NaN", RuntimeWarning, stacklevel=3)
        return math.nan
    # Mann-Whitney: U = (rank sum of the clean samples) - n_clean (n_clean + 1) / 2 counts the
    # (clean, noisy) pairs where the clean weight is higher, ties counting 1/2 via average ranks.
    u = _average_ranks(w)[clean].sum() - n_clean * (n_clean + 1) / 2.0
    return float(u / (n_clean * n_noisy))


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Fraction of samples whose prediction equals the label.

    Parameters
    ----------
    logits_or_preds : array-like, (n, C) or (n,)
        Class scores (logits or probabilities; the argmax over C is the prediction) or integer
        predicted labels.
    labels : array-like, (n,)
        Integer labels to compare against (the true labels for test accuracy).

    Returns
    -------
    float
        Accuracy in [0, 1].

    Raises
    ------
    ValueError
        On empty input, mismatched lengths or wrong dimensionality.
    """
    scores = _as_numpy(logits_or_preds, "logits_or_preds")
    y = _vector(labels, "labels")
    if scores.ndim == 2:
        preds = scores.argmax(axis=1)
    elif scores.ndim == 1:
        preds = scores
    else:
        raise ValueError(f"logits_or_preds must be (n, C) scores or (n,) predictions, got shape {scores.shape}")
    if preds.shape[0] != y.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {y.shape[0]} labels; they must align by sample")
    if y.shape[0] == 0:
        raise ValueError("accuracy of zero samples is undefined; pass at least one sample")
    return float(np.mean(preds == y))


def weight_auc(weights: Any, is_clean: Any) -> float:
    """AUC of learned per-sample weights against label cleanliness (the paper's Table 3).

    The probability that a uniformly drawn clean sample has a higher weight than a uniformly
    drawn noisy one, ties counting 1/2; computed from average ranks (Mann-Whitney U), so
    ``O(n log n)`` and equal to ``sklearn.metrics.roc_auc_score(is_clean, weights)``.

    Parameters
    ----------
    weights : array-like, (n,)
        Learned weights ``w_j`` (any real scale; only their order matters).
    is_clean : array-like of bool or 0/1, (n,)
        True where the observed label is correct, e.g. ``y_obs == y_true``.

    Returns
    -------
    float
        AUC in [0, 1]; 0.5 means the weights ignore cleanliness. NaN, with a ``RuntimeWarning``
        saying why, when all samples are clean or all are noisy (or there are none): the AUC is
        undefined then, and NaN keeps such a run visible in tables instead of failing it.

    Raises
    ------
    ValueError
        If lengths differ, ``is_clean`` is not boolean, or ``weights`` holds NaN/inf.
    """
    w = _finite_weights(weights)
    return _auc(w, _clean_mask(is_clean, w.shape[0]), "")


def boundary_auc(weights: Any, is_clean: Any, margin: Any, *, frac: float = 0.1) -> float:
    """:func:`weight_auc` restricted to the samples nearest the decision boundary.

    Noisy samples far from the boundary are easy to down-weight; the hard cases are the ones
    the model is unsure about, so this scores the ``ceil(frac * n)`` samples with the smallest
    ``|margin|``.

    Parameters
    ----------
    weights : array-like, (n,)
        Learned weights ``w_j``.
    is_clean : array-like of bool or 0/1, (n,)
        True where the observed label is correct.
    margin : array-like, (n,)
        Distance to the decision boundary, e.g. top-1 minus top-2 softmax probability. Signed
        margins are allowed: the absolute value is used, so 0 is the boundary.
    frac : float, default 0.1
        Fraction in (0, 1] of the samples to keep (at least one). Ties in ``|margin|`` at the
        cut are broken by position, so the result is deterministic.

    Returns
    -------
    float
        AUC on the kept samples; NaN with a ``RuntimeWarning`` when they are all clean or all
        noisy (see :func:`weight_auc`).

    Raises
    ------
    ValueError
        If ``frac`` is outside (0, 1], lengths differ, or any input holds NaN/inf.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac={frac} must be in (0, 1]: the fraction of samples nearest the boundary, e.g. 0.1")
    w = _finite_weights(weights)
    clean = _clean_mask(is_clean, w.shape[0])
    m = _vector(margin, "margin").astype(np.float64)
    if m.shape[0] != w.shape[0]:
        raise ValueError(f"weights has {w.shape[0]} samples but margin has {m.shape[0]}; they must align by sample")
    if not np.isfinite(m).all():
        raise ValueError("margin holds NaN/inf; compute it from finite logits (e.g. top-1 minus top-2 probability)")
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, which ceil makes 4.
    k = min(w.shape[0], max(1, math.ceil(round(frac * w.shape[0], 9))))
    keep = np.argsort(np.abs(m), kind="stable")[:k]
    return _auc(w[keep], clean[keep], f" on the {k} samples nearest the boundary (frac={frac})")
