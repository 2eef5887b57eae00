"""Data contract (architecture.md) and the paper's protocol (spec section 5) on real and synthetic data."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pivotal_ray.config import ConfigError, DataConfig, NoiseConfig
from pivotal_ray.core.data import Split, build_data, crop_flip, sample_seeds


# ----------------------------------------------------------------------------- toy (Figure 1)
def test_toy_split_sizes_disjoint_ids_and_clean_val_test():
    b = build_data(DataConfig(), NoiseConfig(kind="uniform", rate=0.6), seed=0)
    assert (len(b.train), len(b.test), len(b.val)) == (600, 240, 160)
    ids = np.concatenate([b.train.sample_id, b.test.sample_id, b.val.sample_id])
    assert np.array_equal(np.sort(ids), np.arange(1000))
    assert b.num_classes == 2 and b.input_shape == (2,)
    for s in (b.val, b.test):
        assert np.array_equal(s.y_obs, s.y_true)
    for s in (b.train, b.val, b.test):
        assert s.sample_id.dtype == s.y_obs.dtype == s.y_true.dtype == np.int64
    # two classes: every uniform flip goes to the other class, so the train flip rate is ~ 0.6
    rate = (b.train.y_obs != b.train.y_true).mean()
    assert abs(rate - 0.6) < 5 * np.sqrt(0.6 * 0.4 / 600)


def test_toy_geometry_and_exactly_one_percent_base_flips():
    # With a tiny std every point sits at its corner, so the generating class is sign(x_2) and
    # y_true disagrees with it on exactly floor(1% of 1000) = 10 points (the paper's base noise).
    b = build_data({"toy_std": 0.01}, {"kind": "none", "rate": 0.0}, seed=1)
    x = torch.cat([s.inputs(np.arange(len(s))) for s in (b.train, b.val, b.test)]).numpy()  # (1000, 2)
    y = np.concatenate([s.y_true for s in (b.train, b.val, b.test)])
    assert x.dtype == np.float32 and np.all(np.abs(np.abs(x) - 1) < 0.1)
    corners, counts = np.unique(np.sign(x), axis=0, return_counts=True)
    assert corners.shape == (4, 2) and np.all(counts == 250)
    assert ((x[:, 1] > 0).astype(np.int64) != y).sum() == 10
    assert np.array_equal(b.train.y_obs, b.train.y_true)  # kind none


def test_build_data_is_deterministic_in_cfg_and_seed_and_accepts_dicts():
    a = build_data({"name": "toy"}, {"kind": "adversarial", "rate": 0.4}, seed=5)
    b = build_data(DataConfig(name="toy"), NoiseConfig(kind="adversarial", rate=0.4), seed=5)
    c = build_data({"name": "toy"}, {"kind": "adversarial", "rate": 0.4}, seed=6)
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert np.array_equal(s.sample_id, t.sample_id) and np.array_equal(s.y_obs, t.y_obs)
        assert torch.equal(s.inputs(np.arange(len(s))), t.inputs(np.arange(len(t))))
    assert not np.array_equal(a.train.sample_id, c.train.sample_id)
    assert (a.train.y_obs != a.train.y_true).sum() == 240  # adversarial: exactly floor(0.4 * 600)


def test_positions_of_round_trips_and_names_unknown_ids():
    s = build_data({}, {}, seed=0).train
    pos = np.array([5, 0, 599, 17])
    assert np.array_equal(s.positions_of(s.sample_id[pos]), pos)
    missing = int(np.setdiff1d(np.arange(1000), s.sample_id)[0])
    with pytest.raises(KeyError, match=str(missing)):
        s.positions_of([s.sample_id[0], missing])
    with pytest.raises(IndexError, match="positions_of"):
        s.inputs([600])
    with pytest.raises(ValueError, match="reweight.augment=false"):
        s.inputs([0], augment=True, generator=torch.Generator())


def test_imbalance_applies_to_train_by_true_label_before_noise():
    b = build_data({"toy_std": 0.01}, {"kind": "uniform", "rate": 0.2, "imbalance_factor": 10}, seed=2)
    counts = np.bincount(b.train.y_true, minlength=2)
    assert counts[1] == counts[0] // 10  # class 1 keeps n_max / 10
    assert len(b.val) == 160 and len(b.test) == 240  # val/test untouched


# ----------------------------------------------------------------------------- MNIST (shared data)
def _idx(path: Path) -> np.ndarray:
    """Independent IDX reader: big-endian dims after a 4-byte magic whose last byte is the rank."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def mnist(shared_data):
    return build_data({"name": "mnist", "root": str(shared_data)}, {"kind": "adversarial", "rate": 0.6}, seed=0)


