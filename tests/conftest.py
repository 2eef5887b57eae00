"""Shared fixtures. One local Ray session for the whole test run (integration and e2e tiers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PIVOTAL_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def ray_session():
    """Start (once) a 2-CPU local Ray with a capped object store; shut it down at the end."""
    import ray

    from pivotal_ray.pipeline import RAY_ENV_VARS

    if not ray.is_initialized():
        # Ray starts its workers at nice 15: with other work on the machine at nice 0 (another
        # job's tests, a build) they got a few percent of a core and ran deadlines out (measured: an
        # extraction test 199 s instead of ~10 s). The tests check results, not Ray's priorities.
        # Left set for the session: the Rays that end-to-end tests start in subprocesses inherit it.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            # our own Ray, even where `ray start` left a cluster on this machine (stop that one before
            # the tests: Ray Train's placement-group cleaner looks the cluster up by that cluster's
            # address file and would watch it instead of this one; see pipeline.connect)
            address="local",
            num_cpus=2,
            object_store_memory=300 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **RAY_ENV_VARS}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {SHARED_DATA} (set PIVOTAL_SHARED_DATA)")
    return SHARED_DATA
