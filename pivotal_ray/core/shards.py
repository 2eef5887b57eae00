"""In-memory feature shards: the narrow interface the K-means loop runs on (spec sections 3-4).

A shard holds some rows ``G_j`` (``sample_id`` keyed) and answers a handful of batch questions
about its *active* rows for given centroids: partial sums for one Lloyd step, k-means++ seeding
scores, S1 similarities, per-centroid top candidates, and a few rows materialised densely. The
loop in :mod:`pivotal_ray.core.kmeans` only ever talks to this interface, so the same algorithm
runs over in-memory shards and over Ray shard actors (:mod:`pivotal_ray.distributed.kmeans`).

Two implementations share everything but two primitives (inner products with centroids and
the per-cluster sum of rows):

- :class:`FactorShard` keeps RBC features factorised, ``G_j = concat_k A_jk x~_jk^T``; for a
  chunk of n rows, ``<G_j, C_i> = sum_k A_jk^T C_ik x~_jk`` is one ``(n, d) @ (d, M*C)`` GEMM per
  snapshot followed by a contraction with ``A`` (spec section 3), and the centroid numerator
  ``sum_{j in S} G_j`` is, per snapshot, one GEMM ``A_S^T X_S``. ``G`` is never formed.
- :class:`DenseShard` holds any ``(n, D)`` matrix.

Inner products of the Lloyd steps and seeding are computed in float32 (the GEMMs), every
reduction (sums over rows, norms, objective) in float64. The selection scans that run once per
round (exclusion, top candidates) use float64 GEMMs and rank rows near a cut or a tie again by
scores computed from each row alone, so their result does not depend on how rows are split into
shards and chunks. Lloyd assignments likewise: a row whose two best float32 gains are within
twice their error bound (``F32_REL_ERR``) is assigned by float64 dot products (``_labels``). Rows are processed in chunks that bound the GEMM output to
``chunk_bytes``. A shard never copies its rows: excluding rows reorders them in place
(:func:`permute_rows_`), so it holds its table once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures

# DenseShard converts a Lloyd chunk's rows to float64 for the numerator a block of about this
# many bytes at a time (cache-sized; see DenseShard._numerator)
NUMERATOR_BLOCK_BYTES = 4 * 2**20

# the methods a shard set may call remotely (see pivotal_ray.distributed.kmeans.ShardActor)
SHARD_OPS = ("count", "dim", "sample_ids", "set_active", "dense_rows", "seed_scores",
             "max_similarity", "assign", "assign_sums", "top_candidates", "exact_scores")


@dataclass
class PartialSums:
    """One shard's contribution to a Lloyd step (summed over shards in a fixed order).

    numer (M, D) float64: sum of G_j over the shard's members of each cluster;
    denom (M,) float64: sum of ||G_j|| (weighted, eq. S2) or the member count (plain K-means);
    counts (M,) int64; objective: sum_j max_i |<G_j, C_i>| (weighted MCO, eq. 9; signed: without
    the absolute value, eq. S14) or
    sum_j min_i ||G_j - C_i||^2 (plain K-means inertia).
    """

    numer: np.ndarray
    denom: np.ndarray
    counts: np.ndarray
    objective: float

    def __add__(self, other: "PartialSums") -> "PartialSums":
        return PartialSums(self.numer + other.numer, self.denom + other.denom,
                           self.counts + other.counts, self.objective + other.objective)


@dataclass
class Candidates:
    """One shard's best rows for the picks (higher score = more similar).

    ids, scores (M, L): per centroid the shard's k best rows and any within twice the scores'
    error of the k-th (L >= k), sorted by (-score, sample_id); best_ids, best_scores,
    best_cluster (b,): likewise the rows closest to their assigned centroid (for topping up
    the budget). Score: S1 ``|<G_j, C_i>| / ||G_j||`` when weighted (``<G_j, C_i> / ||G_j||``
    when signed), ``-||G_j - C_i||^2`` for plain K-means. err (M,), best_err: bounds on the scores' error (see ``top_candidates``).
    """

    ids: np.ndarray
    scores: np.ndarray
    best_ids: np.ndarray
    best_scores: np.ndarray
    best_cluster: np.ndarray
    err: np.ndarray
    best_err: float


@runtime_checkable
class Shard(Protocol):
    """Rows ``G_j`` that answer the K-means loop's batch questions (see ``_ShardBase`` for each).

    Only *active* rows take part (all, until ``set_active`` excludes some by sample_id);
    ``dense_rows`` sees every row, so meta samples can be fetched after they are excluded.
    """

    def count(self) -> int: ...
    def dim(self) -> int: ...
    def sample_ids(self) -> np.ndarray: ...
    def set_active(self, *, exclude_ids: np.ndarray) -> int: ...
    def dense_rows(self, *, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def seed_scores(self, *, center: np.ndarray | None, weighted: bool, signed: bool = False) -> np.ndarray: ...
    def max_similarity(self, *, centers: np.ndarray, signed: bool = False) -> np.ndarray: ...
    def assign(self, *, centroids: np.ndarray, weighted: bool,
               signed: bool = False) -> tuple[np.ndarray, np.ndarray]: ...
    def assign_sums(self, *, centroids: np.ndarray, weighted: bool, sign_align: bool = True,
                    signed: bool = False) -> PartialSums: ...
    def top_candidates(self, *, centroids: np.ndarray, weighted: bool, k: int, n_best: int,
                       signed: bool = False) -> Candidates: ...
    def exact_scores(self, *, sample_ids: np.ndarray, centroids: np.ndarray, weighted: bool,
                     signed: bool = False) -> tuple[np.ndarray, np.ndarray]: ...  # (positions, scores)


def top_by_score(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best entries of each row, ordered by (-score, sample_id).

    scores (R, n) float64, ids (n,) or (R, n) int64 -> (R, min(k, n)) int64. Ties go to the
    smaller sample_id so picks do not depend on how rows are split into shards or chunks.
    """
    ids = np.broadcast_to(ids, scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)  # last key is primary
    return order[:, :k]


