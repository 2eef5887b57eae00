import json

import pytest

from pivotal_ray.report import collect, summary_markdown


def _write(d, method, seed, acc, rate=0.6, total_s=10.0):
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "method": method, "seed": seed, "test_acc_at_best_val": acc, "final_test_acc": acc - 0.01,
        "weight_auc": 0.9, "best_epoch": 3, "timings": {"total_s": total_s},
        "noise": {"kind": "adversarial", "rate": rate}}))


def test_collect_and_summarise(tmp_path):
    _write(tmp_path / "rbc" / "seed0", "rbc", 0, 0.90)
    _write(tmp_path / "rbc" / "seed1", "rbc", 1, 0.94)
    _write(tmp_path / "random" / "seed0", "random", 0, 0.80)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text("{}")  # not a run: skipped
    df = collect(tmp_path)
    assert list(df["method"]) == ["random", "rbc", "rbc"]
    md = summary_markdown(df)
    assert "| rbc | 2 | 92.00 +- 2.00 |" in md
    assert "| random | 1 | 80.00 +- 0.00 |" in md


def test_summarise_by_noise_rate_from_the_command_line(tmp_path, capsys):
    from jobs.summarize import main

    _write(tmp_path / "a" / "rbc" / "seed0", "rbc", 0, 0.90, rate=0.2)
    _write(tmp_path / "b" / "rbc" / "seed0", "rbc", 0, 0.70, rate=0.8)
    _write(tmp_path / "b" / "rbc" / "seed1", "rbc", 1, 0.80, rate=0.8)
    main([str(tmp_path), "--by", "noise.rate", "method"])
    out = capsys.readouterr().out
    assert "| 0.20 | rbc | 1 | 90.00 +- 0.00 |" in out
    assert "| 0.80 | rbc | 2 | 75.00 +- 5.00 |" in out


def test_runs_of_one_seed_in_one_group_are_flagged(tmp_path, capsys):
    """Two runs of one method and seed differ in some setting: their mean mixes configs."""
    from jobs.summarize import main

    _write(tmp_path / "a" / "rbc" / "seed0", "rbc", 0, 0.90, rate=0.2)
    _write(tmp_path / "b" / "rbc" / "seed0", "rbc", 0, 0.70, rate=0.8)
    main([str(tmp_path)])
    captured = capsys.readouterr()
    assert "| rbc | 2 | 80.00 +- 10.00 |" in captured.out
    assert "warning: 2 runs share a group and a seed" in captured.err
    assert f"{tmp_path}/a/rbc/seed0, {tmp_path}/b/rbc/seed0" in captured.err
    main([str(tmp_path), "--by", "noise.rate", "method"])  # split by the setting: no warning
    assert capsys.readouterr().err == ""
    main([str(tmp_path), "--by", "seed", "method"])  # seed named once in the groups shown
    assert "((0, 'rbc'): " in capsys.readouterr().err


def test_copies_of_one_run_are_told_apart_from_runs_that_differ(tmp_path, capsys):
    """A jobs.select run and its jobs.compare twin (the same config but where they ran): said to be
    copies, not runs differing in a setting not in --by."""
    from jobs.summarize import main

    from pivotal_ray.config import ExperimentConfig, to_dict
    from pivotal_ray.core import artifacts

    for where in ("select", "compare/runs/default"):
        d = tmp_path / where / "rbc" / "seed0"
        _write(d, "rbc", 0, 0.90)
        artifacts.write_manifest(d, config={**to_dict(ExperimentConfig()), "output_dir": str(d)}, seed=0, timings={})
    main([str(tmp_path)])
    err = capsys.readouterr().err
    assert "warning: 2 runs are copies of 1 run(s), the same config and seed" in err
    assert "differ in a setting" not in err
    other = tmp_path / "other" / "rbc" / "seed0"  # a third run of that seed, of another config
    _write(other, "rbc", 0, 0.70)
    artifacts.write_manifest(other, config={**to_dict(ExperimentConfig()), "seed": 0, "selection": {
        **to_dict(ExperimentConfig())["selection"], "budget": 8}}, seed=0, timings={})
    main([str(tmp_path)])
    err = capsys.readouterr().err
    assert "warning: 3 runs share a group and a seed, so they differ in a setting not in --by" in err


