"""Summarise finished runs: ``python -m jobs.summarize outputs/toy_fig1``.

Prints a markdown table (mean +- std per method, or per ``--by`` group, then one row per run) from
every ``metrics.json`` under the given directory, e.g.
``python -m jobs.summarize outputs/compare/mnist_noise_rates/runs --by noise.rate method``.
"""

from __future__ import annotations

import argparse
import sys

from pivotal_ray.report import collect, summary_markdown


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.summarize", description=__doc__.splitlines()[0])
    p.add_argument("root", help="directory searched recursively for metrics.json of finished runs")
    p.add_argument("--by", nargs="+", default=["method"], choices=["method", "noise.kind", "noise.rate"],
                   help="columns to group the mean +- std by (default: method)")
    args = p.parse_args(argv)
    print(summary_markdown(collect(args.root), by=tuple(args.by)))


if __name__ == "__main__":
    main(sys.argv[1:])
