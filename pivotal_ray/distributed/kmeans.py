"""Distributed weighted K-means: shard actors + a parameter-server actor (spec section 4, "Distributed").

The algorithm is :func:`pivotal_ray.core.kmeans.select_pivotal`, unchanged. Here it runs inside
a :class:`ParameterServer` actor over a :class:`RayShardSet`, whose ``call`` fans one shard
method out to every :class:`ShardActor` in parallel and returns the partial results in shard
order, so the server reduces them in a fixed order. Each iteration the shards return their
partial sums (numerator blocks, sum ||G_j||, counts, objective part) for the current centroids;
a final pass returns each shard's best candidates per centroid. Same seed, same data => the same
centroids (to float64 summation order) and picks as the single-process run (shards on CUDA
add with atomics, in no fixed order: near ties may then go either way).

Example (inside a Ray session; the parquet layout is :mod:`pivotal_ray.core.featuretable`'s)::

    from pivotal_ray.distributed.kmeans import select_pivotal_distributed
    sel = select_pivotal_distributed("outputs/toy/features/round0", num_shards=2, budget=4,
                                     meta_ids=meta, exclude_frac=0.5, seed=0)
    print(sel.sample_id)  # 4 distinct sample ids, none of them meta samples
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pivotal_ray.core.densetable import read_feature_table
from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures, parquet_files
from pivotal_ray.core.kmeans import Selection, select_pivotal
from pivotal_ray.core.shards import SHARD_OPS, make_shard

_INLINE_BYTES = 1 << 16  # larger array arguments go to the object store once, shared by all shards


@ray.remote
class ShardActor:
    """One in-memory shard (FactorShard/DenseShard) behind ``call(method, **kwargs)``.

    ``source`` is a FactorFeatures/DenseFeatures (pass an object ref; Ray resolves it) or
    ``{"files": [...], "sample_ids": (n,) int64}``: this shard's samples read from the parquet
    feature table with :func:`read_feature_table` (A/x columns -> factor, g -> dense).
    """

    def __init__(self, source: Any, *, device: str = "cpu", chunk_bytes: int = 64 * 2**20,
                 num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)  # fractional-CPU actors share cores; don't oversubscribe
        if isinstance(source, dict):
            source = read_feature_table(source["files"], sample_ids=source["sample_ids"])
        self.shard = make_shard(source, device=device, chunk_bytes=chunk_bytes)

    def call(self, method: str, /, **kwargs: Any) -> Any:
        if method not in SHARD_OPS:
            raise ValueError(f"unknown shard method {method!r}: choose one of {list(SHARD_OPS)}")
        return getattr(self.shard, method)(**kwargs)

    def call_timed(self, method: str, /, **kwargs: Any) -> tuple[Any, float]:
        """``call`` and the seconds it took inside this actor (for benchmarks)."""
        t0 = time.perf_counter()
        out = self.call(method, **kwargs)
        return out, time.perf_counter() - t0


class RayShardSet:
    """A shard set over shard actors: each call runs on all actors in parallel; results in actor order.

    ``record``: a list to which every call appends ``{"method", "start", "wall_s", "shard_s"}``
    (dispatch time ``time.perf_counter()`` in this process, seconds until all results are back,
    and each actor's seconds inside the call); results are the same with or without it.
    """

    def __init__(self, actors: Sequence[Any], *, record: list[dict[str, Any]] | None = None) -> None:
        self.actors = list(actors)
        self.record = record
        if not self.actors:
            raise ValueError("a shard set needs at least one shard actor")

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, /, **kwargs: Any) -> list[Any]:
        t0 = time.perf_counter()
        kwargs = {k: ray.put(v) if isinstance(v, np.ndarray) and v.nbytes >= _INLINE_BYTES else v
                  for k, v in kwargs.items()}  # top-level refs are resolved in the actor
        if self.record is None:
            return ray.get([a.call.remote(method, **kwargs) for a in self.actors])
        got = ray.get([a.call_timed.remote(method, **kwargs) for a in self.actors])
        self.record.append({"method": method, "start": t0, "wall_s": time.perf_counter() - t0,
                            "shard_s": [s for _, s in got]})
        return [r for r, _ in got]


@ray.remote
class ParameterServer:
    """Runs the Ray-free selection loop over the shard actors and reduces their partial results.

    ``record_timings=True`` keeps a per-call timing log of the shard calls (see
    :class:`RayShardSet`), returned by ``timings()``; the selection is unchanged.
    """

    def __init__(self, actors: list[Any], *, record_timings: bool = False) -> None:
        self._log: list[dict[str, Any]] | None = [] if record_timings else None
        self.shards = RayShardSet(actors, record=self._log)

    def select(self, kwargs: dict[str, Any]) -> Selection:
        return select_pivotal(self.shards, **kwargs)

    def timings(self) -> list[dict[str, Any]]:
        return list(self._log or [])


def _parquet_sources(path: str | Path, num_shards: int) -> list[dict[str, Any]]:
    """Split a feature table into contiguous sample_id ranges (as FactorFeatures.split does).

    Only the sample_id column is read here; each shard gets the files whose ids overlap its
    range (all files when a file holds one snapshot of every sample).
    """
    files = parquet_files(path)
    file_ids = [pq.read_table(f, columns=["sample_id"]).column("sample_id").to_numpy() for f in files]
    ids = np.unique(np.concatenate(file_ids))
    if num_shards > ids.shape[0]:
        raise ValueError(f"num_shards={num_shards} exceeds the {ids.shape[0]} samples in {path}: use fewer shards")
    bounds = np.linspace(0, ids.shape[0], num_shards + 1).round().astype(np.int64)
    out = []
    for s in range(num_shards):
        own = ids[bounds[s]:bounds[s + 1]]
        lo, hi = own[0], own[-1]
        mine = [str(f) for f, fi in zip(files, file_ids) if fi.size and fi.min() <= hi and fi.max() >= lo]
        out.append({"files": mine, "sample_ids": own})
    return out


class ShardActors(list):
    """The shard actors (a list, in shard order) and the placement group that reserved their
    resources; :func:`stop_shard_actors` ends both."""

    placement_group: Any = None


def stop_shard_actors(actors: Sequence[Any]) -> None:
    """Kill the shard actors and release their placement group (of :func:`start_shard_actors`)."""
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a)
    pg = getattr(actors, "placement_group", None)
    if pg is not None:
        remove_placement_group(pg)


def start_shard_actors(source: FactorFeatures | DenseFeatures | str | Path, *, num_shards: int,
                       shard_cpus: float = 0.25, device: str = "cpu",
                       chunk_bytes: int = 64 * 2**20, autoscaling: bool = False) -> ShardActors:
    """Start ``num_shards`` ShardActors over contiguous sample_id ranges of ``source``.

    Their resources are reserved together, in one placement group (bundles spread over the nodes
    where they fit, as the table's memory is), before any actor starts: K-means needs every shard,
    so runs side by side (``compare.concurrency``) must never each hold part of their sets and
    wait for the rest for ever. Waits until the cluster can hold the whole set (an autoscaling one
    adds nodes for it; on one that does not, a shard larger than any node is refused here). End
    them with :func:`stop_shard_actors`.

    Parameters
    ----------
    source : FactorFeatures/DenseFeatures (split in memory, shipped by object ref) or a parquet
        file/directory in the feature-table layout (each actor reads its own samples).
    num_shards : int, >= 1.
    shard_cpus : float
        Ray CPUs per actor (fractional so shards can share a core with other stages).
    device : str
        Where each shard computes: "cpu", or "cuda" (each shard then reserves a GPU of its own).
    autoscaling : bool
        The cluster adds nodes on demand: do not refuse more CPUs (or GPUs) than it has now.
    """
    if num_shards < 1 or shard_cpus <= 0:
        raise ValueError(f"num_shards={num_shards} must be >= 1 and shard_cpus={shard_cpus} > 0")
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0.0)
    if num_shards * shard_cpus > cpus and not autoscaling:
        raise ValueError(f"{num_shards} shards x {shard_cpus} CPUs exceed the cluster's {cpus} CPUs: "
                         "lower ray.kmeans_shards or ray.kmeans_shard_cpus")
    largest = max((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if shard_cpus > largest and not autoscaling:
        raise ValueError(f"a shard of {shard_cpus} CPUs fits no node (the largest has {largest}): lower "
                         "ray.kmeans_shard_cpus (and raise ray.kmeans_shards)")
    # a shard on a GPU reserves one: Ray shows every GPU to an actor that asks for none. The actor
    # sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so it is given the type, "cuda", and
    # never an index such as "cuda:1", which names no device there.
    kind = torch.device(device).type
    gpus = 1 if kind == "cuda" else 0
    gpus_here = resources.get("GPU", 0.0)
    if num_shards * gpus > gpus_here and not autoscaling:
        raise ValueError(f"{num_shards} shards on {device} take a GPU each, and the cluster has {gpus_here:g}: "
                         "lower the number of shards, or cluster on the CPU (device='cpu')")
    actor_device = kind if gpus else device
    if isinstance(source, (FactorFeatures, DenseFeatures)):
        if num_shards > len(source):
            raise ValueError(f"num_shards={num_shards} exceeds the {len(source)} samples: use fewer shards")
        sources: list[Any] = [ray.put(part) for part in source.split(num_shards)]
    else:
        sources = _parquet_sources(source, num_shards)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    threads = max(1, int(shard_cpus))
    bundle = {"CPU": float(shard_cpus), **({"GPU": float(gpus)} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in sources], strategy="SPREAD")
    out = ShardActors()
    out.placement_group = pg
    try:
        ray.get(pg.ready())  # all of the set's resources at once, or none held while waiting
        for i, src in enumerate(sources):
            out.append(ShardActor.options(
                num_cpus=shard_cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote(
                src, device=actor_device, chunk_bytes=chunk_bytes, num_threads=threads))
    except BaseException:
        stop_shard_actors(out)  # those started, and the group
        raise
    return out


def select_on_actors(actors: Sequence[Any], *, server_cpus: float = 0.0, **kwargs: Any) -> Selection:
    """Run :func:`select_pivotal` (same keyword arguments) in a ParameterServer over running shard actors.

    The server mostly waits on the shards, so by default it holds no CPU (it can never be
    starved of one by the shards it waits on).
    """
    server = ParameterServer.options(num_cpus=server_cpus).remote(list(actors))
    try:
        return ray.get(server.select.remote(kwargs))
    finally:
        ray.kill(server)


def select_pivotal_distributed(features_or_parquet_path: FactorFeatures | DenseFeatures | str | Path, *,
                               num_shards: int, shard_cpus: float = 0.25, server_cpus: float = 0.0,
                               budget: int, meta_ids: Sequence[int] | np.ndarray, exclude_frac: float,
                               weighted: bool = True, init: str = "kmeans++", max_iter: int = 200,
                               tol: float = 1e-6, seed: int, sign_align: bool = True, signed: bool = False,
                               device: str = "cpu", autoscaling: bool = False) -> Selection:
    """:func:`pivotal_ray.core.kmeans.select_pivotal` on ``num_shards`` shard actors + a parameter server.

    Needs a running Ray session. The actors are killed at the end, whatever happens.
    Returns the same :class:`Selection` as the in-memory run for the same seed and data.
    """
    actors = start_shard_actors(features_or_parquet_path, num_shards=num_shards, shard_cpus=shard_cpus,
                                device=device, autoscaling=autoscaling)
    try:
        return select_on_actors(actors, server_cpus=server_cpus, budget=budget, meta_ids=np.asarray(meta_ids),
                                exclude_frac=exclude_frac, weighted=weighted, init=init, max_iter=max_iter,
                                tol=tol, seed=seed, sign_align=sign_align, signed=signed)
    finally:
        stop_shard_actors(actors)
