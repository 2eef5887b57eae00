"""Collect ``metrics.json`` files of finished runs into one table (method x seed) and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["method", "seed", "test_acc_at_best_val", "final_test_acc", "weight_auc", "best_epoch", "total_s"]


def collect(root: str | Path) -> pd.DataFrame:
    """One row per ``<root>/**/metrics.json``: method, seed, accuracies (%), weight AUC, wall time."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        if "method" not in m:
            continue
        rows.append({"method": m["method"], "seed": m["seed"],
                     "test_acc_at_best_val": 100 * m["test_acc_at_best_val"],
                     "final_test_acc": 100 * m["final_test_acc"], "weight_auc": m["weight_auc"],
                     "best_epoch": m["best_epoch"], "total_s": m["timings"]["total_s"], "path": str(path.parent)})
    if not rows:
        raise FileNotFoundError(f"no metrics.json of a finished run under {root}")
    return pd.DataFrame(rows).sort_values(["method", "seed"]).reset_index(drop=True)


def _markdown(df: pd.DataFrame, *, index: bool) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    if index:
        df = df.reset_index()
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def summary_markdown(df: pd.DataFrame) -> str:
    """Per-seed rows and mean +- std per method, as markdown tables."""
    per_seed = _markdown(df[COLUMNS], index=False)
    g = df.groupby("method")
    agg = pd.DataFrame({
        "seeds": g["seed"].count(),
        "test acc @ best val (%)": g["test_acc_at_best_val"].agg(lambda s: f"{s.mean():.2f} +- {s.std(ddof=0):.2f}"),
        "weight AUC": g["weight_auc"].agg(lambda s: f"{s.mean():.3f} +- {s.std(ddof=0):.3f}"),
        "wall time (s)": g["total_s"].agg(lambda s: f"{s.mean():.0f}"),
    })
    return _markdown(agg, index=True) + "\n\n" + per_seed + "\n"
