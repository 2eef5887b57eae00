"""One experiment for methods x seeds (x the values of one varied key): runs, table, figures.

Used by ``jobs/compare.py``. Every run is Algorithm 2 (``pipeline.run_experiment``) in its own
``<output_root>/runs/<variant>/<method>/seed<seed>``; all share one Ray session and one Ray Train
storage (``<output_root>/ray_train`` unless ``ray.storage_path`` is set), so methods with the same
seed reuse one warm-up run (named by its fingerprint). A run whose ``metrics.json`` exists is read,
not rerun. After the runs: ``results.json`` / ``results.csv`` (one row per run),
``results.md`` (mean +- std) and the PNGs of :mod:`pivotal_ray.plots`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from .config import CompareConfig, ConfigError, ExperimentConfig, from_dict, to_dict
from .core import artifacts
from .core.locks import RUN_THREAD  # run threads are named "compare[<method> seed <s>]"

_log = logging.getLogger(__name__)

STAGE_TIMES = ("warmup_train_s", "base_train_s", "features_s", "kmeans_s", "select_s", "train_s", "total_s")


@dataclass
class RunSpec:
    method: str
    seed: int
    variant: dict[str, Any]  # {vary_key: value} or {}
    cfg: ExperimentConfig


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"compare.vary_key={dotted!r}: {key!r} is not a config section; "
                              "use a key such as noise.rate or features.num_snapshots")
        node = node[key]
    if leaf not in node:
        raise ConfigError(f"compare.vary_key={dotted!r}: no key {leaf!r} there (known: {sorted(node)})")
    node[leaf] = value


def variant_tag(variant: dict[str, Any]) -> str:
    return "default" if not variant else ",".join(f"{k}={v}" for k, v in variant.items())


def expand(*, base: ExperimentConfig, cc: CompareConfig) -> list[RunSpec]:
    """Every (variant, method, seed) as a validated config with its own output_dir.

    Raises ConfigError for an unknown method (listing the known ones) or a bad ``vary_key``.
    """
    from .selectors import SELECTORS

    unknown = [m for m in cc.methods if m not in SELECTORS]
    if unknown:
        raise ConfigError(f"compare.methods lists unknown method(s) {unknown}: choose from {SELECTORS.names()}")
    if cc.plots:
        check_plot_dependencies()
    root = Path(cc.output_root).resolve()  # type: ignore[arg-type]
    plain = to_dict(base)
    storage = plain["ray"]["storage_path"] or str(root / "ray_train")
    variants = [{}] if cc.vary_key is None else [{cc.vary_key: v} for v in cc.vary_values]
    specs = []
    for variant in variants:
        for method in cc.methods:
            for seed in cc.seeds:
                values = copy.deepcopy(plain)
                for k, v in variant.items():
                    _set(values, k, v)
                values["seed"] = int(seed)
                values["selection"]["method"] = method
                values["output_dir"] = str(root / "runs" / variant_tag(variant) / method / f"seed{seed}")
                values["ray"]["storage_path"] = storage
                specs.append(RunSpec(method, int(seed), dict(variant), from_dict(values)))
    return specs


PLOT_PACKAGES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}  # module -> distribution


def check_plot_dependencies() -> None:
    """ConfigError, before any run, when ``compare.plots`` cannot draw (matplotlib for every
    figure, scikit-learn for the t-SNE): they are not runtime dependencies of the package."""
    import importlib.util

    missing = [dist for mod, dist in PLOT_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"compare.plots=true needs {' and '.join(missing)}, which are not installed: "
                          f"pip install {' '.join(missing)} (or the project's [dev] extra), or set compare.plots=false")


def finished_metrics(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """metrics.json of the completed run in ``cfg.output_dir``, else None (run it).

    Raises OutputDirError (listing the differing settings) when that directory holds a run of a
    different config: its results must not be mixed into this comparison.
    """
    from .pipeline import check_run_dir, completed_metrics

    check_run_dir(cfg)
    return completed_metrics(cfg.output_dir)


def result_row(*, metrics: dict[str, Any], variant: dict[str, Any], boundary_auc: float) -> dict[str, Any]:
    """One results.json row: accuracies in %, AUCs, the best epoch and per-stage wall times (s).

    Stage times summed over rounds: ``features_s``, ``kmeans_s``, ``select_s``, ``train_s``;
    ``warmup_train_s`` (or ``base_train_s``) and ``total_s`` once per run; absent stages are 0.
    """
    times = {k: 0.0 for k in STAGE_TIMES}
    for k, v in metrics.get("timings", {}).items():
        if k in times:
            times[k] += float(v)
    for r in metrics.get("rounds", []):
        for k in ("features_s", "kmeans_s", "select_s", "train_s"):
            times[k] += float(r.get(k, 0.0))
    nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return {"method": metrics["method"], "seed": int(metrics["seed"]), **variant,
            "test_acc_at_best_val": 100 * float(metrics["test_acc_at_best_val"]),
            "final_test_acc": 100 * float(metrics["final_test_acc"]),
            "weight_auc": nan(metrics["weight_auc"]), "boundary_auc": nan(boundary_auc),
            "best_epoch": int(metrics["best_epoch"]), "meta_size": int(metrics.get("meta_size", -1)), **times}


def write_results(*, rows: list[dict[str, Any]], out: str | Path, by: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """results.json (rows), results.csv and results.md (mean +- std per ``by`` group, then per run)."""
    from .report import summary_markdown

    if not rows:
        raise ValueError("write_results needs at least one row")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows).sort_values([*by, "seed"]).reset_index(drop=True)
    artifacts.write_json(out / "results.json", df.to_dict(orient="records"))
    artifacts.write_csv(out / "results.csv", df)
    artifacts.write_text(out / "results.md", summary_markdown(df, by=by))
    return df


# --------------------------------------------------------------------------- per-run analysis


@dataclass
class RunAnalysis:
    """What the figures need from one finished run (train split order)."""

    weights: np.ndarray  # (N,) final per-sample weights
    clean: np.ndarray  # (N,) bool, observed label == true label
    candidate: np.ndarray  # (N,) bool, not a meta sample
    margin: np.ndarray  # (N,) top-1 minus top-2 softmax probability of the final model
    boundary_auc: float


def margins_here(cfg: ExperimentConfig, bundle: Any, snapshot: str, epoch: int) -> np.ndarray:
    """Top-1 minus top-2 softmax probability of every training sample (train order, (N,) float64)
    under the model at ``snapshot``, computed in this process (no Ray needed)."""
    from .core.baselines import predict_probs, top2_margin

    train = bundle.train
    return top2_margin(predict_probs(_load_model(cfg, bundle, snapshot), train, np.arange(len(train)),
                                     batch_size=cfg.features.batch_size))  # (N, C) -> (N,)


def margins_on_ray(cfg: ExperimentConfig, bundle: Any, snapshot: str, epoch: int) -> np.ndarray:
    """:func:`margins_here`'s margins computed on the feature-extraction stage's actors (Ray Data;
    ``ray.extract_gpus`` puts them on GPUs) and kept in the run's ``final_predictions/`` table
    (sample_id, entropy, margin, predicted class of the final model), which a later comparison
    reads back. Needs a connected Ray session (``jobs.compare`` connects before its runs).

    Works in the run's folder under its lock (a comparison beside this one that meets the same
    run waits, then reads the table back); before extracting it checks that every node sees
    ``output_dir`` and that an extraction actor fits a node, as for a method that extracts (a run
    finished earlier, read back, was never checked for that)."""
    from .core import locks
    from .core.baselines import read_predictions
    from .pipeline import _check_per_node, _check_shared_storage
    from .selectors import extract_table

    def check() -> None:  # as pipeline._check_cluster does for a run that extracts (no training here)
        _check_shared_storage(cfg, True)
        if not cfg.ray.autoscaling:  # the cluster grows on demand: the nodes up now say nothing
            _check_per_node(cfg, True, trains=False)

    c, out = to_dict(cfg), os.path.realpath(cfg.output_dir)
    with locks.hold(f"output_dir:{out}", f"output_dir {out}", wait=True, on_wait=_log.info):
        artifacts.remove_temporaries(Path(out))  # what an analysis killed mid-extraction left there
        path = extract_table(c, bundle, [{"path": snapshot, "epoch": int(epoch)}],
                             feature_spec={**c["features"], "kind": "predictions"},
                             out=Path(out) / FINAL_PREDICTIONS, before=check)
        pred = read_predictions(path)
    return pred.margin[pred.at(bundle.train.sample_id)]


FINAL_PREDICTIONS = "final_predictions"  # margins_on_ray's table, in the run's output_dir
RunMargins = Callable[[ExperimentConfig, Any, str, int], np.ndarray]


def analyse_run(*, cfg: ExperimentConfig, metrics: dict[str, Any], bundle: Any, frac: float,
                margins: RunMargins = margins_here) -> RunAnalysis:
    """Final weights and margins of a run; the boundary AUC over its non-meta training samples.
    ``margins(cfg, bundle, snapshot, epoch)`` gives the final model's margins in train order."""
    from . import storage
    from .core.metrics import boundary_auc

    train = bundle.train
    snap = metrics["final_run"]["snapshot"]
    state = storage.torch_load(storage.join(snap, "train_state.pt"), map_location="cpu")
    weights = state["weights"].numpy()
    margin = margins(cfg, bundle, snap, int(state["epoch"]))  # (N,)
    meta = pd.read_csv(Path(cfg.output_dir) / "selection.csv")["sample_id"].to_numpy()
    cand = ~np.isin(train.sample_id, meta)
    clean = train.y_obs == train.y_true
    b = boundary_auc(weights[cand], clean[cand], margin[cand], frac=frac)
    return RunAnalysis(weights, clean, cand, margin, b)


