"""Ray Data feature extraction (distributed/extract.py) against RBC factors computed in-process.

Toy set (600 train samples), a tiny MLP, two snapshots written the way the training stage writes
them (model.pt = state_dict, metrics.json with the epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pivotal_ray.config import DataConfig, FeatureConfig, ModelConfig, NoiseConfig, to_dict
from pivotal_ray.core.data import build_data
from pivotal_ray.core.features import rbc_factors
from pivotal_ray.core.featuretable import parquet_files
from pivotal_ray.core.models import build_model
from pivotal_ray.core.seeding import numpy_rng
from pivotal_ray.distributed.extract import extract_features, load_features

from .procs import descendants
from .snapshot_dirs import write_snapshots

pytestmark = pytest.mark.integration

SEED = 3
DATA_SPEC = {"data": to_dict(DataConfig(name="toy")), "noise": to_dict(NoiseConfig()), "seed": SEED}
MODEL_SPEC = to_dict(ModelConfig(name="mlp", hidden=8, depth=2))
EPOCHS = (4, 9)


@pytest.fixture(scope="module")
def bundle():
    return build_data(DATA_SPEC["data"], DATA_SPEC["noise"], SEED)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, bundle) -> list[dict]:
    """Two checkpoint dirs with different weights (different init seeds stand in for training)."""
    snaps = write_snapshots(tmp_path_factory.mktemp("run"), model_spec=MODEL_SPEC, bundle=bundle, epochs=EPOCHS,
                            seed_base=100, val_accs=(0.5, 0.5))
    return [{"path": s["path"], "epoch": s["epoch"]} for s in snaps]


def _reference(bundle, snapshots, ids: np.ndarray, *, label_aware: bool) -> tuple[np.ndarray, np.ndarray]:
    """rbc_factors in this process: A (n, K, C), X (n, K, d) for ids in the given order."""
    split = bundle.train
    pos = split.positions_of(ids)
    x = split.inputs(pos, augment=False)
    y = torch.as_tensor(split.y_obs[pos])
    As, Xs = [], []
    for snap in snapshots:
        model = build_model(MODEL_SPEC, bundle.num_classes, bundle.input_shape, seed=0)
        model.load_state_dict(torch.load(Path(snap["path"]) / "model.pt", weights_only=True))
        A, X = rbc_factors(model, x, y, label_aware=label_aware)
        As.append(A.numpy())
        Xs.append(X.numpy())
    return np.stack(As, axis=1), np.stack(Xs, axis=1)


def test_table_matches_in_process_factors(ray_session, tmp_path, bundle, snapshots) -> None:
    ids = numpy_rng(0, "order").permutation(bundle.train.sample_id)  # candidates in no particular order
    assert ids.shape == (600,)
    out = extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, snapshots=snapshots, sample_ids=ids,
                           feature_spec=to_dict(FeatureConfig(label_aware=True)),
                           output_path=str(tmp_path / "feats"), num_actors=2, num_cpus=0.5, batch_size=128)
    assert out == str(tmp_path / "feats")

    # raw table: the documented schema, every (sample_id, snapshot) exactly once, epochs per snapshot
    files = parquet_files(out)
    schema = pq.read_schema(files[0])
    C, d = bundle.num_classes, MODEL_SPEC["hidden"]
    assert schema.field("A").type == pa.list_(pa.float32(), C)
    assert schema.field("x").type == pa.list_(pa.float32(), d)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    sid, snap, ep = (table.column(c).to_numpy() for c in ("sample_id", "snapshot", "epoch"))
    assert table.num_rows == 2 * 600
    pairs = np.unique(np.stack([sid, snap], axis=1), axis=0)
    assert pairs.shape[0] == 2 * 600 and set(sid.tolist()) == set(ids.tolist())
    np.testing.assert_array_equal(ep, np.asarray(EPOCHS)[snap])

    feats = load_features(out)
    order = np.sort(ids)
    A_ref, X_ref = _reference(bundle, snapshots, order, label_aware=True)
    np.testing.assert_array_equal(feats.sample_id, order)
    np.testing.assert_allclose(feats.A, A_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.X, X_ref, rtol=1e-5, atol=1e-6)
    # label-aware used the OBSERVED labels: A = p - onehot(y_obs) is negative exactly at y_obs
    y_obs = bundle.train.y_obs[bundle.train.positions_of(order)]
    assert (y_obs != bundle.train.y_true[bundle.train.positions_of(order)]).any()  # noise is present
    np.testing.assert_array_equal(np.argmin(feats.A, axis=2), np.repeat(y_obs[:, None], 2, axis=1))
    meta = json.loads((Path(out) / "features.json").read_text())
    assert meta["num_rows"] == 1200 and [s["epoch"] for s in meta["snapshots"]] == list(EPOCHS)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_failures_leave_no_table(ray_session, tmp_path, bundle, snapshots) -> None:
    target = tmp_path / "feats"
    common = dict(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, feature_spec={"kind": "rbc"},
                  output_path=str(target), batch_size=256)
    ids = bundle.train.sample_id
    # a bad snapshot path fails in the driver before anything is written
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        extract_features(snapshots=[snapshots[0], {"path": str(tmp_path / "nope"), "epoch": 1}],
                         sample_ids=ids, **common)
    with pytest.raises(ValueError, match="duplicates"):
        extract_features(snapshots=snapshots, sample_ids=np.r_[ids, ids[:1]], **common)
    assert _leftovers(tmp_path) == []
    # an unknown id in the LAST of four blocks fails inside an actor (Ray wraps the KeyError): whatever
    # the other blocks wrote to the temporary directory is removed and nothing appears at the target
    with pytest.raises(Exception, match="999999"):
        extract_features(snapshots=snapshots, sample_ids=np.r_[ids[:50], 999_999], **{**common, "batch_size": 13})
    assert _leftovers(tmp_path) == []
    # a damaged model.pt (cut off) names the file and the fix, not the model_spec
    cut = tmp_path / "run" / "checkpoint_cut"
    shutil.copytree(snapshots[0]["path"], cut)
    (cut / "model.pt").write_bytes((cut / "model.pt").read_bytes()[:100])
    with pytest.raises(Exception, match=r"cannot read snapshot 0 .*delete the training run that saved it"):
        extract_features(snapshots=[{"path": str(cut), "epoch": 0}], sample_ids=ids, **common)
    shutil.rmtree(tmp_path / "run")
    assert _leftovers(tmp_path) == []
    # an existing table is never clobbered silently
    target.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        extract_features(snapshots=snapshots, sample_ids=ids, **common)


def test_a_table_the_driver_cannot_see_names_shared_storage(ray_session, tmp_path, bundle, snapshots,
                                                            monkeypatch) -> None:
    # On a cluster of several nodes whose output_dir is a per-node disk, the write tasks leave the
    # files on the workers: the driver sees none of them (simulated here) and says what to fix
    import pivotal_ray.distributed.extract as extract

    def nothing_here(path):
        raise FileNotFoundError(f"no parquet files in {path}")

    monkeypatch.setattr(extract, "parquet_files", nothing_here)
    monkeypatch.setattr(extract.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(RuntimeError, match=r"wrote 0 rows visible here.*2 nodes.*every node mounts"):
        extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, feature_spec={"kind": "rbc"},
                         snapshots=snapshots[:1], sample_ids=bundle.train.sample_id[:40],
                         output_path=str(tmp_path / "feats"), batch_size=64)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# mutation audit
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_fail_in_the_driver_naming_the_fix(tmp_path, bundle, snapshots, monkeypatch) -> None:
    """Checked before any Ray work (no ray_session here) and before any file is written."""
    import pivotal_ray.distributed.extract as extract

    def no_ray(*args, **kwargs):
        raise AssertionError("bad arguments reached the Ray Data stage")

    monkeypatch.setattr(extract.ray.data, "from_arrow", no_ray)
    ids = bundle.train.sample_id[:20]
    common = dict(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, snapshots=snapshots, sample_ids=ids,
                  feature_spec={"kind": "rbc"}, output_path=str(tmp_path / "feats"))
    cases = [
        (dict(data_spec={"data": DATA_SPEC["data"], "noise": DATA_SPEC["noise"]}), ValueError, r"lacks \['seed'\]"),
        (dict(snapshots=[]), ValueError, "no snapshots given"),
        (dict(snapshots=[{"path": snapshots[0]["path"]}]), ValueError, "each snapshot must be"),
        (dict(sample_ids=np.array([], dtype=np.int64)), ValueError, "non-empty 1-D integer"),
        (dict(sample_ids=ids.astype(np.float64)), ValueError, "non-empty 1-D integer"),
        (dict(sample_ids=ids.reshape(4, 5)), ValueError, "non-empty 1-D integer"),
        (dict(num_actors=0), ValueError, "num_actors >= 1"),
        (dict(num_cpus=0.0), ValueError, "num_cpus > 0"),
        (dict(num_gpus=-1.0), ValueError, "num_gpus >= 0"),
        (dict(batch_size=0), ValueError, "batch_size >= 1"),
        (dict(feature_spec={"kind": "nope"}), KeyError, "choose one of"),
    ]
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            extract_features(**{**common, **change})
    assert _leftovers(tmp_path) == []


def test_snapshot_records_make_local_paths_absolute() -> None:
    from pivotal_ray.distributed.extract import snapshot_records

    got = snapshot_records([{"path": "runs/warmup/checkpoint_000004", "epoch": np.int64(4)},
                            {"path": "s3://bucket/runs/checkpoint_000009", "epoch": 9, "val_acc": 0.5}])
    assert got == [{"path": str(Path("runs/warmup/checkpoint_000004").resolve()), "epoch": 4},
                   {"path": "s3://bucket/runs/checkpoint_000009", "epoch": 9}]
    assert type(got[0]["epoch"]) is int and Path(got[0]["path"]).is_absolute()


def test_overwrite_replaces_the_table_and_records_the_seed(ray_session, tmp_path, bundle, snapshots) -> None:
    ids = bundle.train.sample_id[:60]
    common = dict(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, sample_ids=ids, feature_spec={"kind": "rbc"},
                  output_path=str(tmp_path / "feats"), batch_size=64)
    extract_features(snapshots=snapshots[:1], **common)
    meta = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert meta["seed"] == SEED and meta["num_rows"] == 60
    extract_features(snapshots=snapshots, seed=11, overwrite=True, **common)
    meta = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert [s["epoch"] for s in meta["snapshots"]] == list(EPOCHS) and meta["num_rows"] == 120
    assert meta["seed"] == 11 and meta["num_samples"] == 60
    assert _leftovers(tmp_path) == ["feats"]  # no temporary or old table left beside it
    feats = load_features(tmp_path / "feats")
    assert feats.A.shape[:2] == (60, 2)
    A_ref, _ = _reference(bundle, snapshots, ids, label_aware=False)
    np.testing.assert_allclose(feats.A, A_ref, rtol=1e-5, atol=1e-6)


def test_extraction_workers_hold_their_snapshots_in_eval_mode(ray_session, bundle, snapshots) -> None:
    """Features are taken in eval mode (GBC keeps the mode it is given: BatchNorm/dropout models
    would otherwise be differentiated in train mode)."""
    from pivotal_ray.distributed.extract import _ExtractWorker

    threads = torch.get_num_threads()  # the worker sets this process's intra-op threads
    try:
        for kind in ("rbc", "gbc"):
            worker = _ExtractWorker(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, snapshots=snapshots,
                                    feature_spec={"kind": kind}, candidate_ids=bundle.train.sample_id[:50],
                                    seed=SEED, num_cpus=1, batch_size=25)
            assert [(k, e) for k, e, _ in worker.extractors] == [(0, EPOCHS[0]), (1, EPOCHS[1])]
            assert all(not ext.model.training for _, _, ext in worker.extractors)
    finally:
        torch.set_num_threads(threads)


def _descendants_titled(fragment: str) -> list[int]:
    """pids of this process's descendants (the local Ray this test session started, its workers)
    whose command line holds ``fragment``: another Ray on the machine is never touched."""
    return [pid for pid, cmdline in descendants().items() if fragment in cmdline]


def _earlier_extraction_actors() -> set[int]:
    """pids of extraction actors of earlier tests still on their way out (given up to 10 s): Ray
    Data releases a pool by dropping its handles, so its actors end when those are collected, which
    on a loaded machine took over a minute (a CI run, before a failed extraction released its own).
    They are never one of a new extraction's (each starts its own pool): left alone, not counted."""
    import gc

    gc.collect()
    deadline = time.monotonic() + 10
    while _descendants_titled("_ExtractWorker") and time.monotonic() < deadline:
        time.sleep(0.1)
    return set(_descendants_titled("_ExtractWorker"))


