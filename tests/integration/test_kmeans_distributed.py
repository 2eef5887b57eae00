"""Shard actors + parameter server give the in-memory K-means and picks (spec section 4, "Distributed")."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pivotal_ray.core.featuretable import FactorFeatures, factor_schema, read_factor_table
from pivotal_ray.core.kmeans import assign, select_pivotal, weighted_kmeans
from pivotal_ray.distributed.kmeans import (ParameterServer, RayShardSet, select_on_actors,
                                            select_pivotal_distributed, start_shard_actors,
                                            stop_shard_actors)

pytestmark = pytest.mark.integration


def features(n: int = 240, K: int = 2, C: int = 3, d: int = 5, seed: int = 0) -> FactorFeatures:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(5 * n, size=n, replace=False)).astype(np.int64)
    return FactorFeatures(ids, rng.standard_normal((n, K, C)).astype(np.float32),
                          rng.standard_normal((n, K, d)).astype(np.float32))


def check_shard_set(shards, F: FactorFeatures, meta: np.ndarray) -> None:
    """The Ray-free loop over shard actors (RayShardSet) == over one in-memory shard."""
    assert sum(shards.call("count")) == len(F)
    for weighted in (True, False):
        km = weighted_kmeans(shards, n_clusters=5, weighted=weighted, seed=1, max_iter=40)
        ref = weighted_kmeans(F, n_clusters=5, weighted=weighted, seed=1, max_iter=40)
        assert km.n_iter == ref.n_iter
        np.testing.assert_allclose(km.centroids, ref.centroids, rtol=1e-9, atol=1e-12)
        ids, lab, _ = assign(shards, centroids=km.centroids, weighted=weighted)
        ids_ref, lab_ref, _ = assign(F, centroids=ref.centroids, weighted=weighted)
        np.testing.assert_array_equal(ids, ids_ref)
        np.testing.assert_array_equal(lab, lab_ref)
        kw = dict(budget=6, meta_ids=meta, exclude_frac=0.5, seed=3, max_iter=40, weighted=weighted)
        same_selection(select_pivotal(shards, **kw), select_pivotal(F, **kw))


def test_one_shard_actor_and_server(ray_session):
    F = features()
    kw = dict(budget=6, meta_ids=F.sample_id[::40], exclude_frac=0.5, seed=3, max_iter=40)
    same_selection(select_pivotal_distributed(F, num_shards=1, **kw), select_pivotal(F, **kw))


def test_two_shard_actors_match_in_memory(ray_session):
    F = features()
    actors = start_shard_actors(F, num_shards=2)
    try:
        check_shard_set(RayShardSet(actors), F, F.sample_id[::40])
    finally:
        stop_shard_actors(actors)


def same_selection(got, ref) -> None:
    np.testing.assert_array_equal(got.sample_id, ref.sample_id)
    np.testing.assert_array_equal(got.cluster, ref.cluster)
    np.testing.assert_array_equal(got.excluded, ref.excluded)
    np.testing.assert_allclose(got.centroids, ref.centroids, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.objective, ref.objective, rtol=1e-6)
    assert got.n_iter == ref.n_iter


def write_table(F: FactorFeatures, root, *, seed: int = 0) -> None:
    """One parquet file per snapshot, rows shuffled (the worst case for sharding by file)."""
    rng = np.random.default_rng(seed)
    schema = factor_schema(F.A.shape[2], F.X.shape[2])
    for k in range(F.num_snapshots):
        perm = rng.permutation(len(F))
        cols = {
            "sample_id": pa.array(F.sample_id[perm]),
            "snapshot": pa.array(np.full(len(F), k, dtype=np.int32)),
            "epoch": pa.array(np.full(len(F), 10 * k, dtype=np.int32)),
            "A": pa.FixedSizeListArray.from_arrays(pa.array(F.A[perm, k].ravel()), F.A.shape[2]),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(F.X[perm, k].ravel()), F.X.shape[2]),
        }
        pq.write_table(pa.table(cols, schema=schema), root / f"part-{k}.parquet")


def test_three_shard_actors_from_parquet_directory(ray_session, tmp_path):
    """Actors read their own samples from the table; the loop at the driver and in the server agree."""
    F = features(n=200, seed=5)
    write_table(F, tmp_path)
    table = read_factor_table(tmp_path)
    np.testing.assert_array_equal(table.sample_id, F.sample_id)  # the table round-trips
    actors = start_shard_actors(tmp_path, num_shards=3)
    try:
        check_shard_set(RayShardSet(actors), table, F.sample_id[:3])
        kw = dict(budget=5, meta_ids=F.sample_id[:3], exclude_frac=0.3, seed=11, max_iter=40)
        same_selection(select_on_actors(actors, **kw), select_pivotal(F, **kw))
    finally:
        stop_shard_actors(actors)


def test_timing_log_leaves_the_selection_unchanged(ray_session):
    """record_timings (benchmarks) logs every shard call and changes no result."""
    F = features(n=120, seed=7)
    kw = dict(budget=4, meta_ids=F.sample_id[:2], exclude_frac=0.25, seed=5, max_iter=30)
    actors = start_shard_actors(F, num_shards=2)
    try:
        server = ParameterServer.options(num_cpus=0).remote(actors, record_timings=True)
        got = ray_session.get(server.select.remote(kw))
        log = ray_session.get(server.timings.remote())
        ray_session.kill(server)
    finally:
        stop_shard_actors(actors)
    same_selection(got, select_pivotal(F, **kw))
    lloyd = [e for e in log if e["method"] == "assign_sums"]
    assert len(lloyd) == got.n_iter
    for e in log:
        assert len(e["shard_s"]) == 2 and e["wall_s"] >= max(e["shard_s"]) >= 0.0
    assert [e["start"] for e in log] == sorted(e["start"] for e in log)


# ---------------------------------------------------------------------------------------------
# mutation audit
# ---------------------------------------------------------------------------------------------


def test_distributed_selection_honours_every_kmeans_setting(ray_session):
    """Non-default settings (plain K-means; random init with the signed similarity; no sign
    alignment with a loose tol) reach the server's loop: the same Selection as the in-memory run
    with them (on this data each of them changes the selection)."""
    F = features(n=160, seed=9)
    base = dict(budget=5, meta_ids=F.sample_id[:4], exclude_frac=0.4, seed=2, max_iter=40)
    for setting in (dict(weighted=False), dict(init="random", signed=True), dict(sign_align=False, tol=1e-2)):
        kw = {**base, **setting}
        same_selection(select_pivotal_distributed(F, num_shards=2, **kw), select_pivotal(F, **kw))


def test_shard_counts_and_cpus_are_checked_before_any_actor_starts(ray_session, tmp_path):
    F = features(n=5, seed=1)
    with pytest.raises(ValueError, match="use fewer shards"):
        start_shard_actors(F, num_shards=6)  # 6 x 0.25 CPUs fit the 2-CPU session, 5 samples do not
    write_table(F, tmp_path)
    with pytest.raises(ValueError, match="use fewer shards"):
        start_shard_actors(tmp_path, num_shards=6)
    for bad in (dict(num_shards=0), dict(num_shards=1, shard_cpus=0.0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            start_shard_actors(F, **bad)
    with pytest.raises(ValueError, match="exceed the cluster's 2.0 CPUs"):
        start_shard_actors(F, num_shards=3, shard_cpus=1.0)
    for device in ("cuda", "cuda:1"):  # each shard would reserve a GPU: the group would wait for ever
        with pytest.raises(ValueError, match=f"2 shards on {device} take a GPU each, and the cluster has 0"):
            start_shard_actors(F, num_shards=2, device=device)
    with pytest.raises(ValueError, match="at least one shard actor"):
        RayShardSet([])


def test_shards_on_a_gpu_reserve_one_each_and_are_told_the_device_type(ray_session, monkeypatch):
    """With GPUs (faked: this session has none) each shard's bundle and actor ask for one GPU, and
    the actor is given "cuda": Ray shows it its own GPU alone, where "cuda:1" names no device."""
    import importlib

    import ray

    from pivotal_ray.distributed import kmeans

    pgs = importlib.import_module("ray.util.placement_group")  # the module (ray.util's attribute is the function)
    strategies = importlib.import_module("ray.util.scheduling_strategies")

    class Group:  # placed at once
        def ready(self):
            return ray.put(None)

    bundles, started = [], []

    class Recorder:
        @staticmethod
        def options(**kw):
            return type("Opts", (), {"remote": staticmethod(lambda *a, **k: started.append((kw, k)) or len(started))})

    monkeypatch.setattr(kmeans.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    monkeypatch.setattr(pgs, "placement_group", lambda b, strategy: bundles.append(b) or Group())
    monkeypatch.setattr(kmeans, "ShardActor", Recorder)
    monkeypatch.setattr(strategies, "PlacementGroupSchedulingStrategy", lambda *a, **k: None)
    actors = start_shard_actors(features(n=60, seed=4), num_shards=2, device="cuda:1")
    assert list(actors) == [1, 2] and bundles == [[{"CPU": 0.25, "GPU": 1.0}] * 2]
    assert [(kw["num_gpus"], k["device"]) for kw, k in started] == [(1, "cuda"), (1, "cuda")]


def _live_placement_groups() -> int:
    from ray.util import placement_group_table

    return sum(1 for g in placement_group_table().values() if g["state"] != "REMOVED")


def test_two_selections_at_once_each_get_their_whole_shard_set(ray_session):
    """Two runs' K-means at once (compare.concurrency threads), each asking for 2 shards x 1 CPU
    of the session's 2: the shards of a set are reserved together (one placement group), so one
    waits for the other instead of each holding one shard and waiting for ever; afterwards no
    placement group is left holding CPUs."""
    import threading

    F = features(n=200, seed=11)
    kw = dict(budget=4, meta_ids=F.sample_id[:2], exclude_frac=0.25, max_iter=20)
    before = _live_placement_groups()
    deadline = time.monotonic() + 450  # ~11 s a trial on an idle machine; one budget for all three
    for trial in range(3):
        barrier, got, errors = threading.Barrier(2), {}, []

        def run(seed: int) -> None:
            try:
                barrier.wait()
                got[seed] = select_pivotal_distributed(F, num_shards=2, shard_cpus=1.0, seed=seed, **kw)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (trial, trial + 10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not errors and sorted(got) == [trial, trial + 10], f"trial {trial}: {sorted(got)} finished, {errors}"
        for seed, sel in got.items():
            same_selection(sel, select_pivotal(F, seed=seed, **kw))
    assert _live_placement_groups() == before


def test_a_failed_start_leaves_no_placement_group_and_a_shard_too_large_for_any_node_is_refused(
        ray_session, monkeypatch):
    """Starting the second shard fails: the first one and the group are released, not left
    holding CPUs for the rest of the driver's life. A shard larger than every node (its group
    would wait for ever on a cluster that does not grow) is refused before anything starts."""
    from pivotal_ray.distributed import kmeans

    F = features(n=60, seed=2)
    before = _live_placement_groups()
    real, calls = kmeans.ShardActor, []

    class Failing:
        @staticmethod
        def options(**kw):
            calls.append(kw)
            if len(calls) == 2:
                raise RuntimeError("no second shard")
            return real.options(**kw)

    monkeypatch.setattr(kmeans, "ShardActor", Failing)
    with pytest.raises(RuntimeError, match="no second shard"):
        start_shard_actors(F, num_shards=2)
    assert _live_placement_groups() == before
    monkeypatch.setattr(kmeans, "ShardActor", real)
    monkeypatch.setattr(kmeans.ray, "cluster_resources", lambda: {"CPU": 4.0})  # as if 2 nodes of 2
    with pytest.raises(ValueError, match=r"a shard of 3.0 CPUs fits no node \(the largest has 2.0\)"):
        start_shard_actors(F, num_shards=1, shard_cpus=3.0)
    assert _live_placement_groups() == before
