"""Training plans (base / finetune / the paper's methods) through Algorithm 2, with Ray Train faked.

``training.train`` is replaced by a recorder that returns a fake run, and the Ray connection is
skipped, so ``run_experiment`` runs the real selection and artefact code for the plain-numpy
methods without starting Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pivotal_ray import pipeline, training
from pivotal_ray.config import from_dict
from pivotal_ray.selectors import SELECTORS, plan_of


@dataclass
class FakeRun:
    name: str
    n_train: int
    snapshots: list = field(default_factory=list)
    best_epoch: int = 1
    best_val_acc: float = 0.9
    test_acc_at_best: float = 0.8
    final_test_acc: float = 0.7
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # epoch 1 and 2 tie on val_acc: the earliest wins
        self.snapshots = [{"path": f"/store/{self.name}/checkpoint_{e}", "epoch": e, "val_acc": v}
                          for e, v in ((0, 0.5), (1, 0.9), (2, 0.9))]
        self.extra = {"history": [{"epoch": s["epoch"], "val_acc": s["val_acc"]} for s in self.snapshots]}

    def snapshot(self, epoch):
        return next(s for s in self.snapshots if s["epoch"] == epoch)

    @property
    def epochs_s(self):
        return 2.5

    def final_weights(self):
        return torch.linspace(0, 1, self.n_train)


@pytest.fixture
def calls(monkeypatch):
    log: list[dict] = []

    def fake_train(cfg, name, meta_ids, meta_labels, storage, **kw):
        log.append({"name": name, "meta_ids": np.asarray(meta_ids), "meta_labels": np.asarray(meta_labels),
                    "storage": storage, **kw})
        return FakeRun(name=name, n_train=cfg.data.toy_split[0])

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(pipeline, "connect", lambda cfg: None)
    monkeypatch.setattr(pipeline, "_check_cluster", lambda cfg, bundle: None)
    return log


def _cfg(tmp_path: Path, method: str, **finetune):
    return from_dict({"seed": 1, "output_dir": str(tmp_path / method), "selection": {"method": method},
                      "finetune": finetune, "ray": {"storage_path": str(tmp_path / "store")}})


def test_a_meta_set_without_some_class_is_recorded_and_said(tmp_path, calls, monkeypatch, caplog):
    """Two classes, every meta sample cleaned to 0: each round and metrics.json name class 1 as
    missing, and the last round's warning says so (tests/e2e/test_select_job.py checks the key
    against each run's selection.csv)."""
    from pivotal_ray.core.labels import OracleLabels

    monkeypatch.setattr(pipeline, "labeler", lambda cfg, bundle: OracleLabels(
        bundle.train.sample_id, np.zeros_like(bundle.train.y_true)))
    with caplog.at_level("WARNING", logger=pipeline.log.name):
        m = pipeline.run_experiment(_cfg(tmp_path, "random"))
    assert m["meta_classes_missing"] == [1] and [r["meta_classes_missing"] for r in m["rounds"]] == [[1]]
    assert any(rec.levelname == "WARNING" and "hold no sample of class 1 " in rec.getMessage()
               and "the final training has no clean example of it" in rec.getMessage() for rec in caplog.records)
    assert pipeline.missing_classes(np.array([0, 2, 2]), 4) == [1, 3]


def test_methods_name_their_plans():
    assert plan_of(SELECTORS.get("base")) == "plain"
    assert plan_of(SELECTORS.get("finetune")) == "finetune"
    assert plan_of(SELECTORS.get("rbc")) == plan_of(SELECTORS.get("random")) == "reweight"
    assert set(training.PLANS.names()) == {"reweight", "plain", "finetune"}


