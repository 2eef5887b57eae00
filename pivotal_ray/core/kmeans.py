"""Weighted K-means (Algorithm 1, eqs. 9-10, S1-S2) and the pick of pivotal samples (spec section 4).

One Ray-free Lloyd loop over a *shard set*: anything with ``call(method, **kwargs) -> list``
that runs a :class:`~pivotal_ray.core.shards.Shard` method on every shard and returns the
per-shard results in a fixed shard order. :class:`LocalShardSet` calls in-memory shards one
after the other; :class:`pivotal_ray.distributed.kmeans.RayShardSet` fans the same calls out to
shard actors. Every global decision (seeding draws, exclusion, picks) is made here from results
ordered by ``sample_id``, so the outcome does not depend on how rows are split into shards.

Weighted (the paper's method, ``rbc``/``gbc``):
    similarity S1 ``|<G_j, C_i>| / ||G_j||``; assignment ``argmax_i |<G_j, C_i>|``;
    update S2 ``C_i = sum_{S_i} G_j / sum_{S_i} ||G_j||``; objective MCO ``sum_j max_i |<G_j, C_i>|``.
    By default members enter S2 sign-aligned, ``sign(<G_j, C_i>) G_j``: the same as S2 when
    inner products are >= 0 (RBC with A = p on ReLU features), and it keeps clusters from
    cancelling out on mixed-sign features (label-aware RBC, GBC), where S2 read literally
    collapses them. ``sign_align=False`` gives S2 literally.
Signed (``signed=True``, for the l2rw re-weighting of Ren et al. 2018): the paper's supplement
    (eqs. S13-S14) drops the absolute value when weights are ``max(-dL/dw, 0)``, since only a
    positive inner product with the meta gradient raises a weight. Then S1 is
    ``<G_j, C_i> / ||G_j||``, the assignment ``argmax_i <G_j, C_i>``, the objective
    ``sum_j max_i <G_j, C_i>``, the update S2 literally, the exclusion ``max_m cos(G_j, G_m)``, and
    k-means++ scores a row by its squared distance to the chosen half-lines. On non-negative
    features (label-free RBC on ReLU features) every inner product is >= 0 and the two agree to
    the last bit.
Plain (``rbc_k``): Euclidean K-means on the same features; objective = inertia.

Example::

    from pivotal_ray.core.kmeans import select_pivotal
    sel = select_pivotal(features, budget=10, meta_ids=meta, exclude_frac=0.5, seed=0)
    sel.sample_id  # (10,) distinct ids, none in meta, none among the excluded half
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures
from pivotal_ray.core.registry import Registry
from pivotal_ray.core.seeding import numpy_rng
from pivotal_ray.core.shards import (SHARD_OPS, Candidates, DenseShard, FactorShard, PartialSums, Shard,
                                     F64_REL_ERR, make_shard, s1_scores, top_by_score)

__all__ = ["ShardSet", "LocalShardSet", "as_shard_set", "KMeansResult", "Selection", "INITS", "n_excluded",
           "weighted_kmeans", "assign", "select_pivotal", "FactorShard", "DenseShard", "make_shard"]


@runtime_checkable
class ShardSet(Protocol):
    """Runs one shard method on every shard; results come back in a fixed shard order."""

    def call(self, method: str, /, **kwargs: Any) -> list[Any]: ...
    def __len__(self) -> int: ...


class LocalShardSet:
    """In-memory shards called one after the other."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("a shard set needs at least one shard")

    def __len__(self) -> int:
        return len(self.shards)

    def call(self, method: str, /, **kwargs: Any) -> list[Any]:
        if method not in SHARD_OPS:
            raise ValueError(f"unknown shard method {method!r}: choose one of {list(SHARD_OPS)}")
        return [getattr(s, method)(**kwargs) for s in self.shards]


