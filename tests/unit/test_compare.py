"""jobs.compare's assembly (specs, rows, results files) and figures, without Ray.

The end-to-end test replaces Algorithm 2 by a fake that writes a finished run's artefacts (a real
toy MLP snapshot, weights, selection.csv), so the analysis (boundary AUC from the final model's
margins) and every figure run on real files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pivotal_ray.compare import expand, finished_metrics, result_row, run_compare, write_results
from pivotal_ray.config import CompareConfig, ConfigError, from_dict, to_dict
from pivotal_ray.core import artifacts
from pivotal_ray.core.data import build_data
from pivotal_ray.core.metrics import weight_auc
from pivotal_ray.core.models import build_model


def _base(tmp_path: Path, **extra):
    return from_dict({"output_dir": str(tmp_path / "unused"), "noise": {"rate": 0.6}, **extra})


def _metrics(method: str, seed: int, acc: float, **kw) -> dict:
    return {"method": method, "seed": seed, "test_acc_at_best_val": acc, "final_test_acc": acc - 0.01,
            "weight_auc": 0.9, "best_epoch": 3, "meta_size": 6,
            "timings": {"warmup_train_s": 5.0, "total_s": 20.0},
            "rounds": [{"round": 1, "features_s": 1.0, "kmeans_s": 2.0, "select_s": 3.5, "train_s": 4.0},
                       {"round": 2, "features_s": 1.5, "kmeans_s": 0.5, "select_s": 2.0, "train_s": 1.0}], **kw}


def test_expand_covers_variants_methods_seeds_with_one_storage(tmp_path):
    cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 2], output_root=str(tmp_path / "cmp"),
                       vary_key="noise.rate", vary_values=[0.2, 0.8])
    specs = expand(base=_base(tmp_path), cc=cc)
    assert len(specs) == 2 * 2 * 2
    assert {(s.variant["noise.rate"], s.method, s.seed) for s in specs} == {
        (r, m, s) for r in (0.2, 0.8) for m in ("random", "rbc") for s in (0, 2)}
    for s in specs:
        assert s.cfg.noise.rate == s.variant["noise.rate"] and s.cfg.selection.method == s.method
        assert s.cfg.seed == s.seed and s.cfg.ray.storage_path == str((tmp_path / "cmp" / "ray_train").resolve())
    assert len({s.cfg.output_dir for s in specs}) == len(specs)


def test_expand_keeps_a_configured_storage_and_rejects_bad_input(tmp_path):
    base = _base(tmp_path, ray={"storage_path": "/shared/store"})
    (spec,) = expand(base=base, cc=CompareConfig(methods=["base"], output_root=str(tmp_path)))
    assert spec.cfg.ray.storage_path == "/shared/store" and spec.variant == {}
    with pytest.raises(ConfigError, match="unknown method.*'nope'.*choose from"):
        expand(base=base, cc=CompareConfig(methods=["rbc", "nope"], output_root=str(tmp_path)))
    with pytest.raises(ConfigError, match="no key 'rat'"):
        expand(base=base, cc=CompareConfig(output_root=str(tmp_path), vary_key="noise.rat", vary_values=[0.2]))
    with pytest.raises(ConfigError, match="noise.rate"):  # a varied value is validated like any config
        expand(base=base, cc=CompareConfig(output_root=str(tmp_path), vary_key="noise.rate", vary_values=[1.5]))


@pytest.mark.parametrize("bad, match", [({"methods": []}, "compare.methods"), ({"seeds": [-1]}, "compare.seeds"),
                                        ({"output_root": None}, "output_root is required"),
                                        ({"vary_key": "noise.rate"}, "vary_values"),
                                        ({"vary_values": [1]}, "vary_key"),
                                        ({"vary_key": "noise.rate", "vary_values": [0.2, 0.2]}, "a value twice"),
                                        ({"vary_key": "noise.rate", "vary_values": [1, 1.0]}, "a value twice"),
                                        ({"boundary_frac": 0.0}, r"compare.boundary_frac=0.0 must be in \(0, 1\]"),
                                        ({"boundary_frac": 1.5}, r"compare.boundary_frac=1.5 must be in \(0, 1\]"),
                                        ({"boundary_frac": -0.1}, "compare.boundary_frac"),
                                        ({"methods": ["rbc", "random", "rbc"]}, "lists a method twice"),
                                        ({"seeds": [0, 1, 0]}, "lists a seed twice"),
                                        ({"concurrency": 0}, r"compare.concurrency=0 must be >= 1")])
def test_compare_config_names_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        CompareConfig(**{"output_root": "/x", **bad})


def test_compare_config_accepts_the_whole_set_as_the_boundary():
    # (0, 1]: 1.0 scores every non-meta sample (the weight AUC), and is allowed
    assert CompareConfig(output_root="/x", boundary_frac=1.0).boundary_frac == 1.0


def test_result_row_converts_units_and_sums_stage_times():
    row = result_row(metrics=_metrics("rbc", 1, 0.9), variant={"noise.rate": 0.4}, boundary_auc=0.7)
    assert row["method"] == "rbc" and row["seed"] == 1 and row["noise.rate"] == 0.4
    assert row["test_acc_at_best_val"] == pytest.approx(90.0) and row["final_test_acc"] == pytest.approx(89.0)
    assert (row["weight_auc"], row["boundary_auc"], row["best_epoch"], row["meta_size"]) == (0.9, 0.7, 3, 6)
    assert (row["warmup_train_s"], row["total_s"], row["base_train_s"]) == (5.0, 20.0, 0.0)
    assert (row["features_s"], row["kmeans_s"], row["select_s"], row["train_s"]) == (2.5, 2.5, 5.5, 5.0)
    assert math.isnan(result_row(metrics=_metrics("base", 0, 0.5), variant={}, boundary_auc=None)["boundary_auc"])


def test_write_results_json_csv_and_markdown(tmp_path):
    rows = [result_row(metrics=_metrics(m, s, a), variant={}, boundary_auc=b)
            for m, s, a, b in (("rbc", 0, 0.90, 0.6), ("rbc", 1, 0.94, 0.8), ("random", 0, 0.80, 0.5))]
    df = write_results(rows=rows, out=tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(df.to_json(orient="records"))
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv["method"]) == ["random", "rbc", "rbc"] and list(csv["seed"]) == [0, 0, 1]
    md = (tmp_path / "results.md").read_text()
    assert "| rbc | 2 | 92.00 +- 2.00 | 0.900 +- 0.000 | 0.700 +- 0.100 |" in md
    assert "boundary AUC" in md and "| random | 1 | 80.00 +- 0.00 |" in md


def test_write_results_groups_by_the_varied_key(tmp_path):
    rows = [result_row(metrics=_metrics("rbc", s, a), variant={"noise.rate": r}, boundary_auc=0.5)
            for r, s, a in ((0.2, 0, 0.99), (0.2, 1, 0.97), (0.8, 0, 0.70))]
    write_results(rows=rows, out=tmp_path, by=("noise.rate", "method"))
    md = (tmp_path / "results.md").read_text()
    assert "| 0.20 | rbc | 2 | 98.00 +- 1.00 |" in md and "| 0.80 | rbc | 1 | 70.00 +- 0.00 |" in md


def test_finished_metrics_needs_a_complete_manifest_of_the_same_run(tmp_path):
    out = tmp_path / "run"
    cfg = _base(tmp_path, output_dir=str(out))
    assert finished_metrics(cfg) is None  # nothing there yet
    artifacts.write_manifest(out, config=to_dict(cfg), seed=0, timings={}, extra={"status": "running"})
    artifacts.write_json(out / "metrics.json", {"method": "rbc"})
    artifacts.write_csv(out / "selection.csv", pd.DataFrame({"sample_id": [1]}))
    assert finished_metrics(cfg) is None  # interrupted: run (resume) it
    artifacts.write_manifest(out, config=to_dict(cfg), seed=0, timings={}, extra={"status": "complete"})
    assert finished_metrics(cfg) == {"method": "rbc"}
    # a run recorded before a setting existed is the same run while that setting is at its default
    old = to_dict(cfg)
    del old["reweight"]["meta_class_balanced"]
    artifacts.write_manifest(out, config=old, seed=0, timings={}, extra={"status": "complete"})
    assert finished_metrics(cfg) == {"method": "rbc"}
    # settings the method never reads do not make another run: rbc extracts no GBC features
    assert finished_metrics(_base(tmp_path, output_dir=str(out), features={"proj_dim": 256})) == {"method": "rbc"}
    # a finished run of another config is never read into this comparison
    other = _base(tmp_path, output_dir=str(out), features={"num_snapshots": 3})
    with pytest.raises(artifacts.OutputDirError, match=r"holds a different run.*features.num_snapshots"):
        finished_metrics(other)
    gbc = _base(tmp_path, output_dir=str(tmp_path / "gbc"), selection={"method": "gbc"})
    artifacts.write_manifest(gbc.output_dir, config=to_dict(gbc), seed=0, timings={}, extra={"status": "complete"})
    with pytest.raises(artifacts.OutputDirError, match=r"features.proj_dim"):  # gbc reads proj_dim
        finished_metrics(_base(tmp_path, output_dir=gbc.output_dir, selection={"method": "gbc"},
                               features={"proj_dim": 256}))



def test_a_run_is_identified_by_the_similarity_its_kmeans_used(tmp_path):
    def done(cfg, config=None):
        artifacts.write_manifest(cfg.output_dir, config=config or to_dict(cfg), seed=0, timings={},
                                 extra={"status": "complete"})
        artifacts.write_json(Path(cfg.output_dir) / "metrics.json", {"ok": 1})
        artifacts.write_csv(Path(cfg.output_dir) / "selection.csv", pd.DataFrame({"sample_id": [1]}))

    def cfg(method, mode, sim="auto", name="r"):
        return _base(tmp_path, output_dir=str(tmp_path / name), selection={"method": method, "similarity": sim},
                     reweight={"mode": mode})

    # "auto" is the same run as what it resolves to: signed under l2rw, abs otherwise
    done(cfg("gbc", "l2rw", "signed"))
    assert finished_metrics(cfg("gbc", "l2rw")) == {"ok": 1}
    with pytest.raises(artifacts.OutputDirError, match=r"selection.similarity"):
        finished_metrics(cfg("gbc", "l2rw", "abs"))
    done(cfg("gbc", "direct", "abs", name="d"))
    assert finished_metrics(cfg("gbc", "direct", name="d")) == {"ok": 1}
    # methods without weighted K-means never read it
    done(cfg("random", "l2rw", "abs", name="rand"))
    assert finished_metrics(cfg("random", "l2rw", "signed", name="rand")) == {"ok": 1}
    # rbc_k clusters RBC features with plain (unweighted) K-means: no similarity either
    from pivotal_ray.pipeline import run_identity

    assert "similarity" not in run_identity(cfg("rbc_k", "l2rw", "signed"))["selection"]
    done(cfg("rbc_k", "l2rw", "abs", name="rbck"))
    assert finished_metrics(cfg("rbc_k", "l2rw", "signed", name="rbck")) == {"ok": 1}
    # a run recorded before the setting existed clustered with |<G_j, C_i>|: not today's l2rw default
    old = cfg("gbc", "l2rw", name="old")
    recorded = to_dict(old)
    del recorded["selection"]["similarity"]
    done(old, recorded)
    with pytest.raises(artifacts.OutputDirError, match=r"selection.similarity"):
        finished_metrics(old)
    assert finished_metrics(cfg("gbc", "l2rw", "abs", name="old")) == {"ok": 1}


def _fake_pipeline(calls: list, lift: float = 0.6):
    """Writes what run_experiment writes for a finished toy run: snapshot, selection, metrics.

    Clean samples' weights are lifted by ``lift``: 0.6 separates them from the noisy ones entirely
    (every subset scores AUC 1), a smaller lift leaves an overlap whose AUC depends on the subset."""

    def run(cfg):
        calls.append(cfg)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        bundle = build_data(cfg.data, cfg.noise, cfg.seed)
        train = bundle.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(to_dict(cfg)["model"], bundle.num_classes, bundle.input_shape)
        snap = out / "snap"
        snap.mkdir()
        torch.save(model.state_dict(), snap / "model.pt")
        rng = np.random.default_rng(cfg.seed)
        clean = train.y_obs == train.y_true
        weights = np.clip(clean * lift + rng.random(len(train)) * 0.5, 0, 1)  # clean samples weigh more
        torch.save({"weights": torch.as_tensor(weights, dtype=torch.float32), "epoch": 4}, snap / "train_state.pt")
        ids = rng.choice(train.sample_id, 6, replace=False)
        pd.DataFrame({"sample_id": ids, "observed_label": 0, "cleaned_label": 0, "round": [0, 0, 1, 1, 1, 1],
                      "cluster": -1, "score": np.nan}).to_csv(out / "selection.csv", index=False)
        metrics = _metrics(cfg.selection.method, cfg.seed, 0.8 + 0.1 * (cfg.selection.method == "rbc"),
                           weight_auc=weight_auc(weights, clean),
                           final_run={"name": "fake", "snapshot": str(snap), "best_snapshot": str(snap)})
        artifacts.write_json(out / "metrics.json", metrics)
        artifacts.write_manifest(out, config=to_dict(cfg), seed=cfg.seed, timings={}, extra={"status": "complete"})
        return metrics

    return run


def test_run_compare_end_to_end_with_a_fake_pipeline(tmp_path):
    calls: list = []
    root = tmp_path / "cmp"
    cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 1], output_root=str(root), vary_key="noise.rate",
                       vary_values=[0.2, 0.6])
    logs: list[str] = []
    df = run_compare(base=_base(tmp_path), cc=cc, run=_fake_pipeline(calls), log=logs.append)
    assert len(calls) == 8 and len(df) == 8
    assert {"results.json", "results.csv", "results.md", "decision_regions.png", "weight_histograms.png",
            "accuracy_vs_noise.rate.png"} <= {p.name for p in root.iterdir()}
    for png in root.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # the boundary AUC is the weight AUC on the 10% of non-meta samples nearest the final model's boundary
    assert df["boundary_auc"].between(0, 1).all() and df["weight_auc"].gt(0.5).all()
    assert (df["test_acc_at_best_val"].round(6) == np.where(df["method"] == "rbc", 90.0, 80.0)).all()
    # a second call reads every finished run instead of running it, and removes what a compare
    # killed while writing its results left behind
    cut = root / ".results.json.k2j4.tmp"
    cut.write_text('{"half')
    again = run_compare(base=_base(tmp_path), cc=cc, run=_fake_pipeline(calls), log=logs.append)
    assert len(calls) == 8
    assert not cut.exists()
    pd.testing.assert_frame_equal(df, again)
    assert sum(line.split("] ")[1].startswith("read") for line in logs if line.startswith("[")) == 8


def _boundary_auc_by_hand(cfg, metrics: dict, frac: float) -> tuple[float, np.ndarray, np.ndarray]:
    """The documented boundary AUC, recomputed from a run's files without compare.analyse_run: the
    final snapshot's weights and model, margin = top-1 minus top-2 softmax probability, over the
    training samples that are not meta samples (selection.csv), on the ``frac`` nearest the boundary."""
    from pivotal_ray.core.metrics import boundary_auc

    bundle = build_data(cfg.data, cfg.noise, cfg.seed)  # this run's own seed: its noise, its clean mask
    train = bundle.train
    snap = Path(metrics["final_run"]["snapshot"])
    weights = torch.load(snap / "train_state.pt", weights_only=True)["weights"].numpy()
    model = build_model(to_dict(cfg)["model"], bundle.num_classes, bundle.input_shape)
    model.load_state_dict(torch.load(snap / "model.pt", weights_only=True))
    with torch.no_grad():
        probs = torch.softmax(model.eval()(train.inputs(np.arange(len(train)))).double(), dim=1).numpy()
    top = np.sort(probs, axis=1)
    margin = top[:, -1] - top[:, -2]
    meta = pd.read_csv(Path(cfg.output_dir) / "selection.csv")["sample_id"].to_numpy()
    cand = ~np.isin(train.sample_id, meta)
    clean = train.y_obs == train.y_true
    return boundary_auc(weights[cand], clean[cand], margin[cand], frac=frac), margin, cand


def test_boundary_auc_is_recomputed_from_each_runs_own_files(tmp_path):
    """Every row's boundary AUC is the one documented: compare.boundary_frac (not the default) of
    the run's non-meta samples nearest its final model's boundary (top-1 minus top-2), scored with
    the final weights, on the data of that run's seed (seed 1's noise is not seed 0's)."""
    from pivotal_ray.compare import analyse_run

    cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 1], output_root=str(tmp_path / "cmp"),
                       boundary_frac=0.3, plots=False)
    df = run_compare(base=_base(tmp_path), cc=cc, run=_fake_pipeline([], lift=0.2), log=lambda line: None)
    assert len(df) == 4 and df["boundary_auc"].lt(1).all()  # weights that overlap: the subset matters
    for spec in expand(base=_base(tmp_path), cc=cc):
        metrics = json.loads((Path(spec.cfg.output_dir) / "metrics.json").read_text())
        want, margin, cand = _boundary_auc_by_hand(spec.cfg, metrics, cc.boundary_frac)
        row = df[(df["method"] == spec.method) & (df["seed"] == spec.seed)]
        assert row["boundary_auc"].item() == pytest.approx(want, abs=1e-12), (spec.method, spec.seed)
        # the toy set has two classes, where top-1 alone orders samples as top-1 minus top-2 does:
        # the margins and the candidates are checked as arrays too
        analysis = analyse_run(cfg=spec.cfg, metrics=metrics, bundle=build_data(spec.cfg.data, spec.cfg.noise,
                                                                               spec.cfg.seed), frac=cc.boundary_frac)
        np.testing.assert_allclose(analysis.margin, margin, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(analysis.candidate, cand)
        assert (~cand).sum() == 6
        assert analysis.boundary_auc == pytest.approx(want, abs=1e-12)


def test_every_run_is_validated_before_the_first_one_trains(tmp_path):
    # the last spec's run directory holds another run (and a variant is too large for the data):
    # refused before the first spec runs, and before Ray is connected (before_runs)
    from pivotal_ray.core.artifacts import OutputDirError

    root = tmp_path / "cmp"
    cc = CompareConfig(methods=["random", "rbc"], seeds=[0], output_root=str(root), plots=False)
    stale = expand(base=_base(tmp_path), cc=cc)[-1].cfg
    artifacts.write_manifest(stale.output_dir, config={**to_dict(stale), "seed": 99}, seed=99, timings={})
    calls, connected = [], []
    with pytest.raises(OutputDirError, match="holds a different run") as err:
        run_compare(base=_base(tmp_path), cc=cc, run=calls.append, before_runs=lambda: connected.append(1))
    assert calls == [] and connected == []
    # the fix in the settings of jobs.compare, where a run folder is <compare.output_root>/runs/...
    assert "choose another compare.output_root or delete" in str(err.value) and "output_dir or" not in str(err.value)
    file_root = tmp_path / "results.txt"
    file_root.write_text("x")
    with pytest.raises(ConfigError, match=f"compare.output_root={file_root} cannot be created: {file_root} is a file"):
        run_compare(base=_base(tmp_path), cc=CompareConfig(methods=["random"], seeds=[0], output_root=str(file_root),
                                                           plots=False), run=calls.append,
                    before_runs=lambda: connected.append(1))
    assert calls == [] and connected == []
    # a jobs.select output_dir given as the comparison's root (its manifest.json is there)
    run_dir = tmp_path / "one_run"
    artifacts.write_manifest(run_dir, config=to_dict(_base(tmp_path)), seed=0, timings={})
    with pytest.raises(ConfigError, match=f"compare.output_root={run_dir} is the output_dir of a single run"):
        run_compare(base=_base(tmp_path), cc=CompareConfig(methods=["random"], seeds=[0], output_root=str(run_dir),
                                                           plots=False), run=calls.append,
                    before_runs=lambda: connected.append(1))
    assert calls == [] and connected == [] and [p.name for p in run_dir.iterdir()] == ["manifest.json"]
    big = CompareConfig(methods=["random"], seeds=[0], output_root=str(tmp_path / "c2"), plots=False,
                        vary_key="selection.budget", vary_values=[6, 5000])
    with pytest.raises(ConfigError, match="selection.budget=5000 is larger than the 600 training samples"):
        run_compare(base=_base(tmp_path), cc=big, run=calls.append, before_runs=lambda: connected.append(1))
    assert calls == [] and connected == []


def test_cluster_checks_run_for_every_unfinished_spec_before_the_first_run(tmp_path):
    """A spec the cluster cannot run (the last one checked here) is refused after Ray is
    connected and before any spec trains; finished specs are not checked (they only read back)."""
    cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 1], output_root=str(tmp_path / "cmp"), plots=False)
    specs = expand(base=_base(tmp_path), cc=cc)
    finished = specs[0].cfg  # a finished run: read back, so not checked
    artifacts.write_manifest(finished.output_dir, config=to_dict(finished), seed=finished.seed, timings={},
                             extra={"status": "complete"})
    (Path(finished.output_dir) / "selection.csv").write_text("sample_id\n")
    (Path(finished.output_dir) / "metrics.json").write_text("{}")
    order, checked = [], []

    def check(cfg, bundle):
        order.append("check")
        checked.append((cfg.selection.method, cfg.seed, len(bundle.train)))
        if len(checked) == 3:  # the last one checked cannot run
            raise ConfigError("the cluster cannot run it")

    with pytest.raises(ConfigError, match="the cluster cannot run it"):
        run_compare(base=_base(tmp_path), cc=cc, run=lambda cfg: order.append("run"),
                    before_runs=lambda: order.append("connect"), check=check)
    assert order == ["connect"] + ["check"] * 3
    assert sorted(checked) == sorted((s.method, s.seed, 600) for s in specs[1:])


