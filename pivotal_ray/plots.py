"""Figures of ``jobs.compare`` (matplotlib, Agg backend; each function writes one PNG).

- :func:`decision_regions` -- the paper's Figure 1: a 2-D model's decision regions, the noisy
  training labels, the warm-up meta samples and the picks, one panel per method;
- :func:`accuracy_vs` -- test accuracy (mean +- std over seeds) against a varied setting
  (the paper's Figure 3 when the setting is the noise rate);
- :func:`tsne_features` -- t-SNE of per-sample features with the clustering's centroids and
  picks (the paper's Figure 4);
- :func:`weight_histograms` -- learned weights of clean vs noisy training samples per method.

All inputs are plain arrays / DataFrames, so every figure can be drawn from synthetic data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["RegionPanel", "decision_regions", "accuracy_vs", "tsne_features", "weight_histograms"]


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    from .core.artifacts import atomic_file

    path = Path(path)
    try:
        with atomic_file(path) as tmp:  # a figure appears whole or not at all
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


@dataclass
class RegionPanel:
    """One method's panel of Figure 1.

    title : str
    grid_x, grid_y : (gy, gx) float  -- meshgrid of the input plane
    grid_pred : (gy, gx) int  -- predicted class on the grid
    points : (n, 2) float  -- training inputs; y_obs (n,) int observed labels; clean (n,) bool
    warmup : (m, 2) float  -- warm-up meta samples; picks (k, 2) float -- selected meta samples
    """

    title: str
    grid_x: np.ndarray
    grid_y: np.ndarray
    grid_pred: np.ndarray
    points: np.ndarray
    y_obs: np.ndarray
    clean: np.ndarray
    warmup: np.ndarray
    picks: np.ndarray


def decision_regions(*, panels: list[RegionPanel], path: str | Path) -> Path:
    """Figure-1-style panels: decision regions, noisy labels (x = flipped), warm-up and picks."""
    if not panels:
        raise ValueError("decision_regions needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, p in zip(axes[0], panels):
        ax.contourf(p.grid_x, p.grid_y, p.grid_pred, alpha=0.25, cmap="coolwarm",
                    levels=np.arange(-0.5, max(1, int(p.grid_pred.max())) + 1.0))
        for clean, marker in ((True, "o"), (False, "x")):
            m = p.clean == clean
            ax.scatter(p.points[m, 0], p.points[m, 1], c=p.y_obs[m], cmap="coolwarm", vmin=0, vmax=1, s=8,
                       marker=marker, alpha=0.6, label="clean label" if clean else "flipped label")
        if len(p.warmup):
            ax.scatter(p.warmup[:, 0], p.warmup[:, 1], s=120, marker="s", facecolors="none", edgecolors="k",
                       linewidths=1.5, label="warm-up meta")
        if len(p.picks):
            ax.scatter(p.picks[:, 0], p.picks[:, 1], s=220, marker="*", c="gold", edgecolors="k", label="picked")
        ax.set_title(p.title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def accuracy_vs(*, df: pd.DataFrame, x: str, path: str | Path, y: str = "test_acc_at_best_val",
                ylabel: str = "test accuracy at best validation (%)") -> Path:
    """Mean +- std over seeds of ``y`` against column ``x``, one line per ``method``."""
    for col in ("method", x, y):
        if col not in df:
            raise ValueError(f"accuracy_vs: column {col!r} missing; columns are {list(df.columns)}")
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    values = sorted(df[x].unique(), key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    for method, g in df.groupby("method"):
        s = g.groupby(x)[y].agg(["mean", "std"]).sort_index()
        # a numeric sweep at its values; others (e.g. selection.similarity=[abs,signed]) at positions
        pos = s.index.to_numpy(dtype=float) if numeric else np.array([values.index(v) for v in s.index], dtype=float)
        ax.errorbar(pos, s["mean"], yerr=s["std"].fillna(0.0), marker="o", capsize=3, label=str(method))
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _unit_rows(G: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(G, axis=1, keepdims=True)
    return G / np.where(n > 0, n, 1.0)


def tsne_features(*, features: np.ndarray, centroids: np.ndarray, picks: np.ndarray, path: str | Path,
                  seed: int, title: str = "") -> Path:
    """t-SNE of features (n, D) with centroids (M, D); ``picks`` are row indices (k,) into features.

    Rows are scaled to unit norm first (the clustering's similarity S1 is a |cosine|), and each
    sample is coloured by its centroid under S1: ``argmax_i |<G_j, C_i>|``.
    """
    from sklearn.manifold import TSNE

    features, centroids = np.asarray(features, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"features (n, D) and centroids (M, D) must share D; got {features.shape} and "
                         f"{centroids.shape}")
    cluster = np.abs(features @ centroids.T).argmax(1)  # (n,)
    stacked = _unit_rows(np.concatenate([features, centroids]))  # (n + M, D)
    perplexity = float(min(30.0, max(2.0, (len(stacked) - 1) / 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
    pts, cen = emb[: len(features)], emb[len(features):]
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.scatter(pts[:, 0], pts[:, 1], c=cluster, cmap="tab20", s=5, alpha=0.6)
    ax.scatter(cen[:, 0], cen[:, 1], c=np.arange(len(cen)), cmap="tab20", marker="*", s=300, edgecolors="k",
               label="centroids")
    if len(picks):
        p = pts[np.asarray(picks, dtype=np.int64)]
        ax.scatter(p[:, 0], p[:, 1], facecolors="none", edgecolors="k", s=90, linewidths=1.5, label="picked")
    ax.set_title(title or "t-SNE of per-sample features")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    return _save(fig, path)


def weight_histograms(*, weights: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                      bins: int = 30) -> Path:
    """Per method (panel), histograms of the learned weights of clean vs noisy samples.

    ``weights[method] = (w (n,), clean (n,) bool)``.
    """
    if not weights:
        raise ValueError("weight_histograms needs at least one method")
    fig, axes = plt.subplots(1, len(weights), figsize=(3.6 * len(weights), 3.0), squeeze=False)
    for ax, (method, (w, clean)) in zip(axes[0], weights.items()):
        w, clean = np.asarray(w, dtype=np.float64), np.asarray(clean, dtype=bool)
        # heavy right tails (l2rw weights reach 100 x the mean): bins up to the 99th percentile,
        # larger weights counted in the last bin
        lo, hi = (float(w.min()), float(np.percentile(w, 99))) if w.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        wc = np.clip(w, lo, hi)
        ax.hist(wc[clean], bins=edges, alpha=0.6, label=f"clean ({int(clean.sum())})", density=True)
        ax.hist(wc[~clean], bins=edges, alpha=0.6, label=f"noisy ({int((~clean).sum())})", density=True)
        ax.set_title(method)
        ax.set_xlabel("learned weight (last bin: >= 99th percentile)", fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)