def as_shard_set(shards: Any, *, device: str = "cpu") -> ShardSet:
    """A ShardSet from a ShardSet, one shard, a list of shards, or a Factor/DenseFeatures."""
    if isinstance(shards, (FactorFeatures, DenseFeatures)):
        return LocalShardSet([make_shard(shards, device=device)])
    if isinstance(shards, (FactorShard, DenseShard)):
        return LocalShardSet([shards])
    if isinstance(shards, ShardSet):
        return shards
    if isinstance(shards, (list, tuple)) and all(isinstance(s, Shard) for s in shards):
        return LocalShardSet(shards)
    raise TypeError(f"cannot cluster a {type(shards).__name__}: pass FactorFeatures/DenseFeatures, "
                    "a FactorShard/DenseShard, a list of them, or a shard set")


@dataclass
class KMeansResult:
    """centroids (M', D) float64 (M' = M less the clusters that came out empty); objective per
    iteration of the last (re)start (MCO when weighted, inertia when plain), for the centroids
    entering that iteration; n_iter assignment passes over all starts; sizes (M',) members under
    the last assignment; n_dropped clusters lost to emptiness; restarts (0 when none was empty)."""

    centroids: np.ndarray
    objective: list[float]
    n_iter: int
    sizes: np.ndarray
    n_dropped: int
    restarts: int = 0


@dataclass
class Selection:
    """The picks of one round.

    sample_id (budget,) int64 distinct; cluster (budget,) int64 (centroid index, -1 if none);
    score (budget,) float64 (S1 to that centroid, or -||G_j - C_i||^2 for plain K-means);
    objective per iteration; n_iter; n_clusters (after dropping empty ones); excluded (E,)
    sorted ids dropped by the exclusion step; centroids (n_clusters, D) float64.
    """

    sample_id: np.ndarray
    cluster: np.ndarray
    score: np.ndarray
    objective: list[float]
    n_iter: int
    n_clusters: int
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    centroids: np.ndarray | None = None


# ---- gathering helpers: every result is put in sample_id order ----------------------------

def _gather_ids(shards: ShardSet) -> np.ndarray:
    ids = np.concatenate(shards.call("sample_ids"))
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise ValueError("a sample_id occurs in more than one shard: split the features by sample")
    return ids


def _dense_rows(shards: ShardSet, ids: np.ndarray, *, what: str) -> np.ndarray:
    """G for the given ids, in that order: (len(ids), D) float64."""
    got = shards.call("dense_rows", sample_ids=ids)
    found = np.concatenate([g[0] for g in got])
    rows = np.concatenate([g[1] for g in got]) if found.size else np.zeros((0, shards.call("dim")[0]))
    missing = np.setdiff1d(ids, found)
    if missing.size:
        raise ValueError(f"{what} {missing[:5].tolist()} have no feature rows: extract features "
                         f"for them as well ({missing.size} missing)")
    where = {int(s): i for i, s in enumerate(found)}
    return rows[[where[int(s)] for s in ids]]


