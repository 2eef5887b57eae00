"""Label noise, class imbalance and the val/test split of the paper's protocol (spec section 5).

Every function takes a ``numpy.random.Generator`` (see :mod:`pivotal_ray.core.seeding`) and never
touches a global RNG, so the same generator state gives the same labels::

    rng = numpy_rng(seed, "noise")
    y_obs = apply_noise(y_true, kind="adversarial", rate=0.6, num_classes=10, rng=rng)

Noise kinds (registry :data:`NOISE`):

- ``uniform``: with probability p a label is replaced by one drawn uniformly from the OTHER
  classes (the paper's text), so the realised flip rate is p;
- ``uniform_mix``: the MW-Net "corruption matrix" variant, with probability p the label is redrawn
  uniformly from ALL classes (it may redraw the true class), so the realised rate is p (C-1)/C;
- ``adversarial``: exactly floor(p N) samples, chosen at random, get ``pi(y)`` for one random
  derangement ``pi`` of the classes (no class maps to itself);
- ``none``: labels unchanged;
- ``cifar_n``: real human labels of the CIFAR-10/100 training images from the CIFAR-N release
  (Wei et al., ICLR 2022; the paper's Table 7), read by :func:`read_cifar_n` (it needs the
  images' order, so :func:`pivotal_ray.core.data.build_data` applies it, not :func:`apply_noise`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from pivotal_ray.config import ConfigError
from pivotal_ray.core.registry import Registry

NoiseFn = Callable[..., np.ndarray]
NOISE: Registry[NoiseFn] = Registry("noise kind")


def _labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Validate ``labels`` as a 1-D array of class ids in [0, num_classes) and return an int64 copy."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: label noise needs at least 2 classes")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array of class ids; got dtype {y.dtype}, shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]: "
                         "pass the data set's num_classes")
    return y.astype(np.int64, copy=True)


def _rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate={rate} must be in [0, 1]")
    return float(rate)


def floor_count(rate: float, n: int) -> int:
    """``floor(rate * n)``, robust to float rounding (``0.29 * 100`` gives 29, not 28)."""
    # rate * n is exact only up to ~1e-16 relative error; rounding to 9 decimals first keeps the
    # floor of a product that is mathematically an integer from dropping one below it.
    return int(math.floor(round(rate * n, 9)))


@NOISE.register("none")
def no_noise(labels: np.ndarray, *, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """The labels unchanged (an int64 copy); ``rate`` and ``rng`` are ignored."""
    return _labels(labels, num_classes)


@NOISE.register("uniform")
def uniform_noise(labels: np.ndarray, *, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Replace each label, with probability ``rate``, by a uniform draw from the other classes.

    Parameters
    ----------
    labels : (N,) int array of true class ids in [0, num_classes)
    rate : flip probability p in [0, 1]; every flip changes the label, so E[#flips] = p N
    num_classes : C >= 2
    rng : the generator all draws come from

    Returns
    -------
    (N,) int64 noisy labels
    """
    y = _labels(labels, num_classes)
    flip = rng.random(y.shape[0]) < _rate(rate)  # (N,) bool
    # y + s mod C with s ~ U{1..C-1} is uniform over the C-1 classes other than y.
    shift = rng.integers(1, num_classes, size=y.shape[0])  # (N,)
    y[flip] = (y[flip] + shift[flip]) % num_classes
    return y


