"""Baseline selectors' maths (core/baselines.py) and the Ray-free selectors (spec section 6).

References: facility location by plain greedy that evaluates F(S) from scratch; distances from the
materialised G; entropies of hand-built probabilities.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pivotal_ray.config import ExperimentConfig, ModelConfig, to_dict
from pivotal_ray.core.baselines import (balanced_quotas, balanced_random, craig_similarity,
                                        facility_location_greedy, predict_probs, predictive_entropy,
                                        rank_by_entropy, select_craig)
from pivotal_ray.core.data import build_data
from pivotal_ray.core.features import rbc_factors
from pivotal_ray.core.featuretable import (DenseFeatures, FactorFeatures, factor_columns, factor_schema,
                                          read_factor_table)
from pivotal_ray.core.kmeans import select_pivotal
from pivotal_ray.core.models import build_model
from pivotal_ray.core.seeding import derive_seed, numpy_rng
from pivotal_ray.distributed.train import TrainRun
from pivotal_ray.selectors import SELECTORS, RoundContext, extract_round_features

# ---------------------------------------------------------------------------------------------
# random_balanced
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(avail=st.lists(st.integers(0, 12), min_size=1, max_size=6), data=st.data())
def test_quotas_are_as_equal_as_the_classes_allow(avail, data) -> None:
    n = np.array(avail)
    if n.sum() == 0:
        return
    k = data.draw(st.integers(1, int(n.sum())))
    prio = np.array(data.draw(st.permutations(range(len(n)))))
    q = balanced_quotas(n, k=k, priority=prio)
    assert q.sum() == k and (q >= 0).all() and (q <= n).all()
    # the remainder: one each to the classes above the water level L, first in priority order
    level = max(L for L in range(int(n.max()) + 1) if np.minimum(n, L).sum() <= k)
    above = [int(c) for c in prio if n[c] > level]
    r = k - int(np.minimum(n, level).sum())
    assert [int(c) for c in above if q[c] == level + 1] == above[:r]
    open_ = q < n  # classes that could have taken more
    if open_.any():
        # nobody below capacity has fewer than anyone else minus one, and no class holds more
        # than one above a class that still had room
        assert q[open_].max() - q[open_].min() <= 1
        assert q.max() <= q[open_].min() + 1
    # brute force: water-filling minimises sum_c q_c^2 over all feasible quota vectors (tiny cases)
    if len(n) <= 4 and n.max() <= 6:
        best = min(sum(v * v for v in c) for c in itertools.product(*(range(v + 1) for v in n)) if sum(c) == k)
        assert int((q * q).sum()) == best


def test_random_balanced_counts_by_observed_label() -> None:
    ids = np.arange(1000, 1090)
    y = np.repeat([0, 1, 2], 30)
    pick = balanced_random(ids, y, k=7, num_classes=3, seed=0)
    assert pick.size == 7 and np.unique(pick).size == 7 and np.isin(pick, ids).all()
    counts = np.bincount(y[np.searchsorted(ids, pick)], minlength=3)
    assert sorted(counts.tolist()) == [2, 2, 3]  # 7 = 2 + 2 + 3
    assert np.array_equal(pick, balanced_random(ids, y, k=7, num_classes=3, seed=0))  # deterministic
    perm = numpy_rng(1, "perm").permutation(90)
    assert np.array_equal(pick, balanced_random(ids[perm], y[perm], k=7, num_classes=3, seed=0))  # order-free
    assert any(not np.array_equal(pick, balanced_random(ids, y, k=7, num_classes=3, seed=s)) for s in (1, 2, 3))
    # a class with fewer candidates than its share gives the rest to the others
    y2 = np.r_[np.zeros(1, int), np.ones(44, int), np.full(45, 2)]
    c2 = np.bincount(y2[np.searchsorted(ids, balanced_random(ids, y2, k=9, num_classes=3, seed=0))], minlength=3)
    assert c2.tolist() == [1, 4, 4]
    with pytest.raises(ValueError, match="lower the budget"):
        balanced_random(ids, y, k=91, num_classes=3, seed=0)


# ---------------------------------------------------------------------------------------------
# uncertain / certain
# ---------------------------------------------------------------------------------------------


def test_entropy_and_its_ranking() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.8, 0.1, 0.1],
                      [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    H = predictive_entropy(probs)
    np.testing.assert_allclose(H, [0, math.log(3), math.log(2), -(0.8 * math.log(0.8) + 0.2 * math.log(0.1)),
                                   math.log(2), 0], atol=1e-12)
    ids = np.array([50, 10, 40, 30, 20, 5])
    top, h = rank_by_entropy(ids, H, k=3, highest=True)
    assert top.tolist() == [10, 20, 40]  # log 3, then the two log 2 ties by the smaller id
    low, _ = rank_by_entropy(ids, H, k=3, highest=False)
    assert low.tolist() == [5, 50, 30]  # the two zeros (ties by id), then 0.639
    np.testing.assert_allclose(h, [math.log(3), math.log(2), math.log(2)])
    with pytest.raises(ValueError, match="lower the budget"):
        rank_by_entropy(ids, H, k=7, highest=True)


# ---------------------------------------------------------------------------------------------
# craig
# ---------------------------------------------------------------------------------------------


def _brute_greedy(sim: np.ndarray, k: int, cover: np.ndarray | None) -> list[int]:
    """Plain greedy, F(S) recomputed from scratch for every candidate; ties -> smaller index."""
    base = np.zeros(sim.shape[1]) if cover is None else cover

    def F(S: list[int]) -> float:
        return float(np.maximum(base, sim[S].max(0) if S else 0.0).sum())

    S: list[int] = []
    for _ in range(k):
        vals = [(F(S + [j]), -j) for j in range(sim.shape[0]) if j not in S]
        S.append(-max(vals)[1])
    return S


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 7), seed=st.integers(0, 10**6), with_cover=st.booleans(),
       data=st.data())
def test_lazy_greedy_equals_brute_force(n, m, seed, with_cover, data) -> None:
    # small integer similarities: sums are exact, so ties are real and must break alike
    rng = numpy_rng(seed, "sim")
    sim = rng.integers(0, 5, size=(n, m)).astype(np.float32)
    cover = rng.integers(0, 4, size=m).astype(np.float64) if with_cover else None
    k = data.draw(st.integers(1, n))
    picks, gains = facility_location_greedy(sim, k=k, cover=cover)
    assert picks.tolist() == _brute_greedy(sim.astype(np.float64), k, cover)
    assert np.unique(picks).size == k and (np.diff(gains) <= 1e-12).all()  # submodular: gains shrink


def test_lazy_greedy_on_real_valued_similarities() -> None:
    sim = numpy_rng(3, "real").random((25, 12)).astype(np.float32)
    picks, _ = facility_location_greedy(sim, k=8)
    assert picks.tolist() == _brute_greedy(sim.astype(np.float64), 8, None)


def _factor(n: int, seed: int, *, K: int = 1, C: int = 3, d: int = 4) -> FactorFeatures:
    rng = numpy_rng(seed, "factor")
    return FactorFeatures(np.arange(n, dtype=np.int64) * 3 + 1, rng.random((n, K, C)).astype(np.float32),
                          rng.standard_normal((n, K, d)).astype(np.float32))


def test_craig_similarity_matches_dense_distances() -> None:
    f = _factor(11, 0, K=2)
    G = f.dense().astype(np.float64)
    cov, cand = f.take(np.array([1, 4, 7])), f.take(np.arange(11))
    sim, c_max = craig_similarity(cov, cand, chunk=4)
    dist = np.linalg.norm(G[:, None] - G[None, [1, 4, 7]], axis=-1)  # (11, 3)
    assert c_max == pytest.approx(dist.max(), rel=1e-5)
    np.testing.assert_allclose(sim, dist.max() - dist, atol=1e-4)
    dsim, _ = craig_similarity(DenseFeatures(cov.sample_id, cov.dense()), DenseFeatures(cand.sample_id, G))
    np.testing.assert_allclose(dsim, sim, atol=1e-4)
    rows = np.array([9, 0, 5, 5, 2])  # any rows, in their order, chunk by chunk: no copy of the features
    rsim, r_max = craig_similarity(cov, cand, rows=rows, chunk=2)
    np.testing.assert_allclose(rsim, dist[rows].max() - dist[rows], atol=1e-4)
    assert r_max == pytest.approx(dist[rows].max(), rel=1e-5)


def test_select_craig_picks() -> None:
    f = _factor(30, 1)
    meta = f.sample_id[[2, 17]]
    res = select_craig(f, k=5, meta_ids=meta, coverage_size=100, seed=0)  # coverage = every candidate
    assert res.sample_id.size == 5 and np.unique(res.sample_id).size == 5
    assert not np.isin(res.sample_id, meta).any() and np.isin(res.sample_id, f.sample_id).all()
    # reference: brute-force greedy on F(meta + S) over all candidates, from dense distances
    G = f.dense().astype(np.float64)
    cand = np.setdiff1d(np.arange(30), [2, 17])
    D = np.linalg.norm(G[:, None] - G[None, cand], axis=-1)  # (all, cand)
    sim = D.max() - D
    want = _brute_greedy(sim[cand], 5, sim[[2, 17]].max(0))
    assert res.sample_id.tolist() == f.sample_id[cand[want]].tolist()
    again = select_craig(f, k=5, meta_ids=meta, coverage_size=100, seed=0)
    assert np.array_equal(again.sample_id, res.sample_id)
    sub = select_craig(f, k=5, meta_ids=meta, coverage_size=7, seed=0)  # documented subsample
    assert sub.coverage_ids.size == 7 and not np.isin(sub.coverage_ids, meta).any()
    assert np.unique(sub.sample_id).size == 5 and not np.isin(sub.sample_id, meta).any()
    with pytest.raises(ValueError, match="no feature rows"):
        select_craig(f, k=2, meta_ids=[999], seed=0)


# ---------------------------------------------------------------------------------------------
# the Ray-free selectors on a toy round
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_ctx(tmp_path_factory) -> RoundContext:
    """A round over the toy set with a fake warm-up run whose best snapshot is a fixed MLP."""
    cfg = to_dict(ExperimentConfig(model=ModelConfig(name="mlp", hidden=8, depth=2)))
    bundle = build_data(cfg["data"], cfg["noise"], cfg["seed"])
    snap = tmp_path_factory.mktemp("run") / "checkpoint_000003"
    snap.mkdir()
    model = build_model(cfg["model"], bundle.num_classes, bundle.input_shape, seed=7)
    torch.save(model.state_dict(), snap / "model.pt")
    (snap / "metrics.json").write_text(json.dumps({"epoch": 3, "val_acc": 0.5}))
    snapshots = [{"path": str(snap), "epoch": 3, "val_acc": 0.5}]
    # as with reweight.snapshot_every=3: the best-validation epoch (4) has no snapshot, so selectors
    # must use the best persisted one (epoch 3): TrainRun.snapshot(4) raises KeyError
    run = TrainRun(name="warmup", path=str(snap.parent), snapshots=snapshots, best_epoch=4, best_val_acc=0.6,
                   test_acc_at_best=0.6, final_test_acc=0.6,
                   extra={"history": [{"epoch": 3, "val_acc": 0.5}, {"epoch": 4, "val_acc": 0.6}]})
    meta = np.sort(numpy_rng(0, "meta").choice(bundle.train.sample_id, size=4, replace=False))
    return RoundContext(cfg=cfg, bundle=bundle, meta_ids=meta, run=run, round=1,
                        work_dir=Path(tmp_path_factory.mktemp("round")))


def test_random_balanced_selector(toy_ctx) -> None:
    picks = SELECTORS.get("random_balanced")(toy_ctx, 6)
    train = toy_ctx.bundle.train
    assert picks.sample_id.size == 6 and not np.isin(picks.sample_id, toy_ctx.meta_ids).any()
    assert np.bincount(train.y_obs[train.positions_of(picks.sample_id)], minlength=2).tolist() == [3, 3]


def test_read_predictions_refuses_a_table_of_another_kind(tmp_path) -> None:
    from pivotal_ray.core.baselines import read_predictions

    A, X = np.ones((3, 2), np.float32), np.ones((3, 4), np.float32)
    cols = factor_columns(np.arange(3), 0, 1, A, X)
    pq.write_table(pa.table({c: (pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)),
                                                                   type=pa.list_(pa.float32(), v.shape[1]))
                                 if v.ndim == 2 else pa.array(v)) for c, v in cols.items()},
                            schema=factor_schema(2, 4)), tmp_path / "part-0.parquet")
    with pytest.raises(ValueError, match=r"is not a prediction table \(it lacks the columns \['entropy', 'margin', "
                                         r"'pred'\]\): delete it and extract it again"):
        read_predictions(tmp_path)


@pytest.mark.parametrize("method", ["uncertain", "certain"])
def test_entropy_selectors(toy_ctx, method, predictions_here) -> None:
    picks = SELECTORS.get(method)(toy_ctx, 5)
    ids = picks.sample_id
    assert ids.size == 5 and np.unique(ids).size == 5 and not np.isin(ids, toy_ctx.meta_ids).any()
    # reference: entropies of every candidate straight from the snapshot's logits
    train, cand = toy_ctx.bundle.train, toy_ctx.candidates()
    model = build_model(toy_ctx.cfg["model"], 2, toy_ctx.bundle.input_shape)
    model.load_state_dict(torch.load(Path(toy_ctx.run.snapshots[0]["path"]) / "model.pt", weights_only=True))
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(train.inputs(train.positions_of(cand))).double(), 1)
    H = -(logp.exp() * logp).sum(1).numpy()
    np.testing.assert_allclose(picks.score, H[np.searchsorted(cand, ids)], rtol=1e-9)
    rest = np.delete(H, np.searchsorted(cand, ids))
    if method == "uncertain":
        assert picks.score.min() >= rest.max() and (np.diff(picks.score) <= 0).all()
    else:
        assert picks.score.max() <= rest.min() and (np.diff(picks.score) >= 0).all()


def test_predict_probs_restores_mode(toy_ctx) -> None:
    model = build_model(toy_ctx.cfg["model"], 2, toy_ctx.bundle.input_shape, seed=1).train()
    p = predict_probs(model, toy_ctx.bundle.train, np.arange(10), batch_size=3)
    assert model.training and p.shape == (10, 2)
    np.testing.assert_allclose(p.sum(1), 1.0)


def _write_rbc_table(ctx: RoundContext, name: str) -> FactorFeatures:
    """What extract_features would write for the best snapshot (K = 1), made in-process so that the
    selector finds it and skips the Ray stage."""
    train = ctx.bundle.train
    model = build_model(ctx.cfg["model"], 2, ctx.bundle.input_shape)
    model.load_state_dict(torch.load(Path(ctx.run.snapshots[0]["path"]) / "model.pt", weights_only=True))
    A, X = rbc_factors(model, train.inputs(np.arange(len(train))), label_aware=False)
    cols = factor_columns(train.sample_id, 0, 3, A.numpy(), X.numpy())
    out = ctx.work_dir / name
    out.mkdir()
    pq.write_table(pa.table({c: (pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)),
                                                                   type=pa.list_(pa.float32(), v.shape[1]))
                                 if v.ndim == 2 else pa.array(v)) for c, v in cols.items()},
                            schema=factor_schema(A.shape[1], X.shape[1])), out / "part-0.parquet")
    from pivotal_ray.distributed.extract import snapshot_records

    snap = ctx.run.snapshots[0]
    (out / "features.json").write_text(json.dumps({
        "kind": "rbc", "label_aware": False,
        "snapshots": snapshot_records([{"path": snap["path"], "epoch": snap["epoch"]}]),
        "num_samples": len(train), "num_rows": len(train), "seed": ctx.seed}))
    return read_factor_table(out)


def test_a_feature_table_of_another_round_is_extracted_again(toy_ctx, monkeypatch) -> None:
    import pivotal_ray.distributed.extract as extract

    out = toy_ctx.work_dir / "features_stale"
    _write_rbc_table(toy_ctx, out.name)
    calls = []
    monkeypatch.setattr(extract, "extract_features", lambda **kw: calls.append(kw))
    epoch = toy_ctx.run.snapshots[0]["epoch"]
    extract_round_features(toy_ctx, kind="rbc", epochs=[epoch], name=out.name)
    assert calls == []  # the table this round asks for: reused (a resumed run)
    extract_round_features(toy_ctx, kind="gbc", epochs=[epoch], name=out.name)  # another kind
    meta = json.loads((out / "features.json").read_text())
    (out / "features.json").write_text(json.dumps({**meta, "snapshots": [{"path": "-", "epoch": epoch + 1}]}))
    extract_round_features(toy_ctx, kind="rbc", epochs=[epoch], name=out.name)  # other snapshots
    (out / "features.json").unlink()
    extract_round_features(toy_ctx, kind="rbc", epochs=[epoch], name=out.name)  # unknown contents
    assert [c["overwrite"] for c in calls] == [True, True, True]
    assert [c["feature_spec"]["kind"] for c in calls] == ["gbc", "rbc", "rbc"]
    assert [c["deterministic"] for c in calls] == [False, False, False]  # ray.deterministic reaches the stage
    det = RoundContext(cfg={**toy_ctx.cfg, "ray": {**toy_ctx.cfg["ray"], "deterministic": True}},
                       bundle=toy_ctx.bundle, meta_ids=toy_ctx.meta_ids, run=toy_ctx.run, round=1,
                       work_dir=toy_ctx.work_dir)
    extract_round_features(det, kind="gbc", epochs=[epoch], name=out.name)
    assert calls[-1]["deterministic"] is True


def test_craig_selector_reads_the_best_snapshot_factors(toy_ctx) -> None:
    feats = _write_rbc_table(toy_ctx, "features_craig")
    picks = SELECTORS.get("craig")(toy_ctx, 4)
    assert picks.sample_id.size == 4 and np.unique(picks.sample_id).size == 4
    assert not np.isin(picks.sample_id, toy_ctx.meta_ids).any()
    want = select_craig(feats, k=4, meta_ids=toy_ctx.meta_ids, coverage_size=1024,
                        seed=derive_seed(toy_ctx.seed, "select", "craig", toy_ctx.round))
    np.testing.assert_array_equal(picks.sample_id, want.sample_id)
    np.testing.assert_allclose(picks.score, want.gain)


def test_rbc_k_selector_runs_plain_kmeans_on_rbc_features(toy_ctx, monkeypatch) -> None:
    import pivotal_ray.distributed.kmeans as dk

    feats = _write_rbc_table(toy_ctx, "features_rbc")
    seen = {}

    def local(path, *, num_shards, shard_cpus, autoscaling, **kw):  # the in-memory run of the same algorithm
        seen.update(path=path, **kw)
        return select_pivotal(read_factor_table(path), **kw)

    monkeypatch.setattr(dk, "select_pivotal_distributed", local)
    picks = SELECTORS.get("rbc_k")(toy_ctx, 3)
    assert seen["weighted"] is False and Path(seen["path"]).name == "features_rbc"
    assert picks.sample_id.size == 3 and not np.isin(picks.sample_id, toy_ctx.meta_ids).any()
    assert seen["seed"] == derive_seed(toy_ctx.seed, "kmeans", toy_ctx.round)  # the round's own seed
    plain = select_pivotal(feats, budget=3, meta_ids=toy_ctx.meta_ids, exclude_frac=0.5, weighted=False,
                           seed=derive_seed(toy_ctx.seed, "kmeans", toy_ctx.round), max_iter=seen["max_iter"])
    np.testing.assert_array_equal(picks.sample_id, plain.sample_id)


# ---------------------------------------------------------------------------------------------
# mutation audit: properties no test above pinned down
# ---------------------------------------------------------------------------------------------


def test_balanced_quotas_never_give_the_remainder_to_a_class_at_capacity() -> None:
    # level L = 2 (2 + 2 + 2 = 6 <= 7 < 2 + 3 + 3); class 0 has exactly L candidates, so the one
    # left over must go to class 1 or 2 even when class 0 comes first in the priority order
    assert balanced_quotas(np.array([2, 5, 5]), k=7, priority=np.array([0, 1, 2])).tolist() == [2, 3, 2]
    assert balanced_quotas(np.array([5, 3, 3, 9]), k=13, priority=np.array([2, 1, 0, 3])).tolist() == [4, 3, 3, 3]


def test_random_balanced_gives_the_remainder_to_classes_in_a_seeded_random_order() -> None:
    ids, y = np.arange(90), np.repeat([0, 1, 2], 30)
    extra = set()
    for seed in range(12):
        pick = balanced_random(ids, y, k=4, num_classes=3, seed=seed)  # 4 = 1 + 1 + 1, one class gets 2
        assert (np.diff(pick) > 0).all()  # distinct, sorted as documented
        extra.add(int(np.argmax(np.bincount(y[pick], minlength=3))))
    assert extra == {0, 1, 2}  # not always the same (e.g. the lowest) class


def test_baseline_inputs_are_checked() -> None:
    ids, y = np.arange(10), np.arange(10) % 3
    with pytest.raises(ValueError, match="class indices"):
        balanced_random(ids, np.r_[y[:-1], 3], k=4, num_classes=3, seed=0)  # label == num_classes
    with pytest.raises(ValueError, match="distinct ids"):
        balanced_random(np.r_[ids[:-1], 0], y, k=4, num_classes=3, seed=0)
    with pytest.raises(ValueError, match="distinct ids"):
        rank_by_entropy(np.r_[ids[:-1], 0], np.zeros(10), k=2, highest=True)
    for k in (0, -1):
        with pytest.raises(ValueError, match="positive int"):
            rank_by_entropy(ids, np.zeros(10), k=k, highest=True)
        with pytest.raises(ValueError, match="positive int"):
            balanced_random(ids, y, k=k, num_classes=3, seed=0)


def test_predict_probs_runs_the_model_in_eval_mode(toy_ctx) -> None:
    """A BatchNorm model left in train mode: the probabilities must be eval-mode ones (running
    statistics), whatever the batch size, and the model's mode is restored afterwards."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(6, generator=gen))
        model[1].running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    model.train()
    train = toy_ctx.bundle.train
    pos = np.arange(9)
    with torch.no_grad():
        want = torch.softmax(model.eval()(train.inputs(pos)).double(), 1).numpy()
    model.train()
    for bs in (1, 4, 9):
        np.testing.assert_allclose(predict_probs(model, train, pos, batch_size=bs), want, rtol=1e-6, atol=1e-7)
    assert model.training


