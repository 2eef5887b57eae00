"""Stage configs: one dataclass per stage, each mirrored by a Hydra group under ``configs/``.

Every config validates itself at construction (``__post_init__``) and raises a
:class:`ConfigError` whose message says how to fix the value, so bad input fails before any
work starts. Configs cross into Ray as plain dicts (:func:`to_dict`), never as DictConfig.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: str, allowed: Any) -> None:
    allowed = sorted(allowed)
    _check(value in allowed, f"unknown {name} {value!r}: choose one of {allowed}")


DATASETS = ("toy", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
NOISE_KINDS = ("none", "uniform", "uniform_mix", "adversarial", "cifar_n")
PROJECTION_KINDS = ("countsketch", "gaussian")  # the names registered in core.gbc.PROJECTIONS


@dataclass
class DataConfig:
    """Which data set, where it lives, and the paper's split (section 5 of the spec)."""

    name: str = "toy"
    root: str | None = None  # torchvision root (MNIST/, FashionMNIST/, cifar-10-batches-py/) or ImageFolder root
    download: bool = False
    val_frac: float = 0.1  # validation = this fraction of the official test set; test = the rest
    # toy set of the paper's Figure 1
    toy_n: int = 1000
    toy_split: tuple[int, int, int] = (600, 240, 160)  # train, test, val
    toy_std: float = 0.4
    toy_base_flip: float = 0.01
    # ImageFolder (ImageNet-10 style): <root>/train/<class>/*, <root>/val/<class>/*
    image_size: int = 224
    loader_workers: int = 0

    def __post_init__(self) -> None:
        self.toy_split = tuple(int(v) for v in self.toy_split)  # Hydra hands lists
        _one_of("dataset", self.name, DATASETS)
        _check(0.0 < self.val_frac < 1.0, f"data.val_frac={self.val_frac} must be in (0, 1), e.g. 0.1")
        _check(self.image_size >= 8, f"data.image_size={self.image_size} must be >= 8 (ImageNet-10: 224)")
        _check(self.loader_workers >= 0, f"data.loader_workers={self.loader_workers} must be >= 0 (0: no workers)")
        _check(self.toy_std > 0 and 0.0 <= self.toy_base_flip < 1.0,
               f"data.toy_std={self.toy_std} must be > 0 and data.toy_base_flip={self.toy_base_flip} in [0, 1)")
        if self.name == "toy":
            _check(len(self.toy_split) == 3 and sum(self.toy_split) == self.toy_n and min(self.toy_split) >= 1,
                   f"data.toy_split={list(self.toy_split)} must be three sizes (train, test, val), each at "
                   f"least 1, summing to data.toy_n={self.toy_n}")
        elif self.root is None:
            raise ConfigError(f"data.root is required for dataset {self.name!r}: "
                              "set data.root=/abs/path (e.g. ../shared/data for MNIST)")


@dataclass
class NoiseConfig:
    """Label noise and class imbalance applied to the training split (spec section 5)."""

    kind: str = "uniform"
    rate: float = 0.6  # not used by cifar_n, whose labels are the noise
    imbalance_factor: float = 1.0  # 1 = balanced; 200 = the paper's imbalance setting
    # cifar_n (real human label noise, CIFAR-10N / CIFAR-100N): the release's .pt file (default
    # <data.root>/CIFAR-N/CIFAR-10_human.pt or CIFAR-100_human.pt) and which of its label sets
    # (CIFAR-10N: aggre_label, worse_label, random_label1-3; CIFAR-100N: noisy_label, the default)
    file: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        _one_of("noise kind", self.kind, NOISE_KINDS)
        _check(0.0 <= self.rate < 1.0, f"noise.rate={self.rate} must be in [0, 1)")
        _check(self.imbalance_factor >= 1.0,
               f"noise.imbalance_factor={self.imbalance_factor} must be >= 1 (1 = balanced)")
        if self.kind != "cifar_n":
            unused = [k for k in ("file", "label") if getattr(self, k) is not None]
            _check(not unused, f"noise.{' and noise.'.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} to "
                               f"noise.kind=cifar_n (noise=cifar_n), not {self.kind}: set "
                               f"{' '.join('noise.' + k + '=null' for k in unused)}, or choose noise=cifar_n")
        _check(self.file is None or "://" not in self.file,
               f"noise.file={self.file!r} is a URI: put the CIFAR-N file on every node and give its path")