def _load_model(cfg: ExperimentConfig, bundle: Any, snapshot: str) -> Any:
    from . import storage
    from .core.models import build_model

    model = build_model(to_dict(cfg)["model"], bundle.num_classes, bundle.input_shape)
    model.load_state_dict(storage.torch_load(storage.join(snapshot, "model.pt"), map_location="cpu"))
    return model.eval()


# --------------------------------------------------------------------------- orchestration


def run_compare(*, base: ExperimentConfig, cc: CompareConfig,
                run: Callable[[ExperimentConfig], dict[str, Any]] | None = None,
                log: Callable[[str], None] = print,
                before_runs: Callable[[], None] | None = None,
                check: Callable[..., None] | None = None,
                margins: RunMargins = margins_here) -> pd.DataFrame:
    """Run (or read) every spec, write the results and the figures; returns the results table.

    Every spec is validated first (``pipeline.validate``: its settings, its data, its run
    directory), so a bad one is refused before any run trains; then ``before_runs`` is called
    (``jobs.compare`` connects to Ray there), then ``check(cfg, bundle)`` for every spec that has
    not finished (``jobs.compare``: the checks against the cluster's CPUs, GPUs and memory), with
    ``runs_at_once=n`` where n > 1 runs share the cluster, and the specs run in order: one at a time, or
    ``compare.concurrency`` at a time (:func:`run_concurrently`), the tables and figures following
    once every run has ended. ``margins`` computes each run's final-model margins for the boundary
    AUC: in this process by default, on the extraction stage's actors with :func:`margins_on_ray`
    (``jobs.compare``).
    """
    from .core.data import build_data
    from .pipeline import run_experiment, validate

    # a run another invocation is at work on (an overlapping comparison) is waited for, then read back
    run = run or (lambda cfg: run_experiment(cfg, wait=True))
    if base.labels.source != "oracle":
        raise ConfigError(f"labels.source={base.labels.source!r}: jobs.compare runs experiments, whose meta samples "
                          "the oracle labels; label the picks of one run by hand with python -m jobs.select "
                          "labels=file")
    specs = expand(base=base, cc=cc)
    root = Path(cc.output_root).resolve()  # type: ignore[arg-type]
    artifacts.check_writable(root, "compare.output_root")
    if (root / artifacts.MANIFEST_NAME).exists():  # a comparison writes none there: its runs have theirs
        raise ConfigError(f"compare.output_root={root} is the output_dir of a single run (it holds that run's "
                          f"{artifacts.MANIFEST_NAME}): a comparison would write its results among that run's files "
                          "and read its ray_train storage; choose another compare.output_root (a new or empty folder, "
                          "or one an earlier comparison wrote)")
    for spec in specs:
        with _in_compare_terms():
            validate(spec.cfg)
    with _holding_root(root, log):  # not a temporary that a comparison beside this one is writing
        artifacts.remove_temporaries(root)  # results.* cut off by a killed compare (each run cleans its own folder)
    if before_runs is not None:
        before_runs()

    def data_key(cfg: ExperimentConfig) -> str:
        return artifacts.config_fingerprint({"d": to_dict(cfg.data), "n": to_dict(cfg.noise), "s": cfg.seed})

    with _in_compare_terms():  # read once: a spec's run never finishes another's
        finished = [finished_metrics(spec.cfg) for spec in specs]
    if check is not None:  # grouped by data: one bundle built at a time
        todo = [s.cfg for s, m in zip(specs, finished) if m is None]
        at_once = max(1, min(cc.concurrency, len(todo)))
        for key in dict.fromkeys(data_key(c) for c in todo):
            group = [c for c in todo if data_key(c) == key]
            bundle = build_data(group[0].data, group[0].noise, group[0].seed)
            for c in group:  # runs_at_once only where several runs share the cluster
                check(c, bundle, **({"runs_at_once": at_once} if at_once > 1 else {}))
            del bundle
    ran: set[int] = set()
    if cc.concurrency > 1:  # every unfinished run first, several at a time; then the analysis in order
        todo = [i for i, m in enumerate(finished) if m is None]
        results = run_concurrently([specs[i] for i in todo], run=run, limit=cc.concurrency, log=log)
        for i, metrics in zip(todo, results):
            finished[i] = metrics
        ran = set(todo)
    rows, done = [], []
    bundles: dict[str, Any] = {}
    for i, (spec, metrics) in enumerate(zip(specs, finished), 1):
        status = "ran" if i - 1 in ran else "read"
        if metrics is None:
            with _in_compare_terms():  # its folder is checked again once it is this comparison's
                metrics, status = run(spec.cfg), "ran"
        key = data_key(spec.cfg)
        if key not in bundles:
            bundles = {key: build_data(spec.cfg.data, spec.cfg.noise, spec.cfg.seed)}  # keep one at a time
        analysis = analyse_run(cfg=spec.cfg, metrics=metrics, bundle=bundles[key], frac=cc.boundary_frac,
                               margins=margins)
        rows.append(result_row(metrics=metrics, variant=spec.variant, boundary_auc=analysis.boundary_auc))
        done.append((spec, analysis))
        log(f"[{i}/{len(specs)}] {status} {spec.method} seed {spec.seed} {variant_tag(spec.variant)}: "
            f"test acc {rows[-1]['test_acc_at_best_val']:.2f}%, weight AUC {rows[-1]['weight_auc']:.3f}")
    by = ("method",) if cc.vary_key is None else (cc.vary_key, "method")
    with _holding_root(root, log):  # two comparisons on one root: one writes its tables and figures at a time
        df = write_results(rows=rows, out=root, by=by)
        if cc.plots:
            from .compare_figures import draw_figures

            for path in draw_figures(done=done, df=df, cc=cc, root=root):
                log(f"figure: {path}")
    return df


