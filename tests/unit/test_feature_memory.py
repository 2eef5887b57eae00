"""The pre-flight memory check: the feature table's size (GBC dense or RBC factors) from the
config, and a ConfigError that names the fix when K-means could not hold it (no Ray: the
cluster's memory is an argument)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pivotal_ray.config import ConfigError, ExperimentConfig, FeatureConfig, ModelConfig, SelectionConfig
from pivotal_ray.pipeline import centroid_bytes, check_feature_memory, craig_bytes, feature_table_bytes
from pivotal_ray.selectors import clustered_feature_kind

# MNIST as the pipeline sees it: 60,000 training samples, LeNet-5 whose largest tensor is the
# 400 -> 120 fully connected weight (48,000 floats)
MNIST = SimpleNamespace(train=range(60000), num_classes=10, input_shape=(1, 28, 28))
GiB = 2**30


def _cfg(method: str = "gbc", **features) -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(name="lenet5"), selection=SelectionConfig(method=method),
                            features=FeatureConfig(num_snapshots=5, num_layers=5, **features))


def test_table_size_is_samples_snapshots_blocks_floats() -> None:
    # the 22.9 GiB that Ray Data wrote for MNIST at proj_dim=4096 (docs/results.md)
    assert feature_table_bytes(_cfg(proj_dim=4096), MNIST) == 60000 * 5 * 5 * 4096 * 4
    assert feature_table_bytes(_cfg(proj_dim=256), MNIST) == 60000 * 5 * 5 * 256 * 4
    # a block is never wider than the largest tensor
    assert feature_table_bytes(_cfg(proj_dim=10**6), MNIST) == 60000 * 5 * 5 * 48000 * 4


@pytest.mark.parametrize("method, kind", [("random", "rbc"), ("base", "gbc"), ("finetune", "gbc")])
def test_no_table_for_methods_that_cluster_none(method, kind) -> None:
    assert feature_table_bytes(_cfg(method, kind=kind), MNIST) == 0
    assert craig_bytes(_cfg(method, kind=kind), MNIST) == (0, 0)
    check_feature_memory(_cfg(method, kind=kind), MNIST, memory_bytes=0.0)


def test_craig_counts_its_factors_and_similarity_block_in_the_driver() -> None:
    """craig clusters nothing (no K-means table) but holds one snapshot's RBC factors (N x (C + d))
    and an N x 1024 float32 similarity block: 22.6 MB and 245.8 MB on MNIST, 14.5 and 4.9 GiB for
    ImageNet-1k with a ResNet-50, where 1.25 x 14.5 + 4.9 + 4 = 27.1 GiB is asked for."""
    assert feature_table_bytes(_cfg("craig", kind="gbc"), MNIST) == 0
    assert craig_bytes(_cfg("craig", kind="gbc"), MNIST) == (60000 * (10 + 84) * 4, 60000 * 1024 * 4)
    check_feature_memory(_cfg("craig"), MNIST, memory_bytes=5 * GiB)
    imagenet = SimpleNamespace(train=range(1_281_167), num_classes=1000, input_shape=(3, 224, 224))
    cfg = ExperimentConfig(model=ModelConfig(name="resnet50"), selection=SelectionConfig(method="craig"))
    assert craig_bytes(cfg, imagenet) == (1_281_167 * 3048 * 4, 1_281_167 * 1024 * 4)
    with pytest.raises(ConfigError, match=r"craig holds one snapshot's RBC factors \(14\.5 GiB.*1281167 x 1024 "
                                          r"similarity block \(4\.9 GiB\).*about 27\.1 GiB.*has 16\.0 GiB: run the driver"):
        check_feature_memory(cfg, imagenet, memory_bytes=16 * GiB)
    check_feature_memory(cfg, imagenet, memory_bytes=28 * GiB)


@pytest.mark.parametrize("method, kind", [("rbc", "rbc"), ("rbc_k", "gbc")])  # rbc_k always clusters RBC
def test_rbc_table_is_samples_snapshots_factor_floats(method, kind) -> None:
    # LeNet-5 on MNIST: A (C = 10) and x~ (d = 84) per sample and snapshot
    assert feature_table_bytes(_cfg(method, kind=kind, proj_dim=256), MNIST) == 60000 * 5 * (10 + 84) * 4


def test_rbc_on_gbc_features_counts_the_gbc_table() -> None:
    assert feature_table_bytes(_cfg("rbc", kind="gbc", proj_dim=256), MNIST) == 60000 * 5 * 5 * 256 * 4


def test_too_large_an_rbc_table_is_refused_with_its_own_fix() -> None:
    """ImageNet-1k with a torchvision ResNet-50 (C = 1000, d = 2048): 1.28M samples x K = 5 x 3048
    floats = 72.7 GiB of factors; the fix names the snapshots, not GBC's sketch."""
    imagenet = SimpleNamespace(train=range(1_281_167), num_classes=1000, input_shape=(3, 224, 224))
    cfg = ExperimentConfig(model=ModelConfig(name="resnet50"), selection=SelectionConfig(method="rbc"),
                           features=FeatureConfig(num_snapshots=5))
    assert feature_table_bytes(cfg, imagenet) == 1_281_167 * 5 * 3048 * 4
    # 4 picks (the default budget 6, warm-up 2): centroids 4 x (5 x 1000 x 2048) float64 = 0.31 GiB,
    # 12 copies over 2 shards
    assert centroid_bytes(cfg, imagenet) == 4 * 5 * 1000 * 2048 * 8
    with pytest.raises(ConfigError, match=r"RBC features would take 72\.7 GiB.*about 98\.6 GiB.*"
                                          r"lower features\.num_snapshots, or add nodes"):
        check_feature_memory(cfg, imagenet, memory_bytes=64 * GiB)
    check_feature_memory(cfg, imagenet, memory_bytes=100 * GiB)  # 1.25 x 72.7 + 12 x 0.31 + 4 = 98.6 GiB


