"""Helpers for the end-to-end tier: compose the Hydra config exactly as ``python -m jobs.select`` does."""

from __future__ import annotations

# Tiny toy settings: a few epochs, two snapshots, 2 warm-up + 4 picked meta samples.
TINY = (
    "reweight.epochs=6",
    "features.num_snapshots=2",
    "features.stride=2",
    "selection.budget=6",
    "selection.warmup=2",
)


def compose_config(*overrides: str):
    """Hydra overrides -> the composed DictConfig (the same config files and defaults as the CLI)."""
    from hydra import compose, initialize_config_dir

    from jobs.select import CONFIGS

    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("config", overrides=list(overrides))


def resolve(*overrides: str):
    """Hydra overrides -> the validated ExperimentConfig that ``run_experiment`` gets."""
    from jobs.select import resolve_config

    return resolve_config(compose_config(*overrides))
