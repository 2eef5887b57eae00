"""Meta-sample selectors (spec sections 1 and 6), registered by name.

A selector gets a :class:`RoundContext` (what the round knows: the data, the current meta set, the
last training run and its snapshots) and returns exactly ``k`` new, distinct training samples.
Clustering selectors run the Ray stages (feature extraction on Ray Data, distributed weighted
K-means); the others are plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .core.registry import Registry
from .core.seeding import derive_seed, numpy_rng


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


def extract_round_features(ctx: RoundContext) -> str:
    """Ray Data feature extraction over every training sample at the chosen snapshots."""
    import time

    from .distributed.extract import extract_features

    t0 = time.perf_counter()
    epochs = _snapshot_epochs(ctx)
    snapshots = [{"path": ctx.run.snapshot(e)["path"], "epoch": e} for e in epochs]
    cfg, r = ctx.cfg, ctx.cfg["ray"]
    out = ctx.work_dir / "features"
    if not out.exists():
        extract_features(
            data_spec={"data": cfg["data"], "noise": cfg["noise"], "seed": ctx.seed},
            model_spec=cfg["model"], snapshots=snapshots, sample_ids=ctx.bundle.train.sample_id,
            feature_spec=cfg["features"], output_path=str(out), num_actors=r["extract_actors"],
            num_cpus=r["extract_cpus"], num_gpus=r["extract_gpus"], batch_size=cfg["features"]["batch_size"])
    ctx.timings["features_s"] = time.perf_counter() - t0
    ctx.timings["snapshot_epochs"] = epochs  # type: ignore[assignment]
    return str(out)


def _clustering(weighted: bool) -> Selector:
    def select(ctx: RoundContext, k: int) -> Picks:
        import time

        from .distributed.kmeans import select_pivotal_distributed

        path = extract_round_features(ctx)
        s, r = ctx.cfg["selection"], ctx.cfg["ray"]
        t0 = time.perf_counter()
        sel = select_pivotal_distributed(
            path, num_shards=r["kmeans_shards"], shard_cpus=r["kmeans_shard_cpus"], budget=k,
            meta_ids=ctx.meta_ids, exclude_frac=s["exclude_frac"], weighted=weighted, init=s["kmeans_init"],
            max_iter=s["kmeans_max_iter"], tol=s["kmeans_tol"], seed=derive_seed(ctx.seed, "kmeans", ctx.round))
        ctx.timings["kmeans_s"] = time.perf_counter() - t0
        return Picks(np.asarray(sel.sample_id, dtype=np.int64), np.asarray(sel.cluster, dtype=np.int64),
                     np.asarray(sel.score, dtype=np.float64),
                     info={"objective": [float(v) for v in sel.objective], "n_iter": int(sel.n_iter),
                           "n_clusters": int(sel.n_clusters)})

    return select


SELECTORS.register("rbc")(_clustering(weighted=True))
