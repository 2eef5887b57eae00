"""Meta re-weighting in Ray Train: a data-parallel ``TorchTrainer`` loop with snapshots.

Every worker rebuilds the same data bundle and model from plain dicts, walks the same seeded
global batch order, and takes its contiguous slice of each global batch; the re-weighting step
all-reduces ``g``/``v`` and all-gathers the updated weights, so W workers compute what one
process computes on the union batch (spec section 2, "Data parallel") -- exactly so for a model
without BatchNorm; with BatchNorm each worker's batch statistics come from its own slice (as DDP
without SyncBatchNorm), and the running statistics are averaged across workers at the end of
every epoch, before the evaluation and the checkpoint.

Each checkpoint (every ``snapshot_every`` epochs, and the last) is a snapshot: ``model.pt``,
``train_state.pt`` (optimizer, scheduler and re-weighter state, per-sample weights, epoch,
history), ``metrics.json`` (the epoch's metrics and the two .pt files' sizes) and
``history.json`` (every epoch's metrics so far); docs/architecture.md has the contract.
Re-running with the same ``RunConfig(name, storage_path)`` resumes from the last one.

Two options serve the fine-tune baseline: ``train_ids`` restricts the epochs to a subset of the
training split (the meta set alone), and ``init_from`` starts from another run's snapshot (its
model only: optimizer, scheduler and weights start fresh).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import locks
from ..core.data import build_data
from ..core.models import build_model
from ..core.reweight import LocalReducer, TorchDistReducer, average_buffers_, build_reweighter
from ..core.seeding import derive_seed, deterministic_kernels, numpy_rng, tf32_in_use, torch_generator
from .. import storage

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """What the pipeline needs from a finished training run."""

    name: str
    path: str
    snapshots: list[dict[str, Any]]  # {"path", "epoch", "val_acc", "test_acc", "train_loss"} per checkpoint, by epoch
    best_epoch: int
    best_val_acc: float
    test_acc_at_best: float
    final_test_acc: float
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def snapshot(self, epoch: int) -> dict[str, Any]:
        for s in self.snapshots:
            if s["epoch"] == epoch:
                return s
        raise KeyError(f"no snapshot for epoch {epoch} in run {self.name}")

    @property
    def epochs_s(self) -> float:
        """Seconds spent in this run's epochs (training and evaluation, from its history), whichever
        invocation trained them; ``wall_s`` is only this call's (near 0 when the run is read back)."""
        return float(sum(h.get("epoch_s", 0.0) for h in self.extra.get("history", [])))

    def final_weights(self) -> torch.Tensor:
        """(N_train,) per-sample weights of the last snapshot."""
        # map to the CPU: the driver reading it may have no GPU (the optimizer state in the file
        # stays on the device it was trained on)
        return storage.torch_load(storage.join(self.snapshots[-1]["path"], "train_state.pt"),
                                  map_location="cpu")["weights"]


