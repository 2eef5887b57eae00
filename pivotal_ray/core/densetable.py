"""Dense per-sample feature tables (GBC, or any N x D features) and reading either table kind.

Parquet layout of a dense table, one row per (sample_id, snapshot)::

    sample_id: int64, snapshot: int32 (k in 0..K-1), epoch: int32, g: fixed_size_list<float32>[W]

Every snapshot's row has the same width W (GBC pads each of its R blocks to a fixed width, see
:mod:`pivotal_ray.core.gbc`), so the K snapshot blocks of a sample concatenate into one row
``G_j = [g_j0, ..., g_j(K-1)]`` of width K*W and inner products sum over blocks (spec section 3).

:func:`read_feature_table` dispatches on the columns (``A``/``x`` -> factor, ``g`` -> dense), so
the K-means stage loads either kind from one path::

    feats = read_feature_table("outputs/toy/rounds/round_1/features_gbc")   # DenseFeatures (n, K*W)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .featuretable import (DenseFeatures, FactorFeatures, iter_rows, kept_batches, parquet_files,
                           read_factor_table, table_index)

__all__ = ["dense_schema", "dense_columns", "read_dense_table", "table_kind", "read_feature_table",
           "table_sample_ids"]

DENSE_COLUMNS = ("sample_id", "snapshot", "epoch", "g")
FACTOR_COLUMNS = ("sample_id", "snapshot", "epoch", "A", "x")


def dense_schema(width: int) -> pa.Schema:
    """The documented schema of a dense table whose rows are ``width`` floats per snapshot."""
    return pa.schema([
        ("sample_id", pa.int64()),
        ("snapshot", pa.int32()),
        ("epoch", pa.int32()),
        ("g", pa.list_(pa.float32(), width)),
    ])


def dense_columns(sample_id: np.ndarray, snapshot: int, epoch: int, G: np.ndarray) -> dict[str, np.ndarray]:
    """One snapshot's rows as numpy columns (a Ray Data batch).

    Parameters
    ----------
    sample_id : (n,) int
    snapshot, epoch : the snapshot index k and its training epoch
    G : (n, W) float
        The feature block of each sample at this snapshot.

    Returns
    -------
    dict: sample_id (n,) int64, snapshot (n,) int32, epoch (n,) int32, g (n, W) float32
    """
    G = np.ascontiguousarray(G, dtype=np.float32)
    n = np.asarray(sample_id).shape[0]
    if G.ndim != 2 or G.shape[0] != n:
        raise ValueError(f"G must be (n, W) with n = len(sample_id) = {n}; got {G.shape}")
    return {
        "sample_id": np.asarray(sample_id, dtype=np.int64),
        "snapshot": np.full(n, snapshot, dtype=np.int32),
        "epoch": np.full(n, epoch, dtype=np.int32),
        "g": G,
    }


def table_kind(paths: str | Path | Sequence[str | Path]) -> str:
    """``"dense"`` (a ``g`` column) or ``"factor"`` (``A`` and ``x`` columns), from the first file's schema."""
    files = parquet_files(paths)
    names = set(pq.read_schema(files[0]).names)
    if "g" in names:
        return "dense"
    if {"A", "x"} <= names:
        return "factor"
    raise ValueError(f"{files[0]} has columns {sorted(names)}: a feature table needs {list(FACTOR_COLUMNS)} "
                     f"(RBC) or {list(DENSE_COLUMNS)} (dense/GBC); re-run extract_features")


def read_dense_table(paths: str | Path | Sequence[str | Path], *,
                     sample_ids: Iterable[int] | None = None) -> DenseFeatures:
    """Read dense rows (any file order) into DenseFeatures sorted by sample_id.

    Parameters
    ----------
    paths : a table directory, one file, or a list of files
    sample_ids : optional ids to keep (e.g. one K-means shard's range)

    Returns
    -------
    DenseFeatures
        sample_id (n,) int64 ascending; G (n, K*W) float32 = the K snapshot blocks side by side,
        so ``G_i . G_j`` is the sum over snapshots of the block inner products.
    """
    files = parquet_files(paths)
    if sample_ids is not None:
        sample_ids = np.fromiter(sample_ids, dtype=np.int64)
    # Two streaming passes (featuretable.iter_rows: the shard's id range pushed into the reader):
    # the ids and snapshots first (12 bytes a row) to check completeness and fix the row order,
    # then the floats, each batch written straight to its rows of the (n, K*W) output, which sit
    # at position(sample_id) * K + snapshot. Memory: the output plus about one batch, never a
    # table of the floats.
    ids, K = table_index(files, sample_ids=sample_ids, where=paths)  # (n,) ascending
    n = ids.shape[0]
    out = None
    for snap, at, (rows,) in kept_batches(files, ids, ["g"], ranged=sample_ids is not None):  # rows (m, W) float32
        if out is None:
            out = np.empty((n * K, rows.shape[1]), dtype=np.float32)
        out[at * K + snap] = rows
    pa.default_memory_pool().release_unused()  # hand the batches' buffers back to the OS now
    return DenseFeatures(ids, out.reshape(n, K * out.shape[1]))  # (n, K*W)


def table_sample_ids(paths: str | Path | Sequence[str | Path]) -> np.ndarray:
    """The distinct sample ids of a feature table (factor or dense), ascending (n,) int64.

    Reads only the ``sample_id`` column, batch by batch, so a caller can choose rows and then read
    just those with ``read_feature_table(paths, sample_ids=...)``.
    """
    files = parquet_files(paths)
    parts = [np.unique(b.column(0).to_numpy()) for b in iter_rows(files, columns=["sample_id"])]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def read_feature_table(paths: str | Path | Sequence[str | Path], *,
                       sample_ids: Iterable[int] | None = None) -> FactorFeatures | DenseFeatures:
    """Read a factor (RBC) or dense (GBC) table, whichever ``paths`` holds (see :func:`table_kind`)."""
    if table_kind(paths) == "dense":
        return read_dense_table(paths, sample_ids=sample_ids)
    return read_factor_table(paths, sample_ids=sample_ids)
