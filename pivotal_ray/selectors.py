"""Meta-sample selectors (spec sections 1 and 6), registered by name.

A selector gets a :class:`RoundContext` (what the round knows: the data, the current meta set, the
last training run and its snapshots) and returns exactly ``k`` new, distinct training samples.
Clustering selectors run the Ray stages (feature extraction on Ray Data, distributed weighted
K-means); the others are plain numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import kmeans_signed
from .core.registry import Registry
from .core.seeding import derive_seed, numpy_rng
from .training import best_snapshot


@dataclass
class RoundContext:
    cfg: dict[str, Any]  # the resolved ExperimentConfig as a plain dict
    bundle: Any  # DataBundle (driver side)
    meta_ids: np.ndarray  # (m,) current meta samples
    run: Any  # TrainRun of the last training (warm-up for round 0)
    round: int
    work_dir: Path  # where this round may write (features, ...)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def candidates(self) -> np.ndarray:
        ids = self.bundle.train.sample_id
        return ids[~np.isin(ids, self.meta_ids)]


@dataclass
class Picks:
    sample_id: np.ndarray  # (k,) int64
    cluster: np.ndarray  # (k,) int64, -1 when the method has no clusters
    score: np.ndarray  # (k,) float64, NaN when the method has no score
    info: dict[str, Any] = field(default_factory=dict)


Selector = Callable[[RoundContext, int], Picks]
SELECTORS: Registry[Selector] = Registry("selection method")
DEFAULT_PLAN = "reweight"


def method(name: str, *, plan: str = DEFAULT_PLAN) -> Callable[[Selector], Selector]:
    """Register a selector under ``name`` with the training plan (``training.PLANS``) it needs."""

    def deco(fn: Selector) -> Selector:
        fn.plan = plan  # type: ignore[attr-defined]
        return SELECTORS.register(name)(fn)

    return deco


def plan_of(selector: Selector) -> str:
    """The training plan of a registered selector (``reweight`` unless it was registered with another)."""
    return getattr(selector, "plan", DEFAULT_PLAN)


def _unscored(ids: np.ndarray) -> Picks:
    ids = np.asarray(ids, dtype=np.int64)
    return Picks(ids, np.full(len(ids), -1, dtype=np.int64), np.full(len(ids), np.nan))


@SELECTORS.register("random")
def select_random(ctx: RoundContext, k: int) -> Picks:
    """k candidates drawn uniformly without replacement."""
    rng = numpy_rng(ctx.seed, "select", "random", ctx.round)
    return _unscored(np.sort(rng.choice(ctx.candidates(), size=k, replace=False)))


def _snapshot_epochs(ctx: RoundContext) -> list[int]:
    from .core.features import choose_snapshots

    hist = ctx.run.extra["history"]
    available = {s["epoch"] for s in ctx.run.snapshots}
    val = {h["epoch"]: h["val_acc"] for h in hist if h["epoch"] in available}
    f = ctx.cfg["features"]
    return choose_snapshots(val, num_snapshots=f["num_snapshots"], stride=f["stride"])


def _table_is(path: Path, *, snapshots: list[dict[str, Any]], feature_spec: dict, num_samples: int,
              seed: int) -> bool:
    """Whether the feature table at ``path`` holds what this round asks for (its features.json):
    the same snapshots (paths, so the same training run, and epochs), feature settings, samples
    and seed. A table from another training run of this round (the meta labels changed, a config
    changed) is not reused."""
    from .distributed.extract import snapshot_records, table_settings

    try:
        meta = json.loads((path / "features.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("snapshots") == snapshot_records(snapshots)
            and all(meta.get(k) == v for k, v in table_settings(feature_spec).items())
            and meta.get("num_samples") == num_samples and meta.get("seed") == seed)


def extract_table(cfg: dict[str, Any], bundle: Any, snapshots: list[dict[str, Any]], *,
                  feature_spec: dict[str, Any], out: Path, before: Callable[[], None] | None = None) -> str:
    """Ray Data extraction (``feature_spec["kind"]``) over every training sample at ``snapshots``
    (``[{"path", "epoch"}]``) into ``out``, with the resources of ``cfg["ray"]``; a table already
    at ``out`` is reused only if it holds what is asked (:func:`_table_is`), else replaced.
    ``before()`` is called only when the extraction is to run (checks that may refuse it)."""
    from .distributed.extract import extract_features

    r = cfg["ray"]
    stale = out.exists() and not _table_is(out, snapshots=snapshots, feature_spec=feature_spec,
                                           num_samples=len(bundle.train), seed=int(cfg["seed"]))
    if not out.exists() or stale:  # a table is reused (resume) only if it is this one
        if before is not None:
            before()
        extract_features(
            data_spec={"data": cfg["data"], "noise": cfg["noise"], "seed": int(cfg["seed"])},
            model_spec=cfg["model"], snapshots=snapshots, sample_ids=bundle.train.sample_id,
            feature_spec=feature_spec, output_path=str(out), num_actors=r["extract_actors"],
            num_cpus=r["extract_cpus"], num_gpus=r["extract_gpus"], batch_size=cfg["features"]["batch_size"],
            overwrite=stale, max_restarts=r["extract_max_restarts"], deterministic=r.get("deterministic", False))
    return str(out)


def extract_round_features(ctx: RoundContext, *, kind: str | None = None, epochs: list[int] | None = None,
                           name: str = "features") -> str:
    """Ray Data feature extraction over every training sample at the chosen snapshots.

    With no keywords: ``features.kind`` at the K chosen snapshots into ``work_dir/features``.
    ``kind`` forces an extractor whatever the config says (gbc, rbc_k, craig, predictions),
    ``epochs`` replaces the chosen snapshots, ``name`` is the directory under ``work_dir``.
    """
    import time

    t0 = time.perf_counter()
    epochs = _snapshot_epochs(ctx) if epochs is None else [int(e) for e in epochs]
    snapshots = [{"path": ctx.run.snapshot(e)["path"], "epoch": e} for e in epochs]
    features = ctx.cfg["features"]
    path = extract_table(ctx.cfg, ctx.bundle, snapshots, out=ctx.work_dir / name,
                         feature_spec=features if kind is None else {**features, "kind": kind})
    ctx.timings["features_s"] = time.perf_counter() - t0
    ctx.timings["snapshot_epochs"] = epochs  # type: ignore[assignment]
    return path


def _clustering(weighted: bool, kind: str | None = None) -> Selector:
    """Weighted (rbc, gbc) or plain (rbc_k) K-means on features of ``kind`` (None: features.kind)."""

    def select(ctx: RoundContext, k: int) -> Picks:
        import time

        from .distributed.kmeans import select_pivotal_distributed

        path = extract_round_features(ctx, kind=kind, name="features" if kind is None else f"features_{kind}")
        s, r = ctx.cfg["selection"], ctx.cfg["ray"]
        t0 = time.perf_counter()
        sel = select_pivotal_distributed(
            path, num_shards=r["kmeans_shards"], shard_cpus=r["kmeans_shard_cpus"], budget=k,
            meta_ids=ctx.meta_ids, exclude_frac=s["exclude_frac"], weighted=weighted, init=s["kmeans_init"],
            max_iter=s["kmeans_max_iter"], tol=s["kmeans_tol"], seed=derive_seed(ctx.seed, "kmeans", ctx.round),
            sign_align=s["kmeans_sign_align"], signed=kmeans_signed(s, ctx.cfg["reweight"]["mode"]),
            autoscaling=r["autoscaling"])
        ctx.timings["kmeans_s"] = time.perf_counter() - t0
        if sel.centroids is not None:  # for plots (the paper's Figure 4); float64 (n_clusters, D), no pickle
            from .core.artifacts import atomic_file

            with atomic_file(ctx.work_dir / f"centroids_{kind or ctx.cfg['features']['kind']}.npy") as tmp, \
                    open(tmp, "wb") as f:
                np.save(f, np.asarray(sel.centroids, dtype=np.float64), allow_pickle=False)
        return Picks(np.asarray(sel.sample_id, dtype=np.int64), np.asarray(sel.cluster, dtype=np.int64),
                     np.asarray(sel.score, dtype=np.float64),
                     info={"objective": [float(v) for v in sel.objective], "n_iter": int(sel.n_iter),
                           "n_clusters": int(sel.n_clusters)})

    select.clustered_kind = kind  # type: ignore[attr-defined]  # None: features.kind; see clustered_feature_kind
    return select


def clustered_feature_kind(method: str, configured_kind: str) -> str | None:
    """The feature kind ``method`` extracts and holds in K-means ("rbc" / "gbc"), None when it
    clusters none: rbc follows features.kind, rbc_k always uses RBC, gbc always GBC."""
    sel = SELECTORS.get(method)
    if not hasattr(sel, "clustered_kind"):  # only _clustering's selectors carry it
        return None
    return sel.clustered_kind or configured_kind


SELECTORS.register("rbc")(_clustering(weighted=True))


# ---------------------------------------------------------------------------------------------
# Baselines (spec section 6): same warm-up, same budget per round, exactly k new candidates
# ---------------------------------------------------------------------------------------------

SELECTORS.register("rbc_k")(_clustering(weighted=False, kind="rbc"))  # plain K-means, RBC features
SELECTORS.register("gbc")(_clustering(weighted=True, kind="gbc"))  # weighted K-means, GBC features

CRAIG_COVERAGE = 1024  # coverage subsample of the facility-location term (core.baselines.select_craig)


@SELECTORS.register("random_balanced")
def select_random_balanced(ctx: RoundContext, k: int) -> Picks:
    """k candidates, equally many per OBSERVED (noisy) class, drawn from the seed."""
    from .core.baselines import balanced_random

    cand, train = ctx.candidates(), ctx.bundle.train
    ids = balanced_random(cand, train.y_obs[train.positions_of(cand)], k=k, num_classes=ctx.bundle.num_classes,
                          seed=derive_seed(ctx.seed, "select", "random_balanced", ctx.round))
    return _unscored(ids)


def _entropy(highest: bool) -> Selector:
    def select(ctx: RoundContext, k: int) -> Picks:
        """k candidates of highest (uncertain) / lowest (certain) predictive entropy at the best
        snapshot; score = entropy, ties by the smaller sample_id. The model runs on the feature
        extraction stage's actors (Ray Data; ``ray.extract_gpus`` puts them on GPUs), not here."""
        from .core.baselines import rank_by_entropy, read_predictions

        cand = ctx.candidates()
        epoch = int(best_snapshot(ctx.run)["epoch"])  # best among persisted snapshots (snapshot_every may skip t*)
        pred = read_predictions(extract_round_features(ctx, kind="predictions", epochs=[epoch], name="predictions"))
        ids, H = rank_by_entropy(cand, pred.entropy[pred.at(cand)], k=k, highest=highest)
        return Picks(ids, np.full(k, -1, dtype=np.int64), H, info={"snapshot_epoch": epoch})

    return select


