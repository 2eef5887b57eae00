"""Data sets as train / val / test :class:`Split` objects keyed by ``sample_id`` (spec section 5).

``build_data`` is deterministic in ``(data_cfg, noise_cfg, seed)``: every Ray worker rebuilds the
same bundle from the same plain dicts instead of receiving tensors::

    bundle = build_data({"name": "mnist", "root": "/work/shared/data"},
                        {"kind": "adversarial", "rate": 0.6}, seed=0)
    len(bundle.train), len(bundle.val), len(bundle.test)     # 60000 1000 9000
    x = bundle.train.inputs(np.arange(8))                    # (8, 1, 28, 28) float32, normalised

Protocol: the official training set (class-imbalanced first if ``noise.imbalance_factor > 1``)
gets label noise -> ``train.y_obs`` (synthetic, or CIFAR-N's human labels with
``noise.kind=cifar_n``); the official test set is split at random into validation
(``data.val_frac``) and test, whose ``y_obs == y_true``. The toy set of the paper's Figure 1 is
generated and partitioned 600/240/160 instead. Data sets live in the registry :data:`DATASETS`;
add one by registering a :class:`DatasetSpec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

from pivotal_ray.config import ConfigError, DataConfig, NoiseConfig, _build
from pivotal_ray.core import noise as noise_lib
from pivotal_ray.core.registry import Registry
from pivotal_ray.core.seeding import numpy_rng

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- sources of inputs
class Source(Protocol):
    """Where a split's inputs come from; ``rows`` index the source's own arrays (= sample ids)."""

    input_shape: tuple[int, ...]

    def load(self, rows: np.ndarray, *, augment: bool, seeds: np.ndarray | None) -> torch.Tensor: ...


def _no_augment(name: str, augment: bool) -> None:
    if augment:
        raise ValueError(f"data set {name!r} defines no augmentation (the paper trains it without): "
                         "set reweight.augment=false")


@dataclass(frozen=True, eq=False)
class VectorSource:
    """Float features held in memory (the toy set): x (N, *input_shape) float32."""

    x: torch.Tensor
    name: str = "toy"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def load(self, rows: np.ndarray, *, augment: bool, seeds: np.ndarray | None) -> torch.Tensor:
        _no_augment(self.name, augment)
        return self.x[torch.from_numpy(rows)]  # (n, *input_shape)


def sample_seeds(base: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit seed per sample from a base seed and its sample_id (splitmix64 of both): (n,) uint64.

    A sample's augmentation is a function of (base, sample_id) alone, not of the other samples in
    its batch: W workers, each augmenting its slice of a global batch with the same base, draw
    what one process draws for the whole batch."""
    with np.errstate(over="ignore"):
        z = np.asarray(sample_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def crop_flip(x: torch.Tensor, *, pad: int, seeds: np.ndarray) -> torch.Tensor:
    """Per-sample random crop (zero padding ``pad``) and horizontal flip, batched.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    with each sample's offsets and flip taken from its own seed (``sample_seeds``) and applied in
    one batched gather, so that a batch costs a few tensor ops and is reproducible.

    x: (n, c, H, W) float, un-normalised (padding is black, as in torchvision on PIL images);
    seeds: (n,) uint64. Returns (n, c, H, W).
    """
    n, c, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (n, c, H+2p, W+2p)
    k = np.uint64(2 * pad + 1)
    s = np.asarray(seeds, dtype=np.uint64)
    off = torch.from_numpy(np.stack([s % k, (s // k) % k], 1).astype(np.int64))  # (n, 2) top, left
    flip = torch.from_numpy(((s >> np.uint64(40)) & np.uint64(1)).astype(bool))  # (n,)
    rows = off[:, 0:1] + torch.arange(H)  # (n, H)
    cols = off[:, 1:2] + torch.arange(W)  # (n, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading the columns backwards
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]  # (n, c, H, W)


@dataclass(frozen=True, eq=False)
class ImageArraySource:
    """uint8 images held in memory: (N, H, W) grey or (N, H, W, 3) colour; normalised on load."""

    images: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    crop_pad: int | None = None  # None: the data set has no augmentation

    @property
    def input_shape(self) -> tuple[int, ...]:
        s = self.images.shape
        return (1, s[1], s[2]) if self.images.ndim == 3 else (s[3], s[1], s[2])

    def load(self, rows: np.ndarray, *, augment: bool, seeds: np.ndarray | None) -> torch.Tensor:
        img = torch.from_numpy(self.images[rows])  # (n, H, W) or (n, H, W, c) uint8
        x = img[:, None] if img.ndim == 3 else img.permute(0, 3, 1, 2)  # (n, c, H, W)
        x = x.to(torch.float32).div_(255.0)
        if augment:
            if self.crop_pad is None:
                _no_augment(self.name, augment)
            x = crop_flip(x, pad=self.crop_pad, seeds=seeds)
        return v2.functional.normalize(x, list(self.mean), list(self.std))  # (n, c, H, W)


def _need_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("augment=True needs generator=torch.Generator (e.g. "
                         "pivotal_ray.core.seeding.torch_generator(seed, 'augment', epoch)) so that the "
                         "augmentation is reproducible")
    return generator


@dataclass(frozen=True, eq=False)
class ImageFileSource:
    """Image files decoded lazily on every ``load`` (ImageNet-10 style ImageFolder trees)."""

    paths: tuple[str, ...]
    image_size: int
    workers: int = 0
    loader: Callable[[str], Any] = torchvision.datasets.folder.default_loader

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _transform(self, augment: bool) -> v2.Transform:
        s = self.image_size
        crop = [v2.RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip()] if augment else \
            [v2.Resize(round(s * 256 / 224), antialias=True), v2.CenterCrop(s)]  # the usual 256 -> 224 ratio
        # geometry on the PIL image (as the classic ImageNet pipeline), then tensor + normalise
        return v2.Compose([*crop, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def load(self, rows: np.ndarray, *, augment: bool, seeds: np.ndarray | None) -> torch.Tensor:
        files = [self.paths[int(r)] for r in rows]
        if self.workers > 0:  # decoding dominates; PIL releases the GIL while decoding
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.workers) as pool:
                images = list(pool.map(self.loader, files))
        else:
            images = [self.loader(f) for f in files]
        transform = self._transform(augment)
        if not augment:
            return torch.stack([transform(im) for im in images])  # (n, 3, s, s)
        # torchvision's random transforms draw from the global torch RNG; run them in a forked RNG
        # seeded per sample, so a crop depends only on its seed and the caller's RNG is untouched.
        out = []
        with torch.random.fork_rng(devices=[]):
            for im, seed in zip(images, seeds):
                torch.manual_seed(int(seed >> np.uint64(1)))  # manual_seed takes < 2^63
                out.append(transform(im))
        return torch.stack(out)  # (n, 3, s, s)


# ----------------------------------------------------------------------------- splits and bundle
@dataclass(frozen=True, eq=False)
class Split:
    """One split: parallel arrays over its N samples, and the inputs behind them.

    sample_id (N,) int64 stable ids, ascending (index in the official split / generated set);
    y_obs (N,) int64 observed labels (noisy on train); y_true (N,) int64 true labels. Treat the
    arrays as read-only (every worker must see the same bundle): copy before cleaning labels.
    """

    sample_id: np.ndarray
    y_obs: np.ndarray
    y_true: np.ndarray
    source: Source = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("sample_id", "y_obs", "y_true"):  # private int64 copies (val/test share y)
            object.__setattr__(self, name, np.array(getattr(self, name), dtype=np.int64))
        n = self.sample_id.shape[0]
        if self.y_obs.shape != (n,) or self.y_true.shape != (n,):
            raise ValueError(f"sample_id {self.sample_id.shape}, y_obs {self.y_obs.shape} and "
                             f"y_true {self.y_true.shape} must all be (N,)")
        if n and np.any(np.diff(self.sample_id) <= 0):
            raise ValueError("sample_id must be strictly increasing (unique ids, sorted)")

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    def positions_of(self, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions (int64, same shape as ``sample_ids``) of the given ids in this split.

        Raises KeyError naming (up to 10 of) the ids that are not in the split.
        """
        ids = np.asarray(sample_ids, dtype=np.int64)
        pos = np.searchsorted(self.sample_id, ids)  # ids are sorted, so binary search
        found = pos < len(self)
        found[found] = self.sample_id[pos[found]] == ids[found]
        if not found.all():
            missing = np.unique(ids[~found])
            raise KeyError(f"{missing.size} sample id(s) not in this split, e.g. {missing[:10].tolist()}")
        return pos.astype(np.int64)

    def inputs(self, positions: Sequence[int] | np.ndarray, *, augment: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised float32 inputs (n, *input_shape) of the samples at ``positions`` (n,).

        ``augment=True`` applies the data set's training augmentation: one base seed is drawn
        from ``generator`` (required then) per call, and each sample is augmented from
        ``sample_seeds(base, its sample_id)``. So the same generator state gives the same batch,
        and slices of a batch augmented with generators in that same state (data-parallel
        workers) give the slices of that batch.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1:
            raise ValueError(f"positions must be 1-D; got shape {pos.shape}")
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)}); got range [{pos.min()}, {pos.max()}]: "
                             "map sample ids with positions_of first")
        seeds = None
        if augment:
            base = int(torch.randint(0, 2**62, (1,), generator=_need_generator(generator)))
            seeds = sample_seeds(base, self.sample_id[pos])
        return self.source.load(self.sample_id[pos], augment=augment, seeds=seeds)


@dataclass(frozen=True, eq=False)
class DataBundle:
    """What ``build_data`` returns; ``input_shape`` is one sample's shape, e.g. (1, 28, 28)."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


# ----------------------------------------------------------------------------- data set registry
@dataclass(frozen=True)
class Pool:
    """Labelled samples before noise: ``rows`` index ``source``; ``y`` their true labels."""

    source: Source
    rows: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class DatasetSpec:
    """``load(cfg, seed) -> (train, val, test, num_classes)``; ``has_data(root)`` checks the files."""

    load: Callable[[DataConfig, int], tuple[Pool, Pool, Pool, int]]
    has_data: Callable[[Path], bool] | None = None  # None: needs no files
    expects: str = ""  # what has_data looks for, for the error message
    can_download: bool = False


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _official(train: Source, y_train: Any, test: Source, y_test: Any, *, num_classes: int, val_frac: float,
              seed: int) -> tuple[Pool, Pool, Pool, int]:
    """Pools of an official train/test pair: all of train; val = random ``val_frac`` of test, test = the rest."""
    y_tr, y_te = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    val, rest = noise_lib.split_val_test(y_te.shape[0], val_frac=val_frac, rng=numpy_rng(seed, "val_test"))
    return Pool(train, np.arange(y_tr.shape[0]), y_tr), Pool(test, val, y_te[val]), Pool(test, rest, y_te[rest]), \
        num_classes


def _load_toy(cfg: DataConfig, seed: int) -> tuple[Pool, Pool, Pool, int]:
    """Figure 1 of the paper: four Gaussians at (+-1, +-1); the upper two are class 1."""
    rng = numpy_rng(seed, "toy")
    n = cfg.toy_n
    corners = np.array([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])  # (4, 2)
    comp = rng.permutation(np.arange(n) % 4)  # (n,) equal-sized Gaussians in random order
    x = corners[comp] + cfg.toy_std * rng.standard_normal((n, 2))  # (n, 2)
    y = (corners[comp, 1] > 0).astype(np.int64)  # (n,)
    # "1% of the labels are flipped to introduce a small amount of noise to the ground truth":
    # exactly floor(1% n) flips; with two classes the only derangement is the swap.
    y, _ = noise_lib.adversarial_noise(y, rate=cfg.toy_base_flip, num_classes=2, rng=rng)
    src = VectorSource(torch.from_numpy(x.astype(np.float32)))
    perm = rng.permutation(n)
    n_train, n_test, _ = cfg.toy_split
    parts = np.split(perm, [n_train, n_train + n_test])  # train, test, val
    train, test, val = (Pool(src, np.sort(p), y[np.sort(p)]) for p in parts)
    return train, val, test, 2


# torchvision >= 0.17 reads only the decompressed IDX files, while a pristine (possibly read-only)
# copy of MNIST holds just the original .gz files: accept either (torchvision's own parser reads a
# private decompressed copy of a .gz, removed right after).
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _idx_file(raw: Path, name: str) -> Path | None:
    return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)


def _read_idx(raw: Path, name: str, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    path = _idx_file(raw, name)
    if path is None or path.suffix != ".gz":
        return reader(str(raw / name))
    with gzip.open(path, "rb") as src, tempfile.NamedTemporaryFile(suffix=name) as tmp:
        shutil.copyfileobj(src, tmp)
        tmp.flush()
        return reader(tmp.name)


class _IdxGzMixin:
    folder: str  # torchvision derives the folder from the class name; pin it for the subclasses

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, self.folder, "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self.folder, "processed")

    def _check_exists(self) -> bool:
        return all(_idx_file(Path(self.raw_folder), name) is not None for name in _IDX_NAMES)

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        split, raw, mnist = "train" if self.train else "t10k", Path(self.raw_folder), torchvision.datasets.mnist
        return (_read_idx(raw, f"{split}-images-idx3-ubyte", mnist.read_image_file),
                _read_idx(raw, f"{split}-labels-idx1-ubyte", mnist.read_label_file))


class _MNIST(_IdxGzMixin, torchvision.datasets.MNIST):
    folder = "MNIST"


class _FashionMNIST(_IdxGzMixin, torchvision.datasets.FashionMNIST):
    folder = "FashionMNIST"


def _mnist_like(cls: type, mean: float, std: float, name: str) -> DatasetSpec:
    def load(cfg: DataConfig, seed: int) -> tuple[Pool, Pool, Pool, int]:
        tr = cls(cfg.root, train=True, download=cfg.download)
        te = cls(cfg.root, train=False, download=cfg.download)
        return _official(ImageArraySource(tr.data.numpy(), (mean,), (std,), name), tr.targets.numpy(),
                         ImageArraySource(te.data.numpy(), (mean,), (std,), name), te.targets.numpy(),
                         num_classes=len(cls.classes), val_frac=cfg.val_frac, seed=seed)

    def has_data(root: Path) -> bool:
        return all(_idx_file(root / cls.folder / "raw", n) is not None for n in _IDX_NAMES)

    return DatasetSpec(load, has_data, f"{cls.folder}/raw/*-idx?-ubyte[.gz]", can_download=True)


DATASETS.register("toy")(DatasetSpec(_load_toy))
DATASETS.register("mnist")(_mnist_like(_MNIST, 0.1307, 0.3081, "mnist"))
DATASETS.register("fashion_mnist")(_mnist_like(_FashionMNIST, 0.2860, 0.3530, "fashion_mnist"))


# CIFAR: torchvision checks every file's md5, which only the official files pass. Files in the same
# python-pickle layout that fail it (a re-packed copy, the synthetic files of the tests) are read by
# this subclass, which checks presence only, with a warning that they are not the official files.
def _unverified(cls: type) -> type:
    return type(f"Unverified{cls.__name__}", (cls,), {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _cifar(cls: type, mean: tuple[float, ...], std: tuple[float, ...], name: str) -> DatasetSpec:
    def open_split(cfg: DataConfig, train: bool) -> Any:
        # files already there are read, never fetched again: torchvision would download the official
        # archive over a copy that fails its md5 check (or fail with no network) even with them present
        root = Path(cfg.root).expanduser()
        download = cfg.download and not has_data(root)
        try:
            return cls(str(root), train=train, download=download)
        except RuntimeError:
            if not has_data(root):
                raise
        warnings.warn(f"{cls.base_folder} under {cfg.root} does not match torchvision's md5 checksums "
                      "(not the official files); reading it as-is", stacklevel=3)
        try:
            return _unverified(cls)(str(root), train=train, download=False)
        except Exception as err:  # a cut-off or damaged copy: unpickling fails in many ways
            raise ConfigError(f"{root / cls.base_folder} fails torchvision's md5 checks and cannot be read "
                              f"({type(err).__name__}: {err}): delete that folder and run again with data.download=true "
                              "to fetch the official files, or put an intact copy there") from None

    def load(cfg: DataConfig, seed: int) -> tuple[Pool, Pool, Pool, int]:
        tr, te = open_split(cfg, True), open_split(cfg, False)
        return _official(ImageArraySource(np.ascontiguousarray(tr.data), mean, std, name, crop_pad=4), tr.targets,
                         ImageArraySource(np.ascontiguousarray(te.data), mean, std, name, crop_pad=4), te.targets,
                         num_classes=len(tr.classes), val_frac=cfg.val_frac, seed=seed)

    def has_data(root: Path) -> bool:
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return all((root / cls.base_folder / f).is_file() for f in files)

    return DatasetSpec(load, has_data, f"{cls.base_folder}/{{data_batch_*,test_batch,...}}", can_download=True)


DATASETS.register("cifar10")(_cifar(torchvision.datasets.CIFAR10, (0.4914, 0.4822, 0.4465),
                                    (0.2470, 0.2435, 0.2616), "cifar10"))
DATASETS.register("cifar100")(_cifar(torchvision.datasets.CIFAR100, (0.5071, 0.4865, 0.4409),
                                     (0.2673, 0.2564, 0.2762), "cifar100"))


def _load_imagefolder(cfg: DataConfig, seed: int) -> tuple[Pool, Pool, Pool, int]:
    root = Path(cfg.root)
    tr = torchvision.datasets.ImageFolder(str(root / "train"))
    te = torchvision.datasets.ImageFolder(str(root / "val"))
    if tr.class_to_idx != te.class_to_idx:
        raise ConfigError(f"{root}/train and {root}/val must hold the same class folders; got "
                          f"{sorted(tr.class_to_idx)} and {sorted(te.class_to_idx)}: fix data.root={cfg.root}")
    return _official(ImageFileSource(tuple(p for p, _ in tr.samples), cfg.image_size, cfg.loader_workers, tr.loader),
                     tr.targets,
                     ImageFileSource(tuple(p for p, _ in te.samples), cfg.image_size, cfg.loader_workers, te.loader),
                     te.targets, num_classes=len(tr.classes), val_frac=cfg.val_frac, seed=seed)


def _has_imagefolder(root: Path) -> bool:
    return all((root / s).is_dir() and any(p.is_dir() for p in (root / s).iterdir()) for s in ("train", "val"))


DATASETS.register("imagefolder")(DatasetSpec(_load_imagefolder, _has_imagefolder, "train/<class>/* and val/<class>/*"))


# ----------------------------------------------------------------------------- build_data
def _as_config(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return _build(cls, value, where)
    raise TypeError(f"{where} must be a {cls.__name__} or a dict; got {type(value).__name__}")


def _check_root(cfg: DataConfig, spec: DatasetSpec) -> bool:
    """Fail before any work when the files are not there and nothing will fetch them; True when
    ``spec.load`` will download them."""
    if spec.has_data is None:
        return False
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.root={cfg.root} is a file, not a folder: set data.root=/abs/path/to/the/data "
                          f"(the folder that holds {spec.expects})")
    if root.is_dir() and spec.has_data(root):
        return False
    if cfg.download and spec.can_download:
        return True
    state = "does not exist" if not root.is_dir() else f"holds no {cfg.name} data (expected {spec.expects})"
    fix = "set data.root=/abs/path/to/the/data"
    fix += " or data.download=true to fetch it" if spec.can_download else " (this data set cannot be downloaded)"
    raise ConfigError(f"data.root={cfg.root} {state} and data.download={str(cfg.download).lower()}: {fix}")


def _download_and_load(spec: DatasetSpec, cfg: DataConfig, seed: int) -> tuple[Pool, Pool, Pool, int]:
    """``spec.load`` where it has to download; a download it cannot make (no network, a refused URL,
    a full disk) is a ConfigError naming the fix, and the empty folders the attempt made under
    data.root go."""
    root = Path(cfg.root).expanduser()
    new_top = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # made by the attempt
    before = set(root.iterdir()) if new_top is None else set()
    try:
        return spec.load(cfg, seed)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
        for top in ([new_top] if new_top is not None else sorted(set(root.iterdir()) - before)):
            _remove_empty_dirs(top)
        lines = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {lines[-1] if lines else repr(err)}"
        raise ConfigError(f"data.download=true could not fetch {cfg.name} into data.root={cfg.root} ({why}): "
                          f"check the network, or put the files there yourself (expected {spec.expects}) and "
                          "set data.download=false") from err


def _remove_empty_dirs(top: Path) -> None:
    """``top`` and the folders below it, where empty (bottom up); files and what holds them stay."""
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()


def cifar_n_file(dcfg: DataConfig, ncfg: NoiseConfig) -> Path:
    """``noise.file``, or the release's file for the data set under ``<data.root>/CIFAR-N/``."""
    if dcfg.name not in noise_lib.CIFAR_N_FILES:
        raise ConfigError(f"noise.kind=cifar_n (real human labels of CIFAR-10N / CIFAR-100N) needs dataset=cifar10 or "
                          f"dataset=cifar100, not {dcfg.name!r}: choose one of those, or another noise")
    if ncfg.file is not None:
        return Path(ncfg.file).expanduser()
    return Path(dcfg.root or ".").expanduser() / "CIFAR-N" / noise_lib.CIFAR_N_FILES[dcfg.name]


def noise_identity(data_cfg: DataConfig | Mapping[str, Any], noise_cfg: NoiseConfig | Mapping[str, Any]) -> dict:
    """The noise settings as a run's identity and its training runs' names see them: the config as
    it is, except for ``cifar_n``, whose unused rate and file path give way to the label set (None
    resolved) and a digest of its labels (reads the file; ConfigError naming the fix without it)."""
    dcfg = _as_config(DataConfig, data_cfg, "the data config")
    ncfg = _as_config(NoiseConfig, noise_cfg, "the noise config")
    if ncfg.kind != "cifar_n":
        return dataclasses.asdict(ncfg)
    return {"kind": ncfg.kind, "imbalance_factor": ncfg.imbalance_factor,
            **noise_lib.cifar_n_identity(cifar_n_file(dcfg, ncfg), ncfg.label)}


def build_data(data_cfg: DataConfig | Mapping[str, Any], noise_cfg: NoiseConfig | Mapping[str, Any],
               seed: int) -> DataBundle:
    """Load a data set, make the training labels noisy/imbalanced and split val/test (spec section 5).

    Parameters
    ----------
    data_cfg : DataConfig or plain dict (``name``, ``root``, ``download``, ``val_frac``, toy and
        ImageFolder options)
    noise_cfg : NoiseConfig or plain dict (``kind``, ``rate``, ``imbalance_factor``)
    seed : experiment seed; each stage (generation, val/test split, imbalance, noise) draws from
        its own ``numpy_rng(seed, stage)``

    Returns
    -------
    DataBundle with ``train``/``val``/``test`` :class:`Split` s, ``num_classes``, ``input_shape``.
    """
    dcfg = _as_config(DataConfig, data_cfg, "the data config")
    ncfg = _as_config(NoiseConfig, noise_cfg, "the noise config")
    spec = DATASETS.get(dcfg.name)
    human = cifar_n_file(dcfg, ncfg) if ncfg.kind == "cifar_n" else None  # (a data set CIFAR-N does not label)
    download = _check_root(dcfg, spec)  # True: the files are not there yet and spec.load downloads them
    if human is not None:  # CIFAR-N's file is looked for before the data set is read (or downloaded)
        noise_lib.check_cifar_n_file(human)
    if download:
        train, val, test, C = _download_and_load(spec, dcfg, int(seed))
    else:
        train, val, test, C = spec.load(dcfg, int(seed))

    keep = np.arange(train.y.shape[0])
    if ncfg.imbalance_factor > 1.0:  # long tail by the TRUE label, before any noise
        keep = noise_lib.imbalance_indices(train.y, factor=ncfg.imbalance_factor, num_classes=C,
                                           rng=numpy_rng(seed, "imbalance"))
    rows, y_true = train.rows[keep], train.y[keep]
    if human is not None:  # human labels of the official training images, by their index (rows)
        y_obs = noise_lib.read_cifar_n(human, ncfg.label, train.y, C)[rows]
    else:
        y_obs = noise_lib.apply_noise(y_true, kind=ncfg.kind, rate=ncfg.rate, num_classes=C,
                                      rng=numpy_rng(seed, "noise"))

    return DataBundle(
        train=Split(sample_id=rows, y_obs=y_obs, y_true=y_true, source=train.source),
        val=Split(sample_id=val.rows, y_obs=val.y, y_true=val.y, source=val.source),
        test=Split(sample_id=test.rows, y_obs=test.y, y_true=test.y, source=test.source),
        num_classes=int(C),
        input_shape=tuple(train.source.input_shape),
        name=dcfg.name,
    )

