"""The Ray-based benchmarks run at --size tiny in the tests' Ray session (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from benchmarks import extract_ray, kmeans_distributed

pytestmark = pytest.mark.integration


def run(module, tmp_path) -> dict:
    out = tmp_path / "result.jsonl"
    rec = module.main(["--size", "tiny", "--out", str(out)])
    assert json.loads(out.read_text().splitlines()[0])["benchmark"] == rec["benchmark"]
    return rec["results"]


def test_extract_ray(ray_session, tmp_path, capsys):
    res = run(extract_ray, tmp_path)
    assert res["rows"] == res["K"] * res["n"] and res["ratio_ray_over_bare"] > 0
    assert set(res["rows_per_s"]) == {"ray", "bare"}
    assert "Ray / bare" in capsys.readouterr().out
    assert ray_session.is_initialized()  # the benchmark used the session and left it up


def test_kmeans_distributed(ray_session, tmp_path, capsys):
    res = run(kmeans_distributed, tmp_path)
    for S in (1, 2):
        r = res[f"shards_{S}"]
        assert r["shards"] == S and r["rounds"] >= 1
        assert {"round_s", "shard_s", "call_overhead_s", "server_s", "ps_share"} <= set(r["median"])
    assert "PS share" in capsys.readouterr().out
    assert ray_session.is_initialized()
