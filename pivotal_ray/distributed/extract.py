"""Per-sample feature extraction on a Ray Data actor pool (spec section 3; Algorithm 2 step 2b).

A Ray Dataset of candidate ``sample_id`` s flows through ``map_batches`` into a fixed pool of
actors. Each actor rebuilds the data bundle from the plain specs (``build_data`` is deterministic)
and loads all K snapshot models ONCE; every batch of n ids then becomes K x n rows
``(sample_id, snapshot, epoch, <feature columns>)``, written as parquet. For RBC that is the
factor-table layout of :mod:`pivotal_ray.core.featuretable` (A: fixed_size_list<float32>[C],
x: fixed_size_list<float32>[d]); for GBC the dense layout of :mod:`pivotal_ray.core.densetable`
(g: fixed_size_list<float32>[W]); for the ``predictions`` of uncertain/certain and jobs.compare
one snapshot's entropy, margin (float64) and predicted class (int64), :mod:`pivotal_ray.core.baselines`.
GBC extractors are fitted in every actor over all candidates in
the same order with the same seed, so every actor draws the same tensors (see core/gbc.py).

The table is written to a temporary sibling directory and renamed into place only once every row
is there, so a crash never leaves a partial table at ``output_path``.

Example (a local Ray session, the toy set, two snapshots of a warm-up run)::

    path = extract_features(
        data_spec={"data": {"name": "toy"}, "noise": {"kind": "uniform", "rate": 0.6}, "seed": 0},
        model_spec={"name": "mlp", "hidden": 32, "depth": 2},
        snapshots=[{"path": ".../checkpoint_000010", "epoch": 10}, {"path": ".../checkpoint_000030", "epoch": 30}],
        sample_ids=np.arange(600), feature_spec={"kind": "rbc"}, output_path="outputs/toy/features_r0")
    feats = load_features(path)   # FactorFeatures: A (600, 2, 4), X (600, 2, 32)
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from .. import storage
from ..config import FeatureConfig, _build
from ..core import baselines as _baselines  # noqa: F401  (registers EXTRACTORS "predictions")
from ..core import gbc as _gbc  # noqa: F401  (registers EXTRACTORS "gbc")
from ..core.densetable import read_feature_table
from ..core.features import EXTRACTORS
from ..core.featuretable import DenseFeatures, FactorFeatures, parquet_files
from ..core.seeding import derive_seed

# map_batches(max_restarts=...) below: Ray Data 2.60 takes it only as an extra remote arg, which
# it calls deprecated for 2.64 (the ray pin, <2.61, keeps that away); the one warning it gives per
# extraction is for this call alone, so it is silenced for this module alone
warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning,
                        module=r"pivotal_ray\.distributed\.extract")


def _to_arrow(cols: dict[str, np.ndarray]) -> pa.Table:
    """Columns -> Arrow table; 2-D (n, w) arrays become fixed_size_list<float32>[w].

    Returning Arrow (not numpy) from the UDF keeps Ray Data from re-encoding 2-D columns as its own
    tensor extension type, so the parquet files match the documented schema and read without Ray.
    """
    out = {}
    for name, v in cols.items():
        if v.ndim == 1:
            out[name] = pa.array(v)
        elif v.ndim == 2:
            flat = pa.array(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))  # (n * w,)
            out[name] = pa.FixedSizeListArray.from_arrays(flat, type=pa.list_(pa.float32(), v.shape[1]))
        else:
            raise ValueError(f"feature column {name!r} has shape {v.shape}: extractors must return (n,) or (n, w)")
    return pa.table(out)


class _ExtractWorker:
    """One actor of the pool: the data bundle and K extractors are built once, in ``__init__``."""

    def __init__(self, *, data_spec: dict, model_spec: dict, snapshots: list[dict], feature_spec: dict,
                 candidate_ids: np.ndarray, seed: int, num_cpus: float, batch_size: int,
                 deterministic: bool = False) -> None:
        from ..core.data import build_data
        from ..core.models import build_model
        from ..core.seeding import deterministic_kernels

        # match intra-op threads to the CPUs Ray reserved, so actors do not oversubscribe the node
        torch.set_num_threads(max(1, math.floor(num_cpus)))
        if deterministic:  # before this process's first GPU work
            deterministic_kernels()
        if ray.get_gpu_ids() and not torch.cuda.is_available():  # never fall back to the CPU silently
            raise RuntimeError(f"Ray gave this extraction actor GPU {ray.get_gpu_ids()} but torch cannot use it "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): install a torch "
                               "build that the node's NVIDIA driver supports, or set ray.extract_gpus=0")
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        bundle = build_data(data_spec["data"], data_spec["noise"], int(data_spec["seed"]))
        self.split = bundle.train
        self.batch_size = batch_size
        cfg = _build(FeatureConfig, feature_spec, "feature_spec")
        factory = EXTRACTORS.get(cfg.kind)
        self.extractors = []  # [(snapshot k, epoch, extractor)] in snapshot order
        for k, snap in enumerate(snapshots):
            model = build_model(model_spec, bundle.num_classes, bundle.input_shape)
            path = storage.join(snap["path"], "model.pt")
            try:
                state = storage.torch_load(path, map_location="cpu")
            except OSError:  # not there, no access, a mount or a store that fails: its own message says which
                raise
            except Exception as e:  # read, but cut off or not a state dict torch loads safely
                raise RuntimeError(f"cannot read snapshot {k} (epoch {snap.get('epoch')}, {path}): the file is "
                                   "damaged or not a torch.save(model.state_dict()); delete the training run that "
                                   "saved it (the folder above its checkpoint folder) and run the same command "
                                   f"again to train it anew; {type(e).__name__}: {e}") from e
            try:
                model.load_state_dict(state)
            except Exception as e:  # name the snapshot and the likely fix, keep torch's reason
                raise RuntimeError(f"cannot load snapshot {k} ({path}) into model {model_spec}: "
                                   "pass the model_spec the snapshot was trained with; "
                                   f"{type(e).__name__}: {e}") from e
            model.to(self.device).eval()
            ext = factory(model=model, cfg=cfg, seed=derive_seed(seed, "features", cfg.kind, k))
            if ext.needs_fit:  # e.g. GBC: per-tensor importances over ALL candidates (eq. 14)
                ext.fit(self._batches(candidate_ids))
            self.extractors.append((k, int(snap["epoch"]), ext))

    def _inputs(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.split.positions_of(ids)  # KeyError names unknown ids
        x = self.split.inputs(pos, augment=False)  # (n, *input_shape), normalised, no augmentation
        y = torch.as_tensor(self.split.y_obs[pos], dtype=torch.long)  # (n,) observed (noisy) labels
        return x.to(self.device), y.to(self.device)

    def _batches(self, ids: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(ids), self.batch_size):
            yield self._inputs(ids[start:start + self.batch_size])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = np.asarray(batch["sample_id"], dtype=np.int64)  # (n,)
        x, y = self._inputs(ids)
        per_snapshot = [ext.rows(sample_id=ids, snapshot=k, epoch=epoch, x=x, y=y)
                        for k, epoch, ext in self.extractors]  # K dicts of n rows each
        return _to_arrow({c: np.concatenate([r[c] for r in per_snapshot]) for c in per_snapshot[0]})


def _check_inputs(*, data_spec: dict, snapshots: list[dict], sample_ids: np.ndarray, feature_spec: dict,
                  num_actors: int, num_cpus: float, num_gpus: float, batch_size: int) -> np.ndarray:
    """Fail in the driver, before any Ray work or any file, with a message naming the fix."""
    missing = sorted({"data", "noise", "seed"} - set(data_spec))
    if missing:
        raise ValueError(f"data_spec lacks {missing}: pass {{'data': DataConfig dict, 'noise': NoiseConfig dict, "
                         "'seed': int}")
    cfg = _build(FeatureConfig, feature_spec, "feature_spec")  # ConfigError naming the fix
    EXTRACTORS.get(cfg.kind)  # KeyError listing the known extractors
    if not snapshots:
        raise ValueError("no snapshots given: pass [{'path': dir, 'epoch': int}, ...] (see choose_snapshots)")
    for k, snap in enumerate(snapshots):
        if not {"path", "epoch"} <= set(snap):
            raise ValueError(f"snapshot {k} is {snap!r}: each snapshot must be {{'path': dir, 'epoch': int}}")
        if not storage.exists(storage.join(snap["path"], "model.pt")):
            raise FileNotFoundError(f"snapshot {k} has no model.pt under {snap['path']!r}: pass checkpoint "
                                    "directories written by the training stage")
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"sample_ids must be a non-empty 1-D integer array; got dtype {ids.dtype}, shape {ids.shape}")
    if np.unique(ids).size != ids.size:
        raise ValueError("sample_ids has duplicates: each candidate must appear once (np.unique them)")
    if num_actors < 1 or num_cpus <= 0 or num_gpus < 0 or batch_size < 1:
        raise ValueError(f"num_actors={num_actors}, num_cpus={num_cpus}, num_gpus={num_gpus}, batch_size={batch_size}:"
                         " need num_actors >= 1, num_cpus > 0 (fractional, e.g. 0.5), num_gpus >= 0, batch_size >= 1")
    return ids.astype(np.int64)


def snapshot_records(snapshots: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"path", "epoch"}`` per snapshot as features.json records them: local paths made absolute
    (actors may start elsewhere), storage URIs as given."""
    return [{"path": s["path"] if "://" in str(s["path"]) else str(Path(s["path"]).resolve()),
             "epoch": int(s["epoch"])} for s in snapshots]


