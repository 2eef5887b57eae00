"""pipeline.py's Ray-free parts: the round plan's fit check, the picks a rerun reads back, and
whether a finished labels=file run's labels changed. No Ray: each is called directly (validate
stops before Ray is connected)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pivotal_ray import pipeline
from pivotal_ray.config import ConfigError, from_dict
from pivotal_ray.core.labels import FileLabels
from pivotal_ray.selectors import Picks


def _cfg(tmp_path, **selection):
    return from_dict({"output_dir": str(tmp_path / "out"), "selection": selection})


# ---------------------------------------------------------------- _check_rounds_fit


def test_a_later_round_that_does_not_fit_is_refused_before_work(tmp_path):
    # 600 toy samples, exclude_frac 0.5. Round 1: 598 candidates, 299 left, 200 picked (fits).
    # Round 2 counts round 1's picks as meta: 398 candidates, 199 left, for 200 picks
    cfg = _cfg(tmp_path, budget=500, per_round=200)
    with pytest.raises(ConfigError, match=r"round 2 picks 200 samples but .* leaves 199 of the 398 candidates "
                                          r"\(600 training samples, 202 meta samples\)"):
        pipeline.validate(cfg)
    assert not (tmp_path / "out").exists()


def test_picks_that_exactly_fill_what_the_exclusion_leaves_are_accepted(tmp_path):
    pipeline._check_rounds_fit(_cfg(tmp_path, budget=2 + 299), 600)  # 299 picks, 299 left
    with pytest.raises(ConfigError, match="round 1 picks 300 samples but .* leaves 299"):
        pipeline._check_rounds_fit(_cfg(tmp_path, budget=2 + 300), 600)
    # two rounds, the second exactly full: 598 -> 299 left (200 picked), 398 -> 199 left (199 picked)
    pipeline._check_rounds_fit(_cfg(tmp_path, budget=2 + 200 + 199, per_round=200), 600)
    # methods without the exclusion step are not limited by it
    pipeline._check_rounds_fit(_cfg(tmp_path, method="random", budget=500, per_round=200), 600)


def test_lr_milestones_a_run_never_reaches_are_named_in_a_warning(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="pivotal_ray.pipeline")
    pipeline.validate(from_dict({"output_dir": str(tmp_path / "a"),
                                 "reweight": {"epochs": 8, "lr_milestones": [4, 8, 12]}}))
    said = [r.getMessage() for r in caplog.records if "lr_milestones" in r.getMessage()]
    assert said == ["reweight.lr_milestones [8, 12] at or after reweight.epochs=8 never apply: "
                    "the lr is not cut at them"]
    caplog.clear()
    pipeline.validate(from_dict({"output_dir": str(tmp_path / "c"),
                                 "reweight": {"epochs": 8, "lr_milestones": [4, 8]}}))
    assert [r.getMessage() for r in caplog.records if "lr_milestones" in r.getMessage()] == [
        "reweight.lr_milestones [8] at or after reweight.epochs=8 never apply: the lr is not cut at it"]
    caplog.clear()
    pipeline.validate(from_dict({"output_dir": str(tmp_path / "b"),
                                 "reweight": {"epochs": 8, "lr_milestones": [7]}}))  # cut for the last epoch
    assert not [r for r in caplog.records if "lr_milestones" in r.getMessage()]
    assert not any((tmp_path / d).exists() for d in "abc")


# ---------------------------------------------------------------- _write_picks / _read_picks


def test_picks_are_read_back_only_for_the_same_meta_set_and_run(tmp_path):
    picks = Picks(np.array([7, 3, 11], dtype=np.int64), np.array([0, 2, 1], dtype=np.int64),
                  np.array([0.5, 0.25, np.nan]), info={"objective": 1.5})
    meta = np.array([1, 4], dtype=np.int64)
    timings = {"features_s": 1.25, "kmeans_s": 2.0, "select_s": 3.5}
    pipeline._write_picks(tmp_path, picks, meta=meta, after="warmup-abc", timings=timings)

    back, earlier = pipeline._read_picks(tmp_path, k=3, meta=meta, after="warmup-abc")
    np.testing.assert_array_equal(back.sample_id, picks.sample_id)
    np.testing.assert_array_equal(back.cluster, picks.cluster)
    np.testing.assert_array_equal(back.score, picks.score)  # NaN survives (equal_nan for floats)
    assert back.sample_id.dtype == np.int64 and back.info == {"objective": 1.5} and earlier == timings
    # picked after another training run, from another meta set, or another count: pick again
    assert pipeline._read_picks(tmp_path, k=3, meta=meta, after="warmup-def") == (None, {})
    assert pipeline._read_picks(tmp_path, k=3, meta=np.array([1, 5]), after="warmup-abc") == (None, {})
    assert pipeline._read_picks(tmp_path, k=3, meta=np.array([1]), after="warmup-abc") == (None, {})
    assert pipeline._read_picks(tmp_path, k=2, meta=meta, after="warmup-abc") == (None, {})
    assert pipeline._read_picks(tmp_path / "nothing", k=3, meta=meta, after="warmup-abc") == (None, {})


# ---------------------------------------------------------------- _labels_changed


def test_a_deleted_meta_label_means_the_labels_changed(tmp_path):
    """A person deleted the row of one meta sample from the labels file of a finished run: the
    run trains again (True), and asking for the deleted label is not a KeyError."""
    train_ids = np.arange(10, dtype=np.int64)
    pd.DataFrame({"sample_id": [2, 5, 8], "observed_label": [0, 0, 1], "cleaned_label": [1, 0, 1],
                  "round": [0, 0, 1], "cluster": -1, "score": np.nan}).to_csv(tmp_path / "selection.csv",
                                                                               index=False)
    path = tmp_path / "labels.csv"
    path.write_text("sample_id,label\n2,1\n5,0\n8,1\n")
    assert not pipeline._labels_changed(tmp_path, FileLabels(path, train_ids=train_ids, num_classes=2))
    path.write_text("sample_id,label\n2,1\n8,1\n")  # sample 5's row deleted
    assert pipeline._labels_changed(tmp_path, FileLabels(path, train_ids=train_ids, num_classes=2))
    path.write_text("sample_id,label\n2,1\n5,1\n8,1\n")  # sample 5 relabelled
    assert pipeline._labels_changed(tmp_path, FileLabels(path, train_ids=train_ids, num_classes=2))


# ---------------------------------------------------------------- where the run will write


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write to: mode 555, or for root (whom modes do not stop) the
    immutable flag; skipped where neither takes."""
    import os
    import subprocess

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable or os.access(d, os.W_OK):
            pytest.skip("cannot make a read-only folder here")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_an_output_dir_or_storage_path_that_cannot_be_written_is_refused_before_work(tmp_path, read_only_dir):
    from pivotal_ray.core.artifacts import check_writable

    for values, setting in (({"output_dir": str(read_only_dir / "out")}, "output_dir"),
                            ({"output_dir": str(tmp_path / "out"), "ray": {"storage_path": str(read_only_dir / "rt")}},
                             "ray.storage_path")):
        with pytest.raises(ConfigError, match=f"{setting}=.* cannot be written: {read_only_dir} is not writable"):
            pipeline.validate(from_dict(values))
    assert not (tmp_path / "out").exists()
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"cannot be created: {f} is a file"):
        check_writable(f / "out" / "deeper", "ray.storage_path")
    check_writable(tmp_path / "new" / "deeper", "output_dir")  # creatable: fine, and nothing made
    assert not (tmp_path / "new").exists()
    assert sorted(tmp_path.iterdir()) == sorted([f, read_only_dir])  # the write probe removed


