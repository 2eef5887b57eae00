"""Algorithm 2 of the paper (spec section 1) as one function over Ray stages.

warm-up (M0 random meta samples, meta re-weighting in Ray Train, a snapshot per epoch)
-> rounds: snapshots -> features (Ray Data) -> exclusion + weighted K-means (parameter server)
   -> picks -> cleaning (the oracle, or a person: ``labels=file``) -> re-train
-> final metrics and artefacts (selection.csv, metrics.json, manifest.json) in ``output_dir``.

Which runs a method trains is its training plan's business (``training.PLANS``, named when the
method is registered in ``selectors.SELECTORS``): the paper's methods re-weight after each round,
``base`` trains once on the noisy set, ``finetune`` fine-tunes on the meta set alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import ConfigError, ExperimentConfig, from_dict, kmeans_signed, ray_client_error, to_dict, without_defaults
from .core import artifacts, locks
from .core.data import build_data, noise_identity
from .core.labels import TO_LABEL_NAME, Labeler, labels_suffix, to_label_rows
from .core.metrics import weight_auc
from .selectors import SELECTORS, Picks, RoundContext, clustered_feature_kind, plan_of
from .training import PLANS, TrainEnv, best_snapshot, warmup_ids, warmup_name  # noqa: F401  (warmup_* re-exported)

log = logging.getLogger(__name__)  # stage lines in the driver, i.e. in `ray job logs`

SELECTION_COLUMNS = ["sample_id", "observed_label", "cleaned_label", "round", "cluster", "score"]


GBC_KNOBS = ("num_layers", "proj_dim", "projection")  # read only where GBC features are extracted


def run_identity(cfg: ExperimentConfig, *, noise: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that make a run what it is: ``to_dict(cfg)`` less the GBC knobs when the
    method extracts no GBC features (rbc/random runs with another features.proj_dim are the same run),
    and less ``labels`` (a person's labels file is a path; the oracle, the default, is left out so
    run names stay as they were), with ``selection.similarity`` as the similarity weighted K-means
    uses ("abs" / "signed", so "auto" matches what it resolves to) and without it for methods that
    run no weighted K-means. ``noise``: a ``cifar_n`` run's noise identity as its manifest recorded
    it (:func:`manifest_extra`), used instead of reading its file, which may have moved since."""
    plain = to_dict(cfg)
    if noise is not None and cfg.noise.kind == "cifar_n":
        plain["noise"] = dict(noise)
    else:
        plain["noise"] = noise_identity(cfg.data, cfg.noise)  # cifar_n: its label set's digest, not its path
    labels = plain.pop("labels")  # the file is a path: where the labels come from, not what they are
    if labels["source"] != "oracle":  # (oracle runs keep the names they had before labels existed)
        plain["labels"] = {"source": labels["source"]}
    kind = clustered_feature_kind(cfg.selection.method, cfg.features.kind)
    if kind != "gbc":
        for key in GBC_KNOBS:
            plain["features"].pop(key, None)
    if kind is None or cfg.selection.method == "rbc_k":
        plain["selection"].pop("similarity", None)
    else:
        plain["selection"]["similarity"] = "signed" if kmeans_signed(cfg.selection, cfg.reweight.mode) else "abs"
    return plain