def test_base_trains_once_on_the_noisy_set_without_meta_samples(tmp_path, calls):
    cfg = _cfg(tmp_path, "base")
    m = pipeline.run_experiment(cfg)
    assert len(calls) == 1
    (call,) = calls
    assert call["name"].startswith("base-") and call["meta_ids"].size == 0
    assert call["reweight"]["mode"] == "none" and call["reweight"]["init_weight"] == 1.0
    assert call["reweight"]["epochs"] == cfg.reweight.epochs and "train_ids" not in call
    assert m["meta_size"] == 0 and m["rounds"] == [] and m["meta_clean_frac_observed"] is None
    assert m["meta_classes_missing"] is None
    assert "base_train_s" in m["timings"] and m["timings"]["base_epochs_s"] == 2.5
    sel = pd.read_csv(Path(cfg.output_dir) / "selection.csv")
    assert sel.empty and list(sel.columns) == pipeline.SELECTION_COLUMNS
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["method"] == "base"


def test_finetune_shares_the_warmup_and_random_picks_then_finetunes_the_best_snapshot(tmp_path, calls):
    rnd = pipeline.run_experiment(_cfg(tmp_path, "random"))
    n_random = len(calls)
    ft_cfg = _cfg(tmp_path, "finetune", epochs=7, lr=0.05)
    ft = pipeline.run_experiment(ft_cfg)
    warm_r, round_r = calls[:n_random]
    warm_f, round_f = calls[n_random:]
    # same warm-up run (name and M0) and the same budget accounting as random
    assert warm_f["name"] == warm_r["name"] == pipeline.warmup_name(ft_cfg)
    np.testing.assert_array_equal(warm_f["meta_ids"], warm_r["meta_ids"])
    np.testing.assert_array_equal(round_f["meta_ids"], round_r["meta_ids"])
    assert len(round_f["meta_ids"]) == ft_cfg.selection.budget
    assert "reweight" not in round_r  # random re-weights with the configured mode
    # the fine-tune: meta set alone, from the warm-up's best snapshot (epoch 1: earliest of the tie)
    np.testing.assert_array_equal(round_f["train_ids"], round_f["meta_ids"])
    assert round_f["init_from"] == f"/store/{warm_f['name']}/checkpoint_1"
    rw = round_f["reweight"]
    assert (rw["mode"], rw["epochs"], rw["lr"], rw["init_weight"]) == ("none", 7, 0.05, 1.0)
    assert rw["lr_milestones"] == [] and round_f["run_tag"] == "finetune"
    assert round_f["name"].startswith("finetune-round1-")
    sel_r = pd.read_csv(Path(tmp_path / "random" / "selection.csv"))
    sel_f = pd.read_csv(Path(ft_cfg.output_dir) / "selection.csv")
    pd.testing.assert_frame_equal(sel_r, sel_f)
    assert ft["final_run"]["name"] == round_f["name"] and rnd["final_run"]["name"] == round_r["name"]


def test_finetune_defaults_to_the_reweight_schedule(tmp_path, calls):
    cfg = _cfg(tmp_path, "finetune")
    pipeline.run_experiment(cfg)
    rw = calls[-1]["reweight"]
    assert (rw["lr"], rw["batch_size"], rw["epochs"]) == (cfg.reweight.lr, cfg.reweight.batch_size,
                                                           cfg.finetune.epochs)


def test_base_selector_refuses_to_run():
    with pytest.raises(RuntimeError, match="no selection round"):
        SELECTORS.get("base")(None, 3)


@pytest.mark.parametrize("bad, match", [({"epochs": 0}, "finetune.epochs"), ({"lr": -1.0}, "finetune.lr"),
                                        ({"batch_size": 0}, "finetune.batch_size")])
def test_finetune_config_rejects_bad_values(bad, match):
    from pivotal_ray.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        from_dict({"finetune": bad})


def test_balanced_warmup_draws_equally_per_observed_class_and_names_its_own_run(tmp_path):
    from pivotal_ray.core.data import build_data

    def cfg(seed: int, balanced: bool):
        return from_dict({"output_dir": str(tmp_path / "o"), "seed": seed,
                          "selection": {"budget": 8, "warmup": 4, "balanced_warmup": balanced}})

    uneven = 0
    for seed in range(10):
        bundle = build_data(cfg(seed, True).data, cfg(seed, True).noise, seed)
        counts = {}
        for balanced in (True, False):
            ids = training.warmup_ids(cfg(seed, balanced), bundle)
            assert len(np.unique(ids)) == 4
            y = bundle.train.y_obs[bundle.train.positions_of(ids)]
            counts[balanced] = np.bincount(y, minlength=bundle.num_classes)
        assert counts[True].tolist() == [2, 2], seed  # the toy set's two classes, 2 each
        uneven += counts[False].tolist() != [2, 2]
        np.testing.assert_array_equal(training.warmup_ids(cfg(seed, True), bundle),
                                      training.warmup_ids(cfg(seed, True), bundle))  # seeded
        assert training.warmup_name(cfg(seed, True)) != training.warmup_name(cfg(seed, False))
    assert uneven > 0  # the uniform draw is not balanced by construction


