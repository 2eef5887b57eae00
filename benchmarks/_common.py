"""Shared helpers of the benchmark scripts: argument parsing, timing, peak memory, result files.

Every benchmark is ``python -m benchmarks.<name> [--size tiny|full] [--device cpu|cuda]
[--threads N] [--out PATH]``; it prints one line per measurement and, given ``--out``, appends one
JSON object (``{"benchmark", "size", "device", "machine", ..., "results": {...}}``) as a line to
that file (``benchmarks/results/<name>.jsonl`` holds the runs quoted in docs/performance.md).
Speed is judged by ratios measured in the same process (the machines are shared and noisy), so
the timed alternatives are interleaved and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=("tiny", "full"), default="full",
                   help="tiny: a few seconds, for CI; full: the shapes of docs/performance.md")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, i.e. all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default by size)")
    p.add_argument("--out", default=None,
                   help="JSON-lines file the result object is appended to (default: print only, write nothing)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch on this machine")
    return torch.device(args.device)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg_1m": os.getloadavg()[0], "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns so load changes hit all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ---- peak memory -------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_MMAP_FIXED = False


def _fix_mmap_threshold() -> None:
    """Large blocks go straight to mmap and back to the OS on free (glibc's dynamic threshold
    would otherwise keep freed tensors in the heap, and a later peak would reuse them unseen)."""
    global _MMAP_FIXED
    libc = _libc()
    if libc is not None and not _MMAP_FIXED:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 17)
        _MMAP_FIXED = True


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak memory of the block above what was allocated when it started, in bytes: ``out["peak"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry. CPU: the process's
    resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
    resident set at entry, with glibc's mmap threshold fixed at 128 KiB and the heap trimmed first
    so freed tensors are returned to the OS. It counts everything the block touches (autograd
    graph, temporaries, allocator slack), not just tensors.
    """
    out: dict[str, int] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = int(torch.cuda.max_memory_allocated(device) - base)
        out["method"] = "cuda_max_memory_allocated"  # type: ignore[assignment]
        return
    _fix_mmap_threshold()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    base = _status_kib("VmRSS")
    yield out
    out["peak"] = int((_status_kib("VmHWM") - base) * 1024)
    out["method"] = "cpu_vmhwm_delta"  # type: ignore[assignment]


# ---- results -----------------------------------------------------------------------------------

def write_result(args: argparse.Namespace, name: str, device: torch.device, results: dict[str, Any],
                 **extra: Any) -> dict[str, Any]:
    rec = {"benchmark": name, "size": args.size, "device": str(device), "machine": machine(device),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra, "results": results}
    if args.out is None:
        print(f"[{name}] not saved (no --out)")
        return rec
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(rec, default=float) + "\n")
    print(f"[{name}] wrote {out}")
    return rec


def fmt_ratio(name: str, value: float, target: str) -> str:
    return f"{name}: {value:.3f} (target {target})"


# ---- Ray ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def ray_init(num_cpus: int = 2, object_store_mb: int = 600) -> bool:
    """Start a local Ray session unless one is up (e.g. the tests' session); True if started here."""
    import ray

    from pivotal_ray.pipeline import RAY_ENV_VARS

    if ray.is_initialized():
        return False
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **RAY_ENV_VARS}})
    return True
