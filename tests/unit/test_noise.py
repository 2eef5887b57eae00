"""Label noise, class imbalance and val/test split (spec section 5)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pivotal_ray.core import noise
from pivotal_ray.core.seeding import numpy_rng

SETTINGS = settings(max_examples=40, deadline=None)


def _labels(seed: int, n: int, C: int) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, C, size=n)


@SETTINGS
@given(n=st.integers(0, 400), C=st.integers(2, 12), pct=st.integers(0, 100), seed=st.integers(0, 2**31))
@example(n=100, C=10, pct=29, seed=0)  # 0.29 * 100 = 28.999999999999996 in floats
@example(n=100, C=10, pct=57, seed=0)
@example(n=180, C=3, pct=35, seed=1)
def test_adversarial_flips_exactly_floor_pn_through_one_derangement(n, C, pct, seed):
    y = _labels(seed, n, C)
    noisy, perm = noise.adversarial_noise(y, rate=pct / 100, num_classes=C, rng=np.random.default_rng(seed))
    changed = noisy != y
    assert changed.sum() == math.floor(Fraction(pct, 100) * n)  # exact rational reference
    assert sorted(perm.tolist()) == list(range(C))  # a permutation ...
    assert np.all(perm != np.arange(C))  # ... with no fixed point
    assert np.array_equal(noisy[changed], perm[y[changed]])
    assert noisy.dtype == np.int64 and noisy.shape == y.shape


@SETTINGS
@given(n=st.integers(1, 300), C=st.integers(2, 10), seed=st.integers(0, 2**31))
def test_uniform_at_rate_one_never_keeps_the_true_label(n, C, seed):
    y = _labels(seed, n, C)
    noisy = noise.uniform_noise(y, rate=1.0, num_classes=C, rng=np.random.default_rng(seed))
    assert np.all(noisy != y) and noisy.min() >= 0 and noisy.max() < C


@pytest.mark.parametrize("p,C", [(0.2, 2), (0.6, 10), (0.8, 10)])
def test_uniform_empirical_rate_and_targets_are_uniform_over_other_classes(p, C):
    n = 100_000
    y = _labels(0, n, C)
    noisy = noise.uniform_noise(y, rate=p, num_classes=C, rng=np.random.default_rng(1))
    flipped = noisy != y
    assert abs(flipped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial sd
    if C > 2:  # flips of class-0 samples spread evenly over classes 1..C-1
        hits = np.bincount(noisy[flipped & (y == 0)], minlength=C)
        assert hits[0] == 0
        expected = hits.sum() / (C - 1)
        assert np.all(np.abs(hits[1:] - expected) < 5 * math.sqrt(expected))


@pytest.mark.parametrize("p,C", [(0.6, 10), (0.5, 2), (1.0, 4)])
def test_uniform_mix_realised_rate_is_p_times_c_minus_1_over_c(p, C):
    n = 100_000
    y = _labels(0, n, C)
    noisy = noise.uniform_mix_noise(y, rate=p, num_classes=C, rng=np.random.default_rng(2))
    q = p * (C - 1) / C
    assert abs((noisy != y).mean() - q) < 5 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("kind", ["none", "uniform", "uniform_mix", "adversarial"])
def test_apply_noise_is_deterministic_per_seed_and_matches_direct_call(kind):
    y = _labels(3, 500, 10)
    a = noise.apply_noise(y, kind=kind, rate=0.4, num_classes=10, rng=numpy_rng(7, "noise"))
    b = noise.apply_noise(y, kind=kind, rate=0.4, num_classes=10, rng=numpy_rng(7, "noise"))
    c = noise.apply_noise(y, kind=kind, rate=0.4, num_classes=10, rng=numpy_rng(8, "noise"))
    assert np.array_equal(a, b)
    if kind == "none":
        assert np.array_equal(a, y)
    else:
        assert not np.array_equal(a, c)
    if kind == "adversarial":
        direct, _ = noise.adversarial_noise(y, rate=0.4, num_classes=10, rng=numpy_rng(7, "noise"))
        assert np.array_equal(a, direct)


def test_noise_registry_rejects_unknown_kind_and_bad_labels():
    y = np.array([0, 1, 2])
    with pytest.raises(KeyError, match="choose one of"):
        noise.apply_noise(y, kind="pairflip", rate=0.2, num_classes=3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_classes"):
        noise.uniform_noise(y, rate=0.2, num_classes=2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noise.uniform_noise(y, rate=1.5, num_classes=3, rng=np.random.default_rng(0))


def test_imbalance_counts_reproduce_the_cifar10_long_tail_of_cui_et_al():
    # The widely published CIFAR-10-LT (imbalance 100) per-class sizes.
    counts = noise.imbalance_counts(np.full(10, 5000), factor=100)
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@SETTINGS
@given(per=st.integers(1, 60), C=st.integers(2, 8), factor=st.sampled_from([1.0, 2.0, 10.0, 50.0, 200.0]),
       seed=st.integers(0, 2**31))
def test_imbalance_indices_keep_the_profile_and_only_existing_samples(per, C, factor, seed):
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(C), per))
    keep = noise.imbalance_indices(y, factor=factor, num_classes=C, rng=np.random.default_rng(seed))
    assert np.all(np.diff(keep) > 0)  # distinct, sorted
    got = np.bincount(y[keep], minlength=C)
    ref = [math.floor(per * factor ** (-c / (C - 1)) + 1e-9) for c in range(C)]
    assert got.tolist() == ref
    assert got[0] == per and (factor > 1 or got.sum() == y.size)


def test_imbalance_factor_one_keeps_everything_even_when_unbalanced():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    keep = noise.imbalance_indices(y, factor=1.0, num_classes=3, rng=np.random.default_rng(0))
    assert np.array_equal(keep, np.arange(y.size))


@SETTINGS
@given(n=st.integers(2, 2000), frac=st.sampled_from([0.05, 0.1, 0.5, 0.9]), seed=st.integers(0, 2**31))
def test_split_val_test_partitions_the_official_test_set(n, frac, seed):
    val, test = noise.split_val_test(n, val_frac=frac, rng=np.random.default_rng(seed))
    assert np.array_equal(np.sort(np.concatenate([val, test])), np.arange(n))
    assert val.size == min(max(round(frac * n), 1), n - 1)
    assert np.all(np.diff(val) > 0) and np.all(np.diff(test) > 0)


def test_split_val_test_is_random_and_deterministic_per_seed():
    a = noise.split_val_test(1000, val_frac=0.1, rng=np.random.default_rng(0))
    b = noise.split_val_test(1000, val_frac=0.1, rng=np.random.default_rng(0))
    c = noise.split_val_test(1000, val_frac=0.1, rng=np.random.default_rng(1))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert a[0].max() > 900 and a[0].min() < 100  # spread over the set, not a prefix


@pytest.mark.parametrize("pct, n", [(29, 100), (57, 100), (35, 180), (41, 300), (29, 200)])
def test_floor_count_is_exact_where_floats_round_down(pct, n):
    assert math.floor(pct / 100 * n) == pct * n // 100 - 1  # the float product falls just short
    assert noise.floor_count(pct / 100, n) == pct * n // 100
