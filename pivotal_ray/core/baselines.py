"""Ray-free maths of the baseline selectors (spec section 6); the selectors live in ``selectors.py``.

- ``random_balanced``: :func:`balanced_random`, equal numbers per class by the OBSERVED label.
- ``uncertain`` / ``certain``: :func:`predictive_entropy` of the best-validation snapshot and
  :func:`rank_by_entropy` (highest / lowest first; ties by the smaller sample_id); the
  entropies come from the feature-extraction stage's actors (:class:`PredictionExtractor`,
  registered as the ``predictions`` extractor), read back with :func:`read_predictions`.
- ``craig`` (Mirzasoleiman, Bilmes & Leskovec 2020): facility location
  ``F(S) = sum_{u in U} max_{s in S} sim(u, s)`` maximised greedily over the candidates,
  :func:`facility_location_greedy` (lazy greedy, the same picks as plain greedy), on last-layer
  gradient features with ``sim(u, v) = C_max - ||G_u - G_v||`` (:func:`craig_similarity`).

Every function returns exactly k distinct candidates or raises naming the fix.

Example::

    ids = balanced_random(cand_ids, y_obs, k=10, num_classes=10, seed=0)   # one per class
    pick = rank_by_entropy(cand_ids, predictive_entropy(probs), k=5, highest=True)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from .features import EXTRACTORS
from .featuretable import DenseFeatures, FactorFeatures, parquet_files, read_rows
from .seeding import numpy_rng

if TYPE_CHECKING:
    from .data import Split

__all__ = [
    "balanced_quotas", "balanced_random", "predict_probs", "predictive_entropy", "rank_by_entropy", "top2_margin",
    "PredictionExtractor", "Predictions", "read_predictions",
    "craig_similarity", "facility_location_greedy", "CraigPicks", "select_craig",
]


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k} must be a positive int")
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} {what}: lower the budget")


def _ids(sample_id: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(sample_id, dtype=np.int64)
    if ids.ndim != 1 or np.unique(ids).size != ids.size:
        raise ValueError("sample_id must be a 1-D array of distinct ids (the candidates)")
    return ids


# ---------------------------------------------------------------------------------------------
# random_balanced
# ---------------------------------------------------------------------------------------------


def balanced_quotas(available: np.ndarray, *, k: int, priority: np.ndarray) -> np.ndarray:
    """How many to draw per class: as equal as the class sizes allow, summing to k.

    Water-filling: the largest level L with ``sum_c min(n_c, L) <= k`` gives every class
    ``min(n_c, L)``; the ``r < #{c: n_c > L}`` left over go one each to the classes with
    ``n_c > L``, first in ``priority`` order. A class with too few candidates gives its shortfall
    to the others, so the total is always k.

    Parameters
    ----------
    available : (C,) int, candidates per class
    k : total, at most ``available.sum()``
    priority : (C,) a permutation of the classes (who gets the remainder first)

    Returns
    -------
    (C,) int64 quotas, ``0 <= q_c <= n_c``, ``sum q = k``, ``max q - min q <= 1`` among classes not at capacity
    """
    n = np.asarray(available, dtype=np.int64)
    _check_k(k, int(n.sum()), "candidates")
    lo, hi = 0, int(n.max())
    while lo < hi:  # largest L with sum min(n, L) <= k
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(n, mid).sum() <= k else (lo, mid - 1)
    q = np.minimum(n, lo)
    left = k - int(q.sum())
    for c in np.asarray(priority, dtype=np.int64):
        if left == 0:
            break
        if n[c] > lo:
            q[c] += 1
            left -= 1
    return q


def balanced_random(sample_id: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, *, k: int,
                    num_classes: int, seed: int) -> np.ndarray:
    """k candidates, equally many per class by ``labels`` (the OBSERVED, possibly noisy, labels).

    The remainder ``k mod C`` goes to classes in a seeded random order; within a class the draw is
    uniform without replacement. Deterministic in (candidates, labels, k, seed).

    Returns
    -------
    (k,) int64 distinct sample ids, sorted
    """
    ids = _ids(sample_id)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != ids.shape or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be (n,) = {ids.shape} class indices in [0, {num_classes})")
    rng = numpy_rng(seed, "random_balanced")
    order = np.argsort(ids, kind="stable")  # input order must not matter
    ids, y = ids[order], y[order]
    q = balanced_quotas(np.bincount(y, minlength=num_classes), k=k, priority=rng.permutation(num_classes))
    picks = [rng.choice(ids[y == c], size=int(q[c]), replace=False) for c in range(num_classes) if q[c]]
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------------------------
# uncertain / certain
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_probs(model: nn.Module, split: Split, positions: np.ndarray, *, batch_size: int = 1024,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities of the samples at ``positions`` of a data Split, eval mode, batched.

    Returns
    -------
    (n, C) float64 (softmax taken in float64, so entropies of near-certain samples are not rounded to 0)
    """
    pos = np.asarray(positions, dtype=np.int64)
    was = model.training
    model.eval()
    try:
        out = [torch.softmax(model(split.inputs(pos[s:s + batch_size], augment=False).to(device)).double(),
                             dim=1).cpu().numpy()  # (b, C)
               for s in range(0, pos.size, batch_size)]
    finally:
        model.train(was)
    if not out:
        raise ValueError("no positions given: pass the candidates' positions in the split")
    return np.concatenate(out)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``H_j = -sum_c p_jc log p_jc`` (0 log 0 = 0): (n, C) -> (n,) float64."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (n, C); got shape {p.shape}")
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(1)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row (the distance to the decision boundary that the
    boundary AUC ranks by): (n, C) -> (n,), in the probabilities' dtype."""
    top2 = np.sort(np.asarray(probs), axis=1)[:, -2:]  # (n, 2)
    return top2[:, 1] - top2[:, 0]