def _normalised(recorded: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """A recorded config through the dataclasses: settings added since it was written get their
    defaults, so an older run still matches when it computed the same thing. The exception: a run
    recorded before ``selection.similarity`` existed clustered with ``|<G_j, C_i>|`` ("abs").
    A ``cifar_n`` run's noise identity is the one its manifest recorded (:func:`manifest_extra`),
    else read from its file."""
    sel = recorded.get("selection")
    if isinstance(sel, dict) and "similarity" not in sel:
        recorded = {**recorded, "selection": {**sel, "similarity": "abs"}}
    extra = manifest.get("extra")
    noise = extra.get("noise_identity") if isinstance(extra, dict) else None
    return run_identity(from_dict(recorded), noise=noise if isinstance(noise, dict) else None)


def manifest_extra(cfg: ExperimentConfig, **fields: Any) -> dict[str, Any]:
    """``fields`` for ``manifest.json``'s ``extra``, plus a ``cifar_n`` run's ``noise_identity``
    (label set and digest): the run folder is then recognised with its file moved elsewhere."""
    if cfg.noise.kind == "cifar_n":
        fields["noise_identity"] = noise_identity(cfg.data, cfg.noise)
    return fields


def noise_record(cfg: ExperimentConfig, train: Any) -> dict[str, Any]:
    """metrics.json's ``noise``: kind and rate as configured; for cifar_n the rate of its human labels
    over the training split (observed != true) and the label set read (None resolved)."""
    if cfg.noise.kind != "cifar_n":
        return {"kind": cfg.noise.kind, "rate": cfg.noise.rate}
    return {"kind": "cifar_n", "rate": float(np.mean(train.y_obs != train.y_true)),
            "label": noise_identity(cfg.data, cfg.noise)["label"]}


def check_run_dir(cfg: ExperimentConfig) -> None:
    """OutputDirError (naming the fix and the differing keys) when ``cfg.output_dir`` holds another run."""
    labels_file = Path(cfg.labels_file)
    inputs = [labels_file.name] if cfg.labels.source == "file" and labels_file.parent == Path(cfg.output_dir) else []
    artifacts.check_output_dir(Path(cfg.output_dir), config=run_identity(cfg), normalise=_normalised, inputs=inputs)


def completed_metrics(output_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json of the completed run in ``output_dir`` (manifest status complete, and its
    selection.csv and metrics.json present), else None. Pair it with :func:`check_run_dir`."""
    out = Path(output_dir)
    try:
        if artifacts.manifest_status(out) == "complete" and (out / "selection.csv").is_file():
            return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def validate(cfg: ExperimentConfig) -> Any:
    """Every check that can fail before work starts; returns the driver-side data bundle."""
    return _preflight(cfg)[0]


def _preflight(cfg: ExperimentConfig) -> tuple[Any, Labeler]:
    """:func:`validate`'s checks; returns the data bundle and the labeler (a labels file is read once)."""
    _given_address(cfg)  # a Ray Client address: before the data is read
    if cfg.selection.method not in SELECTORS:
        raise ConfigError(f"unknown method {cfg.selection.method!r}: choose one of {SELECTORS.names()} "
                          "(selection.method=... or method=...)")
    from .core import baselines as _baselines  # noqa: F401  (registers EXTRACTORS "predictions")
    from .core import gbc as _gbc  # noqa: F401  (registers EXTRACTORS "gbc": features=gbc)
    from .core.features import EXTRACTORS, clustering_kinds
    from .core.models import MODELS
    from .core.reweight import REWEIGHTERS

    for setting, value, registry in (("reweight.mode", cfg.reweight.mode, REWEIGHTERS),
                                     ("model.name", cfg.model.name, MODELS)):
        if value not in registry:
            raise ConfigError(f"unknown {setting} {value!r}: choose one of {registry.names()} ({setting}=...)")
    kind, kinds = cfg.features.kind, clustering_kinds()
    if kind in EXTRACTORS and kind not in kinds:  # registered, but not a feature the clustering takes
        raise ConfigError(f"features.kind={kind!r} names a table of the model's predictions (what uncertain and "
                          f"certain rank by), not a gradient feature the clustering can take: choose one of {kinds} "
                          "(features.kind=...)")
    if kind not in kinds:
        raise ConfigError(f"unknown features.kind {kind!r}: choose one of {kinds} (features.kind=...)")
    out = Path(cfg.output_dir)
    if not out.is_absolute():
        raise ConfigError(f"output_dir={cfg.output_dir!r} must be an absolute path "
                          "(Ray jobs run from a temporary copy of the working dir)")
    check_run_dir(cfg)
    if cfg.labels.source == "file" or completed_metrics(out) is None:  # a finished run is only read back
        artifacts.check_writable(out, "output_dir")
        if cfg.ray.storage_path is not None and "://" not in cfg.ray.storage_path:  # a URI: Ray's to reach
            artifacts.check_writable(cfg.ray.storage_path, "ray.storage_path")
    bundle = build_data(cfg.data, cfg.noise, cfg.seed)  # raises ConfigError for a missing root
    n = len(bundle.train)
    if cfg.selection.budget > n:
        raise ConfigError(f"selection.budget={cfg.selection.budget} is larger than the {n} training samples: "
                          "lower the budget")
    _check_rounds_fit(cfg, n)
    late = [m for m in cfg.reweight.lr_milestones if m >= cfg.reweight.epochs]
    if late:  # allowed (a shortened run of a config with a schedule), but said: the lr is not cut there
        log.warning("reweight.lr_milestones %s at or after reweight.epochs=%d never apply: the lr is not cut at %s",
                    late, cfg.reweight.epochs, "it" if len(late) == 1 else "them")
    from .core.models import build_model

    build_model(cfg.model, bundle.num_classes, bundle.input_shape)  # ConfigError: model and data disagree
    labels = labeler(cfg, bundle)  # ConfigError for a labels file that cannot be used
    if cfg.reweight.augment:
        try:
            bundle.train.inputs(np.arange(1), augment=True, generator=torch.Generator().manual_seed(0))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return bundle, labels


def labeler(cfg: ExperimentConfig, bundle: Any) -> Labeler:
    """Who cleans the picks (``labels.source``): the oracle, or a person's labels file."""
    from .core.labels import FileLabels, OracleLabels

    if cfg.labels.source == "file":
        # a to_label_round<r>.csv of output_dir is rewritten at the next stop (os.replace: through a link
        # too), and the labels in it lost: by its path as given or resolved, in any letter case
        outs = {os.path.normcase(f(cfg.output_dir)) for f in (os.path.abspath, os.path.realpath)}
        to_label = re.escape(TO_LABEL_NAME).replace(r"\{round\}", r"\d+")
        if any(os.path.normcase(os.path.dirname(p)) in outs and re.fullmatch(to_label, os.path.basename(p), re.I)
               for p in {os.path.abspath(cfg.labels_file), os.path.realpath(cfg.labels_file)}):
            raise ConfigError(f"labels.file={cfg.labels_file} is one of the files this job rewrites with the samples "
                              f"still to label: copy it (filled in) to {Path(cfg.output_dir) / 'labels.csv'} and leave "
                              "labels.file unset, or copy it elsewhere and set labels.file to the copy")
        return FileLabels(cfg.labels_file, train_ids=bundle.train.sample_id, num_classes=bundle.num_classes)
    return OracleLabels(bundle.train.sample_id, bundle.train.y_true)


def _check_rounds_fit(cfg: ExperimentConfig, n: int) -> None:
    """For methods that run the exclusion step: every round's picks fit in the candidates that
    the step leaves (floor(exclude_frac x candidates) of them dropped, core.kmeans.n_excluded)."""
    if not _clusters(cfg):
        return
    from .core.kmeans import n_excluded

    s, meta = cfg.selection, cfg.selection.warmup
    for r, k in enumerate(s.round_sizes, start=1):
        cand = n - meta
        left = cand - n_excluded(cand, s.exclude_frac)
        if k > left:
            raise ConfigError(
                f"round {r} picks {k} samples but the exclusion step (selection.exclude_frac={s.exclude_frac}) "
                f"leaves {left} of the {cand} candidates ({n} training samples, {meta} meta samples): lower "
                "selection.budget (or set selection.per_round) or lower selection.exclude_frac")
        meta += k


def _clustered_layout(cfg: ExperimentConfig, bundle: Any) -> tuple[str, int, int] | None:
    """(kind, floats per sample and snapshot in the feature table, D = floats of one centroid)
    for the features the method clusters, None when it clusters none. A GBC row is R blocks of
    B = min(largest parameter tensor, features.proj_dim) floats, its centroid K rows; an RBC row
    is the factors A (C floats) and x~ (the model's d) side by side, its centroid K dense C x d
    blocks."""
    f = cfg.features
    kind = clustered_feature_kind(cfg.selection.method, f.kind)
    if kind is None:
        return None
    from .core.models import build_model

    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    if kind == "gbc":
        from .core.gbc import GBCExtractor

        width = GBCExtractor(model=model, cfg=f, seed=cfg.seed).width  # no fit: just the row layout
        return kind, width, f.num_snapshots * width
    C, d = bundle.num_classes, int(model.feature_dim)
    return kind, C + d, f.num_snapshots * C * d


def _centroid_count(cfg: ExperimentConfig) -> int:
    """M, the most centres K-means holds at once: the larger of a round's picks and the meta
    samples before the last round (the exclusion step's centres)."""
    sizes = cfg.selection.round_sizes
    return max(max(sizes), cfg.selection.budget - sizes[-1])


def _memory_bytes(cfg: ExperimentConfig, bundle: Any, lay: tuple[str, int, int] | None) -> tuple[int, int]:
    """(feature table, one centroid array) in bytes for ``lay`` = :func:`_clustered_layout`."""
    if lay is None:
        return 0, 0
    return len(bundle.train) * cfg.features.num_snapshots * lay[1] * 4, _centroid_count(cfg) * lay[2] * 8


def feature_table_bytes(cfg: ExperimentConfig, bundle: Any) -> int:
    """Bytes of the feature table a round would write and the K-means shard actors hold (0 when
    the method clusters no features): N samples x K snapshots x one row of float32."""
    return _memory_bytes(cfg, bundle, _clustered_layout(cfg, bundle))[0]


def centroid_bytes(cfg: ExperimentConfig, bundle: Any) -> int:
    """Bytes of one (M, D) float64 array of K-means centroids (0 when the method clusters none):
    M from :func:`_centroid_count`, D the length of G_j (K C d for RBC: the factorised rows make
    dense centroids)."""
    return _memory_bytes(cfg, bundle, _clustered_layout(cfg, bundle))[1]


# Memory of K-means (python -m benchmarks.kmeans_memory, local Ray; peak above the value before
# Ray started). The shards hold their rows once: a dense (GBC) shard moves excluded rows behind
# the active ones in place (core.shards.permute_rows_), and a factor (RBC) shard does the same on
# the snapshot-major arrays the streaming reader fills (core.featuretable.read_factor_table). The
# node's used memory (MemTotal - MemAvailable, what Ray's memory monitor acts on) rose 3.6 GiB for
# Table 1's 1.43 GiB GBC table (proj_dim 256) and 7.9 GiB for the 5.72 GiB one (proj_dim 1024):
# 1.0x the table plus 2.1 GiB; 4.7 and 6.9 GiB for random RBC factor tables of 2.28 and 4.56 GiB
# (--synthetic, C = 100, d = 512): 1.0x the table plus 2.4 GiB. Before, a dense shard copied its
# active rows on every exclusion (5.4 and 15.6 GiB), and a factor shard's reader held about four
# copies of its part at once (11.3 GiB for the 2.28 GiB table). The check counts 1.25x the table
# plus 4 GiB (docs/performance.md).
FEATURE_MEMORY_FACTOR = 1.25
FEATURE_MEMORY_OVERHEAD = 4 * 2**30
# The (M, D) float64 centroids, which for RBC with many classes outgrow the table (C = 1000,
# d = 512, K = 5, 40 picks: 0.76 GiB each, against 0.11 GiB of factors for 4,000 samples): the
# server's copy, the one it puts in the object store, each shard's float32 operands and float64
# numerator, the partial sums the shards return, and the object store spilling what exceeds it.
# Measured on that table (--synthetic 4000,5,1000,512, 3 iterations; docs/performance.md row 9b):
# node used rose 4.46 GiB (10 picks) and 8.07 GiB (40 picks) with 2 shards, 15.45 GiB with 4
# (about 5 copies per shard); with the numerator summed in place 8.59 and 13.79 GiB (about 3.4
# per shard). The check counts 2 + 5 per shard: 6.4, 13.3 and 20.9 GiB at those three points.
CENTROID_COPIES_BASE = 2
CENTROID_COPIES_PER_SHARD = 5


def craig_bytes(cfg: ExperimentConfig, bundle: Any) -> tuple[int, int]:
    """(one snapshot's RBC factors, the N x m float32 similarity block) in bytes that ``craig``
    holds in the driver (m = CRAIG_COVERAGE coverage points, at most N); (0, 0) for other methods."""
    if cfg.selection.method != "craig":
        return 0, 0
    from .core.models import build_model
    from .selectors import CRAIG_COVERAGE

    n = len(bundle.train)
    d = int(build_model(cfg.model, bundle.num_classes, bundle.input_shape).feature_dim)
    return n * (bundle.num_classes + d) * 4, n * min(CRAIG_COVERAGE, n) * 4


def _memory_refusal(need: float, memory_bytes: float, runs_at_once: int, fix: str) -> str | None:
    """None when ``need`` (one run, FEATURE_MEMORY_OVERHEAD included) fits its share of the
    memory, else the refusal's end: what the cluster has and the fix. ``runs_at_once`` runs
    (``compare.concurrency``) share it equally, each with its own overhead: that overhead was
    measured as one run's rise of the node's memory above the table, and each run starts its own
    shard actors and server (docs/performance.md rows 9-10)."""
    gib = 2**30
    share = memory_bytes / max(1, runs_at_once)
    if need <= share:
        return None
    if runs_at_once <= 1:
        return f"but the Ray cluster has {memory_bytes / gib:.1f} GiB: {fix}"
    has = (f"but the {runs_at_once} runs at once (compare.concurrency) share the Ray cluster's "
           f"{memory_bytes / gib:.1f} GiB, {share / gib:.1f} GiB each")
    if need <= memory_bytes:
        return f"{has}: lower compare.concurrency (one such run fits the cluster), or add nodes"
    return f"{has}: {fix}, or lower compare.concurrency"


def _check_craig_memory(cfg: ExperimentConfig, bundle: Any, memory_bytes: float, runs_at_once: int = 1) -> None:
    table, sim = craig_bytes(cfg, bundle)
    need = FEATURE_MEMORY_FACTOR * table + sim + FEATURE_MEMORY_OVERHEAD
    tail = _memory_refusal(need, memory_bytes, runs_at_once, "run the driver on a node with more memory, or choose "
                           "a clustering method (method=rbc shards its table over ray.kmeans_shards actors)")
    if tail is None:
        return
    gib = 2**30
    raise ConfigError(
        f"craig holds one snapshot's RBC factors ({table / gib:.1f} GiB: {len(bundle.train)} samples x "
        f"{table // (4 * len(bundle.train))} floats) and a {len(bundle.train)} x {sim // (4 * len(bundle.train))} "
        f"similarity block ({sim / gib:.1f} GiB) in the driver, about {need / gib:.1f} GiB with Ray's "
        f"{FEATURE_MEMORY_OVERHEAD / gib:.0f} GiB, {tail}")


def check_feature_memory(cfg: ExperimentConfig, bundle: Any, memory_bytes: float, runs_at_once: int = 1) -> None:
    """ConfigError when K-means would not fit in the cluster's memory: the feature table (GBC or
    RBC) held by the shard actors at FEATURE_MEMORY_FACTOR times its size, CENTROID_COPIES_BASE +
    CENTROID_COPIES_PER_SHARD x ray.kmeans_shards copies of the (M, D) centroids, and
    FEATURE_MEMORY_OVERHEAD for Ray itself; names the knobs that shrink the larger part. For
    ``craig``, which clusters nothing: its factors and similarity block in the driver
    (:func:`craig_bytes`). ``runs_at_once`` runs (``compare.concurrency``) share the memory
    equally (:func:`_memory_refusal`)."""
    if cfg.selection.method == "craig":
        _check_craig_memory(cfg, bundle, memory_bytes, runs_at_once)
        return
    lay = _clustered_layout(cfg, bundle)  # builds the model once
    if lay is None:
        return
    kind, row, D = lay
    table, cent = _memory_bytes(cfg, bundle, lay)
    f, S = cfg.features, cfg.ray.kmeans_shards
    copies = CENTROID_COPIES_BASE + CENTROID_COPIES_PER_SHARD * S
    held, cents = FEATURE_MEMORY_FACTOR * table, copies * cent
    need = held + cents + FEATURE_MEMORY_OVERHEAD
    if cents > held:
        fix = ("lower selection.per_round (fewer picks, hence centroids, per round), features.num_snapshots or "
               "ray.kmeans_shards" + (", or features.proj_dim" if kind == "gbc" else "") + ", or add nodes")
    elif kind == "gbc":
        fix = "lower features.proj_dim (e.g. 256), features.num_layers or features.num_snapshots, or add nodes"
    else:
        fix = "lower features.num_snapshots, or add nodes"
    tail = _memory_refusal(need, memory_bytes, runs_at_once, fix)
    if tail is None:
        return
    gib = 2**30
    if kind == "gbc":
        what = (f"GBC features would take {table / gib:.1f} GiB ({len(bundle.train)} samples x K={f.num_snapshots} "
                f"snapshots x R={f.num_layers} blocks of up to {f.proj_dim} floats)")
    else:
        what = (f"RBC features would take {table / gib:.1f} GiB ({len(bundle.train)} samples x K={f.num_snapshots} "
                f"snapshots x {row} floats of factors)")
    raise ConfigError(
        f"{what}; K-means needs about {need / gib:.1f} GiB: {FEATURE_MEMORY_FACTOR:g}x the table "
        f"({held / gib:.1f} GiB) while it reads and holds it, {copies} copies of its {_centroid_count(cfg)} x {D} float64 "
        f"centroids over {S} shards and the server ({cents / gib:.1f} GiB) and {FEATURE_MEMORY_OVERHEAD / gib:.0f} GiB "
        f"for Ray, {tail}")


def _check_cluster(cfg: ExperimentConfig, bundle: Any, runs_at_once: int = 1, *,
                   extracts: bool | None = None) -> None:
    """ConfigError where the cluster cannot hold one run (``runs_at_once`` runs share its memory;
    nothing of that with ``ray.autoscaling``), or where another of its nodes does not see
    ``output_dir`` or a local ``ray.storage_path`` (:func:`_check_shared_storage`). ``extracts``:
    whether the extraction stage's actors run for the run and write under its output_dir (default:
    whether its method extracts, :func:`_extracts_on_workers`; jobs.compare: always, for the
    boundary AUC's margins)."""
    import ray

    extracts = _extracts_on_workers(cfg) if extracts is None else extracts
    _check_shared_storage(cfg, extracts)
    if cfg.ray.autoscaling:  # the cluster grows on demand: what it has now says nothing
        return
    res = ray.cluster_resources()
    check_feature_memory(cfg, bundle, float(res.get("memory", 0.0)), runs_at_once)
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > res.get("CPU", 0):
        raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
                          f"needs {need_cpu} CPUs but the cluster has {res.get('CPU', 0)}: lower ray.num_workers or "
                          "ray.cpus_per_worker")
    shard_cpu = cfg.ray.kmeans_shards * cfg.ray.kmeans_shard_cpus
    clusters = _clusters(cfg)
    if clusters and shard_cpu > res.get("CPU", 0):
        raise ConfigError(f"ray.kmeans_shards={cfg.ray.kmeans_shards} x ray.kmeans_shard_cpus="
                          f"{cfg.ray.kmeans_shard_cpus} needs {shard_cpu} CPUs but the cluster has "
                          f"{res.get('CPU', 0)}: lower ray.kmeans_shards or ray.kmeans_shard_cpus")
    if cfg.ray.extract_gpus > 0 and not res.get("GPU", 0):
        raise ConfigError(f"ray.extract_gpus={cfg.ray.extract_gpus} but the cluster has no GPU: set "
                          "ray.extract_gpus=0 (CPU actors) or run on a cluster with GPU nodes")
    _check_per_node(cfg, extracts, clusters)
    need_gpu = cfg.ray.num_workers if cfg.ray.use_gpu else 0
    if need_gpu > res.get("GPU", 0):
        raise ConfigError(f"ray.use_gpu=true with {cfg.ray.num_workers} workers needs {need_gpu} GPUs but the "
                          f"cluster has {res.get('GPU', 0)}: set ray.use_gpu=false or lower ray.num_workers")


def _clusters(cfg: ExperimentConfig) -> bool:
    """Whether the method holds features in K-means shard actors (rbc, rbc_k, gbc)."""
    return clustered_feature_kind(cfg.selection.method, cfg.features.kind) is not None


EXTRACTING_BASELINES = ("craig", "uncertain", "certain")  # RBC factors / the softmax on the extraction actors


def _extracts_on_workers(cfg: ExperimentConfig) -> bool:
    """Whether the method runs the extraction stage's Ray Data actors: those that cluster
    features, craig (RBC factors) and uncertain/certain (the softmax, ``predictions``)."""
    return _clusters(cfg) or cfg.selection.method in EXTRACTING_BASELINES


# (folder, nodes) pairs found shared in this process: jobs.compare checks every run, and its runs'
# output_dirs share their nearest existing folder until they are made
_SHARED_OK: set[tuple[str, frozenset[str]]] = set()


def _check_shared_storage(cfg: ExperimentConfig, extracts: bool | None = None) -> None:
    """ConfigError naming the fix where another node of the cluster that can run work does not see
    a folder that workers write in as this driver does (a file written in its nearest existing
    folder is not there: :mod:`distributed.shared_fs`): ``output_dir`` where feature extraction
    writes its tables there (``extracts``; default: methods that extract on workers) or Ray Train its
    checkpoints (``ray.storage_path`` unset, or a path inside it), and a local ``ray.storage_path``
    elsewhere. Nothing is asked on a single node. With ``ray.autoscaling`` only the nodes up now
    are asked (a node added later that does not share output_dir still fails the run: feature
    extraction counts the rows it can see)."""
    from .distributed import shared_fs

    nodes = shared_fs.worker_nodes()
    if not nodes:
        return
    out = os.path.abspath(cfg.output_dir)
    sp = cfg.ray.storage_path
    local_sp = sp is not None and "://" not in sp
    ckpt_inside = sp is None or (local_sp and os.path.commonpath([out, os.path.abspath(sp)]) == out)
    extracts = _extracts_on_workers(cfg) if extracts is None else extracts
    checks = []  # (setting, path, what other nodes write there, whether a storage URI would do)
    if extracts or ckpt_inside:
        writers = " and ".join(
            (["Ray Data's feature-extraction tasks write the feature tables under it"] if extracts else [])
            + ([f"Ray Train's workers write their checkpoints under it (ray.storage_path "
                f"{'is unset: <output_dir>/ray_train' if sp is None else 'is inside it'})"] if ckpt_inside else []))
        checks.append(("output_dir", cfg.output_dir, writers, not extracts))
    if local_sp and not ckpt_inside:
        checks.append(("ray.storage_path", sp, "Ray Train's workers write their checkpoints there", True))
    ids = frozenset(n["NodeID"] for n in nodes)
    for setting, path, writers, uri_fix in checks:
        folder = artifacts.nearest_existing(path)
        key = (os.path.realpath(folder), ids)
        if key in _SHARED_OK:
            continue
        try:
            missing, silent = shared_fs.nodes_not_sharing(folder, nodes)
        except OSError as err:  # check_writable passed: a folder that changed since; the run will say more
            log.warning("could not check that every node sees %s=%s: %s", setting, path, err)
            continue
        if silent:
            log.warning("nodes %s gave no answer whether they see %s (%s=%s): not checked there (a node being "
                        "drained or gone, or one still preparing the job's environment after a minute)",
                        ", ".join(silent), folder, setting, path)
        error = shared_fs.unshared_error(setting, path, str(folder), missing, len(nodes), writers=writers,
                                         uri_fix=uri_fix)
        if error is not None:
            raise ConfigError(error)
        if not silent:
            _SHARED_OK.add(key)


def _check_per_node(cfg: ExperimentConfig, extracts: bool, clusters: bool = False, *, trains: bool = True) -> None:
    """One Train worker (``trains``), one extraction actor (``extracts``) and one K-means shard
    (``clusters``) must each fit on some node (Ray never splits a worker's CPUs or GPUs across
    nodes; otherwise it waits forever)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    most = {k: max((r.get(k, 0.0) for r in nodes), default=0.0) for k in ("CPU", "GPU")}
    r = cfg.ray
    if trains and r.cpus_per_worker > most["CPU"]:
        raise ConfigError(f"ray.cpus_per_worker={r.cpus_per_worker} but the largest node has {most['CPU']} CPUs: "
                          "lower ray.cpus_per_worker (a Train worker runs on one node)")
    if extracts and r.extract_cpus > most["CPU"]:
        raise ConfigError(f"ray.extract_cpus={r.extract_cpus} but the largest node has {most['CPU']} CPUs: "
                          "lower ray.extract_cpus (an extraction actor runs on one node)")
    if extracts and r.extract_gpus > most["GPU"]:
        raise ConfigError(f"ray.extract_gpus={r.extract_gpus} but the largest node has {most['GPU']} GPUs: "
                          "lower ray.extract_gpus (e.g. 1, or 0.5 to share a GPU between two actors)")
    if clusters and r.kmeans_shard_cpus > most["CPU"]:
        raise ConfigError(f"ray.kmeans_shard_cpus={r.kmeans_shard_cpus} but the largest node has {most['CPU']} CPUs: "
                          "lower ray.kmeans_shard_cpus (a K-means shard runs on one node; more shards: "
                          "ray.kmeans_shards)")


# Ray Train v2's controller takes one reported result per health-check poll (default 2 s), so a
# per-epoch snapshot would cost 2 s. Its print patch sends each print of a Train worker to the
# worker's stdout and again through logging, so with ray.log_to_driver every epoch line reached
# the driver twice; off, a print goes to the worker's stdout once. cluster/runtime_env.yaml sets
# the same for Ray jobs (tests/unit/test_cluster_configs.py).
RAY_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


_LEFT_RAY = threading.Event()
_CONNECT_LOCK = threading.Lock()  # runs in several threads (compare.concurrency) start one Ray, not one each


def leave_ray() -> None:
    """End this driver's Ray session after a Ctrl-C, for good (its actors, training runs included,
    end with it): :func:`connect` refuses from then on and Ray's automatic ``ray.init`` is off, so
    a run still going in another thread (``compare.concurrency``) cannot start a new local Ray
    while the process exits."""
    import ray

    _LEFT_RAY.set()
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except (ImportError, AttributeError):  # pragma: no cover -- another Ray layout: connect() still refuses
        pass
    ray.shutdown()


def _ray_init(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``, keeping the SIGTERM handler this program had set in Python (the
    jobs' :func:`jobs.select.exit_status`): Ray's core worker installs its own at init, which
    dumps a stack and aborts the process (exit status 134), so ``ray job stop``, ``timeout``,
    Kubernetes or Slurm ending a job would crash it instead of stopping it as Ctrl-C does. (A
    SIGTERM during ``ray.init`` itself still meets Ray's handlers: exit status 15 or 134.)"""
    import ray

    before = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    finally:
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)


