"""Bad input fails before any work, with a clear error that names the fix, and writes nothing.

Each case goes through the same path as ``python -m jobs.select``: Hydra composition ->
``resolve_config`` -> ``run_experiment``. Starting Ray and training are replaced by tripwires, so
a check that is missing (or runs too late) fails the test at once instead of starting a run.
One case also goes through the real CLI to check its exit code and one-line message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pivotal_ray import pipeline, training
from pivotal_ray.config import ConfigError, to_dict
from pivotal_ray.core.artifacts import OutputDirError, write_manifest
from tests.e2e.conftest import TINY, compose_config, resolve

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Fail loudly if the pipeline gets as far as starting Ray or training."""

    def no_connect(cfg):
        raise WorkStarted("connect() ran: the bad input was not caught before starting Ray")

    def no_train(*args, **kwargs):
        raise WorkStarted("training started: the bad input was not caught before any work")

    monkeypatch.setattr(pipeline, "connect", no_connect)
    monkeypatch.setattr(training, "train", no_train)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"  # does not exist yet: every case must leave it that way


def _run(*overrides: str):
    return pipeline.run_experiment(resolve(*TINY, *overrides))


def test_unknown_dataset_group_is_a_hydra_error_listing_the_choices(out):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_config("dataset=foo", f"output_dir={out}")
    msg = str(err.value)
    assert "dataset/foo" in msg and "toy" in msg and "mnist" in msg  # names the available options
    assert not out.exists()


def test_unknown_dataset_name(out, tripwires):
    with pytest.raises(ConfigError, match=r"unknown dataset 'foo': choose one of \[.*'mnist'.*'toy'.*\]"):
        _run("data.name=foo", f"output_dir={out}")
    assert not out.exists()


def test_unknown_method(out, tripwires):
    with pytest.raises(ConfigError, match=r"unknown method 'foo': choose one of .*random.*rbc") as err:
        _run("method=foo", f"output_dir={out}")
    assert "method=" in str(err.value)  # says which setting to change
    assert not out.exists()


def test_unknown_noise_kind(out, tripwires):
    with pytest.raises(ConfigError, match=r"unknown noise kind 'foo': choose one of .*adversarial.*uniform"):
        _run("noise.kind=foo", f"output_dir={out}")
    assert not out.exists()


def test_budget_not_larger_than_warmup(out, tripwires):
    with pytest.raises(ConfigError, match=r"selection.budget=2 must be larger than selection.warmup=2") as err:
        _run("selection.budget=2", "selection.warmup=2", f"output_dir={out}")
    assert "raise the budget or lower the warm-up" in str(err.value)
    assert not out.exists()


def test_budget_larger_than_the_candidates(out, tripwires):
    with pytest.raises(ConfigError, match=r"selection.budget=5000 is larger than the 600 training samples") as err:
        _run("selection.budget=5000", f"output_dir={out}")
    assert "lower the budget" in str(err.value)
    assert not out.exists()


def test_picks_that_the_exclusion_step_leaves_no_room_for(out, tripwires):
    # 400 picks fit in the 600 samples, but after the warm-up's 2 the exclusion step drops half of
    # the 598 candidates: caught before training, not in the first round's K-means
    with pytest.raises(ConfigError, match=r"round 1 picks 398 samples but the exclusion step .* leaves 299") as err:
        _run("selection.budget=400", f"output_dir={out}")
    assert "lower selection.exclude_frac" in str(err.value)
    assert not out.exists()
    with pytest.raises(WorkStarted):  # 100 picks a round fit: round 4 has 298 candidates, keeps 149 for 98
        _run("selection.budget=400", "selection.per_round=100", f"output_dir={out}")