def rank_by_entropy(sample_id: Sequence[int] | np.ndarray, entropy: np.ndarray, *, k: int,
                    highest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k candidates of highest (``uncertain``) or lowest (``certain``) entropy; ties: smaller id first.

    Returns
    -------
    ids (k,) int64 in rank order; their entropies (k,) float64
    """
    ids = _ids(sample_id)
    H = np.asarray(entropy, dtype=np.float64)
    if H.shape != ids.shape:
        raise ValueError(f"entropy must be (n,) = {ids.shape}; got {H.shape}")
    _check_k(k, ids.size, "candidates")
    top = np.lexsort((ids, -H if highest else H))[:k]
    return ids[top], H[top]



PREDICTION_COLUMNS = ("sample_id", "snapshot", "epoch", "entropy", "margin", "pred")


@EXTRACTORS.register("predictions")
class PredictionExtractor:
    """What one snapshot's model predicts for each sample, for the feature-extraction stage's
    actors (``extract_features(feature_spec={"kind": "predictions"})``): the predictive entropy
    (``uncertain`` / ``certain``), the top-1 minus top-2 probability (``margin``) and the
    predicted class (``pred``), from the softmax of the logits taken in float64 as
    :func:`predict_probs` takes it. Not a gradient feature: no clustering runs on it
    (``clusterable``), and ``features.kind`` refuses it.
    """

    needs_fit = False
    clusterable = False

    def __init__(self, *, model: nn.Module, cfg: object, seed: int) -> None:
        self.model = model  # in eval mode (the stage's actors set it)
        self.seed = int(seed)  # deterministic; kept for the common factory signature

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Nothing to estimate."""

    @torch.no_grad()
    def extract(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, np.ndarray]:
        p = torch.softmax(self.model(x).double(), dim=1).cpu().numpy()  # (n, C) float64
        return {"entropy": predictive_entropy(p), "margin": top2_margin(p), "pred": p.argmax(1).astype(np.int64)}

    def rows(self, *, sample_id: np.ndarray, snapshot: int, epoch: int, x: torch.Tensor,
             y: torch.Tensor | None) -> dict[str, np.ndarray]:
        cols = self.extract(x, y)
        n = len(sample_id)
        if cols["entropy"].shape[0] != n:
            raise ValueError(f"{n} sample ids for a batch of {cols['entropy'].shape[0]} inputs")
        return {"sample_id": np.asarray(sample_id, dtype=np.int64), "snapshot": np.full(n, snapshot, dtype=np.int32),
                "epoch": np.full(n, epoch, dtype=np.int32), **cols}


@dataclass(frozen=True)
class Predictions:
    """A prediction table (:class:`PredictionExtractor`'s rows of one snapshot), sorted by sample_id:
    sample_id, entropy, margin (float64) and pred (int64), each (n,)."""

    sample_id: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    pred: np.ndarray
    epoch: int

    def at(self, sample_id: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of ``sample_id``; KeyError naming the ids the table lacks."""
        ids = np.asarray(sample_id, dtype=np.int64)
        at = np.searchsorted(self.sample_id, ids)
        found = (at < self.sample_id.size) & (self.sample_id[np.minimum(at, self.sample_id.size - 1)] == ids)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} sample ids (e.g. {ids[~found][:5].tolist()}) have no row in the "
                           "prediction table: extract it over those samples")
        return at


def read_predictions(paths: str | Path | Sequence[str | Path]) -> Predictions:
    """Read a prediction table written by the extraction stage (one snapshot, any file order)."""
    files = parquet_files(paths)
    lacking = sorted(set(PREDICTION_COLUMNS) - set(pq.read_schema(files[0]).names))
    if lacking:
        raise ValueError(f"{paths} is not a prediction table (it lacks the columns {lacking}): delete it and "
                         "extract it again (kind='predictions')")
    t = read_rows(files, columns=list(PREDICTION_COLUMNS))
    ids = t.column("sample_id").to_numpy()
    epochs = np.unique(t.column("epoch").to_numpy())
    if epochs.size != 1 or np.unique(ids).size != ids.size:
        raise ValueError(f"{paths} holds {epochs.size} snapshots and {ids.size} rows for {np.unique(ids).size} "
                         "samples: a prediction table has one row per sample of one snapshot; extract it again")
    order = np.argsort(ids, kind="stable")
    col = {c: t.column(c).to_numpy()[order] for c in ("entropy", "margin", "pred")}
    return Predictions(ids[order].astype(np.int64), col["entropy"].astype(np.float64),
                       col["margin"].astype(np.float64), col["pred"].astype(np.int64), int(epochs[0]))


# ---------------------------------------------------------------------------------------------
# craig: facility location
# ---------------------------------------------------------------------------------------------


def _rows_inner(a: FactorFeatures | DenseFeatures, b: FactorFeatures | DenseFeatures) -> np.ndarray:
    """<G_i, G_j> (n_a, n_b) float64, from factors without forming G (spec section 3)."""
    if isinstance(a, FactorFeatures) and isinstance(b, FactorFeatures):
        from .features import factor_inner

        return factor_inner(a, b)
    if isinstance(a, DenseFeatures) and isinstance(b, DenseFeatures):
        return np.asarray(a.G, dtype=np.float64) @ np.asarray(b.G, dtype=np.float64).T
    raise TypeError("both feature sets must be FactorFeatures or both DenseFeatures")


def _sq_norms(f: FactorFeatures | DenseFeatures) -> np.ndarray:
    if isinstance(f, FactorFeatures):
        from .features import factor_sq_norms

        return factor_sq_norms(f)
    return np.square(np.asarray(f.G, dtype=np.float64)).sum(1)


def craig_similarity(coverage: FactorFeatures | DenseFeatures, candidates: FactorFeatures | DenseFeatures, *,
                     rows: np.ndarray | None = None, chunk: int = 4096) -> tuple[np.ndarray, float]:
    """``sim(v, u) = C_max - ||G_v - G_u||`` for candidates v and coverage points u.

    ``C_max`` is the largest distance in the block, so ``sim >= 0`` and F is monotone submodular
    (CRAIG's "constant larger than every distance"). Distances come from inner products,
    ``||G_v||^2 + ||G_u||^2 - 2 <G_v, G_u>`` (clamped at 0), candidates in chunks.

    Parameters
    ----------
    rows : the candidates' rows of ``candidates``, in output order (default: all rows); taken one
        chunk at a time, so the features are never copied whole

    Returns
    -------
    sim : (n_candidates, n_coverage) float32, candidate-major so a gain is one contiguous row
    C_max : float
    """
    rows = np.arange(len(candidates)) if rows is None else np.asarray(rows, dtype=np.int64)
    sq_u = _sq_norms(coverage)  # (m,)
    dist = np.empty((rows.size, len(coverage)), dtype=np.float32)
    for s in range(0, rows.size, chunk):
        part = candidates.take(rows[s:s + chunk])
        d2 = _sq_norms(part)[:, None] + sq_u[None, :] - 2.0 * _rows_inner(part, coverage)  # (c, m)
        dist[s:s + len(part)] = np.sqrt(np.maximum(d2, 0.0))
    c_max = float(dist.max()) if dist.size else 0.0
    np.subtract(np.float32(c_max), dist, out=dist)
    return dist, c_max


def facility_location_greedy(sim: np.ndarray, *, k: int, cover: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lazy greedy for ``max_{|S| = k} sum_u max(cover_u, max_{s in S} sim[s, u])``.

    Gains only shrink as S grows (submodularity), so a stale gain is an upper bound: pop the
    largest, recompute it, and take it if it is still on top (Minoux 1978). Ties go to the smaller
    candidate index, exactly as plain greedy with ``argmax`` would.

    Parameters
    ----------
    sim : (n, m) similarities >= 0 of n candidates to m coverage points
    k : picks, <= n
    cover : (m,) the coverage already there (e.g. by the meta set); default 0

    Returns
    -------
    picks (k,) int64 candidate positions in pick order; gains (k,) float64 marginal gains
    """
    sim = np.asarray(sim)
    n, m = sim.shape
    _check_k(k, n, "candidates")
    cur = np.zeros(m, dtype=np.float64) if cover is None else np.asarray(cover, dtype=np.float64).copy()
    if cur.shape != (m,):
        raise ValueError(f"cover must be (m,) = ({m},); got {cur.shape}")

    def gain(j: int) -> float:
        return float(np.maximum(sim[j].astype(np.float64) - cur, 0.0).sum())

    heap = [(-gain(j), j) for j in range(n)]
    heapq.heapify(heap)
    fresh = np.zeros(n, dtype=np.int64)  # the pick count at which each heap gain was computed
    picks: list[int] = []
    gains: list[float] = []
    while len(picks) < k:
        neg, j = heapq.heappop(heap)
        if fresh[j] == len(picks):  # up to date and on top: the greedy choice
            picks.append(j)
            gains.append(-neg)
            np.maximum(cur, sim[j], out=cur)
        else:
            fresh[j] = len(picks)
            heapq.heappush(heap, (-gain(j), j))
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)


@dataclass
class CraigPicks:
    """sample_id (k,) in pick order; gain (k,) marginal facility-location gains; coverage_ids (m,) sorted
    ids of the coverage subsample; c_max the similarity constant."""

    sample_id: np.ndarray
    gain: np.ndarray
    coverage_ids: np.ndarray
    c_max: float


def select_craig(features: FactorFeatures | DenseFeatures, *, k: int, meta_ids: Sequence[int] | np.ndarray,
                 coverage_size: int = 1024, seed: int) -> CraigPicks:
    """CRAIG baseline: facility-location greedy over the candidates (rows not in ``meta_ids``).

    The coverage term sums over U, a seeded uniform subsample of ``min(coverage_size, n)`` candidates
    (all of them when fewer): the exact objective needs n x n similarities, the subsample makes it
    an unbiased (n/m-scaled) estimate at O(n m) memory (60000 x 1024 float32 = 245 MB). The meta
    samples' rows start the coverage (``cover_u = max_meta sim(u, meta)``), so each round adds
    what the existing meta set does not already represent: greedy on ``F(meta + S)``.

    Parameters
    ----------
    features : rows of the candidates and of the meta samples (sorted by sample_id)
    k : picks
    meta_ids : existing meta samples (never picked)
    coverage_size : m
    seed : draws the coverage subsample

    Returns
    -------
    CraigPicks
    """
    ids = np.asarray(features.sample_id, dtype=np.int64)
    meta = np.unique(np.asarray(meta_ids, dtype=np.int64))
    is_meta = np.isin(ids, meta)
    missing = np.setdiff1d(meta, ids)
    if missing.size:
        raise ValueError(f"meta samples {missing[:5].tolist()} have no feature rows: extract features for every "
                         "training sample")
    cand_rows = np.flatnonzero(~is_meta)
    _check_k(k, cand_rows.size, "candidates")
    if coverage_size < 1:
        raise ValueError(f"coverage_size={coverage_size} must be >= 1")
    m = min(int(coverage_size), cand_rows.size)
    cov_rows = np.sort(numpy_rng(seed, "craig", "coverage").choice(cand_rows, size=m, replace=False))
    cov = features.take(cov_rows)
    both = np.concatenate([cand_rows, np.flatnonzero(is_meta)])  # candidates, then meta
    sim_all, c_max = craig_similarity(cov, features, rows=both)  # one C_max for candidates and meta: sim >= 0
    sim = sim_all[:cand_rows.size]  # (n_cand, m)
    cover = sim_all[cand_rows.size:].max(0) if is_meta.any() else None  # (m,)
    picks, gains = facility_location_greedy(sim, k=k, cover=cover)
    return CraigPicks(ids[cand_rows[picks]], gains, cov.sample_id.astype(np.int64), c_max)
