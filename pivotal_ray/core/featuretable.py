"""Per-sample feature containers and their parquet layout (spec section 3).

RBC features are kept factorised: for sample j and snapshot k, ``G_jk = A_jk x~_jk^T`` with
``A_jk`` (C,) and ``x~_jk`` (d,). The C x d outer product is never formed.

Parquet layout, one row per (sample_id, snapshot)::

    sample_id: int64, snapshot: int32, epoch: int32,
    A: fixed_size_list<float32>[C], x: fixed_size_list<float32>[d]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds


@dataclass(frozen=True)
class FactorFeatures:
    """Factorised per-sample gradient features over K snapshots.

    sample_id: (n,) int64, sorted ascending; A: (n, K, C) float32; X: (n, K, d) float32.
    ``G_j`` is the concatenation over k of the C x d blocks ``A[j, k] outer X[j, k]``.
    """

    sample_id: np.ndarray
    A: np.ndarray
    X: np.ndarray

    def __post_init__(self) -> None:
        n = self.sample_id.shape[0]
        if self.A.ndim != 3 or self.X.ndim != 3:
            raise ValueError(f"A and X must be (n, K, C) and (n, K, d); got {self.A.shape} and {self.X.shape}")
        if self.A.shape[:2] != (n, self.X.shape[1]) or self.X.shape[0] != n:
            raise ValueError(f"inconsistent shapes: sample_id {self.sample_id.shape}, A {self.A.shape}, X {self.X.shape}")

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @property
    def num_snapshots(self) -> int:
        return int(self.A.shape[1])

    @property
    def dim(self) -> int:
        """Length of the flattened G_j: K * C * d."""
        return int(self.A.shape[1] * self.A.shape[2] * self.X.shape[2])

    def dense(self) -> np.ndarray:
        """Materialise G (n, K*C*d). For tests and small reference computations only."""
        G = np.einsum("nkc,nkd->nkcd", self.A, self.X)  # (n, K, C, d)
        return G.reshape(len(self), -1)

    def take(self, rows: np.ndarray) -> "FactorFeatures":
        rows = np.asarray(rows, dtype=np.int64)
        return FactorFeatures(self.sample_id[rows], self.A[rows], self.X[rows])

    def split(self, num_shards: int) -> list["FactorFeatures"]:
        """Contiguous partition in sample_id order (shard s holds rows [s*n/S, (s+1)*n/S))."""
        bounds = np.linspace(0, len(self), num_shards + 1).round().astype(np.int64)
        return [self.take(np.arange(bounds[s], bounds[s + 1])) for s in range(num_shards)]


@dataclass(frozen=True)
class DenseFeatures:
    """Any N x D features (sample_id (n,) int64 sorted; G (n, D) float32)."""

    sample_id: np.ndarray
    G: np.ndarray

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @property
    def dim(self) -> int:
        return int(self.G.shape[1])

    def dense(self) -> np.ndarray:
        return self.G

    def take(self, rows: np.ndarray) -> "DenseFeatures":
        rows = np.asarray(rows, dtype=np.int64)
        return DenseFeatures(self.sample_id[rows], self.G[rows])

    def split(self, num_shards: int) -> list["DenseFeatures"]:
        bounds = np.linspace(0, len(self), num_shards + 1).round().astype(np.int64)
        return [self.take(np.arange(bounds[s], bounds[s + 1])) for s in range(num_shards)]


def factor_schema(num_classes: int, dim: int) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.int64()),
        ("snapshot", pa.int32()),
        ("epoch", pa.int32()),
        ("A", pa.list_(pa.float32(), num_classes)),
        ("x", pa.list_(pa.float32(), dim)),
    ])


def factor_columns(sample_id: np.ndarray, snapshot: int, epoch: int, A: np.ndarray, X: np.ndarray) -> dict[str, np.ndarray]:
    """Columns for one snapshot's rows as a dict of numpy arrays (a Ray Data batch).

    A: (n, C), X: (n, d). ``A`` and ``x`` are 2-D arrays (Ray Data stores them as tensor columns).
    """
    n = sample_id.shape[0]
    return {
        "sample_id": np.asarray(sample_id, dtype=np.int64),
        "snapshot": np.full(n, snapshot, dtype=np.int32),
        "epoch": np.full(n, epoch, dtype=np.int32),
        "A": np.ascontiguousarray(A, dtype=np.float32),
        "x": np.ascontiguousarray(X, dtype=np.float32),
    }


def _column_2d(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list or Ray tensor-extension column (or one chunk of it) -> (n, width) float32;
    for one chunk of float32 without nulls, a view of Arrow's buffer (no copy)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's ArrowTensorType
        col = col.storage
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(-1, width).astype(np.float32, copy=False)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])
    raise TypeError(f"unsupported feature column type {col.type}")


def _scanner(files: Sequence[str | Path], *, columns: Sequence[str] | None,
             sample_ids: Iterable[int] | np.ndarray | None, batch_rows: int = 8192) -> ds.Scanner:
    """A scan of ``files`` with the range of ``sample_ids`` (when given) pushed into the parquet
    reader: row groups outside it are skipped by their statistics, the rest filtered batch by
    batch. One batch read ahead, so a streaming reader holds about one batch at a time."""
    flt = None
    if sample_ids is not None:
        ids = np.fromiter(sample_ids, dtype=np.int64) if not isinstance(sample_ids, np.ndarray) else sample_ids
        if ids.size:
            flt = (pc.field("sample_id") >= int(ids.min())) & (pc.field("sample_id") <= int(ids.max()))
    return ds.dataset([str(f) for f in files], format="parquet").scanner(
        columns=list(columns) if columns else None, filter=flt, batch_size=batch_rows,
        batch_readahead=1, fragment_readahead=1)


def read_rows(files: Sequence[str | Path], *, columns: Sequence[str] | None = None,
              sample_ids: Iterable[int] | np.ndarray | None = None) -> pa.Table | None:
    """The rows of ``files`` (None when there are none), only those whose sample_id lies in the
    range of ``sample_ids`` when given: the range is pushed into the parquet reader, which skips
    row groups outside it and filters the rest batch by batch, so a K-means shard holds its own
    part of the table in memory, never the whole of it."""
    if not files:
        return None
    return _scanner(files, columns=columns, sample_ids=sample_ids).to_table()


def iter_rows(files: Sequence[str | Path], *, columns: Sequence[str] | None = None,
              sample_ids: Iterable[int] | np.ndarray | None = None) -> Iterator[pa.RecordBatch]:
    """:func:`read_rows` batch by batch, never holding the whole table."""
    if files:
        yield from _scanner(files, columns=columns, sample_ids=sample_ids).to_batches()


def parquet_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The parquet files of a feature table: every ``*.parquet`` under a directory (sorted), the
    file itself, or the given list of files. FileNotFoundError when there are none."""
    if isinstance(paths, (str, Path)):
        path = Path(paths)
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise FileNotFoundError(f"no parquet files under {paths}: run the feature extraction stage first")
    return files