# Selection scans (top candidates, exclusion) run their GEMMs in float64, whose error is at most
# about D u ||G|| ||C|| (u = 1.1e-16; |G|_ce = |A_c| |x~_e| bounds the factorised sums the same
# way): F64_REL_ERR covers D <= 9e5 in the worst case and far more in practice (~u sqrt(D)).
F64_REL_ERR = 1e-10
# The same for the float32 GEMMs of Lloyd steps, set empirically: on RBC-like factors at the
# MNIST and CIFAR-100 shapes the error is about 1e-7 (centroids rounded to float32 included);
# tests/unit/test_kmeans.py::test_float32_gemm_error_is_far_below_F32_REL_ERR keeps it 10x inside.
F32_REL_ERR = 1e-5


def s1_scores(G: np.ndarray, C: np.ndarray, *, signed: bool = False) -> np.ndarray:
    """S1 ``|<G_j, C_j>| / ||G_j||`` (signed: ``<G_j, C_j> / ||G_j||``) of rows G (r, D) to
    centroids C ((r, D), or (D,) for all), in float64 from the rows alone (a sum along each row,
    no GEMM: the same floats whatever the split); 0 for a zero row. (r,)"""
    norm = np.linalg.norm(G, axis=1)
    inner = (G * C).sum(1)
    return np.divide(inner if signed else np.abs(inner), norm, out=np.zeros(len(G)), where=norm > 0)


def _shortlist(scores: np.ndarray, ids: np.ndarray, k: int, margin: np.ndarray) -> np.ndarray:
    """Column indices of each row's shortlist, ordered by (-score, sample_id): (R, L) int64.

    scores (R, n) approximate, ids (n,) or (R, n), margin (R,) >= 0. Row r keeps its k best and
    every entry within ``margin[r]`` of its k-th best score; L is the largest such count over the
    rows (rows with fewer keep extra entries in order), at most ``2k + 64`` and n.
    """
    order = top_by_score(scores, ids, scores.shape[1])  # (R, n)
    n = order.shape[1]
    if n <= k:
        return order
    srt = np.take_along_axis(scores, order, 1)  # (R, n), descending
    within = srt >= (srt[:, k - 1] - margin)[:, None]  # a prefix of each row
    L = min(int(within.sum(1).max()), 2 * k + 64, n)
    return order[:, :max(L, k)]


def permute_rows_(a: np.ndarray | torch.Tensor, src: np.ndarray, *, chunk_bytes: int = 64 * 2**20) -> None:
    """Reorder the rows of 2-D ``a`` in place, ``a[p] <- a[src[p]]``, never holding a second copy.

    ``src`` (n,) must be a permutation of ``range(n)`` with n = ``a.shape[0]``. An array of at
    most ``chunk_bytes`` is gathered whole; a larger one on the CPU has each cycle of the
    permutation followed once with one row of scratch (every row copied once, plus one copy per
    cycle: a Python step per row, faster than strided gathers for wide rows); a larger tensor on
    another device (where a step per row would be a kernel launch per row) is gathered a stripe
    of columns at a time, the stripe bounded by ``chunk_bytes``. ``a[:] = a[src]`` on the whole
    of a large array would hold a second copy of it while it runs.
    """
    src = np.asarray(src, dtype=np.int64)
    n = int(a.shape[0])
    if src.shape != (n,) or not np.array_equal(np.sort(src), np.arange(n)):
        raise ValueError(f"src must be a permutation of range({n}); got shape {src.shape}")
    _permute_rows(a, src, chunk_bytes=chunk_bytes)


def _permute_rows(a: np.ndarray | torch.Tensor, src: np.ndarray, *, chunk_bytes: int) -> None:
    """:func:`permute_rows_` for an ``src`` (n,) int64 known to be a permutation (not checked)."""
    moved = np.flatnonzero(src != np.arange(src.shape[0]))
    if moved.size == 0:
        return
    nbytes = a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes
    if nbytes <= chunk_bytes or (isinstance(a, torch.Tensor) and a.device.type != "cpu"):
        _permute_rows_striped(a, src, chunk_bytes=chunk_bytes)
        return
    if isinstance(a, torch.Tensor):
        a = a.numpy()  # the same memory; numpy's row copies cost less per call
    nxt = src.tolist()
    done = bytearray(src.shape[0])
    tmp = a[0].copy()
    for start in moved.tolist():
        if done[start]:
            continue
        tmp[...] = a[start]
        j = start
        while True:  # walk the cycle: position j takes the row now at nxt[j]
            done[j] = 1
            k = nxt[j]
            if k == start:
                a[j] = tmp
                break
            a[j] = a[k]
            j = k