SELECTORS.register("uncertain")(_entropy(highest=True))
SELECTORS.register("certain")(_entropy(highest=False))


@SELECTORS.register("craig")
def select_craig(ctx: RoundContext, k: int) -> Picks:
    """Facility-location greedy (CRAIG) on the RBC factors of the best snapshot (K = 1); score = gain."""
    from .core.baselines import select_craig as craig
    from .core.densetable import read_feature_table

    epoch = int(best_snapshot(ctx.run)["epoch"])
    path = extract_round_features(ctx, kind="rbc", epochs=[epoch], name="features_craig")
    res = craig(read_feature_table(path), k=k, meta_ids=ctx.meta_ids, coverage_size=CRAIG_COVERAGE,
                seed=derive_seed(ctx.seed, "select", "craig", ctx.round))
    return Picks(res.sample_id, np.full(k, -1, dtype=np.int64), res.gain,
                 info={"coverage_size": int(res.coverage_ids.size), "c_max": res.c_max, "snapshot_epoch": epoch})


@method("finetune", plan="finetune")
def select_finetune(ctx: RoundContext, k: int) -> Picks:
    """Random picks (the same draw as ``random``); the ``finetune`` plan then fine-tunes the best
    warm-up snapshot on the meta set alone instead of re-weighting."""
    return select_random(ctx, k)


@method("base", plan="plain")
def select_base(ctx: RoundContext, k: int) -> Picks:
    """``base`` trains on the noisy set without a meta set: its plan has no rounds."""
    raise RuntimeError("base selects no meta samples; its training plan ('plain') runs no selection round")