def test_plots_without_matplotlib_fail_before_any_run(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    calls: list = []
    cc = CompareConfig(methods=["random"], seeds=[0], output_root=str(tmp_path / "cmp"), plots=True)
    with pytest.raises(ConfigError, match=r"compare.plots=true needs scikit-learn.*pip install scikit-learn.*"
                                          r"compare.plots=false"):
        run_compare(base=_base(tmp_path), cc=cc, run=lambda cfg: calls.append(cfg))
    assert calls == [] and not (tmp_path / "cmp").exists()
    expand(base=_base(tmp_path), cc=CompareConfig(methods=["random"], seeds=[0], output_root=str(tmp_path / "c2"),
                                                  plots=False))  # no figures: nothing needed


def test_tsne_sample_reads_only_the_rows_it_plots(tmp_path, monkeypatch):
    """The t-SNE subset (picks + a seeded draw) equals reading the whole table and taking those
    rows, but only the chosen rows' features are read (a GBC table can be many GiB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pivotal_ray import compare_figures
    from pivotal_ray.core import densetable
    from pivotal_ray.core.seeding import numpy_rng

    rng = np.random.default_rng(0)
    n, K, W = 300, 2, 5
    ids = np.sort(rng.choice(10_000, n, replace=False))
    G = rng.standard_normal((n, K, W)).astype(np.float32)
    sid, snap = np.repeat(ids, K), np.tile(np.arange(K), n)
    order = rng.permutation(n * K)  # any row order, over three files
    for f, rows in enumerate(np.array_split(order, 3)):
        col = pa.FixedSizeListArray.from_arrays(pa.array(G.reshape(n * K, W)[rows].reshape(-1)),
                                                type=pa.list_(pa.float32(), W))
        pq.write_table(pa.table({"sample_id": pa.array(sid[rows], pa.int64()),
                                 "snapshot": pa.array(snap[rows], pa.int32()),
                                 "epoch": pa.array(snap[rows], pa.int32()), "g": col},
                                schema=densetable.dense_schema(W)), tmp_path / f"part-{f}.parquet")
    picked = ids[[3, 150, 299]]
    requested = []
    real = densetable.read_feature_table
    monkeypatch.setattr(densetable, "read_feature_table",
                        lambda p, sample_ids=None: requested.append(sample_ids) or real(p, sample_ids=sample_ids))
    sub, picks = compare_figures.tsne_sample(tmp_path, picked_ids=picked, seed=4, max_rows=40)
    assert len(requested) == 1 and len(requested[0]) == 40  # never the whole table
    # what reading everything and subsampling positions with the same seeded draw gives
    full = real(tmp_path)
    pos = np.flatnonzero(np.isin(full.sample_id, picked))
    rest = np.setdiff1d(np.arange(n), pos)
    keep = np.sort(np.concatenate([pos, numpy_rng(4, "compare", "tsne").choice(rest, 37, replace=False)]))
    np.testing.assert_array_equal(sub.sample_id, full.sample_id[keep])
    np.testing.assert_array_equal(sub.G, full.G[keep])
    np.testing.assert_array_equal(sub.sample_id[picks], picked)
    np.testing.assert_array_equal(densetable.table_sample_ids(tmp_path), ids)
    # more picks than the plot holds (compare.tsne_max): a seeded subset of the picks, nothing else
    many = ids[::5]  # 60 picks
    sub, picks = compare_figures.tsne_sample(tmp_path, picked_ids=many, seed=4, max_rows=40)
    assert len(sub.sample_id) == 40 and len(picks) == 40 and np.isin(sub.sample_id, many).all()


def test_a_compare_waits_for_a_run_another_invocation_is_at_work_on(tmp_path, monkeypatch):
    """jobs.compare's runs may overlap another comparison's: they wait (and then read back) instead
    of failing half-way as jobs.select does."""
    from pivotal_ray import pipeline

    calls: list = []
    fake = _fake_pipeline(calls)
    waits: list = []
    monkeypatch.setattr(pipeline, "run_experiment", lambda cfg, **kw: waits.append(kw) or fake(cfg))
    cc = CompareConfig(methods=["random"], seeds=[0], output_root=str(tmp_path / "cmp"), plots=False)
    run_compare(base=_base(tmp_path), cc=cc, log=lambda line: None)
    assert waits == [{"wait": True}] and len(calls) == 1


def test_a_run_folder_claimed_while_the_comparison_ran_is_refused_in_compare_terms(tmp_path):
    """Another comparison on the root put a run of other settings in this spec's folder after this one
    read it: the re-check under the folder's lock refuses it, naming compare.output_root."""
    from pivotal_ray.core.artifacts import OutputDirError

    cc = CompareConfig(methods=["random"], seeds=[0], output_root=str(tmp_path / "cmp"), plots=False)

    def claim(cfg, bundle, **_):  # runs after the folders were read, before the run
        other = {**to_dict(cfg), "seed": 7}
        artifacts.write_manifest(cfg.output_dir, config=other, seed=7, timings={}, extra={"status": "running"})

    with pytest.raises(OutputDirError, match="choose another compare.output_root or delete") as err:
        run_compare(base=_base(tmp_path), cc=cc, check=claim, log=lambda line: None)
    assert "output_dir or" not in str(err.value)


# --------------------------------------------------------------------------- compare.concurrency


def _counting(run, *, delay: float = 0.05, fail: set | None = None, gate=None):
    """``run`` wrapped to count the runs in flight (the most at once in ``state["peak"]``), call
    ``gate(cfg)`` (where given: the test's ordering) and sleep ``delay`` inside each, and raise for
    the (method, seed) pairs in ``fail``."""
    import threading
    import time

    lock, state = threading.Lock(), {"now": 0, "peak": 0, "started": []}

    def counted(cfg):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["started"].append((cfg.selection.method, cfg.seed))
        try:
            if gate is not None:
                gate(cfg)
            time.sleep(delay)
            if (cfg.selection.method, cfg.seed) in (fail or set()):
                raise RuntimeError(f"{cfg.selection.method} seed {cfg.seed} broke")
            return run(cfg)
        finally:
            with lock:
                state["now"] -= 1

    return counted, state


def test_concurrent_runs_give_the_same_results_as_one_at_a_time(tmp_path):
    """compare.concurrency=3: at most 3 runs in flight (and 3 reached), every run once, started in
    spec order, and the same results table as one run at a time; the per-run lines keep spec order."""
    base = _base(tmp_path)
    one = CompareConfig(methods=["random", "rbc"], seeds=[0, 1, 2], output_root=str(tmp_path / "one"), plots=False)
    seq = run_compare(base=base, cc=one, run=_fake_pipeline([]), log=lambda line: None)
    calls, logs = [], []
    first_three = threading.Barrier(3)  # random seeds 0-2, started together: all in flight at once

    def gate(cfg):
        if cfg.selection.method == "random":
            first_three.wait(timeout=60)

    run, state = _counting(_fake_pipeline(calls), gate=gate)
    three = CompareConfig(methods=["random", "rbc"], seeds=[0, 1, 2], output_root=str(tmp_path / "three"),
                          plots=False, concurrency=3)
    df = run_compare(base=base, cc=three, run=run, log=logs.append)
    assert state["peak"] == 3 and len(calls) == 6
    assert state["started"] == [(m, s) for m in ("random", "rbc") for s in (0, 1, 2)]
    pd.testing.assert_frame_equal(seq, df)
    assert [line.split("] ")[1].split(":")[0] for line in logs if line.startswith("[")] == [
        f"ran {m} seed {s} default" for m in ("random", "rbc") for s in (0, 1, 2)]
    assert sum(line.startswith("started ") for line in logs) == 6
    assert sum(line.startswith("finished ") for line in logs) == 6
    # read back afterwards: nothing runs
    again = run_compare(base=base, cc=three, run=lambda cfg: pytest.fail("ran a finished run"), log=lambda line: None)
    pd.testing.assert_frame_equal(seq, again)


def _seed0_after_seed1_failed(logs: list):
    """(log, gate) for :func:`run_compare` and :func:`_counting`: the log keeps the lines in ``logs``,
    and random seed 0 goes on only once the driver has logged random seed 1's failure."""
    failed = threading.Event()

    def log(line):
        logs.append(line)
        if "random seed 1 failed: " in line:
            failed.set()

    def gate(cfg):
        if cfg.seed == 0:
            assert failed.wait(timeout=60)

    return log, gate


def test_a_failed_run_starts_no_other_and_waits_for_those_in_flight(tmp_path):
    """With 2 at a time, random seed 1 fails while random seed 0 is still training: no other run
    starts, seed 0 finishes (its folder complete, read back next time), then the failure is raised."""
    calls, logs = [], []
    log, gate = _seed0_after_seed1_failed(logs)
    run, state = _counting(_fake_pipeline(calls), fail={("random", 1)}, gate=gate)
    cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 1], output_root=str(tmp_path / "cmp"), plots=False,
                       concurrency=2)
    with pytest.raises(RuntimeError, match="random seed 1 broke"):
        run_compare(base=_base(tmp_path), cc=cc, run=run, log=log)
    assert state["started"] == [("random", 0), ("random", 1)] or state["started"] == [("random", 1), ("random", 0)]
    assert [c.seed for c in calls] == [0]  # random seed 0 finished
    assert any("random seed 1 failed: RuntimeError: random seed 1 broke; no other run starts" in line for line in logs)
    assert (Path(calls[0].output_dir) / "metrics.json").exists()
    # the next invocation reads seed 0 back and runs the rest
    calls2 = []
    df = run_compare(base=_base(tmp_path), cc=cc, run=_fake_pipeline(calls2), log=lambda line: None)
    assert sorted((c.selection.method, c.seed) for c in calls2) == [("random", 1), ("rbc", 0), ("rbc", 1)]
    assert len(df) == 4


