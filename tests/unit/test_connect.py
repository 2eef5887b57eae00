"""``pipeline.connect``: which Ray a job joins (no Ray is started: ``ray.init`` is recorded)."""

from __future__ import annotations

import logging
import re

import pytest
import ray
import ray._private.services as services

from pivotal_ray import pipeline
from pivotal_ray.config import ExperimentConfig

HEAD = "10.0.0.1:6379"


@pytest.fixture
def inits(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pipeline, "_unreachable", lambda address: None)  # no TCP: "head" is not a host here
    return calls


def _machine(monkeypatch, *, recorded=None, running=()):
    """What `ray start` left: its address file, and the GCS processes running on the machine."""
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: recorded)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset(running))


def _cfg(address=None):
    cfg = ExperimentConfig()
    cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory = address, 2, 10**9
    return cfg


def test_no_cluster_starts_a_local_ray_with_the_configured_resources(inits, monkeypatch):
    _machine(monkeypatch)
    pipeline.connect(_cfg())
    (kw,) = inits
    assert kw["address"] == "local"  # never another cluster's
    assert kw["num_cpus"] == 2 and kw["object_store_memory"] == 10**9
    env = kw["runtime_env"]["env_vars"]
    assert env["PYTHONPATH"] and env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


def test_a_live_ray_start_cluster_is_joined_as_ray_init_joins_it(inits, monkeypatch, caplog):
    # address None (not the address itself): Ray turns on the token auth that `ray start` enabled
    # only for a cluster it found itself. num_cpus / object_store_memory are refused when joining
    # (they crashed the job before).
    _machine(monkeypatch, recorded=HEAD, running={HEAD, "10.0.0.1:40000"})
    with caplog.at_level(logging.INFO, logger="pivotal_ray.pipeline"):
        pipeline.connect(_cfg())
    (kw,) = inits
    assert kw["address"] is None
    assert not {"num_cpus", "object_store_memory"} & set(kw)
    assert "PYTHONPATH" in kw["runtime_env"]["env_vars"]  # the same machine: this checkout
    assert f"joining the Ray cluster that `ray start` left on this machine ({HEAD})" in caplog.text


def test_a_stale_address_file_is_ignored(inits, monkeypatch):
    _machine(monkeypatch, recorded=HEAD, running={"10.0.0.1:40000"})  # its cluster is gone
    pipeline.connect(_cfg())
    (kw,) = inits
    assert kw["address"] == "local" and kw["num_cpus"] == 2


def test_ray_address_local_beside_a_live_cluster_warns(inits, monkeypatch, caplog):
    _machine(monkeypatch, recorded=HEAD, running={HEAD})
    with caplog.at_level(logging.WARNING, logger="pivotal_ray.pipeline"):
        pipeline.connect(_cfg("local"))
    (kw,) = inits
    assert kw["address"] == "local" and kw["num_cpus"] == 2
    assert "placement-group cleaner" in caplog.text and "ray stop" in caplog.text


@pytest.mark.parametrize("where", ["config", "env"])
def test_a_given_cluster_address_is_joined_as_is(inits, monkeypatch, where):
    _machine(monkeypatch, recorded=HEAD, running={HEAD})
    cfg = _cfg("head:6379" if where == "config" else None)
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # a GCS address, as `ray job submit` sets for the job
    pipeline.connect(cfg)
    (kw,) = inits
    assert kw["address"] == ("head:6379" if where == "config" else "10.0.0.2:6379")
    assert not {"num_cpus", "object_store_memory", "runtime_env"} & set(kw)  # the job's runtime env holds


def test_runs_in_several_threads_start_one_ray(monkeypatch):
    """compare.concurrency: run threads that reach connect() together start one local Ray (the
    second waits for the first and finds it running), not one each."""
    import threading
    import time

    state, calls = {"up": False}, []

    def init(**kw):
        calls.append(kw)
        time.sleep(0.2)  # ray.init takes a while: the other thread arrives meanwhile
        state["up"] = True

    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _machine(monkeypatch)
    barrier = threading.Barrier(3)

    def connect():
        barrier.wait()
        pipeline.connect(_cfg())

    threads = [threading.Thread(target=connect) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1


def test_after_leaving_ray_nothing_starts_another(monkeypatch):
    """pipeline.leave_ray (Ctrl-C in jobs.compare with runs in flight): Ray is shut down, and a run
    thread that reaches connect() afterwards, or a Ray call that would start Ray by itself, starts
    no new local Ray while the process exits."""
    from ray._private import auto_init_hook

    shut, inits = [], []
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(1))
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(pipeline, "_LEFT_RAY", type(pipeline._LEFT_RAY)())  # this test's own flag
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)
    _machine(monkeypatch)
    pipeline.leave_ray()
    assert shut == [1] and auto_init_hook.enable_auto_connect is False
    with pytest.raises(RuntimeError, match="left Ray after an interrupt"):
        pipeline.connect(_cfg())
    auto_init_hook.auto_init_ray()  # what ray.get/.remote call first: now a no-op
    assert inits == []


