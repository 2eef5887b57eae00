"""Every Ray-free benchmark runs at --size tiny and writes its result keys (no timing assertions).

The Ray-based ones (extract_ray, kmeans_distributed) are in tests/integration/test_benchmarks_tiny.py.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import (craig_memory, e2e_stages, gbc_extract, kmeans_throughput, kmeans_vs_sklearn, reweight_step,
                        shard_memory, top_candidates)


def run(module, tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.jsonl"
    rec = module.main(["--size", "tiny", "--threads", "1", "--out", str(out), *extra])
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["benchmark"] == rec["benchmark"]
    assert rec["size"] == "tiny" and rec["machine"]["cpu_count"] >= 1
    return rec["results"]


def test_reweight_step(tmp_path, capsys):
    res = run(reweight_step, tmp_path)
    for model in ("lenet5", "resnet18_cifar"):
        r = res[model]
        assert {"time_ratio_direct", "time_ratio_l2rw", "mem_ratio_direct", "mem_ratio_l2rw",
                "jvp_over_eval_forward", "l2rw_one_pass_over_two_pass", "direct_routes_over_sgd",
                "direct_routes_peak_over_sgd", "dots_error"} <= set(r)
        assert set(r["seconds"]) == {"sgd", "direct", "l2rw", "l2rw_one_pass", "l2rw_two_pass", "eval_forward", "jvp",
                                     "direct_double_backward", "direct_finite_difference"}
        assert all(v > 0 for v in r["seconds"].values())
    # the double backward computes the JVP's inner products (float32 rounding apart)
    assert res["lenet5"]["dots_error"]["double_backward"] < 1e-4
    assert res["lenet5"]["dots_error"]["finite_difference"] < 0.5
    assert "time direct/sgd" in capsys.readouterr().out


def test_reweight_step_routes_take_the_package_direct_step():
    """The benchmark's direct step with the dots by double backward is DirectReweighter.step (the
    timed variants measure the same step, not another one); by finite difference, close to it."""
    import torch

    from pivotal_ray.core.reweight import LocalReducer, build_reweighter

    def after_one_step(route):
        s = reweight_step._setup("lenet5", "tiny", torch.device("cpu"))
        s["w"] = torch.rand(s["batch"], generator=torch.Generator().manual_seed(3))  # weights off the clip
        if route is None:
            build_reweighter("direct", meta_lr=reweight_step.META_LR).step(
                model=s["model"], optimizer=s["opt"], x=s["x"], y=s["y"], w=s["w"], x_meta=s["xm"],
                y_meta=s["ym"], lr=reweight_step.LR, global_batch=s["batch"], reducer=LocalReducer())
        else:
            reweight_step._direct_step(s, route)
        return torch.cat([p.detach().flatten() for p in s["model"].parameters()])

    # the weight update moves the parameters by up to 1.5e-3 here (meta_lr 0 against META_LR); the
    # routes differ from the package's step by 4e-9 (double backward) and 1e-5 (finite difference)
    package = after_one_step(None)
    torch.testing.assert_close(after_one_step("double_backward"), package, rtol=0, atol=1e-6)
    torch.testing.assert_close(after_one_step("finite_difference"), package, rtol=0, atol=1e-4)


def test_kmeans_throughput(tmp_path, capsys):
    res = run(kmeans_throughput, tmp_path)
    for shape in ("mnist", "cifar100"):
        r = res[shape]
        assert r["gflops_ratio"] > 0 and r["time_ratio_factor_over_dense"] > 0
        K, C, d = r["K"], r["C"], r["d"]
        # held bytes: K (C + d) float32 + 2 float64 per row, against K C d float32 + 2 float64
        assert r["mem_ratio_factor_over_dense"] == pytest.approx((4 * K * (C + d) + 16) / (4 * K * C * d + 16))
    assert "GFLOP/s ratio" in capsys.readouterr().out


def test_top_candidates(tmp_path, capsys):
    res = run(top_candidates, tmp_path)
    for shape in ("mnist", "cifar100"):
        r = res[shape]
        assert r["top_candidates_s"] > 0 and r["iteration_s"] > 0 and r["shortlist_width"] >= r["M"]
    assert "final pass" in capsys.readouterr().out


def test_kmeans_throughput_flop_count():
    fl = kmeans_throughput.iteration_flops(n=3, K=2, C=4, d=5, M=6)
    assert fl == {"gemm": 2 * 2 * 3 * 5 * 6 * 4, "contract": 2 * 2 * 3 * 6 * 4, "numerator": 2 * 2 * 3 * 4 * 5}


def test_kmeans_vs_sklearn(tmp_path, capsys):
    res = run(kmeans_vs_sklearn, tmp_path)
    assert {"ours", "sklearn"} <= set(res["seconds"]) and res["time_ratio_vs_sklearn"] > 0
    # same init, same iterations: the same local optimum (not a timing assertion)
    assert abs(res["objective_rel_diff_vs_sklearn"]) < 0.01
    assert "time ours/sklearn" in capsys.readouterr().out


def test_gbc_extract(tmp_path, capsys):
    res = run(gbc_extract, tmp_path)
    assert res["ratio_extract_over_backward"] > 0 and 0 <= res["projection_share"] <= 1
    assert len(res["drawn"]) == 5
    assert "extract/backward" in capsys.readouterr().out


def test_e2e_stages(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "rbc" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({
        "method": "rbc", "seed": 0, "dataset": "mnist", "budget": 20,
        "rounds": [{"round": 1, "features_s": 10.0, "kmeans_s": 5.0, "select_s": 16.0, "train_s": 100.0}],
        "timings": {"warmup_train_s": 200.0, "total_s": 320.0}}))
    (run_dir / "checkpoint_metrics").mkdir()
    (run_dir / "checkpoint_metrics" / "metrics.json").write_text(json.dumps({"epoch": 3, "val_acc": 0.5}))
    # random, same seed, read the warm-up back (2 s); base trains its one run
    for method, timings in (("random", {"warmup_train_s": 2.0, "total_s": 110.0}),
                            ("base", {"base_train_s": 90.0, "total_s": 95.0})):
        (tmp_path / "runs" / method / "seed0").mkdir(parents=True)
        (tmp_path / "runs" / method / "seed0" / "metrics.json").write_text(json.dumps({
            "method": method, "seed": 0, "dataset": "mnist", "budget": 20, "rounds": [], "timings": timings}))
    res = run(e2e_stages, tmp_path, "--root", str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match="computes nothing"):  # a cuda label on the same figures
        e2e_stages.main(["--device", "cuda", "--root", str(tmp_path / "runs")])
    by = {r["method"]: r for r in res["rows"]}
    assert (by["random"]["shared_warmup_s"], by["random"]["alone_s"]) == (200.0, 310.0)
    assert (by["base"]["first_train_s"], by["base"]["shared_warmup_s"], by["base"]["alone_s"]) == (90.0, 0.0, 95.0)
    row = by["rbc"]
    assert (row["shared_warmup_s"], row["alone_s"]) == (0.0, 320.0)
    # metrics since 807b261 carry the warm-up's epoch seconds: used whoever trained it (here no
    # run under the root did); a run stopped for labels (manifest status) is not tabulated
    for method, timings, status in (("gbc", {"warmup_train_s": 1.0, "warmup_epochs_s": 150.0, "total_s": 50.0},
                                     "complete"),
                                    ("craig", {"warmup_train_s": 1.0, "total_s": 50.0}, "awaiting_labels")):
        d = tmp_path / "solo" / method / "seed0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"method": method, "seed": 0, "dataset": "mnist", "budget": 20,
                                                    "rounds": [], "timings": timings}))
        (d / "manifest.json").write_text(json.dumps({"extra": {"status": status}}))
    (solo,) = run(e2e_stages, tmp_path / "solo", "--root", str(tmp_path / "solo"))["rows"]
    assert (solo["method"], solo["shared_warmup_s"], solo["alone_s"]) == ("gbc", 150.0, 200.0)
    assert row["first_train_s"] == 200.0 and row["features_s"] == 10.0 and row["kmeans_s"] == 5.0
    assert row["select_other_s"] == pytest.approx(1.0) and row["train_s"] == 100.0 and row["total_s"] == 320.0
    assert "| rbc | 0 |" in capsys.readouterr().out


def test_without_out_nothing_is_written(tmp_path, monkeypatch, capsys):
    """The committed benchmarks/results/*.jsonl only grow when --out names them."""
    monkeypatch.chdir(tmp_path)
    rec = e2e_stages.main(["--size", "tiny", "--root", str(tmp_path / "none")])
    assert rec["benchmark"] == "e2e_stages" and rec["results"]["rows"] == []
    assert list(tmp_path.iterdir()) == []
    assert "not saved (no --out)" in capsys.readouterr().out


def test_shard_memory(tmp_path, capsys):
    res = run(shard_memory, tmp_path)
    assert res["rows_bytes"] == 600 * 64 * 4 and res["select_peak_over_rows"] >= 0.0
    # in-place reordering changes no pick and leaves the rows in their order
    assert res["same_picks_as_copy"] and res["rows_restored"] and len(set(res["picks"])) == 10
    assert "select_pivotal peak" in capsys.readouterr().out
    res = run(shard_memory, tmp_path / "factor", "--shard", "factor")
    assert res["shard"] == "factor" and res["rows_bytes"] == 600 * 2 * (3 + 8) * 4
    assert res["rows_restored"] and len(set(res["picks"])) == 10 and res["same_picks_as_copy"] is None


def test_craig_memory(tmp_path, capsys):
    # a random 400-sample factor table (C = 3, d = 5), 64 coverage points, 10 picks
    res = run(craig_memory, tmp_path, "--synthetic", "400,1,3,5", "--table-dir", str(tmp_path / "t"),
              "--coverage", "64")
    assert (res["n"], res["C"], res["d"], res["coverage"]) == (400, 3, 5, 64)
    assert res["table_gib"] * 2**30 == 400 * 8 * 4 and res["sim_gib"] * 2**30 == 400 * 64 * 4
    # VmHWM and VmRSS come from per-thread counters the kernel syncs in batches: a tiny table's
    # rise can read a few hundred KiB below zero
    assert len(set(res["picks"])) == 10 and res["process_peak_above_gib"] > -0.01
    again = run(craig_memory, tmp_path / "again", "--synthetic", "400,1,3,5", "--table-dir", str(tmp_path / "t"),
                "--coverage", "64")
    assert again["picks"] == res["picks"]  # the same table and seed: the same picks
    # numpy on the host whatever --device says: a "cuda" result would be a CPU figure labelled cuda
    with pytest.raises(SystemExit):
        craig_memory.main(["--device", "cuda", "--synthetic", "400,1,3,5", "--table-dir", str(tmp_path / "t")])
    assert "runs in numpy on the host" in capsys.readouterr().err