def test_every_failure_is_named_and_the_first_raised(tmp_path):
    """Both runs fail, seed 1 first (seed 0 waits for it): seed 1's error is raised, both are named."""
    logs = []
    log, gate = _seed0_after_seed1_failed(logs)
    run, _ = _counting(_fake_pipeline([]), fail={("random", 0), ("random", 1)}, gate=gate)
    cc = CompareConfig(methods=["random"], seeds=[0, 1], output_root=str(tmp_path / "cmp"), plots=False, concurrency=2)
    with pytest.raises(RuntimeError, match="^random seed 1 broke$"):
        run_compare(base=_base(tmp_path), cc=cc, run=run, log=log)
    assert "2 runs failed (random seed 1, random seed 0); raising the first" in logs


def test_ctrl_c_leaves_ray_without_waiting_for_the_runs_in_flight(tmp_path, monkeypatch):
    """A Ctrl-C while runs train: Ray is left at once (pipeline.leave_ray, which ends their actors)
    and the interrupt propagates; the run threads are daemons, never joined."""
    import threading

    from pivotal_ray import pipeline

    left, release = [], threading.Event()
    monkeypatch.setattr(pipeline, "leave_ray", lambda: left.append(1))

    def blocked(cfg):
        release.wait(30)
        return {}

    def log(line):
        if line.startswith("started random seed 1"):
            raise KeyboardInterrupt

    cc = CompareConfig(methods=["random"], seeds=[0, 1, 2], output_root=str(tmp_path / "cmp"), plots=False,
                       concurrency=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_compare(base=_base(tmp_path), cc=cc, run=blocked, log=log)
        assert left == [1]
        runs = [t for t in threading.enumerate() if t.name.startswith("compare[")]
        assert len(runs) == 2 and all(t.daemon for t in runs)  # seeds 0 and 1, never joined
    finally:
        release.set()


def test_the_cluster_check_gets_the_runs_that_share_it(tmp_path):
    """check(cfg, bundle, runs_at_once=n) where n > 1 runs share the cluster: compare.concurrency,
    or the unfinished runs if fewer; check(cfg, bundle) as before where one run has it to itself."""
    seen = []
    for concurrency, expected in ((1, None), (2, 2), (8, 4)):
        cc = CompareConfig(methods=["random", "rbc"], seeds=[0, 1], output_root=str(tmp_path / f"c{concurrency}"),
                           plots=False, concurrency=concurrency)
        seen.clear()
        run_compare(base=_base(tmp_path), cc=cc, run=_fake_pipeline([]), log=lambda line: None,
                    check=lambda cfg, bundle, runs_at_once=None: seen.append(runs_at_once))
        assert seen == [expected] * 4


def test_each_run_threads_log_lines_name_their_run(tmp_path, caplog):
    """Lines that the pipeline logs from a run's thread start with [<method> seed <s>]; the
    handlers lose the label filter afterwards."""
    import logging

    def run(cfg):
        logging.getLogger("pivotal_ray.pipeline").info("round 1: picked %s", [cfg.seed])
        return _fake_pipeline([])(cfg)

    cc = CompareConfig(methods=["rbc"], seeds=[0, 1], output_root=str(tmp_path / "cmp"), plots=False, concurrency=2)
    with caplog.at_level(logging.INFO, logger="pivotal_ray.pipeline"):
        run_compare(base=_base(tmp_path), cc=cc, run=run, log=lambda line: None)
        logging.getLogger("pivotal_ray.pipeline").info("after")
    lines = sorted(r.getMessage() for r in caplog.records)
    assert lines == ["[rbc seed 0] round 1: picked [0]", "[rbc seed 1] round 1: picked [1]", "after"]
    assert not any(f for h in logging.getLogger().handlers for f in h.filters if type(f).__name__ == "_RunLabel")


def test_margins_on_ray_keeps_the_final_models_table_and_checks_before_extracting(tmp_path, monkeypatch,
                                                                                  predictions_here):
    """jobs.compare's margins (the extraction stage; here its in-process stand-in): the same
    margins as computed in this process, written once to the run's final_predictions/ and read
    back by the next analysis; extracted again (with the cluster checks first) when the final
    snapshot differs; refused before extracting where the checks refuse."""
    from pivotal_ray import pipeline
    from pivotal_ray.compare import FINAL_PREDICTIONS, analyse_run, margins_here, margins_on_ray

    cfg = _base(tmp_path)
    cfg = from_dict({**to_dict(cfg), "output_dir": str(tmp_path / "run")})
    metrics = _fake_pipeline([])(cfg)
    bundle = build_data(cfg.data, cfg.noise, cfg.seed)
    from pivotal_ray.core import locks

    checked: list[bool] = []
    per_node: list[tuple] = []
    held: list[str] = []
    monkeypatch.setattr(pipeline, "_check_shared_storage", lambda c, extracts=None: checked.append(extracts))
    monkeypatch.setattr(pipeline, "_check_per_node",
                        lambda c, extracts, clusters=False, trains=True: per_node.append((extracts, clusters, trains)))
    real_hold = locks.hold

    def hold(key, *a, **kw):  # the run folder's lock, held while the table is made and read
        held.append(key)
        return real_hold(key, *a, **kw)

    monkeypatch.setattr(locks, "hold", hold)
    (tmp_path / "run" / ".final_predictions.ab12cd34.tmp").mkdir()  # an analysis killed mid-extraction
    here = analyse_run(cfg=cfg, metrics=metrics, bundle=bundle, frac=0.1, margins=margins_here)
    on_ray = analyse_run(cfg=cfg, metrics=metrics, bundle=bundle, frac=0.1, margins=margins_on_ray)
    np.testing.assert_allclose(on_ray.margin, here.margin, rtol=0, atol=1e-12)
    assert on_ray.boundary_auc == pytest.approx(here.boundary_auc, abs=1e-12)
    assert (tmp_path / "run" / FINAL_PREDICTIONS / "features.json").exists()
    assert not (tmp_path / "run" / ".final_predictions.ab12cd34.tmp").exists()
    assert len(predictions_here) == 1 and checked == [True]
    assert per_node == [(True, False, False)]  # an extraction actor must fit a node; nothing trains here
    assert held == [f"output_dir:{os.path.realpath(tmp_path / 'run')}"]  # run_experiment's lock of that folder
    np.testing.assert_array_equal(predictions_here[0]["sample_ids"], bundle.train.sample_id)
    assert [s["epoch"] for s in predictions_here[0]["snapshots"]] == [4]  # train_state.pt's epoch
    analyse_run(cfg=cfg, metrics=metrics, bundle=bundle, frac=0.1, margins=margins_on_ray)
    assert len(predictions_here) == 1 and checked == [True]  # read back: no extraction, no check
    # another final snapshot (a run trained anew): extracted again, over the old table
    other = tmp_path / "run" / "snap2"
    shutil.copytree(tmp_path / "run" / "snap", other)
    torch.save(build_model(to_dict(cfg)["model"], bundle.num_classes, bundle.input_shape, seed=3).state_dict(),
               other / "model.pt")
    moved = {**metrics, "final_run": {**metrics["final_run"], "snapshot": str(other)}}
    again = analyse_run(cfg=cfg, metrics=moved, bundle=bundle, frac=0.1, margins=margins_on_ray)
    assert len(predictions_here) == 2 and predictions_here[1]["overwrite"] and checked == [True, True]
    assert len(per_node) == 2
    assert not np.allclose(again.margin, on_ray.margin)
    np.testing.assert_allclose(again.margin, analyse_run(cfg=cfg, metrics=moved, bundle=bundle, frac=0.1).margin,
                               rtol=0, atol=1e-12)

    def refuse(c, extracts=None):
        raise ConfigError("output_dir is not shared")

    monkeypatch.setattr(pipeline, "_check_shared_storage", refuse)
    with pytest.raises(ConfigError, match="not shared"):
        analyse_run(cfg=cfg, metrics=metrics, bundle=bundle, frac=0.1, margins=margins_on_ray)
    assert len(predictions_here) == 2  # refused before any extraction
    # with ray.autoscaling the nodes up now say nothing of the nodes to come: no per-node check
    monkeypatch.setattr(pipeline, "_check_shared_storage", lambda c, extracts=None: checked.append(extracts))
    grows = from_dict({**to_dict(cfg), "ray": {**to_dict(cfg)["ray"], "autoscaling": True}})
    analyse_run(cfg=grows, metrics=metrics, bundle=bundle, frac=0.1, margins=margins_on_ray)
    assert len(predictions_here) == 3 and checked[-1] is True and len(per_node) == 2
