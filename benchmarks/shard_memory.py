"""Peak memory of one K-means shard through a whole selection, over the size of its rows.

    python -m benchmarks.shard_memory --size full --threads 1 --out benchmarks/results/shard_memory.jsonl
    python -m benchmarks.shard_memory --shard factor --size full --threads 1 --out benchmarks/results/shard_memory.jsonl

``--shard dense`` (default) builds a ``DenseShard`` on a random non-negative float32 table (full:
20000 x 6400, 0.48 GiB; the GBC layout of docs/performance.md row "Memory of GBC K-means" at a
size one process holds easily); ``--shard factor`` a ``FactorShard`` on random RBC factors (full:
200000 samples, K = 5 snapshots, C = 10, d = 84, MNIST's LeNet-5 shape: 0.35 GiB). Then runs
``select_pivotal`` on it as the pipeline does (20 meta ids, ``exclude_frac`` 0.5, budget 10): the
exclusion steps, the weighted K-means and the picks. Peak = the process's resident-set
high-water mark during the call minus the resident set before it (``_common.peak_memory``), so
the rows themselves are not counted; reported over the rows' bytes. A shard that copied its
active rows on each exclusion peaks near 1.5x; one that reorders them in place
(``core.shards.permute_rows_``) near the chunk temporaries only. Also reports the seconds of the
call and the picks (the same before and after a change of the shard code: compare the lines of
the results file); for a dense shard, whether they equal those of a shard built on a read-only
copy of the table (which the shard copies once before it reorders anything); at ``--size tiny``,
whether the shard's rows are back in their order afterwards.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks import _common
from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures
from pivotal_ray.core.kmeans import select_pivotal
from pivotal_ray.core.shards import DenseShard, FactorShard

SIZES = {
    "dense": {"tiny": {"n": 600, "D": 64, "max_iter": 5}, "full": {"n": 20000, "D": 6400, "max_iter": 5}},
    "factor": {"tiny": {"n": 600, "K": 2, "C": 3, "d": 8, "max_iter": 5},
               "full": {"n": 200000, "K": 5, "C": 10, "d": 84, "max_iter": 5}},
}


def _rows(shard: DenseShard | FactorShard) -> list[np.ndarray]:
    """Copies of the arrays that hold the shard's rows, in their current order."""
    return [a.numpy().copy() for a in shard._row_arrays()]


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    cfg = SIZES[args.shard][args.size]
    rng = np.random.default_rng(0)
    ids = np.arange(cfg["n"], dtype=np.int64) * 3
    if args.shard == "dense":
        G = np.abs(rng.standard_normal((cfg["n"], cfg["D"]), dtype=np.float32))
        feats, nbytes = DenseFeatures(ids, G), G.nbytes
    else:
        A = rng.random((cfg["n"], cfg["K"], cfg["C"]), dtype=np.float32)
        X = np.abs(rng.standard_normal((cfg["n"], cfg["K"], cfg["d"]), dtype=np.float32))
        feats, nbytes = FactorFeatures(ids, A, X), A.nbytes + X.nbytes
    meta = ids[rng.choice(cfg["n"], 20, replace=False)]
    kw = dict(budget=10, meta_ids=meta, exclude_frac=0.5, seed=0, max_iter=cfg["max_iter"])
    with _common.peak_memory(device) as build:
        shard = DenseShard(feats, device=device) if args.shard == "dense" else FactorShard(feats, device=device)
    before = _rows(shard) if args.size == "tiny" else None  # tiny only: a copy of full-size rows costs their size
    with _common.peak_memory(device) as pk:
        t0 = time.perf_counter()
        sel = select_pivotal([shard], **kw)
        seconds = time.perf_counter() - t0
    restored = None
    if before is not None:
        restored = all(np.array_equal(a, b) for a, b in zip(before, _rows(shard)))
    del shard
    same = None
    if args.shard == "dense":
        ro = G.copy()
        ro.flags.writeable = False
        ref = select_pivotal([DenseShard(DenseFeatures(ids, ro), device=device)], **kw)
        same = bool(np.array_equal(sel.sample_id, ref.sample_id))
    res = {**cfg, "shard": args.shard, "rows_bytes": int(nbytes), "build_peak_over_rows": build["peak"] / nbytes,
           "select_peak_over_rows": pk["peak"] / nbytes, "select_s": seconds,
           "picks": sel.sample_id.tolist(), "same_picks_as_copy": same,
           "rows_restored": restored, "memory_method": pk.get("method")}
    print(f"{args.shard} shard, rows {nbytes / 2**30:.2f} GiB ({cfg}): select_pivotal peak "
          f"{res['select_peak_over_rows']:.3f}x the rows above them ({seconds:.1f} s), building the shard "
          f"{res['build_peak_over_rows']:.3f}x; picks {res['picks']}; as on a read-only copy: {same}")
    return _common.write_result(args, "shard_memory", device, res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--shard", choices=("dense", "factor"), default="dense", help="which shard class to measure")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
