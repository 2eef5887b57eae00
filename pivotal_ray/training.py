"""How each method trains: the pipeline's per-method hook (spec sections 1 and 6).

Algorithm 2 (``pipeline.run_experiment``) asks a :class:`TrainingPlan` for its training runs and
never branches on the method's name. A method names its plan when it is registered in
``selectors.SELECTORS`` (``plan_of(selector)``; default ``"reweight"``):

- ``reweight`` -- the paper's methods: the shared warm-up (M0 random meta samples, meta
  re-weighting), then after every round meta re-weighting on the whole noisy set plus the meta set;
- ``plain`` -- ``base``: one run of plain training on the noisy set (mode ``none``, every weight
  1), no meta set and no rounds;
- ``finetune`` -- ``finetune``: the shared warm-up, random picks up to the full budget, then the
  best warm-up snapshot fine-tuned on the meta set ALONE (mode ``none``, ``finetune.*``) instead
  of re-weighting. Budget accounting is the same as ``random``'s: same M0, same picks per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .config import ExperimentConfig, to_dict, without_defaults
from .core import artifacts
from .core.registry import Registry


@dataclass
class TrainEnv:
    """What a plan needs: the config, the shared Ray Train storage, and the warm-up run once done."""

    cfg: ExperimentConfig
    storage: str
    warmup: Any = None  # TrainRun of the first run


class TrainingPlan(Protocol):
    first_stage: str  # names the first run's timing: "<first_stage>_train_s"

    def round_sizes(self, cfg: ExperimentConfig) -> list[int]: ...

    def warmup_ids(self, cfg: ExperimentConfig, bundle: Any) -> np.ndarray: ...

    def first(self, env: TrainEnv, *, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any: ...

    def after_round(self, env: TrainEnv, *, name: str, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any: ...


PLANS: Registry[type] = Registry("training plan")

# the ray.* settings that change a training run's floats (workers split BatchNorm batches, each
# runs floor(cpus_per_worker) threads, GPU kernels): part of the warm-up's and base's run names
# (through config.without_defaults: a name changes only where one is not at its default)
TRAINING_RESOURCES = ("num_workers", "cpus_per_worker", "use_gpu", "deterministic")


def train(cfg: ExperimentConfig, name: str, meta_ids: np.ndarray, meta_labels: np.ndarray, storage: str, *,
          reweight: dict | None = None, train_ids: np.ndarray | None = None, init_from: str | None = None,
          run_tag: str = "train") -> Any:
    """One Ray Train run (resumed when ``name`` exists under ``storage``); ``reweight`` replaces
    ``cfg.reweight`` for this run."""
    from .distributed.train import run_training

    c = to_dict(cfg)
    return run_training(name=name, storage_path=storage, data=c["data"], noise=c["noise"], model=c["model"],
                        reweight=reweight or c["reweight"], seed=cfg.seed, meta_ids=meta_ids,
                        meta_labels=meta_labels, num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                        cpus_per_worker=cfg.ray.cpus_per_worker, run_tag=run_tag, train_ids=train_ids,
                        init_from=init_from, max_failures=cfg.ray.max_failures,
                        deterministic=cfg.ray.deterministic)


def warmup_ids(cfg: ExperimentConfig, bundle: Any) -> np.ndarray:
    """M0 random meta samples (shared by every method with the same seed): uniform, or equally
    many per observed class with ``selection.balanced_warmup``."""
    from .core.seeding import derive_seed, numpy_rng

    if cfg.selection.balanced_warmup:
        from .core.baselines import balanced_random

        return balanced_random(bundle.train.sample_id, bundle.train.y_obs, k=cfg.selection.warmup,
                               num_classes=bundle.num_classes, seed=derive_seed(cfg.seed, "warmup", "balanced"))
    rng = numpy_rng(cfg.seed, "warmup")
    return np.sort(rng.choice(bundle.train.sample_id, size=cfg.selection.warmup, replace=False))


def warmup_name(cfg: ExperimentConfig) -> str:
    """Runs with the same data, noise, model, training, M0 and training resources share one
    warm-up run (named by the settings that differ from their defaults: see
    config.without_defaults). The resources count: workers split each batch (BatchNorm
    statistics) and each runs floor(cpus_per_worker) threads."""
    c = to_dict(cfg)
    from .core.data import noise_identity

    key = {k: c[k] for k in ("data", "model", "reweight", "seed")} | {"warmup": cfg.selection.warmup}
    key["noise"] = noise_identity(cfg.data, cfg.noise)  # cifar_n: its label set's digest, not its path
    key["ray"] = {k: c["ray"][k] for k in TRAINING_RESOURCES}
    if cfg.selection.balanced_warmup:  # only when set, so the names of uniform warm-ups never change
        key["balanced_warmup"] = True
    return f"warmup-{artifacts.config_fingerprint(without_defaults(key))[:12]}"


def plain_reweight(cfg: ExperimentConfig, **changes: Any) -> dict:
    """``cfg.reweight`` as plain training: mode ``none``, every weight 1, then ``changes``."""
    return {**to_dict(cfg)["reweight"], "mode": "none", "init_weight": 1.0, **changes}


@PLANS.register("reweight")
class MetaReweightPlan:
    """Warm-up, then meta re-weighting on the noisy set plus the meta set after every round."""

    first_stage = "warmup"

    def round_sizes(self, cfg: ExperimentConfig) -> list[int]:
        return cfg.selection.round_sizes

    def warmup_ids(self, cfg: ExperimentConfig, bundle: Any) -> np.ndarray:
        return warmup_ids(cfg, bundle)

    def first(self, env: TrainEnv, *, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any:
        from .core.labels import labels_suffix

        name = warmup_name(env.cfg) + labels_suffix(env.cfg.labels.source, meta_ids, meta_labels)
        return train(env.cfg, name, meta_ids, meta_labels, env.storage)

    def after_round(self, env: TrainEnv, *, name: str, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any:
        return train(env.cfg, name, meta_ids, meta_labels, env.storage)


@PLANS.register("plain")
class PlainPlan:
    """``base``: plain training on the noisy set; no meta samples, no rounds."""

    first_stage = "base"

    def round_sizes(self, cfg: ExperimentConfig) -> list[int]:
        return []

    def warmup_ids(self, cfg: ExperimentConfig, bundle: Any) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def first(self, env: TrainEnv, *, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any:
        cfg, rw = env.cfg, plain_reweight(env.cfg)
        c = to_dict(cfg)
        key = {k: c[k] for k in ("data", "noise", "model", "seed")} | {"reweight": rw}
        # as warmup_name, but only when not at their defaults: a default base run keeps its old name
        ray = without_defaults({"ray": {k: c["ray"][k] for k in TRAINING_RESOURCES}})["ray"]
        if ray:
            key["ray"] = ray
        name = f"base-{artifacts.config_fingerprint(without_defaults(key))[:12]}"
        return train(cfg, name, meta_ids, meta_labels, env.storage, reweight=rw)

    def after_round(self, env: TrainEnv, *, name: str, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any:
        raise RuntimeError("the plain plan (base) has no selection rounds")


def best_snapshot(run: Any) -> dict[str, Any]:
    """The snapshot of highest validation accuracy (earliest among ties) among those persisted."""
    return max(run.snapshots, key=lambda s: (s["val_acc"], -s["epoch"]))


@PLANS.register("finetune")
class FinetunePlan(MetaReweightPlan):
    """``finetune``: the warm-up as usual; after each round the best warm-up snapshot is fine-tuned
    on the current meta set alone (the last round's is reported)."""

    def after_round(self, env: TrainEnv, *, name: str, meta_ids: np.ndarray, meta_labels: np.ndarray) -> Any:
        cfg, ft = env.cfg, env.cfg.finetune
        rw = plain_reweight(cfg, epochs=ft.epochs, lr=ft.lr or cfg.reweight.lr,
                            batch_size=ft.batch_size or cfg.reweight.batch_size, lr_milestones=[],
                            snapshot_every=ft.epochs)  # one snapshot: best-val comes from the history
        return train(cfg, name, meta_ids, meta_labels, env.storage, reweight=rw, train_ids=meta_ids,
                     init_from=best_snapshot(env.warmup)["path"], run_tag="finetune")
