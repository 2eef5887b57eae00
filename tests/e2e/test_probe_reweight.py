"""``jobs.probe_reweight`` (no Ray) on a tiny synthetic MNIST in torchvision's IDX layout."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from jobs import probe_reweight
from pivotal_ray.config import DataConfig, ExperimentConfig, NoiseConfig, SelectionConfig
from pivotal_ray.core.data import build_data
from pivotal_ray.training import warmup_ids

LINE = re.compile(r"^ep (\d+) val ([\d.]+) acc ([\d.]+) (?:ema ([\d.]+) )?w_clean ([\d.]+) w_noisy ([\d.]+) [\d.]+s$")


def _write_idx(path, array: np.ndarray) -> None:
    # IDX: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions, then
    # each dimension as a big-endian int32, then the data
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """600 training and 200 test images: class c lights up its own 7x7 tile, plus noise."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("t10k", 200)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            r, k = divmod(int(c), 4)
            x[i, 7 * r : 7 * r + 7, 7 * k : 7 * k + 7] += 190
        _write_idx(raw / f"{split}-images-idx3-ubyte", x)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    return root


def _probe(root, capsys, *extra: str) -> tuple[str, list[tuple[float, ...]]]:
    probe_reweight.main(["--root", str(root), "--mode", "l2rw", "--meta-lr", "0", "--batch", "100",
                         "--epochs", "3", "--threads", "1", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [LINE.match(line) for line in lines[1:]]
    assert all(rows), lines
    return lines[0], [tuple(float(g) for g in m.groups() if g is not None) for m in rows]


def test_probe_trains_the_pipelines_warmup_meta_set_and_reports_every_epoch(tiny_mnist, capsys):
    header, rows = _probe(tiny_mnist, capsys, "--ema", "0.9")
    data, noise = DataConfig(name="mnist", root=str(tiny_mnist)), NoiseConfig(kind="adversarial", rate=0.6)
    bundle = build_data(data, noise, 0)
    ids = warmup_ids(ExperimentConfig(seed=0, data=data, noise=noise,
                                      selection=SelectionConfig(budget=20, warmup=10)), bundle)
    counts = np.bincount(bundle.train.y_true[bundle.train.positions_of(ids)], minlength=10).tolist()
    assert header == f"meta 10 samples, per class {counts}"
    assert [r[0] for r in rows] == [0, 1, 2]
    assert all(len(r) == 6 for r in rows)  # val, acc, ema, w_clean, w_noisy
    assert all(0.0 <= v <= 1.0 for r in rows for v in r[1:4])
    # l2rw: clean samples, whose gradients agree with the clean meta set, weigh more than the
    # deranged ones from the first epoch on (mean weights 1.2-1.6 against 0.6-0.9 here)
    assert all(r[4] > 1.0 > r[5] for r in rows)


def test_same_seeds_repeat_and_train_seed_changes_the_run(tiny_mnist, capsys):
    _, first = _probe(tiny_mnist, capsys)
    _, again = _probe(tiny_mnist, capsys)
    _, other = _probe(tiny_mnist, capsys, "--train-seed", "7")
    assert first == again
    assert first != other


def test_meta_from_reads_a_selection_csv_and_rejects_unknown_ids(tiny_mnist, capsys, tmp_path):
    sel = tmp_path / "selection.csv"
    bundle = build_data(DataConfig(name="mnist", root=str(tiny_mnist)), NoiseConfig(kind="adversarial", rate=0.6), 0)
    ids = bundle.train.sample_id[np.flatnonzero(bundle.train.y_true == 3)[:4]]
    sel.write_text("sample_id,observed_label,cleaned_label\n" + "".join(f"{i},0,3\n" for i in ids))
    header, _ = _probe(tiny_mnist, capsys, "--meta-from", str(sel))
    assert header == "meta 4 samples, per class [0, 0, 0, 4, 0, 0, 0, 0, 0, 0]"
    sel.write_text("sample_id,observed_label,cleaned_label\n999999,0,3\n")
    with pytest.raises(SystemExit, match="999999"):
        probe_reweight.main(["--root", str(tiny_mnist), "--meta-from", str(sel), "--epochs", "1"])
