"""Ctrl-C while Ray Train runs: ``distributed.train._fit`` keeps SIGINT for the program.

On the main thread Ray Train's ``fit()`` installs a SIGINT handler and never removes it, so a
Ctrl-C after training was swallowed (the third one exited with status 0). ``_fit`` runs ``fit()``
on a helper thread, where Ray installs none; a Ctrl-C arrives as KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pivotal_ray.distributed.train import _fit


class FakeTrainer:
    """Does what Ray Train's fit() does with signals: a handler of its own, on the main thread only."""

    def __init__(self, seconds: float, result=None, error: BaseException | None = None):
        self.seconds, self.result, self.error = seconds, result, error
        self.started = threading.Event()  # set once fit() runs

    def fit(self):
        self.started.set()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *a: None)  # swallow, as Ray's handler does after the run
        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        return self.result


def test_fit_returns_the_result_and_leaves_sigint_alone():
    before = signal.getsignal(signal.SIGINT)
    assert _fit(FakeTrainer(0.05, result="done")) == "done"
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(ValueError, match="boom"):
        _fit(FakeTrainer(0.0, error=ValueError("boom")))


@pytest.fixture
def python_sigint():
    """SIGINT as a terminal's program has it: Python's handler. A suite started in the background by
    a shell inherits SIGINT ignored, and Python then installs no handler of its own."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_fit_is_a_keyboard_interrupt_and_leaves_ray(monkeypatch, python_sigint):
    import ray

    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))  # ends the run's actors
    trainer = FakeTrainer(30.0)

    def ctrl_c_once_fit_runs():  # not on a timer: under load _fit may not have started by then
        if trainer.started.wait(60):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_fit_runs, daemon=True).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        _fit(trainer)
    assert time.perf_counter() - t0 < 20  # at once, not when the run ends (30 s)
    assert shutdowns == [1]


def test_the_jobs_exit_130_and_say_how_to_go_on(capsys):
    from jobs.select import exit_interrupted

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as ex:
            exit_interrupted()
        assert ex.value.code == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a second Ctrl-C cannot break the exit
        assert "run the same command again" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_stops_a_job_as_ctrl_c_does(capsys):
    """SIGTERM (ray job stop, timeout, Kubernetes, Slurm) raises KeyboardInterrupt in the job, so
    every path that leaves Ray after a Ctrl-C leaves it, and the job exits with 143 saying so."""
    import jobs.select as sel

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with sel.exit_status():  # a job that ends: the caller's handler again
            assert signal.getsignal(signal.SIGTERM) is sel._on_sigterm
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        from pivotal_ray.config import ConfigError

        with pytest.raises(SystemExit) as ex, sel.exit_status():  # bad input: exit 2, the handler put back too
            raise ConfigError("bad")
        assert ex.value.code == 2 and signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        with pytest.raises(SystemExit) as ex, sel.exit_status():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        assert ex.value.code == 143
        assert "terminated (SIGTERM): run the same command again" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second one cannot break the exit
    finally:
        sel._TERMINATED.clear()
        for s, h in before.items():
            signal.signal(s, h)


def test_ray_init_keeps_the_jobs_sigterm_handler(monkeypatch):
    """Ray's core worker installs its own SIGTERM handler at ray.init (a stack dump, then abort: exit
    134); pipeline._ray_init puts back the one the job had set."""
    import ray

    from pivotal_ray import pipeline

    def handler(*a):
        raise AssertionError("not called")

    monkeypatch.setattr(ray, "init", lambda **kw: signal.signal(signal.SIGTERM, signal.SIG_DFL))  # as Ray does
    before = signal.signal(signal.SIGTERM, handler)
    try:
        pipeline._ray_init(address="local")
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, before)
