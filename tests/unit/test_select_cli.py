"""``python -m jobs.select``'s own output around the pipeline (no Ray: the pipeline is stubbed)."""

from __future__ import annotations

import shlex
import sys

import pytest

from pivotal_ray.config import ConfigError, from_dict


def test_a_stop_for_labels_prints_the_command_to_run_again(tmp_path, monkeypatch, capsys):
    """A user with several overrides is shown the exact command that goes on, not told to rebuild it."""
    import jobs.select
    import pivotal_ray.pipeline

    to_label = tmp_path / "out" / "to_label_round0.csv"
    to_label.parent.mkdir()
    to_label.write_text("sample_id,observed_label,round,cluster,score,label\n12,1,0,-1,,\n")

    def stopped(cfg, **_):
        return {"status": "awaiting_labels", "round": 0, "missing": 1, "to_label": str(to_label),
                "labels_file": cfg.labels_file}

    monkeypatch.setattr(pivotal_ray.pipeline, "run_experiment", stopped)
    args = ["labels=file", f"output_dir={tmp_path / 'out'}", "reweight.epochs=8", "reweight.lr_milestones=[4]"]  # as the shell passes them
    monkeypatch.setattr(sys, "argv", ["jobs/select.py", *args])
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setattr(sys, "executable", "/opt/my env/bin/python")  # not the python on PATH
    jobs.select.main()
    out = capsys.readouterr().out
    assert "a copy of the filled-in to_label_round0.csv can be it" in out
    assert out.rstrip().splitlines()[-1] == "  " + shlex.join(["/opt/my env/bin/python", "-m", "jobs.select", *args])
    assert out.rstrip().endswith("'reweight.lr_milestones=[4]'")  # quoted again for the shell
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: "/opt/my env/bin/python")  # an activated environment
    jobs.select.main()
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("  python -m jobs.select labels=file")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no python on PATH at all
    assert jobs.select.rerun_command() == shlex.join(["/opt/my env/bin/python", "-m", "jobs.select", *args])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # a job run by ray job submit
    jobs.select.main()
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == (
        "  ray job submit <the same options> -- python " + shlex.join(["-m", "jobs.select", *args]))


def test_a_labels_file_the_job_rewrites_is_refused_before_any_work(tmp_path):
    """labels.file pointing at a to_label_round<r>.csv of output_dir: the next stop would rewrite it
    with the samples still missing, and the labels already in it would be lost."""
    from pivotal_ray import pipeline

    out = tmp_path / "out"
    for name in ("to_label_round0.csv", "to_label_round12.csv"):
        cfg = from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(out / name)}})
        with pytest.raises(ConfigError, match=f"labels.file={out / name} is one of the files this job rewrites"):
            pipeline.validate(cfg)
        assert not out.exists()
    for name in ("to_label_round0_filled.csv", "labels.csv"):  # copies are what the message asks for
        cfg = from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(out / name)}})
        pipeline.validate(cfg)
    for name in ("to_label_round0.csv.bak", "copy_to_label_round0.csv"):  # the whole name, not a part
        pipeline.validate(from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(out / name)}}))
    other = tmp_path / "elsewhere" / "to_label_round0.csv"  # the same name in another folder is no output
    pipeline.validate(from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(other)}}))
    # through links either way: the folder, or a link in output_dir to a file elsewhere (os.replace
    # replaces the link), and another letter case (a case-insensitive file system)
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    other.parent.mkdir()
    other.write_text("sample_id,label\n")
    (out / "to_label_round1.csv").symlink_to(other)
    for given in (tmp_path / "link" / "to_label_round0.csv", out / "to_label_round1.csv", out / "TO_LABEL_ROUND2.CSV"):
        cfg = from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(given)}})
        with pytest.raises(ConfigError, match="is one of the files this job rewrites"):
            pipeline.labeler(cfg, None)  # the guard, before the labels are read (validate stops at the link)
    # output_dir given through the link, labels.file by the real folder
    cfg = from_dict({"output_dir": str(tmp_path / "link"),
                     "labels": {"source": "file", "file": str(out / "to_label_round0.csv")}})
    with pytest.raises(ConfigError, match="is one of the files this job rewrites"):
        pipeline.labeler(cfg, None)


def _lost_actor():
    import ray.exceptions as rex

    return rex.ActorDiedError()  # what ray.get raises for an actor whose process is gone