def test_random_selectors_draw_distinct_candidates_afresh_each_round(toy_ctx) -> None:
    import dataclasses

    train = toy_ctx.bundle.train
    cand = toy_ctx.candidates()
    np.testing.assert_array_equal(cand, np.setdiff1d(train.sample_id, toy_ctx.meta_ids))
    # the whole candidate pool: every candidate once, no meta sample
    np.testing.assert_array_equal(SELECTORS.get("random")(toy_ctx, cand.size).sample_id, cand)
    next_round = dataclasses.replace(toy_ctx, round=toy_ctx.round + 1)
    for method in ("random", "random_balanced", "finetune"):
        a = SELECTORS.get(method)(toy_ctx, 10).sample_id
        assert np.array_equal(a, SELECTORS.get(method)(toy_ctx, 10).sample_id)  # deterministic
        assert not np.array_equal(a, SELECTORS.get(method)(next_round, 10).sample_id)  # a fresh draw per round


def test_clustering_selectors_pass_the_configured_kmeans_settings(toy_ctx, tmp_path, monkeypatch) -> None:
    """rbc / rbc_k / gbc: the feature kind, weighted or plain K-means, and every selection.* setting
    of the config reach the distributed K-means (the defaults, and non-default values)."""
    import copy
    import dataclasses
    from types import SimpleNamespace

    import pivotal_ray.distributed.extract as extract
    import pivotal_ray.distributed.kmeans as dk

    other = copy.deepcopy(toy_ctx.cfg)
    other["seed"] = 4
    other["selection"].update(exclude_frac=0.3, kmeans_init="random", kmeans_max_iter=7, kmeans_tol=1e-3,
                              kmeans_sign_align=False, similarity="auto")
    other["reweight"]["mode"] = "l2rw"  # "auto" similarity under l2rw: signed (supplement eqs. S13-S14)
    other["ray"].update(kmeans_shards=3, kmeans_shard_cpus=0.5)
    extracted, clustered = [], []
    monkeypatch.setattr(extract, "extract_features", lambda **kw: extracted.append(kw))

    def fake_kmeans(path, **kw):
        clustered.append(kw)
        return SimpleNamespace(sample_id=np.arange(3), cluster=np.arange(3), score=np.ones(3), centroids=None,
                               objective=[1.0], n_iter=1, n_clusters=3)

    monkeypatch.setattr(dk, "select_pivotal_distributed", fake_kmeans)
    for cfg, signed in ((toy_ctx.cfg, False), (other, True)):
        s, r = cfg["selection"], cfg["ray"]
        for method, kind, weighted in (("rbc", "rbc", True), ("rbc_k", "rbc", False), ("gbc", "gbc", True)):
            ctx = dataclasses.replace(toy_ctx, cfg=cfg, round=2, work_dir=tmp_path / f"{method}-{cfg['seed']}")
            SELECTORS.get(method)(ctx, 3)
            assert extracted[-1]["feature_spec"]["kind"] == kind
            kw = clustered[-1]
            assert kw["weighted"] is weighted and kw["budget"] == 3 and kw["signed"] is signed
            assert (kw["exclude_frac"], kw["init"], kw["max_iter"], kw["tol"], kw["sign_align"]) == (
                s["exclude_frac"], s["kmeans_init"], s["kmeans_max_iter"], s["kmeans_tol"], s["kmeans_sign_align"])
            assert (kw["num_shards"], kw["shard_cpus"]) == (r["kmeans_shards"], r["kmeans_shard_cpus"])
            assert kw["seed"] == derive_seed(cfg["seed"], "kmeans", 2)
            np.testing.assert_array_equal(kw["meta_ids"], toy_ctx.meta_ids)
    assert (other["selection"]["kmeans_sign_align"], toy_ctx.cfg["selection"]["kmeans_sign_align"]) == (False, True)


