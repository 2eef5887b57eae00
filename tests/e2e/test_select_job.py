"""End to end: Algorithm 2 on the embedded toy set, exactly as ``python -m jobs.select`` composes it.

One module-scoped run per method (rbc, then random with the same seed and a shared Ray Train
storage path), then the rbc command again. Tiny settings keep the whole module to a couple of
minutes on 2 CPUs; the shared storage makes the second method reuse the warm-up run and the rerun
reuse every finished training run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pivotal_ray.config import to_dict
from pivotal_ray.core.artifacts import config_fingerprint
from pivotal_ray.core.data import build_data
from pivotal_ray.pipeline import run_experiment, warmup_name
from tests.e2e.conftest import TINY, resolve

pytestmark = pytest.mark.e2e

SEED = 3
COLUMNS = ["sample_id", "observed_label", "cleaned_label", "round", "cluster", "score"]


def _files_mtime_max(root: Path) -> float:
    return max(p.stat().st_mtime for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """rbc and random on the same seed and storage, then the rbc command a second time."""
    tmp = tmp_path_factory.mktemp("select_job")
    storage = tmp / "ray_train"

    def cfg(method: str, out: str):
        return resolve(*TINY, f"method={method}", f"seed={SEED}", f"output_dir={tmp / out}",
                       f"ray.storage_path={storage}")

    cfgs = {"rbc": cfg("rbc", "rbc"), "random": cfg("random", "random"), "rbc_again": cfg("rbc", "rbc_again")}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("pivotal_ray.pipeline")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics = {"rbc": run_experiment(cfgs["rbc"])}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    after_rbc = time.time()
    runs_after_rbc = sorted(p.name for p in storage.iterdir())
    metrics["random"] = run_experiment(cfgs["random"])
    runs_after_random = sorted(p.name for p in storage.iterdir())
    metrics["rbc_again"] = run_experiment(cfgs["rbc_again"])
    return {"tmp": tmp, "storage": storage, "cfgs": cfgs, "metrics": metrics, "after_rbc": after_rbc,
            "rbc_log": [r.getMessage() for r in records],
            "runs_after_rbc": runs_after_rbc, "runs_after_random": runs_after_random,
            "runs_after_rerun": sorted(p.name for p in storage.iterdir())}


def _selection(runs, key: str) -> pd.DataFrame:
    return pd.read_csv(Path(runs["cfgs"][key].output_dir) / "selection.csv")


def test_driver_log_has_a_line_per_stage(runs):
    """The job log (driver) names each training run with its best validation and each round's picks."""
    lines, m = runs["rbc_log"], runs["metrics"]["rbc"]
    sel = _selection(runs, "rbc")
    picked = sel.loc[sel["round"] == 1, "sample_id"].tolist()
    assert any(line.startswith("rbc: warmup training") for line in lines), lines
    assert f"round 1: picked {picked}" in "\n".join(lines), lines
    final = [line for line in lines if line.startswith(m["final_run"]["name"] + ":")]
    assert len(final) == 1 and f"best validation {m['best_val_acc']:.4f} at epoch {m['best_epoch']}" in final[0]


def test_cli_composition_matches_the_overrides(runs):
    c = runs["cfgs"]["rbc"]
    assert (c.data.name, c.selection.method, c.seed) == ("toy", "rbc", SEED)
    assert (c.selection.budget, c.selection.warmup, c.reweight.epochs) == (6, 2, 6)
    assert (c.features.num_snapshots, c.features.stride) == (2, 2)
    assert runs["cfgs"]["random"].selection.method == "random"


