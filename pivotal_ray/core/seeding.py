"""Seeds derived per stage and worker from one experiment seed; no global RNG anywhere."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def derive_seed(seed: int, *names: object) -> int:
    """A stable 63-bit seed for a named stage, e.g. ``derive_seed(0, "warmup")`` or ``(0, "round", 1)``."""
    h = hashlib.sha256(repr((int(seed),) + tuple(str(n) for n in names)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, *names: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *names))


def torch_generator(seed: int, *names: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


def tf32_in_use(device: torch.device) -> dict[str, bool] | None:
    """Whether this process lets convolutions (cuDNN) and matmuls (cuBLAS) on ``device`` round
    through TF32 (10-bit mantissa on Ampere and later GPUs: other floats than float32's, so the
    same seed gives other weights and picks); None on a CPU, which has no TF32. PyTorch's
    defaults: convolutions yes, matmuls no; ``ray.deterministic`` turns both off."""
    if device.type != "cuda":
        return None
    return {"conv": bool(torch.backends.cudnn.allow_tf32), "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def deterministic_kernels() -> None:
    """Make this process pick deterministic kernels where PyTorch has them (``ray.deterministic``).

    ``torch.use_deterministic_algorithms(True, warn_only=True)``: ops with a deterministic
    implementation use it (on CUDA, e.g. ``index_add_`` and convolution backward), one without
    warns and runs as before; cuDNN without autotuning; no TF32 in matmuls and convolutions (its
    rounding differs from float32's); ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when
    it creates its handle, so this must run before the process's first GPU matmul; a value set
    already is kept). On CPUs PyTorch's kernels are deterministic already: the same floats.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
