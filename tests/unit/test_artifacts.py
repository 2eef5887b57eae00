"""core/artifacts.py: atomic writers, provenance, fingerprint, manifest, output-dir guard."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pivotal_ray import config as cfgmod
from pivotal_ray.core import artifacts as art

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"


class Boom(RuntimeError):
    pass


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def config() -> dict:
    return cfgmod.to_dict(cfgmod.ExperimentConfig(output_dir="/runs/a"))


# ---------------------------------------------------------------- atomic files


def test_writers_round_trip(tmp_path: Path) -> None:
    art.write_text(tmp_path / "a.txt", "hello\n")
    assert (tmp_path / "a.txt").read_text() == "hello\n"

    art.write_json(tmp_path / "m.json", {"b": np.float32(0.5), "a": np.arange(3), "p": Path("/x"),
                                         "auc": float("nan")})
    back = json.loads((tmp_path / "m.json").read_text())
    assert back["a"] == [0, 1, 2] and back["b"] == 0.5 and back["p"] == "/x" and np.isnan(back["auc"])

    rows = [{"sample_id": 3, "score": 0.5}, {"sample_id": 1, "score": 0.25}]
    art.write_csv(tmp_path / "rows.csv", rows)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "rows.csv"), pd.DataFrame(rows))
    df = pd.DataFrame(rows, index=[10, 11])
    art.write_csv(tmp_path / "df.csv", df, columns=["score", "sample_id"])
    assert (tmp_path / "df.csv").read_text().splitlines() == ["score,sample_id", "0.5,3", "0.25,1"]
    art.write_csv(tmp_path / "empty.csv", [], columns=["sample_id", "score"])
    assert (tmp_path / "empty.csv").read_text() == "sample_id,score\n"

    table = pa.table({"sample_id": pa.array([1, 2], pa.int64()), "w": pa.array([0.1, 0.9], pa.float32())})
    art.write_parquet(tmp_path / "t.parquet", table)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    art.write_parquet(tmp_path / "d.parquet", df)
    assert pq.read_table(tmp_path / "d.parquet").column_names == ["sample_id", "score"]  # index dropped

    assert _listing(tmp_path) == sorted(["a.txt", "m.json", "rows.csv", "df.csv", "empty.csv",
                                         "t.parquet", "d.parquet"])  # no temporaries left


def test_writers_create_parents_and_leave_readable_files(tmp_path: Path) -> None:
    path = art.write_text(tmp_path / "deep" / "er" / "x.txt", "x")
    assert path == tmp_path / "deep" / "er" / "x.txt" and path.read_text() == "x"
    assert os.stat(path).st_mode & 0o044 == 0o044  # group/other can read (mkstemp alone gives 0600)


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    art.write_json(target, {"v": 1})
    with pytest.raises(Boom):
        with art.atomic_file(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')  # half written ...
            raise Boom("killed midway")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _listing(tmp_path) == ["metrics.json"]


def test_a_failing_parquet_writer_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise Boom("disk full")

    monkeypatch.setattr(art.pq, "write_table", broken)
    with pytest.raises(Boom):
        art.write_parquet(tmp_path / "f.parquet", pa.table({"a": [1]}))
    assert _listing(tmp_path) == []


def test_unserialisable_json_fails_before_touching_the_disk(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="convert it to plain Python"):
        art.write_json(tmp_path / "x.json", {"obj": object()})
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("call, error, match", [
    (lambda d: art.write_text("s3://bucket/x.txt", "x"), ValueError, "storage URI"),
    (lambda d: art.write_text(d, "x"), IsADirectoryError, "directory"),
    (lambda d: art.write_text(d / "x", b"x"), TypeError, "must be str"),
    (lambda d: art.write_csv(d / "x.csv", []), ValueError, "columns="),
    (lambda d: art.write_csv(d / "x.csv", [1, 2]), TypeError, "mapping"),
    (lambda d: art.write_csv(d / "x.csv", "a,b"), TypeError, "DataFrame"),
    (lambda d: art.write_parquet(d / "x.parquet", {"a": [1]}), TypeError, "pyarrow.Table"),
])
def test_writers_reject_bad_input(tmp_path: Path, call, error, match: str) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path)


# ---------------------------------------------------------------- atomic directories


def test_atomic_dir_appears_complete_on_success(tmp_path: Path) -> None:
    final = tmp_path / "snap"
    with art.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.exists()
        (tmp / "model.pt").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "m.json").write_text("{}")
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["model.pt", "sub", "sub/m.json"]
    assert _listing(tmp_path) == ["snap"]


def test_atomic_dir_removes_everything_on_error(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with art.atomic_dir(tmp_path / "snap") as tmp:
            (tmp / "model.pt").write_bytes(b"partial")
            raise Boom("crash")
    assert _listing(tmp_path) == []


def test_atomic_dir_existing_target(tmp_path: Path) -> None:
    final = tmp_path / "snap"
    final.mkdir()
    (final / "old.txt").write_text("old")
    entered = False
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with art.atomic_dir(final):
            entered = True
    assert not entered and _listing(final) == ["old.txt"]

    with pytest.raises(Boom):  # a failed overwrite keeps the old directory
        with art.atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise Boom()
    assert _listing(final) == ["old.txt"]

    with art.atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _listing(final) == ["new.txt"] and _listing(tmp_path) == ["snap"]


# ---------------------------------------------------------------- provenance


def test_package_versions_names_the_stack() -> None:
    versions = art.package_versions()
    for key in ("python", "ray", "torch", "torchvision", "numpy", "pyarrow", "hydra-core"):
        assert isinstance(versions[key], str) and versions[key][0].isdigit(), key
    assert versions["numpy"] == np.__version__ and versions["pyarrow"] == pa.__version__


def _fake_repo(root: Path, head: str, refs: dict[str, str] | None = None, packed: str | None = None) -> Path:
    git = root / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    for ref, sha in (refs or {}).items():
        (git / ref).parent.mkdir(parents=True, exist_ok=True)
        (git / ref).write_text(sha + "\n")
    if packed is not None:
        (git / "packed-refs").write_text(packed)
    (root / "pkg").mkdir()
    return root / "pkg"


def test_git_revision_reads_loose_packed_and_detached_heads(tmp_path: Path) -> None:
    loose = _fake_repo(tmp_path / "a", "ref: refs/heads/main", {"refs/heads/main": SHA})
    assert art.git_revision(loose) == SHA  # found from a subfolder
    packed = _fake_repo(tmp_path / "b", "ref: refs/heads/main",
                        packed=f"# pack-refs with: peeled\n{SHA2} refs/heads/other\n{SHA} refs/heads/main\n^{SHA2}\n")
    assert art.git_revision(packed) == SHA
    assert art.git_revision(_fake_repo(tmp_path / "c", SHA2)) == SHA2


def test_git_revision_follows_a_worktree_link(tmp_path: Path) -> None:
    _fake_repo(tmp_path / "main", "ref: refs/heads/main", {"refs/heads/main": SHA, "refs/heads/feature": SHA2})
    wt_git = tmp_path / "main" / ".git" / "worktrees" / "wt"
    wt_git.mkdir(parents=True)
    (wt_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_git / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt_git}\n")
    assert art.git_revision(tmp_path / "wt") == SHA2


def test_git_revision_is_none_outside_a_checkout_or_before_a_commit(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert art.git_revision(tmp_path / "plain") is None
    assert art.git_revision(_fake_repo(tmp_path / "unborn", "ref: refs/heads/main")) is None
    assert art.git_revision(_fake_repo(tmp_path / "junk", "ref: refs/heads/main", {"refs/heads/main": "zz"})) is None


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_ignores_placement(config: dict) -> None:
    fp = art.config_fingerprint(config)
    assert len(fp) == 16 and int(fp, 16) >= 0
    moved = json.loads(json.dumps(config))
    moved.update(output_dir="/elsewhere", name="renamed")
    moved["ray"].update(address="ray://head:10001", storage_path="s3://b/runs", num_cpus=64)
    moved["data"]["root"] = "/mnt/shared/data"
    assert art.config_fingerprint(moved) == fp
    reordered = dict(reversed(list(config.items())))
    assert art.config_fingerprint(reordered) == fp
    assert art.config_fingerprint(cfgmod.ExperimentConfig(output_dir="/runs/b")) == fp  # a dataclass works too


# Written out, not read from art.IGNORED_KEYS: dropping a key from that tuple must fail here. These
# are the keys docs/architecture.md documents ("Run identity includes resources that change floats"),
# each with a value unlike its default.
DOCUMENTED_IGNORED = {
    "output_dir": "/elsewhere", "name": "renamed", "data.root": "/mnt/data", "data.download": True,
    "data.loader_workers": 8, "noise.file": "/mnt/data/CIFAR-N/CIFAR-10_human.pt", "ray.address": "ray://head:10001", "ray.num_cpus": 64,
    "ray.object_store_memory": 2_000_000_000, "ray.storage_path": "s3://b/runs", "ray.extract_actors": 4,
    "ray.log_to_driver": True, "ray.autoscaling": True, "ray.max_failures": 3, "ray.extract_max_restarts": -1,
}


def test_the_documented_ignored_keys_are_the_ignored_keys() -> None:
    assert sorted(art.IGNORED_KEYS) == sorted(DOCUMENTED_IGNORED)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    section = " ".join(doc.split("**Run identity includes resources that change floats.**")[1].split("\n- ")[0].split())
    for key in DOCUMENTED_IGNORED:
        assert f"`{key}`" in section, key


@pytest.mark.parametrize("key", sorted(DOCUMENTED_IGNORED))
def test_each_ignored_key_leaves_the_run_the_same(tmp_path: Path, config: dict, key: str) -> None:
    """Where and with what a run is launched: changing it keeps the fingerprint, so the run in
    output_dir is accepted (resumed) rather than refused as another run."""
    moved = json.loads(json.dumps(config))
    *path, leaf = key.split(".")
    node = moved
    for part in path:
        node = node[part]
    assert leaf in node and node[leaf] != DOCUMENTED_IGNORED[key]
    node[leaf] = DOCUMENTED_IGNORED[key]
    assert art.config_fingerprint(moved) == art.config_fingerprint(config)
    art.write_manifest(tmp_path, config=config, seed=0, timings={})
    art.check_output_dir(tmp_path, config=moved)


@pytest.mark.parametrize("manifest", [{}, {"fingerprint": "0" * 16}, {"fingerprint": None, "seed": 0},
                                      {"config": "not a mapping"}])
def test_a_manifest_without_a_config_is_matched_by_its_fingerprint(tmp_path: Path, config: dict,
                                                                   manifest: dict) -> None:
    """Without a recorded config the recorded fingerprint decides: a missing or different one is
    another run, never taken for this one."""
    (tmp_path / art.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(art.OutputDirError, match="holds a different run"):
        art.check_output_dir(tmp_path, config=config)
    (tmp_path / art.MANIFEST_NAME).write_text(json.dumps({"fingerprint": art.config_fingerprint(config)}))
    art.check_output_dir(tmp_path, config=config)  # the same fingerprint: the same run


def test_fingerprint_normalises_numbers_and_sequences() -> None:
    assert art.config_fingerprint({"lr": 1, "split": (1, 2)}) == art.config_fingerprint({"lr": 1.0, "split": [1, 2]})
    assert art.config_fingerprint({"x": np.int64(3)}) == art.config_fingerprint({"x": 3})
    assert art.config_fingerprint({"flag": True}) != art.config_fingerprint({"flag": 1})


@pytest.mark.parametrize("key, value", [("seed", 1), ("noise.rate", 0.4), ("selection.method", "random"),
                                        ("reweight.lr", 0.05), ("ray.num_workers", 2), ("ray.use_gpu", True)])
def test_fingerprint_changes_with_anything_that_changes_results(config: dict, key: str, value) -> None:
    changed = json.loads(json.dumps(config))
    *path, leaf = key.split(".")
    node = changed
    for part in path:
        node = node[part]
    node[leaf] = value
    assert art.config_fingerprint(changed) != art.config_fingerprint(config)


def test_fingerprint_rejects_non_plain_configs() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(TypeError, match="to_container"):
        art.config_fingerprint(OmegaConf.create({"a": 1}))
    with pytest.raises(TypeError, match="resolved plain config"):
        art.config_fingerprint({"a": object()})
    with pytest.raises(TypeError, match="mapping or a dataclass"):
        art.config_fingerprint([1, 2])


# ---------------------------------------------------------------- manifest and output dir


def test_write_manifest(tmp_path: Path, config: dict) -> None:
    path = art.write_manifest(tmp_path / "run", config=config, seed=0,
                              timings={"warmup_train_s": 1.5, "total_s": np.float64(3)}, extra={"note": "x"})
    m = json.loads(path.read_text())
    assert path.name == art.MANIFEST_NAME
    assert m["fingerprint"] == art.config_fingerprint(config) and m["config"] == config
    assert m["seed"] == 0 and m["timings"] == {"warmup_train_s": 1.5, "total_s": 3.0}
    assert m["versions"]["ray"] == art.package_versions()["ray"]
    assert "git_revision" in m and m["extra"] == {"note": "x"} and m["created"].endswith("+00:00")
    import torch

    assert m["platform"] == art.compute_platform()
    assert m["platform"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert "cpu_model" in m["platform"]
    with pytest.raises(TypeError, match="stage names to seconds"):
        art.write_manifest(tmp_path / "run", config=config, seed=0, timings={"total_s": "slow"})


def test_cpu_model_reads_the_first_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert art.cpu_model(info) == "AMD EPYC 9B14"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # no name: falls back to platform.processor()
    assert art.cpu_model(info) == (platform.processor() or None)
    assert art.cpu_model(tmp_path / "missing") == (platform.processor() or None)


def test_check_output_dir_allows_new_empty_and_same_run(tmp_path: Path, config: dict) -> None:
    art.check_output_dir(tmp_path / "missing", config=config)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".metrics.json.abc123.tmp").write_text("junk")  # a killed writer's leftover
    art.check_output_dir(tmp_path / "empty", config=config)
    run = tmp_path / "run"
    art.write_manifest(run, config=config, seed=0, timings={})
    (run / "selection.csv").write_text("sample_id\n")
    resumed = json.loads(json.dumps(config))
    resumed["ray"]["address"] = "auto"  # same run, resumed on a cluster
    art.check_output_dir(run, config=resumed)


def test_check_output_dir_refuses_another_run(tmp_path: Path, config: dict) -> None:
    art.write_manifest(tmp_path, config=config, seed=0, timings={})
    other = json.loads(json.dumps(config))
    other["noise"]["rate"] = 0.8
    with pytest.raises(art.OutputDirError, match=r"different run.*noise\.rate: 0\.6 -> 0\.8.*choose another output_dir"):
        art.check_output_dir(tmp_path, config=other)


@pytest.mark.parametrize("setup, match", [
    (lambda d: (d / "notes.txt").write_text("mine"), r"holds files \(notes\.txt\) but no manifest\.json"),
    (lambda d: (d / "manifest.json").write_text("{trunc"), "cannot be read"),
    (lambda d: (d / "manifest.json").write_text("[1]"), "cannot be read"),
])
def test_check_output_dir_refuses_unrelated_content(tmp_path: Path, config: dict, setup, match: str) -> None:
    setup(tmp_path)
    with pytest.raises(art.OutputDirError, match=match) as err:
        art.check_output_dir(tmp_path, config=config)
    assert "choose another output_dir or delete" in str(err.value)
    assert isinstance(err.value, cfgmod.ConfigError)  # jobs/select.py reports ConfigErrors cleanly


def test_check_output_dir_refuses_a_file_or_a_uri(tmp_path: Path, config: dict) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(art.OutputDirError, match="is a file"):
        art.check_output_dir(tmp_path / "f", config=config)
    with pytest.raises(art.OutputDirError, match="storage URI"):
        art.check_output_dir("s3://bucket/run", config=config)


def test_remove_temporaries_takes_only_what_killed_writers_left(tmp_path: Path) -> None:
    from pivotal_ray.core.artifacts import atomic_dir, remove_temporaries

    out = tmp_path / "run"
    (out / "rounds" / "round_1").mkdir(parents=True)
    keep = [out / "manifest.json", out / "rounds" / "round_1" / "picks.json", out / ".hydra" / "config.yaml",
            out / "rounds" / "round_1" / "features" / "part-0.parquet", out / "notes.tmp.txt"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    junk = [out / ".manifest.json.k3j2.tmp",  # atomic_file's temporary
            out / "rounds" / "round_1" / ".features.1a2b3c4d.tmp",  # a feature table cut off mid-write
            out / "rounds" / "round_1" / ".features_gbc.tmp-0f1e2d3c"]  # ... named as before 721a81c
    junk[0].write_text("half")
    for table in junk[1:]:
        (table / "sub").mkdir(parents=True)
        (table / "sub" / "part-0.parquet").write_text("half")
    for theirs in (out / "ray_train" / "warmup-1" / ".record.json.ab12.tmp",  # Ray Train's, not ours
                   out / "rounds" / "round_1" / "features" / "sub" / ".part.ab12.tmp"):  # too deep to walk
        theirs.parent.mkdir(parents=True, exist_ok=True)
        theirs.write_text("x")
        keep.append(theirs)
    with pytest.raises(RuntimeError):  # a real atomic_dir cut off by an error leaves nothing behind...
        with atomic_dir(out / "rounds" / "round_1" / "centroids"):
            raise RuntimeError("killed")
    gone = remove_temporaries(out)
    assert sorted(gone) == sorted(junk)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in junk)
    assert remove_temporaries(out) == [] and remove_temporaries(tmp_path / "absent") == []


def test_a_setting_only_one_run_has_is_shown_as_not_set(tmp_path: Path) -> None:
    """A run's identity leaves out what its method does not use (and the oracle labels): the
    refusal says so rather than showing a placeholder as if it were a value."""
    art.write_manifest(tmp_path, config={"seed": 0, "labels": {"source": "file"}}, seed=0, timings={})
    with pytest.raises(art.OutputDirError) as err:
        art.check_output_dir(tmp_path, config={"seed": 0})
    assert ("Differences: labels.source: 'file' -> (not set: its default, or not used by that method)."
            in str(err.value))


def _git(repo: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # run from a git hook: not the outer repo
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args], cwd=repo,
                   check=True, capture_output=True, env=env)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git program")
def test_git_changes_lists_the_tracked_files_that_differ_from_the_commit(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py", "old.py", "two.py"):
        (repo / "pkg" / name).write_text(f"x = '{name}'\n")
    (repo / "pkg" / "with space.py").write_text("y = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "c")
    assert art.git_changes(repo / "pkg") == []  # the commit as it is, asked from a subfolder
    (repo / "pkg" / "b.py").write_text("x = 2\n")
    (repo / "pkg" / "with space.py").write_text("y = 2\n")
    (repo / "pkg" / "new.py").write_text("untracked\n")  # untracked: outputs and data are not code
    _git(repo, "mv", "pkg/old.py", "pkg/moved.py")  # a rename in the index: both its paths
    (repo / "pkg" / "two.py").rename(repo / "pkg" / "two_renamed.py")
    _git(repo, "add", "-N", "pkg/two_renamed.py")  # a rename in the worktree (intent to add)
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "other-index"))  # a hook's setting: not ours to read
    assert art.git_changes(repo / "pkg") == ["pkg/b.py", "pkg/moved.py", "pkg/old.py", "pkg/two.py",
                                             "pkg/two_renamed.py", "pkg/with space.py"]
    monkeypatch.setattr(art, "GIT_CHANGES_LISTED", 2)
    assert art.git_changes(repo) == ["pkg/b.py", "pkg/moved.py", "... 4 more"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git program")
def test_git_changes_is_none_where_it_cannot_be_told(tmp_path: Path, monkeypatch) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    _git(outer, "init", "-q")  # a real repository above: never reported for a checkout below it
    (outer / "plain").mkdir()
    assert art.git_changes(outer / "plain") == []  # a folder of the outer checkout is part of it
    shipped = _fake_repo(outer / "shipped", "ref: refs/heads/main", {"refs/heads/main": SHA})  # a Ray job's copy
    assert art.git_revision(shipped) == SHA and art.git_changes(shipped) is None
    assert art.git_changes(tmp_path / "nowhere") is None
    real_read = Path.read_text

    def unreadable(self, *a, **k):
        if self.name == ".git":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".git").write_text(f"gitdir: {outer / '.git'}\n")  # a worktree's link file, unreadable below
    monkeypatch.setattr(Path, "read_text", unreadable)
    assert art.git_revision(linked) is None and art.git_changes(linked) is None
    monkeypatch.undo()
    monkeypatch.setattr(art.shutil, "which", lambda name: None)  # no git program
    assert art.git_changes(outer) is None


def test_manifest_records_the_code_state_this_process_first_saw(tmp_path: Path, monkeypatch) -> None:
    seen = iter([["pivotal_ray/core/x.py"], ["pivotal_ray/core/y.py"]])
    monkeypatch.setattr(art, "git_changes", lambda path=None: next(seen))
    art._code_state.cache_clear()
    try:
        art.write_manifest(tmp_path / "a", config={"a": 1}, seed=0, timings={})
        art.write_manifest(tmp_path / "a", config={"a": 1}, seed=0, timings={"total_s": 1.0})  # an edit meanwhile
        manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
        assert manifest["git_changes"] == ["pivotal_ray/core/x.py"] and manifest["git_revision"] == art.git_revision()
    finally:
        art._code_state.cache_clear()