def test_a_folder_whose_permissions_say_yes_but_that_takes_no_file_is_refused(tmp_path):
    """/proc for root: os.access says writable, creating a file there fails; the check creates one
    (and removes it) instead of trusting the permissions, so the run is refused before any work,
    not after Ray started (as it was)."""
    import os
    from pathlib import Path

    if not (Path("/proc/self").is_dir() and os.access("/proc", os.W_OK | os.X_OK)):
        pytest.skip("no /proc that looks writable to this user")
    with pytest.raises(ConfigError, match=r"output_dir=/proc/pivotal_out cannot be written: creating a file in /proc "
                                          r"failed \("):
        pipeline.validate(from_dict({"output_dir": "/proc/pivotal_out"}))


def test_a_finished_run_in_a_read_only_folder_is_still_read_back(tmp_path, read_only_dir):
    """Only a run that will write needs a writable output_dir: a finished one is read back."""
    import subprocess

    from pivotal_ray.config import to_dict
    from pivotal_ray.core import artifacts

    out = read_only_dir  # the finished run's folder, read-only (its storage_path below would be created in it)
    cfg = from_dict({"output_dir": str(out), "ray": {"storage_path": str(out / "rt")}})
    flags = subprocess.run(["lsattr", "-d", str(out)], capture_output=True, text=True).stdout.split()
    immutable = bool(flags) and "i" in flags[0]
    if immutable:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    out.chmod(0o755)
    (out / "selection.csv").write_text("sample_id\n")
    artifacts.write_json(out / "metrics.json", {"method": "rbc"})
    artifacts.write_manifest(out, config=to_dict(cfg), seed=0, timings={}, extra={"status": "complete"})
    out.chmod(0o555)
    if immutable:
        subprocess.run(["chattr", "+i", str(out)], check=True)
    pipeline.validate(cfg)  # no ConfigError: nothing will be written
    assert pipeline.run_experiment(cfg) == {"method": "rbc"}


