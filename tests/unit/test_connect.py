"""``pipeline.connect``: which Ray a job joins (no Ray is started: ``ray.init`` is recorded)."""

from __future__ import annotations

import pytest
import ray
import ray._private.services as services

from pivotal_ray import pipeline
from pivotal_ray.config import ExperimentConfig


@pytest.fixture
def inits(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def _cfg(address=None):
    cfg = ExperimentConfig()
    cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory = address, 2, 10**9
    return cfg


def test_no_cluster_starts_a_local_ray_with_the_configured_resources(inits, monkeypatch):
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: None)
    pipeline.connect(_cfg())
    (kw,) = inits
    assert kw["address"] == "local"  # never another cluster's
    assert kw["num_cpus"] == 2 and kw["object_store_memory"] == 10**9
    assert kw["runtime_env"]["env_vars"]["PYTHONPATH"] and "RAY_TRAIN_ENABLE_PRINT_PATCH" in kw["runtime_env"]["env_vars"]


def test_a_ray_start_cluster_on_this_machine_is_joined_without_resource_settings(inits, monkeypatch):
    # ray.init() joins it too, and so do Ray Train's own helpers: a second local Ray beside it
    # had its placement-group cleaner look at the wrong cluster. num_cpus / object_store_memory
    # are refused when joining (they crashed the job before).
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: "10.0.0.1:6379")
    pipeline.connect(_cfg())
    (kw,) = inits
    assert kw["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "object_store_memory"} & set(kw)
    assert "PYTHONPATH" in kw["runtime_env"]["env_vars"]  # the same machine: this checkout


def test_ray_address_local_starts_a_local_ray_beside_a_cluster(inits, monkeypatch):
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: "10.0.0.1:6379")
    pipeline.connect(_cfg("local"))
    (kw,) = inits
    assert kw["address"] == "local" and kw["num_cpus"] == 2


@pytest.mark.parametrize("where", ["config", "env"])
def test_a_given_cluster_address_is_joined_as_is(inits, monkeypatch, where):
    cfg = _cfg("ray://head:10001" if where == "config" else None)
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # what `ray job submit` sets for the job
    pipeline.connect(cfg)
    (kw,) = inits
    assert kw["address"] == ("ray://head:10001" if where == "config" else "http://head:8265")
    assert not {"num_cpus", "object_store_memory", "runtime_env"} & set(kw)  # the job's runtime env holds
