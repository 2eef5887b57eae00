import pickle
import random

import pytest
import torch

from pivotal_ray import storage


class NotJustTensors:
    """A pickled object that is not tensors and containers: torch_load must refuse it."""

    def __init__(self, value):
        self.value = value


def test_local_path_and_file_uri_read_the_same_snapshot(tmp_path):
    run = tmp_path / "run"
    for i in (1, 0):
        d = run / f"checkpoint_{i}"
        d.mkdir(parents=True)
        torch.save({"w": torch.full((3,), float(i))}, d / "model.pt")
        (d / "metrics.json").write_text(f'{{"epoch": {i}}}')
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # a file, not a snapshot dir
    for base in (str(run), f"file://{run}"):
        dirs = storage.list_dirs(base, prefix="checkpoint_")
        assert [d.rsplit("/", 1)[1] for d in dirs] == ["checkpoint_0", "checkpoint_1"]
        assert storage.read_json(storage.join(dirs[1], "metrics.json")) == {"epoch": 1}
        torch.testing.assert_close(storage.torch_load(storage.join(dirs[1], "model.pt"))["w"], torch.ones(3))
        assert storage.exists(storage.join(dirs[0], "model.pt"))
        assert not storage.exists(storage.join(dirs[0], "missing.pt"))
        sizes = storage.file_sizes(dirs[0])  # files only, with their sizes
        assert sizes == {"model.pt": (run / "checkpoint_0" / "model.pt").stat().st_size, "metrics.json": 12}
        assert storage.file_sizes(base) == {"checkpoint_manager_snapshot.json": 2}  # not the folders
        assert storage.file_sizes(storage.join(base, "nope")) == {}
    assert storage.list_dirs(str(tmp_path / "nope"), prefix="checkpoint_") == []


def test_list_dirs_returns_the_checkpoints_by_name_not_in_directory_order(tmp_path):
    """pyarrow lists a folder in the file system's order; the snapshot scan takes the last copy of
    an epoch as the latest one, which holds only when the checkpoints (named by time) come sorted."""
    names = [f"checkpoint_2026-01-01_00-{i // 60:02d}-{i % 60:02d}.000000" for i in range(50)]
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    for name in shuffled:
        (tmp_path / name).mkdir()
    (tmp_path / "other_dir").mkdir()
    dirs = storage.list_dirs(str(tmp_path), prefix="checkpoint_")
    assert [d.rsplit("/", 1)[1] for d in dirs] == names


def test_torch_load_reads_tensors_only(tmp_path):
    """weights_only=True: a snapshot file holding arbitrary pickled objects is refused, not run."""
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    torch.testing.assert_close(storage.torch_load(str(tmp_path / "ok.pt"))["w"], torch.ones(2))
    torch.save({"w": NotJustTensors(1)}, tmp_path / "obj.pt")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        storage.torch_load(str(tmp_path / "obj.pt"))


def test_snapshot_scan_skips_checkpoints_with_a_missing_file(tmp_path):
    """A checkpoint whose upload was cut off (any of its files missing) is not a snapshot."""
    import json

    from pivotal_ray.distributed.train import SNAPSHOT_FILES, _scan_snapshots

    for epoch in range(3):
        d = tmp_path / f"checkpoint_00000{epoch}"
        d.mkdir()
        for f in SNAPSHOT_FILES:
            (d / f).write_text(json.dumps({"epoch": epoch, "val_acc": 0.5}) if f == "metrics.json"
                               else "[]" if f == "history.json" else "x")
    (tmp_path / "checkpoint_000001" / "train_state.pt").unlink()  # metrics.json arrived, the state did not
    assert [s["epoch"] for s in _scan_snapshots(str(tmp_path))] == [0, 2]
    (tmp_path / "checkpoint_000002" / "history.json").write_text('{"epoch": 2, "val')  # cut off mid-copy
    assert [s["epoch"] for s in _scan_snapshots(str(tmp_path))] == [0]