def test_worker_loss_is_found_inside_what_ray_and_ray_train_raise():
    import ray.exceptions as rex
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from pivotal_ray.distributed.failures import worker_lost

    died = _lost_actor()
    assert worker_lost(died) is died
    health = WorkerHealthCheckFailedError("A worker health check failed.", died)
    group = WorkerGroupError("rank 0 died", {0: health, 1: RuntimeError("gloo: Connection closed by peer")})
    assert worker_lost(group) is health
    # the same error for a report that would not pickle: the code's, rerunning cannot help
    unpicklable = rex.RayTaskError("poll", "Traceback ...", TypeError("cannot pickle '_thread.lock' object"))
    assert worker_lost(WorkerGroupError("rank 0", {0: WorkerHealthCheckFailedError("failed", unpicklable)})) is None
    assert worker_lost(ControllerError(rex.NodeDiedError("node 10.0.0.5 died"))) is not None
    # a remote task that called a dead actor (the parameter server calling a lost shard): Ray raises
    # a RayTaskError that is also an ActorDiedError; the actor's own error names which one died
    relayed = rex.RayTaskError("ParameterServer.select", "Traceback ...", died).as_instanceof_cause()
    assert isinstance(relayed, rex.ActorDiedError) and worker_lost(relayed) is died
    task = rex.RayTaskError("select", "Traceback ...", rex.OutOfMemoryError("memory monitor killed the task"))
    assert isinstance(worker_lost(task), rex.OutOfMemoryError)
    try:  # the pipeline re-raises some Ray errors as its own, from them
        raise RuntimeError("training run x failed") from died
    except RuntimeError as wrapped:
        assert worker_lost(wrapped) is died
    from pivotal_ray.distributed.failures import lost_worker_message

    said = lost_worker_message(rex.NodeDiedError("\x1b[36mnode 10.0.0.5\x1b[39m died"))
    assert "(NodeDiedError):\n  node 10.0.0.5 died\n" in said and "\x1b" not in said
    # errors of the code or the data stay errors
    assert worker_lost(ValueError("bad")) is None
    assert worker_lost(WorkerGroupError("rank 0 raised", {0: ValueError("bad batch")})) is None
    init_failed = rex.ActorDiedError(rex.RayTaskError("__init__", "Traceback ...", ValueError("bad arg")))
    assert init_failed.actor_init_failed and worker_lost(init_failed) is None
    try:  # a handled loss earlier in the same frame is not this error's cause
        try:
            raise died
        except rex.ActorDiedError:
            raise KeyError("another error while handling it")  # noqa: B904
    except KeyError as other:
        assert worker_lost(other) is None


@pytest.mark.parametrize("job", ["select", "compare"])
def test_a_lost_worker_ends_the_job_with_one_message_and_status_3(tmp_path, monkeypatch, capsys, job):
    import importlib

    import pivotal_ray.compare
    import pivotal_ray.pipeline

    def lose(*_, **__):
        raise RuntimeError("wrapped") from _lost_actor()

    monkeypatch.setattr(pivotal_ray.pipeline, "run_experiment", lose)
    monkeypatch.setattr(pivotal_ray.compare, "run_compare", lose)
    module = importlib.import_module(f"jobs.{job}")
    out_key = "output_dir" if job == "select" else "compare.output_root"
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", f"{out_key}={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as ex:
        module.main()
    assert ex.value.code == 3
    err = capsys.readouterr().err
    assert err.startswith("error: a Ray worker process or node was lost during the run (ActorDiedError):")
    assert "run the same command again" in err and "Traceback" not in err

    def bug(*_, **__):
        raise ValueError("a bug, not a loss")

    monkeypatch.setattr(pivotal_ray.pipeline, "run_experiment", bug)
    monkeypatch.setattr(pivotal_ray.compare, "run_compare", bug)
    with pytest.raises(SystemExit) as ex:  # Hydra's own report of the traceback, as before
        module.main()
    assert ex.value.code == 1 and "ValueError: a bug, not a loss" in capsys.readouterr().err


def test_the_lost_worker_search_ends_on_a_cycle_and_the_message_keeps_rays_lines_plain():
    from pivotal_ray.distributed.failures import lost_worker_message, worker_lost

    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a  # causes that loop back
    assert worker_lost(a) is None
    text = "\x1b[1;31mhead\x1b[0m\n" + "\n".join(f"\tline{i}" for i in range(1, 15))
    said = lost_worker_message(RuntimeError(text))
    assert "\x1b" not in said and "\n  head\n  line1\n" in said  # colours off, tabs stripped
    assert "  line11\n" in said and "line12" not in said  # Ray's first 12 lines
