"""Weighted K-means and pivotal picks (spec section 4) against independent numpy / scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures
from pivotal_ray.core.kmeans import (INITS, DenseShard, FactorShard, LocalShardSet, assign, n_excluded, select_pivotal,
                                     weighted_kmeans)
from pivotal_ray.core.kmeans import _exclude, _merge
from pivotal_ray.core import shards as shards_mod
from pivotal_ray.core.shards import _permute_rows_striped, permute_rows_


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny GEMMs: thread wake-ups cost more than the work on a shared 2-core box
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_factor(n: int, *, K: int = 2, C: int = 3, d: int = 4, seed: int = 0, signed: bool = True) -> FactorFeatures:
    rng = np.random.default_rng(seed)
    A = rng.random((n, K, C)) if not signed else rng.standard_normal((n, K, C))
    X = rng.standard_normal((n, K, d)) if signed else rng.random((n, K, d))
    ids = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64)
    return FactorFeatures(ids, A.astype(np.float32), X.astype(np.float32))


def planted(n_per: int = 30, M: int = 5, *, K: int = 2, C: int = 4, d: int = 8, seed: int = 0):
    """RBC-like (non-negative) features: M directions, random magnitudes; returns (features, labels)."""
    rng = np.random.default_rng(seed)
    cls = np.arange(M) % C
    base = rng.random((M, K, d)) ** 3  # spiky non-negative bases, well apart in angle
    lab = np.repeat(np.arange(M), n_per)
    logits = 6.0 * np.eye(C)[cls[lab]][:, None, :] + 0.05 * rng.standard_normal((lab.size, K, C))
    A = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    X = np.abs(base[lab] + 0.01 * rng.standard_normal((lab.size, K, d)))
    X *= rng.uniform(0.5, 2.0, size=(lab.size, 1, 1))  # magnitudes vary; directions carry the clusters
    perm = rng.permutation(lab.size)
    return FactorFeatures(np.arange(lab.size, dtype=np.int64), A[perm].astype(np.float32),
                          X[perm].astype(np.float32)), lab[perm]


def as_dense(F: FactorFeatures) -> DenseFeatures:
    return DenseFeatures(F.sample_id, F.dense().astype(np.float32))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---- factorised == dense -------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [True, False])
def test_factor_matches_dense(weighted):
    F = random_factor(120, seed=1)
    fac, den = LocalShardSet([FactorShard(F)]), LocalShardSet([DenseShard(as_dense(F))])
    kf = weighted_kmeans(fac, n_clusters=6, weighted=weighted, seed=3, max_iter=50)
    kd = weighted_kmeans(den, n_clusters=6, weighted=weighted, seed=3, max_iter=50)
    assert kf.n_iter == kd.n_iter and kf.centroids.shape == kd.centroids.shape
    np.testing.assert_allclose(kf.centroids, kd.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kf.objective, kd.objective, rtol=1e-5)
    _, lf, sf = assign(fac, centroids=kf.centroids, weighted=weighted)
    _, ld, sd = assign(den, centroids=kf.centroids, weighted=weighted)
    np.testing.assert_array_equal(lf, ld)
    # plain scores -||G - C||^2 come from ||G||^2 - 2<G, C> + ||C||^2: float32 error ~ 1e-6 ||G||^2
    np.testing.assert_allclose(sf, sd, rtol=1e-5, atol=1e-6 * np.abs(sd).max())
    kw = dict(budget=7, meta_ids=F.sample_id[:4], exclude_frac=0.4, weighted=weighted, seed=5)
    sf, sd = select_pivotal(fac, **kw), select_pivotal(den, **kw)
    np.testing.assert_array_equal(sf.sample_id, sd.sample_id)
    np.testing.assert_array_equal(sf.excluded, sd.excluded)


def test_inner_products_match_materialised():
    F = random_factor(50, K=3, C=4, d=5, seed=2)
    G = F.dense().astype(np.float64)
    C = np.random.default_rng(0).standard_normal((7, G.shape[1]))
    ids, lab, score = assign(FactorShard(F), centroids=C, weighted=True)
    ref = np.abs(G @ C.T)  # (n, M)
    np.testing.assert_array_equal(lab, ref.argmax(1))
    np.testing.assert_allclose(score, ref.max(1) / np.linalg.norm(G, axis=1), rtol=1e-5)


def test_shard_split_does_not_change_result():
    F = random_factor(150, seed=4)
    kw = dict(budget=8, meta_ids=F.sample_id[::30], exclude_frac=0.5, seed=9)
    one = select_pivotal(FactorShard(F), **kw)
    three = select_pivotal([FactorShard(f) for f in F.split(3)], **kw)
    np.testing.assert_array_equal(one.sample_id, three.sample_id)
    np.testing.assert_allclose(one.centroids, three.centroids, rtol=1e-9, atol=1e-12)
    assert one.n_iter == three.n_iter


# ---- the update step and the objective against direct numpy --------------------------------

@pytest.mark.parametrize("signed,sign_align", [(False, True), (True, False), (True, True)])
def test_weighted_update_is_eq_s2(signed, sign_align):
    F = random_factor(40, seed=6, signed=signed)
    G = F.dense().astype(np.float64)
    C0 = G[[0, 5, 11]] / np.linalg.norm(G[[0, 5, 11]], axis=1, keepdims=True)
    km = weighted_kmeans(FactorShard(F), n_clusters=3, init=C0, max_iter=1, seed=0, sign_align=sign_align)
    inner = G @ C0.T  # (n, M)
    lab = np.abs(inner).argmax(1)
    s = np.sign(inner[np.arange(len(G)), lab]) if sign_align else np.ones(len(G))
    norms = np.linalg.norm(G, axis=1)
    ref = np.stack([(s[lab == i, None] * G[lab == i]).sum(0) / norms[lab == i].sum() for i in range(3)])  # eq. S2
    np.testing.assert_allclose(km.centroids, ref, rtol=1e-5, atol=1e-7)
    assert km.objective[0] == pytest.approx(np.abs(inner).max(1).sum(), rel=1e-6)  # MCO, eq. 9
    np.testing.assert_array_equal(km.sizes, np.bincount(lab, minlength=3))


def test_plain_kmeans_matches_sklearn():
    from sklearn.cluster import KMeans

    F, _ = planted(n_per=25, M=4, seed=3)
    G = F.dense().astype(np.float64)
    G += np.random.default_rng(1).normal(scale=0.05 * G.std(), size=G.shape)  # overlapping, so Lloyd moves
    C0 = G[np.random.default_rng(2).choice(len(G), 4, replace=False)]
    ours = weighted_kmeans(DenseFeatures(F.sample_id, G.astype(np.float32)), n_clusters=4, weighted=False,
                           init=C0, max_iter=100, tol=0.0, seed=0)
    sk = KMeans(n_clusters=4, init=C0, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(G)
    np.testing.assert_allclose(ours.centroids, sk.cluster_centers_, rtol=1e-4, atol=1e-5)
    assert ours.objective[-1] == pytest.approx(sk.inertia_, rel=1e-4)
    ids, lab, _ = assign(DenseFeatures(F.sample_id, G.astype(np.float32)), centroids=ours.centroids, weighted=False)
    np.testing.assert_array_equal(lab, sk.labels_)


# ---- planted clusters ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_clusters_recovered(seed):
    F, truth = planted(seed=seed)
    M = 5
    km = weighted_kmeans(F, n_clusters=M, seed=seed)
    _, lab, _ = assign(F, centroids=km.centroids)
    assert km.centroids.shape[0] == M and same_partition(lab, truth)
    # MCO can only fall in the first step (unit-norm seeds become weighted means, eq. S2);
    # after that, on well-separated data, Algorithm 1 does not decrease it
    assert np.all(np.diff(km.objective[1:]) >= -1e-9 * km.objective[-1])
    assert km.objective[-1] <= np.linalg.norm(F.dense(), axis=1).sum() * (1 + 1e-6)  # ||C_i|| <= 1
    sel = select_pivotal(F, budget=M, meta_ids=[], exclude_frac=0.0, seed=seed)
    assert sorted(truth[sel.sample_id].tolist()) == list(range(M))  # one pick per planted cluster


@pytest.mark.parametrize("init", ["kmeans++", "random"])
@pytest.mark.parametrize("weighted", [True, False])
def test_seeds_are_distinct_rows(init, weighted):
    F, truth = planted(seed=4)
    shards = LocalShardSet([FactorShard(f) for f in F.split(2)])
    G = F.dense().astype(np.float64)
    seeds = INITS.get(init)(shards, ids=F.sample_id, n_clusters=5, weighted=weighted,
                            rng=np.random.default_rng(11))
    ref = G / np.linalg.norm(G, axis=1, keepdims=True) if weighted else G  # S2 scale: unit norm
    rows = [int(np.flatnonzero(np.all(np.isclose(ref, c, rtol=1e-6, atol=1e-9), axis=1))[0]) for c in seeds]
    assert len(set(rows)) == 5
    if init == "kmeans++" and weighted:  # residual seeding lands once in each direction cluster
        assert sorted(truth[rows].tolist()) == list(range(5))


def test_exclusion_drops_the_cluster_of_the_meta_samples():
    F, truth = planted(seed=1)
    meta = F.sample_id[truth == 2][:3]
    n_cand = len(F) - 3
    sel = select_pivotal(F, budget=4, meta_ids=meta, exclude_frac=0.1, seed=0)
    # 10% of 147 candidates = 14 excluded, all from the meta samples' own cluster (27 left there)
    assert sel.excluded.size == n_excluded(n_cand, 0.1) == 14
    assert set(truth[np.searchsorted(F.sample_id, sel.excluded)]) == {2}


# ---- degenerate input -----------------------------------------------------------------------

def test_empty_clusters_are_dropped_and_budget_topped_up():
    rng = np.random.default_rng(0)
    G = rng.random((3, 12))[np.arange(60) % 3]  # 3 distinct rows, 20 copies each: 3 clusters at most
    feats = DenseFeatures(np.arange(60, dtype=np.int64), G.astype(np.float32))
    sel = select_pivotal(feats, budget=6, meta_ids=[], exclude_frac=0.0, seed=1)
    assert sel.n_clusters == 3 and sel.sample_id.size == 6 and np.unique(sel.sample_id).size == 6
    assert np.all(np.isfinite(sel.centroids)) and np.all(np.isfinite(sel.score))


def test_an_empty_cluster_restarts_kmeans_with_fewer_clusters():
    """The paper's rule: with M_empty empty clusters, K-means is run again from the start with
    M - M_empty clusters. From explicit initial centroids that is a run from the surviving rows:
    the same centroids, objective history and sizes as a fresh run from them."""
    feats = planted(n_per=20, M=4, seed=2)[0]
    init = weighted_kmeans(feats, n_clusters=4, seed=0, max_iter=50).centroids
    D = init.shape[1]
    stray = np.zeros((1, D))
    stray[0, 0] = -1e-6  # wins no row: |<G_j, c>| is about 1e-6 of the others
    km = weighted_kmeans(feats, n_clusters=5, init=np.vstack([init[:2], stray, init[2:]]), seed=0, max_iter=50)
    fresh = weighted_kmeans(feats, n_clusters=4, init=init, seed=0, max_iter=50)
    assert (km.n_dropped, km.restarts) == (1, 1) and (fresh.n_dropped, fresh.restarts) == (0, 0)
    np.testing.assert_array_equal(km.centroids, fresh.centroids)
    assert km.objective == fresh.objective and km.n_iter == fresh.n_iter + 1  # + the pass that emptied it
    np.testing.assert_array_equal(km.sizes, fresh.sizes)


def test_restarts_end_with_no_empty_cluster_and_repeat_for_a_seed():
    rng = np.random.default_rng(1)
    G = np.abs(rng.standard_normal((400, 3))) * rng.gamma(0.5, 1.0, (400, 1))  # heavy-tailed norms
    feats = DenseFeatures(np.arange(400, dtype=np.int64), G.astype(np.float32))
    # the paper's random init at M = 40 empties a cluster for some seeds (3 and 4 here)
    runs = [weighted_kmeans(feats, n_clusters=40, init="random", seed=s, max_iter=30) for s in range(6) for _ in (0, 1)]
    for a, b in zip(runs[::2], runs[1::2]):  # same seed, same result
        np.testing.assert_array_equal(a.centroids, b.centroids)
        assert (a.n_dropped, a.restarts, a.objective) == (b.n_dropped, b.restarts, b.objective)
    for km in runs:
        assert km.centroids.shape[0] == 40 - km.n_dropped and (km.sizes > 0).all() and km.sizes.sum() == 400
        assert (km.restarts > 0) == (km.n_dropped > 0)
    assert any(km.restarts for km in runs), "no seed emptied a cluster: the restart path went untested"


def test_zero_rows_do_not_produce_nan():
    F = random_factor(40, seed=8)
    A = F.A.copy()
    A[:10] = 0.0  # ten all-zero G_j
    F = FactorFeatures(F.sample_id, A, F.X)
    for weighted in (True, False):
        sel = select_pivotal(F, budget=5, meta_ids=F.sample_id[:2], exclude_frac=0.5, seed=0, weighted=weighted)
        assert np.all(np.isfinite(sel.centroids)) and np.all(np.isfinite(sel.objective))
        assert np.all(np.isfinite(sel.score)) and np.unique(sel.sample_id).size == 5


def test_errors_name_the_fix():
    F = random_factor(20, seed=0)
    with pytest.raises(ValueError, match="lower the budget or exclude_frac"):
        select_pivotal(F, budget=10, meta_ids=F.sample_id[:2], exclude_frac=0.5, seed=0)
    with pytest.raises(ValueError, match="extract features"):
        select_pivotal(F, budget=3, meta_ids=[10**9], exclude_frac=0.5, seed=0)
    with pytest.raises(ValueError, match="choose one of"):
        select_pivotal(F, budget=3, meta_ids=[], exclude_frac=0.5, seed=0, init="farthest")
    with pytest.raises(ValueError, match="exclude_frac"):
        select_pivotal(F, budget=3, meta_ids=[], exclude_frac=1.0, seed=0)
    with pytest.raises(TypeError, match="FactorFeatures"):
        select_pivotal(F.dense(), budget=3, meta_ids=[], exclude_frac=0.5, seed=0)


# ---- properties -------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(12, 60), budget=st.integers(1, 8), n_meta=st.integers(0, 5),
       frac=st.sampled_from([0.0, 0.25, 0.5, 0.7]), seed=st.integers(0, 2**31 - 1),
       weighted=st.booleans(), factor=st.booleans(), n_shards=st.integers(1, 3))
def test_selection_properties(n, budget, n_meta, frac, seed, weighted, factor, n_shards):
    F = random_factor(n, seed=seed % 1000)
    feats = F if factor else as_dense(F)
    meta = F.sample_id[np.random.default_rng(seed).choice(n, n_meta, replace=False)]
    n_cand = n - n_meta
    n_excl = n_excluded(n_cand, frac) if n_meta else 0
    make = FactorShard if factor else DenseShard
    shards = [make(f) for f in feats.split(n_shards)]
    kw = dict(budget=budget, meta_ids=meta, exclude_frac=frac, weighted=weighted, seed=seed, max_iter=30)
    if budget > n_cand - n_excl:
        with pytest.raises(ValueError, match="exceeds"):
            select_pivotal(shards, **kw)
        return
    sel = select_pivotal(shards, **kw)
    picks = sel.sample_id
    assert picks.shape == (budget,) and np.unique(picks).size == budget
    assert not np.isin(picks, meta).any() and not np.isin(picks, sel.excluded).any()
    assert np.isin(picks, F.sample_id).all()
    assert sel.excluded.size == n_excl and not np.isin(sel.excluded, meta).any()
    if n_excl:  # the excluded are the candidates most similar to the meta set (float64 reference)
        G = F.dense().astype(np.float64)
        U = G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-300)
        sim = np.abs(U @ U[np.isin(F.sample_id, meta)].T).max(1)
        cand = ~np.isin(F.sample_id, meta)
        ex = np.isin(F.sample_id, sel.excluded)
        assert sim[ex].min() >= sim[cand & ~ex].max(initial=-1.0) - 1e-5
    assert sel.n_clusters <= budget and len(sel.objective) == sel.n_iter
    again = select_pivotal(shards, **kw)  # same seed, same data -> same picks; shards left reusable
    np.testing.assert_array_equal(again.sample_id, picks)


@pytest.mark.parametrize("block_rows", [None, 1, 4])
@pytest.mark.parametrize("signs", ["all_plus", "mixed"])
def test_dense_numerator_is_signed_sum_per_label(signs, block_rows, monkeypatch):
    """DenseShard._numerator == index_add of sign_j G_j in float64 over the whole chunk at once, bit
    for bit (signs applied only when needed), however many rows each float64 block converts."""
    if block_rows is not None:
        monkeypatch.setattr(shards_mod, "NUMERATOR_BLOCK_BYTES", 8 * 7 * block_rows)
    rng = np.random.default_rng(4)
    G = (rng.standard_normal((30, 7)) * 10.0 ** rng.integers(-3, 4, (30, 1))).astype(np.float32)
    shard = DenseShard(DenseFeatures(np.arange(30, dtype=np.int64), G))
    labels = torch.as_tensor(rng.integers(0, 4, 30))
    sign = torch.ones(30, dtype=torch.float64)
    if signs == "mixed":
        sign[::3] = -1.0
    for sl in (slice(0, 30), slice(5, 27)):  # a chunk that does not start at row 0
        got = shard._numerator(sl, labels[sl], sign[sl], 4)
        rows = torch.as_tensor(G[sl]).double() * sign[sl, None]
        ref = torch.zeros(4, 7, dtype=torch.float64).index_add_(0, labels[sl], rows)
        assert torch.equal(got, ref)
    assert torch.equal(shard.G_all, torch.as_tensor(G))  # the shard's rows are untouched


def test_dense_numerator_refuses_labels_or_signs_not_one_per_row():
    shard = DenseShard(DenseFeatures(np.arange(10, dtype=np.int64), np.ones((10, 3), dtype=np.float32)))
    ones = torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="one entry per row"):
        shard._numerator(slice(0, 10), torch.zeros(12, dtype=torch.int64), ones, 2)
    with pytest.raises(ValueError, match="one entry per row"):
        shard._numerator(slice(0, 10), torch.zeros(10, dtype=torch.int64), ones[:1], 2)
    assert shard._numerator(slice(4, 4), torch.zeros(0, dtype=torch.int64), ones[:0], 2).abs().sum() == 0


def test_reading_a_shard_range_reads_only_that_range(tmp_path):
    """The sample_id range goes into the parquet reader: rows outside it never load, and the
    result equals filtering the whole table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pivotal_ray.core.densetable import read_dense_table
    from pivotal_ray.core.featuretable import read_rows

    rng = np.random.default_rng(0)
    n, K, W = 40, 2, 3
    sid = np.repeat(np.arange(n), K)
    snap = np.tile(np.arange(K), n)
    g = rng.normal(size=(n * K, W)).astype(np.float32)
    perm = rng.permutation(n * K)  # any row order on disk
    tbl = pa.table({"sample_id": sid[perm], "snapshot": snap[perm].astype(np.int32),
                    "g": pa.FixedSizeListArray.from_arrays(pa.array(g[perm].ravel()), W)})
    pq.write_table(tbl, tmp_path / "part-0.parquet", row_group_size=8)
    want = np.arange(10, 20)
    rows = read_rows([tmp_path / "part-0.parquet"], columns=["sample_id"], sample_ids=want)
    assert rows.num_rows == len(want) * K
    part = read_dense_table(tmp_path, sample_ids=want)
    whole = read_dense_table(tmp_path)
    np.testing.assert_array_equal(part.sample_id, want)
    np.testing.assert_array_equal(part.G, whole.G[10:20])