def test_a_link_to_nothing_on_the_way_is_refused_by_name(tmp_path):
    from pivotal_ray.core.artifacts import check_writable

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="dangling is a link to nothing"):
        check_writable(tmp_path / "dangling" / "out", "output_dir")


# ---------------------------------------------------------------- CIFAR-N noise in the pre-flight


def test_cifar_n_is_checked_before_work_and_recorded_as_its_realised_rate(tmp_path):
    import warnings

    from tests.unit.test_data import _write_cifar, _write_cifar_n

    ref = _write_cifar(tmp_path / "data", hundred=False, n_train=20)
    clean = ref["train_y"]
    noisy = clean.copy()
    noisy[:25] = (noisy[:25] + 1) % 10  # 25 of 100 wrong
    _write_cifar_n(tmp_path / "data" / "CIFAR-N" / "CIFAR-10_human.pt", clean, worse_label=noisy, aggre_label=clean)

    def cfg(**noise):
        return from_dict({"output_dir": str(tmp_path / "out"), "data": {"name": "cifar10", "root": str(tmp_path / "data")},
                          "noise": {"kind": "cifar_n", "rate": 0.0, **noise}, "model": {"name": "mlp"}})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic CIFAR files fail torchvision's md5 check
        with pytest.raises(ConfigError, match="noise.label is not set"):
            pipeline.validate(cfg())
        bundle = pipeline.validate(cfg(label="worse_label"))
    assert not (tmp_path / "out").exists()
    assert float(np.mean(bundle.train.y_obs != bundle.train.y_true)) == 0.25
    # metrics.json's noise: the human labels' rate over the training split and the set read
    assert pipeline.noise_record(cfg(label="worse_label"), bundle.train) == {
        "kind": "cifar_n", "rate": 0.25, "label": "worse_label"}
    synthetic = from_dict({"output_dir": str(tmp_path / "out"), "noise": {"kind": "adversarial", "rate": 0.4}})
    assert pipeline.noise_record(synthetic, bundle.train) == {"kind": "adversarial", "rate": 0.4}


def test_a_cifar_n_run_folder_is_recognised_with_its_file_moved(tmp_path):
    """The manifest records the run's noise identity (label set and digest), so the folder is the
    same run when the CIFAR-N file sits elsewhere now (noise.file, say on another machine), and
    another run when the file there holds other labels; a manifest without it (written before)
    needs the file where it was."""
    import json
    import shutil

    from pivotal_ray.config import to_dict
    from pivotal_ray.core import artifacts
    from pivotal_ray.core.artifacts import OutputDirError
    from tests.unit.test_data import _write_cifar_n

    clean = np.arange(30) % 10
    worse = (clean + (np.arange(30) % 2)) % 10
    first = _write_cifar_n(tmp_path / "a" / "CIFAR-100_human.pt", clean, noisy_label=worse)
    out = tmp_path / "out"

    def cfg(file):
        return from_dict({"output_dir": str(out), "data": {"name": "cifar100", "root": str(tmp_path)},
                          "noise": {"kind": "cifar_n", "rate": 0.0, "file": str(file)}})

    ran = cfg(first)
    artifacts.write_manifest(out, config=to_dict(ran), seed=0, timings={},
                             extra=pipeline.manifest_extra(ran, status="complete"))
    recorded = json.loads((out / "manifest.json").read_text())["extra"]
    assert recorded["status"] == "complete"
    assert recorded["noise_identity"]["label"] == "noisy_label" and len(recorded["noise_identity"]["labels_sha256"]) == 16
    moved = tmp_path / "elsewhere" / "x.pt"
    moved.parent.mkdir()
    shutil.move(first, moved)
    pipeline.check_run_dir(cfg(moved))  # the same run
    _write_cifar_n(moved, clean, noisy_label=(worse + 1) % 10)
    with pytest.raises(OutputDirError, match="holds a different run"):
        pipeline.check_run_dir(cfg(moved))
    _write_cifar_n(moved, clean, noisy_label=worse)
    old = json.loads((out / "manifest.json").read_text())
    del old["extra"]["noise_identity"]  # a manifest written before it was recorded
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(OutputDirError, match="holds a different run"):
        pipeline.check_run_dir(cfg(moved))
    shutil.copy(moved, first)  # the file back where that run read it
    pipeline.check_run_dir(cfg(moved))
    assert pipeline.manifest_extra(from_dict({"output_dir": str(out)}), status="x") == {"status": "x"}


