"""K-means' final pass (``FactorShard.top_candidates``: float64 scan + near-tie rescoring) against
one Lloyd iteration (``assign_sums``, float32 GEMMs) on the same RBC factors.

The final pass runs once per round, a Lloyd iteration up to ``kmeans_max_iter`` times; before the
scans moved to float64 with rescoring of near-ties only, the final pass materialised every
shortlisted row densely (k = M rows per centroid) and took 55-58 s at the CIFAR-100 shape.

    python -m benchmarks.top_candidates --size full --out benchmarks/results/top_candidates.jsonl

Shapes: MNIST (n=60000, K=5, C=10, d=84, M=10) and CIFAR-100 (n=2048, K=5, C=100, d=512, M=150).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pivotal_ray.core.shards import FactorShard

from . import _common
from .kmeans_throughput import rbc_like

SHAPES = {  # name -> (K, C, d, {size: (n, M)})
    "mnist": (5, 10, 84, {"full": (60000, 10), "tiny": (300, 4)}),
    "cifar100": (5, 100, 512, {"full": (2048, 150), "tiny": (32, 4)}),
}


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    repeats = args.repeats or (3 if args.size == "full" else 1)
    results: dict[str, Any] = {}
    for name, (K, C, d, sizes) in SHAPES.items():
        n, M = sizes[args.size]
        shard = FactorShard(rbc_like(n, K, C, d), device=device)
        rng = np.random.default_rng(1)
        C0 = shard._dense(np.sort(rng.choice(n, size=M, replace=False)))  # (M, K C d): member rows
        C0 /= np.linalg.norm(C0, axis=1, keepdims=True)
        t = _common.interleaved({
            "top_candidates": lambda: shard.top_candidates(centroids=C0, weighted=True, k=M, n_best=M),
            "iteration": lambda: shard.assign_sums(centroids=C0, weighted=True)}, repeats=repeats, device=device)
        cand = shard.top_candidates(centroids=C0, weighted=True, k=M, n_best=M)
        r = {"n": n, "K": K, "C": C, "d": d, "M": M, "top_candidates_s": t["top_candidates"],
             "iteration_s": t["iteration"], "ratio": t["top_candidates"] / t["iteration"],
             "shortlist_width": int(cand.ids.shape[1])}
        results[name] = r
        print(f"{name} (n={n}, K={K}, C={C}, d={d}, M={M}): final pass {t['top_candidates']:.3f} s, "
              f"one iteration {t['iteration']:.3f} s (ratio {r['ratio']:.2f}); shortlist {r['shortlist_width']} "
              f"rows per centroid for k={M}")
    return _common.write_result(args, "top_candidates", device, results, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
