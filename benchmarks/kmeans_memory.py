"""Peak memory of the distributed weighted K-means on a finished run's feature table (what
``pipeline.FEATURE_MEMORY_FACTOR`` and ``FEATURE_MEMORY_OVERHEAD`` are fitted to).

    python -m benchmarks.kmeans_memory --run outputs/compare/mnist_adv60_b256/runs/default/gbc/seed0 \
        --out benchmarks/results/kmeans_memory.jsonl

Starts a local Ray (2 CPUs, 1 GB object store, as ``ray=local``) unless one is up, samples three
measures of the machine's memory every 0.5 s (Ray's own processes included, as the memory check
must count them): the sum of every process's resident set (RSS; counts shared pages once per
process that maps them), the sum of their proportional set sizes (PSS; each page once) and the
node's used memory (MemTotal - MemAvailable, what Ray's memory monitor acts on), and runs
``select_pivotal_distributed`` with the run's round-1 table, warm-up ids, seed and
``ray.kmeans_shards`` / ``ray.kmeans_shard_cpus`` from its ``manifest.json``. Reports each peak and
the peak minus the value before Ray started over the table's size in memory (rows x row width x 4
bytes), and whether the picks equal the run's ``selection.csv`` (they must: same seed, same data).

``--synthetic N,K,C,d`` measures an RBC factor table no finished run on this machine is large
enough for (ImageNet-sized: the factor table of N samples, K snapshots, C classes and a d-wide
penultimate layer is N*K*(C+d)*4 bytes). It writes (once, reused after) a table of random
label-free factors (A a softmax, x~ a ReLU of Gaussians) in the feature-table layout to
``--table-dir``, one parquet file per snapshot as Ray Data would write several, and clusters it
as ``experiment=mnist_adv60 method=rbc`` would (2 shards of 0.25 CPU, 20 random meta ids, budget
``--budget`` (10), max_iter ``--max-iter``); the picks are printed and recorded so runs before and after a change
of the reader or the shards can be compared::

    python -m benchmarks.kmeans_memory --synthetic 200000,5,100,512 --table-dir /tmp/factor_200k \
        --out benchmarks/results/kmeans_memory.jsonl
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


def _proc_kib(field: str, name: str = "status") -> int:
    """KiB: the sum of ``field`` (a line of /proc/<pid>/<name>) over every readable process."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/{name}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def rss_sum() -> int:
    """Bytes: the sum of VmRSS over every process readable in /proc. Pages shared between
    processes (libraries, Ray's shared-memory object store) count once per process that maps them."""
    return _proc_kib("VmRSS:") * 1024


def pss_sum() -> int:
    """Bytes: the sum of the proportional set size (/proc/<pid>/smaps_rollup) over every process:
    a shared page counts 1/n in each of the n processes that map it, so the sum is each page once."""
    return _proc_kib("Pss:", "smaps_rollup") * 1024


def node_used() -> int:
    """Bytes: MemTotal - MemAvailable (/proc/meminfo), the memory in use on the machine as Ray's
    memory monitor reads it (page cache that can be dropped does not count; shared memory does)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


MEASURES = {"rss": rss_sum, "pss": pss_sum, "node_used": node_used}


class Sampler(threading.Thread):
    """Peak of each of MEASURES, sampled every ``every`` seconds until stop()."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self._done = every, threading.Event()
        self.peak = {k: 0 for k in MEASURES}

    def sample(self) -> None:
        for k, f in MEASURES.items():
            self.peak[k] = max(self.peak[k], f())

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.every)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


def _synthetic(args) -> tuple[Path, dict[str, Any], int, np.ndarray, None]:
    """Write (unless present) the --synthetic factor table; the selection settings to run on it."""
    import pyarrow as pa

    from pivotal_ray.config import RayConfig, SelectionConfig
    from pivotal_ray.core.featuretable import factor_columns, factor_schema

    n, K, C, d = (int(v) for v in args.synthetic.split(","))
    out = Path(args.table_dir)
    done = out / "_complete"
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        step = 8192
        for k in range(K):
            with pq.ParquetWriter(out / f"snapshot_{k}.parquet", factor_schema(C, d)) as w:
                for i in range(0, n, step):
                    m = min(step, n - i)
                    z = rng.standard_normal((m, C), dtype=np.float32) * 3
                    A = np.exp(z - z.max(1, keepdims=True))
                    A /= A.sum(1, keepdims=True)
                    X = np.maximum(rng.standard_normal((m, d), dtype=np.float32), 0)
                    cols = factor_columns(np.arange(i, i + m, dtype=np.int64), k, 10 + 2 * k, A, X)
                    w.write_table(pa.table({c: (pa.FixedSizeListArray.from_arrays(v.reshape(-1), v.shape[1])
                                                if v.ndim == 2 else v) for c, v in cols.items()},
                                           schema=factor_schema(C, d)))
        done.write_text(args.synthetic)
    s, r = SelectionConfig(method="rbc"), RayConfig()
    cfg = {"selection": {"method": "rbc", "exclude_frac": s.exclude_frac, "kmeans_init": s.kmeans_init,
                         "kmeans_max_iter": args.max_iter, "kmeans_tol": s.kmeans_tol,
                         "kmeans_sign_align": s.kmeans_sign_align, "similarity": s.similarity},
           "reweight": {"mode": "l2rw"},  # as experiment=mnist_adv60 (reweight/mnist.yaml): signed similarity
           "ray": {"kmeans_shards": args.shards or r.kmeans_shards,
                   "kmeans_shard_cpus": min(r.kmeans_shard_cpus, 2.0 / (args.shards or r.kmeans_shards))}}
    meta = np.sort(np.random.default_rng(1).choice(n, size=20, replace=False)).astype(np.int64)
    return out, cfg, 0, meta, None