def _write_factor_table(path, F: FactorFeatures, *, seed: int = 0, row_group_size: int = 8) -> None:
    """F's rows as a factor table in two files, rows shuffled (any order on disk), small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pivotal_ray.core.featuretable import factor_schema

    n, K, C = F.A.shape
    d = F.X.shape[2]
    sid, snap = np.repeat(F.sample_id, K), np.tile(np.arange(K, dtype=np.int32), n)
    A, X = F.A.reshape(n * K, C), F.X.reshape(n * K, d)
    perm = np.random.default_rng(seed).permutation(n * K)
    for part, rows in enumerate(np.array_split(perm, 2)):
        tbl = pa.table({"sample_id": sid[rows], "snapshot": snap[rows], "epoch": 3 + snap[rows],
                        "A": pa.FixedSizeListArray.from_arrays(pa.array(A[rows].ravel()), C),
                        "x": pa.FixedSizeListArray.from_arrays(pa.array(X[rows].ravel()), d)},
                       schema=factor_schema(C, d))
        pq.write_table(tbl, path / f"part-{part}.parquet", row_group_size=row_group_size)


def test_factor_table_reads_back_snapshot_major_whole_or_a_range(tmp_path):
    """read_factor_table streams any row order back into sample_id order, a shard's id range
    alone when asked, as (n, K, C) / (n, K, d) views of snapshot-major (K, n, .) arrays; a sample
    missing a snapshot is refused."""
    from pivotal_ray.core.featuretable import read_factor_table

    F = random_factor(40, K=3, C=4, d=5, seed=3)
    _write_factor_table(tmp_path, F)
    whole = read_factor_table(tmp_path)
    np.testing.assert_array_equal(whole.sample_id, F.sample_id)
    np.testing.assert_array_equal(whole.A, F.A)
    np.testing.assert_array_equal(whole.X, F.X)
    for a in (whole.A, whole.X):  # the shard's layout: transposing back gives a C-contiguous array
        assert a.transpose(1, 0, 2).flags.c_contiguous and a.flags.writeable and a.dtype == np.float32
    want = F.sample_id[10:20]
    part = read_factor_table(tmp_path, sample_ids=want)
    np.testing.assert_array_equal(part.sample_id, want)
    np.testing.assert_array_equal(part.A, F.A[10:20])
    np.testing.assert_array_equal(part.X, F.X[10:20])
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "part-0.parquet")
    pq.write_table(t.slice(1), tmp_path / "part-0.parquet")  # one (sample, snapshot) row lost
    with pytest.raises(ValueError, match="incomplete.*re-run extract_features"):
        read_factor_table(tmp_path)


def test_factor_shard_holds_the_read_factors_without_a_copy(tmp_path):
    """A FactorShard on read_factor_table's output computes in that memory (the table is held
    once), leaves it in order after a whole selection, and picks as a shard on a private copy;
    read-only factors in the same layout (e.g. from Ray's object store) are copied once."""
    from pivotal_ray.core.featuretable import read_factor_table

    F = random_factor(80, K=2, C=3, d=6, seed=4, signed=False)
    _write_factor_table(tmp_path, F)
    feats = read_factor_table(tmp_path)
    A0, X0 = feats.A.copy(), feats.X.copy()
    shard = FactorShard(feats)
    assert np.shares_memory(shard.A_all.numpy(), feats.A) and np.shares_memory(shard.X_all.numpy(), feats.X)
    ro_A, ro_X = feats.A.copy(), feats.X.copy()
    ro_A = np.ascontiguousarray(ro_A.transpose(1, 0, 2)).transpose(1, 0, 2)  # snapshot-major, read-only
    ro_X = np.ascontiguousarray(ro_X.transpose(1, 0, 2)).transpose(1, 0, 2)
    ro_A.flags.writeable = ro_X.flags.writeable = False
    private = FactorShard(FactorFeatures(feats.sample_id, ro_A, ro_X))
    assert not np.shares_memory(private.A_all.numpy(), ro_A)
    kw = dict(budget=6, meta_ids=F.sample_id[:5], exclude_frac=0.5, seed=0)
    got = select_pivotal(LocalShardSet([shard]), **kw)
    ref = select_pivotal(LocalShardSet([private]), **kw)
    np.testing.assert_array_equal(got.sample_id, ref.sample_id)
    np.testing.assert_array_equal(feats.A, A0)  # back in order
    np.testing.assert_array_equal(feats.X, X0)


# ---- shards hold their rows once ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_bytes", [1, 40, 64 * 2**20])  # cycles; stripes of 1 column; whole
def test_permute_rows_in_place_equals_gather(kind, seed, chunk_bytes):
    """permute_rows_(a, src) leaves a == a0[src] for any permutation, in the same memory, by each
    of its strategies: cycles (array over chunk_bytes, CPU), one gather (array within it), and
    column stripes (the path of non-CPU tensors, called directly)."""
    rng = np.random.default_rng(seed)
    a0 = rng.standard_normal((40, 3)).astype(np.float32)  # 480 bytes
    src = rng.permutation(40) if seed else np.concatenate([np.arange(5, 40), np.arange(5)])  # one long cycle
    for fn in (permute_rows_, _permute_rows_striped):
        a = a0.copy() if kind == "numpy" else torch.as_tensor(a0.copy())
        ptr = a.ctypes.data if kind == "numpy" else a.data_ptr()
        fn(a, src, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(np.asarray(a), a0[src])
        assert (a.ctypes.data if kind == "numpy" else a.data_ptr()) == ptr
    permute_rows_(a, np.arange(40), chunk_bytes=chunk_bytes)  # identity: nothing moves
    np.testing.assert_array_equal(np.asarray(a), a0[src])
    with pytest.raises(ValueError, match="permutation"):
        permute_rows_(a, np.zeros(40, dtype=np.int64))


def test_factor_shard_excludes_rows_without_copying_them():
    """A factor shard reorders its (K, n, C) / (K, n, d) slabs in place: the active rows are views
    of the first count() rows, results equal those of the dense reference, and every row is back
    in its order once all are active again."""
    F = random_factor(60, K=3, C=4, d=5, seed=8)
    fs, ds = FactorShard(F), DenseShard(DenseFeatures(F.sample_id, F.dense().astype(np.float32)))
    A0, X0 = fs.A_all.clone(), fs.X_all.clone()
    drop = F.sample_id[[2, 9, 10, 33, 59]]
    assert fs.set_active(exclude_ids=drop) == ds.set_active(exclude_ids=drop) == 55
    assert fs.A.data_ptr() == fs.A_all.data_ptr() and fs.X.data_ptr() == fs.X_all.data_ptr()
    keep = ~np.isin(F.sample_id, drop)
    np.testing.assert_array_equal(fs.sample_ids(), F.sample_id[keep])
    np.testing.assert_array_equal(fs.A.numpy(), A0.numpy()[:, keep])
    np.testing.assert_allclose(fs.dense_rows(sample_ids=drop)[1], F.dense()[~keep], rtol=1e-5, atol=1e-7)
    C = np.random.default_rng(1).standard_normal((3, fs.dim()))
    for w in (False, True):
        la, sa = fs.assign(centroids=C, weighted=w)
        lb, sb = ds.assign(centroids=C, weighted=w)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    fs.set_active(exclude_ids=np.zeros(0, dtype=np.int64))
    assert torch.equal(fs.A_all, A0) and torch.equal(fs.X_all, X0)


def test_dense_shard_excludes_rows_without_copying_them():
    """Excluding rows moves the active ones to the front of the shard's own array (a view, no copy);
    excluded rows stay readable, results equal a shard on a private copy, and the caller's rows are
    back in their order once every row is active again."""
    F = random_factor(50, seed=5)
    G = F.dense().astype(np.float32)
    ro = G.copy()
    ro.flags.writeable = False  # read-only input (e.g. Ray's object store): copied once
    shared, private = DenseShard(DenseFeatures(F.sample_id, G)), DenseShard(DenseFeatures(F.sample_id, ro))
    assert np.shares_memory(shared.G_all.numpy(), G) and not np.shares_memory(private.G_all.numpy(), ro)
    drop = F.sample_id[[0, 3, 4, 20, 49]]
    for shard in (shared, private):
        assert shard.set_active(exclude_ids=drop) == 45
        assert shard.G.data_ptr() == shard.G_all.data_ptr()  # the active rows are a view
        keep = ~np.isin(F.sample_id, drop)
        np.testing.assert_array_equal(shard.sample_ids(), F.sample_id[keep])
        np.testing.assert_array_equal(shard.G.numpy(), ro[keep])
        ids, rows = shard.dense_rows(sample_ids=drop)
        np.testing.assert_array_equal(ids, drop)
        np.testing.assert_array_equal(rows, ro[~keep].astype(np.float64))
    kw = dict(budget=4, meta_ids=F.sample_id[[1, 7]], exclude_frac=0.5, seed=3, max_iter=20)
    a, b = select_pivotal([shared], **kw), select_pivotal([private], **kw)
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(G, ro)  # select_pivotal leaves every row active, in order


# ---- the (M, D) centroid sums are made once ------------------------------------------------------

def test_reduce_sums_parts_in_order_without_writing_to_them():
    """_reduce adds the shards' partial sums into one new numerator: the floats of
    parts[0] + parts[1] + parts[2] (PartialSums.__add__), read-only parts (Ray's object store)
    untouched."""
    from pivotal_ray.core.kmeans import _reduce
    from pivotal_ray.core.shards import PartialSums

    rng = np.random.default_rng(0)
    parts = []
    for s in range(3):
        numer = rng.standard_normal((4, 50)) * 10.0 ** rng.integers(-3, 4, size=(4, 50))
        numer.flags.writeable = False
        parts.append(PartialSums(numer, rng.random(4), rng.integers(0, 9, 4), float(rng.random())))
    before = [p.numer.copy() for p in parts]
    got = _reduce(parts)
    want = parts[0] + parts[1] + parts[2]
    assert np.array_equal(got.numer, want.numer) and got.numer.flags.writeable
    np.testing.assert_array_equal(got.denom, want.denom)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert got.objective == want.objective
    for p, b in zip(parts, before):
        np.testing.assert_array_equal(p.numer, b)
    assert _reduce(parts[:1]).numer is not parts[0].numer  # one shard: still a writeable copy


@pytest.mark.parametrize("signs", ["ones", "mixed"])
def test_factor_numerator_added_in_place_equals_adding_chunk_numerators(signs):
    """A factor shard adds each chunk's cluster sums into the (M, D) numerator in place: the same
    floats as forming the chunk's whole (M, D) numerator and adding it."""
    F = random_factor(90, K=3, C=4, d=5, seed=11)
    shard = FactorShard(F)
    rng = np.random.default_rng(1)
    labels = torch.as_tensor(rng.integers(0, 6, 90))
    labels[labels == 4] = 5  # cluster 4 has no members
    sign = torch.ones(90, dtype=torch.float64)
    if signs == "mixed":
        sign[::4] = -1.0
    chunks = [slice(0, 37), slice(37, 90)]
    ref = torch.zeros(6, shard.dim(), dtype=torch.float64)
    got = torch.zeros(6, shard.dim(), dtype=torch.float64)
    for sl in chunks:
        ref += shard._numerator(sl, labels[sl], sign[sl], 6)
        shard._add_numerator(got, sl, labels[sl], sign[sl])
    assert torch.equal(got, ref)
    dense = F.dense().astype(np.float64) * sign.numpy()[:, None]
    want = np.zeros((6, shard.dim()))
    np.add.at(want, labels.numpy(), dense)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# ---- selection scans do not depend on the shard split ---------------------------------------

def near_parallel(n: int, D: int, *, seed: int, offset: float = 0.0) -> tuple[DenseFeatures, np.ndarray]:
    """Rows v + 1e-4 noise (+ offset): their scores against v differ only in the 8th digit, below
    float32 GEMM error, so a float32 scan ranks them by rounding. Returns (features, v)."""
    rng = np.random.default_rng(seed)
    v = rng.random(D) + offset
    G = (v + 1e-4 * rng.standard_normal((n, D))).astype(np.float32)
    ids = np.sort(rng.choice(100 * n, size=n, replace=False)).astype(np.int64)
    return DenseFeatures(ids, G), v


def exact_top(G: np.ndarray, ids: np.ndarray, C: np.ndarray, k: int, weighted: bool) -> np.ndarray:
    G = G.astype(np.float64)
    s = np.abs(G @ C) / np.linalg.norm(G, axis=1) if weighted else -np.square(G - C).sum(1)
    return ids[np.lexsort((ids, -s))[:k]]


def splits(F: DenseFeatures):
    """One shard, one shard in small chunks, 3 and 7 shards: built one split at a time, as a
    shard reorders the rows it holds (F's own for the first two) while some are excluded."""
    yield [DenseShard(F)]
    yield [DenseShard(F, chunk_bytes=4096)]
    yield [DenseShard(f, chunk_bytes=8192) for f in F.take(np.arange(len(F))).split(3)]
    yield [DenseShard(f) for f in F.take(np.arange(len(F))).split(7)]


@pytest.mark.parametrize("weighted", [True, False])
def test_top_candidates_are_the_exact_ones_under_every_split(weighted):
    F, v = near_parallel(600, 300, seed=3, offset=0.0 if weighted else 50.0)
    C = np.stack([v, v[::-1]])  # (2, D)
    ref = [exact_top(F.G, F.sample_id, c, 5, weighted) for c in C]
    for shards in splits(F):
        ss = LocalShardSet(shards)
        got = _merge(ss, ss.call("top_candidates", centroids=C, weighted=weighted, k=5, n_best=4),
                     k=5, n_best=4, centroids=C, weighted=weighted)
        for i in range(2):
            np.testing.assert_array_equal(got.ids[i], ref[i])


def test_exclusion_is_exact_under_every_split():
    F, v = near_parallel(500, 300, seed=5)
    meta = F.sample_id[[7]]
    cand = F.sample_id[np.arange(len(F)) != 7]
    g, m = F.G[np.arange(len(F)) != 7].astype(np.float64), F.G[7].astype(np.float64)
    cos = np.abs(g @ m) / (np.linalg.norm(g, axis=1) * np.linalg.norm(m))
    ref = np.sort(cand[np.lexsort((cand, -cos))[:123]])
    for shards in splits(F):
        ss = LocalShardSet(shards)
        ss.call("set_active", exclude_ids=meta)
        got = _exclude(ss, meta_ids=meta, n_exclude=123)
        ss.call("set_active", exclude_ids=np.zeros(0, dtype=np.int64))  # F's rows back in order
        np.testing.assert_array_equal(got, ref)


def test_equidistant_rows_tie_to_the_smaller_id_under_every_split():
    # centroid i is the midpoint of rows a_i, b_i: both are exactly equally far from it, but
    # ||G||^2 - 2<G, C> + ||C||^2 rounds differently for each; the tie must go to the smaller id
    rng = np.random.default_rng(11)
    F = DenseFeatures(np.arange(400, dtype=np.int64) * 3, rng.standard_normal((400, 64)).astype(np.float32))
    pairs = rng.choice(400, size=(20, 2), replace=False)  # (M, 2) row indices, 40 distinct rows
    G = F.G.astype(np.float64)
    C = (G[pairs[:, 0]] + G[pairs[:, 1]]) / 2.0  # (20, 64), exact in float64
    want = F.sample_id[pairs].min(1)
    for shards in splits(F):
        ss = LocalShardSet(shards)
        got = _merge(ss, ss.call("top_candidates", centroids=C, weighted=False, k=2, n_best=1),
                     k=2, n_best=1, centroids=C, weighted=False)
        np.testing.assert_array_equal(got.ids[:, 0], want)
        np.testing.assert_array_equal(got.scores[:, 0], got.scores[:, 1])  # the tie, exactly


@pytest.mark.parametrize("weighted", [True, False])
def test_near_tie_assignments_follow_exact_scores_under_every_split(weighted):
    # two centroids 1e-9 apart: every row's two gains differ below float32 GEMM error, so the
    # float32 argmax is decided by rounding (which depends on the GEMM's shape); rows that close
    # are assigned by float64 scores computed from the row alone instead
    from pivotal_ray.core.kmeans import assign as assign_rows

    rng = np.random.default_rng(2)
    F = DenseFeatures(np.arange(500, dtype=np.int64) * 7, rng.random((500, 256)).astype(np.float32))
    c = rng.random(256)
    c /= np.linalg.norm(c)
    C = np.stack([c, c + 1e-9 * rng.standard_normal(256)])  # (2, D)
    G = F.G.astype(np.float64)
    gains = np.stack([np.abs((G * ci).sum(1)) if weighted else -np.square(G - ci).sum(1) for ci in C], 1)
    want = gains.argmax(1)
    assert 0 < want.sum() < len(want)  # both centroids win somewhere
    for shards in splits(F):
        _, lab, _ = assign_rows(LocalShardSet(shards), centroids=C, weighted=weighted)
        np.testing.assert_array_equal(lab, want)
        p = LocalShardSet(shards).call("assign_sums", centroids=C, weighted=weighted)
        np.testing.assert_array_equal(sum(q.counts for q in p), np.bincount(want, minlength=2))


@pytest.mark.parametrize("K, C, d, M", [(5, 10, 84, 10), (5, 100, 512, 20)])  # MNIST, CIFAR-100 shapes
def test_float32_gemm_error_is_far_below_F32_REL_ERR(K, C, d, M):
    # the bound _labels settles near-ties with: the float32 inner products of RBC-like factors
    # (softmax A, ReLU x~) with centroids made of member rows stay 10x inside it
    from pivotal_ray.core.shards import F32_REL_ERR

    rng = np.random.default_rng(0)
    z = rng.standard_normal((200, K, C)) * 2.0
    A = np.exp(z - z.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    X = np.maximum(rng.standard_normal((200, K, d)), 0.0)
    F = FactorFeatures(np.arange(200, dtype=np.int64), A.astype(np.float32), X.astype(np.float32))
    s = FactorShard(F)
    Cn = s._dense(rng.choice(200, size=M, replace=False))  # (M, K C d) float64
    inner = s._inner(slice(0, 200), s._centroids(Cn).W).numpy()  # float32 GEMMs
    A64, X64 = F.A.astype(np.float64), F.X.astype(np.float64)
    exact = np.einsum("nkc,mkcd,nkd->nm", A64, Cn.reshape(M, K, C, d), X64)  # float64, no float32 rounding of C
    scale = np.sqrt(s._sq_all.numpy())[:, None] * np.linalg.norm(Cn, axis=1)[None]
    assert (np.abs(inner - exact) / scale).max() < F32_REL_ERR / 10  # measured: 6.6e-8 and 1.1e-7


# ---- the signed (l2rw) geometry, eqs. S13-S14 ---------------------------------------------------

def test_signed_update_and_objective_are_s14_and_s2_literally():
    F = random_factor(40, seed=6, signed=True)
    G = F.dense().astype(np.float64)
    C0 = G[[0, 5, 11]] / np.linalg.norm(G[[0, 5, 11]], axis=1, keepdims=True)
    for sign_align in (True, False):  # signed updates by S2 literally whatever sign_align says
        km = weighted_kmeans(FactorShard(F), n_clusters=3, init=C0, max_iter=1, seed=0, signed=True,
                             sign_align=sign_align)
        inner = G @ C0.T  # (n, M)
        lab = inner.argmax(1)  # no absolute value
        assert (np.abs(inner).argmax(1) != lab).any()  # the two geometries disagree on this data
        norms = np.linalg.norm(G, axis=1)
        ref = np.stack([G[lab == i].sum(0) / norms[lab == i].sum() for i in range(3)])
        np.testing.assert_allclose(km.centroids, ref, rtol=1e-5, atol=1e-7)
        assert km.objective[0] == pytest.approx(inner.max(1).sum(), rel=1e-6)  # sum_j max_i <G_j, C_i>
        np.testing.assert_array_equal(km.sizes, np.bincount(lab, minlength=3))
    _, lab, score = assign(FactorShard(F), centroids=C0, weighted=True, signed=True)
    np.testing.assert_array_equal(lab, inner.argmax(1))
    np.testing.assert_allclose(score, inner.max(1) / np.linalg.norm(G, axis=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factor", [True, False])
def test_signed_equals_abs_bit_for_bit_on_non_negative_features(factor):
    # label-free RBC on ReLU features: every inner product is >= 0, so dropping |.| changes nothing
    F = random_factor(200, seed=12, signed=False)
    feats = F if factor else as_dense(F)
    kw = dict(budget=7, meta_ids=F.sample_id[:5], exclude_frac=0.5, seed=4)
    a, s = select_pivotal(feats, **kw), select_pivotal(feats, signed=True, **kw)
    np.testing.assert_array_equal(a.sample_id, s.sample_id)
    np.testing.assert_array_equal(a.excluded, s.excluded)
    np.testing.assert_array_equal(a.centroids, s.centroids)
    np.testing.assert_array_equal(a.score, s.score)
    assert a.objective == s.objective


def test_signed_exclusion_keeps_rows_anti_aligned_with_the_meta_samples():
    # a meta sample m, rows close to +m and rows close to -m: under l2rw a -m row's weight is not
    # raised by m (its inner product is negative), so it is not excluded as covered; |cos| drops both
    rng = np.random.default_rng(3)
    m = rng.standard_normal(16)
    plus = m + 0.05 * rng.standard_normal((20, 16))
    minus = -m + 0.05 * rng.standard_normal((20, 16))
    other = rng.standard_normal((60, 16))
    G = np.concatenate([m[None], plus, minus, other]).astype(np.float32)  # ids 0 | 1-20 | 21-40 | 41-100
    F = DenseFeatures(np.arange(len(G), dtype=np.int64), G)
    ss = LocalShardSet([DenseShard(F)])
    ss.call("set_active", exclude_ids=np.array([0]))
    signed = _exclude(ss, meta_ids=np.array([0]), n_exclude=20, signed=True)
    absolute = _exclude(ss, meta_ids=np.array([0]), n_exclude=40)
    np.testing.assert_array_equal(signed, np.arange(1, 21))
    np.testing.assert_array_equal(absolute, np.arange(1, 41))


def test_signed_kmeanspp_seeds_both_sides_of_a_line():
    # two clusters along +v and -v: one line, two half-lines. Signed seeding scores a -v row by
    # its distance to the +v half-line (2 ||G||^2 for an exact mirror), so the two seeds land on
    # opposite sides; the |cos| residual of a -v row to the +v line is ~0
    rng = np.random.default_rng(5)
    v = rng.standard_normal(24)
    G = np.concatenate([v + 0.01 * rng.standard_normal((30, 24)), -v + 0.01 * rng.standard_normal((30, 24))])
    F = DenseFeatures(np.arange(60, dtype=np.int64), G.astype(np.float32))
    for seed in range(5):
        km = weighted_kmeans(F, n_clusters=2, seed=seed, signed=True, max_iter=20)
        _, lab, _ = assign(F, centroids=km.centroids, weighted=True, signed=True)
        assert sorted(np.bincount(lab, minlength=2).tolist()) == [30, 30]
        assert same_partition(lab, np.repeat([0, 1], 30))


@pytest.mark.parametrize("factor", [True, False])
def test_signed_selection_does_not_depend_on_the_split(factor):
    F = random_factor(150, seed=4)
    feats = F if factor else as_dense(F)
    make = FactorShard if factor else DenseShard
    kw = dict(budget=8, meta_ids=F.sample_id[::30], exclude_frac=0.5, seed=9, signed=True)
    one = select_pivotal(make(feats), **kw)
    three = select_pivotal([make(f) for f in feats.split(3)], **kw)
    small = select_pivotal(make(feats, chunk_bytes=2048), **kw)
    for other in (three, small):
        np.testing.assert_array_equal(one.sample_id, other.sample_id)
        np.testing.assert_array_equal(one.excluded, other.excluded)
        np.testing.assert_allclose(one.centroids, other.centroids, rtol=1e-9, atol=1e-12)
    # the exclusion ranks by the signed cosine (float64 reference)
    G = F.dense().astype(np.float64)
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    meta = np.isin(F.sample_id, F.sample_id[::30])
    sim = (U @ U[meta].T).max(1)
    ex = np.isin(F.sample_id, one.excluded)
    assert sim[ex].min() >= sim[~meta & ~ex].max() - 1e-9


# ---- mutation audit: properties no earlier test pinned down -------------------------------------

def test_n_excluded_is_the_floor_despite_binary_rounding():
    # 0.29 * 100 = 28.999999999999996 and 0.57 * 100 = 56.99999999999999 in binary floating point
    assert n_excluded(100, 0.29) == 29 and n_excluded(100, 0.57) == 57
    assert n_excluded(7, 0.5) == 3 and n_excluded(147, 0.1) == 14 and n_excluded(5, 0.0) == 0


def test_weighted_kmeans_rejects_a_negative_tol():
    with pytest.raises(ValueError, match="tol"):
        weighted_kmeans(random_factor(10), n_clusters=2, seed=0, tol=-1.0)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_one_cluster_per_row_seeds_every_row_once(init):
    # M = n rows in general position: seeds are M distinct rows, and each row then stays with its
    # own seed (Cauchy-Schwarz: |<G_j, G_j/||G_j||>| beats every other unit direction), so no
    # cluster comes out empty; a repeated seed would empty one and force a restart
    rng = np.random.default_rng(7)
    feats = DenseFeatures(np.arange(12, dtype=np.int64) * 5, rng.random((12, 6)).astype(np.float32))
    for seed in range(4):
        km = weighted_kmeans(feats, n_clusters=12, init=init, seed=seed, max_iter=5)
        assert (km.n_dropped, km.restarts) == (0, 0) and km.sizes.tolist() == [1] * 12


def test_lloyd_stops_at_the_first_relative_change_within_tol():
    # the stopping rule: iterate until |f_t - f_{t-1}| / |f_{t-1}| <= tol, not before
    F = random_factor(300, K=2, C=3, d=4, seed=21)
    for tol in (1e-2, 1e-4):
        km = weighted_kmeans(F, n_clusters=8, seed=1, tol=tol, max_iter=200)
        obj = np.asarray(km.objective)
        rel = np.abs(np.diff(obj)) / np.abs(obj[:-1])
        assert km.restarts == 0 and km.n_iter == obj.size < 200
        assert rel[-1] <= tol and (rel[:-1] > tol).all(), rel


def test_a_cluster_of_zero_rows_counts_as_empty():
    # rows 0-4 are zero, the others are zero in coordinate 0; centroid 0 = e_0 has inner product 0
    # with every row, so it keeps only the zero rows (argmax of all-zero gains), whose S2
    # denominator sum ||G_j|| is 0: dropped as empty, never a 0/0 centroid
    rng = np.random.default_rng(0)
    G = np.zeros((30, 6))
    G[5:, 1:] = rng.random((25, 5))
    feats = DenseFeatures(np.arange(30, dtype=np.int64), G.astype(np.float32))
    init = np.vstack([np.eye(6)[0], G[[10, 20]] / np.linalg.norm(G[[10, 20]], axis=1, keepdims=True)])
    km = weighted_kmeans(feats, n_clusters=3, init=init, seed=0, max_iter=20)
    assert (km.n_dropped, km.restarts) == (1, 1) and km.centroids.shape == (2, 6)
    assert np.isfinite(km.centroids).all() and km.sizes.sum() == 30


def test_all_zero_features_still_return_the_budget():
    # weighted: every cluster of zero rows is empty, so no centroid survives; the picks are all top-ups
    feats = DenseFeatures(np.arange(10, dtype=np.int64) * 3, np.zeros((10, 4), dtype=np.float32))
    km = weighted_kmeans(feats, n_clusters=3, seed=0)
    assert km.centroids.shape == (0, 4) and km.n_dropped == 3
    sel = select_pivotal(feats, budget=3, meta_ids=[], exclude_frac=0.0, seed=0)
    assert sel.n_clusters == 0 and np.unique(sel.sample_id).size == 3
    np.testing.assert_array_equal(sel.sample_id, [0, 3, 6])  # all tied at score 0: smallest ids
    np.testing.assert_array_equal(sel.cluster, [-1, -1, -1])


def test_signed_has_no_effect_on_plain_kmeans():
    # "plain K-means has no sign to keep": signed=True with weighted=False is plain K-means,
    # exclusion by |cos| included (on mixed-sign rows the signed cosine would exclude others)
    F = random_factor(120, seed=3)
    kw = dict(budget=6, meta_ids=F.sample_id[:6], exclude_frac=0.5, seed=2, weighted=False)
    a, b = select_pivotal(F, **kw), select_pivotal(F, signed=True, **kw)
    np.testing.assert_array_equal(a.excluded, b.excluded)
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_assign_returns_rows_in_sample_id_order_for_interleaved_shards():
    F = random_factor(40, seed=5)
    G = F.dense().astype(np.float64)
    C = np.random.default_rng(1).standard_normal((3, G.shape[1]))
    shards = [FactorShard(F.take(np.arange(1, 40, 2))), FactorShard(F.take(np.arange(0, 40, 2)))]
    ids, lab, score = assign(shards, centroids=C, weighted=True)
    np.testing.assert_array_equal(ids, F.sample_id)
    np.testing.assert_array_equal(lab, np.abs(G @ C.T).argmax(1))
    np.testing.assert_allclose(score, np.abs(G @ C.T).max(1) / np.linalg.norm(G, axis=1), rtol=1e-5)


@pytest.mark.parametrize("weighted", [True, False])
def test_each_centroid_picks_its_most_similar_unpicked_candidate(weighted):
    # Algorithm 2 step d against float64 numpy: centroid i (in index order) takes the candidate
    # most similar to it (S1; plain: nearest) among those not picked before it; the top-ups are
    # the unpicked candidates closest to their own centroid, tagged with that centroid
    for seed in range(6):
        F = random_factor(24, seed=seed)
        meta = F.sample_id[:3]
        sel = select_pivotal(F, budget=8, meta_ids=meta, exclude_frac=0.25, seed=seed, weighted=weighted)
        G = np.einsum("nkc,nkd->nkcd", F.A.astype(np.float64), F.X.astype(np.float64)).reshape(len(F), -1)
        ids = F.sample_id
        cand = ~np.isin(ids, meta) & ~np.isin(ids, sel.excluded)
        G, ids = G[cand], ids[cand]

        def score(C):  # (n, M)
            inner = G @ C.T
            if weighted:
                return np.abs(inner) / np.linalg.norm(G, axis=1)[:, None]
            return -np.square(G[:, None, :] - C[None]).sum(-1)

        S = score(sel.centroids)
        taken: list[int] = []
        for i in range(sel.n_clusters):
            order = ids[np.lexsort((ids, -S[:, i]))]
            want = next(j for j in order if j not in taken)
            assert (sel.sample_id[i], sel.cluster[i]) == (want, i)
            np.testing.assert_allclose(sel.score[i], S[ids == want, i][0], rtol=1e-9, atol=1e-12)
            taken.append(int(want))
        own, best = S.argmax(1), S.max(1)
        rest = [j for j in ids[np.lexsort((ids, -best))] if j not in taken][:8 - sel.n_clusters]
        np.testing.assert_array_equal(sel.sample_id[sel.n_clusters:], rest)
        np.testing.assert_array_equal(sel.cluster[sel.n_clusters:], own[np.searchsorted(ids, rest)])


@pytest.mark.parametrize("weighted", [True, False])
def test_centroids_sharing_a_favourite_take_the_next_best_in_index_order(weighted, monkeypatch):
    # four centroids around one direction share their favourite rows (converged Lloyd centroids
    # rarely do): centroid 0 takes the best row, centroid 1 the second, ... (step d), so each
    # centroid must see more than its single best candidate. The clustering is replaced by these
    # centroids to test step d on its own.
    import pivotal_ray.core.kmeans as kmeans_mod

    rng = np.random.default_rng(8)
    G = rng.standard_normal((30, 5))
    feats = DenseFeatures(np.arange(30, dtype=np.int64) * 2, G.astype(np.float32))
    C = rng.standard_normal(5) + 1e-3 * rng.standard_normal((4, 5))  # (4, D)
    monkeypatch.setattr(kmeans_mod, "weighted_kmeans", lambda *a, **kw: kmeans_mod.KMeansResult(
        C, [0.0], 1, np.ones(4, dtype=np.int64), 0))
    sel = select_pivotal(feats, budget=4, meta_ids=[], exclude_frac=0.0, seed=0, weighted=weighted)
    G, ids = feats.G.astype(np.float64), feats.sample_id
    S = np.abs(G @ C.T) / np.linalg.norm(G, axis=1)[:, None] if weighted else -np.square(G[:, None] - C[None]).sum(-1)
    favourites = [ids[np.lexsort((ids, -S[:, i]))] for i in range(4)]
    assert len({int(f[0]) for f in favourites}) == 1  # they do share the favourite
    taken: list[int] = []
    for f in favourites:
        taken.append(int(next(j for j in f if j not in taken)))
    np.testing.assert_array_equal(sel.sample_id, taken)
    np.testing.assert_array_equal(sel.cluster, [0, 1, 2, 3])


def test_picks_treat_scores_within_tie_rtol_as_ties_to_the_smaller_id():
    # scores 1e-12 apart (relative) are equal in exact arithmetic as far as the scans can tell:
    # the smaller sample_id wins, whichever comes first in the (-score, id) order
    from pivotal_ray.core.kmeans import TIE_RTOL, _picks
    from pivotal_ray.core.shards import Candidates

    assert TIE_RTOL >= 1e-12
    c = Candidates(ids=np.array([[7, 3, 5]]), scores=np.array([[2.0, 2.0 * (1 - 1e-12), 1.0]]),
                   best_ids=np.array([9, 4, 8]), best_scores=np.array([3.0, 3.0 * (1 - 1e-12), 2.5]),
                   best_cluster=np.array([0, 0, 0]), err=np.zeros(1), best_err=0.0)
    ids, cl, _ = _picks(c, 3)
    assert ids == [3, 4, 9] and cl == [0, 0, 0]


def test_top_up_ranking_ties_to_the_smaller_id_under_every_split():
    # the top-up list (rows closest to their own centroid) has the same exact ties as the
    # per-centroid lists: the two rows of a pair are equally far from their midpoint, and the
    # smaller id must come first whatever the GEMM rounding of the split
    rng = np.random.default_rng(12)
    F = DenseFeatures(np.arange(400, dtype=np.int64) * 3, rng.standard_normal((400, 64)).astype(np.float32))
    pairs = rng.choice(400, size=(20, 2), replace=False)  # (M, 2)
    G = F.G.astype(np.float64)
    C = (G[pairs[:, 0]] + G[pairs[:, 1]]) / 2.0  # exact in float64
    rows = pairs.ravel()  # the 40 rows nearest to some midpoint, each to its own
    score = -np.square(G[rows] - C[np.repeat(np.arange(20), 2)]).sum(1)  # the two of a pair: equal floats
    want = F.sample_id[rows][np.lexsort((F.sample_id[rows], -score))]
    for shards in splits(F):
        ss = LocalShardSet(shards)
        got = _merge(ss, ss.call("top_candidates", centroids=C, weighted=False, k=1, n_best=40),
                     k=1, n_best=40, centroids=C, weighted=False)
        np.testing.assert_array_equal(got.best_ids, want)


def test_a_tie_cut_by_k_or_n_best_goes_to_the_smaller_id_under_every_split():
    # the pairs of test_equidistant_rows_tie_to_the_smaller_id_under_every_split, but a shortlist
    # of one per centroid (k=1) and top-up lists that end inside a pair (odd n_best): each shard
    # must keep the tied partner for the exact re-scoring, or the scan's rounding picks
    rng = np.random.default_rng(11)
    F = DenseFeatures(np.arange(400, dtype=np.int64) * 3, rng.standard_normal((400, 64)).astype(np.float32))
    pairs = rng.choice(400, size=(20, 2), replace=False)
    G = F.G.astype(np.float64)
    C = (G[pairs[:, 0]] + G[pairs[:, 1]]) / 2.0
    rows = pairs.ravel()
    score = -np.square(G[rows] - C[np.repeat(np.arange(20), 2)]).sum(1)
    ranked = F.sample_id[rows][np.lexsort((F.sample_id[rows], -score))]
    for shards in splits(F):
        ss = LocalShardSet(shards)
        for n_best in (1, 7, 13, 39):
            got = _merge(ss, ss.call("top_candidates", centroids=C, weighted=False, k=1, n_best=n_best),
                         k=1, n_best=n_best, centroids=C, weighted=False)
            np.testing.assert_array_equal(got.ids[:, 0], F.sample_id[pairs].min(1))
            np.testing.assert_array_equal(got.best_ids, ranked[:n_best])


def test_plain_scores_are_never_positive():
    # -||G_j - C_i||^2 <= 0 even where ||G||^2 - 2<G, C> + ||C||^2 rounds below 0 (a centroid on a row)
    F, _ = near_parallel(200, 300, seed=1, offset=50.0)
    C = F.G[:20].astype(np.float64)
    _, lab, score = assign(F, centroids=C, weighted=False)
    assert (score <= 0.0).all()
    sel = select_pivotal(F, budget=5, meta_ids=[], exclude_frac=0.0, seed=0, weighted=False, max_iter=3)
    assert (sel.score <= 0.0).all()


def test_signed_kmeanspp_scores_anti_aligned_rows_by_their_full_norm():
    # signed seeding: a row on the far side of the first seed is not served by it (residual
    # ||G||^2, not ||G||^2 (1 - cos^2) ~ 0), so the second seed lands on the other side
    rng = np.random.default_rng(5)
    v = rng.standard_normal(24)
    G = np.concatenate([v + 0.01 * rng.standard_normal((30, 24)), -v + 0.01 * rng.standard_normal((30, 24))])
    shards = LocalShardSet([DenseShard(DenseFeatures(np.arange(60, dtype=np.int64), G.astype(np.float32)))])
    for seed in range(8):
        seeds = INITS.get("kmeans++")(shards, ids=np.arange(60), n_clusters=2, weighted=True,
                                      rng=np.random.default_rng(seed), signed=True)
        assert seeds[0] @ seeds[1] < 0  # one on each side of the line


def test_plain_kmeanspp_draws_the_first_seed_uniformly():
    # k-means++: the first seed is uniform over rows, whatever their norms (one row 1000x longer)
    rng = np.random.default_rng(0)
    G = rng.standard_normal((50, 4))
    G[17] *= 1000.0
    shards = LocalShardSet([DenseShard(DenseFeatures(np.arange(50, dtype=np.int64), G.astype(np.float32)))])
    first = [int(np.flatnonzero(np.all(np.isclose(G.astype(np.float32), INITS.get("kmeans++")(
        shards, ids=np.arange(50), n_clusters=1, weighted=False, rng=np.random.default_rng(s))[0]), axis=1))[0])
        for s in range(40)]
    assert first.count(17) <= 5 and len(set(first)) >= 20


def test_s1_scores_keep_the_sign_only_when_signed():
    from pivotal_ray.core.shards import s1_scores

    G = np.array([[3.0, 4.0], [-3.0, -4.0], [0.0, 0.0]])
    c = np.array([0.6, 0.8])
    np.testing.assert_allclose(s1_scores(G, c), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(s1_scores(G, c, signed=True), [1.0, -1.0, 0.0])


def test_a_shard_rejects_duplicate_sample_ids():
    G = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="duplicates"):
        DenseShard(DenseFeatures(np.array([1, 2, 2], dtype=np.int64), G))
    F = random_factor(3)
    with pytest.raises(ValueError, match="duplicates"):
        FactorShard(FactorFeatures(np.array([4, 4, 5], dtype=np.int64), F.A, F.X))


def test_a_table_whose_samples_miss_complementary_snapshots_is_refused(tmp_path):
    # sample a has only snapshot 0 and sample b only snapshot 1: as many rows as one complete
    # sample, and the snapshots alternate 0, 1, but neither sample is complete
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    F = random_factor(4, K=2, C=3, d=2, seed=1)
    _write_factor_table(tmp_path, F)
    a, b = (int(i) for i in F.sample_id[:2])
    for f in sorted(tmp_path.glob("*.parquet")):
        t = pq.read_table(f)
        sid, snap = t["sample_id"], t["snapshot"]
        keep = pc.or_(pc.and_(pc.equal(sid, a), pc.equal(snap, 0)), pc.and_(pc.equal(sid, b), pc.equal(snap, 1)))
        pq.write_table(t.filter(keep), f)
    from pivotal_ray.core.featuretable import read_factor_table

    assert sum(pq.read_table(f).num_rows for f in tmp_path.glob("*.parquet")) == 2
    with pytest.raises(ValueError, match="incomplete"):
        read_factor_table(tmp_path)


def test_feature_containers_and_readers_refuse_malformed_input(tmp_path):
    from pivotal_ray.core.featuretable import read_factor_table

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        FactorFeatures(np.arange(3), rng.random((3, 2, 4)), rng.random((3, 1, 5)))  # K differs
    with pytest.raises(ValueError, match="inconsistent shapes"):
        FactorFeatures(np.arange(4), rng.random((3, 2, 4)), rng.random((3, 2, 5)))  # n differs
    with pytest.raises(FileNotFoundError, match="feature extraction"):
        read_factor_table(tmp_path)  # an empty directory


def test_a_shard_lost_mid_selection_is_reported_once_and_a_failed_selection_still_resets_the_shards():
    """A shard that is gone (a lost Ray worker) fails every later call: the error out of
    select_pivotal is the first one, not a second one from resetting the shards (which chained
    the same loss twice). A selection that fails with every shard reachable resets them."""
    F, _ = planted()

    class Losing:
        def __init__(self, shards, die_on):
            self.inner, self.die_on, self.dead, self.calls = LocalShardSet(shards), die_on, False, []

        def __len__(self):
            return len(self.inner)

        def call(self, method, /, **kwargs):
            self.calls.append(method)
            if self.dead:
                raise RuntimeError(f"shard gone (later call: {method})")
            if method == self.die_on:
                self.dead = True
                raise RuntimeError(f"shard lost during {method}")
            return self.inner.call(method, **kwargs)

    for op in ("assign_sums", "top_candidates"):
        ss = Losing([FactorShard(f) for f in F.split(2)], die_on=op)
        with pytest.raises(RuntimeError) as err:
            select_pivotal(ss, budget=5, meta_ids=F.sample_id[:3], exclude_frac=0.2, seed=0)
        assert str(err.value) == f"shard lost during {op}" and err.value.__context__ is None
        assert ss.calls[-1] == "set_active"  # the reset was tried
    shards = [FactorShard(f) for f in F.split(2)]
    with pytest.raises(ValueError, match="exceeds the"):
        select_pivotal(LocalShardSet(shards), budget=len(F), meta_ids=F.sample_id[:3], exclude_frac=0.5, seed=0)
    assert sum(s.count() for s in shards) == len(F)  # every row active again


class _FailingOnce:
    """A shard set whose ``on`` call raises ``exc``; with ``dead`` every later call raises too."""

    def __init__(self, shards, exc, on, dead):
        self.inner, self.exc, self.on, self.dead, self.failed = LocalShardSet(shards), exc, on, dead, False

    def __len__(self):
        return len(self.inner)

    def call(self, method, /, **kwargs):
        if self.failed and self.dead:
            raise self.exc("gone")
        if method == self.on and not self.failed:
            self.failed = True
            raise self.exc("first")
        return self.inner.call(method, **kwargs)


def test_ctrl_c_mid_selection_resets_the_shards_and_a_lost_rays_error_is_reported_once():
    import ray.exceptions as rex

    F, _ = planted()
    shards = [FactorShard(f) for f in F.split(2)]
    with pytest.raises(KeyboardInterrupt):
        select_pivotal(_FailingOnce(shards, KeyboardInterrupt, "top_candidates", dead=False), budget=5,
                       meta_ids=F.sample_id[:3], exclude_frac=0.2, seed=0)
    assert sum(s.count() for s in shards) == len(F)
    with pytest.raises(rex.RayError) as err:  # Ray's errors are no RuntimeError
        select_pivotal(_FailingOnce([FactorShard(f) for f in F.split(2)], rex.RayError, "top_candidates", dead=True),
                       budget=5, meta_ids=F.sample_id[:3], exclude_frac=0.2, seed=0)
    assert str(err.value) == "first" and err.value.__context__ is None