def test_a_kmeans_shard_larger_than_any_node_is_refused(monkeypatch):
    """Two 2-CPU nodes (4 CPUs in all): one shard of 3 CPUs passes the cluster-wide check but fits
    no node, where its placement group would wait for ever; a method that clusters nothing is not
    concerned."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}] * 2)
    cfg = from_dict({"output_dir": "/tmp/x", "ray": {"kmeans_shards": 1, "kmeans_shard_cpus": 3.0,
                                                        "cpus_per_worker": 1.0}})
    with pytest.raises(ConfigError, match=r"ray.kmeans_shard_cpus=3.0 but the largest node has 2.0 CPUs: lower "
                                          r"ray.kmeans_shard_cpus \(a K-means shard runs on one node"):
        pipeline._check_per_node(cfg, True, True)
    pipeline._check_per_node(cfg, False, False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    pipeline._check_per_node(cfg, True, True)


def test_an_extraction_actor_larger_than_any_node_is_refused_where_actors_run(monkeypatch):
    """uncertain runs its softmax pass on the extraction actors (checked); random runs none (not
    checked) unless jobs.compare's analysis runs one for it (``extracts=True``)."""
    import ray

    from pivotal_ray.distributed import shared_fs

    monkeypatch.setattr(shared_fs, "worker_nodes", lambda: [])  # one node: no shared-storage question
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 8e9})
    monkeypatch.setattr(pipeline, "check_feature_memory", lambda *a, **k: None)
    big = {"output_dir": "/tmp/x", "ray": {"extract_cpus": 3.0, "cpus_per_worker": 1.0}}
    for method, extracts in (("uncertain", None), ("certain", None), ("random", True)):
        with pytest.raises(ConfigError, match=r"ray.extract_cpus=3.0 but the largest node has 2.0 CPUs"):
            pipeline._check_cluster(from_dict({**big, "selection": {"method": method}}), None, extracts=extracts)
    pipeline._check_cluster(from_dict({**big, "selection": {"method": "random"}}), None)


# ---------------------------------------------------------------- shared storage on several nodes


def _nodes(*ids):
    return [{"Alive": True, "NodeID": i, "NodeManagerAddress": f"10.0.0.{k}", "Resources": {"CPU": 4.0}}
            for k, i in enumerate(ids, start=1)]