@pytest.fixture
def two_snapshot_ctx(toy_ctx, tmp_path) -> RoundContext:
    """toy_ctx's round with a second, later snapshot of lower validation accuracy (other weights)
    and a non-zero seed: the best snapshot is the first of the two persisted ones."""
    import copy
    import dataclasses

    later = tmp_path / "run" / "checkpoint_000006"
    later.mkdir(parents=True)
    model = build_model(toy_ctx.cfg["model"], 2, toy_ctx.bundle.input_shape, seed=99)
    torch.save(model.state_dict(), later / "model.pt")
    best = toy_ctx.run.snapshots[0]
    snaps = [best, {"path": str(later), "epoch": 6, "val_acc": 0.3}]
    run = dataclasses.replace(toy_ctx.run, snapshots=snaps,
                              extra={"history": [{"epoch": 3, "val_acc": 0.5}, {"epoch": 4, "val_acc": 0.6},
                                                 {"epoch": 6, "val_acc": 0.3}]})
    cfg = copy.deepcopy(toy_ctx.cfg)
    cfg["seed"] = 5
    bundle = build_data(cfg["data"], cfg["noise"], cfg["seed"])  # the seed's own split, as the actors rebuild it
    meta = np.sort(numpy_rng(5, "meta").choice(bundle.train.sample_id, size=4, replace=False))
    (tmp_path / "round").mkdir()
    return dataclasses.replace(toy_ctx, cfg=cfg, bundle=bundle, meta_ids=meta, run=run, work_dir=tmp_path / "round")


