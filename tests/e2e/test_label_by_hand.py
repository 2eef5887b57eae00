"""End to end: a person labels the meta samples (``labels=file``) instead of the oracle.

The same command is run until the run completes: it stops with the warm-up's samples to label,
then with round 1's picks, then finishes. Labelled with the true labels, the loop picks what the
oracle run of the same seed picks; a label the person gives that differs from the truth is the
one the run trains with and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pivotal_ray import pipeline, training
from pivotal_ray.config import ConfigError
from pivotal_ray.core.data import build_data
from tests.e2e.conftest import TINY, resolve

pytestmark = pytest.mark.e2e

SEED = 5


def _status(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["extra"]["status"]


def _label(to_label: Path, labels_file: Path, truth: dict[int, int], *, wrong: int | None = None) -> list[int]:
    """Fill in ``to_label`` with the true labels (``wrong``: that sample gets another class) and
    append its rows to ``labels_file``, as a person would; returns the ids labelled."""
    df = pd.read_csv(to_label)
    df["label"] = [(truth[i] + 1) % 2 if i == wrong else truth[i] for i in df["sample_id"]]
    df.to_csv(labels_file, mode="a", header=not labels_file.exists(), index=False)
    return df["sample_id"].tolist()


@pytest.fixture(scope="module")
def loop(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_by_hand")
    storage = tmp / "ray_train"
    common = (*TINY, "method=rbc", f"seed={SEED}", f"ray.storage_path={storage}")
    oracle_cfg = resolve(*common, f"output_dir={tmp / 'oracle'}")
    oracle = pipeline.run_experiment(oracle_cfg)
    hand_cfg = resolve(*common, f"output_dir={tmp / 'hand'}", "labels=file")
    out, labels_file = tmp / "hand", tmp / "hand" / "labels.csv"
    bundle = build_data(hand_cfg.data, hand_cfg.noise, hand_cfg.seed)
    truth = dict(zip(bundle.train.sample_id.tolist(), bundle.train.y_true.tolist()))
    stops = [pipeline.run_experiment(hand_cfg)]
    status = [_status(out)]
    files = {0: sorted(p.name for p in out.iterdir())}
    warm = _label(out / "to_label_round0.csv", labels_file, truth)
    stops.append(pipeline.run_experiment(hand_cfg))
    status.append(_status(out))
    picks = pd.read_csv(out / "to_label_round1.csv")["sample_id"].tolist()
    wrong = picks[0]
    _label(out / "to_label_round1.csv", labels_file, truth, wrong=wrong)
    final = pipeline.run_experiment(hand_cfg)
    return {"oracle_cfg": oracle_cfg, "oracle": oracle, "hand_cfg": hand_cfg, "out": out, "stops": stops,
            "status": status, "files": files, "warm": warm, "picks": picks, "wrong": wrong, "final": final,
            "truth": truth, "storage": storage}


def test_each_stop_exports_what_needs_a_label_and_writes_no_results(loop):
    s0, s1 = loop["stops"]
    assert (s0["status"], s0["round"], s0["missing"]) == ("awaiting_labels", 0, 2)  # selection.warmup=2
    assert (s1["status"], s1["round"], s1["missing"]) == ("awaiting_labels", 1, 4)  # the 4 picks
    assert loop["status"] == ["awaiting_labels", "awaiting_labels"]
    assert loop["files"][0] == ["manifest.json", "to_label_round0.csv"]  # no selection.csv / metrics.json yet
    assert s0["labels_file"] == str(loop["out"] / "labels.csv")
    to_label = pd.read_csv(loop["out"] / "to_label_round1.csv", keep_default_na=False)
    assert list(to_label.columns) == ["sample_id", "observed_label", "round", "cluster", "score", "label"]
    assert (to_label["round"] == 1).all() and (to_label["label"] == "").all()
    assert sorted(to_label["cluster"]) == [0, 1, 2, 3]


def test_true_labels_by_hand_pick_what_the_oracle_picks(loop):
    oracle = pd.read_csv(Path(loop["oracle_cfg"].output_dir) / "selection.csv")
    assert sorted(loop["warm"]) == sorted(oracle.loc[oracle["round"] == 0, "sample_id"])
    assert sorted(loop["picks"]) == sorted(oracle.loc[oracle["round"] == 1, "sample_id"])


def test_the_run_trains_with_and_reports_the_persons_labels(loop):
    final, out, truth, wrong = loop["final"], loop["out"], loop["truth"], loop["wrong"]
    assert final["labels_source"] == "file" and final["meta_size"] == 6
    assert _status(out) == "complete"
    sel = pd.read_csv(out / "selection.csv")
    given = dict(zip(sel["sample_id"], sel["cleaned_label"]))
    assert given[wrong] == (truth[wrong] + 1) % 2 != truth[wrong]
    assert all(given[i] == truth[i] for i in given if i != wrong)
    observed = dict(zip(sel["sample_id"], sel["observed_label"]))
    assert final["meta_clean_frac_observed"] == pytest.approx(np.mean([observed[i] == given[i] for i in given]))
    # the person's runs are their own: their names carry a digest of the labels they trained on
    names = sorted(p.name for p in loop["storage"].iterdir())
    assert sum("-labels" in n for n in names) == 2, names  # the warm-up and round 1 of the labelled loop
    assert final["final_run"]["name"].startswith("rbc-round1-") and "-labels" in final["final_run"]["name"]


def test_the_warmup_trained_by_an_earlier_invocation_keeps_its_epoch_times(loop):
    """The warm-up was trained by the second invocation, which stopped for round 1's labels; the
    last one only read it back, yet metrics.json reports the seconds its epochs took."""
    (warmup,) = [p for p in loop["storage"].iterdir() if p.name.startswith("warmup-") and "-labels" in p.name]
    last = max((d for d in warmup.glob("checkpoint_*") if d.is_dir()),
               key=lambda d: json.loads((d / "metrics.json").read_text())["epoch"])
    history = json.loads((last / "history.json").read_text())
    timings = loop["final"]["timings"]
    assert timings["warmup_epochs_s"] == pytest.approx(sum(h["epoch_s"] for h in history))
    assert timings["warmup_epochs_s"] > 0
    assert loop["final"]["rounds"][0]["epochs_s"] > 0
    # round 1's picks were made by the invocation that stopped for their labels: the last one read
    # them back and reports that invocation's stage times, saying so
    rnd = loop["final"]["rounds"][0]
    assert rnd["picks_read_back"] is True and rnd["features_s"] > 0 and rnd["select_s"] >= rnd["features_s"]
    assert "picks_read_back" not in loop["oracle"]["rounds"][0]  # picked and used by one invocation


def test_rerunning_the_finished_loop_reads_it_back(loop, monkeypatch):
    def no_train(*args, **kwargs):
        raise AssertionError("training started on a finished run")

    monkeypatch.setattr(training, "train", no_train)
    assert pipeline.run_experiment(loop["hand_cfg"]) == loop["final"]


def test_a_bad_labels_file_fails_before_any_work(loop, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "connect", lambda cfg: pytest.fail("connect() ran"))
    labels = tmp_path / "labels.csv"
    labels.write_text("sample_id,label\n0,7\n")  # the toy set has 2 classes
    out = tmp_path / "out"
    cfg = resolve(*TINY, f"output_dir={out}", "labels=file", f"labels.file={labels}")
    with pytest.raises(ConfigError, match=r"not classes of this data set \(0 to 1\)"):
        pipeline.run_experiment(cfg)
    assert not out.exists()


def test_compare_refuses_labels_by_hand(tmp_path):
    from pivotal_ray.compare import run_compare
    from pivotal_ray.config import CompareConfig

    cfg = resolve(*TINY, f"output_dir={tmp_path / 'x'}", "labels=file")
    with pytest.raises(ConfigError, match="jobs.select labels=file"):
        run_compare(base=cfg, cc=CompareConfig(output_root=str(tmp_path / "c")))


def test_impossible_resources_are_refused_before_the_first_stop(ray_session, tmp_path):
    """The first stop claims output_dir (its manifest names the config): a config the cluster
    cannot run is refused before it, so fixing the config does not lock the person out."""
    out = tmp_path / "out"
    cfg = resolve(*TINY, f"output_dir={out}", "labels=file", "ray.num_workers=64")
    with pytest.raises(ConfigError, match="lower ray.num_workers"):
        pipeline.run_experiment(cfg)
    assert not out.exists()


def test_a_labels_file_put_in_output_dir_before_the_first_run_is_read(ray_session, tmp_path):
    """``<output_dir>/labels.csv`` is where the person's labels go by default: writing it before the
    first run (labels known in advance) is not a foreign file in output_dir."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = resolve(*TINY, f"output_dir={out}", "labels=file")
    bundle = build_data(cfg.data, cfg.noise, cfg.seed)
    warm = training.warmup_ids(cfg, bundle)
    first = int(warm[0])
    label = int(bundle.train.y_true[bundle.train.positions_of([first])[0]])
    (out / "labels.csv").write_text(f"sample_id,label\n{first},{label}\n")
    stop = pipeline.run_experiment(cfg)
    assert (stop["status"], stop["round"], stop["missing"]) == ("awaiting_labels", 0, len(warm) - 1)
    assert pd.read_csv(out / "to_label_round0.csv")["sample_id"].tolist() == [int(i) for i in warm[1:]]


