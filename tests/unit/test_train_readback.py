"""run_training on a run that has finished: read back from its snapshots, never trained again.

No Ray: the run directory is written by hand as train_loop writes it (one checkpoint per epoch,
each with model.pt, train_state.pt, metrics.json recording the .pt sizes, and history.json), and
TorchTrainer is a tripwire, so a read-back that starts Ray Train fails at once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pivotal_ray.config import ExperimentConfig, to_dict
from pivotal_ray.distributed import train as train_mod

# val_acc ties between epochs 1 and 2; every epoch's test_acc differs, so each reported number
# names the epoch it came from
HISTORY = [{"epoch": 0, "val_acc": 0.5, "test_acc": 0.41, "train_loss": 0.9, "mean_weight": 1.0, "epoch_s": 1.5},
           {"epoch": 1, "val_acc": 0.7, "test_acc": 0.62, "train_loss": 0.7, "mean_weight": 0.8, "epoch_s": 1.25},
           {"epoch": 2, "val_acc": 0.7, "test_acc": 0.58, "train_loss": 0.6, "mean_weight": 0.7, "epoch_s": 1.0}]


def _finished_run(run_dir):
    for epoch, metrics in enumerate(HISTORY):
        d = run_dir / f"checkpoint_2026-01-01_00-00-0{epoch}.000000"
        d.mkdir(parents=True)
        torch.save({"w": torch.full((2,), float(epoch))}, d / "model.pt")
        torch.save({"weights": torch.full((5,), 0.5), "epoch": epoch, "history": HISTORY[:epoch + 1]},
                   d / "train_state.pt")
        sizes = {f: (d / f).stat().st_size for f in train_mod.PT_FILES}
        (d / "metrics.json").write_text(json.dumps({**metrics, "file_sizes": sizes}))
        (d / "history.json").write_text(json.dumps(HISTORY[:epoch + 1]))


def test_a_finished_run_is_read_back_with_the_earliest_best_epoch(tmp_path, monkeypatch):
    import ray.train.torch

    def no_trainer(*args, **kwargs):
        raise AssertionError("TorchTrainer constructed: a finished run must be read back, not trained")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    _finished_run(tmp_path / "store" / "run-a")
    plain = to_dict(ExperimentConfig())
    run = train_mod.run_training(name="run-a", storage_path=str(tmp_path / "store"), data=plain["data"],
                                 noise=plain["noise"], model=plain["model"],
                                 reweight={**plain["reweight"], "epochs": 3}, seed=0,
                                 meta_ids=np.array([1, 2]), meta_labels=np.array([0, 1]))
    assert [s["epoch"] for s in run.snapshots] == [0, 1, 2]
    # val_acc 0.7 at epochs 1 and 2: the earliest of the tied epochs is the best one
    assert (run.best_epoch, run.best_val_acc) == (1, 0.7)
    assert run.test_acc_at_best == HISTORY[1]["test_acc"]
    assert run.final_test_acc == HISTORY[2]["test_acc"]  # the last epoch's, not the best one's
    assert run.epochs_s == pytest.approx(3.75)


def test_an_unfinished_run_says_where_it_resumes(tmp_path, monkeypatch, caplog):
    import logging

    import ray.train.torch

    def no_trainer(*args, **kwargs):
        raise AssertionError("TorchTrainer constructed")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    _finished_run(tmp_path / "store" / "run-b")  # 3 of 5 epochs
    plain = to_dict(ExperimentConfig())
    caplog.set_level(logging.INFO, logger="pivotal_ray.distributed.train")
    with pytest.raises(AssertionError, match="TorchTrainer constructed"):  # it goes on to train
        train_mod.run_training(name="run-b", storage_path=str(tmp_path / "store"), data=plain["data"],
                               noise=plain["noise"], model=plain["model"], reweight={**plain["reweight"], "epochs": 5},
                               seed=0, meta_ids=np.array([1, 2]), meta_labels=np.array([0, 1]))
    assert "training run run-b: resuming after epoch 3 of 5, its last snapshot on disk" in caplog.text


@pytest.mark.parametrize("max_failures", [0, 3, -1])
def test_ray_max_failures_reaches_ray_trains_failure_config(tmp_path, monkeypatch, max_failures):
    """ray.max_failures: how often Ray Train restarts a run within the job after a worker fails."""
    import ray.train.torch

    from pivotal_ray import training
    from pivotal_ray.config import from_dict

    seen = {}

    class Stop(Exception):
        pass

    def capture(*args, run_config, **kwargs):
        seen["max_failures"] = run_config.failure_config.max_failures
        raise Stop

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", capture)
    cfg = from_dict({"output_dir": str(tmp_path / "out"), "ray": {"max_failures": max_failures}})
    with pytest.raises(Stop):
        training.train(cfg, "run-c", np.array([1, 2]), np.array([0, 1]), str(tmp_path / "store"))
    assert seen == {"max_failures": max_failures}


def test_evaluation_counts_every_sample_at_any_batch():
    """reweight.eval_batch_size only splits the forward passes: the accuracy over a worker's
    positions is the same for batches of 1, 3 (the last one short), 7 and more than there are."""
    from pivotal_ray.core.reweight import LocalReducer

    predicted = np.array([0, 1, 1, 0, 1, 0, 0, 1])

    class Split:  # what _evaluate reads of a data split: inputs whose argmax is `predicted`
        y_true = predicted.copy()

        def inputs(self, pos):
            return torch.nn.functional.one_hot(torch.as_tensor(predicted[pos]), 2).float()

    split, pos = Split(), np.array([0, 2, 3, 5, 6, 7, 1])
    split.y_true[[2, 5, 4]] ^= 1  # two of the seven scored positions are now wrong (4 is not scored)
    for batch in (1, 3, 7, 2048):
        got = train_mod._evaluate(torch.nn.Identity(), split, pos, torch.device("cpu"), batch, LocalReducer())
        assert got == 5 / 7