@pytest.mark.parametrize("overrides, message", [
    (("method=random", "model=lenet5"), "needs image inputs"),
    (("reweight.augment=true",), "defines no augmentation"),
])
def test_model_or_augmentation_the_data_cannot_take(out, tripwires, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _run(*overrides, f"output_dir={out}")
    assert not out.exists()


def test_data_root_without_data_and_download_off(out, tripwires):
    with pytest.raises(ConfigError, match=r"data.root=/nonexistent does not exist and data.download=false") as err:
        _run("dataset=mnist", "data.root=/nonexistent", f"output_dir={out}")
    msg = str(err.value)
    assert "set data.root=" in msg and "data.download=true" in msg
    assert not out.exists()
    assert not Path("/nonexistent").exists()  # nothing was downloaded or created there


def test_more_workers_than_the_cluster_has(out, ray_session, monkeypatch):
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("training started")))
    cpus = ray_session.cluster_resources().get("CPU", 0)
    assert cpus < 64
    with pytest.raises(ConfigError, match=r"ray.num_workers=64 .* needs [0-9.]+ CPUs but the cluster has") as err:
        _run("ray.num_workers=64", f"output_dir={out}")
    assert "lower ray.num_workers" in str(err.value)
    assert not out.exists()


def test_output_dir_holding_a_different_run(out, tripwires):
    other = resolve(*TINY, "seed=1", f"output_dir={out}")
    write_manifest(out, config=to_dict(other), seed=1, timings={})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputDirError, match="holds a different run") as err:
        _run("seed=0", f"output_dir={out}")
    msg = str(err.value)
    assert "seed: 1 -> 0" in msg  # names what differs
    assert f"choose another output_dir or delete {out}" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # left exactly as it was
    # the run that owns the directory may still use it (resume): it gets past the guard
    with pytest.raises(WorkStarted):
        _run("seed=1", f"output_dir={out}")


def test_output_dir_holding_stray_files(out, tripwires):
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file\n")
    with pytest.raises(OutputDirError, match=r"already holds files \(notes.txt\) but no manifest.json") as err:
        _run(f"output_dir={out}")
    assert "choose another output_dir or delete" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_output_dir_that_is_a_file(tmp_path, tripwires):
    path = tmp_path / "out"
    path.write_text("not a directory\n")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        _run(f"output_dir={path}")
    assert path.read_text() == "not a directory\n"


def test_cli_exits_2_with_a_one_line_error_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HYDRA_FULL_ERROR")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.select", "method=foo", f"output_dir={out}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],  # keep Hydra's own run dir out of the checkout
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown method 'foo': choose one of"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "test accuracy" not in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("override, setting", [
    ("reweight.mode=foo", "reweight.mode"),
    ("model.name=foo", "model.name"),
    ("features.kind=foo", "features.kind"),
])
def test_unknown_registry_names(out, tripwires, override, setting):
    with pytest.raises(ConfigError, match=rf"unknown {setting} 'foo': choose one of \[") as err:
        _run(override, f"output_dir={out}")
    assert f"({setting}=...)" in str(err.value)
    assert not out.exists()


def test_features_kind_refuses_the_prediction_extractor(out, tripwires):
    """``predictions`` is a registered extractor (the uncertain/certain selectors' softmax pass)
    but no gradient feature: the clustering cannot take it, so features.kind lists only those."""
    with pytest.raises(ConfigError, match=r"features.kind='predictions' names a table of the model's predictions "
                                          r"\(what uncertain and certain rank by\), not a gradient feature the "
                                          r"clustering can take: choose one of \['gbc', 'rbc'\]"):
        _run("features.kind=predictions", f"output_dir={out}")
    assert not out.exists()