def test_a_corrected_label_trains_the_finished_loop_again(loop):
    """After the loop finished, the person corrects the label they got wrong: the same command
    trains round 1 again (the warm-up's labels are unchanged, so it is read back) and reports
    the corrected label; a rerun then reads that run back."""
    out, wrong, truth = loop["out"], loop["wrong"], loop["truth"]
    labels_file = out / "labels.csv"
    df = pd.read_csv(labels_file)
    df.loc[df["sample_id"] == wrong, "label"] = truth[wrong]
    df.to_csv(labels_file, index=False)
    before = sorted(p.name for p in loop["storage"].iterdir())
    again = pipeline.run_experiment(loop["hand_cfg"])
    after = sorted(p.name for p in loop["storage"].iterdir())
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("rbc-round1-"), new  # only round 1 trained again
    assert again["final_run"]["name"] == new[0] != loop["final"]["final_run"]["name"]
    sel = pd.read_csv(out / "selection.csv")
    assert all(y == truth[i] for i, y in zip(sel["sample_id"], sel["cleaned_label"]))
    assert _status(out) == "complete"
    assert pipeline.run_experiment(loop["hand_cfg"]) == again


def test_a_finished_loop_whose_labels_file_is_gone_is_refused(loop, tmp_path):
    """Without its labels file a finished loop cannot tell corrected labels from lost ones: it is
    refused with the fix, and its results stay as they were."""
    out = loop["out"]
    moved = tmp_path / "labels.csv"
    (out / "labels.csv").rename(moved)
    try:
        before = (out / "metrics.json").read_text()
        with pytest.raises(ConfigError, match="which is gone: put it back"):
            pipeline.run_experiment(loop["hand_cfg"])
        assert (out / "metrics.json").read_text() == before and _status(out) == "complete"
    finally:
        moved.rename(out / "labels.csv")
