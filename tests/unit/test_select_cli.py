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
    jobs.select.main()
    out = capsys.readouterr().out
    assert "a copy of the filled-in to_label_round0.csv can be it" in out
    assert out.rstrip().splitlines()[-1] == "  " + shlex.join(["python", "-m", "jobs.select", *args])
    assert out.rstrip().endswith("'reweight.lr_milestones=[4]'")  # quoted again for the shell


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
    other = tmp_path / "elsewhere" / "to_label_round0.csv"  # the same name in another folder is no output
    pipeline.validate(from_dict({"output_dir": str(out), "labels": {"source": "file", "file": str(other)}}))
