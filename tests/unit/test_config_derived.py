"""Values the configs derive from their settings: the round plan, the K-means similarity, and
what run names hash (without_defaults), pinned because a silent change moves picks or names."""

from __future__ import annotations

import pytest

from pivotal_ray.config import (ExperimentConfig, SelectionConfig, from_dict, kmeans_signed, to_dict,
                                without_defaults)


@pytest.mark.parametrize("budget, warmup, per_round, sizes", [
    (10, 2, 3, [3, 3, 2]),  # the last round takes what is left, not a whole per_round
    (10, 2, None, [8]),  # default: one round
    (10, 2, 8, [8]),
    (10, 2, 20, [8]),  # per_round beyond the budget: one round of what is left
    (6, 2, 1, [1, 1, 1, 1]),
])
def test_round_sizes_add_up_to_the_budget(budget, warmup, per_round, sizes):
    sel = SelectionConfig(budget=budget, warmup=warmup, per_round=per_round)
    assert sel.round_sizes == sizes and sum(sel.round_sizes) == budget - warmup


@pytest.mark.parametrize("mode, signed", [("l2rw", True), ("direct", False), ("mwnet", False), ("none", False),
                                          ("a_future_mode", False)])
def test_auto_similarity_is_signed_under_l2rw_only(mode, signed):
    # eqs. S13-S14 drop the absolute value for l2rw alone; every other mode clusters with |<G_j, C_i>|
    assert kmeans_signed({"similarity": "auto"}, mode) is signed
    assert kmeans_signed(SelectionConfig(similarity="auto"), mode) is signed  # the dataclass too


@pytest.mark.parametrize("mode", ["l2rw", "direct", "mwnet"])
def test_an_explicit_similarity_wins_over_the_mode(mode):
    assert kmeans_signed({"similarity": "signed"}, mode) is True
    assert kmeans_signed({"similarity": "abs"}, mode) is False


def test_the_default_config_has_nothing_but_defaults():
    """to_dict turns data.toy_split's tuple default into a list: it must still count as the
    default, or every run name would hash a toy_split nobody set."""
    plain = without_defaults(to_dict(ExperimentConfig()))
    assert all(plain[section] == {} for section in ("data", "noise", "model", "reweight", "features", "selection",
                                                    "finetune", "labels", "ray")), plain
    assert without_defaults(to_dict(from_dict({"data": {"toy_split": [600, 240, 160]}})))["data"] == {}
    assert without_defaults(to_dict(from_dict({"data": {"toy_split": [500, 340, 160]}})))["data"] == {
        "toy_split": [500, 340, 160]}


def test_the_default_warmup_name_is_stable():
    """Golden names: a warm-up run is found again in ray.storage_path by this name, so a change in
    what it hashes orphans every stored warm-up (compare runs would all train theirs again)."""
    from pivotal_ray.training import warmup_name

    assert warmup_name(ExperimentConfig()) == "warmup-35b21ffdbe6b"
    assert warmup_name(ExperimentConfig(seed=1)) == "warmup-b62bcc760006"
    # ray.deterministic changes GPU floats: runs with it are trained apart (at its default: the names above)
    assert warmup_name(from_dict({"ray": {"deterministic": True}})) != warmup_name(ExperimentConfig())