@dataclass
class ModelConfig:
    name: str = "mlp"  # see pivotal_ray.core.models.MODELS
    hidden: int = 32  # MLP width
    depth: int = 2  # MLP hidden layers
    pretrained: bool = False  # torchvision ResNets only (needs a network for the weights)

    def __post_init__(self) -> None:
        _check(self.hidden > 0 and self.depth > 0, "model.hidden and model.depth must be positive")


@dataclass
class ReweightConfig:
    """Meta re-weighting training (spec section 2)."""

    mode: str = "direct"
    epochs: int = 60
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    meta_lr: float = 100.0  # eta in w <- clip(w - eta * dL/dw, 0, 1)
    meta_batch_size: int = 100  # at most this many meta samples per step (all when fewer)
    # meta loss = mean over the meta batch's classes of each class's mean loss (spec: the plain mean)
    meta_class_balanced: bool = False
    init_weight: float = 1.0
    snapshot_every: int = 1
    augment: bool = False
    # samples per forward pass when a worker scores its share of the validation and test splits
    # after each epoch (no gradients): its memory grows with it (ResNet-34 at 224 x 224: about
    # 6.7 MB per sample on a CPU, so ~14 GB at 2048); part of a run's identity, as another batch
    # may round the logits differently
    eval_batch_size: int = 2048

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"reweight.epochs={self.epochs} must be > 0")
        _check(self.batch_size > 0, f"reweight.batch_size={self.batch_size} must be > 0")
        _check(self.lr > 0, f"reweight.lr={self.lr} must be > 0")
        _check(self.meta_lr >= 0, f"reweight.meta_lr={self.meta_lr} must be >= 0")
        _check(self.meta_batch_size >= 1, f"reweight.meta_batch_size={self.meta_batch_size} must be >= 1")
        _check(self.momentum >= 0 and self.weight_decay >= 0 and self.lr_gamma > 0,
               f"reweight.momentum={self.momentum} and reweight.weight_decay={self.weight_decay} must be >= 0 "
               f"and reweight.lr_gamma={self.lr_gamma} > 0")
        _check(0.0 <= self.init_weight <= 1.0, f"reweight.init_weight={self.init_weight} must be in [0, 1]")
        _check(self.snapshot_every >= 1, f"reweight.snapshot_every={self.snapshot_every} must be >= 1")
        _check(self.eval_batch_size >= 1, f"reweight.eval_batch_size={self.eval_batch_size} must be >= 1")
        self.lr_milestones = [int(m) for m in self.lr_milestones]
        _check(all(m >= 1 for m in self.lr_milestones),
               f"reweight.lr_milestones={self.lr_milestones}: a milestone is the number of epochs after which "
               "the lr is multiplied by reweight.lr_gamma, so it must be >= 1 (0 would cut it before the first "
               "epoch: lower reweight.lr instead; a negative one never applies)")


@dataclass
class FeatureConfig:
    """Per-sample features for clustering (spec section 3)."""

    kind: str = "rbc"  # see pivotal_ray.core.features.EXTRACTORS
    label_aware: bool = False  # A = p - onehot(y) (imbalance) instead of A = p (noisy labels)
    num_snapshots: int = 5  # K
    stride: int = 20  # epochs between chosen snapshots after the best-validation epoch
    batch_size: int = 1024
    # GBC
    num_layers: int = 5  # R
    proj_dim: int = 4096
    projection: str = "countsketch"  # random projection of blocks longer than proj_dim (core.gbc.PROJECTIONS)

    def __post_init__(self) -> None:
        _one_of("features.projection", self.projection, PROJECTION_KINDS)
        _check(self.num_snapshots >= 1, f"features.num_snapshots={self.num_snapshots} must be >= 1")
        _check(self.stride >= 1, f"features.stride={self.stride} must be >= 1")
        _check(self.batch_size > 0, "features.batch_size must be > 0")
        _check(self.num_layers >= 1, f"features.num_layers={self.num_layers} must be >= 1 (R tensors per snapshot)")
        _check(self.proj_dim >= 1, f"features.proj_dim={self.proj_dim} must be >= 1 (e.g. 256)")


