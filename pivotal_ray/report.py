"""Collect ``metrics.json`` files of finished runs into one table (method x seed) and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["method", "seed", "test_acc_at_best_val", "final_test_acc", "weight_auc", "best_epoch", "total_s"]


def _config_value(config: dict, dotted: str):
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def superseded(run_dir: str | Path) -> bool:
    """Whether the metrics.json in ``run_dir`` is not (or no longer) a finished run's: its
    manifest.json says another status (running again, awaiting labels). Runs without a manifest
    (older copies) count as finished."""
    from .core.artifacts import manifest_status

    return manifest_status(run_dir) not in (None, "complete")


def collect(root: str | Path, keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per ``<root>/**/metrics.json``: method, seed, accuracies (%), weight AUC, wall time,
    and the noise kind and rate (``noise.kind``, ``noise.rate``: NaN for runs that do not record them).

    ``keys``: further dotted config keys (e.g. ``features.num_snapshots``), read from each run's
    ``manifest.json`` beside its metrics; a ValueError names a key no run records.
    """
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        if "method" not in m or superseded(path.parent):
            continue
        row = {"method": m["method"], "seed": m["seed"],
               "test_acc_at_best_val": 100 * m["test_acc_at_best_val"],
               "final_test_acc": 100 * m["final_test_acc"], "weight_auc": m["weight_auc"],
               "best_epoch": m["best_epoch"], "total_s": m["timings"]["total_s"],
               "noise.kind": m.get("noise", {}).get("kind"), "noise.rate": m.get("noise", {}).get("rate"),
               "path": str(path.parent)}
        extra = [k for k in keys if k not in row]
        if extra:
            manifest = path.parent / "manifest.json"
            config = json.loads(manifest.read_text()).get("config", {}) if manifest.is_file() else {}
            row.update({k: _config_value(config, k) for k in extra})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no metrics.json of a finished run under {root}")
    df = pd.DataFrame(rows)
    unknown = [k for k in keys if df[k].isna().all()]
    if unknown:
        raise ValueError(f"no run under {root} records {unknown} (in metrics.json or its manifest.json config): "
                         "group by a dotted config key such as features.num_snapshots")
    return df.sort_values([*[k for k in keys if k not in ("method", "seed")], "method", "seed"]).reset_index(drop=True)


def _markdown(df: pd.DataFrame, *, index: bool) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    if index:
        df = df.reset_index()
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def summary_markdown(df: pd.DataFrame, *, by: tuple[str, ...] = ("method",)) -> str:
    """Mean +- std per group (``by``: method, or e.g. (noise.rate, method)) and one row per run.

    The boundary AUC column appears when ``df`` has ``boundary_auc`` (``jobs.compare`` rows).
    """
    by = list(by)
    cols = by + [c for c in COLUMNS if c not in by]
    if "boundary_auc" in df:
        cols.insert(cols.index("weight_auc") + 1, "boundary_auc")
    per_seed = _markdown(df[cols], index=False)
    g = df.groupby(by, dropna=False)  # a run without the key (an older manifest) is its own group, not dropped
    # +- the population standard deviation over seeds (ddof=0), as every table in docs/results.md
    pm = lambda fmt: (lambda s: f"{s.mean():{fmt}} +- {s.std(ddof=0):{fmt}}")  # noqa: E731
    agg = {"seeds": g["seed"].count(),
           "test acc @ best val (%)": g["test_acc_at_best_val"].agg(pm(".2f")),
           "weight AUC": g["weight_auc"].agg(pm(".3f"))}
    if "boundary_auc" in df:
        agg["boundary AUC"] = g["boundary_auc"].agg(pm(".3f"))
    agg["wall time (s)"] = g["total_s"].agg(lambda s: f"{s.mean():.0f}")
    return _markdown(pd.DataFrame(agg), index=True) + "\n\n" + per_seed + "\n"
