"""One invocation at a time per output folder and per training run (core.locks), no Ray.

flock locks belong to an open file, so a second hold() in this process conflicts with the first
as one in another process would; a subprocess checks what another process sees and that a killed
holder leaves no lock behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pivotal_ray import pipeline
from pivotal_ray.config import from_dict, to_dict
from pivotal_ray.core import artifacts, locks
from pivotal_ray.core.artifacts import OutputDirError
from pivotal_ray.core.locks import BusyError


@pytest.fixture(autouse=True)
def _private_lock_dir(tmp_path, monkeypatch):
    """Locks of this test only: tempfile.gettempdir() follows TMPDIR."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)


def test_a_held_lock_refuses_a_second_holder_naming_the_first_and_the_fix():
    with locks.hold("output_dir:/x", "output_dir /x", wait=False):
        with pytest.raises(BusyError) as err:
            with locks.hold("output_dir:/x", "output_dir /x", wait=False, fix="choose another output_dir"):
                pytest.fail("entered a held lock")
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "output_dir /x is in use" in msg
        assert msg.endswith("choose another output_dir") and sys.argv[0].split("/")[-1] in msg
        with locks.hold("output_dir:/y", "output_dir /y", wait=False):  # another key: free
            pass
    with locks.hold("output_dir:/x", "output_dir /x", wait=False):  # released at the end of the block
        pass


def test_a_lock_is_released_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with locks.hold("k", "k", wait=False):
            raise RuntimeError("boom")
    with locks.hold("k", "k", wait=False):
        pass


def test_a_waiting_holder_is_told_once_and_enters_when_the_first_leaves():
    told: list[str] = []
    entered = threading.Event()
    with locks.hold("train:/r", "training run r", wait=False):
        t = threading.Thread(target=lambda: _enter(told, entered))
        t.start()
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
        assert told and told[0].startswith("waiting for training run r, in use by another invocation (pid ")
        time.sleep(0.2)
        assert not entered.is_set()  # still waiting while held
    t.join(10)
    assert entered.is_set() and len(told) == 1


def test_a_holder_removes_its_lock_file_and_holders_still_exclude_each_other():
    """Lock files do not pile up (one per output folder and run ever used: thousands on a busy
    machine): the holder removes its file on leaving. A waiter that had opened the removed file
    locks the one at the path instead, so no two holders are ever inside at once."""
    path = locks.lock_path("k")
    with locks.hold("k", "k", wait=False):
        assert path.exists()
    assert not path.exists() and list(path.parent.iterdir()) == []
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(40):
                with locks.hold("k", "k", wait=True):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
        except BaseException as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and most[0] == 1 and not path.exists()


def _enter(told: list[str], entered: threading.Event) -> None:
    with locks.hold("train:/r", "training run r", wait=True, on_wait=told.append):
        entered.set()


_HOLDER = """
import sys, time
from pivotal_ray.core import locks
with locks.hold(sys.argv[1], "it", wait=False):
    print("held", flush=True)
    time.sleep(60)
"""


def test_another_process_sees_the_lock_and_a_killed_holder_leaves_none(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, "output_dir:/z"], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"pid {proc.pid} on "):
            with locks.hold("output_dir:/z", "output_dir /z", wait=False):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with locks.hold("output_dir:/z", "output_dir /z", wait=False):  # the kernel dropped it with the process
        pass


def _toy(tmp_path, **extra):
    return from_dict({"output_dir": str(tmp_path / "out"), "noise": {"rate": 0.6}, **extra})


def test_jobs_select_refuses_an_output_dir_in_use_before_writing_anything(tmp_path, monkeypatch):
    cfg = _toy(tmp_path)
    monkeypatch.setattr(pipeline, "connect", lambda cfg: pytest.fail("connected to Ray"))
    key = f"output_dir:{os.path.realpath(cfg.output_dir)}"
    with locks.hold(key, "it", wait=False):
        with pytest.raises(BusyError, match="choose another output_dir"):
            pipeline.run_experiment(cfg)
    assert not (tmp_path / "out").exists()


def test_a_run_that_waited_checks_its_output_dir_again(tmp_path, monkeypatch, caplog):
    """While it waited, the other invocation made output_dir hold another run: refused, untouched."""
    cfg = _toy(tmp_path)
    monkeypatch.setattr(pipeline, "connect", lambda cfg: pytest.fail("went on into a directory of another run"))
    key = f"output_dir:{os.path.realpath(cfg.output_dir)}"
    box: dict = {}

    def second() -> None:
        try:
            pipeline.run_experiment(cfg, wait=True)
        except BaseException as err:  # noqa: BLE001
            box["error"] = err

    caplog.set_level(logging.INFO, logger="pivotal_ray.pipeline")
    with locks.hold(key, "it", wait=False):
        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 60
        while not any("waiting for output_dir" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and t.is_alive(), box
            time.sleep(0.02)
        other = to_dict(_toy(tmp_path, seed=5))
        out = tmp_path / "out"
        out.mkdir()
        artifacts.write_manifest(out, config=other, seed=5, timings={}, extra={"status": "running"})
    t.join(60)
    assert isinstance(box.get("error"), OutputDirError) and "seed" in str(box["error"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_training_run_waits_for_another_trainer_of_the_same_run(tmp_path, monkeypatch, caplog):
    from pivotal_ray.distributed import train

    order: list[str] = []
    monkeypatch.setattr(train, "_train_or_read", lambda **kw: order.append(f"trained {kw['name']}") or "run")
    run_path = os.path.realpath(tmp_path / "rt" / "warmup-abc")
    caplog.set_level(logging.INFO, logger="pivotal_ray.distributed.train")
    result: list = []
    with locks.hold(f"train:{run_path}", "it", wait=False):
        t = threading.Thread(target=lambda: result.append(train.run_training(
            name="warmup-abc", storage_path=str(tmp_path / "rt"), data={}, noise={}, model={}, reweight={},
            seed=0, meta_ids=[], meta_labels=[])))
        t.start()
        deadline = time.monotonic() + 30
        while not any("waiting for training run warmup-abc" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.02)
        order.append("released")
    t.join(30)
    assert order == ["released", "trained warmup-abc"] and result == ["run"]


def test_a_run_waiting_for_another_run_of_its_comparison_is_told_which():
    """compare.concurrency: rbc waits for the warm-up that random, in a thread of the same
    process, is training: the line names that run, not "another invocation" with our own pid."""
    told: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def random_run():
        with locks.hold("train:/w", "training run warmup-1", wait=True):
            holding.set()
            release.wait(10)

    def rbc_run():
        with locks.hold("train:/w", "training run warmup-1", wait=True, on_wait=told.append):
            pass

    first = threading.Thread(target=random_run, name="compare[random seed 0]")
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=rbc_run, name="compare[rbc seed 0]")
    second.start()
    deadline = time.monotonic() + 10
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    first.join(10)
    second.join(10)
    assert len(told) == 1 and told[0].startswith(
        "waiting for training run warmup-1, in use by the comparison's run [random seed 0], since ")