SIMILARITIES = ("auto", "abs", "signed")


def kmeans_signed(selection: Mapping[str, Any], reweight_mode: str) -> bool:
    """Whether weighted K-means drops the absolute value (``selection.similarity``; "auto": under
    l2rw, the paper's supplement eqs. S13-S14). ``selection`` is a plain dict (or the dataclass)."""
    sim = selection["similarity"] if isinstance(selection, Mapping) else selection.similarity
    return sim == "signed" or (sim == "auto" and reweight_mode == "l2rw")


@dataclass
class SelectionConfig:
    """Algorithm 2: budget, warm-up and the clustering (spec sections 1 and 4)."""

    method: str = "rbc"  # see pivotal_ray.selection.SELECTORS
    budget: int = 6  # total meta samples, warm-up included
    warmup: int = 2  # M0, drawn at random
    per_round: int | None = None  # picks per round; default: budget - warmup in one round
    exclude_frac: float = 0.5
    kmeans_init: str = "kmeans++"
    kmeans_max_iter: int = 200
    kmeans_tol: float = 1e-6
    # weighted K-means update: members enter S2 as sign(<G_j, C_i>) G_j (false: S2 literally; the
    # two agree on non-negative features such as label-free RBC), see core.kmeans
    kmeans_sign_align: bool = True
    # the similarity of weighted K-means, exclusion and picks: "abs" |<G_j, C_i>| (eq. 9, for the
    # direct and mwnet modes), "signed" <G_j, C_i> (eqs. S13-S14: the paper drops the absolute
    # value under l2rw, whose weights max(-dL/dw, 0) only rise for a positive inner product);
    # "auto": signed when reweight.mode is l2rw, else abs (see kmeans_signed)
    similarity: str = "auto"
    balanced_warmup: bool = False  # M0 drawn equally per OBSERVED class (as random_balanced) instead of uniformly

    def __post_init__(self) -> None:
        _check(self.warmup >= 1, f"selection.warmup={self.warmup} must be >= 1 (M0 random meta samples)")
        _check(self.budget > self.warmup,
               f"selection.budget={self.budget} must be larger than selection.warmup={self.warmup}: "
               "raise the budget or lower the warm-up")
        if self.per_round is not None:
            _check(self.per_round >= 1, f"selection.per_round={self.per_round} must be >= 1")
        _check(0.0 <= self.exclude_frac < 1.0, f"selection.exclude_frac={self.exclude_frac} must be in [0, 1)")
        _one_of("kmeans init", self.kmeans_init, ("kmeans++", "random"))
        _one_of("selection.similarity", self.similarity, SIMILARITIES)
        _check(self.kmeans_max_iter >= 1, "selection.kmeans_max_iter must be >= 1")
        _check(self.kmeans_tol >= 0, f"selection.kmeans_tol={self.kmeans_tol} must be >= 0 (e.g. 1e-6)")

    @property
    def round_sizes(self) -> list[int]:
        step = self.per_round or (self.budget - self.warmup)
        left, sizes = self.budget - self.warmup, []
        while left > 0:
            sizes.append(min(step, left))
            left -= sizes[-1]
        return sizes


