"""Peak memory of the distributed weighted K-means on a finished run's feature table (what
``pipeline.FEATURE_MEMORY_FACTOR`` and ``FEATURE_MEMORY_OVERHEAD`` are fitted to).

    python -m benchmarks.kmeans_memory --run outputs/compare/mnist_adv60_b256/runs/default/gbc/seed0 \
        --out benchmarks/results/kmeans_memory.jsonl

Starts a local Ray (2 CPUs, 1 GB object store, as ``ray=local``) unless one is up, samples the resident set of
every process on the machine every 0.5 s (Ray's own included, as the memory check must count it),
and runs ``select_pivotal_distributed`` with the run's round-1 table, warm-up ids, seed and
``ray.kmeans_shards`` / ``ray.kmeans_shard_cpus`` from its ``manifest.json``. Reports the peak of
that sum, the same minus the sum before Ray started, both over the table's size in memory (rows x row width x 4 bytes), and
whether the picks equal the run's ``selection.csv`` (they must: same seed, same data).
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks import _common


def rss_sum() -> int:
    """Bytes: the sum of VmRSS over every process readable in /proc."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class Sampler(threading.Thread):
    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_sum())
            time.sleep(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_sum())
        return self.peak


def run(args) -> dict[str, Any]:
    import ray

    from pivotal_ray.core.featuretable import _column_2d
    from pivotal_ray.core.seeding import derive_seed
    from pivotal_ray.distributed.kmeans import select_pivotal_distributed

    device = _common.setup(args)
    root = Path(args.run)
    manifest = json.loads((root / "manifest.json").read_text())
    cfg = manifest["config"]
    table = next(p for p in sorted((root / "rounds" / "round_1").glob("features*")) if p.is_dir())
    files = sorted(table.rglob("*.parquet"))
    # in memory, as pipeline.gbc_table_bytes counts it: rows x row width x 4 bytes (float32)
    first = next(pq.ParquetFile(files[0]).iter_batches(batch_size=1))
    width = sum(_column_2d(first.column(c)).shape[1] for c in first.schema.names if c in ("g", "A", "x"))
    table_bytes = sum(pq.ParquetFile(f).metadata.num_rows for f in files) * width * 4
    rows = list(csv.DictReader(open(root / "selection.csv")))
    meta = np.array([int(r["sample_id"]) for r in rows if int(r["round"]) == 0], dtype=np.int64)
    want = sorted(int(r["sample_id"]) for r in rows if int(r["round"]) == 1)
    s, r = cfg["selection"], cfg["ray"]
    base = rss_sum()
    sampler = Sampler()
    sampler.start()
    started = _common.ray_init(num_cpus=2, object_store_mb=1000)  # or the session already up (tests)
    t0 = time.perf_counter()
    try:
        sel = select_pivotal_distributed(
            str(table), num_shards=r["kmeans_shards"], shard_cpus=r["kmeans_shard_cpus"], budget=len(want),
            meta_ids=meta, exclude_frac=s["exclude_frac"], weighted=s["method"] != "rbc_k", init=s["kmeans_init"],
            max_iter=s["kmeans_max_iter"], tol=s["kmeans_tol"], seed=derive_seed(manifest["seed"], "kmeans", 1),
            sign_align=s["kmeans_sign_align"])
        wall = time.perf_counter() - t0
    finally:
        peak = sampler.stop()
        if started:
            ray.shutdown()
    got = sorted(int(i) for i in sel.sample_id)
    res = {"table_bytes": table_bytes, "base_rss_bytes": base, "peak_rss_bytes": peak,
           "peak_over_table": peak / table_bytes, "peak_minus_base_over_table": (peak - base) / table_bytes,
           "kmeans_s": wall, "same_picks": got == want, "table": str(table)}
    print(f"table {table_bytes / 2**30:.2f} GiB; peak RSS sum {peak / 2**30:.2f} GiB "
          f"({res['peak_over_table']:.2f}x the table; {res['peak_minus_base_over_table']:.2f}x above the "
          f"{base / 2**30:.2f} GiB before Ray); K-means {wall:.0f} s; picks as in selection.csv: {res['same_picks']}")
    return _common.write_result(args, "kmeans_memory", device, res, run=str(root))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run's output_dir (GBC or RBC) whose round 1 features are kept")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