@pytest.mark.parametrize("method", ["rbc", "random"])
def test_artefacts_exist_and_are_well_formed(runs, method):
    cfg = runs["cfgs"][method]
    out = Path(cfg.output_dir)
    assert {"selection.csv", "metrics.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    budget, warmup = cfg.selection.budget, cfg.selection.warmup

    sel = _selection(runs, method)
    assert list(sel.columns) == COLUMNS
    assert len(sel) == budget
    assert sel["sample_id"].is_unique
    warm, picked = sel[sel["round"] == 0], sel[sel["round"] >= 1]
    assert len(warm) == warmup and len(picked) == budget - warmup
    assert sorted(sel["round"].unique()) == [0, 1]  # one round: per_round defaults to budget - warmup
    assert (warm["cluster"] == -1).all() and warm["score"].isna().all()
    if method == "rbc":
        assert (picked["cluster"] >= 0).all() and picked["cluster"].is_unique  # one pick per centroid
        assert np.isfinite(picked["score"]).all() and (picked["score"] > 0).all()
    else:
        assert (picked["cluster"] == -1).all() and picked["score"].isna().all()

    # the oracle cleaned the picked labels: cleaned = true label, observed = the noisy one
    bundle = build_data(cfg.data, cfg.noise, cfg.seed)
    pos = bundle.train.positions_of(sel["sample_id"].to_numpy())
    np.testing.assert_array_equal(sel["cleaned_label"].to_numpy(), bundle.train.y_true[pos])
    np.testing.assert_array_equal(sel["observed_label"].to_numpy(), bundle.train.y_obs[pos])

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(runs["metrics"][method]))  # the returned dict is what was written
    assert metrics["method"] == method and metrics["seed"] == SEED and metrics["dataset"] == "toy"
    assert (metrics["budget"], metrics["warmup"]) == (budget, warmup)
    assert 0.0 <= metrics["test_acc_at_best_val"] <= 1.0
    assert 0.0 <= metrics["final_test_acc"] <= 1.0
    assert 0 <= metrics["best_epoch"] < cfg.reweight.epochs
    assert math.isfinite(metrics["weight_auc"]) and 0.0 <= metrics["weight_auc"] <= 1.0
    assert metrics["meta_clean_frac_observed"] == pytest.approx(
        float(np.mean(sel["observed_label"] == sel["cleaned_label"])))
    assert metrics["meta_classes_missing"] == sorted({0, 1} - set(sel["cleaned_label"]))  # the toy's 2 classes
    assert {"warmup_train_s", "warmup_epochs_s", "total_s"} <= set(metrics["timings"])
    # the shared warm-up is trained once (by the first method) and read back by the others: its
    # epoch times (from the run's history) are reported either way
    assert metrics["timings"]["warmup_epochs_s"] > 0 and metrics["rounds"][0]["epochs_s"] > 0
    assert all(isinstance(v, float) and v >= 0 for v in metrics["timings"].values())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert metrics["rounds"][0]["picked"] == budget - warmup

    # the weight AUC scores the final snapshot's weights on the samples that are not meta samples
    # (a meta sample's label is clean by construction): recomputed from train_state.pt and selection.csv
    from pivotal_ray import storage
    from pivotal_ray.core.metrics import weight_auc

    w = storage.torch_load(storage.join(metrics["final_run"]["snapshot"], "train_state.pt"),
                           map_location="cpu")["weights"].numpy()
    non_meta = ~np.isin(bundle.train.sample_id, sel["sample_id"].to_numpy())
    clean = bundle.train.y_obs == bundle.train.y_true
    assert non_meta.sum() == len(bundle.train) - budget
    assert metrics["weight_auc"] == pytest.approx(weight_auc(w[non_meta], clean[non_meta]), rel=0, abs=1e-12)
    assert (metrics["final_run"]["device"], metrics["final_run"]["tf32"]) == ("cpu", None)  # what its Train workers trained on
    assert metrics["weight_auc"] != pytest.approx(weight_auc(w, clean), rel=0, abs=1e-12)  # the meta samples count

    manifest = json.loads((out / "manifest.json").read_text())
    assert {"config", "seed", "versions", "fingerprint", "timings"} <= set(manifest)
    assert manifest["seed"] == SEED
    assert manifest["fingerprint"] == config_fingerprint(to_dict(cfg))
    assert manifest["config"]["selection"]["method"] == method
    assert manifest["config"]["output_dir"] == cfg.output_dir
    assert manifest["versions"]["ray"].startswith("2.60") and manifest["versions"]["torch"]
    assert manifest["extra"]["status"] == "complete"
    assert manifest["timings"]["total_s"] == pytest.approx(metrics["timings"]["total_s"])


def test_same_seed_gives_the_same_warmup_for_both_methods(runs):
    rbc, rnd = _selection(runs, "rbc"), _selection(runs, "random")
    pd.testing.assert_frame_equal(rbc[rbc["round"] == 0].reset_index(drop=True),
                                  rnd[rnd["round"] == 0].reset_index(drop=True))
    # the picks are new samples in both cases (never a warm-up sample again)
    for sel in (rbc, rnd):
        assert not set(sel.loc[sel["round"] == 1, "sample_id"]) & set(sel.loc[sel["round"] == 0, "sample_id"])