def test_storage_not_shared_by_another_node_is_refused(tmp_path, monkeypatch):
    """The folders other nodes write in (output_dir's nearest existing folder where features are
    extracted or checkpoints kept under it, a local ray.storage_path outside it) are checked on
    every other node; a node that does not see it refuses the run with the fix; a folder found
    shared is not asked again; a storage_path inside output_dir or on a URI is not asked apart."""
    from pivotal_ray.distributed import shared_fs

    asked, unseen, silent = [], {}, []
    monkeypatch.setattr(shared_fs, "worker_nodes", lambda: _nodes("a", "b"))
    monkeypatch.setattr(pipeline, "_SHARED_OK", set())

    def fake(folder, nodes, **_):
        asked.append(str(folder))
        return unseen.get(str(folder), []), list(silent)

    monkeypatch.setattr(shared_fs, "nodes_not_sharing", fake)
    (tmp_path / "runs").mkdir()
    cfg = from_dict({"output_dir": str(tmp_path / "runs" / "a" / "b")})  # rbc: extracts, checkpoints inside
    pipeline._check_shared_storage(cfg)
    pipeline._check_shared_storage(cfg)  # found shared: not asked again
    assert asked == [str(tmp_path / "runs")]
    for sp in (str(tmp_path / "runs" / "a" / "b" / "ray"), "s3://bucket/runs"):
        pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs" / "a" / "b"),
                                                  "ray": {"storage_path": sp}}))
    assert asked == [str(tmp_path / "runs")]
    unseen[str(tmp_path)] = ["10.0.0.2 (no such file)"]
    cfg = from_dict({"output_dir": str(tmp_path / "runs" / "c"), "ray": {"storage_path": str(tmp_path / "ckpt")}})
    with pytest.raises(ConfigError, match=rf"ray.storage_path={tmp_path / 'ckpt'} is not on storage that every node "
                                          rf"of the Ray cluster shares: a file this driver wrote in {tmp_path} \(where "
                                          r"ray.storage_path will be created\) is not there on 1 of the 2 other nodes: "
                                          r"10.0.0.2 \(no such file\)\. Ray Train's workers write their checkpoints "
                                          r"there, on any node, .*NFS/EFS.*or set ray.storage_path to a URI"):
        pipeline._check_shared_storage(cfg)
    unseen[str(tmp_path / "runs")] = ["10.0.0.1 (no such file)", "10.0.0.2 (PermissionError: Permission denied)"]
    monkeypatch.setattr(pipeline, "_SHARED_OK", set())
    with pytest.raises(ConfigError, match=r"output_dir=.* on 2 of the 2 other nodes: 10.0.0.1 \(no such file\), "
                                          r"10.0.0.2 \(PermissionError: Permission denied\)\. Ray Data's feature-"
                                          r"extraction tasks write the feature tables under it and Ray Train's workers "
                                          r"write their checkpoints under it \(ray.storage_path is unset: "
                                          r"<output_dir>/ray_train\), on any node, .*/mnt/shared\), or run on one "
                                          r"node$") as err:
        pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs")}))
    assert "where output_dir will be created" not in str(err.value)  # the folder itself was checked
    # checkpoints only (a method that extracts nothing on workers): a URI for them would do
    with pytest.raises(ConfigError, match=r"Ray Train's workers write their checkpoints under it \(ray.storage_path "
                                          r"is unset: <output_dir>/ray_train\), on any node, .* or set "
                                          r"ray.storage_path to a URI"):
        pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs"),
                                                  "selection": {"method": "random"}}))
    # ... and with them on a URI, such a method writes output_dir from the driver alone: not asked
    asked.clear()
    on_uri = {"output_dir": str(tmp_path / "runs"), "ray": {"storage_path": "s3://bucket/runs"}}
    pipeline._check_shared_storage(from_dict({**on_uri, "selection": {"method": "random"}}))
    assert asked == []
    # but uncertain/certain write their prediction table from the extraction actors, and
    # jobs.compare's analysis (extracts=True) writes one for every method
    for cfg, extracts in ((from_dict({**on_uri, "selection": {"method": "uncertain"}}), None),
                          (from_dict({**on_uri, "selection": {"method": "random"}}), True)):
        with pytest.raises(ConfigError, match=r"Ray Data's feature-extraction tasks write the feature tables under it, "
                                              r"on any node"):
            pipeline._check_shared_storage(cfg, extracts)
    assert asked == [str(tmp_path / "runs")] * 2
    asked.clear()
    # a node that gave no answer is not counted as sharing: the folder is asked again next time
    del unseen[str(tmp_path / "runs")]
    silent.append("10.0.0.2")
    pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs")}))
    pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs")}))
    assert asked == [str(tmp_path / "runs")] * 2
    monkeypatch.setattr(shared_fs, "worker_nodes", lambda: [])  # one node: nothing to ask
    asked.clear()
    pipeline._check_shared_storage(from_dict({"output_dir": str(tmp_path / "runs")}))
    assert asked == []


def test_the_check_reads_the_token_and_names_few_nodes(tmp_path):
    from pivotal_ray.distributed import shared_fs

    f = tmp_path / "probe"
    assert shared_fs._reads(str(f), "t", 0.0) == "no such file"
    f.write_text("other")
    assert shared_fs._reads(str(f), "t", 0.0) == "other content"
    f.write_text("t")
    assert shared_fs._reads(str(f), "t", 0.0) is None
    assert shared_fs._reads(str(tmp_path), "t", 0.0).startswith("IsADirectoryError")  # there, but unreadable
    assert shared_fs.unshared_error("output_dir", "/x", "/x", [], 3, writers="w", uri_fix=False) is None
    msg = shared_fs.unshared_error("output_dir", "/x", "/x", [f"n{i}" for i in range(7)], 9, writers="w",
                                   uri_fix=False)
    assert "on 7 of the 9 other nodes: n0, n1, n2, n3, n4 and 2 more. w, on any node" in msg
    assert "URI" not in msg  # the feature tables: a URI for the checkpoints would not do


def test_a_probe_left_behind_neither_blocks_nor_stays(tmp_path):
    """A driver killed mid-check leaves its probe file: output_dir's check ignores it as a
    temporary, and the run removes it."""
    from pivotal_ray.core import artifacts
    from pivotal_ray.distributed import shared_fs

    out = tmp_path / "out"
    out.mkdir()
    left = out / f"{shared_fs.PROBE_PREFIX}0123456789ab{shared_fs.PROBE_SUFFIX}"
    left.write_text("token")
    pipeline.check_run_dir(from_dict({"output_dir": str(out)}))
    assert artifacts.remove_temporaries(out) == [left] and not left.exists()