def _unit(G: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; zero rows stay zero (never NaN). (m, D) -> (m, D)."""
    n = np.linalg.norm(G, axis=1, keepdims=True)
    return np.divide(G, n, out=np.zeros_like(G), where=n > 0)


# ---- initialisation ---------------------------------------------------------------------

InitFn = Callable[..., np.ndarray]
INITS: Registry[InitFn] = Registry("kmeans init")


def _as_center(g: np.ndarray, weighted: bool) -> np.ndarray:
    # weighted: a singleton cluster {s} gives C = G_s / ||G_s|| under eq. S2, the scale every
    # later centroid has; plain K-means: the row itself
    return _unit(g) if weighted else g


@INITS.register("random")
def _init_random(shards: ShardSet, *, ids: np.ndarray, n_clusters: int, weighted: bool,
                 rng: np.random.Generator, signed: bool = False) -> np.ndarray:
    """The paper's init: M distinct random samples as centroids. ids (n,) sorted -> (M, D)."""
    pos = np.sort(rng.choice(ids.shape[0], size=n_clusters, replace=False))
    return _as_center(_dense_rows(shards, ids[pos], what="seed ids"), weighted)


@INITS.register("kmeans++")
def _init_kmeanspp(shards: ShardSet, *, ids: np.ndarray, n_clusters: int, weighted: bool,
                   rng: np.random.Generator, signed: bool = False) -> np.ndarray:
    """k-means++ under the run's geometry: draw each seed with probability proportional to its
    score against the seeds so far (Shard.seed_scores: the residual ``||G_j||^2 (1 - cos^2)`` to
    the nearest chosen direction when weighted, with ``max(cos, 0)`` when signed, ``D^2`` when
    plain). Scores are gathered and
    sorted by sample_id before every draw, so any number of shards gives the same seeds."""
    order = np.argsort(np.concatenate(shards.call("sample_ids")), kind="stable")

    def scores(center: np.ndarray | None) -> np.ndarray:
        return np.concatenate(shards.call("seed_scores", center=center, weighted=weighted, signed=signed))[order]

    s = scores(None)  # (n,)
    chosen = np.zeros(ids.shape[0], dtype=bool)
    centers = []
    for m in range(n_clusters):
        cum = np.cumsum(np.where(chosen, 0.0, s))
        if cum[-1] > 0 and np.isfinite(cum[-1]):
            # u < cum[-1] so pos <= n-1, and cum[pos] > cum[pos-1] means its score is > 0
            pos = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        else:  # every remaining row sits on a chosen direction (or is zero): draw uniformly
            pos = int(rng.choice(np.flatnonzero(~chosen)))
        chosen[pos] = True
        centers.append(_as_center(_dense_rows(shards, ids[pos:pos + 1], what="seed ids"), weighted)[0])
        if m + 1 < n_clusters:
            s = np.minimum(s, scores(centers[-1]))
    return np.stack(centers)


# ---- the Lloyd loop -----------------------------------------------------------------------

def _reduce(parts: list[PartialSums]) -> PartialSums:
    """Sum partial sums in the shard set's fixed order (float64 throughout), into one new (M, D)
    numerator (the parts may be read-only views of Ray's object store): with D = K*C*d for RBC
    factors the numerators are the largest arrays of a Lloyd step, so no other copy is made."""
    numer = np.array(parts[0].numer, dtype=np.float64)  # owned, writeable
    denom, counts, objective = parts[0].denom, parts[0].counts, parts[0].objective
    for p in parts[1:]:
        numer += p.numer  # elementwise as parts[0].numer + parts[1].numer + ...: the same floats
        denom, counts, objective = denom + p.denom, counts + p.counts, objective + p.objective
    return PartialSums(numer, denom, counts, objective)


def weighted_kmeans(shards: Any, *, n_clusters: int, weighted: bool = True,
                    init: str | np.ndarray = "kmeans++", max_iter: int = 200, tol: float = 1e-6,
                    seed: int, sign_align: bool = True, signed: bool = False, device: str = "cpu") -> KMeansResult:
    """Cluster the active rows of a shard set (Algorithm 1; plain K-means if not ``weighted``).

    Parameters
    ----------
    shards : ShardSet, shard(s), or FactorFeatures/DenseFeatures (see :func:`as_shard_set`).
    n_clusters : int
        M, at most the number of active rows.
    init : "kmeans++" | "random" | ndarray (M, D)
        Seeding method (see ``INITS``) or explicit initial centroids.
    max_iter, tol : stop after max_iter assignment passes, or once the relative objective change
        ``|f_t - f_{t-1}| / |f_{t-1}|`` drops below tol with no cluster lost in that pass.
    seed : int
        Seeds the driver-side RNG of the init (``derive_seed(seed, "kmeans", init)``).
    sign_align : bool
        Weighted update ``C_i = sum_{S_i} sign(<G_j, C_i>) G_j / sum_{S_i} ||G_j||`` (see
        ``Shard.assign_sums``); identical to S2 when members' inner products are >= 0. False:
        S2 literally.
    signed : bool
        The l2rw geometry (module docstring): no absolute value in the assignment, objective and
        S1; the update is S2 literally.

    Empty clusters: the paper's restart. When an assignment pass leaves ``M_empty`` clusters
    empty, K-means starts again from a new seeding with ``M - M_empty`` clusters (the RNG stream
    goes on, so the result is still a function of ``seed``; an explicit ``init`` restarts from its
    rows whose clusters survived), until a run ends with none empty. Weighted clusters whose
    members all have ``||G_j|| = 0`` count as empty (S2 would divide by zero). ``max_iter``
    bounds each start; there are at most ``M - 1`` restarts.
    """
    shards = as_shard_set(shards, device=device)
    if max_iter < 1 or tol < 0:
        raise ValueError(f"max_iter={max_iter} must be >= 1 and tol={tol} >= 0")
    ids = np.sort(_gather_ids(shards))
    if isinstance(init, str):
        if not 1 <= n_clusters <= ids.shape[0]:
            raise ValueError(f"n_clusters={n_clusters} must be in [1, {ids.shape[0]}] (the active rows)")
        rng = numpy_rng(seed, "kmeans", init)

        def start(m: int, keep: np.ndarray | None) -> np.ndarray:
            return INITS.get(init)(shards, ids=ids, n_clusters=m, weighted=weighted, rng=rng, signed=signed)
    else:
        given = np.asarray(init, dtype=np.float64)
        if given.shape != (n_clusters, shards.call("dim")[0]):
            raise ValueError(f"init centroids must be (n_clusters, D) = ({n_clusters}, "
                             f"{shards.call('dim')[0]}); got {given.shape}")
        alive = np.arange(n_clusters)  # the rows of ``given`` still in play

        def start(m: int, keep: np.ndarray | None) -> np.ndarray:
            nonlocal alive
            if keep is not None:
                alive = alive[keep]
            return given[alive].copy()

    n_dropped = n_iter = restarts = 0
    C, keep = start(n_clusters, None), None
    while True:
        objective: list[float] = []
        sizes, passes, lost = np.zeros(C.shape[0], dtype=np.int64), 0, 0
        while passes < max_iter:
            p = _reduce(shards.call("assign_sums", centroids=C, weighted=weighted, sign_align=sign_align,
                                    signed=signed))
            passes += 1
            objective.append(p.objective)
            keep = (p.counts > 0) & (p.denom > 0)
            if not keep.all():
                lost = int((~keep).sum())
                break
            sizes = p.counts
            # eq. S2 (weighted) or the mean (plain): (M, D), in the reduced numerator's memory
            C = np.divide(p.numer, p.denom[:, None], out=p.numer)
            if len(objective) > 1 and abs(objective[-1] - objective[-2]) <= tol * max(abs(objective[-2]), 1e-300):
                break
        n_iter += passes
        if not lost:
            return KMeansResult(C, objective, n_iter, sizes, n_dropped, restarts)
        n_dropped, restarts = n_dropped + lost, restarts + 1
        if lost == C.shape[0]:  # every cluster empty: only rows with ||G_j|| = 0 (weighted)
            return KMeansResult(C[:0], objective, n_iter, sizes[:0], n_dropped, restarts)
        C = start(C.shape[0] - lost, keep)


def assign(shards: Any, *, centroids: np.ndarray, weighted: bool = True, signed: bool = False,
           device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assignment of every active row: (sample_id (n,) sorted, cluster (n,), score (n,))."""
    shards = as_shard_set(shards, device=device)
    ids = np.concatenate(shards.call("sample_ids"))
    got = shards.call("assign", centroids=np.asarray(centroids, dtype=np.float64), weighted=weighted, signed=signed)
    lab, score = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    order = np.argsort(ids, kind="stable")
    return ids[order], lab[order], score[order]


# ---- selection (Algorithm 2, steps c-d) --------------------------------------------------

def _exclude(shards: ShardSet, *, meta_ids: np.ndarray, n_exclude: int, signed: bool = False) -> np.ndarray:
    """Ids of the n_exclude candidates with the largest ``max_m |cos(G_j, G_m)|`` over meta samples
    m (signed: ``max_m cos(G_j, G_m)``; ties: smaller sample_id first). Zero rows have similarity 0.

    This is S1 with each meta sample as a singleton cluster: its S2 centroid is
    ``G_m / ||G_m||``, a unit vector, so ``||C|| |cos(G_j, C)|`` is ``|cos(G_j, G_m)|`` and no meta
    sample outweighs another by its gradient norm."""
    if n_exclude == 0:
        return np.zeros(0, dtype=np.int64)
    centers = _unit(_dense_rows(shards, meta_ids, what="meta sample ids"))  # (m, D)
    ids = np.concatenate(shards.call("sample_ids"))
    sim = np.concatenate(shards.call("max_similarity", centers=centers, signed=signed))  # float64 GEMMs
    if n_exclude < ids.size:
        # GEMM scores are off by at most e = F64_REL_ERR (unit centers), in digits that depend on
        # the shard split. Rows more than 2e above the cut are excluded in exact arithmetic too,
        # rows more than 2e below it are not; the rows within 2e of it (ties, mostly) fill the
        # remaining places by scores computed from each row alone, so the split cannot move a
        # row across the cut
        e2 = 2.0 * F64_REL_ERR
        cut = np.partition(sim, ids.size - n_exclude)[ids.size - n_exclude]
        above, band = np.flatnonzero(sim > cut + e2), np.flatnonzero(np.abs(sim - cut) <= e2)
        if band.size <= EXACT_BAND_MAX:
            exact = np.zeros(band.size)
            step = max(1, 2**26 // (8 * centers.shape[1]))  # 64 MiB of rows at a time
            for s in range(0, band.size, step):
                G = _dense_rows(shards, ids[band[s:s + step]], what="candidate ids")  # (b', D)
                exact[s:s + step] = np.max([s1_scores(G, c, signed=signed) for c in centers], axis=0)  # max_m cos
            rest = band[top_by_score(exact[None], ids[band], n_exclude - above.size)[0]]
            return np.sort(ids[np.concatenate([above, rest])])
    return np.sort(ids[top_by_score(sim[None], ids, n_exclude)[0]])


def _near_ties(scores: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """(R, L) bool: entries of descending rows (R, L) within margin (R,) of a row neighbour."""
    close = -np.diff(scores, axis=1) <= margin[:, None]  # (R, L-1): entries t and t+1 tie
    out = np.zeros(scores.shape, dtype=bool)
    out[:, :-1] |= close
    out[:, 1:] |= close
    return out


def _exact(shards: ShardSet, ids: np.ndarray, centroids: np.ndarray, *, weighted: bool,
           signed: bool = False) -> np.ndarray:
    """Scores of rows ids (q,) to centroids (q, D), each computed from its row alone: (q,)."""
    out = np.full(ids.shape[0], np.nan)
    for pos, score in shards.call("exact_scores", sample_ids=ids, centroids=centroids, weighted=weighted,
                                  signed=signed):
        out[pos] = score
    if np.isnan(out).any():
        raise RuntimeError(f"no shard holds the rows {ids[np.isnan(out)][:5].tolist()}; this is a bug")
    return out


def _merge(shards: ShardSet, cands: list[Candidates], *, k: int, n_best: int, centroids: np.ndarray,
           weighted: bool, signed: bool = False) -> Candidates:
    """Shard candidates -> the global ones: top k per centroid, top n_best overall.

    Entries within twice the scan error of a neighbour (near-ties, in practice exact ties)
    are scored again from their rows alone (``Shard.exact_scores``) before the cut, so neither
    the order nor the cut depends on how the rows are split into shards and chunks.
    """
    ids = np.concatenate([c.ids for c in cands], axis=1)  # (M, L)
    sc = np.concatenate([c.scores for c in cands], axis=1)
    err = np.max([c.err for c in cands], axis=0) if ids.shape[0] else np.zeros(0)  # (M,)
    order = top_by_score(sc, ids, ids.shape[1])
    ids, sc = np.take_along_axis(ids, order, 1), np.take_along_axis(sc, order, 1)
    b_ids = np.concatenate([c.best_ids for c in cands])
    b_sc = np.concatenate([c.best_scores for c in cands])
    b_cl = np.concatenate([c.best_cluster for c in cands])
    b_err = max(c.best_err for c in cands)
    bo = top_by_score(b_sc[None], b_ids, b_ids.size)[0]
    b_ids, b_sc, b_cl = b_ids[bo], b_sc[bo], b_cl[bo]
    tied = _near_ties(sc, 2.0 * err) if ids.size else np.zeros(ids.shape, dtype=bool)
    b_tied = _near_ties(b_sc[None], np.array([2.0 * b_err]))[0] & (b_cl >= 0)
    if tied.any() or b_tied.any():
        rows, _ = np.nonzero(tied)
        q_ids = np.concatenate([ids[tied], b_ids[b_tied]])
        q_cen = np.asarray(centroids)[np.concatenate([rows, b_cl[b_tied]])]  # (q, D)
        exact = _exact(shards, q_ids, q_cen, weighted=weighted, signed=signed)
        sc, b_sc = sc.copy(), b_sc.copy()
        sc[tied], b_sc[b_tied] = exact[:rows.size], exact[rows.size:]
    top = top_by_score(sc, ids, k)
    bt = top_by_score(b_sc[None], b_ids, n_best)[0]
    return Candidates(np.take_along_axis(ids, top, 1), np.take_along_axis(sc, top, 1),
                      b_ids[bt], b_sc[bt], b_cl[bt], err, b_err)


EXACT_BAND_MAX = 4096  # most rows near the exclusion cut rescored exactly (more: the scan's order)
TIE_RTOL = 1e-9  # pick scores this close count as tied; the smaller sample_id wins


def _first_free(ids: np.ndarray, scores: np.ndarray, taken: set[int]) -> int | None:
    """Position of the best not-yet-taken entry of a (-score, id)-sorted list, or None.

    Scores within TIE_RTOL of the best free one are ties, broken by the smaller sample_id, so
    rounding cannot decide between candidates that are equally close in exact arithmetic.
    """
    free = [p for p, j in enumerate(ids.tolist()) if j not in taken]
    if not free:
        return None
    best = scores[free[0]]
    tied = [p for p in free if scores[p] >= best - TIE_RTOL * abs(best)]
    return min(tied, key=lambda p: ids[p])


def _picks(c: Candidates, budget: int) -> tuple[list[int], list[int], list[float]]:
    """Per centroid (in index order) its most similar not-yet-picked candidate; then top up to the
    budget with the unpicked candidates closest to their own centroid."""
    ids: list[int] = []
    cl: list[int] = []
    sc: list[float] = []
    taken: set[int] = set()

    def take(j: int, i: int, s: float) -> None:
        taken.add(j), ids.append(j), cl.append(i), sc.append(s)

    for i in range(c.ids.shape[0]):
        p = _first_free(c.ids[i], c.scores[i], taken)
        if p is not None:
            take(int(c.ids[i, p]), i, float(c.scores[i, p]))
    while len(ids) < budget:
        p = _first_free(c.best_ids, c.best_scores, taken)
        if p is None:
            raise RuntimeError(f"picked {len(ids)} samples for a budget of {budget}; this is a bug")
        take(int(c.best_ids[p]), int(c.best_cluster[p]), float(c.best_scores[p]))
    return ids, cl, sc


def n_excluded(n_candidates: int, exclude_frac: float) -> int:
    """How many candidates the exclusion step drops: ``floor(exclude_frac * n_candidates)`` (a
    1e-9 slack keeps e.g. 0.29 * 100 at 29 despite binary rounding)."""
    return int(math.floor(exclude_frac * n_candidates + 1e-9))


def _activate_all(shards: Any) -> None:
    """Every row of every shard active again, as the shards came to :func:`select_pivotal`."""
    shards.call("set_active", exclude_ids=np.zeros(0, dtype=np.int64))


def select_pivotal(shards: Any, *, budget: int, meta_ids: Sequence[int] | np.ndarray, exclude_frac: float,
                   weighted: bool = True, init: str = "kmeans++", max_iter: int = 200, tol: float = 1e-6,
                   seed: int, sign_align: bool = True, signed: bool = False, device: str = "cpu") -> Selection:
    """Pick ``budget`` pivotal samples (Algorithm 2 steps c-d; spec section 4).

    Parameters
    ----------
    shards : ShardSet, a FactorShard/DenseShard or list of them, or FactorFeatures/DenseFeatures.
        Must hold the meta samples' rows too when ``exclude_frac > 0`` and meta_ids is non-empty.
    budget : int
        Exactly this many distinct samples are returned; also the number of clusters M.
    meta_ids : (m,) int
        Existing meta samples: never picked; candidates most similar to them are excluded.
    exclude_frac : float in [0, 1)
        Fraction of the candidates (rows not in meta_ids) dropped before clustering:
        :func:`n_excluded` of them, ranked by ``max_m |cos(G_j, G_m)|`` (signed: ``max_m cos``;
        ties: smaller sample_id).
        No exclusion when meta_ids is empty.
    weighted : bool
        Weighted K-means (rbc/gbc) or plain K-means (rbc_k).
    init, max_iter, tol, seed, sign_align, signed : see :func:`weighted_kmeans` (``signed`` also
        drops the absolute value from the exclusion's cosine and the picks' S1).
    device : torch device for shards built here from features.

    Returns
    -------
    Selection
        Picks in centroid order (cluster i's most similar unpicked candidate), then the top-up picks.
    """
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget={budget} must be a positive int")
    if not 0.0 <= exclude_frac < 1.0:
        raise ValueError(f"exclude_frac={exclude_frac} must be in [0, 1), e.g. 0.5")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {INITS.names()}")
    shards = as_shard_set(shards, device=device)
    signed = bool(signed and weighted)  # plain K-means has no sign to keep
    meta = np.unique(np.asarray(meta_ids, dtype=np.int64))
    try:
        n_cand = sum(shards.call("set_active", exclude_ids=meta))
        n_excl = n_excluded(n_cand, exclude_frac) if meta.size else 0
        if budget > n_cand - n_excl:
            raise ValueError(f"budget={budget} exceeds the {n_cand - n_excl} candidates left after "
                             f"excluding {n_excl} of {n_cand}: lower the budget or exclude_frac")
        excluded = _exclude(shards, meta_ids=meta, n_exclude=n_excl, signed=signed)
        if excluded.size:
            shards.call("set_active", exclude_ids=np.concatenate([meta, excluded]))
        km = weighted_kmeans(shards, n_clusters=budget, weighted=weighted, init=init,
                             max_iter=max_iter, tol=tol, seed=seed, sign_align=sign_align, signed=signed)
        M = km.centroids.shape[0]
        # top-M per centroid suffices: centroid i loses at most i < M candidates to earlier ones
        cands = _merge(shards, shards.call("top_candidates", centroids=km.centroids, weighted=weighted,
                                           k=M, n_best=budget, signed=signed),
                       k=M, n_best=budget, centroids=km.centroids, weighted=weighted, signed=signed)
        ids, cl, sc = _picks(cands, budget)
    except BaseException:
        # leave the shards as they came where they can be reached; a shard that is gone (a lost Ray
        # worker) cannot, and the first error is the one to report, not a second one from here
        with contextlib.suppress(Exception):
            _activate_all(shards)
        raise
    _activate_all(shards)
    return Selection(np.asarray(ids, dtype=np.int64), np.asarray(cl, dtype=np.int64),
                     np.asarray(sc, dtype=np.float64), km.objective, km.n_iter, M, excluded, km.centroids)
