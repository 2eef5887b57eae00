"""Whether the other nodes of the Ray cluster see a folder as this driver does (shared storage).

On a cluster of several nodes, Ray Train's workers write checkpoints under ``ray.storage_path``
(by default ``<output_dir>/ray_train``) and Ray Data's write tasks write the feature tables under
``output_dir``, each on whatever node it runs on, while the driver reads them back. A local path
works there only when every node mounts the same storage at it (NFS/EFS, a RayJob's shared
volume). Without this check a folder on one node's own disk fails late: after the warm-up trained
(its checkpoints on another node), or after feature extraction.

:func:`nodes_not_sharing` asks every other live node that can run work whether it reads a file the
driver has just written in the folder; a node that does not is not sharing it. The file is named
``.pivotal_ray-shared-probe-<random>.tmp`` and is removed before the call returns (on a single node
nothing is written or asked).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

PROBE_PREFIX = ".pivotal_ray-shared-probe-"
# ".tmp": a probe left behind (the driver killed mid-check) counts as a temporary, which the
# output_dir check ignores and a run removes (core.artifacts)
PROBE_SUFFIX = ".tmp"
# seconds a node keeps looking for the file: a network filesystem's client may cache the folder
# for a moment (NFS attribute caching, FUSE mounts of object stores)
LOOK_S = 3.0


def _reads(path: str, token: str, look_s: float) -> str | None:
    """None when ``path`` holds ``token`` here (looking again for up to ``look_s`` seconds), else
    what this node found instead: "no such file", "other content", or the error reading it."""
    deadline = time.monotonic() + look_s
    while True:
        try:
            found = "other content" if Path(path).read_text() != token else None
        except FileNotFoundError:
            found = "no such file"
        except OSError as err:  # there, but not readable by this node's user (or the mount failed)
            found = f"{type(err).__name__}: {err.strerror or err}"
        if found is None or time.monotonic() >= deadline:
            return found
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
    """(the ``nodes`` (:func:`worker_nodes` rows) that do not see ``folder`` as this driver does,
    as "address (what it found)", and the addresses of those that gave no answer: none within
    ``timeout_s``, or their task could not run there, e.g. a node being drained or gone since).
    ``folder`` must exist here; a file is written in it for the check and removed before this
    returns."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not nodes:
        return [], []
    token = secrets.token_hex(16)
    probe = Path(folder) / f"{PROBE_PREFIX}{token[:12]}{PROBE_SUFFIX}"
    reads = ray.remote(num_cpus=0, max_retries=0)(_reads)
    try:
        probe.write_text(token)
        refs = {reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token, look_s): n.get("NodeManagerAddress", n["NodeID"]) for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        missing, silent = [], [refs[r] for r in pending]
        for r in ready:
            try:
                found = ray.get(r)
            except ray.exceptions.RayError:  # unschedulable there (draining, gone), or its worker died
                silent.append(refs[r])
                continue
            if found is not None:
                missing.append(f"{refs[r]} ({found})")
        for r in pending:
            ray.cancel(r, force=True)
        return missing, silent
    finally:
        probe.unlink(missing_ok=True)


def unshared_error(setting: str, path: str, checked: str, missing: list[str], nodes: int, *, writers: str,
                   uri_fix: bool) -> str | None:
    """The refusal for ``setting`` = ``path`` when the nodes ``missing`` (of ``nodes`` asked) did
    not see ``checked`` (``path`` or its nearest existing folder) as the driver does. ``writers``:
    what other nodes write there; ``uri_fix``: a storage URI for ``ray.storage_path`` would do
    (only checkpoints are at stake). None when every node saw it."""
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    same = os.path.abspath(checked) == os.path.abspath(path)
    return (f"{setting}={path} is not on storage that every node of the Ray cluster shares: a file this driver "
            f"wrote in {checked}" + ("" if same else f" (where {setting} will be created)")
            + f" is not there on {len(missing)} of the {nodes} other nodes: {shown}. {writers}, on any node, "
            f"and this driver reads them back: put {setting} on a filesystem every node mounts at the same path "
            f"(NFS/EFS, the RayJob's /mnt/shared)"
            + (", or set ray.storage_path to a URI (s3://..., gs://...)" if uri_fix else "")
            + ", or run on one node")
