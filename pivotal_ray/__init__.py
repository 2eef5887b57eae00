"""pivotal_ray: select pivotal meta samples for meta re-weighting, on Ray.

Public API::

    from pivotal_ray import ExperimentConfig, from_dict, run_experiment
    metrics = run_experiment(from_dict({"seed": 0, "output_dir": "/abs/out"}))

Building blocks (Ray-free): :func:`build_data`, :func:`build_model`, :func:`build_reweighter`,
:func:`rbc_factors`, :func:`select_pivotal`, :func:`weight_auc`; Ray stages:
:func:`run_training`, :func:`extract_features`, :func:`select_pivotal_distributed`.
Imports are lazy so that ``import pivotal_ray`` stays cheap and Ray-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ConfigError, ExperimentConfig, from_dict, to_dict

_LAZY = {
    "run_experiment": "pivotal_ray.pipeline",
    "SELECTORS": "pivotal_ray.selectors",
    "build_data": "pivotal_ray.core.data",
    "build_model": "pivotal_ray.core.models",
    "build_reweighter": "pivotal_ray.core.reweight",
    "REWEIGHTERS": "pivotal_ray.core.reweight",
    "rbc_factors": "pivotal_ray.core.features",
    "select_pivotal": "pivotal_ray.core.kmeans",
    "weighted_kmeans": "pivotal_ray.core.kmeans",
    "weight_auc": "pivotal_ray.core.metrics",
    "run_training": "pivotal_ray.distributed.train",
    "extract_features": "pivotal_ray.distributed.extract",
    "select_pivotal_distributed": "pivotal_ray.distributed.kmeans",
}

__all__ = ["ConfigError", "ExperimentConfig", "from_dict", "to_dict", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pivotal_ray' has no attribute {name!r}")