def test_an_extraction_actor_killed_every_time_ends_the_extraction(ray_session, tmp_path, bundle, snapshots) -> None:
    """ray.extract_max_restarts: an actor whose process dies every time (killed here as soon as it
    appears, as the OOM killer would) is restarted that many times (2 here: 3 processes killed),
    then the extraction fails with a lost-worker error (jobs: exit status 3) and leaves no table,
    instead of retrying forever (Ray Data's default, -1)."""
    import signal
    import threading

    from pivotal_ray.distributed.failures import worker_lost

    earlier = _earlier_extraction_actors()
    stop, kills = threading.Event(), []

    def killer() -> None:
        while not stop.is_set():
            for pid in set(_descendants_titled("_ExtractWorker")) - earlier:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Exception) as err:
            extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, feature_spec={"kind": "rbc"},
                             snapshots=snapshots, sample_ids=bundle.train.sample_id, output_path=str(tmp_path / "feats"),
                             batch_size=8, max_restarts=2)
    finally:
        stop.set()
        thread.join()
    assert worker_lost(err.value) is not None, repr(err.value)
    assert len(set(kills)) >= 3  # the actor and its two restarts (0 or 1 would end sooner)
    assert time.monotonic() - t0 < 400  # 8.5 s idle, 101 s with the machine busy; unlimited restarts never end
    assert _leftovers(tmp_path) == []