@dataclass
class FinetuneConfig:
    """The ``finetune`` baseline (spec section 6): fine-tune the best warm-up snapshot on the meta
    set alone (plain SGD, every weight 1) instead of re-weighting."""

    epochs: int = 30
    lr: float | None = None  # None: reweight.lr
    batch_size: int | None = None  # None: reweight.batch_size (the whole meta set when it is smaller)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"finetune.epochs={self.epochs} must be >= 1")
        _check(self.lr is None or self.lr > 0, f"finetune.lr={self.lr} must be > 0 (or null: reweight.lr)")
        _check(self.batch_size is None or self.batch_size >= 1,
               f"finetune.batch_size={self.batch_size} must be >= 1 (or null: reweight.batch_size)")


LABEL_SOURCES = ("oracle", "file")


@dataclass
class LabelsConfig:
    """Who cleans the meta samples' labels (spec section 5; core.labels).

    ``oracle``: the data's true labels (experiments, where the noise is injected). ``file``: a
    person. The job writes the samples it needs labelled to ``<output_dir>/to_label_round<r>.csv``
    and stops; the person adds ``sample_id,label`` rows to ``labels.file`` (default
    ``<output_dir>/labels.csv``) and runs the same command again, which goes on from there.
    """

    source: str = "oracle"
    file: str | None = None  # absolute path of the labels CSV; None: <output_dir>/labels.csv

    def __post_init__(self) -> None:
        _one_of("labels.source", self.source, LABEL_SOURCES)
        _check(self.file is None or "://" not in self.file,
               f"labels.file={self.file!r} must be a local or mounted path, not a storage URI: the driver reads "
               "it and the person writes it (copy it to a volume the driver sees)")
        _check(self.file is None or self.file.startswith("/"),
               f"labels.file={self.file!r} must be an absolute path (Ray jobs run from a temporary copy of "
               "the working dir)")


def ray_client_error(address: str, where: str) -> str | None:
    """The refusal of a Ray Client address (``ray://``) given as ``where``; None for any other.
    Checked when a job starts (``pipeline.validate``), not at construction: a manifest that recorded
    such an address must still read back (the run resumed with another address)."""
    if not address.startswith("ray://"):
        return None
    return (f"{where}={address} is a Ray Client address, which pivotal_ray cannot run under: Ray Data's streaming "
            "executor (feature extraction) needs a driver inside the cluster (Ray 2.60), and the artefacts, feature "
            "tables and checkpoints must be on storage the cluster's nodes see, not on this machine. Submit the "
            "job instead (ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.select ..., "
            "README), or run it on the head node with ray.address=auto")