def test_centroids_of_many_picks_are_counted_and_named() -> None:
    """RBC centroids are dense K x C x d blocks: 1000 picks in a round on ImageNet-1k's ResNet-50
    make each copy 76 GiB, which no table-sized cluster holds; the fix names the picks per round.
    The exclusion step's centres count too: M is the larger of a round's picks and the meta
    samples before the last round."""
    imagenet = SimpleNamespace(train=range(1_281_167), num_classes=1000, input_shape=(3, 224, 224))
    cfg = ExperimentConfig(model=ModelConfig(name="resnet50"), features=FeatureConfig(num_snapshots=5),
                           selection=SelectionConfig(method="rbc", budget=1100, warmup=100))
    assert centroid_bytes(cfg, imagenet) == 1000 * 5 * 1000 * 2048 * 8
    with pytest.raises(ConfigError, match=r"12 copies of its 1000 x 10240000 float64 centroids.*lower selection\.per_round"):
        check_feature_memory(cfg, imagenet, memory_bytes=512 * GiB)
    rounds = ExperimentConfig(model=ModelConfig(name="resnet50"), features=FeatureConfig(num_snapshots=5),
                              selection=SelectionConfig(method="rbc", budget=1100, warmup=100, per_round=100))
    assert centroid_bytes(rounds, imagenet) == 1000 * 5 * 1000 * 2048 * 8  # 1000 meta samples before round 10
    small = ExperimentConfig(model=ModelConfig(name="resnet50"), features=FeatureConfig(num_snapshots=5),
                             selection=SelectionConfig(method="rbc", budget=120, warmup=100, per_round=10))
    assert centroid_bytes(small, imagenet) == 110 * 5 * 1000 * 2048 * 8
    assert centroid_bytes(_cfg("random"), MNIST) == 0


@pytest.mark.parametrize("method, configured, expected", [
    ("rbc", "rbc", "rbc"), ("rbc", "gbc", "gbc"), ("gbc", "rbc", "gbc"), ("rbc_k", "gbc", "rbc"),
    ("random", "rbc", None), ("craig", "gbc", None), ("finetune", "rbc", None)])
