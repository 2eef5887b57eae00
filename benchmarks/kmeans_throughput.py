"""Benchmark 3: weighted K-means throughput against torch.matmul, and factorised vs dense (issue 4, item 3).

One iteration = ``FactorShard.assign_sums`` (assignment + the shard's part of the S2 update) and
the centroid division ``numer / denom``, weighted K-means on RBC factors ``G_j = concat_k A_jk x~_jk^T``
(K snapshots, A (C,), x~ (d,)). FLOPs counted per iteration (n active rows, M centroids):

- inner products, per snapshot one GEMM (n, d) @ (d, M C):   K * 2 n d M C
- contraction with A, per snapshot a bmm (n, M, C) @ (n, C, 1): K * 2 n M C
- numerator, per snapshot and cluster A_S^T X_S (float64):   K * 2 n C d

GFLOP/s = FLOPs / (median iteration time); the reference is ``torch.matmul`` GFLOP/s of the
dominant GEMM at the shard's own chunk shape (n_chunk, d) @ (d, M C), float32, timed in the same
run, interleaved. Shapes: MNIST (C=10, d=84, K=5, M=10 picks per round) and CIFAR-100 (C=100,
d=512, M=150, K=5). At both shapes the same rows are also run as a DenseShard (G materialised,
(n, K C d) float32): held feature bytes, peak memory of one iteration, and iteration time.

    python -m benchmarks.kmeans_throughput --size full --out benchmarks/results/kmeans_throughput.jsonl

Targets (issue 4): GFLOP/s ratio >= 0.5; factorised / dense memory <= 1/50 at the CIFAR-100 shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures
from pivotal_ray.core.shards import DenseShard, FactorShard

from . import _common

SHAPES = {  # name -> (K, C, d, {size: (n, M, n_dense)}); tiny only checks that the code runs
    # n: rows for the throughput; n_dense: rows for factorised vs dense (dense CIFAR-100 rows are 1 MB each)
    "mnist": (5, 10, 84, {"full": (20000, 10, 20000), "tiny": (200, 10, 200)}),
    "cifar100": (5, 100, 512, {"full": (2048, 150, 256), "tiny": (16, 4, 16)}),
}


def rbc_like(n: int, K: int, C: int, d: int, seed: int = 0) -> FactorFeatures:
    """Label-free RBC-like factors: A = softmax (rows sum to 1), x~ = ReLU features (>= 0)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, K, C)) * 2.0
    A = np.exp(z - z.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    X = np.maximum(rng.standard_normal((n, K, d)), 0.0)
    return FactorFeatures(np.arange(n, dtype=np.int64), A.astype(np.float32), X.astype(np.float32))


def dense_of(F: FactorFeatures) -> DenseFeatures:
    G = np.einsum("nkc,nkd->nkcd", F.A, F.X).reshape(len(F), -1)  # (n, K C d) float32
    return DenseFeatures(F.sample_id, G)


def iteration_flops(n: int, K: int, C: int, d: int, M: int) -> dict[str, float]:
    return {"gemm": K * 2.0 * n * d * M * C, "contract": K * 2.0 * n * M * C, "numerator": K * 2.0 * n * C * d}


def held_bytes(shard: FactorShard | DenseShard) -> int:
    """Bytes of the feature tensors a shard keeps (factors or rows, plus ||G||^2 and ||G||)."""
    ts = [shard.A_all, shard.X_all] if isinstance(shard, FactorShard) else [shard.G_all]
    ts += [shard._sq_all, shard._norm]
    return int(sum(t.numel() * t.element_size() for t in ts))


def _iteration(shard, C0: np.ndarray):
    def it() -> np.ndarray:
        p = shard.assign_sums(centroids=C0, weighted=True)
        return p.numer / np.maximum(p.denom, 1e-300)[:, None]
    return it


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    repeats = args.repeats or (3 if args.size == "full" else 1)
    results: dict[str, Any] = {}
    for name, (K, C, d, sizes) in SHAPES.items():
        n, M, n_dense = sizes[args.size]
        F = rbc_like(n, K, C, d)
        fs = FactorShard(F, device=device)
        rng = np.random.default_rng(1)
        C0 = fs._dense(np.sort(rng.choice(n, size=M, replace=False)))  # M member rows as centroids (M, KCd)
        C0 /= np.linalg.norm(C0, axis=1, keepdims=True)
        step = max(1, fs.chunk_bytes // (4 * fs._row_width(M)))
        n_chunk = min(step, n)
        Xc = torch.randn(n_chunk, d, device=device)
        W = torch.randn(d, M * C, device=device)
        fl = iteration_flops(n, K, C, d, M)
        flops = sum(fl.values())
        mm_flops = 2.0 * n_chunk * d * M * C
        fns = {"factor_iter": _iteration(fs, C0), "matmul": lambda: torch.matmul(Xc, W)}
        t = _common.interleaved(fns, repeats=repeats, device=device)
        # matmul at this shape is short: time many back to back for a stable number
        reps = max(1, int(0.2 / max(t["matmul"], 1e-6)))
        t_mm = _common.timed(lambda: [torch.matmul(Xc, W) for _ in range(reps)], device) / reps
        gflops_iter, gflops_mm = flops / t["factor_iter"] / 1e9, mm_flops / t_mm / 1e9
        del fs
        # factorised vs dense on the first n_dense rows (C0 are rows among them when n_dense = n)
        Fd = FactorFeatures(F.sample_id[:n_dense], F.A[:n_dense], F.X[:n_dense])
        fs, ds = FactorShard(Fd, device=device), DenseShard(dense_of(Fd), device=device)
        it_f, it_d = _iteration(fs, C0), _iteration(ds, C0)
        td = _common.interleaved({"factor": it_f, "dense": it_d}, repeats=repeats, device=device)
        t_dense, t_fd = td["dense"], td["factor"]
        with _common.peak_memory(device) as pm_f:
            it_f()
        with _common.peak_memory(device) as pm_d:
            it_d()
        fs_bytes, ds_bytes = held_bytes(fs), held_bytes(ds)
        del fs, ds
        r = {"n": n, "K": K, "C": C, "d": d, "M": M, "n_chunk": n_chunk, "flops_per_iter": fl,
             "iter_s": t["factor_iter"], "matmul_s": t_mm, "gflops_iter": gflops_iter, "gflops_matmul": gflops_mm,
             "gflops_ratio": gflops_iter / gflops_mm,
             "n_dense": n_dense, "factor_bytes": fs_bytes, "dense_bytes": ds_bytes, "mem_ratio_factor_over_dense": fs_bytes / ds_bytes,
             "factor_iter_peak_bytes": pm_f["peak"], "dense_iter_peak_bytes": pm_d["peak"],
             "factor_iter_s_at_n_dense": t_fd, "dense_iter_s": t_dense, "time_ratio_factor_over_dense": t_fd / t_dense}
        results[name] = r
        print(f"{name} (n={n}, K={K}, C={C}, d={d}, M={M}): iteration {t['factor_iter']*1e3:.1f} ms = "
              f"{gflops_iter:.1f} GFLOP/s; matmul ({n_chunk}x{d})@({d}x{M*C}) {gflops_mm:.1f} GFLOP/s")
        print("  " + _common.fmt_ratio("GFLOP/s ratio", r["gflops_ratio"], ">= 0.5"))
        print(f"  n={n_dense}: held bytes factor {fs_bytes/2**20:.2f} MiB, dense {ds_bytes/2**20:.2f} MiB: "
              + _common.fmt_ratio("factor/dense", r["mem_ratio_factor_over_dense"], "<= 0.02 at cifar100")
              + f"; iteration peak factor {pm_f['peak']/2**20:.1f} MiB, dense {pm_d['peak']/2**20:.1f} MiB")
        print(f"  time factor {t_fd*1e3:.1f} ms vs dense {t_dense*1e3:.1f} ms: ratio "
              f"{r['time_ratio_factor_over_dense']:.3f}")
    return _common.write_result(args, "kmeans_throughput", device, results, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
