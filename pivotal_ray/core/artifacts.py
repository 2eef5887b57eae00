"""Artefacts on disk: atomic writers, the run manifest, and the output-dir guard.

A reader (a person, a resumed run, another Ray worker) must never see half a file: every writer
here builds the file under a hidden temporary name in the SAME directory, fsyncs it and then
``os.replace``-s it over the final name, which POSIX makes atomic within one filesystem. A
writer that raises midway leaves the old file (or nothing) behind, never a truncated one.

Each ``output_dir`` holds one run, named by ``manifest.json``::

    check_output_dir(out, config=cfg)           # before any work: refuses another run's dir
    write_manifest(out, config=cfg, seed=0, timings={})             # early, so a crash can resume
    write_csv(out / "selection.csv", rows)      # ... results ...
    write_manifest(out, config=cfg, seed=0, timings={"total_s": 12.3})

Paths must be local or mounted filesystems; storage URIs (``s3://...``) are refused with a
message saying so (Ray Train's ``ray.storage_path`` is where URIs belong).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pivotal_ray.config import ConfigError

__all__ = [
    "MANIFEST_NAME",
    "IGNORED_KEYS",
    "OutputDirError",
    "atomic_file",
    "atomic_dir",
    "write_text",
    "write_json",
    "write_csv",
    "write_parquet",
    "package_versions",
    "cpu_model",
    "compute_platform",
    "git_revision",
    "git_changes",
    "code_state",
    "config_fingerprint",
    "write_manifest",
    "check_output_dir",
    "remove_temporaries",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

# Dotted config keys that say where or with what resources a run happens, never what it
# computes, so a run resumed on another machine or cluster keeps its fingerprint. Anything that
# can change numbers (num_workers, use_gpu, kmeans_shards, seeds, ...) stays in the hash, and so
# do the CPUs and GPUs of each stage: a worker, actor or shard runs floor(CPUs) torch threads
# (or a GPU), and another thread count changes the floats of its GEMMs, which training amplifies.
IGNORED_KEYS: tuple[str, ...] = (
    "output_dir",
    "name",
    "data.root",
    "data.download",
    "data.loader_workers",
    "noise.file",  # where CIFAR-N's labels are read from: run identity has a digest of them (data.noise_identity)
    "ray.address",
    "ray.num_cpus",
    "ray.object_store_memory",
    "ray.storage_path",
    "ray.extract_actors",
    "ray.log_to_driver",
    "ray.autoscaling",
    "ray.max_failures",
    "ray.extract_max_restarts",
)

# Versions recorded in every manifest: distribution name -> manifest key.
_PACKAGES = ("ray", "torch", "torchvision", "numpy", "pyarrow", "pandas", "hydra-core", "omegaconf", "pivotal_ray")

# Hidden temporaries made by this module: ".<name>.<random>.tmp". A writer killed by a signal
# can leave one behind; they are garbage, so check_output_dir does not count them as content.
_TEMP_RE = re.compile(r"^\..+\.tmp$")
# Written into an output dir by Hydra itself when hydra.run.dir points there.
_TOOL_ENTRIES = frozenset({".hydra"})


class OutputDirError(ConfigError):
    """``output_dir`` holds something other than this run; the message names the fix."""


# ------------------------------------------------------------------------------- paths


def _local_path(path: str | os.PathLike[str], what: str) -> Path:
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(f"{what}={text!r} is a storage URI, but artefacts are written to a local or "
                         "mounted filesystem: pass an absolute path (e.g. a shared volume); URIs belong "
                         "in ray.storage_path")
    return Path(text)


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists (a link to nothing counts)."""
    p = Path(os.path.abspath(path))
    return next(q for q in [p, *p.parents] if os.path.lexists(q))  # False where a folder cannot be searched


