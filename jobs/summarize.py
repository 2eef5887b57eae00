"""Summarise finished runs: ``python -m jobs.summarize outputs/toy_fig1``.

Prints a markdown table (mean +- std per method, then one row per run) from every
``metrics.json`` under the given directory.
"""

from __future__ import annotations

import sys

from pivotal_ray.report import collect, summary_markdown


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m jobs.summarize OUTPUT_ROOT")
    print(summary_markdown(collect(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