@pytest.mark.parametrize("override, fix", [
    ("features.num_layers=0", "features.num_layers=0 must be >= 1"),
    ("features.proj_dim=0", "features.proj_dim=0 must be >= 1"),
    ("selection.kmeans_tol=-1", "selection.kmeans_tol=-1 must be >= 0"),
    ("reweight.meta_batch_size=0", "reweight.meta_batch_size=0 must be >= 1"),
    ("ray.extract_cpus=0", "ray.extract_cpus=0 must be > 0"),
    ("ray.kmeans_shard_cpus=0", "ray.kmeans_shard_cpus=0 must be > 0"),
    ("ray.extract_gpus=-1", "ray.extract_gpus=-1 must be in [0, 1]"),
    ("ray.extract_gpus=2", "must be in [0, 1]: an extraction actor uses one device"),
    ("ray.storage_path=rel_storage", "ray.storage_path='rel_storage' must be an absolute path or a URI"),
    ("data.toy_split=[600,400,0]", "each at least 1"),
])
def test_out_of_range_settings(out, tripwires, override, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)):
        _run(override, f"output_dir={out}")
    assert not out.exists()


def test_output_dir_that_is_a_storage_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"output_dir='s3://bucket/run' is a storage URI") as err:
        resolve(*TINY, "output_dir=s3://bucket/run")
    assert "ray.storage_path=<uri>" in str(err.value)
    assert not any(tmp_path.iterdir())  # not turned into a local ./s3:/bucket/run


def test_autoscaling_skips_the_checks_against_the_resources_present_now(out, ray_session, monkeypatch):
    # ray.autoscaling=true (configs/ray/gpu_cluster.yaml): the cluster grows on demand, so asking
    # for more than it has now is not an error; the run gets as far as training
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("training started")))
    with pytest.raises(WorkStarted):
        _run("ray.num_workers=64", "ray.kmeans_shards=64", "ray.kmeans_shard_cpus=1", "ray.autoscaling=true",
             f"output_dir={out}")


def test_more_kmeans_shards_than_the_cluster_has(out, ray_session, monkeypatch):
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("training started")))
    with pytest.raises(ConfigError, match=r"ray.kmeans_shards=64 x ray.kmeans_shard_cpus=.* needs") as err:
        _run("ray.kmeans_shards=64", "ray.kmeans_shard_cpus=1", f"output_dir={out}")
    assert "lower ray.kmeans_shards" in str(err.value)
    assert not out.exists()


def test_an_extraction_actor_larger_than_any_node(out, ray_session, monkeypatch):
    # 3 CPUs per actor on 2-CPU nodes: Ray Data would wait forever after the warm-up trained
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("training started")))
    with pytest.raises(ConfigError, match=r"ray.extract_cpus=3(\.0)? but the largest node has 2(\.0)? CPUs") as err:
        _run("ray.extract_cpus=3", f"output_dir={out}")
    assert "lower ray.extract_cpus" in str(err.value)
    assert not out.exists()


def test_gpu_extraction_on_a_cluster_without_gpus(out, ray_session, monkeypatch):
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("training started")))
    assert not ray_session.cluster_resources().get("GPU", 0)
    with pytest.raises(ConfigError, match=r"ray.extract_gpus=1(\.0)? but the cluster has no GPU: set ray.extract_gpus=0"):
        _run("ray.extract_gpus=1", f"output_dir={out}")
    assert not out.exists()


def test_a_completed_run_is_read_back_not_rerun(out, tripwires):
    """Re-running the command of a finished run returns its metrics without starting Ray, and
    leaves its manifest saying complete."""
    import pandas as pd

    from pivotal_ray.core import artifacts

    cfg = resolve(*TINY, f"output_dir={out}")
    artifacts.write_manifest(out, config=to_dict(cfg), seed=cfg.seed, timings={}, extra={"status": "complete"})
    artifacts.write_json(out / "metrics.json", {"test_acc_at_best_val": 0.9})
    artifacts.write_csv(out / "selection.csv", pd.DataFrame({"sample_id": [3]}))
    before = (out / "manifest.json").read_text()
    assert pipeline.run_experiment(cfg) == {"test_acc_at_best_val": 0.9}  # tripwires: no Ray, no training
    assert (out / "manifest.json").read_text() == before
