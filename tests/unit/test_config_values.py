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
    ({"reweight": {"eval_batch_size": 0}}, "reweight.eval_batch_size=0 must be >= 1"),
    ({"reweight": {"lr": "fast"}}, "reweight.lr='fast' must be a number"),
    ({"data": {"name": "imagefolder", "root": "/d", "image_size": 0}}, "data.image_size=0 must be >= 8"),
    ({"data": {"loader_workers": -1}}, "data.loader_workers=-1 must be >= 0"),
    ({"data": {"toy_base_flip": 2}}, "data.toy_base_flip=2 in [0, 1)"),
    ({"labels": {"source": "file", "file": "s3://bucket/labels.csv"}}, "must be a local or mounted path"),
    # per_round < 1 would never finish the round plan (round_sizes never reaches the budget): the
    # check must come at construction, and the construction itself touches no round_sizes
    ({"selection": {"per_round": -1}}, "selection.per_round=-1 must be >= 1"),
    ({"selection": {"per_round": 0}}, "selection.per_round=0 must be >= 1"),
    # a list setting given one value (Hydra reads lr_milestones=12 as an int): the fix shows the list
    ({"reweight": {"lr_milestones": 12}}, "reweight.lr_milestones=12 must be a list, e.g. 'reweight.lr_milestones=[12]'"),
    ({"reweight": {"lr_milestones": ["a"]}}, "reweight.lr_milestones[0]='a' must be an integer"),
    ({"reweight": {"lr_milestones": None}}, "reweight.lr_milestones=None must be a list, e.g. 'reweight.lr_milestones=[]'"),
    # MultiStepLR cuts the lr when its count of finished epochs equals a milestone: 0 at construction
    # (before the first epoch: a lower lr), a negative one never
    ({"reweight": {"lr_milestones": [0, 12]}}, "reweight.lr_milestones=[0, 12]: a milestone is the number of epochs"),
    ({"reweight": {"lr_milestones": [0]}}, "0 would cut it before the first epoch: lower reweight.lr instead"),
    ({"reweight": {"lr_milestones": [-1]}}, "must be >= 1 (0 would cut it before"),
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


@pytest.mark.parametrize("values, fragment", [
    ({"seeds": 0}, "compare.seeds=0 must be a list, e.g. 'compare.seeds=[0]'"),
    # a string is not a list of one-letter methods
    ({"methods": "rbc"}, "compare.methods='rbc' must be a list, e.g. 'compare.methods=[rbc]'"),
    ({"seeds": [0, "one"]}, "compare.seeds[1]='one' must be an integer"),
])
def test_compare_lists_given_as_one_value_name_the_list_form(values, fragment):
    from pivotal_ray.config import _build

    with pytest.raises(ConfigError) as err:
        _build(CompareConfig, {"output_root": "/tmp/x", **values}, "compare")
    assert fragment in str(err.value)
    assert _build(CompareConfig, {"output_root": "/tmp/x", "seeds": [0.0, 2]}, "compare").seeds == [0, 2]


def test_output_dir_must_be_set_and_a_home_path_is_expanded(monkeypatch, tmp_path):
    from tests.e2e.conftest import resolve

    for empty in ("output_dir=null", "output_dir=''"):
        with pytest.raises(ConfigError, match="output_dir is not set: output_dir=/abs/path"):
            resolve(empty)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve("experiment=mnist_adv60", "output_dir='~/out'", "data.root='~/data'", "ray.storage_path='~/rt'", "labels.file='~/l.csv'")
    assert (cfg.output_dir, cfg.data.root, cfg.ray.storage_path, cfg.labels.file) == (
        f"{tmp_path}/out", f"{tmp_path}/data", f"{tmp_path}/rt", f"{tmp_path}/l.csv")
    from jobs.compare import compare_config
    from tests.e2e.conftest import compose_config

    assert compare_config(compose_config("compare.output_root='~/cmp'")).output_root == f"{tmp_path}/cmp"


def test_ray_max_failures_below_minus_one_is_refused():
    with pytest.raises(ConfigError, match=r"ray.max_failures=-2 must be >= 0, or -1 \(no limit\)"):
        from_dict({"output_dir": "/tmp/x", "ray": {"max_failures": -2}})
    with pytest.raises(ConfigError, match=r"ray.extract_max_restarts=-2 must be >= 0, or -1 \(no limit\)"):
        from_dict({"output_dir": "/tmp/x", "ray": {"extract_max_restarts": -2}})
