"""Every figure of pivotal_ray.plots writes a PNG from tiny synthetic inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pivotal_ray import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_decision_regions(tmp_path):
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.linspace(-2, 2, 20), np.linspace(-2, 2, 20))
    pts = rng.normal(size=(40, 2))
    panel = plots.RegionPanel(title="rbc", grid_x=gx, grid_y=gy, grid_pred=(gy > 0).astype(int), points=pts,
                              y_obs=(pts[:, 1] > 0).astype(int), clean=rng.random(40) > 0.3, warmup=pts[:2],
                              picks=pts[2:6])
    out = plots.decision_regions(panels=[panel, panel], path=tmp_path / "sub" / "regions.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="at least one panel"):
        plots.decision_regions(panels=[], path=tmp_path / "x.png")


def test_accuracy_vs(tmp_path):
    df = pd.DataFrame({"method": ["rbc"] * 4 + ["random"] * 4, "noise.rate": [0.2, 0.2, 0.8, 0.8] * 2,
                       "test_acc_at_best_val": [99, 98, 90, 88, 97, 96, 70, 60], "seed": [0, 1] * 4})
    assert _is_png(plots.accuracy_vs(df=df, x="noise.rate", path=tmp_path / "acc.png"))
    with pytest.raises(ValueError, match="'noise.rat' missing"):
        plots.accuracy_vs(df=df, x="noise.rat", path=tmp_path / "bad.png")
    # a sweep over names (compare.vary_key=selection.similarity, vary_values=[abs,signed])
    named = df.assign(**{"selection.similarity": ["abs", "abs", "signed", "signed"] * 2})
    assert _is_png(plots.accuracy_vs(df=named, x="selection.similarity", path=tmp_path / "named.png"))


def test_tsne_features(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 12)) * 4
    feats = np.concatenate([c + rng.normal(size=(15, 12)) for c in centers])  # (45, 12)
    out = plots.tsne_features(features=feats, centroids=centers, picks=np.array([0, 15, 30]), seed=0,
                              path=tmp_path / "tsne.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="share D"):
        plots.tsne_features(features=feats, centroids=centers[:, :5], picks=np.array([]), seed=0,
                            path=tmp_path / "bad.png")


def test_weight_histograms(tmp_path):
    rng = np.random.default_rng(2)
    w, clean = rng.random(100), rng.random(100) > 0.4
    out = plots.weight_histograms(weights={"random": (w, clean), "base": (np.ones(100), clean)},
                                  path=tmp_path / "w.png")
    assert _is_png(out)
