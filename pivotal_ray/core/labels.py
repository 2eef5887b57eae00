"""Who cleans the meta samples' labels (spec section 5): the oracle, or a person.

In experiments the true labels are known and an *oracle* cleans every pick at once. In real use
a person labels them: the job exports the samples that need a label (``to_label_round<r>.csv``) and
stops; the person writes ``sample_id,label`` rows into a labels file; the same command, run
again, reads them back and goes on. Ray-free: the pipeline asks a :class:`Labeler` for labels
and for what is missing.
"""

from __future__ import annotations

import csv
import decimal
import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from pivotal_ray.config import ConfigError

LABEL_COLUMNS = ("sample_id", "label")
TO_LABEL_NAME = "to_label_round{round}.csv"  # in output_dir, one per round that waits for labels


class Labeler(Protocol):
    """Clean labels for meta samples."""

    source: str  # "oracle" or "file"

    def missing(self, ids: np.ndarray) -> np.ndarray:
        """The ids (int64, in the order given) that have no clean label yet."""
        ...

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """Clean labels (int64) of ``ids``; KeyError when one has none (check :meth:`missing`)."""
        ...


class OracleLabels:
    """The true labels of the training split (experiments: the noise was injected)."""

    source = "oracle"

    def __init__(self, sample_id: np.ndarray, y_true: np.ndarray) -> None:
        self._y = dict(zip(np.asarray(sample_id).tolist(), np.asarray(y_true).tolist()))

    def missing(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self._y[int(i)] for i in ids], dtype=np.int64)


class FileLabels:
    """Labels a person wrote into a CSV file (``sample_id,label``), read once at construction.

    A missing file holds no labels yet (the first run exports the warm-up's samples); every
    row of an existing file is checked by :func:`read_label_file`.
    """

    source = "file"

    def __init__(self, path: str | Path, *, train_ids: np.ndarray, num_classes: int) -> None:
        self.path = Path(path)
        self._y = read_label_file(self.path, train_ids=train_ids, num_classes=num_classes)

    def __len__(self) -> int:
        return len(self._y)

    def missing(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[[int(i) not in self._y for i in ids]] if ids.size else ids

    def labels(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self._y[int(i)] for i in ids], dtype=np.int64)


