"""core/seeding.py: every stage's seed derives from the experiment seed and the stage's name."""

from __future__ import annotations

from pivotal_ray.core.seeding import derive_seed, numpy_rng, torch_generator


def test_derived_seeds_are_golden():
    """Pinned values: another derivation changes every warm-up draw, batch order and pick, so
    stored runs would no longer be what a rerun computes."""
    assert derive_seed(0, "warmup") == 2213751414400489389
    assert derive_seed(0, "round", 1) == 8135493573266645064


def test_names_count_by_their_text():
    # names go in as text: round 1 given as an int (a loop) or as "1" (a parsed name) is one seed
    assert derive_seed(0, "round", 1) == derive_seed(0, "round", "1")
    assert derive_seed(0, "round", 1) != derive_seed(0, "round", 2) != derive_seed(1, "round", 2)
    assert 0 <= derive_seed(123, "x") < 2 ** 63


def test_generators_follow_the_derived_seed():
    assert numpy_rng(0, "warmup").integers(1 << 30) == numpy_rng(0, "warmup").integers(1 << 30)
    assert torch_generator(0, "a").initial_seed() == derive_seed(0, "a")
