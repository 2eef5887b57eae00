"""Peak memory of the ``craig`` baseline, which runs in the driver (no Ray): it reads one
snapshot's RBC factors (N x (C + d) float32) and builds an N x m float32 similarity block
(m = ``selectors.CRAIG_COVERAGE`` coverage points) for the facility-location greedy. What
``pipeline.check_feature_memory`` counts for ``method=craig`` is fitted to this.

    python -m benchmarks.craig_memory --synthetic 200000,1,100,512 --table-dir /tmp/craig_200k \\
        --out benchmarks/results/craig_memory.jsonl

The table is written (once, reused after) by ``benchmarks.kmeans_memory``'s synthetic writer:
random label-free factors in the feature-table layout. The process's peak resident set (VmHWM,
reset after imports) and the node's used memory (MemTotal - MemAvailable, sampled every 0.1 s)
are reported above their values before the read, next to the two sizes the check counts: the
table in memory and the similarity block.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import _common
from benchmarks.kmeans_memory import Sampler, _synthetic, node_used


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--synthetic", required=True, help="N,K,C,d of the random factor table (craig reads snapshot 0)")
    p.add_argument("--table-dir", required=True)
    p.add_argument("--coverage", type=int, default=None, help="coverage points m (default: selectors.CRAIG_COVERAGE)")
    p.add_argument("--budget", type=int, default=10)
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("craig's selection runs in numpy on the host: --device cuda would measure the same thing; leave it out")
    device = _common.setup(args)

    from pivotal_ray.core.baselines import select_craig
    from pivotal_ray.core.densetable import read_feature_table
    from pivotal_ray.selectors import CRAIG_COVERAGE

    table_dir = _synthetic(argparse.Namespace(synthetic=args.synthetic, table_dir=args.table_dir,
                                               max_iter=1, shards=None))[0]
    n, _, C, d = (int(v) for v in args.synthetic.split(","))
    m = min(args.coverage or CRAIG_COVERAGE, n)
    meta = np.random.default_rng(0).choice(n, size=10, replace=False)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    rss0, used0 = _vm_kib("VmRSS:") * 1024, node_used()
    sampler = Sampler(every=0.1)
    sampler.start()
    t0 = time.perf_counter()
    feats = read_feature_table(table_dir / "snapshot_0.parquet")
    t_read = time.perf_counter() - t0
    res = select_craig(feats, k=args.budget, meta_ids=meta, coverage_size=m, seed=0)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    hwm = _vm_kib("VmHWM:") * 1024

    gib = 2**30
    table = n * (C + d) * 4
    sim = n * m * 4
    results = {
        "n": n, "C": C, "d": d, "coverage": m, "budget": args.budget,
        "table_gib": table / gib, "sim_gib": sim / gib,
        "process_peak_above_gib": (hwm - rss0) / gib, "node_used_above_gib": (peak["node_used"] - used0) / gib,
        "read_s": t_read, "seconds": seconds, "picks": [int(i) for i in res.sample_id],
    }
    print(json.dumps(results))
    return _common.write_result(args, "craig_memory", device, results, synthetic=args.synthetic)


if __name__ == "__main__":
    main()
