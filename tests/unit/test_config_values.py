"""Config values refused at construction (a ConfigError naming the setting and the fix), before
any work: wrong types, and values whose error would otherwise surface deep in a run."""

from __future__ import annotations

import pytest

from pivotal_ray.config import CompareConfig, ConfigError, from_dict


@pytest.mark.parametrize("values, fragment", [
    ({"reweight": {"epochs": "ten"}}, "reweight.epochs='ten' must be an integer"),
    ({"features": {"stride": None}}, "features.stride must be set (an integer), not null"),
    ({"selection": {"budget": 7.5}}, "selection.budget=7.5 must be an integer"),
    ({"seed": True}, "seed=True must be an integer"),
    ({"reweight": {"augment": "yes"}}, "reweight.augment='yes' must be true or false"),
    ({"reweight": {"lr": "fast"}}, "reweight.lr='fast' must be a number"),
    ({"data": {"name": "imagefolder", "root": "/d", "image_size": 0}}, "data.image_size=0 must be >= 8"),
    ({"data": {"loader_workers": -1}}, "data.loader_workers=-1 must be >= 0"),
    ({"data": {"toy_base_flip": 2}}, "data.toy_base_flip=2 in [0, 1)"),
    ({"labels": {"source": "file", "file": "s3://bucket/labels.csv"}}, "must be a local or mounted path"),
    # per_round < 1 would never finish the round plan (round_sizes never reaches the budget): the
    # check must come at construction, and the construction itself touches no round_sizes
    ({"selection": {"per_round": -1}}, "selection.per_round=-1 must be >= 1"),
    ({"selection": {"per_round": 0}}, "selection.per_round=0 must be >= 1"),
])
def test_bad_values_are_refused_with_the_setting_named(values, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict({"output_dir": "/tmp/x", **values})
    assert fragment in str(err.value)


def test_types_that_are_right_pass_unchanged():
    cfg = from_dict({"output_dir": "/tmp/x", "reweight": {"lr": 1, "meta_lr": 1000}, "data": {"root": None}})
    assert cfg.reweight.lr == 1 and isinstance(cfg.reweight.lr, int)  # kept as given: run names hash it


def test_what_hydra_reads_as_numbers_is_taken():
    from tests.e2e.conftest import resolve

    cfg = resolve("name=2024", "ray.object_store_memory=2e9", "output_dir=/tmp/x")
    assert cfg.name == "2024" and cfg.ray.object_store_memory == 2_000_000_000
    assert isinstance(cfg.ray.object_store_memory, int)


def test_compare_output_root_must_be_a_path():
    with pytest.raises(ConfigError, match="must be a local or mounted path, not a storage URI"):
        CompareConfig(output_root="s3://bucket/compare")
