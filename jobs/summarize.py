"""Summarise finished runs: ``python -m jobs.summarize outputs/toy_fig1``.

Prints a markdown table (mean +- std per method, or per ``--by`` group, then one row per run) from
every ``metrics.json`` under the given directory, e.g.
``python -m jobs.summarize outputs/compare/mnist_noise_rates/runs --by noise.rate method`` or
``python -m jobs.summarize docs/results/mnist_snapshots --by features.num_snapshots method`` (any
dotted config key, read from each run's ``manifest.json``).
"""

from __future__ import annotations

import argparse
import sys

from pivotal_ray.report import collect, summary_markdown


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.summarize", description=__doc__.splitlines()[0])
    p.add_argument("root", help="directory searched recursively for metrics.json of finished runs")
    p.add_argument("--by", nargs="+", default=["method"],
                   help="columns to group the mean +- std by: method, seed or any dotted config key "
                        "(noise.rate, features.num_snapshots, ...); default: method")
    args = p.parse_args(argv)
    try:
        df = collect(args.root, keys=tuple(args.by))
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    print(summary_markdown(df, by=tuple(args.by)))
    keys = list(dict.fromkeys([*args.by, "seed"]))
    repeated = df[df.duplicated(keys, keep=False)]
    if len(repeated):  # a mean over two runs of one seed counts one run twice, or mixes configs
        groups = repeated.groupby(keys, sort=True)["path"].apply(list)
        prints = {p: _fingerprint(p) for p in repeated["path"]}
        same = {key: paths for key, paths in groups.items()
                if len({prints[p] for p in paths}) == 1 and prints[paths[0]] is not None}
        differ = {key: paths for key, paths in groups.items() if key not in same}
        if same:
            print(f"warning: {sum(map(len, same.values()))} runs are copies of {len(same)} run(s), the same config "
                  f"and seed ({_shown(same)}), e.g. a jobs.select run and its jobs.compare twin: the mean counts each "
                  "copy; summarize a narrower folder", file=sys.stderr)
        if differ:
            print(f"warning: {sum(map(len, differ.values()))} runs share a group and a seed, so they differ in a "
                  f"setting not in --by ({_shown(differ)}): add that setting to --by (a dotted config key, e.g. "
                  "features.num_snapshots) or summarize a narrower folder", file=sys.stderr)


def _shown(groups: dict) -> str:
    shown = "; ".join(f"{key}: {', '.join(paths)}" for key, paths in list(groups.items())[:3])
    return shown + (f"; and {len(groups) - 3} more" if len(groups) > 3 else "")


def _fingerprint(run_dir: str) -> str | None:
    """The run's identity (its recorded config without where it ran: output_dir, name, ...), None
    without a readable manifest."""
    import json
    from pathlib import Path

    from pivotal_ray.core.artifacts import config_fingerprint

    try:
        return config_fingerprint(json.loads((Path(run_dir) / "manifest.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    main(sys.argv[1:])