def _evaluate(model: torch.nn.Module, split, positions: np.ndarray, device: torch.device, batch: int,
              reducer) -> float:
    """Accuracy over ``positions`` sharded across workers (counts summed over workers)."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for s in range(0, len(positions), batch):
            pos = positions[s : s + batch]
            x = split.inputs(pos).to(device)
            y = torch.as_tensor(split.y_true[pos], device=device)
            correct[0] += (model(x).argmax(1) == y).sum()
            correct[1] += len(pos)
    model.train()
    reducer.sum_(correct)
    return float(correct[0] / correct[1].clamp(min=1))


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function (runs inside Ray Train workers)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(math.floor(config["cpus_per_worker"]))))
    if config.get("deterministic"):  # before any GPU work of this process (cuBLAS reads its setting once)
        deterministic_kernels()
    if ray.get_gpu_ids() and not torch.cuda.is_available():  # never train on the CPU silently
        raise RuntimeError(f"Ray gave this Train worker GPU {ray.get_gpu_ids()} but torch cannot use it "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): install a torch build "
                           "that the node's NVIDIA driver supports, or set ray.use_gpu=false")
    device = ray.train.torch.get_device()
    reducer = TorchDistReducer() if world > 1 else LocalReducer()
    seed, tag, rw = int(config["seed"]), config["run_tag"], config["reweight"]

    bundle = build_data(config["data"], config["noise"], seed)
    train = bundle.train
    n = len(train)
    labels = torch.as_tensor(train.y_obs, dtype=torch.long).clone()
    meta_pos = train.positions_of(np.asarray(config["meta_ids"], dtype=np.int64))
    labels[meta_pos] = torch.as_tensor(np.asarray(config["meta_labels"], dtype=np.int64))  # cleaned labels
    labels = labels.to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model_init"))  # the same initial model on every worker and run
        model = build_model(config["model"], bundle.num_classes, bundle.input_shape)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=rw["lr"], momentum=rw["momentum"], weight_decay=rw["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=rw["lr_milestones"], gamma=rw["lr_gamma"])
    reweighter = build_reweighter(rw["mode"], meta_lr=rw["meta_lr"], seed=seed, num_classes=bundle.num_classes,
                                  meta_class_balanced=rw.get("meta_class_balanced", False))
    weights = torch.full((n,), float(rw["init_weight"]), dtype=torch.float32, device=device)
    start_epoch, history = 0, []
    stage = checkpoint_stage(config.get("stage", tag))
    if rank == 0:  # only rank 0 writes checkpoints: what a killed run left unuploaded is garbage now
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True, exist_ok=True)

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("init_from"):
        model.load_state_dict(storage.torch_load(storage.join(config["init_from"], "model.pt"), map_location=device))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / "model.pt", map_location=device, weights_only=True))
            state = torch.load(Path(d) / "train_state.pt", map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        reweighter.load_state_dict(state["reweighter"])
        weights = state["weights"].to(device)
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1

    val_pos, test_pos = (np.array_split(np.arange(len(s)), world)[rank] for s in (bundle.val, bundle.test))
    B, epochs = int(rw["batch_size"]), int(rw["epochs"])
    eval_batch = int(rw.get("eval_batch_size", 2048))  # (a config from before the setting: its value then)
    needs_meta = getattr(reweighter, "needs_meta", True)
    # the meta set's inputs, read once per run on the device (never augmented: the same rows every
    # step; image-file sources decoded their JPEGs on every step before)
    meta_x = train.inputs(meta_pos).to(device) if needs_meta else None
    meta_y = labels[meta_pos]
    # what trained (the driver's manifest describes the driver's machine, on a cluster a CPU head)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tf32 = tf32_in_use(device)  # read after ray.deterministic applied (above): None on a CPU
    subset = None if config.get("train_ids") is None else train.positions_of(
        np.asarray(config["train_ids"], dtype=np.int64))
    n_epoch = n if subset is None else len(subset)  # samples walked per epoch
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        order = numpy_rng(seed, tag, "epoch", epoch).permutation(n_epoch)
        if subset is not None:
            order = subset[order]
        # one stream per epoch on every worker: each global batch draws one base seed (one call
        # per batch on every rank) and a sample's crop depends on (base, sample_id) only, so W
        # workers augment their slices as one process augments the whole batch
        aug_gen = torch_generator(seed, tag, "augment", epoch)
        meta_gen = numpy_rng(seed, tag, "meta", epoch)
        total_loss = 0.0
        for b0 in range(0, n_epoch, B):
            gidx = order[b0 : b0 + B]
            parts = np.array_split(gidx, world)
            lidx = parts[rank]
            x = train.inputs(lidx, augment=rw["augment"], generator=aug_gen).to(device)
            xm = ym = None
            if needs_meta:
                xm, ym = meta_x, meta_y
                if len(meta_pos) > rw["meta_batch_size"]:  # a subset, in sample-position order
                    drawn = meta_gen.choice(len(meta_pos), rw["meta_batch_size"], replace=False)
                    rows = torch.as_tensor(drawn[np.argsort(meta_pos[drawn], kind="stable")], device=device)
                    xm, ym = meta_x[rows], meta_y[rows]
            out = reweighter.step(model=model, optimizer=opt, x=x, y=labels[lidx], w=weights[lidx],
                                  x_meta=xm, y_meta=ym, lr=opt.param_groups[0]["lr"],
                                  global_batch=len(gidx), reducer=reducer)
            weights[torch.as_tensor(gidx, device=device)] = reducer.gather(out.weights.float(),
                                                                          [len(p) for p in parts])
            total_loss += out.loss
        sched.step()
        total_loss = float(reducer.sum_(torch.tensor([total_loss], dtype=torch.float64, device=device))[0])
        # BatchNorm running statistics come from each worker's own slices: average them, so the
        # workers evaluate (each its shard of val/test) the one model rank 0 saves
        average_buffers_(model, reducer)
        val_acc = _evaluate(model, bundle.val, val_pos, device, eval_batch, reducer)
        test_acc = _evaluate(model, bundle.test, test_pos, device, eval_batch, reducer)
        metrics = {"epoch": epoch, "val_acc": val_acc, "test_acc": test_acc,
                   "train_loss": total_loss / max(1, math.ceil(n_epoch / B)),
                   "mean_weight": float(weights.mean()), "epoch_s": time.perf_counter() - t0,
                   # ray.deterministic as this worker applied it (core.seeding.deterministic_kernels): the
                   # mode was on; an op without a deterministic kernel still ran (a warning in its log)
                   "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                   "device": device_name,  # "cpu", or the GPU's name
                   "tf32": tf32}  # GPU: {"conv", "matmul"} rounding through TF32 or not
        history.append(metrics)  # every epoch, so best-validation is exact even between snapshots
        if rank == 0:  # progress line: the worker log, and the driver / `ray job logs` when ray.log_to_driver
            print(f"[{tag}] epoch {epoch + 1}/{epochs}: val {val_acc:.4f} test {test_acc:.4f} "
                  f"loss {metrics['train_loss']:.4f} ({metrics['epoch_s']:.1f} s)", flush=True)
        if (epoch + 1) % int(rw["snapshot_every"]) == 0 or epoch == epochs - 1:
            checkpoint = None
            if rank == 0:
                tmp = Path(tempfile.mkdtemp(prefix="ckpt_", dir=stage))  # Ray deletes it after the upload
                torch.save(model.state_dict(), tmp / "model.pt")
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "reweighter": reweighter.state_dict(), "weights": weights.cpu(), "epoch": epoch,
                            "history": history}, tmp / "train_state.pt")
                # the .pt files' sizes, so a reader can tell a file cut off mid-upload from a whole one
                sizes = {f: (tmp / f).stat().st_size for f in PT_FILES}
                # saved_at (UTC seconds): which of two copies of an epoch is the later, whatever the
                # local-time names Ray gives checkpoint folders (a clock change, another node's zone)
                (tmp / "metrics.json").write_text(json.dumps({**metrics, "file_sizes": sizes,
                                                              "saved_at": time.time()}))
                (tmp / "history.json").write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
            # ASYNC: a synchronous report is a ~2 s barrier; the upload runs in the background
            # and fit() waits for every pending upload before it returns
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=checkpoint is not None)


PT_FILES = ("model.pt", "train_state.pt")
SNAPSHOT_FILES = (*PT_FILES, "metrics.json", "history.json")  # what a checkpoint holds


def _scan_snapshots(run_path: str) -> list[dict[str, Any]]:
    """Every persisted snapshot of a run (local path or storage URI), one per epoch, by epoch."""
    by_epoch: dict[int, tuple[tuple[bool, float, int], dict[str, Any]]] = {}
    for i, d in enumerate(storage.list_dirs(run_path, prefix="checkpoint_")):
        # skip an upload still in flight (or cut off): Ray does not promise the files' order, and a
        # file cut off mid-copy exists. The JSON files are parsed; the .pt files must have the sizes
        # that metrics.json records (checkpoints written before it recorded them are taken as they are)
        present = storage.file_sizes(d)  # one listing: which files are there, and their sizes
        if not all(f in present for f in SNAPSHOT_FILES):
            continue
        try:
            metrics = storage.read_json(storage.join(d, "metrics.json"))
            storage.read_json(storage.join(d, "history.json"))
        except ValueError:
            continue
        sizes = metrics.pop("file_sizes", None)
        if sizes is not None and any(present.get(f) != n for f, n in sizes.items()):
            continue
        # an epoch saved twice (a run killed after an upload but before Ray recorded it resumes from
        # the checkpoint before and saves that epoch again): the later copy, by the UTC time it was
        # saved; copies written before that was recorded count as earlier, and among them the folder
        # name (Ray's local time of the save) decides
        saved_at = metrics.pop("saved_at", None)
        order = (saved_at is not None, float(saved_at or 0.0), i)
        epoch = int(metrics["epoch"])
        if epoch not in by_epoch or order > by_epoch[epoch][0]:
            by_epoch[epoch] = (order, {"path": d, **metrics})
    return [by_epoch[e][1] for e in sorted(by_epoch)]


def stage_key(name: str, run_path: str) -> str:
    """The run's staging folder name: its name and where it is stored (two stores, two folders)."""
    return f"{name}-{hashlib.sha256(run_path.encode()).hexdigest()[:8]}"