def table_settings(feature_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The feature settings that change a table's values (features.json records them): the kind,
    the loss, and for GBC the number of tensors drawn and the projection."""
    cfg = _build(FeatureConfig, dict(feature_spec), "feature_spec")
    out: dict[str, Any] = {"kind": cfg.kind, "label_aware": bool(cfg.label_aware)}
    if cfg.kind == "gbc":
        out.update(num_layers=int(cfg.num_layers), proj_dim=int(cfg.proj_dim), projection=cfg.projection)
    return out


_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _release_failed_pool(err: BaseException) -> None:
    """Let the actors of a failed extraction go now instead of when ``err`` does.

    Ray Data releases a pool by dropping its handles (after a failure too: its executor shuts down
    with ``force=False``, which never calls ``ray.kill``), and a failed execution leaves handles in
    the locals of the frames its exceptions' tracebacks hold
    (measured: the actor, with the CPUs/GPUs it reserved, lived as long as the exception, and a
    garbage collection longer once it was dropped). Where the failure is kept while other work goes
    on, a comparison's runs side by side, that would hold back their resources. Clearing the
    finished frames' locals and collecting drops those handles. The tracebacks still print in full
    (file, line, source); only a post-mortem debugger finds those frames' locals gone.
    """
    for frame in _traceback_frames(err):
        if frame.f_code.co_flags & _SUSPENDABLE:  # clearing a generator's frame would close it
            continue
        with contextlib.suppress(RuntimeError):  # a frame still running (ours, a caller's) is kept
            frame.clear()
            if frame.f_code.co_flags & inspect.CO_NEWLOCALS:
                # a tracer (pdb, coverage) read its locals into a dict clear() leaves as it was:
                # reading it again empties it (Python 3.11)
                frame.f_locals  # noqa: B018
    gc.collect()


def _traceback_frames(err: BaseException) -> Iterator[Any]:
    """Each frame, once, of the tracebacks of ``err`` and the exceptions it leads to (causes,
    contexts, a Ray task's ``cause``), with each frame's callers: their locals hold the pool too."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and id(frame) not in seen:
                seen.add(id(frame))
                yield frame
                frame = frame.f_back
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def extract_features(*, data_spec: dict, model_spec: dict, snapshots: list[dict], sample_ids: np.ndarray,
                     feature_spec: dict, output_path: str, num_actors: int = 1, num_cpus: float = 0.5,
                     num_gpus: float = 0.0, batch_size: int = 1024, seed: int | None = None,
                     overwrite: bool = False, max_restarts: int = 3, deterministic: bool = False) -> str:
    """Extract per-sample features of the train-split candidates at K snapshots into parquet.

    Parameters
    ----------
    data_spec : dict
        ``{"data": DataConfig dict, "noise": NoiseConfig dict, "seed": int}`` (rebuilt in each actor).
    model_spec : dict
        ModelConfig dict.
    snapshots : list of dict
        ``[{"path": checkpoint dir holding model.pt, "epoch": int}, ...]`` in snapshot order k = 0..K-1.
    sample_ids : ndarray (N,) int
        Distinct train-split ids of the candidates.
    feature_spec : dict
        FeatureConfig dict (``kind`` picks the extractor; ``label_aware`` uses the OBSERVED labels).
    output_path : str
        Directory of the parquet table; must not exist unless ``overwrite``.
    num_actors, num_cpus, num_gpus : actor pool size and per-actor resources (keep ``num_cpus``
        fractional on small nodes so Ray Data's own tasks still get a CPU).
    max_restarts : times Ray restarts each extraction actor after its process died (its batch is
        retried); then the extraction fails with the actor's ``ActorDiedError``. -1: no limit
        (Ray Data's default), with which an actor killed every time (say, for memory) never ends
        the job.
    batch_size : int
        Candidates per batch (rows per batch = K x batch_size).
    seed : int, optional
        Seeds the extractors (derived per snapshot); default ``data_spec["seed"]``.
    overwrite : bool
        Replace an existing table at ``output_path``.
    deterministic : bool
        The actors pick deterministic GPU kernels (``ray.deterministic``;
        :func:`pivotal_ray.core.seeding.deterministic_kernels`).

    Returns
    -------
    str
        ``output_path``: parquet files with K x N rows, one per (sample_id, snapshot), plus
        ``features.json`` (what was extracted).
    """
    ids = _check_inputs(data_spec=data_spec, snapshots=snapshots, sample_ids=sample_ids, feature_spec=feature_spec,
                        num_actors=num_actors, num_cpus=num_cpus, num_gpus=num_gpus, batch_size=batch_size)
    final = Path(output_path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists: remove it, choose another output_path, or pass overwrite=True")
    seed = int(data_spec["seed"] if seed is None else seed)
    snaps = snapshot_records(snapshots)
    # same filesystem => atomic rename; named as artifacts' temporaries, which a rerun removes
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        # one block per batch: blocks spread over the actors, and a batch never straddles two blocks
        ds = ray.data.from_arrow([pa.table({"sample_id": ids[i:i + batch_size]})
                                  for i in range(0, ids.size, batch_size)])
        ds = ds.map_batches(
            _ExtractWorker,
            fn_constructor_kwargs=dict(data_spec=data_spec, model_spec=model_spec, snapshots=snaps,
                                       feature_spec=feature_spec, candidate_ids=ids, seed=seed,
                                       num_cpus=num_cpus, batch_size=batch_size, deterministic=bool(deterministic)),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            # an actor's restart limit (Ray Data's default, -1, restarts an actor killed every time
            # for ever); an extra remote arg, the only way Ray Data 2.60 takes it (see the filter above)
            max_restarts=int(max_restarts),
        )
        ds.write_parquet(str(tmp))
        try:
            rows = sum(pq.read_metadata(f).num_rows for f in parquet_files(tmp))
        except FileNotFoundError:  # nothing under tmp that this (the driver's) node can see
            rows = 0
        if rows != len(snaps) * ids.size:  # never commit a table that lost or duplicated blocks
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            hint = (f"; the cluster has {nodes} nodes and Ray Data's write tasks may run on any of them: "
                    f"put output_dir on storage every node mounts at the same path (NFS/EFS, the RayJob's "
                    f"/mnt/shared), not on a disk of one node ({final.parent})") if nodes > 1 else ""
            raise RuntimeError(f"feature extraction wrote {rows} rows visible here, expected "
                               f"{len(snaps)} x {ids.size}{hint}")
        (tmp / "features.json").write_text(json.dumps({
            **table_settings(feature_spec), "snapshots": snaps, "num_samples": int(ids.size),
            "num_rows": int(rows), "seed": seed}, indent=2))
        if final.exists():  # overwrite: move the old table aside first so the rename is still one step
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(Exception):  # never in place of the extraction's own error
            _release_failed_pool(err)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_features(output_path: str | os.PathLike[str]) -> FactorFeatures | DenseFeatures:
    """Read a table written by :func:`extract_features` (rows sorted by sample_id).

    Returns
    -------
    FactorFeatures (RBC)
        sample_id (N,), A (N, K, C), X (N, K, d).
    DenseFeatures (GBC; :mod:`pivotal_ray.core.densetable` layout)
        sample_id (N,), G (N, K*W): the K snapshot rows side by side.
    """
    return read_feature_table(output_path)


__all__ = ["extract_features", "load_features"]
