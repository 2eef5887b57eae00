"""Whether the other nodes of the Ray cluster see a folder as this driver does (shared storage).

On a cluster of several nodes, Ray Train's workers write checkpoints under ``ray.storage_path``
(by default ``<output_dir>/ray_train``) and Ray Data's write tasks write the feature tables under
``output_dir``, each on whatever node it runs on, while the driver reads them back. A local path
works there only when every node mounts the same storage at it (NFS/EFS, a RayJob's shared
volume). Without this check a folder on one node's own disk fails late: after the warm-up trained
(its checkpoints on another node), or after feature extraction.

:func:`nodes_not_sharing` asks every other live node that can run work whether it reads a file the
driver has just written in the folder; a node that does not is not sharing it. The file is named
``.pivotal_ray-shared-probe-<random>`` and is removed before the call returns (on a single node
nothing is written or asked).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_PREFIX = ".pivotal_ray-shared-probe-"
# seconds a node keeps looking for the file: a network filesystem's client may cache the folder
# for a moment (NFS attribute caching, FUSE mounts of object stores)
LOOK_S = 3.0


def _reads(path: str, token: str, look_s: float) -> bool:
    """Whether ``path`` holds ``token`` here, looking again for up to ``look_s`` seconds."""
    deadline = time.monotonic() + look_s
    while True:
        try:
            if Path(path).read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def worker_nodes() -> list[dict]:
    """The live nodes other than this driver's that have a CPU or GPU (where work is placed):
    ``ray.nodes()`` rows."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes()
            if n.get("Alive") and n.get("NodeID") != here
            and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def nodes_not_sharing(folder: str | os.PathLike[str], nodes: list[dict], *, timeout_s: float = 60.0,
                      look_s: float = LOOK_S) -> tuple[list[str], list[str]]:
    """(addresses of the ``nodes`` (:func:`worker_nodes` rows) that do not see ``folder`` as this
    driver does, addresses of those that did not answer in ``timeout_s``). ``folder`` must exist
    here; a file is written in it for the check and removed before this returns."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not nodes:
        return [], []
    token = secrets.token_hex(16)
    probe = Path(folder) / f"{PROBE_PREFIX}{token[:12]}"
    reads = ray.remote(num_cpus=0, max_retries=0)(_reads)
    try:
        probe.write_text(token)
        refs = {reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token, look_s): n.get("NodeManagerAddress", n["NodeID"]) for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        missing = [refs[r] for r in ready if not ray.get(r)]
        for r in pending:
            ray.cancel(r, force=True)
        return missing, [refs[r] for r in pending]
    finally:
        probe.unlink(missing_ok=True)


def unshared_error(setting: str, path: str, checked: str, missing: list[str], nodes: int) -> str | None:
    """The refusal for ``setting`` = ``path`` when the nodes at ``missing`` (of ``nodes`` asked)
    did not see ``checked`` (``path`` or its nearest existing folder) as the driver does; None
    when they all did."""
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    same = os.path.abspath(checked) == os.path.abspath(path)
    return (f"{setting}={path} is not on storage that every node of the Ray cluster shares: a file this driver "
            f"wrote in {checked}" + ("" if same else f" (where {setting} will be created)")
            + f" is not there on {len(missing)} of the {nodes} other nodes ({shown}). Training workers and "
            f"feature-extraction tasks run on any node and write there, and this driver reads it back: put "
            f"{setting} on a filesystem every node mounts at the same path (NFS/EFS, the RayJob's /mnt/shared)"
            + (", or set ray.storage_path to a URI (s3://..., gs://...)" if setting == "ray.storage_path" else "")
            + ", or run on one node")