def test_collect_without_runs_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        collect(tmp_path)


def test_summarise_by_a_config_key_from_each_manifest(tmp_path, capsys):
    from jobs.summarize import main

    for k, seed, acc in ((4, 0, 0.80), (4, 1, 0.84), (10, 0, 0.90)):
        d = tmp_path / f"features.num_snapshots={k}" / "rbc" / f"seed{seed}"
        _write(d, "rbc", seed, acc)
        (d / "manifest.json").write_text(json.dumps({"config": {"features": {"num_snapshots": k}}}))
    main([str(tmp_path), "--by", "features.num_snapshots", "method"])
    out = capsys.readouterr().out
    assert "| 4 | rbc | 2 | 82.00 +- 2.00 |" in out and "| 10 | rbc | 1 | 90.00 +- 0.00 |" in out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--by", "features.nope"])
    assert "no run under" in capsys.readouterr().err


def test_a_run_without_the_key_is_summarised_not_dropped(tmp_path, capsys):
    from jobs.summarize import main

    for k, seed, acc in ((4, 0, 0.80), (None, 1, 0.84)):
        d = tmp_path / f"k{k}" / "rbc" / f"seed{seed}"
        _write(d, "rbc", seed, acc)
        if k is not None:
            (d / "manifest.json").write_text(json.dumps({"config": {"features": {"num_snapshots": k}}}))
    main([str(tmp_path), "--by", "features.num_snapshots", "method"])
    out = capsys.readouterr().out
    summary = out.split("\n\n")[0]
    assert "| 4.00 | rbc | 1 | 80.00 +- 0.00 |" in summary
    assert "| nan | rbc | 1 | 84.00 +- 0.00 |" in summary  # its own group (was: left out of the means)


def test_a_run_no_longer_finished_is_not_summarised(tmp_path):
    """A finished labels=file run whose labels changed runs again: its manifest says so, and any
    metrics.json still beside it is not a result."""
    _write(tmp_path / "rbc" / "seed0", "rbc", 0, 0.90)
    _write(tmp_path / "rbc" / "seed1", "rbc", 1, 0.94)
    (tmp_path / "rbc" / "seed1" / "manifest.json").write_text(json.dumps({"extra": {"status": "relabelled"}}))
    (tmp_path / "rbc" / "seed0" / "manifest.json").write_text(json.dumps({"extra": {"status": "complete"}}))
    assert collect(tmp_path)["seed"].tolist() == [0]


def test_collect_reports_both_accuracies_in_percent_and_the_mean_wall_time(tmp_path):
    # three runs of one method, wall times 10, 20 and 60 s: the mean (30) is neither the first,
    # the last, the median nor the sum
    for seed, total_s in ((0, 10.0), (1, 20.0), (2, 60.0)):
        _write(tmp_path / "rbc" / f"seed{seed}", "rbc", seed, 0.90, total_s=total_s)
    df = collect(tmp_path)
    assert df["test_acc_at_best_val"].tolist() == pytest.approx([90.0] * 3)
    assert df["final_test_acc"].tolist() == pytest.approx([89.0] * 3)  # percent, as the accuracy beside it
    summary = summary_markdown(df).split("\n\n")[0]
    assert summary.splitlines()[0].endswith("| wall time (s) |")
    assert summary.splitlines()[2].endswith("| 30 |"), summary


def test_the_per_run_table_has_the_boundary_auc_after_the_weight_auc(tmp_path):
    _write(tmp_path / "rbc" / "seed0", "rbc", 0, 0.90)
    df = collect(tmp_path)
    df["boundary_auc"] = 0.625
    per_run = summary_markdown(df).split("\n\n")[1]
    header = [c.strip() for c in per_run.splitlines()[0].strip("|").split("|")]
    assert header == ["method", "seed", "test_acc_at_best_val", "final_test_acc", "weight_auc", "boundary_auc",
                      "best_epoch", "total_s"]
    assert "| 0.90 | 0.62 | 3 |" in per_run.splitlines()[2]