@dataclass
class RayConfig:
    """Where and with what resources each stage runs."""

    address: str | None = None  # None: RAY_ADDRESS, else a live `ray start` cluster on this machine, else a new local Ray
    num_cpus: int | None = None  # local Ray only
    object_store_memory: int | None = None  # local Ray only, bytes
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    extract_actors: int = 1
    extract_cpus: float = 0.5  # fractional so upstream Ray Data tasks keep a CPU
    extract_gpus: float = 0.0
    kmeans_shards: int = 2
    kmeans_shard_cpus: float = 0.25
    storage_path: str | None = None  # Ray Train storage; default <output_dir>/ray_train
    log_to_driver: bool = False  # true: actors' stdout (per-epoch progress, Ray Train chatter) in the driver / `ray job logs`
    # true on a cluster that adds nodes on demand (cluster/cluster.yaml, cluster/rayjob.yaml):
    # the pre-flight checks of CPUs, GPUs and memory against what the cluster has *now* are
    # skipped (it may start with a CPU-less head and no workers); Ray waits for the autoscaler
    autoscaling: bool = False
    # restarts of a training run within the job after a worker fails (a lost node, or an error in
    # the training code: Ray Train's FailureConfig.max_failures; -1: no limit), each from its last
    # checkpoint; 0: the job ends and the same command resumes it
    max_failures: int = 0
    # restarts of each feature-extraction actor whose process died (its batch retried); then the
    # job ends with exit status 3 and the same command goes on; -1: no limit (Ray Data's default),
    # with which an actor killed every time (say, for memory) never ends the job
    extract_max_restarts: int = 3
    # true: the Train workers and extraction actors pick deterministic GPU kernels where PyTorch has
    # them (core.seeding.deterministic_kernels: no cuDNN autotuning, no TF32, a fixed cuBLAS
    # workspace; an op without one warns once per process and runs as before), so a rerun on the
    # same GPUs can repeat its floats; slower. CPUs compute the same either way, but the setting
    # names the warm-up and training runs as any float-changing one does (training.TRAINING_RESOURCES),
    # so runs with and without it are trained apart. Untested on GPUs
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"ray.num_workers={self.num_workers} must be >= 1")
        _check(self.max_failures >= -1, f"ray.max_failures={self.max_failures} must be >= 0, or -1 (no limit)")
        _check(self.extract_max_restarts >= -1,
               f"ray.extract_max_restarts={self.extract_max_restarts} must be >= 0, or -1 (no limit)")
        _check(self.extract_actors >= 1, "ray.extract_actors must be >= 1")
        _check(self.kmeans_shards >= 1, "ray.kmeans_shards must be >= 1")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker must be > 0")
        _check(self.extract_cpus > 0, f"ray.extract_cpus={self.extract_cpus} must be > 0 (e.g. 0.5)")
        _check(0 <= self.extract_gpus <= 1, f"ray.extract_gpus={self.extract_gpus} must be in [0, 1]: an extraction "
               "actor uses one device (more actors use more GPUs: ray.extract_actors; 0.5 shares a GPU by two)")
        _check(self.kmeans_shard_cpus > 0, f"ray.kmeans_shard_cpus={self.kmeans_shard_cpus} must be > 0 (e.g. 0.25)")
        _check(self.storage_path is None or "://" in self.storage_path or self.storage_path.startswith("/"),
               f"ray.storage_path={self.storage_path!r} must be an absolute path or a URI (s3://...): "
               "Ray jobs run from a temporary copy of the working dir")


@dataclass
class ExperimentConfig:
    seed: int = 0
    output_dir: str = "outputs/toy"
    name: str = "toy"
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed={self.seed} must be a non-negative int")

    @property
    def labels_file(self) -> str:
        """Where a person's labels are read from (``labels.source=file``)."""
        return self.labels.file or os.path.join(self.output_dir, "labels.csv")


_SECTIONS = {
    "data": DataConfig,
    "noise": NoiseConfig,
    "model": ModelConfig,
    "reweight": ReweightConfig,
    "features": FeatureConfig,
    "selection": SelectionConfig,
    "finetune": FinetuneConfig,
    "labels": LabelsConfig,
    "ray": RayConfig,
}


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_SCALAR_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _checked_value(name: str, annotation: Any, value: Any) -> Any:
    """``value`` for a scalar field (``int``, ``float``, ``bool``, ``str``, each optionally
    ``| None``), or ConfigError when it is not of that type; other annotations are left to
    __post_init__. A bool is not a number here. An int is a float and is kept as given (run names
    hash it); a whole float for an int field (``2e9`` bytes) becomes that int; a number for a str
    field (Hydra reads ``name=2024`` as an int) becomes its text."""
    text = str(annotation).replace(" ", "")
    if text.startswith("list[") and text.endswith("]"):  # list[int], list[str]: a list of those
        _check(isinstance(value, (list, tuple)),
               f"{name}={value!r} must be a list, e.g. '{name}=[{'' if value is None else value}]'")
        inner = text[len("list["):-1]
        if inner in _SCALARS:
            return [_checked_value(f"{name}[{i}]", inner, v) for i, v in enumerate(value)]
        return list(value)
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1 or kinds[0] not in _SCALARS:
        return value
    kind = kinds[0]
    if value is None:
        _check(optional, f"{name} must be set ({_SCALAR_NAMES[kind]}), not null")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "str" and number:
        return str(value)
    allowed = _SCALARS[kind]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    _check(ok, f"{name}={value!r} must be {_SCALAR_NAMES[kind]}")
    return value


