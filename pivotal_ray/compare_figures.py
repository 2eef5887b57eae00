"""Turns finished ``jobs.compare`` runs into the inputs of :mod:`pivotal_ray.plots`.

Which figures are drawn follows from the data, never from method names:
- decision regions: when the inputs are 2-D (the toy set), one panel per method (first seed and
  variant), from the best-validation snapshot (the model whose accuracy is reported);
- accuracy vs the varied key: when ``compare.vary_key`` has several values;
- t-SNE: for every run (first seed and variant) whose round 1 saved clustering centroids;
- weight histograms: per method, non-meta samples pooled over seeds (first variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import plots
from .config import CompareConfig
from .core.seeding import numpy_rng


def _first(done: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Runs of the first seed and the first variant, one per method (in compare.methods order)."""
    if not done:
        return []
    seed0, var0 = done[0][0].seed, done[0][0].variant
    return [(s, a) for s, a in done if s.seed == seed0 and s.variant == var0]


def _region_panel(spec: Any, metrics: dict, bundle: Any) -> plots.RegionPanel:
    from .compare import _load_model

    train = bundle.train
    pts = train.inputs(np.arange(len(train))).numpy()  # (N, 2) model input space
    lo, hi = pts.min(0) - 0.5, pts.max(0) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 150), np.linspace(lo[1], hi[1], 150))
    model = _load_model(spec.cfg, bundle, metrics["final_run"]["best_snapshot"])
    with torch.no_grad():
        grid = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
        pred = model(grid).argmax(1).numpy().reshape(gx.shape)
    sel = pd.read_csv(Path(spec.cfg.output_dir) / "selection.csv")
    at = lambda ids: pts[train.positions_of(np.asarray(ids, dtype=np.int64))]  # noqa: E731
    return plots.RegionPanel(
        title=f"{spec.method}: {100 * metrics['test_acc_at_best_val']:.1f}%", grid_x=gx, grid_y=gy, grid_pred=pred,
        points=pts, y_obs=train.y_obs, clean=train.y_obs == train.y_true,
        warmup=at(sel.loc[sel["round"] == 0, "sample_id"]), picks=at(sel.loc[sel["round"] >= 1, "sample_id"]))


def tsne_sample(fdir: Path, *, picked_ids: np.ndarray, seed: int, max_rows: int) -> tuple[Any, np.ndarray]:
    """The rows of the feature table ``fdir`` that a t-SNE plot shows, and the picks among them.

    Every picked sample plus a seeded draw of the others, ``max_rows`` in all, ascending by
    sample_id. Only the sample_id column of the whole table is read, then only the chosen rows'
    features (a GBC table can be many GiB; the plot needs ``max_rows`` of its rows).

    Returns (FactorFeatures | DenseFeatures of the chosen rows, positions of the picks in them).
    """
    from .core.densetable import read_feature_table, table_sample_ids

    ids = table_sample_ids(fdir)
    picked = np.flatnonzero(np.isin(ids, picked_ids))
    rest = np.setdiff1d(np.arange(len(ids)), picked)
    rng = numpy_rng(seed, "compare", "tsne")
    if len(picked) > max_rows:  # more picks than the plot holds (compare.tsne_max): a seeded subset of them
        picked = np.sort(rng.choice(picked, max_rows, replace=False))
    keep = np.sort(np.concatenate([picked, rng.choice(rest, min(len(rest), max_rows - len(picked)),
                                                      replace=False)]))
    sub = read_feature_table(fdir, sample_ids=ids[keep])
    return sub, np.flatnonzero(np.isin(keep, picked))


def _tsne(spec: Any, root: Path, cc: CompareConfig) -> list[Path]:
    out = []
    round_dir = Path(spec.cfg.output_dir) / "rounds" / "round_1"
    for cpath in sorted(round_dir.glob("centroids_*.npy")):
        kind = cpath.stem.removeprefix("centroids_")
        fdir = round_dir / f"features_{kind}"
        fdir = fdir if fdir.exists() else round_dir / "features"
        if not fdir.exists():
            continue
        sel = pd.read_csv(Path(spec.cfg.output_dir) / "selection.csv")
        sub, picks = tsne_sample(fdir, picked_ids=sel.loc[sel["round"] == 1, "sample_id"].to_numpy(),
                                 seed=spec.seed, max_rows=cc.tsne_max)
        out.append(plots.tsne_features(
            features=sub.dense(), centroids=np.load(cpath, allow_pickle=False), picks=picks,
            seed=spec.seed, title=f"{spec.method} ({kind} features, round 1, seed {spec.seed})",
            path=root / f"tsne_{spec.method}_{kind}.png"))
    return out


def draw_figures(*, done: list[tuple[Any, Any]], df: pd.DataFrame, cc: CompareConfig, root: Path) -> list[Path]:
    """Every figure the runs support; returns the PNG paths."""
    from .compare import finished_metrics
    from .core.data import build_data

    paths: list[Path] = []
    first = _first(done)
    if first:
        spec0 = first[0][0]
        bundle = build_data(spec0.cfg.data, spec0.cfg.noise, spec0.cfg.seed)
        if tuple(bundle.input_shape) == (2,):
            panels = [_region_panel(s, finished_metrics(s.cfg), bundle) for s, _ in first]
            paths.append(plots.decision_regions(panels=panels, path=root / "decision_regions.png"))
    if cc.vary_key is not None and len(cc.vary_values) > 1:
        paths.append(plots.accuracy_vs(df=df, x=cc.vary_key, path=root / f"accuracy_vs_{cc.vary_key}.png"))
    for spec, _ in first:
        paths += _tsne(spec, root, cc)
    var0 = done[0][0].variant if done else None
    hist: dict[str, tuple[list, list]] = {}
    for spec, a in done:
        if spec.variant == var0:
            w, c = hist.setdefault(spec.method, ([], []))
            w.append(a.weights[a.candidate])
            c.append(a.clean[a.candidate])
    if hist:
        paths.append(plots.weight_histograms(
            weights={m: (np.concatenate(w), np.concatenate(c)) for m, (w, c) in hist.items()},
            path=root / "weight_histograms.png"))
    return paths