def test_entropy_selectors_use_the_best_persisted_snapshot_not_the_last(two_snapshot_ctx, predictions_here) -> None:
    ctx = two_snapshot_ctx
    train, cand = ctx.bundle.train, ctx.candidates()
    model = build_model(ctx.cfg["model"], 2, ctx.bundle.input_shape)
    model.load_state_dict(torch.load(Path(ctx.run.snapshots[0]["path"]) / "model.pt", weights_only=True))
    H = predictive_entropy(predict_probs(model, train, train.positions_of(cand)))
    for method, highest in (("uncertain", True), ("certain", False)):
        picks = SELECTORS.get(method)(ctx, 5)
        want, h = rank_by_entropy(cand, H, k=5, highest=highest)
        np.testing.assert_array_equal(picks.sample_id, want)
        np.testing.assert_allclose(picks.score, h, rtol=1e-9)
        assert picks.info["snapshot_epoch"] == 3
    # one pass of the model over the training set, on the extraction stage, at the best snapshot;
    # the second method reads the round's table back
    assert [[s["epoch"] for s in kw["snapshots"]] for kw in predictions_here] == [[3]]
    np.testing.assert_array_equal(predictions_here[0]["sample_ids"], train.sample_id)


def test_craig_selector_uses_the_best_snapshot_and_its_own_coverage_draw(two_snapshot_ctx, monkeypatch) -> None:
    """The best persisted snapshot's table (seed 5) is reused as is, never extracted again; with a
    coverage subsample smaller than the candidates, the picks are those of the round's own draw."""
    import pivotal_ray.distributed.extract as extract
    import pivotal_ray.selectors as selectors

    ctx = two_snapshot_ctx
    feats = _write_rbc_table(ctx, "features_craig")  # the best snapshot's (epoch 3) RBC factors

    def no_extraction(**kw):
        raise AssertionError(f"extract_features called for {kw['snapshots']}: the table at hand is this round's")

    monkeypatch.setattr(extract, "extract_features", no_extraction)
    monkeypatch.setattr(selectors, "CRAIG_COVERAGE", 40)
    picks = SELECTORS.get("craig")(ctx, 4)
    want = select_craig(feats, k=4, meta_ids=ctx.meta_ids, coverage_size=40,
                        seed=derive_seed(5, "select", "craig", ctx.round))
    np.testing.assert_array_equal(picks.sample_id, want.sample_id)
    np.testing.assert_allclose(picks.score, want.gain, rtol=1e-6)
    assert picks.info["snapshot_epoch"] == 3 and picks.info["coverage_size"] == 40
