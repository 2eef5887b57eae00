"""``pipeline.connect``: which Ray a job joins (no Ray is started: ``ray.init`` is recorded)."""

from __future__ import annotations

import pytest
import ray

from pivotal_ray import pipeline
from pivotal_ray.config import ExperimentConfig


@pytest.fixture
def inits(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_no_address_starts_a_private_local_ray(inits):
    # ray.init(address=None) would join a cluster that `ray start` left on this machine and then
    # refuse num_cpus / object_store_memory: "local" always starts this job's own Ray
    cfg = ExperimentConfig()
    cfg.ray.num_cpus, cfg.ray.object_store_memory = 2, 10**9
    pipeline.connect(cfg)
    (kw,) = inits
    assert kw["address"] == "local"
    assert kw["num_cpus"] == 2 and kw["object_store_memory"] == 10**9
    assert "PYTHONPATH" in kw["runtime_env"]["env_vars"]


@pytest.mark.parametrize("where", ["config", "env"])
def test_a_given_address_is_joined_without_local_settings(inits, monkeypatch, where):
    cfg = ExperimentConfig()
    cfg.ray.num_cpus = 2
    if where == "config":
        cfg.ray.address = "auto"
    else:
        monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    pipeline.connect(cfg)
    (kw,) = inits
    assert kw["address"] == ("auto" if where == "config" else "http://head:8265")
    assert not {"num_cpus", "object_store_memory", "runtime_env"} & set(kw)
