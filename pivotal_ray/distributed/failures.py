"""Which errors out of a run mean a Ray worker process or node was lost (killed by the OS or Ray's
memory monitor, a spot node reclaimed), as opposed to an error in the code or the data.

A lost worker is not the user's mistake and needs no fix in the command: every artefact is
written atomically and the run's stages are resumable, so the same command goes on where it
stopped. The jobs say so in one message instead of a traceback that points at OOM and ``ray stop``.
"""

from __future__ import annotations

import re
from typing import Any


def worker_lost(err: BaseException) -> BaseException | None:
    """The Ray system failure inside ``err`` (its causes, a Ray task's cause, a Ray Train worker
    group's per-rank failures and health checks, a controller's failure), or None when there is
    none: then ``err`` is an error of the code or the data and is reported as it is.

    An actor whose constructor raised is reported by Ray as a dead actor too; that is an error of
    the code (``actor_init_failed``) and does not count. Nor does a worker that stopped answering
    (Ray Train's health-check timeout): a hang can be the code's.
    """
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.WorkerCrashedError,
            rex.LocalRayletDiedError, rex.OutOfMemoryError)
    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    except ImportError:  # another Ray layout: the per-rank failures below still carry the cause
        WorkerHealthCheckFailedError = ()  # type: ignore[assignment]  # noqa: N806

    def is_lost(e: BaseException) -> bool:
        return isinstance(e, lost) and not (isinstance(e, rex.RayActorError) and e.actor_init_failed)

    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if is_lost(e):
            inner = getattr(e, "cause", None)  # a remote task that met the loss: the loss itself says more
            if isinstance(e, rex.RayTaskError) and isinstance(inner, BaseException) and is_lost(inner):
                todo.append(inner)
                continue
            return e
        if WorkerHealthCheckFailedError and isinstance(e, WorkerHealthCheckFailedError):
            # Ray Train raises it for anything its poll of a worker met: a dead worker, but also a
            # report that would not pickle (a code error); only the first is a loss
            if worker_lost(e.health_check_failure) is not None:
                return e
            continue
        todo += [e.__cause__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def lost_worker_message(lost: BaseException) -> str:
    """What the jobs print for a lost worker: Ray's own lines about it (which actor, pid, node,
    why it exited), then what to do."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(lost))  # Ray colours some of its lines
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = "\n".join(f"  {line}" for line in lines[:12])
    return (f"a Ray worker process or node was lost during the run ({type(lost).__name__}):\n{detail}\n"
            "Nothing was marked finished and the stages that finished are kept: run the same command again "
            "to go on (finished stages are read back, training resumes from its last snapshot). If the "
            "worker was killed for memory (the Ray logs say so), give the nodes more memory or run fewer "
            "extraction actors (ray.extract_actors) or smaller batches (features.batch_size). If it stops the "
            "same way at the same stage again, it is no chance loss (a crash in native code, memory): read the "
            "lost worker's log (Ray's session logs, worker-*.err, or the dashboard's Logs view).")
