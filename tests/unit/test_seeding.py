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


def _fresh_python(code: str, workspace: str | None = None) -> list[str]:
    """``code`` in a new interpreter (deterministic kernels are process-wide settings), with
    CUBLAS_WORKSPACE_CONFIG set to ``workspace`` (None: unset); its stdout's words."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if workspace is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = workspace
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


STATE = ("import os, torch; print(torch.are_deterministic_algorithms_enabled(), "
         "torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark, "
         "torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, "
         "os.environ.get('CUBLAS_WORKSPACE_CONFIG'))")
SET = "from pivotal_ray.core.seeding import deterministic_kernels; deterministic_kernels(); "


def test_deterministic_kernels_sets_every_switch_and_keeps_a_given_workspace():
    """ray.deterministic's switches, from PyTorch's defaults and from every switch turned the other
    way first (so each assignment is seen to happen); a cuBLAS workspace set already is kept."""
    other = ("torch.backends.cudnn.benchmark = True; torch.backends.cuda.matmul.allow_tf32 = True; "
             "torch.backends.cudnn.allow_tf32 = True; ")
    words = _fresh_python(STATE + "; " + other + STATE + "; " + SET + STATE)
    assert words[:4] == ["False", "False", "False", "False"]  # PyTorch's defaults
    assert words[7 + 2:7 + 6] == ["True", "False", "True", "True"]  # turned the other way
    assert words[14:] == ["True", "True", "False", "True", "False", "False", ":4096:8"]
    assert _fresh_python(SET + STATE, workspace=":16:8")[-1] == ":16:8"


def test_tf32_in_use_reads_the_process_switches_on_a_gpu_only(monkeypatch):
    """What a Train worker records per epoch (``tf32``): None on a CPU; on CUDA the cuDNN and
    cuBLAS TF32 switches as they stand (no GPU needed to read them), off after
    deterministic_kernels (ray.deterministic)."""
    import torch

    from pivotal_ray.core.seeding import deterministic_kernels, tf32_in_use

    assert tf32_in_use(torch.device("cpu")) is None
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # deterministic_kernels sets it: put back after
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for c, m in ((True, False), (False, True)):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = c, m
            assert tf32_in_use(torch.device("cuda", 0)) == {"conv": c, "matmul": m}
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        state = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                 torch.backends.cudnn.deterministic)
        try:
            deterministic_kernels()
            assert tf32_in_use(torch.device("cuda")) == {"conv": False, "matmul": False}
        finally:
            torch.use_deterministic_algorithms(state[0])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = state[1:]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm
