import json

import pytest

from pivotal_ray.report import collect, summary_markdown


def _write(d, method, seed, acc):
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "method": method, "seed": seed, "test_acc_at_best_val": acc, "final_test_acc": acc - 0.01,
        "weight_auc": 0.9, "best_epoch": 3, "timings": {"total_s": 10.0}}))


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


def test_collect_without_runs_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        collect(tmp_path)