def test_warmup_training_run_is_shared(runs):
    storage = runs["storage"]
    warmups = sorted(p.name for p in storage.iterdir() if p.name.startswith("warmup-"))
    assert warmups == [warmup_name(runs["cfgs"]["rbc"])] == [warmup_name(runs["cfgs"]["random"])]
    # random added only its own round-1 run, and did not touch the warm-up run's files
    added = sorted(set(runs["runs_after_random"]) - set(runs["runs_after_rbc"]))
    assert len(added) == 1 and added[0].startswith("random-round1-")
    assert _files_mtime_max(storage / warmups[0]) <= runs["after_rbc"]
    snaps = sorted((storage / warmups[0]).glob("checkpoint_*/model.pt"))
    assert len(snaps) == runs["cfgs"]["rbc"].reweight.epochs  # snapshot_every=1: one per epoch


def test_rerunning_the_rbc_command_gives_the_same_picks(runs):
    # same seed, same config (only output_dir differs, which is not part of the run's identity)
    first, again = _selection(runs, "rbc"), _selection(runs, "rbc_again")
    pd.testing.assert_frame_equal(first, again)
    m1, m2 = runs["metrics"]["rbc"], runs["metrics"]["rbc_again"]
    for key in ("test_acc_at_best_val", "best_epoch", "final_test_acc", "weight_auc"):
        assert m2[key] == m1[key], key
    # every training run was reused: no new run directory, and the reused warm-up took no training
    assert runs["runs_after_rerun"] == runs["runs_after_random"]
    assert m2["timings"]["warmup_train_s"] < m1["timings"]["warmup_train_s"]
    # ... while the epoch times come from the runs' histories, whichever invocation trained them
    assert m2["timings"]["warmup_epochs_s"] == m1["timings"]["warmup_epochs_s"] > 0
    assert m2["rounds"][0]["epochs_s"] == m1["rounds"][0]["epochs_s"] > 0
    assert m2["rounds"][0]["objective"] == m1["rounds"][0]["objective"]


def test_per_class_report_reads_the_finished_run(runs, capsys, tmp_path):
    """jobs.per_class reloads the best checkpoint and reproduces the run's test accuracy."""
    from jobs import per_class

    out = Path(runs["cfgs"]["rbc"].output_dir)
    per_class.main([str(out)])
    lines = capsys.readouterr().out.splitlines()
    acc = float(next(ln for ln in lines if ln.startswith("test accuracy")).split()[-1])
    assert acc == pytest.approx(runs["metrics"]["rbc"]["test_acc_at_best_val"], abs=1e-4)
    rows = [ln.split() for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("class"))) + 1:]]
    assert [int(r[0]) for r in rows] == [0, 1]  # the toy set's two classes
    selection = _selection(runs, "rbc")
    assert sum(int(r[3]) for r in rows) == len(selection)  # every meta sample counted under its cleaned label
    # ... the label the run trained with (a person's, under labels=file), not the true one
    moved = tmp_path / "relabelled"
    moved.mkdir()
    for f in ("manifest.json", "metrics.json"):
        (moved / f).write_bytes((out / f).read_bytes())
    sel = pd.read_csv(out / "selection.csv")
    sel["cleaned_label"] = 1 - sel["cleaned_label"]
    sel.to_csv(moved / "selection.csv", index=False)
    per_class.main([str(moved)])
    lines = capsys.readouterr().out.splitlines()
    counts = [int(ln.split()[3]) for ln in lines[-2:]]
    assert counts == np.bincount(sel["cleaned_label"], minlength=2).tolist() == [int(r[3]) for r in rows][::-1]
    with pytest.raises(SystemExit, match="finished jobs.select run"):
        per_class.main([str(out / "nope")])
    # a copy of the run's files without its Ray Train storage (as committed under docs/results/)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["final_run"]["best_snapshot"] = str(tmp_path / "gone" / "checkpoint_0")
    (moved / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="is not there: per_class needs the run's Ray Train storage"):
        per_class.main([str(moved)])


def test_kmeans_memory_benchmark_repeats_the_runs_picks(runs, tmp_path, capsys):
    """benchmarks.kmeans_memory re-clusters a finished run's round-1 table on the tests' Ray
    session and must get the run's own picks (same seed, same data); no memory assertions."""
    from benchmarks import kmeans_memory

    out = tmp_path / "result.jsonl"
    rec = kmeans_memory.main(["--size", "tiny", "--run", runs["cfgs"]["rbc"].output_dir, "--out", str(out)])
    res = rec["results"]
    assert res["same_picks"] is True
    assert res["table_bytes"] > 0
    for k in ("rss", "pss"):  # this session's processes
        assert res[f"peak_{k}_bytes"] >= res[f"base_{k}_bytes"] > 0
    # the node's used memory also moves with every other process on the machine: it can fall
    assert res["peak_node_used_bytes"] > 0 and res["base_node_used_bytes"] > 0
    assert res["peak_pss_bytes"] <= res["peak_rss_bytes"]  # PSS counts a shared page once, RSS once per process
    assert json.loads(out.read_text().splitlines()[0])["benchmark"] == "kmeans_memory"
    assert "picks as in selection.csv: True" in capsys.readouterr().out
    import ray

    assert ray.is_initialized()  # it used the tests' session and left it up