@NOISE.register("uniform_mix")
def uniform_mix_noise(labels: np.ndarray, *, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """MW-Net's uniform corruption matrix: with probability ``rate`` redraw the label from ALL classes.

    The redraw may hit the true class, so the realised noise rate is ``rate * (C-1)/C``.

    Parameters
    ----------
    labels : (N,) int array of true class ids in [0, num_classes)
    rate : redraw probability p in [0, 1]
    num_classes : C >= 2
    rng : the generator all draws come from

    Returns
    -------
    (N,) int64 noisy labels
    """
    y = _labels(labels, num_classes)
    redraw = rng.random(y.shape[0]) < _rate(rate)  # (N,) bool
    new = rng.integers(0, num_classes, size=y.shape[0])  # (N,)
    y[redraw] = new[redraw]
    return y


def random_derangement(num_classes: int, *, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation ``pi`` of ``range(num_classes)`` with ``pi[c] != c`` for all c.

    Rejection sampling of uniform permutations: each try succeeds with probability ~1/e, and the
    accepted permutation is uniform over derangements.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a derangement needs at least 2 classes")
    while True:
        perm = rng.permutation(num_classes)
        if not np.any(perm == np.arange(num_classes)):
            return perm.astype(np.int64)


def adversarial_noise(labels: np.ndarray, *, rate: float, num_classes: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``floor(rate * N)`` random samples get ``pi(y)`` for ONE random class derangement ``pi``.

    Parameters
    ----------
    labels : (N,) int array of true class ids in [0, num_classes)
    rate : fraction p in [0, 1] of samples to corrupt
    num_classes : C >= 2
    rng : the generator all draws come from

    Returns
    -------
    noisy : (N,) int64 labels, differing from ``labels`` in exactly floor(p N) places
    perm : (C,) int64 derangement used (``noisy[j] == perm[labels[j]]`` where flipped)
    """
    y = _labels(labels, num_classes)
    n_flip = floor_count(_rate(rate), y.shape[0])
    perm = random_derangement(num_classes, rng=rng)
    flip = rng.choice(y.shape[0], size=n_flip, replace=False)  # (n_flip,) distinct positions
    y[flip] = perm[y[flip]]
    return y, perm


@NOISE.register("adversarial")
def _adversarial_labels(labels: np.ndarray, *, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return adversarial_noise(labels, rate=rate, num_classes=num_classes, rng=rng)[0]


def apply_noise(labels: np.ndarray, *, kind: str, rate: float, num_classes: int,
                rng: np.random.Generator) -> np.ndarray:
    """Noisy copy of ``labels`` using the registered noise ``kind`` (see :data:`NOISE`).

    Returns (N,) int64 labels; raises KeyError listing the known kinds for an unknown one.
    """
    return NOISE.get(kind)(labels, rate=rate, num_classes=num_classes, rng=rng)


def imbalance_counts(class_counts: np.ndarray, *, factor: float) -> np.ndarray:
    """Per-class sizes of the long-tailed profile of Cui et al. 2019.

    Class c keeps ``min(n_c, floor(n_max * factor^(-c/(C-1))))`` samples, ``n_max`` being the
    largest class. On a balanced set this is exactly the paper's profile; on a nearly balanced
    one (MNIST) a class never asks for more samples than it has. ``factor == 1`` keeps all.

    Parameters
    ----------
    class_counts : (C,) int, C >= 2, the number of samples of each class
    factor : imbalance ratio n_0 / n_{C-1} >= 1

    Returns
    -------
    (C,) int64 counts to keep
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.shape[0] < 2:
        raise ValueError(f"class_counts must be a 1-D array over C >= 2 classes; got shape {counts.shape}")
    if factor < 1.0:
        raise ValueError(f"imbalance factor={factor} must be >= 1 (1 = balanced)")
    C, n_max = counts.shape[0], int(counts.max())
    target = [floor_count(float(factor) ** (-c / (C - 1)), n_max) for c in range(C)]
    return np.minimum(counts, np.asarray(target, dtype=np.int64))


def imbalance_indices(labels: np.ndarray, *, factor: float, num_classes: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Positions kept to make ``labels`` long-tailed (see :func:`imbalance_counts`).

    Parameters
    ----------
    labels : (N,) int array of TRUE class ids in [0, num_classes)
    factor : imbalance ratio >= 1; 1 keeps every sample
    num_classes : C >= 2
    rng : draws which samples of each class are kept

    Returns
    -------
    (n_kept,) int64 positions into ``labels``, sorted ascending
    """
    y = _labels(labels, num_classes)
    keep = imbalance_counts(np.bincount(y, minlength=num_classes), factor=factor)  # (C,)
    picked = [rng.choice(np.flatnonzero(y == c), size=int(keep[c]), replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_val_test(n: int, *, val_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Randomly split the official test set (size ``n``) into validation and test (spec section 5).

    Validation gets ``round(val_frac * n)`` samples (at least 1, at most n-1), test the rest.

    Returns
    -------
    val, test : int64 positions into the official test set, each sorted ascending, disjoint,
        together ``range(n)``
    """
    if n < 2:
        raise ValueError(f"the official test set has {n} samples: need at least 2 to split into val and test")
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac={val_frac} must be in (0, 1), e.g. 0.1")
    n_val = min(max(int(round(val_frac * n)), 1), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[:n_val]).astype(np.int64), np.sort(perm[n_val:]).astype(np.int64)


# ----------------------------------------------------------------------------- CIFAR-N (real noise)
CIFAR_N_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}  # the release's names
CIFAR_N_RELEASE = "the CIFAR-N release: github.com/UCSC-REAL/cifar-10-100n, data/CIFAR-10_human.pt or data/CIFAR-100_human.pt"


def _load_cifar_n(path: Path) -> dict:
    """The release's ``torch.save`` of a dict of numpy arrays, unpickled with only numpy's array
    types allowed (``weights_only``: a file cannot run code)."""
    import torch

    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        raise ConfigError(f"reading CIFAR-N label files needs torch >= 2.6 (safe numpy unpickling); this is torch "
                          f"{torch.__version__}: upgrade torch")
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2 (numpy 1.26 has a stub of the module too)
    except ImportError:  # pragma: no cover - older numpy 1.x
        from numpy.core.multiarray import _reconstruct
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    # a file pickled under numpy 1.x names numpy.core, one pickled under numpy 2 numpy._core
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct"),
               np.ndarray, np.dtype, *dtypes]
    already = torch.serialization.get_safe_globals()
    # only what is not allowed already: leaving the context removes what it added
    with torch.serialization.safe_globals([g for g in allowed if g not in already]):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_cifar_n_file(path: str | Path) -> Path:
    """``path`` as a Path; ConfigError naming the fix when no such file exists."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"noise.file={path} does not exist: put the file there ({CIFAR_N_RELEASE}) "
                          "or give its path with noise.file=/abs/path")
    return path


def _cifar_n_sets(data: dict) -> list[str]:
    """The fine-label sets a file offers: its 1-D arrays other than clean_label (coarse ones left out)."""
    return sorted(k for k, v in data.items() if isinstance(k, str) and k != "clean_label" and "coarse" not in k
                  and isinstance(v, np.ndarray) and v.ndim == 1)


@functools.lru_cache(maxsize=4)
def _cifar_n_label_set(path: Path, label: str | None, _stamp: tuple[int, int]) -> tuple[str, np.ndarray, np.ndarray]:
    try:
        data = _load_cifar_n(path)
    except ConfigError:
        raise
    except Exception as err:  # torch/pickle raise many kinds for a file of another form
        # weights_only's reason, without torch's boilerplate (which suggests turning the check off)
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()]
        boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
        reasons = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
                   if line and not line.startswith(boilerplate)]
        first = next((r for r in reasons if r), lines[0] if lines and lines[0] else type(err).__name__)
        raise ConfigError(f"noise.file={path} could not be read as a CIFAR-N label file (a torch.save of a dict of "
                          f"numpy label arrays, as {CIFAR_N_RELEASE}): {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("clean_label"), np.ndarray):
        raise ConfigError(f"noise.file={path} holds no 'clean_label' array: it is not a CIFAR-N label file "
                          f"({CIFAR_N_RELEASE})")
    sets = _cifar_n_sets(data)
    if label is None:
        if "noisy_label" not in sets:
            raise ConfigError(f"noise.label is not set and {path.name} has several label sets: choose one of {sets} "
                              "(noise.label=worse_label is CIFAR-10N's noisiest, about 40%)")
        label = "noisy_label"
    if label not in sets:
        raise ConfigError(f"noise.label={label!r} is not one of {path.name}'s label sets: choose one of {sets}")
    ref, human = data["clean_label"], data[label]
    for name, arr in (("clean_label", ref), (label, human)):
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.shape != ref.shape:
            raise ConfigError(f"noise.file={path}: {name} has shape {arr.shape} and dtype {arr.dtype}: not one integer "
                              "label per training image, as in the CIFAR-N release")
    return label, ref.astype(np.int64), human.astype(np.int64)


def cifar_n_label_set(path: str | Path, label: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    """``(label set, clean_label, its labels)`` of a CIFAR-N file, both arrays (N,) int64; read
    once per file version (path, size, mtime). ConfigError naming the fix for a file that is not
    one, or a label set it lacks (None: ``noisy_label``, CIFAR-100N's one set)."""
    path = check_cifar_n_file(path)
    st = path.stat()
    return _cifar_n_label_set(path.resolve(), label, (st.st_size, st.st_mtime_ns))


def cifar_n_identity(path: str | Path, label: str | None) -> dict[str, str]:
    """What a run with these CIFAR-N labels computes on: the label set and a digest of its labels
    (a file moved elsewhere is the same run; another file with other labels is another run)."""
    label, ref, human = cifar_n_label_set(path, label)
    digest = hashlib.sha256(ref.tobytes() + b"|" + human.tobytes()).hexdigest()[:16]
    return {"label": label, "labels_sha256": digest}


def read_cifar_n(path: str | Path, label: str | None, clean: np.ndarray, num_classes: int) -> np.ndarray:
    """A CIFAR-N label set of the training images, in the order of ``clean``.

    Parameters
    ----------
    path : the release's ``CIFAR-10_human.pt`` or ``CIFAR-100_human.pt`` (or a file of the same form)
    label : the label set, e.g. ``worse_label`` (CIFAR-10N, 40% noise) or ``noisy_label``
        (CIFAR-100N); None: ``noisy_label`` where the file has it. Coarse sets are not offered.
    clean : (N,) the data set's own training labels, in the python-version CIFAR order the release
        indexes; the file's ``clean_label`` must equal them (so the file belongs to this data set,
        in this order)
    num_classes : C

    Returns
    -------
    (N,) int64 human labels, ``[j]`` for the training image ``j``

    Raises
    ------
    ConfigError naming the fix: no such file, not a CIFAR-N file, an unknown label set, a file
    for another data set or order.
    """
    label, ref, human = cifar_n_label_set(path, label)
    if ref.shape[0] != np.shape(clean)[0]:
        raise ConfigError(f"noise.file={path}: {ref.shape[0]} labels for the data set's {np.shape(clean)[0]} training "
                          "images: the file is for another data set (CIFAR-10N for cifar10, CIFAR-100N for cifar100)")
    differ = int(np.count_nonzero(ref != np.asarray(clean)))
    if differ:
        raise ConfigError(f"noise.file={path}: its clean_label differs from the data set's training labels at {differ} "
                          f"of {ref.shape[0]} images: the file is for another data set (CIFAR-10N for cifar10, "
                          "CIFAR-100N for cifar100) or the images are in another order (CIFAR-N indexes the "
                          "python-version training batches in their original order)")
    if human.min() < 0 or human.max() >= num_classes:
        raise ConfigError(f"noise.file={path}: {label} has labels outside [0, {num_classes})")
    return human.astype(np.int64, copy=True)
