"""Select pivotal meta samples and train with meta re-weighting (the paper's Algorithm 2).

Local (starts a local Ray when no cluster address is given)::

    python -m jobs.select                          # toy set of Figure 1, method=rbc, seed 0
    python -m jobs.select method=random seed=1     # the random baseline, same warm-up
    python -m jobs.select experiment=mnist_adv60   # Table 1 MNIST column, method=rbc

On a running cluster (``output_dir`` must be an absolute path on the head node or a mounted
shared volume, ``data.root`` one present on every node, the training workers read the data
too: the job runs from a temporary copy of the working dir, where the default ``data.root``
does not exist; checkpoints may go to a storage URI through ``ray.storage_path``)::

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.select experiment=mnist_adv60 data.root=/abs/path/to/data output_dir=/abs/path/out

Prints the picked samples and the test accuracy at the best-validation epoch, and writes
``selection.csv``, ``metrics.json`` and ``manifest.json`` under ``output_dir``.

With ``labels=file`` a person labels the meta samples instead of the oracle: each run stops
where samples need a label, writes them to ``<output_dir>/to_label_round<r>.csv`` and says
so; add ``sample_id,label`` rows to ``<output_dir>/labels.csv`` (or ``labels.file=``) and run
the same command again.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pivotal_ray.config import ConfigError, from_dict

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def resolve_config(cfg: DictConfig):
    """DictConfig -> validated ExperimentConfig with absolute paths (they cross into Ray workers)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("method", None)  # already interpolated into selection.method
    values.pop("compare", None)  # jobs.compare's own settings (CompareConfig)
    if values.get("output_dir") in (None, ""):
        raise ConfigError("output_dir is not set: output_dir=/abs/path (where selection.csv, metrics.json and "
                          "manifest.json go)")
    out = os.path.expanduser(str(values["output_dir"]))  # a quoted ~ reaches us as it is
    if "://" in out:
        raise ConfigError(f"output_dir={out!r} is a storage URI, but the run's artefacts (selection.csv, "
                          "metrics.json, features) are written to a filesystem: pass an absolute path on the "
                          "head node or a mounted shared volume, and put checkpoints on the URI with "
                          "ray.storage_path=<uri>")
    values["output_dir"] = os.path.abspath(out)
    for section, key in (("data", "root"), ("labels", "file"), ("noise", "file")):  # URIs: refused by the configs
        group = values.get(section) or {}
        if group.get(key) and "://" not in str(group[key]):
            group[key] = os.path.abspath(os.path.expanduser(str(group[key])))
    ray_cfg = values.get("ray") or {}
    if isinstance(ray_cfg.get("storage_path"), str) and ray_cfg["storage_path"].startswith("~"):
        ray_cfg["storage_path"] = os.path.expanduser(ray_cfg["storage_path"])  # a relative one is refused
    return from_dict(values)


def rerun_command() -> str:
    """The command that runs this job again, as a shell reads it. Under ``ray job submit`` (Ray
    sets RAY_JOB_CONFIG_JSON_ENV_VAR in a submitted job) it is submitted again; run here, it is
    the interpreter that runs this one, by name where ``python`` on PATH is that one."""
    args = shlex.join(["-m", "jobs.select", *sys.argv[1:]])
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return f"ray job submit <the same options> -- python {args}"
    on_path = shutil.which("python")
    python = "python" if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable) else sys.executable
    return f"{shlex.quote(python)} {args}"


def exit_if_worker_lost(err: BaseException) -> None:
    """A Ray worker process or node lost mid-run (killed, out of memory, a node reclaimed): say so
    and how to go on, and exit with status 3; any other error is left to the caller to raise."""
    from pivotal_ray.distributed.failures import lost_worker_message, worker_lost

    lost = worker_lost(err)
    if lost is not None:
        print(f"error: {lost_worker_message(lost)}", file=sys.stderr)
        sys.exit(3)


# SIGTERM received (ray job stop, timeout, Kubernetes, Slurm): the handler raises KeyboardInterrupt,
# so every path that ends Ray after a Ctrl-C ends it after a SIGTERM too, and records the signal
# here, since Ray turns an interrupted wait into a KeyboardInterrupt of its own
_TERMINATED: list[int] = []
_GO_ON = ("run the same command again to go on (finished stages are read back, training resumes from its last "
          "snapshot)")


def _on_sigterm(signum: int, frame: object) -> None:
    if not _TERMINATED:  # said at once: `ray job stop` sends SIGKILL a few seconds later (RAY_JOB_STOP_WAIT_TIME_S)
        print(f"terminated (SIGTERM): {_GO_ON}", file=sys.stderr, flush=True)
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def exit_interrupted() -> None:
    """After Ctrl-C or SIGTERM: say how to go on (said already for SIGTERM) and exit with status
    128 + the signal (130, 143)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not break Ray's shutdown at exit
        signal.signal(sig, signal.SIG_IGN)
    if not _TERMINATED:
        print(f"interrupted: {_GO_ON}", file=sys.stderr)
    sys.exit(128 + (signal.SIGTERM if _TERMINATED else signal.SIGINT))


@contextmanager
def exit_status():
    """A job's exit status: 2 with the message for bad input (ConfigError), 130 after Ctrl-C and
    143 after SIGTERM (both stop the job the same way: Ray ended, the same command goes on), 3 for
    a lost Ray worker; any other error is raised as it is (Hydra prints its traceback)."""
    main = threading.current_thread() is threading.main_thread()
    _TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None  # kept over ray.init (pipeline._ray_init)
    interrupted = False
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        interrupted = True
        exit_interrupted()
    except Exception as err:
        exit_if_worker_lost(err)
        raise
    finally:  # the caller's handler again; after an interrupt both stay ignored while Ray shuts down
        if main and previous is not None and not interrupted:
            signal.signal(signal.SIGTERM, previous)


@hydra.main(config_path=CONFIGS, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from pivotal_ray.pipeline import run_experiment

    with exit_status():
        exp = resolve_config(cfg)
        metrics = run_experiment(exp)
    if metrics.get("status") == "awaiting_labels":
        print(f"waiting for labels: {metrics['missing']} sample(s) of round {metrics['round']} need a clean label")
        print(Path(metrics["to_label"]).read_text().rstrip())
        print(f"label them: fill in the 'label' column of {metrics['to_label']} and add its rows to "
              f"{metrics['labels_file']} (a CSV with 'sample_id' and 'label' columns, other columns ignored: "
              "a copy of the filled-in to_label_round0.csv can be it, with later rounds' rows appended without "
              "their header), then run this same command again:")
        print(f"  {rerun_command()}")
        return
    sel = Path(exp.output_dir) / "selection.csv"
    print(f"picks ({exp.selection.method}, seed {exp.seed}):")
    print(sel.read_text().rstrip())
    print(f"test accuracy at best validation epoch {metrics['best_epoch']}: "
          f"{100 * metrics['test_acc_at_best_val']:.2f}%  (final epoch {100 * metrics['final_test_acc']:.2f}%, "
          f"weight AUC {metrics['weight_auc']:.3f})")
    print(f"outputs: {exp.output_dir}")


if __name__ == "__main__":
    main()