def run(args) -> dict[str, Any]:
    import ray

    from pivotal_ray.core.featuretable import _column_2d
    from pivotal_ray.config import kmeans_signed
    from pivotal_ray.core.seeding import derive_seed
    from pivotal_ray.distributed.kmeans import select_pivotal_distributed

    device = _common.setup(args)
    if args.synthetic:
        table, cfg, seed, meta, want = _synthetic(args)
        root = table
    else:
        root = Path(args.run)
        manifest = json.loads((root / "manifest.json").read_text())
        cfg, seed = manifest["config"], manifest["seed"]
        table = next(p for p in sorted((root / "rounds" / "round_1").glob("features*")) if p.is_dir())
        rows = list(csv.DictReader(open(root / "selection.csv")))
        meta = np.array([int(r["sample_id"]) for r in rows if int(r["round"]) == 0], dtype=np.int64)
        want = sorted(int(r["sample_id"]) for r in rows if int(r["round"]) == 1)
    files = sorted(table.rglob("*.parquet"))
    # in memory, as pipeline.feature_table_bytes counts it: rows x row width x 4 bytes (float32)
    first = next(pq.ParquetFile(files[0]).iter_batches(batch_size=1))
    width = sum(_column_2d(first.column(c)).shape[1] for c in first.schema.names if c in ("g", "A", "x"))
    table_bytes = sum(pq.ParquetFile(f).metadata.num_rows for f in files) * width * 4
    s, r = cfg["selection"], cfg["ray"]
    # runs made before selection.similarity existed clustered with |<G_j, C_i>|
    signed = "similarity" in s and kmeans_signed(s, cfg.get("reweight", {}).get("mode", "direct"))
    base = {k: f() for k, f in MEASURES.items()}
    sampler = Sampler()
    sampler.start()
    started = _common.ray_init(num_cpus=2, object_store_mb=1000)  # or the session already up (tests)
    t0 = time.perf_counter()
    try:
        sel = select_pivotal_distributed(
            str(table), num_shards=r["kmeans_shards"], shard_cpus=r["kmeans_shard_cpus"], budget=args.budget if want is None else len(want),
            meta_ids=meta, exclude_frac=s["exclude_frac"], weighted=s["method"] != "rbc_k", init=s["kmeans_init"],
            max_iter=s["kmeans_max_iter"], tol=s["kmeans_tol"], seed=derive_seed(seed, "kmeans", 1),
            sign_align=s["kmeans_sign_align"], signed=signed, device=device.type)
        wall = time.perf_counter() - t0
    finally:
        peak = sampler.stop()
        if started:
            ray.shutdown()
    got = sorted(int(i) for i in sel.sample_id)
    res: dict[str, Any] = {"table_bytes": table_bytes, "picks": got}
    for k in MEASURES:
        res |= {f"base_{k}_bytes": base[k], f"peak_{k}_bytes": peak[k],
                f"peak_minus_base_{k}_over_table": (peak[k] - base[k]) / table_bytes}
    # the first version's keys (RSS sum only), kept so older result lines compare
    res |= {"peak_over_table": peak["rss"] / table_bytes,
            "peak_minus_base_over_table": res["peak_minus_base_rss_over_table"],
            "kmeans_s": wall, "table": str(table),
            "same_picks": None if want is None else got == want}  # synthetic: no run to compare with
    gib = 2**30
    print(f"table {table_bytes / gib:.2f} GiB; K-means {wall:.0f} s; "
          + (f"picks {got}" if args.synthetic else f"picks as in selection.csv: {res['same_picks']}"))
    for k, what in (("rss", "RSS sum"), ("pss", "PSS sum"), ("node_used", "node used (MemTotal - MemAvailable)")):
        print(f"  {what}: peak {peak[k] / gib:.2f} GiB, {(peak[k] - base[k]) / gib:.2f} GiB above the "
              f"{base[k] / gib:.2f} GiB before Ray ({res[f'peak_minus_base_{k}_over_table']:.2f}x the table)")
    return _common.write_result(args, "kmeans_memory", device, res, run=str(root))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished run's output_dir (GBC or RBC) whose round 1 features are kept")
    src.add_argument("--synthetic", metavar="N,K,C,d",
                     help="a random RBC factor table of N samples, K snapshots, C classes, d features")
    p.add_argument("--table-dir", default=None, help="where --synthetic writes (and later reuses) its table")
    p.add_argument("--max-iter", type=int, default=5, help="K-means iterations for --synthetic")
    p.add_argument("--shards", type=int, default=None,
                   help="shard actors for --synthetic (default ray.kmeans_shards, 2; CPUs per actor shrink to fit 2)")
    p.add_argument("--budget", type=int, default=10,
                   help="picks (= clusters) for --synthetic; the centroids are budget x K*C*d float64")
    args = p.parse_args(argv)
    if args.synthetic and not args.table_dir:
        p.error("--synthetic needs --table-dir (a directory with room for the table)")
    return run(args)


if __name__ == "__main__":
    main()