def read_label_file(path: str | Path, *, train_ids: np.ndarray, num_classes: int) -> dict[int, int]:
    """``{sample_id: label}`` from a CSV with a header naming ``sample_id`` and ``label`` (other
    columns, such as those of ``to_label_round<r>.csv``, are ignored); {} when ``path`` does not exist.

    Raises ConfigError naming the file, the offending rows and the fix when: the columns are
    missing, a value is not an integer, a label is outside ``[0, num_classes)``, a sample id is
    not in the training split, or one sample id is given two different labels. Rows that
    repeat the same (sample_id, label) are accepted (appending a file twice is harmless).
    """
    path = Path(path)
    if not path.exists():
        return {}
    fix = f"fix {path} (a CSV with a header line 'sample_id,label' and one row per labelled sample)"
    try:  # csv, not pandas.read_csv: a row with one field more than the header would become the index
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f, skipinitialspace=True)
            rows, lines = [], []
            for row in reader:
                if row and any(v.strip() for v in row):  # blank lines are skipped
                    rows.append(row)
                    lines.append(reader.line_num)
    except UnicodeDecodeError as err:  # e.g. a spreadsheet's "Unicode text" (UTF-16) or Latin-1 export
        raise ConfigError(f"labels file {path} is not UTF-8 text ({err}): save it as a UTF-8 CSV (a spreadsheet's "
                          f"'CSV UTF-8' format); {fix}") from None
    except (OSError, csv.Error) as err:
        raise ConfigError(f"labels file {path} cannot be read ({err}): {fix}") from None
    if not rows:
        raise ConfigError(f"labels file {path} is empty: {fix}")
    header = [c.strip() for c in rows[0]]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ConfigError(f"labels file {path}: the header names column(s) {repeated} more than once: {fix}")
    ragged = [line for row, line in zip(rows[1:], lines[1:]) if len(row) != len(header)]
    if ragged:
        raise ConfigError(f"labels file {path}: line(s) {ragged[:5]} have another number of fields than the "
                          f"header's {len(header)} ({header}): {fix}")
    df = pd.DataFrame(rows[1:], columns=header, index=lines[1:], dtype=str)
    absent = [c for c in LABEL_COLUMNS if c not in df.columns]
    if absent:
        raise ConfigError(f"labels file {path} has no column(s) {absent} (it has {list(df.columns)}): {fix}")
    df = df[df["label"].str.strip() != ""]  # to_label_round<r>.csv rows not labelled yet
    parsed = {}
    for col in LABEL_COLUMNS:
        values = [_exact_int(v) for v in df[col].str.strip()]
        bad = df.loc[[v is None for v in values], col]
        if len(bad):
            raise ConfigError(f"labels file {path}: {col} must be an integer, got {bad.head(5).tolist()} "
                              f"(line(s) {[int(i) for i in bad.index[:5]]}): {fix}")
        parsed[col] = values
    ids, labels = parsed["sample_id"], parsed["label"]
    out_of_range = [r for r, y in enumerate(labels) if not 0 <= y < num_classes][:5]
    if out_of_range:
        raise ConfigError(f"labels file {path}: label(s) {[labels[r] for r in out_of_range]} of sample(s) "
                          f"{[ids[r] for r in out_of_range]} are not classes of this data set "
                          f"(0 to {num_classes - 1}): {fix}")
    known = np.asarray(train_ids, dtype=np.int64)
    fits = np.array([_INT64_MIN <= i <= _INT64_MAX for i in ids], dtype=bool)  # larger ids are no sample's
    unknown = ~fits
    unknown[fits] = ~np.isin(np.array([i for i, f in zip(ids, fits) if f], dtype=np.int64), known)
    if unknown.any():
        raise ConfigError(f"labels file {path}: sample id(s) {[i for i, u in zip(ids, unknown) if u][:10]} are not "
                          f"in the training split (sample ids are those of the to_label_round<r>.csv files): {fix}")
    out: dict[int, int] = {}
    for i, y in zip(ids, labels):
        if out.setdefault(i, y) != y:
            raise ConfigError(f"labels file {path}: sample {i} is labelled both {out[i]} and {y}: keep one row "
                              f"per sample ({fix})")
    return out


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def _exact_int(text: str) -> int | None:
    """The whole number a cell spells (``12``, ``+12``, ``12.0``, ``1.2e1``, ``1e16``), read exactly
    as a decimal, or None: not a plain ASCII number (``inf``, ``nan``, ``0x1``, Python's ``1_0``,
    other scripts' digits), or not whole (``1.5``, ``0.99999999999999999``, which a float would
    round to 1). A spelling over 40 digits long is refused too, rather than expanded."""
    if not _NUMBER.fullmatch(text):
        return None
    value = decimal.Decimal(text)
    if value.adjusted() >= 40 or value != value.to_integral_value():
        return None
    return int(value)


def labels_digest(ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> str:
    """A short hash of (meta sample, clean label) pairs: names a training run whose meta labels a
    person gave, so a corrected label trains a new run instead of reading the old one back."""
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256(np.ascontiguousarray(ids[order]).tobytes() + b"|" +
                       np.ascontiguousarray(labels[order]).tobytes())
    return h.hexdigest()[:10]


def labels_suffix(source: str, ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> str:
    """What a training run's name ends with: ``-labels<digest>`` when a person gave the meta labels
    (a corrected label then trains a new run instead of reading the old one back), nothing for
    the oracle (whose runs keep the names they had before labels existed)."""
    return f"-labels{labels_digest(ids, labels)}" if source == "file" else ""


def to_label_rows(ids: np.ndarray, *, observed: Mapping[int, int], round_: int, cluster: Sequence[int],
                  score: Sequence[float], locate: Any = None) -> pd.DataFrame:
    """The rows of ``to_label_round<r>.csv``: what a person needs to label each sample, and an empty
    ``label`` column to fill in (the file can be used as the labels file as it is, once filled).
    ``locate(ids)``, when given, returns each sample's location (an image path)."""
    df = pd.DataFrame({"sample_id": np.asarray(ids, dtype=np.int64),
                       "observed_label": [observed[int(i)] for i in ids], "round": round_,
                       "cluster": np.asarray(cluster, dtype=np.int64), "score": np.asarray(score, dtype=float)})
    if locate is not None:
        df["path"] = list(locate(np.asarray(ids, dtype=np.int64)))
    df["label"] = ""
    return df