def test_a_failed_extraction_lets_its_actors_go_while_its_error_is_kept(ray_session, tmp_path, bundle, snapshots) -> None:
    """Ray Data releases a pool by dropping its handles, and a failed execution's tracebacks held
    some: the actor (and the CPUs/GPUs it reserved) lived as long as the exception, which a
    comparison running runs side by side keeps until the others end. Now it goes at once, and the
    traceback still names the cause."""
    import traceback

    earlier = _earlier_extraction_actors()
    with pytest.raises(Exception, match="999999") as err:
        extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, feature_spec={"kind": "rbc"},
                         snapshots=snapshots, sample_ids=np.r_[bundle.train.sample_id[:50], 999_999],
                         output_path=str(tmp_path / "feats"), batch_size=13)
    deadline = time.monotonic() + 180  # ~1.5 s on an idle machine
    while set(_descendants_titled("_ExtractWorker")) - earlier and time.monotonic() < deadline:
        time.sleep(0.1)  # the actor goes only if its handles were dropped: err still holds its traceback
    assert not set(_descendants_titled("_ExtractWorker")) - earlier
    printed = "".join(traceback.format_exception(err.value))
    assert "positions_of" in printed and "999999" in printed and "write_parquet" in printed
    assert _leftovers(tmp_path) == []


