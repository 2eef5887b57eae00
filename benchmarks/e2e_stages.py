"""Benchmark 7: end-to-end protocol wall time per stage, read from finished runs (issue 4, item 7).

No new run: every ``metrics.json`` of a finished run under the given roots (written by
:func:`pivotal_ray.pipeline.run_experiment`) gives one row: warm-up training, and summed over the
selection rounds feature extraction, K-means, the rest of the selection (``select_s`` minus the
two), re-training; then the total, and what the run takes on its own (with the shared warm-up
another method trained, see :func:`collect`). Target (issue 4, MNIST, budget 20): <= 20 minutes
per method on its own on a 2-core CPU machine.

    python -m benchmarks.e2e_stages --root outputs/mnist_adv60 --out benchmarks/results/e2e_stages.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pivotal_ray.report import superseded

from . import _common

TARGET_S = 20 * 60
STAGES = ("first_train_s", "features_s", "kmeans_s", "select_other_s", "train_s", "total_s", "shared_warmup_s",
          "alone_s")


def stage_row(m: dict[str, Any]) -> dict[str, Any]:
    """Per-stage seconds of one run's metrics.json content. ``first_train_s`` is the first
    training run (the warm-up, or base's only run) as this run's invocation timed it: near 0 when
    it read back a warm-up another method had trained (see :func:`collect`)."""
    rounds = m.get("rounds", [])
    feat = sum(float(r.get("features_s", 0.0)) for r in rounds)
    km = sum(float(r.get("kmeans_s", 0.0)) for r in rounds)
    sel = sum(float(r.get("select_s", 0.0)) for r in rounds)
    t = m["timings"]
    return {"method": m["method"], "seed": m.get("seed"), "dataset": m.get("dataset"), "budget": m.get("budget"),
            "noise": json.dumps(m.get("noise")), "warmup": m.get("warmup"),
            "warmup_epochs_s": t.get("warmup_epochs_s"),  # recorded since 807b261, whoever trained it
            "first_stage": "warmup" if "warmup_train_s" in t else "base" if "base_train_s" in t else None,
            "first_train_s": float(t.get("warmup_train_s", t.get("base_train_s", 0.0))), "features_s": feat,
            "kmeans_s": km, "select_other_s": max(sel - feat - km, 0.0),
            "train_s": sum(float(r.get("train_s", 0.0)) for r in rounds),
            "total_s": float(t["total_s"]), "rounds": len(rounds)}


def collect(roots: list[str]) -> list[dict[str, Any]]:
    """One row per finished run under ``roots``. A warm-up is shared: trained by the first run
    that needs it, read back by the others (``first_train_s`` about 0). ``shared_warmup_s`` adds
    its training time to a run that read it back: the run's own ``warmup_epochs_s`` (the epochs'
    seconds from the warm-up's history, in metrics.json since 807b261), or for older metrics the
    longest ``first_train_s`` among the runs of the same root, data set, noise, seed, budget and
    warm-up size. ``alone_s`` = ``total_s`` + that is what the run would take on its own, which
    the target is checked against."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            try:
                m = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if "method" not in m or "timings" not in m or superseded(path.parent):  # snapshots, unfinished runs
                continue
            rows.append({**stage_row(m), "path": str(path), "root": root})

    def key(r: dict[str, Any]) -> tuple:
        return r["root"], r["dataset"], r["noise"], r["seed"], r["budget"], r["warmup"]

    trained: dict[tuple, float] = {}
    for r in rows:
        if r["first_stage"] == "warmup":
            trained[key(r)] = max(trained.get(key(r), 0.0), r["first_train_s"])
    for r in rows:
        full = r["warmup_epochs_s"] if r["warmup_epochs_s"] is not None else trained.get(key(r), 0.0)
        reused = r["first_stage"] == "warmup" and r["first_train_s"] < 0.5 * full
        r["shared_warmup_s"] = full if reused else 0.0
        r["alone_s"] = r["total_s"] + r["shared_warmup_s"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["method", "seed", *STAGES, "<= 20 min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["method"]), str(r["seed"]), *(f"{r[s]:.0f}" for s in STAGES),
                                        "pass" if r["alone_s"] <= TARGET_S else "miss"]) + " |")
    return "\n".join(lines)


def run(args) -> dict[str, Any]:
    if args.device != "cpu":
        raise SystemExit("e2e_stages reads finished runs' metrics.json and computes nothing: --device cuda "
                         "would label the same figures cuda; leave it out (the runs' manifests name their devices)")
    device = _common.setup(args)
    rows = collect(args.root)
    if not rows:
        print(f"no metrics.json of a finished run under {args.root}: nothing to tabulate")
    else:
        print(markdown(rows))
    return _common.write_result(args, "e2e_stages", device, {"rows": rows, "target_total_s": TARGET_S},
                                roots=list(args.root))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--root", nargs="+", default=["outputs/mnist_adv60"],
                   help="directories searched recursively for metrics.json of finished runs")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
