"""Meta re-weighting in Ray Train: data-parallel equivalence, snapshots and resume."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch

from pivotal_ray.config import DataConfig, ModelConfig, NoiseConfig, ReweightConfig, to_dict
from pivotal_ray.core.data import build_data
from pivotal_ray.distributed.train import checkpoint_stage, run_training, stage_key

from .procs import processes

pytestmark = pytest.mark.integration

DATA, NOISE, MODEL = to_dict(DataConfig()), to_dict(NoiseConfig()), to_dict(ModelConfig(hidden=16))


def _run(tmp: Path, name: str, *, workers: int, epochs: int, snapshot_every: int = 1, batch_size: int = 120,
         max_failures: int = 0, deterministic: bool = False):
    bundle = build_data(DATA, NOISE, 0)
    meta = bundle.train.sample_id[:4]
    rw = to_dict(ReweightConfig(epochs=epochs, batch_size=batch_size, lr=0.1, momentum=0.9, meta_lr=500.0,
                                snapshot_every=snapshot_every))
    return run_training(name=name, storage_path=str(tmp), data=DATA, noise=NOISE, model=MODEL, reweight=rw, seed=0,
                        meta_ids=meta, meta_labels=bundle.train.y_true[:4], num_workers=workers,
                        cpus_per_worker=0.5, max_failures=max_failures, deterministic=deterministic)


def _state(run):
    last = Path(run.snapshots[-1]["path"])
    return (torch.load(last / "model.pt", weights_only=True),
            torch.load(last / "train_state.pt", weights_only=True)["weights"])


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return tmp, _run(tmp, "w1", workers=1, epochs=2)


def test_two_workers_equal_one_worker_and_sparse_snapshots(one_worker):
    tmp, one = one_worker
    two = _run(tmp, "w2", workers=2, epochs=2, snapshot_every=2)
    (m1, w1), (m2, w2) = _state(one), _state(two)
    assert not torch.equal(w1, torch.ones_like(w1))  # weights actually moved
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-5)
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-5, atol=1e-6)
    assert [s["epoch"] for s in one.snapshots] == [0, 1]
    # snapshot_every=2: one snapshot, but every epoch's metrics, so best-validation stays exact
    assert [s["epoch"] for s in two.snapshots] == [1]
    assert [h["epoch"] for h in two.extra["history"]] == [0, 1]
    assert two.best_epoch == one.best_epoch
    assert two.test_acc_at_best == pytest.approx(one.test_acc_at_best, abs=1e-9)


def test_ray_deterministic_switches_the_workers_and_keeps_cpu_floats(one_worker):
    """ray.deterministic: every epoch ran with deterministic algorithms on (as the worker recorded
    it), and on CPUs, whose kernels are deterministic already, the run ends with the default run's
    model and weights bit for bit."""
    tmp, one = one_worker
    det = _run(tmp, "w1det", workers=1, epochs=2, deterministic=True)
    assert [h["deterministic_algorithms"] for h in det.extra["history"]] == [True, True]
    assert [h["deterministic_algorithms"] for h in one.extra["history"]] == [False, False]
    assert {(h["device"], h["tf32"]) for h in det.extra["history"] + one.extra["history"]} == {("cpu", None)}  # what trained
    (m1, w1), (m2, w2) = _state(one), _state(det)
    assert torch.equal(w2, w1) and all(torch.equal(m2[k], m1[k]) for k in m1)


def test_rerun_with_same_name_resumes_from_last_checkpoint(one_worker):
    tmp, straight = one_worker
    first = _run(tmp, "resumed", workers=1, epochs=1)
    # a checkpoint a killed run wrote but never uploaded, in the run's staging folder (which a run
    # that finished leaves empty, or removes)
    stage = checkpoint_stage(stage_key("resumed", first.path))
    assert not stage.exists() or not any(stage.iterdir())
    (stage / "ckpt_killed").mkdir(parents=True)
    (stage / "ckpt_killed" / "model.pt").write_bytes(b"x" * 1000)
    resumed = _run(tmp, "resumed", workers=1, epochs=2)  # same name: continues at epoch 1
    assert [s["epoch"] for s in resumed.snapshots] == [0, 1]
    (ms, ws), (mr, wr) = _state(straight), _state(resumed)
    torch.testing.assert_close(wr, ws)
    for k in ms:
        torch.testing.assert_close(mr[k], ms[k])
    assert [h["epoch"] for h in resumed.extra["history"]] == [0, 1]
    assert not (stage / "ckpt_killed").exists()  # the stale copy went when the run resumed
    # a finished run is returned without training again
    again = _run(tmp, "resumed", workers=1, epochs=2)
    assert again.snapshots == resumed.snapshots
    best = max(again.extra["history"], key=lambda h: (h["val_acc"], -h["epoch"]))
    assert again.best_epoch == best["epoch"] and np.isfinite(again.final_test_acc)


def test_a_cut_off_ray_train_record_is_refused_with_the_fix_and_the_fix_works(one_worker):
    """Ray rewrites checkpoint_manager_snapshot.json in place after every snapshot: a run killed
    meanwhile leaves it cut off, and resuming failed with a bare JSON error."""
    tmp, straight = one_worker
    first = _run(tmp, "cut", workers=1, epochs=1)
    record = Path(first.path) / "checkpoint_manager_snapshot.json"
    record.write_text(record.read_text()[:40])
    with pytest.raises(RuntimeError, match="checkpoint_manager_snapshot.json.*the file is cut off.*Delete it to "
                                           "train this run again"):
        _run(tmp, "cut", workers=1, epochs=2)
    record.unlink()  # the fix the message names: the run trains again from its first epoch
    again = _run(tmp, "cut", workers=1, epochs=2)
    assert [s["epoch"] for s in again.snapshots] == [0, 1]  # one copy per epoch: the new ones
    assert all(s["path"] != first.snapshots[0]["path"] for s in again.snapshots)
    (ms, ws), (mr, wr) = _state(straight), _state(again)
    torch.testing.assert_close(wr, ws)


def test_two_workers_with_batchnorm_average_running_stats_and_report_the_saved_model(ray_session, tmp_path):
    # With BatchNorm each worker's running statistics come from its own slice of the batch; they
    # are averaged before evaluation, so the workers hold (and evaluate) the model rank 0 saves.
    # lr ~ 0 and one global batch of the whole training split: the first BatchNorm's input does
    # not depend on any normalisation, so its averaged running mean is that of one process on
    # the union batch (rank 0's own would be its slice's).
    import warnings

    from pivotal_ray.core.models import build_model
    from tests.unit.test_data import _write_cifar

    _write_cifar(tmp_path / "data", hundred=False, n_train=8, n_test=120)
    data, noise = {"name": "cifar10", "root": str(tmp_path / "data")}, {"kind": "none"}
    model = to_dict(ModelConfig(name="resnet18_cifar"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic pickles fail torchvision's md5 check
        bundle = build_data(data, noise, 0)
    n = len(bundle.train)
    rw = to_dict(ReweightConfig(epochs=1, batch_size=n, lr=1e-12, momentum=0.9, meta_lr=10.0, augment=False))
    run = run_training(name="bn2", storage_path=str(tmp_path / "runs"), data=data, noise=noise, model=model,
                       reweight=rw, seed=0, meta_ids=bundle.train.sample_id[:4],
                       meta_labels=bundle.train.y_true[:4], num_workers=2, cpus_per_worker=0.5)
    saved = torch.load(Path(run.snapshots[-1]["path"]) / "model.pt", weights_only=True)
    net = build_model(model, bundle.num_classes, bundle.input_shape)
    net.load_state_dict(saved)
    with torch.no_grad():
        pred = net.eval()(bundle.test.inputs(np.arange(len(bundle.test)))).argmax(1).numpy()
    assert run.snapshots[-1]["test_acc"] == float((pred == bundle.test.y_true).mean())
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.reset_running_stats()
    with torch.no_grad():
        net.train()(bundle.train.inputs(np.arange(n)))  # one process, the union batch
    name = next(k for k, m in net.named_modules() if m is bn)
    torch.testing.assert_close(saved[f"{name}.running_mean"], bn.running_mean, rtol=1e-4, atol=1e-6)


class KillWorkerAfterFirstReport(ray.train.UserCallback):
    """Runs in Ray Train's controller: after epoch 0's report (its snapshot written), SIGKILLs one
    of the run's training workers, once, as a lost node would take it. Logs one line per report:
    the epoch, the pids of the run's live training workers, and the one it killed. A worker holds
    at most one report the controller has not read (Ray Train's result queue of size 1), so when
    epoch 0's is handled the workers are at most at epoch 1's: the kill lands mid-run."""

    def __init__(self, log: Path):
        self.log = log

    def after_report(self, run_context, metrics, checkpoint) -> None:
        raylet = os.getppid()  # this session's raylet started the controller and the workers
        workers = [pid for pid, (parent, cmdline) in processes().items()
                   if parent == raylet and cmdline.startswith("ray::RayTrainWorker")]
        epoch, first = metrics[0]["epoch"], not self.log.exists()
        killed = sorted(workers)[-1:] if epoch == 0 and first else []
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        with self.log.open("a") as f:
            f.write(f"{epoch};{' '.join(map(str, workers))};{' '.join(map(str, killed))}\n")


def test_a_worker_lost_mid_run_restarts_from_its_last_snapshot_within_max_failures(ray_session, tmp_path,
                                                                                   monkeypatch):
    """ray.max_failures > 0: one of two data-parallel workers lost, Ray Train ends the other (which
    would wait for it in the all-reduce) and starts a new group, which resumes from the last
    snapshot, within the same call, to the same result as a run that lost nothing."""
    import ray.train.torch as rtt

    straight = _run(tmp_path, "straight", workers=2, epochs=6, batch_size=5)
    log = tmp_path / "killed.txt"
    trainer = rtt.TorchTrainer  # the callback goes in through the trainer run_training builds
    monkeypatch.setattr(rtt, "TorchTrainer", lambda *a, run_config, **kw: trainer(
        *a, run_config=dataclasses.replace(run_config, callbacks=[KillWorkerAfterFirstReport(log)]), **kw))
    lost = _run(tmp_path, "lost", workers=2, epochs=6, batch_size=5, max_failures=1)
    reports = [ln.split(";") for ln in log.read_text().splitlines()]
    group, victims = set(reports[0][1].split()), set(reports[0][2].split())
    assert reports[0][0] == "0" and len(group) == 2 and len(victims) == 1  # one of two killed after epoch 0...
    last = set(reports[-1][1].split())
    assert reports[-1][0] == "5" and len(last) == 2 and not last & group  # ...and a new group finished the run,
    assert [int(r[0]) for r in reports] == list(range(6))  # from the snapshot: no epoch was reported twice
    assert [s["epoch"] for s in lost.snapshots] == list(range(6))
    assert [h["epoch"] for h in lost.extra["history"]] == list(range(6))
    (ms, ws), (ml, wl) = _state(straight), _state(lost)
    torch.testing.assert_close(wl, ws, rtol=0, atol=0)
    for k in ms:
        torch.testing.assert_close(ml[k], ms[k], rtol=0, atol=0)