@pytest.mark.parametrize("address, env, named", [
    (None, "ray://head:10001", "RAY_ADDRESS=ray://head:10001"),
    ("ray://head:10001", None, "ray.address=ray://head:10001"),
    ("auto", "ray://head:10001", "RAY_ADDRESS=ray://head:10001"),  # ray.init("auto") reads RAY_ADDRESS
])
def test_a_ray_client_address_is_refused_before_any_work(inits, monkeypatch, tmp_path, address, env, named):
    """``ray job submit`` sets a GCS address; a Ray Client one (ray://) would train the warm-up and
    then fail in Ray Data's executor (measured on Ray 2.60: 'Worker' object has no attribute
    'core_worker'), so the job refuses it before the data is read, naming the fix. A config that
    recorded one still builds (a manifest read back)."""
    from pivotal_ray.config import ConfigError

    _machine(monkeypatch)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = _cfg(address)
    cfg.output_dir = str(tmp_path / "out")
    for check in (pipeline.connect, pipeline.validate):
        with pytest.raises(ConfigError, match=rf"{re.escape(named)} is a Ray Client address.*ray job submit"):
            check(cfg)
    assert inits == [] and not (tmp_path / "out").exists()


def test_auto_with_ray_address_set_joins_that_address_and_names_it(inits, monkeypatch):
    _machine(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    pipeline.connect(_cfg("auto"))
    (kw,) = inits
    assert kw["address"] == "10.0.0.2:6379" and "runtime_env" not in kw  # the job's runtime env holds


def test_an_address_where_no_cluster_answers_is_refused_naming_the_fix(monkeypatch):
    """A host:port that takes no connection: refused at once (ray.init would wait minutes for the
    GCS), also when RAY_ADDRESS gives it under ray.address=auto; one that takes it is joined. "auto"
    with no cluster on the machine, an http:// address and a cluster that refuses this driver:
    Ray's refusal with its cause, as ours."""
    import socket

    from pivotal_ray.config import ConfigError

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _machine(monkeypatch)
    with socket.socket() as s:  # a port nobody listens on: bound, not listening (on every interface: Ray, and
        s.bind(("0.0.0.0", 0))  # the probe, join 127.0.0.1 at this node's address)
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port}: no Ray cluster answers there "
                                              r"\(ConnectionRefusedError.*ray start --head"):
            pipeline.connect(_cfg(f"127.0.0.1:{port}"))
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=rf"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there"):
            pipeline.connect(_cfg("auto"))
        monkeypatch.delenv("RAY_ADDRESS")
        assert calls == []
        s.listen()  # now something answers
        pipeline.connect(_cfg(f"127.0.0.1:{port}"))
        assert [kw["address"] for kw in calls] == [f"127.0.0.1:{port}"]
    assert pipeline._unreachable("auto") is None and pipeline._unreachable("http://head:8265") is None

    def refuse(**kw):
        raise ConnectionError("Could not find any running Ray instance.\nmore")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match=r"ray.address=auto: Ray could not join it \(Could not find any running Ray "
                                          r"instance.\): start one \(ray start --head\)"):
        pipeline.connect(_cfg("auto"))

    def unauthorised(**kw):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: UNAUTHENTICATED: bad token")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6379") from cause

    monkeypatch.setattr(ray, "init", unauthorised)
    monkeypatch.setattr(pipeline, "_unreachable", lambda address: None)
    with pytest.raises(ConfigError, match=r"ray.address=10.0.0.9:6379: Ray could not join it \(Failed to connect to Ray "
                                          r"cluster at 10.0.0.9:6379; Failed to connect to GCS.*UNAUTHENTICATED: bad "
                                          r"token\): check the address.*RAY_AUTH_TOKEN"):
        pipeline.connect(_cfg("10.0.0.9:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ValueError("Invalid Ray address: 'http://head:8265'")))
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS=http://head:8265: Ray could not join it \(Invalid Ray address"):
        pipeline.connect(_cfg())