def check_writable(path: str | os.PathLike[str], setting: str) -> None:
    """ConfigError naming ``setting`` when this process could not create and write ``path`` (a
    folder): its nearest existing ancestor is a file, or not writable (permissions, a read-only
    or immutable mount), or refuses a file where the permissions say yes (a pseudo filesystem such
    as /proc, a FUSE mount: an empty ``.pivotal_ray-write-probe-*.tmp`` is created there and
    removed at once; left behind, it counts as a temporary). Nothing else is created."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        what = "a link to nothing" if existing.is_symlink() and not existing.exists() else "a file, not a folder"
        raise ConfigError(f"{setting}={os.fspath(path)} cannot be created: {existing} is {what}; "
                          f"choose another {setting}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting}={os.fspath(path)} cannot be written: {existing} is not writable by this user "
                          f"(permissions, a read-only mount or an immutable flag); choose another {setting} or "
                          f"make {existing} writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pivotal_ray-write-probe-", suffix=".tmp", dir=existing)
    except OSError as err:
        raise ConfigError(f"{setting}={os.fspath(path)} cannot be written: creating a file in {existing} failed "
                          f"({type(err).__name__}: {err.strerror or err}); choose another {setting}") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # another run's clean-up took it for a leftover temporary
        os.unlink(probe)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Some filesystems (and non-POSIX platforms) cannot open or
    # fsync a directory; the data is already fsynced, so losing only this step is acceptable.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; move it into place only on success.

    Write the file at the yielded path by any means (``torch.save``, ``pq.write_table``, ...).
    On normal exit it is fsynced and renamed over ``final_path`` (atomic on POSIX); if the body
    raises, the temporary is removed and ``final_path`` is left untouched.

    Parameters
    ----------
    final_path : path-like
        Destination file; missing parent directories are created.

    Yields
    ------
    pathlib.Path
        The temporary file (already created, empty), in the same directory as ``final_path``.
    """
    final = _local_path(final_path, "path")
    if final.is_dir():
        raise IsADirectoryError(f"{final} is a directory; pass a file path (or use atomic_dir for directories)")
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory => same filesystem, which os.replace needs to be atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes 0600 files; artefacts are meant to be read by other users of a volume.
        os.chmod(tmp, 0o644)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _write_with(final_path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    with atomic_file(final_path) as tmp:
        writer(tmp)
    return Path(os.fspath(final_path))


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path``; returns ``path``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}; use write_json for structured data")
    return _write_with(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def _to_jsonable(obj: Any) -> Any:
    """``json.dumps`` ``default=`` hook for the types artefacts carry."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensors, without importing torch
        return obj.detach().cpu().tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; convert it to plain Python "
                    "(dict/list/str/int/float/bool/None) first")


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys); returns ``path``.

    numpy scalars/arrays, paths, dataclasses, sets and torch tensors are converted. Non-finite
    floats are written as ``NaN``/``Infinity`` (Python's and pandas' readers accept them), so an
    undefined metric stays visible instead of failing the run.
    """
    # Serialise before touching the disk: a TypeError then leaves no temporary at all.
    text = json.dumps(obj, indent=indent, sort_keys=True, default=_to_jsonable) + "\n"
    return write_text(path, text)


def write_csv(path: str | os.PathLike[str], df_or_rows: pd.DataFrame | Sequence[Mapping[str, Any]], *,
              columns: Sequence[str] | None = None) -> Path:
    """Atomically write a table as CSV (no index column); returns ``path``.

    Parameters
    ----------
    path : path-like
        Destination file.
    df_or_rows : pandas.DataFrame or sequence of mappings
        The table, or its rows as dicts (one key per column).
    columns : sequence of str, optional
        Column order (and the header of an empty table). Required when ``df_or_rows`` is an empty
        sequence, so the file still says what it would hold.
    """
    if isinstance(df_or_rows, pd.DataFrame):
        df = df_or_rows if columns is None else df_or_rows.loc[:, list(columns)]
    elif isinstance(df_or_rows, (str, bytes)) or not isinstance(df_or_rows, Sequence):
        raise TypeError(f"df_or_rows must be a DataFrame or a list of dict rows, got {type(df_or_rows).__name__}")
    else:
        if not df_or_rows and columns is None:
            raise ValueError("no rows and no columns: pass columns=[...] so the CSV gets a header")
        if not all(isinstance(r, Mapping) for r in df_or_rows):
            raise TypeError("every row must be a mapping of column -> value (e.g. a dict)")
        df = pd.DataFrame.from_records(list(df_or_rows), columns=list(columns) if columns else None)
    return _write_with(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def write_parquet(path: str | os.PathLike[str], table: pa.Table | pd.DataFrame, *,
                  compression: str = "zstd") -> Path:
    """Atomically write a pyarrow Table (or a DataFrame, index dropped) as parquet; returns ``path``."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if not isinstance(table, pa.Table):
        raise TypeError(f"table must be a pyarrow.Table or pandas.DataFrame, got {type(table).__name__}")
    return _write_with(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it into place on success.

    Readers see either no directory or the complete one. If the body raises, the temporary
    directory is removed and ``final_path`` is untouched.

    Parameters
    ----------
    final_path : path-like
        The directory to create; missing parents are created.
    overwrite : bool, default False
        Replace an existing ``final_path``. The old directory is first renamed aside and deleted
        only after the new one is in place, so ``final_path`` never holds a partial directory
        (it is briefly absent). Without it an existing ``final_path`` raises FileExistsError,
        before the body runs.

    Yields
    ------
    pathlib.Path
        The empty temporary directory to fill.
    """
    final = _local_path(final_path, "path")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists: delete it, choose another path, or pass overwrite=True")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being built: delete it or choose another path")
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", suffix=".tmp", dir=final.parent))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


# ------------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that decide a run's numbers.

    Returns
    -------
    dict
        ``{"python": "3.11.9", "ray": "2.60.0", "torch": ..., "torchvision": ..., "numpy": ...,
        "pyarrow": ..., "pandas": ..., "hydra-core": ..., "omegaconf": ..., "pivotal_ray": ...}``;
        ``None`` for a package that is not installed. Read from package metadata, so nothing
        is imported.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name: the first ``model name`` line of ``cpuinfo`` on Linux (x86),
    else what :func:`platform.processor` says; ``None`` when neither names one."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def compute_platform() -> dict[str, Any]:
    """What, besides the seed, the config and the package versions, decides a run's floats.

    PyTorch picks its CPU kernels by the instruction set it finds (``torch_cpu_capability``:
    DEFAULT, AVX2, AVX512, ...) and oneDNN by the same, and a kernel of another vector width
    sums in another order. LeNet-5's forward and backward on one batch differ in their last bits
    between the DEFAULT and AVX2 kernels of one machine, and meta re-weighting at lr 0.1 grows
    such differences into different models within a few epochs; so the same seed gives the same
    picks on one kind of machine, not across kinds. Recorded in every manifest (of
    the machine that writes it, the driver's: on a cluster, the workers' nodes compute).

    The capability alone does not tell machines apart: two AVX-512 machines (the second an AMD
    EPYC; the first's model went unrecorded) trained different MNIST warm-ups from the same seed
    (docs/results.md, "Table 1 rerun on an AMD EPYC machine"), so the CPU's model name is
    recorded too.

    Returns ``{"machine": "x86_64", "cpu_model": "AMD EPYC", "cpu_count": 2,
    "torch_cpu_capability": "AVX2", "cuda_device": None}`` (``cpu_model``: see
    :func:`cpu_model`; ``cuda_device``: the name of CUDA device 0 when one is visible);
    without ``torch_cpu_capability``/``cuda_device`` when torch is not installed.
    """
    out: dict[str, Any] = {"machine": platform.machine(), "cpu_model": cpu_model(),
                           "cpu_count": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return out
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


_SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # SHA-1, or SHA-256 repositories


def _find_checkout(start: Path) -> tuple[Path, Path] | None:
    """``(checkout folder, its git dir)`` of the first ``.git`` at or above ``start``; None if there
    is none or it does not name a git dir."""
    for folder in (start, *start.parents):
        dot_git = folder / ".git"
        if dot_git.is_dir():
            return folder, dot_git
        if dot_git.is_file():  # worktrees and submodules: "gitdir: <path>"
            text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:"):].strip())
                target = target if target.is_absolute() else folder / target
                return (folder, target) if target.is_dir() else None
            return None
    return None


def _checkout_of(path: str | os.PathLike[str] | None) -> tuple[Path, Path] | None:
    """:func:`_find_checkout` of ``path``, by default of the checkout holding this package."""
    start = Path(path) if path is not None else Path(__file__).parent
    return _find_checkout(start.resolve())


def _resolve_ref(git_dir: Path, ref: str) -> str | None:
    # A linked worktree keeps its own HEAD but shares refs with the main repository.
    dirs = [git_dir]
    common = git_dir / "commondir"
    if common.is_file():
        target = Path(common.read_text(encoding="utf-8").strip())
        dirs.append(target if target.is_absolute() else git_dir / target)
    for d in dirs:
        loose = d / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8", errors="replace").strip()
            return sha if _SHA_RE.match(sha) else None
    for d in dirs:
        packed = d / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _SHA_RE.match(parts[0]):
                    return parts[0]
    return None


def git_revision(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out in the git repository containing ``path``.

    Reads ``.git`` directly (HEAD, loose refs, packed-refs, worktree links) instead of running
    ``git``, which Ray's container images often lack. cluster/runtime_env.yaml ships HEAD and
    the refs inside the job's working dir, so a Ray job can name its commit too.

    Parameters
    ----------
    path : path-like, optional
        Any path inside the checkout; default: the checkout holding this package.

    Returns
    -------
    str or None
        The commit hash, or None outside a git checkout, on a branch with no commits yet, or when
        ``.git`` cannot be read. Uncommitted changes are :func:`git_changes`'s.
    """
    try:
        found = _checkout_of(path)
        git_dir = None if found is None else found[1]
        if git_dir is None or not (git_dir / "HEAD").is_file():
            return None
        head = (git_dir / "HEAD").read_text(encoding="utf-8", errors="replace").strip()
        if head.startswith("ref:"):
            return _resolve_ref(git_dir, head[len("ref:"):].strip())
        return head if _SHA_RE.match(head) else None
    except OSError:
        return None


GIT_CHANGES_LISTED = 50  # paths a manifest lists; more are counted


def git_changes(path: str | os.PathLike[str] | None = None) -> list[str] | None:
    """Tracked files of the checkout containing ``path`` that differ from its commit.

    So a manifest says whether the code that ran is the commit it names. Runs ``git status``
    (untracked files left out: outputs and data are not code; without taking git's optional
    index lock, so another git command is never blocked).

    Parameters
    ----------
    path : path-like, optional
        Any path inside the checkout; default: the checkout holding this package.

    Returns
    -------
    list of str or None
        The changed paths, relative to the checkout, sorted (empty: the commit as it is; a
        renamed file is its old and its new path); past
        :data:`GIT_CHANGES_LISTED` paths, the rest counted in a last entry ``"... N more"``. None
        where it cannot be told: no ``git`` program (Ray's container images often lack it), not
        a checkout (a Ray job's working-dir copy ships HEAD and refs only), or git failing.
    """
    git = shutil.which("git")
    try:
        found = _checkout_of(path)
        if git is None or found is None:
            return None
        checkout, git_dir = found
        # the checkout git_revision reads, named outright (git never looks further up for another);
        # none of the caller's GIT_* settings (a hook's GIT_INDEX_FILE, ...) changes what is read
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_OPTIONAL_LOCKS": "0"}
        proc = subprocess.run([git, f"--git-dir={git_dir}", f"--work-tree={checkout}", "status", "--porcelain=v1",
                               "-z", "--untracked-files=no", "--no-renames"], cwd=checkout, capture_output=True,
                              timeout=30, check=False, stdin=subprocess.DEVNULL, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    entries = proc.stdout.decode("utf-8", errors="replace").split("\0")
    paths = []
    for entry in entries:  # "XY path"; with --no-renames a rename is its two paths, both listed
        if len(entry) > 3:
            paths.append(entry[3:])
    paths.sort()
    if len(paths) > GIT_CHANGES_LISTED:
        paths = [*paths[:GIT_CHANGES_LISTED], f"... {len(paths) - GIT_CHANGES_LISTED} more"]
    return paths


@functools.lru_cache(maxsize=1)
def _code_state() -> tuple[str | None, tuple[str, ...] | None]:
    changes = git_changes()
    return git_revision(), None if changes is None else tuple(changes)


def code_state() -> dict[str, Any]:
    """``git_revision`` and ``git_changes`` of this package's checkout, as they were the first time
    this process asked: the code it loaded, not a commit or an edit made while it ran (a
    manifest is written again when the run ends; a resumed run names the code that resumed it)."""
    revision, changes = _code_state()
    return {"git_revision": revision, "git_changes": None if changes is None else list(changes)}


# ------------------------------------------------------------------------------- fingerprint


def _plain(value: Any, where: str) -> Any:
    """A canonical plain form: dict/list/str/int/float/bool/None, integral floats as ints."""
    if type(value).__module__.split(".")[0] == "omegaconf":
        raise TypeError(f"{where} is an OmegaConf object; pass OmegaConf.to_container(cfg, resolve=True)")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"config keys must be strings, got {k!r} at {where}")
            out[k] = _plain(v, f"{where}.{k}" if where else k)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # YAML "lr: 1" and a dataclass default 1.0 are the same setting.
        return int(value) if math.isfinite(value) and value.is_integer() else value
    raise TypeError(f"config value at {where or 'top level'} has type {type(value).__name__}; "
                    "pass a resolved plain config (dicts, lists, str, numbers, bool, None)")


def _drop(cfg: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = cfg
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def config_fingerprint(config: Mapping[str, Any] | Any, *, ignore: Iterable[str] = IGNORED_KEYS) -> str:
    """A stable hash of a resolved config, blind to keys that do not change results.

    Parameters
    ----------
    config : mapping or dataclass
        A resolved, plain config (``to_dict(cfg)``, ``OmegaConf.to_container(..., resolve=True)``)
        or a config dataclass.
    ignore : iterable of str, default IGNORED_KEYS
        Dotted keys left out of the hash (output_dir, ray.address, paths and resource sizes).

    Returns
    -------
    str
        16 hex characters (64 bits of SHA-256 over canonical JSON). Independent of key order,
        tuple vs list and ``1`` vs ``1.0``.

    Raises
    ------
    TypeError
        For unresolved OmegaConf objects or values that are not plain data.
    """
    plain = _plain(config, "")
    if not isinstance(plain, dict):
        raise TypeError(f"config must be a mapping or a dataclass, got {type(config).__name__}")
    for key in ignore:
        _drop(plain, key)
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------- manifest


def manifest_status(run_dir: str | os.PathLike[str]) -> str | None:
    """``extra.status`` of the manifest.json in ``run_dir`` (``running``, ``awaiting_labels``,
    ``relabelled``, ``complete``); None when there is no readable manifest."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("extra", {}).get("status")


def write_manifest(output_dir: str | os.PathLike[str], *, config: Mapping[str, Any] | Any, seed: int,
                   timings: Mapping[str, float], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<output_dir>/manifest.json``, which names the run that owns ``output_dir``.

    Write it once when the run starts (``timings={}``) so an interrupted run can be resumed,
    and again at the end with the timings; each write atomically replaces the previous one.

    Parameters
    ----------
    output_dir : path-like
        The run's output directory (created if missing).
    config : mapping or dataclass
        The resolved config (``to_dict(cfg)``).
    seed : int
        The experiment seed.
    timings : mapping of str to float
        Seconds per stage, e.g. ``{"warmup_train_s": 81.2, "total_s": 140.0}``.
    extra : mapping, optional
        Anything else worth keeping (cluster resources, notes); stored under ``"extra"``.

    Returns
    -------
    pathlib.Path
        The manifest's path. Its keys: format, created (UTC, ISO 8601), fingerprint, seed,
        config, timings, versions, git_revision, git_changes (:func:`git_changes`: the tracked
        files that differ from that commit, None where that cannot be told; both as this process
        first saw them, :func:`code_state`), host, platform (:func:`compute_platform`), extra.
    """
    out = _local_path(output_dir, "output_dir")
    plain = _plain(config, "")
    bad = {k: v for k, v in dict(timings).items()
           if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, np.number))}
    if bad:
        raise TypeError(f"timings must map stage names to seconds, got {bad!r}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": config_fingerprint(plain),
        "seed": int(seed),
        "config": plain,
        "timings": {k: float(v) for k, v in timings.items()},
        "versions": package_versions(),
        **code_state(),
        "host": platform.node(),
        "platform": compute_platform(),
        "extra": dict(extra or {}),
    }
    return write_json(out / MANIFEST_NAME, manifest)


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def _describe_diff(old: Any, new: dict[str, Any], limit: int = 5) -> str:
    if not isinstance(old, dict):
        return ""
    ignored = set(IGNORED_KEYS)
    a, b = _flatten(old), _flatten(new)
    absent = object()
    keys = sorted(k for k in set(a) | set(b) if a.get(k, absent) != b.get(k, absent) and k not in ignored)
    if not keys:
        return ""

    def value(side: dict[str, Any], k: str) -> str:  # a run's identity leaves out defaults and what it does not use
        return repr(side[k]) if k in side else "(not set: its default, or not used by that method)"

    shown = ", ".join(f"{k}: {value(a, k)} -> {value(b, k)}" for k in keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f" Differences: {shown}{more}."


def check_output_dir(output_dir: str | os.PathLike[str], *, config: Mapping[str, Any] | Any,
                     normalise: Callable[[dict[str, Any], dict[str, Any]], Mapping[str, Any]] | None = None,
                     inputs: Sequence[str] = ()) -> None:
    """Refuse an ``output_dir`` that holds another run; allow a new, empty or same-run one.

    Passes when ``output_dir`` is missing or empty, or when its ``manifest.json`` has the same
    :func:`config_fingerprint` as ``config`` (the same run, which may then resume). Leftover
    temporaries of this module and Hydra's ``.hydra/`` do not count as content.

    Parameters
    ----------
    output_dir : path-like
        Where the run will write.
    config : mapping or dataclass
        The resolved config of the run about to start.
    normalise : callable, optional
        ``normalise(recorded config, whole manifest)``, applied before comparing, e.g. a round trip
        through the config dataclasses, so a run recorded before a setting existed matches when
        that setting is at its default (the manifest: what the run recorded beside its config). A
        recorded config it cannot take (it raises) is compared as recorded.
    inputs : names of entries the run reads, put there before it starts (a person's labels
        file): they do not count as content.

    Raises
    ------
    OutputDirError
        If ``output_dir`` is a file, holds the manifest of a different run (the message lists
        the differing keys), holds an unreadable manifest, or holds files but no manifest. The
        fix, in each case: choose another output_dir or delete the existing one. Also raised
        for a storage URI (artefacts need a local or mounted path).
    """
    try:
        out = _local_path(output_dir, "output_dir")
    except ValueError as err:
        raise OutputDirError(str(err)) from None
    fix = f"choose another output_dir or delete {out}"
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a directory: {fix}")
    manifest = out / MANIFEST_NAME
    if not manifest.exists():
        content = sorted(p.name for p in out.iterdir()
                         if not _TEMP_RE.match(p.name) and p.name not in _TOOL_ENTRIES and p.name not in inputs)
        if content:
            shown = ", ".join(content[:5]) + (f" (+{len(content) - 5} more)" if len(content) > 5 else "")
            raise OutputDirError(f"output_dir {out} already holds files ({shown}) but no {MANIFEST_NAME}, so "
                                 f"they cannot be matched to this run: {fix}")
        return
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise OutputDirError(f"{manifest} cannot be read ({err}): {fix}") from err
    new_plain = _plain(config, "")
    ours = config_fingerprint(new_plain)
    # Recompute from the recorded config when there is one, so a change to IGNORED_KEYS does not
    # orphan older runs; fall back to the recorded fingerprint.
    theirs_config = recorded.get("config")
    if isinstance(theirs_config, dict):
        if normalise is not None:
            try:
                theirs_config = normalise(dict(theirs_config), recorded)
            except (ValueError, TypeError, KeyError):
                pass  # e.g. a setting that no longer exists: compare as recorded (and differ)
        theirs = config_fingerprint(theirs_config)
    else:
        theirs = recorded.get("fingerprint")
    if theirs != ours:
        raise OutputDirError(f"output_dir {out} holds a different run (fingerprint {theirs}, this run {ours})."
                             f"{_describe_diff(theirs_config, new_plain)} To keep both, {fix}")


# The feature table's temporary folder before it was named like the others: ".<name>.tmp-<hex8>"
_OLD_TABLE_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")
# Where a run's writers put files: output_dir itself and rounds/round_<r>/ (depth 2). Deeper
# folders (parquet tables) are not walked: slow on network storage; nor is ray_train/, Ray
# Train's (the default ray.storage_path), where a run sharing it may be writing.
_TEMP_DEPTH = 2
_NOT_OURS = frozenset({"ray_train"})


def _is_temporary(name: str) -> bool:
    return bool(_TEMP_RE.match(name) or _OLD_TABLE_TEMP_RE.match(name))


def remove_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries (``.<name>.<random>.tmp``, files or folders) that writers killed
    mid-write left in ``root`` or the round folders below it; returns what went. Call it only where
    no writer of this run is at work (a job before it starts its stages)."""
    root = Path(root)
    gone: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        for name in filter(_is_temporary, [*filenames, *dirnames]):
            path = Path(dirpath) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
        # not into what went, below the round folders, or into ray_train/
        dirnames[:] = [] if depth >= _TEMP_DEPTH else [
            d for d in dirnames if not _is_temporary(d) and not (depth == 0 and d in _NOT_OURS)]
    return gone