def test_mnist_sizes_labels_and_exact_adversarial_count(mnist, shared_data):
    assert len(mnist.train) == 60000 and len(mnist.val) + len(mnist.test) == 10000 and len(mnist.val) == 1000
    assert np.array_equal(np.sort(np.concatenate([mnist.val.sample_id, mnist.test.sample_id])), np.arange(10000))
    assert np.array_equal(mnist.train.sample_id, np.arange(60000))
    assert np.bincount(mnist.train.y_true).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert (mnist.train.y_obs != mnist.train.y_true).sum() == 36000
    ref = _idx(shared_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(mnist.test.y_true, ref[mnist.test.sample_id])


def test_mnist_inputs_are_the_normalised_official_images(mnist, shared_data):
    images = _idx(shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")  # (60000, 28, 28)
    pos = np.array([0, 1, 59999])
    x = mnist.train.inputs(pos)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and mnist.input_shape == (1, 28, 28)
    ref = (images[pos][:, None].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_fashion_mnist_is_balanced_with_its_own_normalisation(shared_data):
    b = build_data({"name": "fashion_mnist", "root": str(shared_data)}, {"kind": "none"}, seed=0)
    assert np.bincount(b.train.y_true).tolist() == [6000] * 10
    images = _idx(shared_data / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    sid = b.val.sample_id[:2]
    ref = (images[sid][:, None].astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(b.val.inputs([0, 1]).numpy(), ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- CIFAR (synthetic layout)
def _write_cifar(root: Path, *, hundred: bool, n_train: int = 6, n_test: int = 10) -> dict[str, np.ndarray]:
    """Tiny pickles in the python-version layout (cifar-10-batches-py / cifar-100-python)."""
    rng = np.random.default_rng(0)
    C = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for f in files:
        split = "test" if f.startswith("test") else "train"
        n = n_test if split == "test" else n_train
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
        y = rng.integers(0, C, n).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": x, key: y}, fh)
        out[f"{split}_x"].append(x)
        out[f"{split}_y"] += y
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump({"fine_label_names" if hundred else "label_names": [f"c{i}" for i in range(C)]}, fh)
    return {k: (np.concatenate(v) if k.endswith("x") else np.asarray(v)) for k, v in out.items()}


@pytest.mark.parametrize("hundred", [False, True])
def test_synthetic_cifar_layout_loads_with_a_warning_and_normalises(tmp_path, hundred):
    ref = _write_cifar(tmp_path, hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    with pytest.warns(UserWarning, match="md5"):
        b = build_data({"name": name, "root": str(tmp_path)}, {"kind": "uniform", "rate": 0.5}, seed=0)
    n_train = 6 if hundred else 30
    assert len(b.train) == n_train and len(b.val) + len(b.test) == 10 and len(b.val) == 1
    assert b.num_classes == (100 if hundred else 10) and b.input_shape == (3, 32, 32)
    assert np.array_equal(b.train.y_true, ref["train_y"])
    mean = np.array((0.5071, 0.4865, 0.4409) if hundred else (0.4914, 0.4822, 0.4465), np.float32)
    std = np.array((0.2673, 0.2564, 0.2762) if hundred else (0.2470, 0.2435, 0.2616), np.float32)
    sid = b.test.sample_id[:3]
    raw = ref["test_x"][sid].reshape(3, 3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(b.test.inputs([0, 1, 2]).numpy(), (raw - mean[:, None, None]) / std[:, None, None],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_files_present_are_read_not_downloaded_again_with_download_on(tmp_path, monkeypatch, hundred):
    """dataset=cifar10/100 set data.download=true: files already there (a copy that fails torchvision's
    md5 check) are read as they are, with no download attempt (which replaced them, or failed offline)."""
    import torchvision.datasets.utils as tv_utils

    ref = _write_cifar(tmp_path, hundred=hundred)

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    for mod in (tv_utils, __import__("torchvision.datasets.cifar", fromlist=["x"])):
        monkeypatch.setattr(mod, "download_and_extract_archive", no_network, raising=False)
    with pytest.warns(UserWarning, match="md5"):
        b = build_data({"name": "cifar100" if hundred else "cifar10", "root": str(tmp_path), "download": True},
                       {"kind": "none"}, seed=0)
    assert np.array_equal(b.train.y_true, ref["train_y"])


def test_cifar_augmentation_is_deterministic_per_generator(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    with pytest.warns(UserWarning):
        s = build_data({"name": "cifar10", "root": str(tmp_path)}, {"kind": "none"}, seed=0).train
    pos = np.arange(len(s))
    a = s.inputs(pos, augment=True, generator=torch.Generator().manual_seed(1))
    b = s.inputs(pos, augment=True, generator=torch.Generator().manual_seed(1))
    c = s.inputs(pos, augment=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (len(s), 3, 32, 32)
    with pytest.raises(ValueError, match="generator"):
        s.inputs(pos, augment=True)
    # data-parallel workers: slices of a batch, each with a generator in the same state, give the
    # slices of the batch (a sample's crop depends on the base draw and its sample_id only)
    parts = [s.inputs(p, augment=True, generator=torch.Generator().manual_seed(1)) for p in np.array_split(pos, 3)]
    assert torch.equal(torch.cat(parts), a)


def test_crop_flip_outputs_are_padded_crops_with_varied_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 2, 6, 6, generator=g) + 0.5  # strictly positive, so zero padding is visible
    out = crop_flip(x, pad=2, seeds=sample_seeds(3, np.arange(24)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(24):  # reference: search all (top, left, flip) candidates of torchvision's ops
        matches = [(t, l_, f) for t in range(5) for l_ in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda z: z.flip(-1) if f else z)(padded[i, :, t:t + 6, l_:l_ + 6]))]
        assert matches, f"sample {i} is not a (flipped) crop of its padded image"
        seen.add(matches[0])
    assert len(seen) > 5 and {f for _, _, f in seen} == {False, True}


# ----------------------------------------------------------------------------- ImageFolder (synthetic)
def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 5)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / split / c / f"{k}.png")


def test_synthetic_imagefolder_loads_lazily_with_imagenet_preprocessing(tmp_path):
    _write_tree(tmp_path)
    b = build_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "val_frac": 0.2},
                   {"kind": "none"}, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 8)
    assert b.num_classes == 2 and b.input_shape == (3, 16, 16)
    assert b.train.y_true.tolist() == [0, 0, 0, 1, 1, 1]  # ImageFolder order: sorted class folders
    ref_tf = T.Compose([T.Resize(18), T.CenterCrop(16), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    sid = int(b.test.sample_id[3])
    split_dir = tmp_path / "val" / ("ant" if sid < 5 else "bee")
    ref = ref_tf(Image.open(split_dir / f"{sid % 5}.png").convert("RGB"))
    torch.testing.assert_close(b.test.inputs([3])[0], ref, rtol=1e-4, atol=1e-4)


def test_imagefolder_augmentation_uses_only_the_given_generator(tmp_path):
    _write_tree(tmp_path)
    s = build_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 12}, {"kind": "none"}, seed=0).train
    state = torch.random.get_rng_state()
    a = s.inputs(np.arange(6), augment=True, generator=torch.Generator().manual_seed(0))
    b = s.inputs(np.arange(6), augment=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (6, 3, 12, 12)
    assert not torch.equal(a, s.inputs(np.arange(6)))  # really augmented
    halves = [s.inputs(p, augment=True, generator=torch.Generator().manual_seed(0)) for p in (np.arange(3), np.arange(3, 6))]
    assert torch.equal(torch.cat(halves), a)  # per-sample seeds: slices of a batch = the batch's slices


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_or_empty_root_names_both_fixes(tmp_path, name):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(ConfigError, match="data.root=") as err:
            build_data({"name": name, "root": str(root)}, {}, seed=0)
        assert "data.download=true" in str(err.value)


def test_unknown_dataset_and_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="choose one of"):
        build_data({"name": "svhn", "root": "/tmp"}, {}, seed=0)
    with pytest.raises(ConfigError, match="unknown key"):
        build_data({"name": "toy", "toy_nn": 3}, {}, seed=0)


def test_a_root_that_is_a_file_is_named_as_such(tmp_path):
    f = tmp_path / "data.tar"
    f.write_text("x")
    for download in (False, True):
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            build_data({"name": "mnist", "root": str(f), "download": download}, {}, seed=0)


@pytest.mark.parametrize("name, module", [("mnist", "mnist"), ("cifar10", "cifar")])
def test_a_download_that_fails_is_a_clear_error_and_leaves_no_empty_folders(tmp_path, monkeypatch, name, module):
    """No network (or a refused URL): a ConfigError naming the fix, not the downloader's traceback;
    the folders the attempt made go, what was in data.root before stays."""
    import importlib
    import urllib.error

    def refuse(url, download_root, *args, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"), "download_and_extract_archive",
                        refuse)
    (tmp_path / "kept").mkdir()
    for root in (tmp_path / "new" / "data", tmp_path):
        with pytest.raises(ConfigError, match="could not fetch") as err:
            build_data({"name": name, "root": str(root), "download": True}, {}, seed=0)
        assert "data.download=false" in str(err.value) and "Name or service not known" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# ----------------------------------------------------------------------------- mutation audit
def test_split_rejects_repeated_ids():
    src = build_data({}, {}, seed=0).train.source
    with pytest.raises(ValueError, match="strictly increasing"):
        Split(sample_id=np.array([0, 3, 3, 7]), y_obs=np.zeros(4), y_true=np.zeros(4), source=src)
    with pytest.raises(ValueError, match="strictly increasing"):
        Split(sample_id=np.array([0, 7, 3]), y_obs=np.zeros(3), y_true=np.zeros(3), source=src)


def test_ids_beyond_the_largest_and_negative_positions_are_refused():
    s = build_data({}, {}, seed=0).train
    beyond = int(s.sample_id[-1]) + 5
    with pytest.raises(KeyError, match=str(beyond)):
        s.positions_of([s.sample_id[0], beyond])
    with pytest.raises(IndexError, match="positions_of"):
        s.inputs([0, -1])  # never the last sample by Python's negative indexing


def test_crop_offsets_vary_independently_in_both_directions():
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(5)) + 0.5
    out = crop_flip(x, pad=2, seeds=sample_seeds(11, np.arange(64)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(64):
        for t in range(5):
            for l_ in range(5):
                crop = padded[i, :, t:t + 4, l_:l_ + 4]
                if torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1)):
                    offsets.add((t, l_))
    # top and left are separate draws: not only the 5 diagonal crops (top == left)
    assert len(offsets) > 10 and any(t != l_ for t, l_ in offsets)


def test_imagefolder_refuses_mismatched_class_folders_and_cannot_download(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "val" / "cat").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "val" / "cat" / "0.png")
    with pytest.raises(ConfigError, match="same class folders"):
        build_data({"name": "imagefolder", "root": str(tmp_path)}, {"kind": "none"}, seed=0)
    with pytest.raises(ConfigError, match="cannot be downloaded"):  # download=true fetches nothing here
        build_data({"name": "imagefolder", "root": str(tmp_path / "nowhere"), "download": True}, {}, seed=0)


# ----------------------------------------------------------------------------- CIFAR-N (real human noise)
def _write_cifar_n(path: Path, clean: np.ndarray, **label_sets: np.ndarray) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"clean_label": np.asarray(clean, dtype=np.int64),
                **{k: np.asarray(v, dtype=np.int64) for k, v in label_sets.items()}}, path)
    return path


def _cifar_n_data(tmp_path: Path, *, hundred: bool = False, **noise):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic pickles fail torchvision's md5 check
        return build_data({"name": "cifar100" if hundred else "cifar10", "root": str(tmp_path)},
                          {"kind": "cifar_n", "rate": 0.0, **noise}, seed=0)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_n_gives_each_training_image_its_human_label(tmp_path, hundred):
    ref = _write_cifar(tmp_path, hundred=hundred)
    C, clean = (100 if hundred else 10), ref["train_y"]
    noisy = clean.copy()
    noisy[::3] = (noisy[::3] + 1) % C  # every third image mislabelled
    if hundred:  # CIFAR-100N: noisy_label, the default label set
        _write_cifar_n(tmp_path / "CIFAR-N" / "CIFAR-100_human.pt", clean, noisy_label=noisy)
        b = _cifar_n_data(tmp_path, hundred=True)
    else:  # CIFAR-10N: several label sets, one named
        _write_cifar_n(tmp_path / "CIFAR-N" / "CIFAR-10_human.pt", clean, aggre_label=clean, worse_label=noisy)
        b = _cifar_n_data(tmp_path, label="worse_label")
    assert np.array_equal(b.train.y_true, clean) and np.array_equal(b.train.y_obs, noisy[b.train.sample_id])
    assert np.array_equal(b.train.sample_id, np.arange(len(clean))) and (b.train.y_obs != b.train.y_true).any()
    assert np.array_equal(b.test.y_obs, b.test.y_true)  # val/test keep their own labels


def test_cifar_n_labels_follow_the_images_through_class_imbalance(tmp_path):
    ref = _write_cifar(tmp_path, hundred=False, n_train=40)
    clean = ref["train_y"]
    noisy = (clean + np.arange(len(clean)) % 3) % 10  # an image's label depends on its index
    path = _write_cifar_n(tmp_path / "elsewhere" / "labels.pt", clean, worse_label=noisy)
    b = _cifar_n_data(tmp_path, label="worse_label", file=str(path), imbalance_factor=10.0)
    assert len(b.train) < len(clean)  # some images dropped
    assert np.array_equal(b.train.y_obs, noisy[b.train.sample_id])
    assert np.array_equal(b.train.y_true, clean[b.train.sample_id])


def test_cifar_n_refuses_files_that_do_not_fit_naming_the_fix(tmp_path):
    from pivotal_ray.config import ConfigError

    ref = _write_cifar(tmp_path, hundred=False)
    clean = ref["train_y"]
    n = len(clean)
    path = tmp_path / "CIFAR-N" / "CIFAR-10_human.pt"
    _write_cifar_n(path, clean, aggre_label=clean, worse_label=clean)
    with pytest.raises(ConfigError, match=r"noise.label is not set .*\['aggre_label', 'worse_label'\]"):
        _cifar_n_data(tmp_path)
    with pytest.raises(ConfigError, match=r"noise.label='random_label9' is not one of CIFAR-10_human.pt's label sets"):
        _cifar_n_data(tmp_path, label="random_label9")
    _write_cifar_n(path, clean, aggre_label=clean, noisy_coarse_label=clean // 5)
    for label in ("noisy_coarse_label", "clean_label"):  # a 20-class set on 100 classes; no noise at all
        with pytest.raises(ConfigError, match=rf"noise.label='{label}' is not one of .* \['aggre_label'\]"):
            _cifar_n_data(tmp_path, label=label)
    off = clean.copy()
    off[2] = (off[2] + 1) % 10
    _write_cifar_n(path, off, worse_label=clean)
    with pytest.raises(ConfigError, match=rf"differs from the data set's training labels at 1 of {n} images"):
        _cifar_n_data(tmp_path, label="worse_label")
    _write_cifar_n(path, clean[:-1], worse_label=clean[:-1])  # another data set's length
    with pytest.raises(ConfigError, match=f"{n - 1} labels for the data set's {n} training images: the file is for "
                                          "another data set"):
        _cifar_n_data(tmp_path, label="worse_label")
    _write_cifar_n(path, clean, worse_label=clean[:-1])  # one set shorter than clean_label
    with pytest.raises(ConfigError, match="not one integer label per training image"):
        _cifar_n_data(tmp_path, label="worse_label")
    _write_cifar_n(path, clean, worse_label=np.full(n, 10))
    with pytest.raises(ConfigError, match=r"labels outside \[0, 10\)"):
        _cifar_n_data(tmp_path, label="worse_label")
    path.write_text("sample_id,label\n")
    with pytest.raises(ConfigError, match="could not be read as a CIFAR-N label file"):
        _cifar_n_data(tmp_path, label="worse_label")


def test_cifar_n_file_is_unpickled_with_numpy_arrays_only(tmp_path):
    """A file that would call a function when unpickled is refused (weights_only), the call not made."""
    import torch

    from pivotal_ray.config import ConfigError
    from pivotal_ray.core.noise import read_cifar_n

    clean = np.arange(6) % 3
    path = tmp_path / "labels.pt"
    torch.save({"clean_label": clean, "noisy_label": clean, "code": _CallsOnLoad()}, path)
    _CALLS.clear()
    with pytest.raises(ConfigError, match="could not be read as a CIFAR-N label file.*_record_call"):
        read_cifar_n(path, None, clean, 3)
    assert _CALLS == []
    torch.save({"clean_label": clean, "noisy_label": clean}, path)
    assert np.array_equal(read_cifar_n(path, None, clean, 3), clean)  # the same file without it reads


def test_cifar_n_read_errors_say_what_the_file_holds_and_leave_torchs_allowlist_as_it_was(tmp_path):
    import os
    import pickle

    import torch

    from pivotal_ray.config import ConfigError
    from pivotal_ray.core.noise import read_cifar_n

    clean = np.arange(6) % 3
    path = tmp_path / "labels.pt"
    torch.save({"clean_label": clean, "noisy_label": clean, "run": _Calls(os.getpid)}, path)
    with pytest.raises(ConfigError, match=r"could not be read as a CIFAR-N label file .*: [^:]*getpid") as info:
        read_cifar_n(path, None, clean, 3)
    assert "weights_only" not in str(info.value)  # torch's advice to turn the check off is not passed on
    torch.save({0: clean, "clean_label": clean, "noisy_label": clean}, path)  # a key that is not a name
    assert np.array_equal(read_cifar_n(path, None, clean, 3), clean)
    path.write_bytes(pickle.dumps({"clean_label": clean}))  # a plain pickle, not a torch.save archive
    with pytest.raises(ConfigError, match="could not be read as a CIFAR-N label file"):
        read_cifar_n(path, None, clean, 3)
    torch.save({"clean_label": clean, "noisy_label": clean}, path)
    torch.serialization.add_safe_globals([np.ndarray])  # the caller's own entry
    try:
        before = list(torch.serialization.get_safe_globals())
        read_cifar_n(path, None, clean, 3)
        after = torch.serialization.get_safe_globals()
        assert np.ndarray in after and sorted(map(repr, after)) == sorted(map(repr, before))
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals([g for g in before if g is not np.ndarray])


class _Calls:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ())


_CALLS: list[str] = []


def _record_call(what: str) -> str:
    _CALLS.append(what)
    return what


class _CallsOnLoad:
    def __reduce__(self):
        return (_record_call, ("unpickled",))


def test_cifar_n_asks_for_its_file_before_downloading_the_data_set(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    from pivotal_ray.config import ConfigError

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(ConfigError, match=r"noise.file=.*no_data/CIFAR-N/CIFAR-10_human.pt does not exist"):
        build_data({"name": "cifar10", "root": str(tmp_path / "no_data"), "download": True}, {"kind": "cifar_n"}, seed=0)
    # without a download the missing data set is what is said first: its root is the one to fix
    with pytest.raises(ConfigError, match=r"data.root=.*no_data does not exist and data.download=false"):
        build_data({"name": "cifar10", "root": str(tmp_path / "no_data")}, {"kind": "cifar_n"}, seed=0)
    with pytest.raises(ConfigError, match="needs dataset=cifar10 or dataset=cifar100, not 'mnist'"):
        build_data({"name": "mnist", "root": str(tmp_path)}, {"kind": "cifar_n"}, seed=0)
    with pytest.raises(ConfigError, match=r"noise.file and noise.label only apply to noise.kind=cifar_n \(noise=cifar_n\), "
                                          r"not uniform: set noise.file=null noise.label=null, or choose noise=cifar_n"):
        build_data({"name": "toy"}, {"kind": "uniform", "file": "/x.pt", "label": "worse_label"}, seed=0)


def test_a_damaged_cifar_copy_is_a_config_error_naming_the_fix(tmp_path):
    from pivotal_ray.config import ConfigError

    _write_cifar(tmp_path, hundred=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_5"
    batch.write_bytes(batch.read_bytes()[:100])  # cut off (an interrupted extraction)
    with pytest.warns(UserWarning, match="md5"), \
            pytest.raises(ConfigError, match=r"cifar-10-batches-py fails torchvision's md5 checks and cannot be read "
                                             r"\(UnpicklingError.*\): delete that folder and run again with "
                                             r"data.download=true"):
        build_data({"name": "cifar10", "root": str(tmp_path), "download": True}, {"kind": "none"}, seed=0)


def test_cifar_n_runs_are_named_by_the_labels_they_read_not_the_files_path(tmp_path):
    """Run identity and training-run names: the label set (None resolved) and a digest of its labels.
    The same labels moved elsewhere are the same run; other labels with the same clean labels, or
    another set of one file, are another; the unused noise.rate does not count."""
    from pivotal_ray.config import from_dict
    from pivotal_ray.pipeline import run_identity
    from pivotal_ray.training import warmup_name

    clean = np.arange(30) % 10
    worse = (clean + (np.arange(30) % 2)) % 10
    a = _write_cifar_n(tmp_path / "CIFAR-N" / "CIFAR-100_human.pt", clean, noisy_label=worse)
    moved = _write_cifar_n(tmp_path / "b" / "x.pt", clean, noisy_label=worse)
    other = _write_cifar_n(tmp_path / "c" / "x.pt", clean, noisy_label=(worse + 1) % 10, second=clean)

    def ids(**noise):
        cfg = from_dict({"output_dir": str(tmp_path / "out"), "data": {"name": "cifar100", "root": str(tmp_path)},
                         "noise": {"kind": "cifar_n", "rate": 0.0, **noise}})
        ident = run_identity(cfg)
        return ident["noise"], warmup_name(cfg)

    base = ids()  # the default file: <data.root>/CIFAR-N/CIFAR-100_human.pt
    assert base[0]["label"] == "noisy_label" and "file" not in base[0] and "rate" not in base[0]
    assert ids(file=str(a)) == base == ids(file=str(moved), label="noisy_label", rate=0.6)
    assert ids(file=str(other))[1] != base[1] and ids(file=str(other))[0] != base[0]
    assert ids(file=str(other), label="second")[1] not in (base[1], ids(file=str(other))[1])


SHARED_CIFAR_N = Path(os.environ.get("PIVOTAL_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
                      ) / "CIFAR-N"  # as tests/conftest.py finds MNIST


@pytest.mark.skipif(not SHARED_CIFAR_N.is_dir(), reason="the CIFAR-N release files are not beside the repository (or under PIVOTAL_SHARED_DATA)")
@pytest.mark.parametrize("name, label, rate", [("CIFAR-10_human.pt", "aggre_label", 9.01),
                                               ("CIFAR-10_human.pt", "worse_label", 40.21),
                                               ("CIFAR-10_human.pt", "random_label1", 17.23),
                                               ("CIFAR-100_human.pt", None, 40.20)])
def test_the_released_cifar_n_files_read_with_their_published_noise_rates(name, label, rate):
    """The release's files (pickled with numpy 1.x) read under weights_only; their clean_label is
    the CIFAR training order (the data README: CIFAR-10 begins 6, 9, 9, 4, 1, ...)."""
    from pivotal_ray.core.noise import _load_cifar_n, read_cifar_n

    clean = np.asarray(_load_cifar_n(SHARED_CIFAR_N / name)["clean_label"])
    C = 100 if "100" in name else 10
    human = read_cifar_n(SHARED_CIFAR_N / name, label, clean, C)
    assert round(100 * float((human != clean).mean()), 2) == rate
    if C == 10:
        assert clean[:5].tolist() == [6, 9, 9, 4, 1]
