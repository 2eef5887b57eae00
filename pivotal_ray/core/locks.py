"""One invocation at a time per output folder and per training run, on this machine.

Two invocations working in one place corrupt each other: a second ``jobs.select`` on a running
``output_dir`` deletes the first one's half-written files as leftovers of a killed run, and two
``jobs.compare`` sharing a warm-up (rbc in one terminal, gbc in another, one output root) would
train that warm-up twice into one Ray Train run. A :func:`hold` around the work keeps them apart.

The locks are ``flock`` locks on small files in ``<tempdir>/pivotal_ray_locks-<uid>/``, named by a
digest of what they guard: the kernel drops a lock when its process ends, however it ends, so a
killed run never leaves one behind. A holder removes its file when it lets go (a killed one leaves
it, unlocked, to be reused). They guard against invocations on the same machine (a job
submitted with ``ray job submit`` runs its driver on the head node, so jobs submitted to one
cluster count) by the same OS user; not against another machine writing to a shared volume.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..config import ConfigError


# jobs.compare's run threads (compare.concurrency) are named "compare[<method> seed <s>]"
RUN_THREAD = "compare"


class BusyError(ConfigError):
    """What the invocation would work on is in use by another invocation on this machine."""


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pivotal_ray_locks-{os.getuid()}"


def lock_path(key: str) -> Path:
    """The lock file of ``key`` (a resolved path or storage URI, with a prefix saying what it is)."""
    return lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


def holder(path: str | os.PathLike[str]) -> str:
    """Who holds the lock at ``path``, as its holder wrote it ("" when unknown); another run of
    this very comparison (``compare.concurrency``: a thread named ``compare[...]`` of this
    process) by that run."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        thread = str(info.get("thread", ""))
        if info["pid"] == os.getpid() and info["host"] == socket.gethostname() and thread.startswith(RUN_THREAD + "["):
            return f"the comparison's run {thread.removeprefix(RUN_THREAD)}, since {info['since']}"
        return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@contextlib.contextmanager
def hold(key: str, what: str, *, wait: bool, on_wait: Callable[[str], None] | None = None,
         fix: str = "wait for it to finish") -> Iterator[None]:
    """Hold the lock of ``key`` for the ``with`` block.

    Parameters
    ----------
    key : what is guarded, e.g. ``"output_dir:/abs/path"``.
    what : how messages name it, e.g. ``"output_dir /abs/path"``.
    wait : when another invocation holds it, wait for that one to finish (``on_wait`` is told
        once), or raise :class:`BusyError` at once, whose message ends with ``fix``.

    Raises
    ------
    BusyError
        ``wait=False`` and another process holds it; the message names that process and the fix.
    """
    import fcntl

    path = lock_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = holder(path) or "another process"
                if not wait:
                    raise BusyError(f"{what} is in use by another invocation ({who}; lock {path}): {fix}") from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for {what}, in use by " + (who if who.startswith("the comparison's run") else
                                                                  f"another invocation ({who})"))
                told = True
                fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait (KeyboardInterrupt)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file it released: lock the one now at the path
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "thread": threading.current_thread().name,
                "since": _dt.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500], "key": key}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        # removed while still locked, so lock files do not pile up (one per output folder and run
        # ever used); a process that opened it meanwhile finds, once it has the lock, that the path
        # names another file or none (_same_file), and locks the path again
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