def test_kmeans_memory_benchmark_synthetic_factor_table(ray_session, tmp_path):
    """--synthetic writes a random RBC factor table once (N x K rows of C + d floats, the size it
    reports), reuses it on the next call, and the same table gives the same picks; budget 10."""
    from benchmarks import kmeans_memory
    from pivotal_ray.core.featuretable import read_factor_table

    argv = ["--size", "tiny", "--synthetic", "300,2,3,5", "--table-dir", str(tmp_path / "t"), "--max-iter", "2"]
    first = kmeans_memory.main(argv)["results"]
    feats = read_factor_table(tmp_path / "t")
    assert feats.A.shape == (300, 2, 3) and feats.X.shape == (300, 2, 5)
    np.testing.assert_allclose(feats.A.sum(2), 1.0, rtol=1e-5)  # label-free A = a softmax
    assert first["table_bytes"] == 300 * 2 * (3 + 5) * 4
    mtime = (tmp_path / "t" / "snapshot_0.parquet").stat().st_mtime_ns
    second = kmeans_memory.main(argv)["results"]
    assert (tmp_path / "t" / "snapshot_0.parquet").stat().st_mtime_ns == mtime  # reused, not rewritten
    assert first["picks"] == second["picks"] and len(set(first["picks"])) == 10


def test_a_comparison_two_runs_at_a_time_repeats_the_runs(runs, tmp_path):
    """jobs.compare with compare.concurrency=2 on a fresh Ray Train storage: rbc and random start
    together in two driver threads, one trains their shared warm-up while the other waits for it,
    then both train at once; each gives the picks and metrics of the runs made one at a time. The
    boundary AUC's margins come from the extraction stage's actors (jobs.compare's way), kept in
    each run's final_predictions table, and equal those computed in this process."""
    from pivotal_ray.compare import FINAL_PREDICTIONS, analyse_run, margins_here, margins_on_ray, run_compare
    from pivotal_ray.config import CompareConfig
    from pivotal_ray.core.baselines import read_predictions

    base = resolve(*TINY, "method=rbc", f"seed={SEED}", f"output_dir={tmp_path / 'unused'}")
    cc = CompareConfig(methods=["rbc", "random"], seeds=[SEED], output_root=str(tmp_path / "cmp"), plots=False,
                       concurrency=2)
    lines: list[str] = []
    df = run_compare(base=base, cc=cc, log=lines.append, margins=margins_on_ray)
    assert [line.split(" (")[0] for line in lines if line.startswith("started")] == [
        f"started rbc seed {SEED}", f"started random seed {SEED}"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cmp" / "ray_train").iterdir()) == [
        "random", "rbc", "warmup"]  # one warm-up for both
    for method in ("rbc", "random"):
        run_dir = tmp_path / "cmp" / "runs" / "default" / method / f"seed{SEED}"
        pd.testing.assert_frame_equal(pd.read_csv(run_dir / "selection.csv"), _selection(runs, method))
        got = json.loads((run_dir / "metrics.json").read_text())
        for key in ("test_acc_at_best_val", "best_epoch", "final_test_acc", "weight_auc"):
            assert got[key] == runs["metrics"][method][key], (method, key)
        cfg = resolve(*TINY, f"method={method}", f"seed={SEED}", f"output_dir={run_dir}")
        bundle = build_data(cfg.data, cfg.noise, cfg.seed)
        here = analyse_run(cfg=cfg, metrics=got, bundle=bundle, frac=cc.boundary_frac, margins=margins_here)
        pred = read_predictions(run_dir / FINAL_PREDICTIONS)
        np.testing.assert_allclose(pred.margin[pred.at(bundle.train.sample_id)], here.margin, rtol=1e-6, atol=1e-9)
        assert df.loc[df["method"] == method, "boundary_auc"].item() == pytest.approx(here.boundary_auc, abs=1e-12)
    assert len(df) == 2

