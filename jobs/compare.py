"""Compare methods x seeds on one experiment (sharing warm-ups), then tabulate and plot.

Local (one Ray session for every run; finished runs are read, not rerun)::

    python -m jobs.compare experiment=toy_fig1 'compare.methods=[random,rbc,gbc]' \
        'compare.seeds=[0,1,2]' compare.output_root=$PWD/outputs/compare/toy_fig1
    python -m jobs.compare experiment=mnist_noise_rates compare.output_root=$PWD/outputs/compare/fig3

Experiment configs set their own ``compare.methods``/``seeds`` (and ``vary_key``/``vary_values``
for sweeps such as the noise rate); overrides on the command line win. Prints one line per run
and writes, under ``compare.output_root``: ``results.json``, ``results.csv``, ``results.md``
(mean +- std per method), the PNG figures, ``runs/<variant>/<method>/seed<s>/`` (each run's
artefacts) and ``ray_train/`` (the shared Ray Train storage).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jobs.select import CONFIGS, exit_status, resolve_config
from pivotal_ray.config import CompareConfig, _build


def compare_config(cfg: DictConfig) -> CompareConfig:
    values = OmegaConf.to_container(cfg.compare, resolve=True)
    if isinstance(values.get("output_root"), str):  # a quoted ~ reaches us as it is
        values["output_root"] = os.path.expanduser(values["output_root"])
    return _build(CompareConfig, values, "compare")


@hydra.main(config_path=CONFIGS, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from pivotal_ray.compare import margins_on_ray, run_compare
    from pivotal_ray.pipeline import _check_cluster, connect

    with exit_status():
        cc = compare_config(cfg)
        base = resolve_config(cfg)
        # Ray once every run is valid; then every run that will train is checked against the cluster
        # (its memory shared by the compare.concurrency runs at once)
        # every run's output_dir takes a table the extraction actors write (the boundary AUC's margins)
        df = run_compare(base=base, cc=cc, before_runs=lambda: connect(base),
                         check=partial(_check_cluster, extracts=True), margins=margins_on_ray)
    print((Path(cc.output_root).resolve() / "results.md").read_text())
    print(f"{len(df)} runs; outputs: {cc.output_root}")


if __name__ == "__main__":
    main()
