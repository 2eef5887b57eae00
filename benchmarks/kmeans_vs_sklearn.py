"""Benchmark 4: plain K-means (``rbc_k``'s loop) vs scikit-learn KMeans and faiss (issue 4, item 4).

Same dense float32 features (RBC rows ``G_j = concat_k A_jk x~_jk^T`` at the MNIST shape, K=5,
C=10, d=84, D=4200), same k, same initial centroids (k distinct random rows), the same number of
Lloyd iterations and the same thread count. Ours: ``weighted_kmeans(DenseFeatures, weighted=False,
init=C0, max_iter=T, tol=0)`` on one in-memory DenseShard. scikit-learn: ``KMeans(init=C0,
n_init=1, max_iter=T, tol=0, algorithm="lloyd")``. faiss (if installed): ``faiss.Kmeans(niter=T)``
trained from C0 with subsampling off. The objective compared is the inertia of each method's
final centroids, recomputed here in float64 (target: within 1% of scikit-learn's); time ratio
ours / scikit-learn (target <= 1) and ours / faiss. scikit-learn stops early when the labels stop
changing; the iteration counts are reported.

    python -m benchmarks.kmeans_vs_sklearn --size full --out benchmarks/results/kmeans_vs_sklearn.jsonl
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pivotal_ray.core.featuretable import DenseFeatures
from pivotal_ray.core.kmeans import weighted_kmeans

from . import _common
from .kmeans_throughput import dense_of, rbc_like

SIZES = {"full": dict(n=20000, K=5, k=10, iters=20), "tiny": dict(n=300, K=1, k=5, iters=5)}
C_, d_ = 10, 84


def inertia(G: np.ndarray, C: np.ndarray) -> float:
    """sum_j min_i ||G_j - C_i||^2 in float64 (chunked)."""
    C = np.asarray(C, dtype=np.float64)
    c_sq = (C * C).sum(1)
    total = 0.0
    for s in range(0, G.shape[0], 4096):
        g = G[s:s + 4096].astype(np.float64)
        dist = (g * g).sum(1)[:, None] - 2.0 * g @ C.T + c_sq[None]
        total += float(np.maximum(dist.min(1), 0.0).sum())
    return total


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    threads = torch.get_num_threads()
    repeats = args.repeats or (3 if args.size == "full" else 1)
    cfg = SIZES[args.size]
    feats = dense_of(rbc_like(cfg["n"], cfg["K"], C_, d_))
    G = np.ascontiguousarray(feats.G, dtype=np.float32)  # (n, D)
    rng = np.random.default_rng(0)
    C0 = G[np.sort(rng.choice(G.shape[0], size=cfg["k"], replace=False))].astype(np.float64)
    T, k = cfg["iters"], cfg["k"]
    out: dict[str, Any] = {}

    def ours() -> None:
        km = weighted_kmeans(DenseFeatures(feats.sample_id, G), n_clusters=k, weighted=False, init=C0,
                             max_iter=T, tol=0.0, seed=0, device=args.device)
        out["ours"] = (km.centroids, km.n_iter)

    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    def sklearn() -> None:
        with threadpool_limits(limits=threads):
            km = KMeans(n_clusters=k, init=C0.astype(np.float32), n_init=1, max_iter=T, tol=0.0,
                        algorithm="lloyd", random_state=0).fit(G)
        out["sklearn"] = (km.cluster_centers_, int(km.n_iter_))

    fns = {"ours": ours, "sklearn": sklearn}
    try:
        import faiss

        def run_faiss() -> None:
            faiss.omp_set_num_threads(threads)
            km = faiss.Kmeans(G.shape[1], k, niter=T, verbose=False, seed=0, min_points_per_centroid=1,
                              max_points_per_centroid=G.shape[0])  # no subsampling
            km.train(G, init_centroids=C0.astype(np.float32))
            out["faiss"] = (km.centroids, T)

        fns["faiss"] = run_faiss
        faiss_note = f"faiss {faiss.__version__}"
    except ImportError:
        faiss_note = "faiss not installed (pip install faiss-cpu): faiss row skipped"
        print(faiss_note)
    t = _common.interleaved(fns, repeats=repeats, device=device, warmup=1 if args.size == "full" else 0)
    obj = {name: inertia(G, c) for name, (c, _) in out.items()}
    res: dict[str, Any] = {**cfg, "D": int(G.shape[1]), "threads": threads, "seconds": t,
                           "n_iter": {name: it for name, (_, it) in out.items()}, "inertia": obj,
                           "objective_rel_diff_vs_sklearn": obj["ours"] / obj["sklearn"] - 1.0,
                           "time_ratio_vs_sklearn": t["ours"] / t["sklearn"], "faiss": faiss_note}
    print(f"n={cfg['n']} D={G.shape[1]} k={k} iterations={T} threads={threads}: "
          + ", ".join(f"{m} {t[m]*1e3:.0f} ms ({out[m][1]} it, inertia {obj[m]:.6g})" for m in t))
    print("  " + _common.fmt_ratio("objective ours/sklearn - 1", res["objective_rel_diff_vs_sklearn"], "|.| <= 0.01")
          + "; " + _common.fmt_ratio("time ours/sklearn", res["time_ratio_vs_sklearn"], "<= 1.0"))
    if "faiss" in t:
        res["objective_rel_diff_vs_faiss"] = obj["ours"] / obj["faiss"] - 1.0
        res["time_ratio_vs_faiss"] = t["ours"] / t["faiss"]
        print("  " + _common.fmt_ratio("time ours/faiss", res["time_ratio_vs_faiss"], "reported")
              + f"; objective ours/faiss - 1: {res['objective_rel_diff_vs_faiss']:.2e}")
    return _common.write_result(args, "kmeans_vs_sklearn", device, res, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