def test_an_extraction_actor_applies_ray_deterministic(snapshots):
    """The pool's constructor leaves PyTorch's defaults without ray.deterministic and switches its
    process to deterministic kernels with it. Built in a fresh interpreter, as Ray starts each
    actor in a process of its own (the setting is process-wide): without it first, then with it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = ("import json, sys, numpy as np, ray, torch; ray.get_gpu_ids = lambda: []  # no Ray here: no GPU\n"
            "from pivotal_ray.distributed.extract import _ExtractWorker\n"
            "spec = json.loads(sys.argv[1])\n"
            "for flag in (False, True):\n"
            "    w = _ExtractWorker(**spec, feature_spec={'kind': 'rbc'}, candidate_ids=np.arange(3), seed=3,"
            " num_cpus=1, batch_size=8, deterministic=flag)\n"
            "    print(len(w.extractors), torch.are_deterministic_algorithms_enabled())")
    spec = json.dumps({"data_spec": DATA_SPEC, "model_spec": MODEL_SPEC, "snapshots": snapshots})
    done = subprocess.run([sys.executable, "-c", code, spec], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "False", "2", "True"]


def test_ray_deterministic_reaches_the_pool_constructor(ray_session, tmp_path, snapshots, monkeypatch):
    """extract_features hands ray.deterministic to every actor's constructor (the keywords Ray
    Data builds each actor with), and leaves nothing behind when the stage stops there."""
    import ray.data

    seen = []

    class Stop(Exception):
        pass

    def record(self, fn, **kwargs):
        seen.append(kwargs["fn_constructor_kwargs"]["deterministic"])
        raise Stop

    monkeypatch.setattr(ray.data.Dataset, "map_batches", record)
    for flag in (True, False):
        with pytest.raises(Stop):
            extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, snapshots=snapshots[:1],
                             sample_ids=np.arange(8), feature_spec={"kind": "rbc"},
                             output_path=str(tmp_path / "feats"), batch_size=8, deterministic=flag)
    assert seen == [True, False] and list(tmp_path.iterdir()) == []


def test_prediction_table_matches_the_softmax_in_process_and_feeds_the_entropy_selectors(
        ray_session, tmp_path, bundle, snapshots) -> None:
    """kind="predictions" on the actor pool: one row per sample of the entropy, margin and predicted
    class of the snapshot's softmax, as :func:`predict_probs` computes it here; the uncertain and
    certain selectors rank the candidates by that table's entropies (their model runs on the
    actors, not in the driver)."""
    from types import SimpleNamespace

    from pivotal_ray.config import ExperimentConfig
    from pivotal_ray.core.baselines import predict_probs, predictive_entropy, rank_by_entropy, read_predictions
    from pivotal_ray.selectors import SELECTORS, RoundContext

    ids = numpy_rng(1, "order").permutation(bundle.train.sample_id)
    out = extract_features(data_spec=DATA_SPEC, model_spec=MODEL_SPEC, snapshots=snapshots[1:], sample_ids=ids,
                           feature_spec={"kind": "predictions"}, output_path=str(tmp_path / "pred"),
                           num_actors=2, num_cpus=0.5, batch_size=128)
    pred = read_predictions(out)
    model = build_model(MODEL_SPEC, bundle.num_classes, bundle.input_shape)
    model.load_state_dict(torch.load(Path(snapshots[1]["path"]) / "model.pt", weights_only=True))
    train = bundle.train
    p = predict_probs(model.eval(), train, train.positions_of(pred.sample_id))  # (600, 2)
    np.testing.assert_array_equal(pred.sample_id, np.sort(ids))
    assert pred.epoch == EPOCHS[1]
    np.testing.assert_allclose(pred.entropy, predictive_entropy(p), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(pred.margin, np.abs(p[:, 1] - p[:, 0]), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(pred.pred, p.argmax(1))
    assert json.loads((Path(out) / "features.json").read_text())["kind"] == "predictions"

    cfg = to_dict(ExperimentConfig(data=DataConfig(name="toy"), model=ModelConfig(name="mlp", hidden=8, depth=2),
                                   seed=SEED))
    cfg["ray"].update(extract_actors=2, extract_cpus=0.5)
    snaps = [{**s, "val_acc": v} for s, v in zip(snapshots, (0.4, 0.7))]  # the later one is the best
    run = SimpleNamespace(snapshots=snaps, best_epoch=EPOCHS[1],
                          extra={"history": [{"epoch": s["epoch"], "val_acc": s["val_acc"]} for s in snaps]},
                          snapshot=lambda e: next(s for s in snaps if s["epoch"] == e))
    meta = np.sort(numpy_rng(2, "meta").choice(train.sample_id, size=5, replace=False))
    ctx = RoundContext(cfg=cfg, bundle=bundle, meta_ids=meta, run=run, round=1, work_dir=tmp_path / "round")
    cand = ctx.candidates()
    H = predictive_entropy(predict_probs(model.eval(), train, train.positions_of(cand)))
    for method, highest in (("uncertain", True), ("certain", False)):
        picks = SELECTORS.get(method)(ctx, 6)
        want, h = rank_by_entropy(cand, H, k=6, highest=highest)
        np.testing.assert_array_equal(picks.sample_id, want)
        np.testing.assert_allclose(picks.score, h, rtol=1e-6, atol=1e-12)
        assert picks.info["snapshot_epoch"] == EPOCHS[1]
    assert read_predictions(tmp_path / "round" / "predictions").epoch == EPOCHS[1]