def test_run_names_ignore_settings_at_their_defaults(tmp_path):
    """A setting added in a later version (at its default) must not rename earlier warm-ups;
    changing any setting that matters must."""
    from pivotal_ray.config import to_dict, without_defaults
    from pivotal_ray.core.artifacts import config_fingerprint

    cfg = from_dict({"output_dir": str(tmp_path / "o")})
    plain = to_dict(cfg)
    older = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plain.items()}
    del older["reweight"]["meta_class_balanced"]  # as recorded before that setting existed
    assert config_fingerprint(without_defaults(older)) == config_fingerprint(without_defaults(plain))
    assert "meta_class_balanced" not in without_defaults(plain)["reweight"]
    changed = from_dict({"output_dir": str(tmp_path / "o"), "reweight": {"meta_class_balanced": True}})
    assert without_defaults(to_dict(changed))["reweight"] == {"meta_class_balanced": True}
    assert training.warmup_name(changed) != training.warmup_name(cfg)
    lr = from_dict({"output_dir": str(tmp_path / "o"), "reweight": {"lr": 0.05}})
    assert training.warmup_name(lr) != training.warmup_name(cfg)


def test_training_resources_name_the_warmup_and_the_run(tmp_path):
    # another worker count, thread count (floor of the CPUs) or device trains other floats: not
    # the same warm-up, not the same run; where the run lives does not count
    from pivotal_ray.core.artifacts import config_fingerprint

    base = {"output_dir": str(tmp_path / "o")}
    cfg = from_dict(base)
    for change in ({"num_workers": 2}, {"cpus_per_worker": 2.0}, {"use_gpu": True}):
        other = from_dict({**base, "ray": change})
        assert training.warmup_name(other) != training.warmup_name(cfg), change
    for change in ({"extract_cpus": 2.0}, {"kmeans_shard_cpus": 1.0}, {"extract_gpus": 1.0}, {"num_workers": 2}):
        assert config_fingerprint(from_dict({**base, "ray": change})) != config_fingerprint(cfg), change
    for change in ({"address": "auto"}, {"storage_path": "/elsewhere"}, {"extract_actors": 3}, {"autoscaling": True}):
        assert config_fingerprint(from_dict({**base, "ray": change})) == config_fingerprint(cfg), change
        assert training.warmup_name(from_dict({**base, "ray": change})) == training.warmup_name(cfg), change


def test_training_resources_name_the_base_run(tmp_path, calls):
    # base trains once, without a warm-up: its run name carries the resources as a warm-up's does
    names = {}
    for i, ray in enumerate(({}, {"num_workers": 2}, {"cpus_per_worker": 2.0}, {"use_gpu": True}, {"address": "auto"})):
        cfg = from_dict({"seed": 1, "output_dir": str(tmp_path / f"base{i}"), "selection": {"method": "base"},
                         "ray": {"storage_path": str(tmp_path / "store"), **ray}})
        pipeline.run_experiment(cfg)
        names[i] = calls[-1]["name"]
    assert len({names[i] for i in range(4)}) == 4 and names[4] == names[0]  # where it runs does not count
    from pivotal_ray.config import to_dict, without_defaults
    from pivotal_ray.core.artifacts import config_fingerprint

    c = to_dict(from_dict({"seed": 1}))  # default resources: the name base runs had before resources counted
    old = {k: c[k] for k in ("data", "noise", "model", "seed")} | {"reweight": training.plain_reweight(from_dict({}))}
    assert names[0] == f"base-{config_fingerprint(without_defaults(old))[:12]}"