def test_clustered_feature_kind_is_what_the_selector_extracts(method, configured, expected) -> None:
    assert clustered_feature_kind(method, configured) == expected


def test_too_large_a_table_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"22\.9 GiB.*features\.proj_dim \(e\.g\. 256\)"):
        check_feature_memory(_cfg(proj_dim=4096), MNIST, memory_bytes=15 * GiB)
    check_feature_memory(_cfg(proj_dim=256), MNIST, memory_bytes=15 * GiB)  # 1.4 GiB: fits


def test_the_limit_counts_the_table_1_25_times_plus_ray() -> None:
    """proj_dim 1024 on MNIST (5.7 GiB): 1.25 x 5.7 + 4 = 11.2 GiB (the centroids: 12 x 0.8 MB), which a 12 GiB node has (on a
    22 GiB one the node's used memory rose 7.9 GiB, measured by benchmarks.kmeans_memory) and a
    10 GiB one has not."""
    check_feature_memory(_cfg(proj_dim=1024), MNIST, memory_bytes=12 * GiB)
    with pytest.raises(ConfigError, match=r"5\.7 GiB.*about 11\.2 GiB: 1\.25x the table \(7\.2 GiB\).*12 copies of "
                                          r"its 4 x 25600 float64 centroids over 2 shards.*4 GiB for Ray.*has 10\.0 GiB"):
        check_feature_memory(_cfg(proj_dim=1024), MNIST, memory_bytes=10 * GiB)


def test_runs_at_once_share_the_memory_equally() -> None:
    """compare.concurrency=n: each run, its 4 GiB for Ray's processes included (each run starts its
    own shard actors and server), must fit in 1/n of the memory: 100 GiB holds one ImageNet-1k
    ResNet-50 RBC run of 98.6 GiB, not two; 198 GiB two. Where one run would fit, the refusal
    names compare.concurrency first; where not even one fits, the run's own fix first."""
    imagenet = SimpleNamespace(train=range(1_281_167), num_classes=1000, input_shape=(3, 224, 224))
    cfg = ExperimentConfig(model=ModelConfig(name="resnet50"), selection=SelectionConfig(method="rbc"),
                           features=FeatureConfig(num_snapshots=5))
    check_feature_memory(cfg, imagenet, memory_bytes=100 * GiB, runs_at_once=1)
    with pytest.raises(ConfigError, match=r"about 98\.6 GiB.*for Ray, but the 2 runs at once \(compare\.concurrency\) "
                                          r"share the Ray cluster's 100\.0 GiB, 50\.0 GiB each: lower "
                                          r"compare\.concurrency \(one such run fits the cluster\), or add nodes$"):
        check_feature_memory(cfg, imagenet, memory_bytes=100 * GiB, runs_at_once=2)
    check_feature_memory(cfg, imagenet, memory_bytes=198 * GiB, runs_at_once=2)
    with pytest.raises(ConfigError, match=r"share the Ray cluster's 90\.0 GiB, 45\.0 GiB each: lower "
                                          r"features\.num_snapshots, or add nodes, or lower compare\.concurrency$"):
        check_feature_memory(cfg, imagenet, memory_bytes=90 * GiB, runs_at_once=2)
    craig = ExperimentConfig(model=ModelConfig(name="resnet50"), selection=SelectionConfig(method="craig"))
    check_feature_memory(craig, imagenet, memory_bytes=28 * GiB)
    with pytest.raises(ConfigError, match=r"craig holds.*with Ray's 4 GiB, but the 3 runs at once.*9\.3 GiB each: "
                                          r"lower compare\.concurrency \(one such run fits the cluster\), or add nodes$"):
        check_feature_memory(craig, imagenet, memory_bytes=28 * GiB, runs_at_once=3)
    with pytest.raises(ConfigError, match=r"has 16\.0 GiB: run the driver"):  # one run: as before
        check_feature_memory(craig, imagenet, memory_bytes=16 * GiB, runs_at_once=1)