def table_index(files: Sequence[str | Path], *, sample_ids: np.ndarray | None = None,
                where: str | Path | Sequence[str | Path] = "") -> tuple[np.ndarray, int]:
    """First pass of a streaming read: (ids (n,) int64 ascending, K) of a feature table, reading
    only its sample_id and snapshot columns (12 bytes a row); only ``sample_ids`` when given.

    Raises ValueError when there are no rows or a sample lacks one of the snapshots 0..K-1 (or has
    one twice).
    """
    sid, snap = [], []
    for b in iter_rows(files, columns=["sample_id", "snapshot"], sample_ids=sample_ids):
        sid.append(b.column(0).to_numpy())
        snap.append(b.column(1).to_numpy())
    sid = np.concatenate(sid) if sid else np.zeros(0, dtype=np.int64)
    snap = np.concatenate(snap) if snap else np.zeros(0, dtype=np.int32)
    if sample_ids is not None:
        keep = np.isin(sid, sample_ids)
        sid, snap = sid[keep], snap[keep]
    if sid.shape[0] == 0:
        raise ValueError(f"empty feature table at {where}" + (" for the requested sample_ids" if sample_ids is not None else ""))
    order = np.lexsort((snap, sid))  # by sample_id, then snapshot
    sid, snap = sid[order], snap[order]
    K = int(snap.max()) + 1
    n = sid.shape[0] // K
    if n * K != sid.shape[0] or not np.array_equal(snap, np.tile(np.arange(K), n)) \
            or not np.array_equal(sid, np.repeat(sid[::K], K)):
        raise ValueError("feature table is incomplete: every sample needs exactly one row per snapshot 0..K-1; "
                         "re-run extract_features")
    return sid[::K].copy(), K


def kept_batches(files: Sequence[str | Path], ids: np.ndarray, columns: Sequence[str], *,
                 ranged: bool) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """Second pass of a streaming read: per batch, (snapshot (m,), position in ``ids`` (m,), the
    2-D float ``columns`` (m, w) each) of its rows whose sample is in ``ids`` (ascending, from
    :func:`table_index`); batches with none are skipped. ``ranged``: push the range of ``ids``
    into the reader (a shard's part of the table). The float columns are views of the batch where
    Arrow allows, so a caller writes them straight into its output."""
    n = ids.shape[0]
    for b in iter_rows(files, columns=["sample_id", "snapshot", *columns], sample_ids=ids if ranged else None):
        sid, snap = b.column(0).to_numpy(), b.column(1).to_numpy()
        cols = [_column_2d(b.column(2 + i)) for i in range(len(columns))]
        at = np.searchsorted(ids, sid)
        sel = (at < n) & (ids[np.minimum(at, n - 1)] == sid)  # rows of kept samples
        if sel.all():
            yield snap, at, cols
        elif sel.any():
            yield snap[sel], at[sel], [c[sel] for c in cols]


def read_factor_table(paths: str | Path | Sequence[str | Path], *, sample_ids: Iterable[int] | None = None) -> FactorFeatures:
    """Read factor rows (any file order) into a FactorFeatures sorted by sample_id.

    Every sample must have all K snapshots; ``sample_ids`` (optional) keeps only those samples.

    Streams, as :func:`pivotal_ray.core.densetable.read_dense_table` does: a pass over the ids
    and snapshots, then each batch of factors written straight to its place in the output, so
    memory is the output plus about one batch. The output is allocated snapshot-major, (K, n, C)
    and (K, n, d), and returned as (n, K, C) / (n, K, d) views of it: the layout FactorShard
    computes in, which it then takes as it is instead of copying the factors once more.
    """
    files = parquet_files(paths)
    if sample_ids is not None:
        sample_ids = np.fromiter(sample_ids, dtype=np.int64)
    ids, K = table_index(files, sample_ids=sample_ids, where=paths)
    n = ids.shape[0]
    A = X = None
    for snap, at, (a, x) in kept_batches(files, ids, ["A", "x"], ranged=sample_ids is not None):  # (m, C), (m, d)
        if A is None:
            A = np.empty((K, n, a.shape[1]), dtype=np.float32)
            X = np.empty((K, n, x.shape[1]), dtype=np.float32)
        A[snap, at], X[snap, at] = a, x
    pa.default_memory_pool().release_unused()  # hand the batches' buffers back to the OS now
    return FactorFeatures(ids, A.transpose(1, 0, 2), X.transpose(1, 0, 2))