def _permute_rows_striped(a: np.ndarray | torch.Tensor, src: np.ndarray, *, chunk_bytes: int) -> None:
    """``permute_rows_`` by gathers of column stripes: a scratch of at most ``chunk_bytes`` (and at
    least one column). Vectorised, but strided reads: slower than the cycles on a CPU."""
    n, w = int(a.shape[0]), int(a.shape[1])
    itemsize = a.element_size() if isinstance(a, torch.Tensor) else a.itemsize
    step = max(1, chunk_bytes // max(n * itemsize, 1))
    idx = torch.as_tensor(src, device=a.device) if isinstance(a, torch.Tensor) else src
    for c in range(0, w, step):
        a[:, c:c + step] = a[idx, c:c + step]  # the right side is gathered into a new stripe first


@dataclass
class _Centroids:
    """Centroids of one call: M, the layout ``_inner`` wants, ||C_i||^2 (M,) float64, the
    centroids themselves (M, D) float64 and the relative error bound of the GEMM scores."""

    M: int
    W: Any
    c_sq: torch.Tensor
    C64: np.ndarray
    rel_err: float


class _ShardBase:
    """Everything but the primitives ``_row_arrays``, ``_view``, ``_prepare``, ``_inner``,
    ``_numerator``, ``_dense``.

    The active rows are kept compacted without a copy: ``set_active`` reorders the rows in place
    (:func:`permute_rows_`), the active ones first in their original order, and chunks are slices
    of the first ``count()`` rows: views, not gathers. With every row active the rows are back in
    their original order. ``_pos`` maps an index into all rows to its current position.
    """

    sample_id: np.ndarray  # (n,) int64, all rows
    _D: int

    def __init__(self, sq: torch.Tensor, *, device: str | torch.device, chunk_bytes: int) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be positive, e.g. 64 * 2**20")
        if np.unique(self.sample_id).shape[0] != self.sample_id.shape[0]:
            raise ValueError("sample_id has duplicates: a shard needs one row per sample")
        self.device = torch.device(device)
        self.chunk_bytes = int(chunk_bytes)
        self._sq_all = sq  # (n,) float64 ||G_j||^2, all rows
        self._order = np.argsort(self.sample_id)  # id -> row lookups
        self._pos = np.arange(self.sample_id.shape[0], dtype=np.int64)  # row -> current position
        self.set_active(exclude_ids=np.zeros(0, dtype=np.int64))

    # ---- primitives (subclasses) ---------------------------------------------------------
    # _row_arrays() -> the 2-D arrays whose rows are the samples (in their current order)
    # _view(n_active): point the chunked primitives at the first n_active rows of each
    # _prepare(C (M, D) float32 or float64) -> the layout _inner wants (once per call, not per chunk)
    # _inner(sl, W) -> (n, M) float64: <G_j, C_i> for a slice of active rows
    # _numerator(sl, labels, sign, M) -> (M, D) float64: sum of sign_j G_j per label
    # _dense(pos) -> (r, D) float64: G_j for a few rows (current positions)
    # _row_width(M) -> float32 values of temporaries per row (sets the chunk size)

    # ---- the interface ---------------------------------------------------------------------
    def count(self) -> int:
        return int(self._ids.shape[0])

    def dim(self) -> int:
        return self._D

    def sample_ids(self) -> np.ndarray:
        return self._ids

    def set_active(self, *, exclude_ids: np.ndarray) -> int:
        """Make every row active except those whose sample_id is in ``exclude_ids``; returns count()."""
        keep = ~np.isin(self.sample_id, np.asarray(exclude_ids, dtype=np.int64))
        rows = None if keep.all() else np.flatnonzero(keep)
        self._ids = self.sample_id if rows is None else self.sample_id[rows]
        sq = self._sq_all if rows is None else self._sq_all[torch.as_tensor(rows, device=self._sq_all.device)]
        self._sq, self._norm = sq, sq.sqrt()  # (n_active,) float64
        self._compact(rows)
        return self.count()

    def _compact(self, rows: np.ndarray | None) -> None:
        """Move the rows ``rows`` (indices into all rows, ascending; None: all) to the front in
        that order, the others behind them, in place."""
        n = self.sample_id.shape[0]
        if rows is None:
            order, n_active = np.arange(n, dtype=np.int64), n
        else:
            rest = np.ones(n, dtype=bool)
            rest[rows] = False
            order, n_active = np.concatenate([rows, np.flatnonzero(rest)]), int(rows.shape[0])
        src = self._pos[order]  # position p takes the row now at src[p] (row order[p]): a permutation
        for a in self._row_arrays():
            _permute_rows(a, src, chunk_bytes=self.chunk_bytes)
        self._pos[order] = np.arange(n, dtype=np.int64)
        self._view(n_active)

    def dense_rows(self, *, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (active or not) with the given ids that this shard holds: (ids (r,), G (r, D) float64)."""
        rows = np.flatnonzero(np.isin(self.sample_id, np.asarray(sample_ids, dtype=np.int64)))
        return self.sample_id[rows], self._dense(self._pos[rows])

    def _chunks(self, M: int, *, f64: bool = False) -> Iterator[slice]:
        step = max(1, self.chunk_bytes // ((8 if f64 else 4) * self._row_width(M)))
        return (slice(s, min(s + step, self.count())) for s in range(0, self.count(), step))

    def _centroids(self, centroids: np.ndarray, *, f64: bool = False) -> _Centroids:
        """f64: the GEMM operands in float64 (selection scans), else float32 (Lloyd steps)."""
        C = np.asarray(centroids)
        if C.ndim != 2 or C.shape[1] != self._D:
            raise ValueError(f"centroids must be (M, {self._D}); got {C.shape}")
        Ct = torch.as_tensor(C, dtype=torch.float64 if f64 else torch.float32, device=self.device)  # (M, D)
        C64 = torch.as_tensor(C, dtype=torch.float64, device=self.device)  # (M, D), no copy on the CPU
        # ||C_i||^2 a few centroids at a time (squaring all at once is a whole float64 copy)
        step = max(1, self.chunk_bytes // max(8 * self._D, 1))
        c_sq = torch.cat([C64[i:i + step].square().sum(1) for i in range(0, C64.shape[0], step)]) \
            if C64.shape[0] else torch.zeros(0, dtype=torch.float64, device=self.device)  # (M,)
        return _Centroids(int(C.shape[0]), self._prepare(Ct), c_sq, np.asarray(C, dtype=np.float64),
                          F64_REL_ERR if f64 else F32_REL_ERR)

    def _labels(self, sl: slice, cen: _Centroids, gain: torch.Tensor, weighted: bool,
                signed: bool = False) -> torch.Tensor:
        """Assignment of a chunk's rows: argmax of ``gain`` (n, M), except that a row whose two best
        gains are within twice their error bound takes the argmax of float64 gains computed from
        the row alone (no GEMM; the first on exact ties), so GEMM rounding, which depends on how
        rows are split into shards and chunks, cannot decide it. (n,) int64."""
        lab = gain.argmax(1)
        if cen.M < 2 or gain.shape[0] == 0:
            return lab
        top = gain.topk(2, dim=1).values  # (n, 2)
        # |error| of a gain: rel_err ||G_j|| max_i ||C_i|| (plain: twice, from -2 <G, C>)
        err = cen.rel_err * self._norm[sl] * float(cen.c_sq.max().sqrt()) * (1.0 if weighted else 2.0)
        # (a zero row has the gains 0 / -||C_i||^2 exactly in any arithmetic: nothing to settle)
        near = torch.nonzero((top[:, 0] - top[:, 1] <= 2.0 * err) & (self._norm[sl] > 0)).flatten().cpu().numpy()
        if near.size:
            # only the centroids within 2 err of each such row's best can be its exact best
            cands = (gain[near] >= (top[near, :1] - 2.0 * err[near, None])).cpu().numpy()  # (r, M)
            c_sq, G = cen.c_sq.cpu().numpy(), self._dense(sl.start + near)  # (M,), (r, D)
            for t, (row, g) in enumerate(zip(near, G)):
                idx = np.flatnonzero(cands[t])  # ascending: the first on exact ties, as argmax
                lab[int(row)] = int(idx[self._row_gains(g, cen.C64, c_sq, idx, weighted, signed).argmax()])
        return lab

    @staticmethod
    def _row_gains(g: np.ndarray, C: np.ndarray, c_sq: np.ndarray, idx: np.ndarray, weighted: bool,
                   signed: bool = False) -> np.ndarray:
        """Gains of one row g (D,) to the centroids C[idx] (of (M, D)) in float64, one dot product
        each (the same floats whichever rows and centroids are settled with it): (len(idx),)."""
        inner = np.array([C[i] @ g for i in idx])
        if weighted:
            return inner if signed else np.abs(inner)
        return -(c_sq[idx] - 2.0 * inner + g @ g)

    def _scores(self, sl: slice, cen: _Centroids, weighted: bool,
                signed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sim, gain, inner), each (n, M) float64; assignment = argmax gain (first on ties).

        weighted: gain = |<G_j, C_i>| (eq. 9; signed: <G_j, C_i>, eq. S14), sim = gain / ||G_j||
        (S1; 0 for a zero row); plain: gain = sim = -||G_j - C_i||^2.
        """
        inner = self._inner(sl, cen.W)  # (n, M)
        if weighted:
            gain = inner if signed else inner.abs()
            norm = self._norm[sl].unsqueeze(1)  # (n, 1)
            sim = torch.where(norm > 0, gain / norm.clamp_min(1e-300), torch.zeros_like(gain))
            return sim, gain, inner
        dist = (self._sq[sl].unsqueeze(1) - 2.0 * inner + cen.c_sq).clamp_min(0.0)  # (n, M)
        return -dist, -dist, inner

    def seed_scores(self, *, center: np.ndarray | None, weighted: bool, signed: bool = False) -> np.ndarray:
        """k-means++ scores of the active rows against one new center (D,): (n,) float64.

        weighted (S1 geometry; center of unit norm): the residual ``||G_j||^2 - <G_j, c>^2 =
        ||G_j||^2 (1 - cos^2)`` left after projecting on the center's line; signed, the squared
        distance to the center's half-line ``{t c: t >= 0}``, ``||G_j||^2 - max(<G_j, c>, 0)^2``
        (an anti-aligned row is not served by the center); with no center, ``||G_j||^2``.
        Plain: ``||G_j - c||^2``; with no center, 1 (a uniform first pick).
        """
        if center is None:
            return self._sq.cpu().numpy() if weighted else np.ones(self.count(), dtype=np.float64)
        cen = self._centroids(np.asarray(center).reshape(1, -1))
        out = [torch.zeros(0, dtype=torch.float64, device=self.device)]
        for sl in self._chunks(1):
            inner = self._inner(sl, cen.W)[:, 0]  # (n,)
            if weighted:
                res = self._sq[sl] - (inner.clamp_min(0.0) if signed else inner).square()
            else:
                res = self._sq[sl] - 2.0 * inner + cen.c_sq[0]
            out.append(res.clamp_min(0.0))
        return torch.cat(out).cpu().numpy()

    def max_similarity(self, *, centers: np.ndarray, signed: bool = False) -> np.ndarray:
        """max_i of S1 ``|<G_j, c_i>| / ||G_j||`` (signed: without the absolute value) over centers
        (m, D) for the active rows: (n,) float64.

        With unit-norm centers this is the largest ``|cos(G_j, c_i)|`` (the exclusion step). The
        GEMMs run in float64 (once per round): error at most ``F64_REL_ERR ||c_i||``.
        """
        cen = self._centroids(centers, f64=True)
        if cen.M == 0:
            return np.zeros(self.count(), dtype=np.float64)
        out = [torch.zeros(0, dtype=torch.float64, device=self.device)]
        out += [self._scores(sl, cen, True, signed)[0].amax(1) for sl in self._chunks(cen.M, f64=True)]
        return torch.cat(out).cpu().numpy()

    def assign(self, *, centroids: np.ndarray, weighted: bool, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Cluster of every active row and its score to that centroid: ((n,) int64, (n,) float64)."""
        cen = self._centroids(centroids)
        if cen.M == 0:
            return np.full(self.count(), -1, dtype=np.int64), np.zeros(self.count(), dtype=np.float64)
        labels, scores = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float64)]
        for sl in self._chunks(cen.M):
            sim, gain, _ = self._scores(sl, cen, weighted, signed)
            lab = self._labels(sl, cen, gain, weighted, signed)  # (n,)
            labels.append(lab.cpu().numpy())
            scores.append(sim.gather(1, lab.unsqueeze(1))[:, 0].cpu().numpy())
        return np.concatenate(labels), np.concatenate(scores)

    def assign_sums(self, *, centroids: np.ndarray, weighted: bool, sign_align: bool = True,
                    signed: bool = False) -> PartialSums:
        """Assignment step + this shard's part of the update step (Algorithm 1; eq. S2 when weighted).

        With ``sign_align`` a weighted member enters its centroid's numerator as
        ``sign(<G_j, C_i>) G_j``: the direction that maximises ``sum_j |<G_j, C>|`` for the
        current signs. It is S2 itself whenever members have non-negative inner products with
        their centroid (RBC with A = p and ReLU features: G_j >= 0 elementwise); without it
        anti-aligned members cancel and clusters collapse on mixed-sign features.
        ``signed`` (the l2rw objective, eq. S14: ``sum_j max_i <G_j, C_i>``, no absolute value)
        assigns by the signed inner product and updates by S2 literally (``sign_align`` has no
        effect): a member's own sign is what the objective rewards.
        """
        cen = self._centroids(centroids)
        M = cen.M
        numer = torch.zeros(M, self._D, dtype=torch.float64, device=self.device)  # (M, D)
        denom = torch.zeros(M, dtype=torch.float64, device=self.device)
        counts = torch.zeros(M, dtype=torch.int64, device=self.device)
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        for sl in (self._chunks(M) if M else ()):
            _, gain, inner = self._scores(sl, cen, weighted, signed)  # (n, M)
            lab = self._labels(sl, cen, gain, weighted, signed)  # (n,)
            best = gain.gather(1, lab.unsqueeze(1))[:, 0]  # (n,)
            objective += best.sum() if weighted else -best.sum()
            counts.index_add_(0, lab, torch.ones_like(lab))
            # S2 divides by sum ||G_j||; plain K-means by the member count
            denom.index_add_(0, lab, self._norm[sl] if weighted else torch.ones_like(best))
            sign = torch.ones_like(best)
            if weighted and sign_align and not signed:
                sign = torch.where(inner.gather(1, lab.unsqueeze(1))[:, 0] < 0, -1.0, 1.0).double()
            self._add_numerator(numer, sl, lab, sign)
        return PartialSums(numer.cpu().numpy(), denom.cpu().numpy(), counts.cpu().numpy(), float(objective))

    def _add_numerator(self, numer: torch.Tensor, sl: slice, labels: torch.Tensor, sign: torch.Tensor) -> None:
        """numer (M, D) += this chunk's ``_numerator`` (subclasses may add in place, no (M, D) temporary)."""
        numer += self._numerator(sl, labels, sign, numer.shape[0])

    def top_candidates(self, *, centroids: np.ndarray, weighted: bool, k: int, n_best: int,
                       signed: bool = False) -> Candidates:
        """Per centroid the k most similar active rows, plus the n_best rows closest to their own centroid.

        The scan scores rows with float64 GEMMs, off by at most ``err`` (``F64_REL_ERR`` times
        the scores' scale) in digits that depend on the GEMM's shape, i.e. on how rows are split
        into shards and chunks. So each shortlist also keeps every row within ``2 err`` of its
        k-th (n_best-th) score: the caller (``kmeans._merge``) scores near-ties again from each
        row alone (:meth:`exact_scores`), so the picks do not depend on the split even for exact
        ties, such as the two members of a 2-sample cluster, equidistant from their mean. A
        shortlist is capped at ``2k + 64`` rows (many exact duplicates within the margin); past
        the cap rows are kept by (scan score, smaller sample_id).
        """
        cen = self._centroids(centroids, f64=True)
        M = cen.M
        c_norm = np.sqrt(cen.c_sq.cpu().numpy())  # (M,)
        ids, scores = np.zeros((M, 0), dtype=np.int64), np.zeros((M, 0), dtype=np.float64)
        b_ids, b_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        b_cluster = np.zeros(0, dtype=np.int64)
        g_max = 0.0  # largest ||G_j|| seen so far (plain K-means errors grow with it)
        err = np.zeros(M)  # error bound of the scan scores per centroid
        for sl in self._chunks(M, f64=True):
            rid = self._ids[sl]  # (n,)
            if M:
                sim, gain, _ = self._scores(sl, cen, weighted, signed)  # (n, M)
                g_max = max(g_max, float(self._norm[sl].max()) if rid.shape[0] else 0.0)
                # S1 divides the inner product's error by ||G_j||; plain ||G||^2 - 2<G, C> +
                # ||C||^2 sums terms up to (||G|| + ||C||)^2
                err = F64_REL_ERR * (c_norm if weighted else (g_max + c_norm) ** 2)  # (M,)
                lab = self._labels(sl, cen, gain, weighted, signed)
                own = sim.gather(1, lab.unsqueeze(1))[:, 0].cpu().numpy()
                lab = lab.cpu().numpy()
                # running shortlist per centroid: merge the kept (M, L) with this chunk's (M, n)
                s_all = np.concatenate([scores, sim.T.cpu().numpy()], axis=1)
                i_all = np.concatenate([ids, np.broadcast_to(rid, (M, rid.shape[0]))], axis=1)
                top = _shortlist(s_all, i_all, k, 2.0 * err)
                ids, scores = np.take_along_axis(i_all, top, 1), np.take_along_axis(s_all, top, 1)
            else:  # every cluster vanished: no centroid to be close to
                own, lab = np.zeros(rid.shape[0]), np.full(rid.shape[0], -1, dtype=np.int64)
            s_all, i_all = np.concatenate([b_scores, own]), np.concatenate([b_ids, rid])
            top = _shortlist(s_all[None], i_all, n_best, np.array([2.0 * err.max(initial=0.0)]))[0]
            b_ids, b_scores = i_all[top], s_all[top]
            b_cluster = np.concatenate([b_cluster, lab])[top]
        return Candidates(ids, scores, b_ids, b_scores, b_cluster, err, float(err.max(initial=0.0)))

    def exact_scores(self, *, sample_ids: np.ndarray, centroids: np.ndarray, weighted: bool,
                     signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores of query rows to query centroids, computed from each row alone (dense float64,
        no GEMM: the same floats whatever the split), for the queries whose row (active or not)
        this shard holds. sample_ids (q,) (may repeat), centroids (q, D) -> (positions (r,) into
        the query, scores (r,))."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        mine = np.flatnonzero(np.isin(sample_ids, self.sample_id))
        return mine, self._exact_scores(sample_ids[mine], np.asarray(centroids)[mine], weighted, signed)

    def _exact_scores(self, ids: np.ndarray, C: np.ndarray, weighted: bool, signed: bool = False) -> np.ndarray:
        """Scores of rows ``ids`` (r,) to centroids C (r, D) from dense float64 rows, a chunk of
        rows at a time: (r,). Each score is a sum along one row, the same floats whatever r."""
        pos = self._pos[self._order[np.searchsorted(self.sample_id[self._order], ids)]]
        out = np.zeros(len(ids), dtype=np.float64)
        step = max(1, self.chunk_bytes // max(8 * self._D, 1))
        for s in range(0, len(ids), step):
            G, Cs = self._dense(pos[s:s + step]), C[s:s + step]  # (r', D) each
            out[s:s + step] = s1_scores(G, Cs, signed=signed) if weighted else -np.square(G - Cs).sum(1)
        return out


class FactorShard(_ShardBase):
    """Factorised RBC rows ``G_j = concat_k A_jk x~_jk^T`` (spec section 3); centroids (M, K*C*d).

    Parameters
    ----------
    features : FactorFeatures
        sample_id (n,), A (n, K, C), X (n, K, d). Held snapshot-major, (K, n, C) and (K, n, d):
        writeable float32 factors already in that layout (as read_factor_table returns them) are
        used as they are, no copy, and their rows are reordered in place while some are excluded,
        back in their original order whenever every row is active again, as ``select_pivotal``
        leaves them (DenseShard does the same with its rows); any others are copied once.
    device : torch device for the GEMMs (default cpu).
    chunk_bytes : int
        Bound on one chunk's temporaries (mainly the GEMM output, n_chunk * M * C float32).
    """

    def __init__(self, features: FactorFeatures, *, device: str | torch.device = "cpu",
                 chunk_bytes: int = 64 * 2**20) -> None:
        if not isinstance(features, FactorFeatures):
            raise TypeError(f"FactorShard needs FactorFeatures, got {type(features).__name__}; "
                            "use DenseShard for an (n, D) matrix")
        self.sample_id = np.asarray(features.sample_id, dtype=np.int64)
        _, self.K, self.C = features.A.shape
        self.d = features.X.shape[2]
        self._D = self.K * self.C * self.d
        # snapshot-major, so a chunk of one snapshot is a contiguous (n, C) / (n, d) block
        self.A_all = _snapshot_major(features.A, device)  # (K, n, C)
        self.X_all = _snapshot_major(features.X, device)  # (K, n, d)
        # ||G_j||^2 = sum_k ||A_jk||^2 ||x~_jk||^2 (spec section 3), in float64, a chunk of rows at
        # a time (float64 squares of the whole factors would be 4x their size)
        n = self.A_all.shape[1]
        step = max(1, chunk_bytes // max(16 * self.K * (self.C + self.d), 1))
        sq = torch.zeros(n, dtype=torch.float64, device=device)  # (n,)
        for i in range(0, n, step):
            a, x = self.A_all[:, i:i + step].double(), self.X_all[:, i:i + step].double()
            sq[i:i + step] = (a.square().sum(2) * x.square().sum(2)).sum(0)
        super().__init__(sq, device=device, chunk_bytes=chunk_bytes)

    def _row_arrays(self) -> list[torch.Tensor]:
        return [*self.A_all, *self.X_all]  # K contiguous (n, C) and K (n, d) slabs: views

    def _view(self, n_active: int) -> None:
        self.A, self.X = self.A_all[:, :n_active], self.X_all[:, :n_active]  # (K, n_active, C / d)

    def _row_width(self, M: int) -> int:
        return max(M, 1) * self.C + 2 * self.K * (self.C + self.d)  # Y (M*C) + float64 factors

    def _prepare(self, C: torch.Tensor) -> list[torch.Tensor]:
        Ck = C.view(C.shape[0], self.K, self.C, self.d)  # (M, K, C, d)
        # per snapshot the GEMM operand (d, M*C), contiguous so BLAS takes its fast path
        return [Ck[:, k].reshape(-1, self.d).T.contiguous() for k in range(self.K)]

    def _inner(self, sl: slice, W: list[torch.Tensor]) -> torch.Tensor:
        M = W[0].shape[1] // self.C
        n = sl.stop - sl.start
        out = torch.zeros(n, M, dtype=torch.float64, device=self.device)  # (n, M)
        for k in range(self.K):
            dt = W[k].dtype  # float32 (Lloyd steps) or float64 (selection scans)
            Y = (self.X[k, sl].to(dt) @ W[k]).view(n, M, self.C)  # one GEMM (n, d) @ (d, M*C) -> (n, M, C)
            # contraction with A: <G_jk, C_ik> = A_jk^T (C_ik x~_jk) (spec section 3)
            out += torch.bmm(Y, self.A[k, sl].to(dt).unsqueeze(2))[:, :, 0].double()
        return out

    def _numerator(self, sl: slice, labels: torch.Tensor, sign: torch.Tensor, M: int) -> torch.Tensor:
        num = torch.zeros(M, self._D, dtype=torch.float64, device=self.device)
        self._add_numerator(num, sl, labels, sign)
        return num

    def _add_numerator(self, numer: torch.Tensor, sl: slice, labels: torch.Tensor, sign: torch.Tensor) -> None:
        """numer (M, D) += the chunk's per-cluster sums, cluster by cluster: with D = K*C*d the
        (M, D) float64 numerator is the largest array of a Lloyd step, so no second one is made.
        Each cluster's chunk sum is formed first and then added, the floats of adding a whole
        (M, D) chunk numerator."""
        M = numer.shape[0]
        order = torch.argsort(labels, stable=True)  # members of each cluster become contiguous
        A = self.A[:, sl][:, order].double() * sign[order].view(1, -1, 1)  # (K, n, C)
        X = self.X[:, sl][:, order].double()  # (K, n, d)
        ends = torch.bincount(labels, minlength=M).cumsum(0).tolist()
        out = numer.view(M, self.K, self.C, self.d)
        start = 0
        for i, end in enumerate(ends):
            if end > start:  # per snapshot one GEMM A_S^T X_S (spec section 3), in float64
                out[i] += torch.bmm(A[:, start:end].transpose(1, 2), X[:, start:end])  # (K, C, d)
            start = end

    def _dense(self, pos: np.ndarray) -> np.ndarray:
        r = torch.as_tensor(pos, dtype=torch.int64, device=self.A_all.device)
        G = torch.einsum("knc,knd->nkcd", self.A_all[:, r].double(), self.X_all[:, r].double())  # (r, K, C, d)
        return G.reshape(len(pos), self._D).cpu().numpy()


def _snapshot_major(a: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(n, K, w) factors -> a (K, n, w) contiguous float32 tensor on ``device``. A writeable
    float32 array already laid out snapshot-major (the (n, K, w) view of a (K, n, w) array that
    read_factor_table returns) is used as it is on the CPU, no copy; anything else (another
    layout, dtype or device, or read-only, e.g. from Ray's object store) is copied once, since the
    shard reorders its rows in place."""
    t = np.asarray(a, dtype=np.float32).transpose(1, 0, 2)  # (K, n, w), a view
    if torch.device(device).type == "cpu" and t.flags.c_contiguous and t.flags.writeable:
        return torch.from_numpy(t)
    return torch.as_tensor(np.array(t, dtype=np.float32, order="C"), device=device)


class DenseShard(_ShardBase):
    """Any (n, D) rows (spec section 3, "Dense"); also the materialised reference for FactorShard.

    The rows are held once: a writeable float32 CPU ``features.G`` is used as it is (no copy) and
    its rows are reordered in place while some are excluded (``set_active``), back in their
    original order whenever every row is active again, as ``select_pivotal`` leaves them. Any
    other ``G`` (another dtype or device, or read-only, e.g. from Ray's object store) is copied
    once.
    """

    def __init__(self, features: DenseFeatures, *, device: str | torch.device = "cpu",
                 chunk_bytes: int = 64 * 2**20) -> None:
        if not isinstance(features, DenseFeatures):
            raise TypeError(f"DenseShard needs DenseFeatures, got {type(features).__name__}; "
                            "use FactorShard for factorised RBC features")
        G = np.asarray(features.G)
        if G.ndim != 2 or G.shape[0] != features.sample_id.shape[0]:
            raise ValueError(f"G must be (n, D) with n = len(sample_id); got {G.shape}")
        self.sample_id = np.asarray(features.sample_id, dtype=np.int64)
        if not G.flags.writeable:  # rows are reordered in place (_compact): own a copy
            G = np.array(G, dtype=np.float32)
        self.G_all = torch.as_tensor(G, dtype=torch.float32, device=device)  # (n, D)
        self._D = int(G.shape[1])
        # ||G_j||^2 in float64, a chunk of rows at a time (a whole float64 copy would be 2x the rows)
        step = max(1, chunk_bytes // max(8 * self._D, 1))
        sq = torch.cat([self.G_all[i:i + step].double().square().sum(1) for i in range(0, G.shape[0], step)]) \
            if G.shape[0] else torch.zeros(0, dtype=torch.float64, device=device)  # (n,)
        super().__init__(sq, device=device, chunk_bytes=chunk_bytes)

    def _row_arrays(self) -> list[torch.Tensor]:
        return [self.G_all]

    def _view(self, n_active: int) -> None:
        self.G = self.G_all[:n_active]

    def _row_width(self, M: int) -> int:
        # the float64 copy of the rows that a float64 scan's GEMM makes (``_inner``); the Lloyd
        # numerator converts a block at a time now, but its chunks keep this size, so its sums
        # (one chunk numerator added at a time) are the floats they were before
        return max(M, 1) + 2 * self._D

    def _prepare(self, C: torch.Tensor) -> torch.Tensor:
        return C.T.contiguous()  # (D, M)

    def _inner(self, sl: slice, W: torch.Tensor) -> torch.Tensor:
        return (self.G[sl].to(W.dtype) @ W).double()  # (n, D) @ (D, M) -> (n, M), float32 or float64

    def _numerator(self, sl: slice, labels: torch.Tensor, sign: torch.Tensor, M: int) -> torch.Tensor:
        """(M, D) float64: the chunk's rows index-added per label in row order, converted to float64
        a block of rows (about ``NUMERATOR_BLOCK_BYTES``) at a time into one buffer. The same floats
        as converting the whole chunk first (``index_add_`` adds row after row either way), but the
        block stays in cache and no chunk-sized float64 copy is allocated and paged in: at
        n = 20000, D = 4200 the numerator took 0.36 s with one copy and 0.04 s in blocks (1 thread,
        docs/performance.md row 4b)."""
        n = sl.stop - sl.start
        if labels.shape[0] != n or sign.shape[0] != n:
            raise ValueError(f"labels ({labels.shape[0]}) and sign ({sign.shape[0]}) need one entry per row "
                             f"of the chunk ({n})")
        num = torch.zeros(M, self._D, dtype=torch.float64, device=self.device)
        signed = not bool((sign == 1).all())  # plain K-means never needs the sign; same values
        step = max(1, NUMERATOR_BLOCK_BYTES // max(8 * self._D, 1))
        buf = torch.empty(min(step, n), self._D, dtype=torch.float64, device=self.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            rows = buf[:e - s]
            rows.copy_(self.G[sl.start + s:sl.start + e])  # float32 -> float64, exact
            if signed:
                rows.mul_(sign[s:e].unsqueeze(1))
            num.index_add_(0, labels[s:e], rows)
        return num

    def _dense(self, pos: np.ndarray) -> np.ndarray:
        return self.G_all[torch.as_tensor(pos, dtype=torch.int64, device=self.G_all.device)].double().cpu().numpy()


def make_shard(features: FactorFeatures | DenseFeatures, *, device: str | torch.device = "cpu",
               chunk_bytes: int = 64 * 2**20) -> FactorShard | DenseShard:
    """The in-memory shard for a feature container."""
    if isinstance(features, FactorFeatures):
        return FactorShard(features, device=device, chunk_bytes=chunk_bytes)
    if isinstance(features, DenseFeatures):
        return DenseShard(features, device=device, chunk_bytes=chunk_bytes)
    raise TypeError(f"expected FactorFeatures or DenseFeatures, got {type(features).__name__}")
