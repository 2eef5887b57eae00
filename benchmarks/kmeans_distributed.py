"""Benchmark 5: distributed K-means, time per round with 1, 2, 4 shard actors (issue 4, item 5).

RBC factors at the MNIST scale (n = 50000 train candidates, K = 5, C = 10, d = 84; M = 10 picks)
split over S shard actors holding ``2 / S`` Ray CPUs each (the 2 CPUs of the session; torch
threads ``max(1, floor(2 / S))``), run by :class:`pivotal_ray.distributed.kmeans.ParameterServer`
with ``record_timings=True`` (a log of every shard call; the selection is unchanged). A round is
one Lloyd iteration: from dispatching ``assign_sums`` to dispatching the next one. Per round:

- ``shard_s``: the slowest shard's seconds inside ``assign_sums`` (the critical path);
- ``ps_share`` = (round - shard_s) / round: everything that is not shard compute, i.e. the
  parameter server's reduction and centroid update, Ray dispatch, (de)serialisation and transfer
  of the centroids and partial sums.

The median over the rounds is reported. The session is one node (2 CPUs): ``ray.cluster_utils.Cluster``
would only add processes competing for the same 2 cores, so it is not used here.

    python -m benchmarks.kmeans_distributed --size full --out benchmarks/results/kmeans_distributed.jsonl

Target (issue 4): parameter-server share <= 10% at MNIST scale.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from . import _common
from .kmeans_throughput import rbc_like

SIZES = {"full": dict(n=50000, M=10, iters=10, shards=(1, 2, 4)),
         "tiny": dict(n=400, M=4, iters=3, shards=(1, 2))}


def rounds(log: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Lloyd rounds from a ParameterServer timing log (consecutive assign_sums calls)."""
    out = []
    for a, b in zip(log, log[1:]):
        if a["method"] == "assign_sums" and b["method"] in ("assign_sums", "top_candidates"):
            rnd = b["start"] - a["start"]
            shard = max(a["shard_s"])
            out.append({"round_s": rnd, "shard_s": shard, "call_overhead_s": a["wall_s"] - shard,
                        "server_s": rnd - a["wall_s"], "ps_share": (rnd - shard) / rnd})
    return out


def run(args) -> dict[str, Any]:
    import ray

    from pivotal_ray.distributed.kmeans import ParameterServer, start_shard_actors, stop_shard_actors

    device = _common.setup(args)
    started = _common.ray_init()
    cfg = SIZES[args.size]
    F = rbc_like(cfg["n"], 5, 10, 84)
    cpus = ray.cluster_resources().get("CPU", 2.0)
    kw = dict(budget=cfg["M"], meta_ids=np.zeros(0, dtype=np.int64), exclude_frac=0.0, init="random",
              max_iter=cfg["iters"], tol=0.0, seed=0)
    results: dict[str, Any] = {}
    try:
        # on CUDA every shard reserves a GPU of its own: only the shard counts the GPUs allow
        gpus = ray.cluster_resources().get("GPU", 0.0)
        shards = [S for S in cfg["shards"] if device.type != "cuda" or S <= gpus]
        if not shards:
            raise SystemExit(f"--device cuda: the Ray session has {gpus:g} GPUs, too few for a shard each")
        for S in shards:
            t0 = time.perf_counter()
            actors = start_shard_actors(F, num_shards=S, shard_cpus=cpus / S, device=device.type)
            try:
                server = ParameterServer.options(num_cpus=0).remote(list(actors), record_timings=True)
                ray.get(server.timings.remote())  # actors and server up before the clock starts
                t_start = time.perf_counter() - t0
                t1 = time.perf_counter()
                sel = ray.get(server.select.remote(kw))
                t_select = time.perf_counter() - t1
                log = ray.get(server.timings.remote())
                ray.kill(server)
            finally:
                stop_shard_actors(actors)
            rs = rounds(log)
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results[f"shards_{S}"] = {"shards": S, "shard_cpus": cpus / S, "n_iter": sel.n_iter, "rounds": len(rs),
                                      "median": med, "select_s": t_select, "startup_s": t_start}
            print(f"{S} shard actor(s) x {cpus / S:g} CPU: round {med['round_s']*1e3:.0f} ms (slowest shard "
                  f"{med['shard_s']*1e3:.0f} ms, call overhead {med['call_overhead_s']*1e3:.1f} ms, server "
                  f"{med['server_s']*1e3:.1f} ms); " + _common.fmt_ratio("PS share", med["ps_share"], "<= 0.10")
                  + f"; select {t_select:.1f} s, startup {t_start:.1f} s")
    finally:
        if started:
            ray.shutdown()
    return _common.write_result(args, "kmeans_distributed", device, results, n=cfg["n"], M=cfg["M"],
                                iters=cfg["iters"], K=5, C=10, d=84)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