def checkpoint_stage(key: str) -> Path:
    """Where rank 0 writes a run's checkpoints before Ray uploads (and deletes) them: one folder per
    run and OS user in the temp dir of rank 0's node, emptied when the run starts there, so the
    copies a killed run never uploaded do not pile up (a model and its optimizer state each; on a
    cluster, the folder on the node rank 0 ran on before is emptied when rank 0 lands there again)."""
    return Path(tempfile.gettempdir()) / f"pivotal_ray_checkpoints-{os.getuid()}" / key


def _fit(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread, so Ctrl-C reaches this program as KeyboardInterrupt.

    On the main thread Ray Train installs a SIGINT handler of its own and never removes it: a
    Ctrl-C during training aborted the run but surfaced as a RayActorError, and one after it (during
    extraction or K-means) was swallowed, the third calling sys.exit(0) (exit status 0, no results).
    Off the main thread Ray installs none (as under Ray Tune). On a Ctrl-C this process leaves Ray
    (ray.shutdown), which ends the run's controller and workers (they are this driver's actors)
    rather than leaving them training behind a caller that catches the KeyboardInterrupt.
    """
    import ray

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 -- re-raised on the calling thread
            box["error"] = err

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    try:
        thread.start()  # inside: start() waits for the thread to run, and a Ctrl-C can land meanwhile
        while thread.is_alive():
            thread.join(0.5)  # short waits: the main thread takes the KeyboardInterrupt between them
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_training(*, name: str, storage_path: str, data: dict, noise: dict, model: dict, reweight: dict,
                 seed: int, meta_ids: np.ndarray, meta_labels: np.ndarray, num_workers: int = 1,
                 use_gpu: bool = False, cpus_per_worker: float = 1.0, run_tag: str = "train",
                 train_ids: np.ndarray | None = None, init_from: str | None = None,
                 max_failures: int = 0, deterministic: bool = False) -> TrainRun:
    """Train (or resume) one meta re-weighting run with Ray Train and return its snapshots.

    ``name`` + ``storage_path`` identify the run: calling again with the same pair resumes from the
    last checkpoint, and returns at once when the run had finished. The batch order depends only
    on ``seed`` and ``run_tag`` (not on the name), so identical configs give identical runs (on CPUs;
    on GPUs cuDNN's and atomics' float order may differ: docs/architecture.md).
    ``train_ids`` (sample ids) restricts training to those samples; ``init_from`` (a snapshot
    path) starts from that snapshot's model instead of the seeded initialisation. ``max_failures``
    (``ray.max_failures``): how often Ray Train restarts the run within this call after a worker
    fails, from its last checkpoint (-1: no limit); 0 raises at once (the caller resumes later).
    ``deterministic`` (``ray.deterministic``): the workers pick deterministic GPU kernels
    (:func:`core.seeding.deterministic_kernels`).
    """
    t0 = time.perf_counter()
    run_path = storage.join(storage_path, name)
    key = run_path if "://" in run_path else os.path.realpath(run_path)
    # one trainer per run on this machine: two comparisons sharing a warm-up would train it into one
    # run twice (and empty each other's checkpoint staging); the second waits and reads it back
    with locks.hold(f"train:{key}", f"training run {name} ({run_path})", wait=True, on_wait=log.info):
        return _train_or_read(name=name, run_path=run_path, storage_path=storage_path, data=data, noise=noise,
                              model=model, reweight=reweight, seed=seed, meta_ids=meta_ids, meta_labels=meta_labels,
                              num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                              run_tag=run_tag, train_ids=train_ids, init_from=init_from, max_failures=max_failures,
                              deterministic=deterministic, t0=t0)


def _train_or_read(*, name: str, run_path: str, storage_path: str, data: dict, noise: dict, model: dict,
                   reweight: dict, seed: int, meta_ids: np.ndarray, meta_labels: np.ndarray, num_workers: int,
                   use_gpu: bool, cpus_per_worker: float, run_tag: str, train_ids: np.ndarray | None,
                   init_from: str | None, max_failures: int, deterministic: bool, t0: float) -> TrainRun:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    done = _scan_snapshots(run_path)
    if not (done and done[-1]["epoch"] == int(reweight["epochs"]) - 1):
        if done:  # Ray Train resumes from the last checkpoint it recorded, which can lag the files
            log.info("training run %s: resuming after epoch %d of %d, its last snapshot on disk (Ray Train goes on "
                     "from the last one it recorded, which a killed run can leave a few epochs earlier: those are "
                     "trained again, to the same result)", name, done[-1]["epoch"] + 1, int(reweight["epochs"]))
        config = {"data": data, "noise": noise, "model": model, "reweight": reweight, "seed": int(seed),
                  "meta_ids": [int(i) for i in meta_ids], "meta_labels": [int(v) for v in meta_labels],
                  "cpus_per_worker": float(cpus_per_worker), "run_tag": run_tag,
                  "stage": stage_key(name, run_path),
                  "train_ids": None if train_ids is None else [int(i) for i in train_ids],
                  "init_from": None if init_from is None else str(init_from), "deterministic": bool(deterministic)}
        resources = {"CPU": float(cpus_per_worker)}
        if use_gpu:
            resources["GPU"] = 1.0
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=str(storage_path),
                                 checkpoint_config=CheckpointConfig(num_to_keep=None),
                                 failure_config=FailureConfig(max_failures=int(max_failures))),
        )
        try:
            result = _fit(trainer)
        except Exception as err:
            # raised in the controller's constructor: the driver sees it inside an ActorDiedError
            if "CheckpointManagerInitializationError" in f"{type(err).__name__} {err}":
                record = storage.join(run_path, "checkpoint_manager_snapshot.json")
                why = str(err).strip().splitlines()[-1]  # the cause's line, not the actor's traceback
                cause = ("Ray's reason above: another Ray version wrote it (use that version), or it names a "
                         "checkpoint folder that is gone")
                try:
                    storage.read_json(record)
                except ValueError:  # Ray rewrites it in place after every snapshot
                    cause = "the file is cut off: a run killed while Ray rewrote it, as it does after every snapshot"
                except OSError:  # unreadable here: Ray's reason stands alone
                    pass
                raise RuntimeError(
                    f"Ray Train cannot resume training run {name}: its record of the run's checkpoints, {record}, "
                    f"cannot be used ({why}); {cause}. Delete it to train this run again from its first epoch "
                    f"(its snapshots are written anew), or delete {run_path}") from err
            raise
        if result.error is not None:
            raise result.error
        with contextlib.suppress(OSError):  # empty now, where rank 0 ran on this node; else left as is
            checkpoint_stage(config["stage"]).rmdir()
    snaps = _scan_snapshots(run_path)
    if not snaps:
        raise RuntimeError(f"training run {name} at {run_path} produced no checkpoints")
    history = storage.read_json(storage.join(snaps[-1]["path"], "history.json"))
    best = max(history, key=lambda s: (s["val_acc"], -s["epoch"]))  # earliest epoch among ties
    return TrainRun(name=name, path=run_path, snapshots=snaps, best_epoch=int(best["epoch"]),
                    best_val_acc=float(best["val_acc"]), test_acc_at_best=float(best["test_acc"]),
                    final_test_acc=float(history[-1]["test_acc"]), wall_s=time.perf_counter() - t0,
                    extra={"history": history})
