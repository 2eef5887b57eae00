"""Peak memory of one dense K-means shard through a whole selection, over the size of its rows.

    python -m benchmarks.shard_memory --size full --threads 1 --out benchmarks/results/shard_memory.jsonl

Builds a ``DenseShard`` on a random non-negative float32 table (full: 20000 x 6400, 0.48 GiB;
the GBC layout of docs/performance.md row "Memory of GBC K-means" at a size one process holds
easily) and runs ``select_pivotal`` on it as the pipeline does (20 meta ids, ``exclude_frac``
0.5, budget 10): the exclusion steps, the weighted K-means and the picks. Peak = the process's
resident-set high-water mark during the call minus the resident set before it
(``_common.peak_memory``), so the rows themselves are not counted; reported over the rows'
bytes. A shard that copied its active rows on each exclusion peaks near 1.5x; one that reorders
them in place (``core.shards.permute_rows_``) near the chunk temporaries only. Also reports
the seconds of the call and checks that the picks equal those of a shard built on a read-only
copy of the table (which the shard copies once before it reorders anything).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks import _common
from pivotal_ray.core.featuretable import DenseFeatures
from pivotal_ray.core.kmeans import select_pivotal
from pivotal_ray.core.shards import DenseShard

SIZES = {"tiny": {"n": 600, "D": 64, "max_iter": 5}, "full": {"n": 20000, "D": 6400, "max_iter": 5}}


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    cfg = SIZES[args.size]
    rng = np.random.default_rng(0)
    G = np.abs(rng.standard_normal((cfg["n"], cfg["D"]), dtype=np.float32))
    ids = np.arange(cfg["n"], dtype=np.int64) * 3
    meta = ids[rng.choice(cfg["n"], 20, replace=False)]
    kw = dict(budget=10, meta_ids=meta, exclude_frac=0.5, seed=0, max_iter=cfg["max_iter"])
    with _common.peak_memory(device) as build:
        shard = DenseShard(DenseFeatures(ids, G), device=device)
    with _common.peak_memory(device) as pk:
        t0 = time.perf_counter()
        sel = select_pivotal([shard], **kw)
        seconds = time.perf_counter() - t0
    restored = bool(np.array_equal(shard.dense_rows(sample_ids=ids)[1], G.astype(np.float64))) \
        if args.size == "tiny" else None  # a float64 copy of the full table would be 1 GiB
    del shard
    ro = G.copy()
    ro.flags.writeable = False
    ref = select_pivotal([DenseShard(DenseFeatures(ids, ro), device=device)], **kw)
    res = {**cfg, "rows_bytes": int(G.nbytes), "build_peak_over_rows": build["peak"] / G.nbytes,
           "select_peak_over_rows": pk["peak"] / G.nbytes, "select_s": seconds,
           "picks": sel.sample_id.tolist(),
           "same_picks_as_copy": bool(np.array_equal(sel.sample_id, ref.sample_id)),
           "rows_restored": restored, "memory_method": pk.get("method")}
    print(f"n={cfg['n']} D={cfg['D']} rows {G.nbytes / 2**30:.2f} GiB: select_pivotal peak "
          f"{res['select_peak_over_rows']:.3f}x the rows above them ({seconds:.1f} s), building the shard "
          f"{res['build_peak_over_rows']:.3f}x; picks as on a copy: {res['same_picks_as_copy']}")
    return _common.write_result(args, "shard_memory", device, res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