def _build(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    _check(not unknown, f"unknown key(s) {unknown} in {where}: known keys are {sorted(fields)}")
    prefix = "" if cls is ExperimentConfig else f"{where}."
    values = {name: _checked_value(prefix + name, fields[name].type, value) for name, value in values.items()}
    return cls(**values)


def from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build a validated :class:`ExperimentConfig` from a plain (resolved) mapping."""
    values = dict(values)
    sections = {k: _build(cls, values.pop(k, None), k) for k, cls in _SECTIONS.items()}
    return _build(ExperimentConfig, {**values, **sections}, "the top-level config")


def _section_defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def without_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (plain, as from :func:`to_dict`) less every section setting at its dataclass
    default. Run names hash this, so a setting added in a later version, at its default, leaves
    the names of earlier runs (and their reuse) unchanged."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        cls = _SECTIONS.get(key)
        if cls is not None and isinstance(value, Mapping):
            defaults = _section_defaults(cls)
            value = {k: v for k, v in value.items() if not (k in defaults and v == defaults[k])}
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict (what crosses into Ray and into manifest.json)."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return fix(out)


@dataclass
class CompareConfig:
    """``jobs.compare``: one experiment for methods x seeds (x the values of one varied key).

    ``vary_key`` is a dotted config key (``noise.rate``, ``features.num_snapshots``) and
    ``vary_values`` its values; every (value, method, seed) is one run of Algorithm 2.
    """

    methods: list[str] = field(default_factory=lambda: ["random", "rbc"])
    seeds: list[int] = field(default_factory=lambda: [0])
    output_root: str | None = None
    vary_key: str | None = None
    vary_values: list[Any] = field(default_factory=list)
    boundary_frac: float = 0.1  # boundary AUC: this fraction of samples nearest the decision boundary
    tsne_max: int = 1500  # samples in the t-SNE plot (subsampled, seeded)
    plots: bool = True
    # runs trained at once (each in its own driver thread, sharing the Ray session): 1 runs them one
    # after another; more suits a cluster with room for several (Ray queues what does not fit yet)
    concurrency: int = 1

    def __post_init__(self) -> None:
        self.methods, self.seeds, self.vary_values = list(self.methods), list(self.seeds), list(self.vary_values)
        _check(bool(self.methods), "compare.methods is empty: e.g. 'compare.methods=[random,rbc]'")
        _check(len(set(self.methods)) == len(self.methods), f"compare.methods={self.methods} lists a method twice")
        _check(bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
               f"compare.seeds={self.seeds} must be non-empty non-negative ints, e.g. 'compare.seeds=[0,1,2]'")
        _check(len(set(self.seeds)) == len(self.seeds), f"compare.seeds={self.seeds} lists a seed twice")
        same = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v) for v in self.vary_values]
        _check(len(set(same)) == len(same), f"compare.vary_values={self.vary_values} lists a value twice")
        _check(self.output_root is not None, "compare.output_root is required: compare.output_root=/abs/path")
        _check("://" not in str(self.output_root),
               f"compare.output_root={self.output_root!r} must be a local or mounted path, not a storage URI: "
               "the runs' artefacts are written there (training checkpoints can go to a URI: ray.storage_path=)")
        _check(self.vary_key is None or "." in self.vary_key and bool(self.vary_values),
               f"compare.vary_key={self.vary_key!r} needs a dotted config key (e.g. noise.rate) and a non-empty "
               "compare.vary_values list, e.g. 'compare.vary_values=[0.2,0.4]'")
        _check(self.vary_key is not None or not self.vary_values,
               "compare.vary_values is set but compare.vary_key is not: set compare.vary_key=noise.rate (say)")
        _check(0.0 < self.boundary_frac <= 1.0, f"compare.boundary_frac={self.boundary_frac} must be in (0, 1]")
        _check(self.tsne_max >= 10, f"compare.tsne_max={self.tsne_max} must be >= 10")
        _check(self.concurrency >= 1, f"compare.concurrency={self.concurrency} must be >= 1 (1: one run at a time)")