def _given_address(cfg: ExperimentConfig) -> tuple[str | None, str]:
    """(the address ``ray.init`` joins: ray.address, RAY_ADDRESS where ray.address is unset or
    ``auto`` (as ray.init reads it), else None; the setting it came from). ConfigError for a Ray
    Client address (``ray://``), under which the warm-up would train and feature extraction then
    fail (Ray Data's executor needs a driver in the cluster)."""
    env = os.environ.get("RAY_ADDRESS") or None
    if cfg.ray.address not in (None, "auto") or env is None:
        given, setting = cfg.ray.address, "ray.address"
    else:
        given, setting = env, "RAY_ADDRESS"
    client = None if given is None else ray_client_error(given, setting)
    if client is not None:
        raise ConfigError(client)
    return given, setting


def connect(cfg: ExperimentConfig) -> None:
    """Join the Ray that ``ray.init()`` would (ray.address, else RAY_ADDRESS, else a live cluster
    that `ray start` left on this machine), or start a local Ray with ray.num_cpus and
    ray.object_store_memory where there is none (developing on one machine)."""
    with _CONNECT_LOCK:
        _connect(cfg)


def _connect(cfg: ExperimentConfig) -> None:
    import ray
    from ray._private import services

    if _LEFT_RAY.is_set():
        raise RuntimeError("this process left Ray after an interrupt; run the command again to go on")
    if ray.is_initialized():
        return
    given, setting = _given_address(cfg)
    # `ray start` records its cluster in an address file, which ray.init() and Ray Train's own
    # helpers read. Beside such a cluster a second local Ray is unsafe: Ray Train's placement-group
    # cleaner looks the cluster up by that file, watches the other cluster, does not find this job's
    # controller there and may remove this job's training resources.
    recorded = services.find_bootstrap_address(None)
    live = recorded is not None and recorded in services.find_gcs_addresses()
    local_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), **RAY_ENV_VARS}}
    kwargs: dict[str, Any] = {"log_to_driver": cfg.ray.log_to_driver}
    if given is None and live:
        # address None, as ray.init() joins it: that also turns on the token auth the cluster uses
        log.info("joining the Ray cluster that `ray start` left on this machine (%s); its resources, not "
                 "ray.num_cpus / ray.object_store_memory, apply", recorded)
        _ray_init(address=None, runtime_env=local_env, **kwargs)
        return
    if given is None or given == "local":
        if live:  # ray.address=local beside it
            log.warning("a Ray cluster started with `ray start` runs on this machine (%s): Ray Train's "
                        "placement-group cleaner watches that cluster instead of this job's Ray and may remove "
                        "this job's training resources; stop it (`ray stop`), or leave ray.address unset to join it",
                        recorded)
        elif recorded is not None:
            log.info("ignoring the address %s that `ray start` recorded: no Ray runs there", recorded)
        _ray_init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False, runtime_env=local_env, **kwargs)
        return
    if given == "auto" and setting == "ray.address":  # (RAY_ADDRESS unset) a cluster on this machine: this checkout
        kwargs["runtime_env"] = local_env
    unreachable = _unreachable(given)
    if unreachable is not None:  # ray.init would wait minutes for a GCS that is not there
        raise ConfigError(f"{setting}={given}: no Ray cluster answers there ({unreachable}): give the head's GCS "
                          "address (host:6379, as `ray start --head` prints it), start that cluster, or leave "
                          "ray.address and RAY_ADDRESS unset to start a local Ray")
    try:
        _ray_init(address=given, **kwargs)  # a job's runtime env (ray job submit, cluster/) says the rest
    except (ConnectionError, ValueError) as err:  # "auto" with no cluster here; an address Ray cannot take
        if isinstance(err, ValueError) and "address" not in str(err).lower():
            raise
        why = "; ".join(str(e).strip().splitlines()[0] for e in (err, err.__cause__) if e is not None and str(e).strip())
        fix = ("start one (ray start --head) or leave ray.address and RAY_ADDRESS unset to start a local Ray"
               if "could not find any running ray instance" in why.lower() else
               "check the address (the head's GCS address, host:6379), that the cluster is up, and that this "
               "machine may join it (its auth token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
        raise ConfigError(f"{setting}={given}: Ray could not join it ({why}): {fix}") from err


def _unreachable(address: str, timeout_s: float = 10.0) -> str | None:
    """Why a ``host:port`` address takes no TCP connection within ``timeout_s`` (None when it does,
    and for any other form: ``auto``, ``ray.init``'s to judge). localhost is probed as Ray joins
    it: at this node's address."""
    import socket

    from ray._private import services

    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in address or not port.isdigit():
        return None
    try:
        host, _, port = (services.canonicalize_bootstrap_address(address) or address).rpartition(":")
    except Exception:  # noqa: BLE001 -- Ray's resolver failing: probe the address as given
        pass
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def run_experiment(cfg: ExperimentConfig, *, wait: bool = False) -> dict[str, Any]:
    """Run Algorithm 2 end to end and write the artefacts; returns metrics.json's content.

    One invocation at a time works in an ``output_dir`` (:mod:`core.locks`): when another one on
    this machine is at work there, raise BusyError (``wait=False``, ``jobs.select``) or wait for it
    to finish (``wait=True``, ``jobs.compare``, whose runs may overlap another comparison's).
    """
    t_start = time.perf_counter()
    bundle, labels = _preflight(cfg)
    out = os.path.realpath(cfg.output_dir)
    with locks.hold(f"output_dir:{out}", f"output_dir {out}", wait=wait, on_wait=log.info,
                    fix="wait for it to finish and run this command again (it reads back what that one "
                        "finished), or choose another output_dir"):
        check_run_dir(cfg)  # again, now that it is ours: what was there may have changed while waiting
        return _run_experiment(cfg, bundle, labels, t_start)


def _run_experiment(cfg: ExperimentConfig, bundle: Any, labels: Labeler, t_start: float) -> dict[str, Any]:
    done = completed_metrics(cfg.output_dir)
    relabelled = done is not None and _labels_changed(cfg.output_dir, labels)
    if done is not None and not relabelled:  # the same run (validate checked the fingerprint), already finished
        log.info("%s already holds this run, complete: nothing to do (delete it to run again)", cfg.output_dir)
        return done
    out = Path(cfg.output_dir)
    for path in artifacts.remove_temporaries(out):  # left by a run killed mid-write
        log.info("removed %s, left by an interrupted run", path)
    cfg_dict = to_dict(cfg)
    if relabelled:  # the finished results were made with other labels: they go, the run goes on
        log.info("%s: labels in %s changed since this run finished: training again from the first run they "
                 "change", cfg.output_dir, cfg.labels_file)
        artifacts.write_manifest(out, config=cfg_dict, seed=cfg.seed, timings={}, extra=manifest_extra(cfg, status="relabelled"))
        for name in ("metrics.json", "selection.csv"):
            (out / name).unlink(missing_ok=True)
    observed = dict(zip(bundle.train.sample_id.tolist(), bundle.train.y_obs.tolist()))
    selector = SELECTORS.get(cfg.selection.method)
    plan = PLANS.get(plan_of(selector))()
    cleaned = labels.labels

    def selection_rows(ids: np.ndarray, rnd: int, clusters: Any, scores: Any) -> list[dict[str, Any]]:
        return [{"sample_id": int(i), "observed_label": observed[int(i)], "cleaned_label": int(y),
                 "round": rnd, "cluster": int(c), "score": float(sc)}
                for i, y, c, sc in zip(ids, cleaned(ids), clusters, scores)]

    def wait_for_labels(ids: np.ndarray, rnd: int, clusters: Any, scores: Any) -> dict[str, Any] | None:
        """Export the samples of ``ids`` that have no label yet and stop (``labels=file``)."""
        missing = labels.missing(ids)
        if not missing.size:
            return None
        return _await_labels(cfg, out, bundle, missing, ids=ids, observed=observed, rnd=rnd, clusters=clusters,
                             scores=scores, cfg_dict=cfg_dict)

    meta = plan.warmup_ids(cfg, bundle)
    no_cluster, no_score = [-1] * len(meta), [float("nan")] * len(meta)
    connect(cfg)
    _check_cluster(cfg, bundle)  # also before a labels=file run's first stop: it claims output_dir
    waiting = wait_for_labels(meta, 0, no_cluster, no_score)  # nothing to train yet
    if waiting is not None:
        return waiting
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = artifacts.config_fingerprint(without_defaults(run_identity(cfg)))[:12]  # names the round runs
    # claim the directory first: a crashed run can then be resumed in place (same fingerprint)
    artifacts.write_manifest(out, config=cfg_dict, seed=cfg.seed, timings={}, extra=manifest_extra(cfg, status="running"))
    storage = cfg.ray.storage_path or str(out / "ray_train")
    timings: dict[str, Any] = {}
    env = TrainEnv(cfg=cfg, storage=storage)
    rows = selection_rows(meta, 0, no_cluster, no_score)
    t0 = time.perf_counter()
    log.info("%s: %s training, %d meta samples, %d epochs", cfg.selection.method, plan.first_stage, len(meta),
             cfg.reweight.epochs)
    meta_labels = cleaned(meta)  # the meta set's clean labels, read again each time the set grows
    run = env.warmup = plan.first(env, meta_ids=meta, meta_labels=meta_labels)
    timings[f"{plan.first_stage}_train_s"] = time.perf_counter() - t0
    timings[f"{plan.first_stage}_epochs_s"] = run.epochs_s  # also when trained by an earlier invocation
    _log_run(run, timings[f"{plan.first_stage}_train_s"])
    rounds_info = []
    sizes = plan.round_sizes(cfg)
    for r, k in enumerate(sizes, start=1):
        ctx = RoundContext(cfg=cfg_dict, bundle=bundle, meta_ids=meta, run=run, round=r,
                           work_dir=out / "rounds" / f"round_{r}")
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        picks, earlier = _read_picks(ctx.work_dir, k=k, meta=meta, after=run.name)
        if picks is None:
            t0 = time.perf_counter()
            log.info("round %d: selecting %d with %s", r, k, cfg.selection.method)
            picks = selector(ctx, k)
            ctx.timings["select_s"] = time.perf_counter() - t0
            _check_picks(picks, k, meta, bundle)
            _write_picks(ctx.work_dir, picks, meta=meta, after=run.name, timings=ctx.timings)
        else:  # this round's picks, made before (the run stopped for labels, or crashed while re-training):
            # their stage times are those of the invocation that made them, as a training run read back
            # keeps its epoch times; picks_read_back says so
            ctx.timings.update(earlier)
            ctx.timings["picks_read_back"] = True
            log.info("round %d: read back the %d picks of %s", r, k, ctx.work_dir / PICKS_NAME)
        waiting = wait_for_labels(picks.sample_id, r, picks.cluster, picks.score)
        if waiting is not None:
            return waiting
        made = "by an earlier invocation, in" if ctx.timings.get("picks_read_back") else "in"
        log.info("round %d: picked %s %s %.1f s; re-training with %d meta samples", r,
                 picks.sample_id.tolist(), made, ctx.timings["select_s"], len(meta) + k)
        rows += selection_rows(picks.sample_id, r, picks.cluster, picks.score)
        meta = np.sort(np.concatenate([meta, picks.sample_id]))
        meta_labels = cleaned(meta)
        missing = missing_classes(meta_labels, bundle.num_classes)
        if missing:  # a warning for the meta set the final run trains with; earlier rounds may still add them
            last = r == len(sizes)
            log.log(logging.WARNING if last else logging.INFO,
                    "round %d: the %d meta samples hold no sample of class%s %s (by their cleaned labels): %s",
                    r, len(meta), "" if len(missing) == 1 else "es", ", ".join(map(str, missing)),
                    "the final training has no clean example of " + ("it" if len(missing) == 1 else "them")
                    + " (expected where classes outnumber the meta samples or some are very rare; otherwise a "
                      "larger selection.budget may cover it)" if last else "later rounds may add it")
        t0 = time.perf_counter()
        name = f"{cfg.selection.method}-round{r}-{fingerprint}{labels_suffix(labels.source, meta, meta_labels)}"
        run = plan.after_round(env, name=name, meta_ids=meta, meta_labels=meta_labels)
        ctx.timings["train_s"] = time.perf_counter() - t0
        ctx.timings["epochs_s"] = run.epochs_s
        _log_run(run, ctx.timings["train_s"])
        rounds_info.append({"round": r, "picked": k, "best_epoch": run.best_epoch, "meta_classes_missing": missing,
                            **picks.info, **ctx.timings})

    weights = run.final_weights().numpy()
    last_epoch = (run.extra.get("history") or [{}])[-1]  # the final run's last recorded epoch
    split = bundle.train
    noisy_mask = ~np.isin(split.sample_id, meta)
    clean = split.y_obs == split.y_true
    metrics = {
        "method": cfg.selection.method, "seed": cfg.seed, "dataset": cfg.data.name,
        "noise": noise_record(cfg, split),
        "budget": cfg.selection.budget, "warmup": cfg.selection.warmup,
        "test_acc_at_best_val": run.test_acc_at_best, "best_val_acc": run.best_val_acc,
        "best_epoch": run.best_epoch, "final_test_acc": run.final_test_acc,
        "weight_auc": weight_auc(weights[noisy_mask], clean[noisy_mask]),
        "meta_size": int(len(meta)),
        "meta_clean_frac_observed": (float(np.mean(meta_labels == np.array([observed[int(i)] for i in meta])))
                                     if len(meta) else None),
        # classes the final meta set has no sample of (cleaned labels); None without a meta set
        "meta_classes_missing": missing_classes(meta_labels, bundle.num_classes) if len(meta) else None,
        "labels_source": labels.source,
        "rounds": rounds_info,
        "final_run": {"name": run.name, "snapshot": str(run.snapshots[-1]["path"]),
                      "best_snapshot": str(best_snapshot(run)["path"]),
                      # its Train workers' device (rank 0's) and, on a GPU, whether its convolutions /
                      # matmuls rounded through TF32 (None: a CPU, or a run trained before they were recorded)
                      **{k: last_epoch.get(k) for k in ("device", "tf32")}},
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    selection = pd.DataFrame(rows, columns=SELECTION_COLUMNS)
    artifacts.write_csv(out / "selection.csv", selection)
    artifacts.write_json(out / "metrics.json", metrics)
    artifacts.write_manifest(out, config=cfg_dict, seed=cfg.seed, timings=metrics["timings"],
                             extra=manifest_extra(cfg, status="complete"))
    return metrics


def missing_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """Classes in ``range(num_classes)`` that no entry of ``labels`` names, ascending."""
    return sorted(set(range(num_classes)) - {int(y) for y in labels})


def _labels_changed(output_dir: str | Path, labels: Labeler) -> bool:
    """Whether a person's labels file no longer gives a finished run's meta samples the labels it
    trained with (selection.csv's ``cleaned_label``): a corrected (or deleted) label trains again."""
    if labels.source != "file":
        return False
    path = getattr(labels, "path", None)
    if path is not None and not Path(path).exists():
        raise ConfigError(f"{output_dir} holds a run labelled from {path}, which is gone: put it back (labels.file= "
                          f"if it moved), or delete {output_dir} to start again")
    try:
        sel = pd.read_csv(Path(output_dir) / "selection.csv")
    except (OSError, ValueError):
        return True
    ids = sel["sample_id"].to_numpy(dtype=np.int64)
    return bool(labels.missing(ids).size) or not np.array_equal(labels.labels(ids), sel["cleaned_label"].to_numpy())


PICKS_NAME = "picks.json"


def _write_picks(work_dir: Path, picks: Picks, *, meta: np.ndarray, after: str, timings: dict[str, Any]) -> None:
    """A round's picks, with what they were picked from (the meta set before the round and the
    training run whose snapshots were read), so a rerun reads them back instead of picking again."""
    artifacts.write_json(work_dir / PICKS_NAME, {
        "meta_before": [int(i) for i in meta], "after_run": after, "sample_id": [int(i) for i in picks.sample_id],
        "cluster": [int(c) for c in picks.cluster], "score": [float(v) for v in picks.score],
        "info": picks.info, "timings": dict(timings)})


def _read_picks(work_dir: Path, *, k: int, meta: np.ndarray, after: str) -> tuple[Picks | None, dict[str, Any]]:
    """The picks :func:`_write_picks` left for this round and the stage times of picking them, if
    they were made from this meta set and this training run; else (None, {}) (pick again)."""
    try:
        rec = json.loads((work_dir / PICKS_NAME).read_text())
        if rec["after_run"] != after or rec["meta_before"] != [int(i) for i in meta] or len(rec["sample_id"]) != k:
            return None, {}
        return Picks(np.asarray(rec["sample_id"], dtype=np.int64), np.asarray(rec["cluster"], dtype=np.int64),
                     np.asarray(rec["score"], dtype=np.float64), info=rec["info"]), rec["timings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}


def _await_labels(cfg: ExperimentConfig, out: Path, bundle: Any, missing: np.ndarray, *, ids: np.ndarray,
                  observed: dict[int, int], rnd: int, clusters: Any, scores: Any,
                  cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Write the samples of ``ids`` still ``missing`` a label to ``to_label_round<rnd>.csv``, mark
    the run as waiting, and return what ``jobs.select`` prints (``labels=file``)."""
    keep = np.isin(ids, missing)
    paths = getattr(bundle.train.source, "paths", None)  # ImageFolder data: the image files
    locate = (lambda rows: [paths[int(i)] for i in rows]) if paths is not None else None
    df = to_label_rows(np.asarray(ids)[keep], observed=observed, round_=rnd,
                       cluster=np.asarray(clusters)[keep], score=np.asarray(scores, dtype=float)[keep], locate=locate)
    path = out / TO_LABEL_NAME.format(round=rnd)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_manifest(out, config=cfg_dict, seed=cfg.seed, timings={},  # claims the directory first
                             extra=manifest_extra(cfg, status="awaiting_labels", to_label=str(path), round=rnd))
    artifacts.write_csv(path, df)
    log.info("round %d: %d sample(s) need a clean label: wrote %s; add sample_id,label rows to %s and run the "
             "same command again", rnd, len(df), path, cfg.labels_file)
    return {"status": "awaiting_labels", "round": rnd, "missing": int(len(df)), "to_label": str(path),
            "labels_file": cfg.labels_file}


def _log_run(run: Any, seconds: float) -> None:
    log.info("%s: %.1f s, best validation %.4f at epoch %d (test %.4f)", run.name, seconds, run.best_val_acc,
             run.best_epoch, run.test_acc_at_best)


def _check_picks(picks: Picks, k: int, meta: np.ndarray, bundle: Any) -> None:
    ids = picks.sample_id
    if len(ids) != k or len(np.unique(ids)) != k or np.isin(ids, meta).any():
        raise RuntimeError(f"selector returned {len(ids)} picks ({len(np.unique(ids))} distinct, "
                           f"{int(np.isin(ids, meta).sum())} already meta); expected {k} new distinct samples")
    bundle.train.positions_of(ids)  # raises for unknown ids