def describe(spec: RunSpec) -> str:
    tag = variant_tag(spec.variant)
    return f"{spec.method} seed {spec.seed}" + ("" if tag == "default" else f" {tag}")


def run_concurrently(specs: list[RunSpec], *, run: Callable[[ExperimentConfig], dict[str, Any]], limit: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``run(spec.cfg)`` for every spec, up to ``limit`` at a time, each in its own thread of this
    driver (they share its Ray session); returns their results in the order of ``specs``.

    Started in order: consecutive specs are one method's seeds, whose warm-ups differ, so the
    first runs train different warm-ups side by side; a run that needs a warm-up another is
    training waits for it (its lock) and reads it back. Ray queues what the cluster cannot hold
    yet. The lines the pipeline logs for a run start with ``[<method> seed <s>]``. After a run fails no other
    starts; those in flight finish (a finished run is read back by the next invocation), then the
    first failure is raised and every failure named. Ctrl-C leaves Ray at once
    (``pipeline.leave_ray``), which ends every run's actors; the threads are daemons, so the
    process does not wait for them.
    """
    import queue
    import threading

    from . import pipeline

    results: list[dict[str, Any] | None] = [None] * len(specs)
    ended: queue.Queue = queue.Queue()
    failures: list[tuple[RunSpec, BaseException]] = []

    def work(i: int) -> None:
        try:
            with _in_compare_terms():
                ended.put((i, run(specs[i].cfg), None))
        except BaseException as err:  # noqa: BLE001 -- handed to the calling thread
            ended.put((i, None, err))

    started = running = 0
    try:
        with _labelled_run_lines():
            while started < len(specs) or running:
                while running < limit and started < len(specs) and not failures:
                    threading.Thread(target=work, args=(started,), daemon=True,
                                     name=f"{RUN_THREAD}[{describe(specs[started])}]").start()
                    started, running = started + 1, running + 1
                    log(f"started {describe(specs[started - 1])} ({running} running, {len(specs) - started} waiting)")
                if not running:
                    break
                while True:
                    try:
                        i, metrics, err = ended.get(timeout=0.5)  # short waits: this thread takes a Ctrl-C between them
                        break
                    except queue.Empty:
                        continue
                running -= 1
                if err is None:
                    results[i] = metrics
                    log(f"finished {describe(specs[i])} ({running} running)")
                else:
                    failures.append((specs[i], err))
                    first = (str(err).strip().splitlines() or [""])[0][:300]
                    log(f"{describe(specs[i])} failed: {type(err).__name__}: {first}" +
                        (f"; no other run starts, waiting for the {running} in flight" if running else ""))
    except KeyboardInterrupt:
        pipeline.leave_ray()
        raise
    if failures:
        if len(failures) > 1:
            log(f"{len(failures)} runs failed ({', '.join(describe(s) for s, _ in failures)}); raising the first")
        raise failures[0][1]
    return results  # type: ignore[return-value]


class _RunLabel(logging.Filter):
    """Prefixes a record logged from a run thread with that thread's ``[<method> seed <s>]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.threadName or ""
        if name.startswith(RUN_THREAD + "[") and not getattr(record, "run_label", None):
            record.run_label = name[len(RUN_THREAD):]
            record.msg = f"{record.run_label} {record.msg}"
        return True


@contextlib.contextmanager
def _labelled_run_lines() -> Iterator[None]:
    """While runs share the driver, the root logger's handlers label each line with its run."""
    handlers, label = list(logging.getLogger().handlers), _RunLabel()
    for h in handlers:
        h.addFilter(label)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(label)


@contextlib.contextmanager
def _in_compare_terms() -> Iterator[None]:
    """A run folder's refusal, with the fix in jobs.compare's settings: the folder is
    <compare.output_root>/runs/..., so another output_dir means another compare.output_root."""
    try:
        yield
    except ConfigError as err:  # OutputDirError, or check_writable's refusal of a run folder
        if "choose another output_dir" not in str(err):
            raise
        raise type(err)(str(err).replace("choose another output_dir", "choose another compare.output_root")) from err


def _holding_root(root: Path, log: Callable[[str], None]) -> Any:
    """The lock of an output root's own files (results.*, figures): comparisons on one root may
    run side by side (their runs wait for each other where they overlap), and write those in turn."""
    from .core import locks

    return locks.hold(f"compare_root:{root}", f"compare.output_root {root}", wait=True, on_wait=log)  # root: resolved