def test_snapshot_scan_checks_pt_sizes_and_keeps_one_copy_per_epoch(tmp_path):
    """A .pt file cut off mid-upload (all four files there, the JSON whole) is not a snapshot; an
    epoch saved twice (a resume from the checkpoint before) counts once, as its later copy."""
    import json

    from pivotal_ray.distributed.train import PT_FILES, _scan_snapshots

    def write(name, epoch, pt_bytes=b"0123456789", record=True):
        d = tmp_path / name
        d.mkdir()
        for f in PT_FILES:
            (d / f).write_bytes(pt_bytes)
        m = {"epoch": epoch, "val_acc": 0.5}
        if record:
            m["file_sizes"] = {f: 10 for f in PT_FILES}
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "history.json").write_text("[]")
        return d

    write("checkpoint_2026-01-01_00-00-00.000001", 0)
    write("checkpoint_2026-01-01_00-00-01.000001", 1, pt_bytes=b"01234")  # cut off
    write("checkpoint_2026-01-01_00-00-02.000001", 2, record=False)  # written before sizes were recorded
    snaps = _scan_snapshots(str(tmp_path))
    assert [s["epoch"] for s in snaps] == [0, 2]
    assert "file_sizes" not in snaps[0]
    write("checkpoint_2026-01-01_00-00-03.000001", 1)  # epoch 1 saved again, whole
    write("checkpoint_2026-01-01_00-00-04.000001", 2)
    snaps = _scan_snapshots(str(tmp_path))
    assert [s["epoch"] for s in snaps] == [0, 1, 2]
    assert [s["path"][-6:] for s in snaps] == ["000001"] * 3
    assert snaps[2]["path"].endswith("00-00-04.000001")


def test_final_weights_of_a_gpu_trained_run_load_on_a_cpu_only_driver(tmp_path, monkeypatch):
    """train_state.pt from a CUDA worker holds CUDA tensors (SGD momentum buffers); the driver,
    on a head without a GPU, must still read the weights."""
    import torch.serialization as ser

    from pivotal_ray.distributed.train import TrainRun

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # momentum buffers
    snap = tmp_path / "checkpoint_000000"
    snap.mkdir()
    with monkeypatch.context() as m:
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")  # what a CUDA worker's torch.save records
        torch.save({"optimizer": opt.state_dict(), "weights": torch.linspace(0, 1, 5)}, snap / "train_state.pt")
    if not torch.cuda.is_available():
        try:
            storage.torch_load(str(snap / "train_state.pt"))
            raise AssertionError("the file should name a CUDA device")
        except RuntimeError as err:
            assert "CUDA" in str(err)
    run = TrainRun(name="r", path=str(tmp_path), snapshots=[{"path": str(snap), "epoch": 0}], best_epoch=0,
                   best_val_acc=0.5, test_acc_at_best=0.5, final_test_acc=0.5)
    w = run.final_weights()
    assert w.device.type == "cpu"
    torch.testing.assert_close(w, torch.linspace(0, 1, 5))


def test_join_keeps_a_uris_query_and_root():
    # e.g. an S3-compatible store: ray.storage_path=s3://bucket/runs?endpoint_override=host:9000
    assert (storage.join("s3://b/runs?endpoint_override=localhost:9000", "exp", "checkpoint_1")
            == "s3://b/runs/exp/checkpoint_1?endpoint_override=localhost:9000")
    assert storage.join("s3://b/runs/", "exp") == "s3://b/runs/exp"
    assert storage.join("file:///", "x") == "file:///x"
    assert storage.join("hdfs:///user/x", "exp") == "hdfs:///user/x/exp"  # the rest kept as written
    assert storage.join("S3://Bucket/X", "exp") == "S3://Bucket/X/exp"
    assert storage.join("/tmp/a/", "b", "c") == "/tmp/a/b/c"


def test_snapshot_scan_takes_the_copy_saved_last_by_utc_time_not_by_folder_name(tmp_path):
    """Ray names checkpoint folders by the local time of the save: after a clock change (a DST
    fall-back, rank 0 on a node in another zone) a later copy of an epoch can sort first. The
    copy with the larger recorded UTC save time wins; one without a record counts as earlier."""
    import json

    from pivotal_ray.distributed.train import PT_FILES, _scan_snapshots

    def write(name, epoch, saved_at=None):
        d = tmp_path / name
        d.mkdir()
        for f in PT_FILES:
            (d / f).write_bytes(b"0123456789")
        m = {"epoch": epoch, "val_acc": 0.5, "file_sizes": {f: 10 for f in PT_FILES}}
        if saved_at is not None:
            m["saved_at"] = saved_at
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "history.json").write_text("[]")

    write("checkpoint_2026-10-25_02-30-00.000001", 0, saved_at=1000.0)
    write("checkpoint_2026-10-25_02-40-00.000001", 1, saved_at=1600.0)  # first copy of epoch 1
    write("checkpoint_2026-10-25_02-10-00.000001", 1, saved_at=5000.0)  # resumed after the clocks went back
    write("checkpoint_2026-10-25_02-20-00.000001", 2)  # an old-style copy (no record) ...
    write("checkpoint_2026-10-25_02-00-00.000001", 2, saved_at=4000.0)  # ... is earlier than a recorded one
    snaps = _scan_snapshots(str(tmp_path))
    assert [s["epoch"] for s in snaps] == [0, 1, 2]
    assert snaps[1]["path"].endswith("02-10-00.000001")
    assert snaps[2]["path"].endswith("02-00-00.000001")
    assert all("saved_at" not in s for s in snaps)
