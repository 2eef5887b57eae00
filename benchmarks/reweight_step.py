"""Benchmark 1: meta re-weighting step / plain SGD step, same model, same batch (issue 4, item 1).

LeNet-5 (1x28x28, 10 classes) at batch 4096 and the CIFAR ResNet-18 (3x32x32, 100 classes) at
batch 128; meta batch 100 (``reweight.meta_batch_size``); modes ``direct`` and ``l2rw``
(:mod:`pivotal_ray.core.reweight`). The plain step is what a trainer without re-weighting does:
train-mode forward, mean cross-entropy, backward, ``SGD.step``. Time: median of interleaved
repeats. Memory: peak above the resting state during one step (see ``_common.peak_memory``).
Also timed, to locate the cost: an eval forward (no grad), the forward-mode JVP of eq. S4
(``per_sample_grad_dot``) alone, and the l2rw step forced to each of its two forms (the same
floats): ``l2rw_one_pass``, the real forward and the JVP as one dual-tensor pass, and
``l2rw_two_pass``, a forward and then the JVP. ``l2rw`` is the form the mode picks for the model
(one pass unless it has normalisation layers).

Two other ways to the direct mode's per-sample inner products ``<v, grad f_j>``, timed here as
whole direct steps (not used by the package): ``direct_double_backward`` takes the first backward
with ``create_graph=True`` and the weights as leaves, then the gradient of ``<v, g(w)>`` with
respect to them (the route of the published implementations); ``direct_finite_difference``
takes ``(f_j(theta + e v) - f_j(theta - e v)) / 2e`` from two no-grad forwards (``e`` =
``FD_STEP`` / ``||v||``). ``dots_error`` reports each route's largest deviation from the JVP's
inner products, relative to their largest magnitude, on the benchmark's batch and the freshly
initialised model, for a random ``v``.

    python -m benchmarks.reweight_step --size full --out benchmarks/results/reweight_step.jsonl

Target (issue 4): time ratio <= 2.0 (published implementations take about 3x).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pivotal_ray.core.models import build_model
from torch.func import functional_call

from pivotal_ray.core.reweight import (LocalReducer, _apply_step, _buffer_copies, _unflat, build_reweighter,
                                       meta_gradient, per_sample_grad_dot)

from . import _common

MODELS = {  # name -> (model spec, classes, {size: (input shape, batch)})
    "lenet5": ({"name": "lenet5"}, 10, {"full": ((1, 28, 28), 4096), "tiny": ((1, 28, 28), 64)}),
    # tiny: 8x8 inputs reach layer4 at 1x1 (the CIFAR stem has no stride), 1/16 of the 32x32 cost
    "resnet18_cifar": ({"name": "resnet18_cifar"}, 100, {"full": ((3, 32, 32), 128), "tiny": ((3, 8, 8), 2)}),
}
META_BATCH = {"full": 100, "tiny": 4}
FD_STEP = 1e-3  # the finite difference's step along v / ||v||, in parameter space
LR, META_LR = 0.1, 100.0  # every step's learning rate; the direct mode's meta learning rate


def _g_with_graph(model, params, x, y, w, global_batch):
    """(losses, the weights as leaves, g(w)) with the graph of g kept for a second differentiation."""
    wl = w.detach().clone().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    return losses, wl, torch.autograd.grad((wl * losses).sum() / global_batch, params, create_graph=True)


def _dots_double_backward(g, wl, v, global_batch):
    """<v, grad f_j> as global_batch x d<v, g(w)>/dw_j (g, wl from :func:`_g_with_graph`)."""
    inner = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return torch.autograd.grad(inner, wl, retain_graph=True)[0] * global_batch


@torch.no_grad()
def _dots_finite_difference(model, named, x, y, v):
    """<v, grad f_j> as the central difference of the losses along v (two forwards, no grad)."""
    eps = FD_STEP / float(torch.sqrt(sum((t.double() ** 2).sum() for t in v)))
    buffers = _buffer_copies(model)  # running statistics untouched, as in the JVP
    out = []
    for sign in (1.0, -1.0):
        shifted = {k: p + sign * eps * t for (k, p), t in zip(named.items(), v)}
        out.append(F.cross_entropy(functional_call(model, (shifted, buffers), (x,)), y, reduction="none"))
    return (out[0] - out[1]) / (2 * eps)


def _direct_step(s: dict[str, Any], route: str) -> None:
    """One direct step (core.reweight.DirectReweighter's, single process) with the dots by ``route``."""
    model, x, y, w, b, lr = s["model"], s["x"], s["y"], s["w"], s["batch"], LR
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    if route == "double_backward":
        losses, wl, g = _g_with_graph(model, params, x, y, w, b)
    else:
        losses = F.cross_entropy(model(x), y, reduction="none")
        g = torch.autograd.grad((w * losses).sum() / b, params, retain_graph=True)
    with torch.no_grad():
        theta_hat = {k: p - lr * gk.detach() for (k, p), gk in zip(named.items(), g)}
    v, _ = meta_gradient(model, theta_hat, s["xm"], s["ym"], reducer=LocalReducer())
    v = _unflat(v, params)
    if route == "double_backward":
        dots = _dots_double_backward(g, wl, v, b)
    else:
        dots = _dots_finite_difference(model, named, x, y, v)
    new_w = (w - META_LR * (-(lr / b) * dots)).clamp(0.0, 1.0)
    _apply_step((new_w.detach() * losses).sum() / b, params, s["opt"], LocalReducer())


def dots_error(s: dict[str, Any]) -> dict[str, float]:
    """Largest |route - JVP| of the inner products, over the largest |JVP|, for a random v."""
    model, x, y, w, b = s["model"], s["x"], s["y"], s["w"], s["batch"]
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    v = _unflat(torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
                .to(x.device), params)
    ref = per_sample_grad_dot(model, named, x, y, v).double()
    _, wl, g = _g_with_graph(model, params, x, y, w, b)
    dbl = _dots_double_backward(g, wl, v, b).detach().double()
    fd = _dots_finite_difference(model, named, x, y, v).double()
    scale = float(ref.abs().max()) or float("nan")  # 0: every sample's gradient vanished
    return {"double_backward": float((dbl - ref).abs().max()) / scale,
            "finite_difference": float((fd - ref).abs().max()) / scale}


def _setup(name: str, size: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    spec, C, sizes = MODELS[name]
    shape, b = sizes[size]
    m = META_BATCH[size]
    g = torch.Generator().manual_seed(seed)
    model = build_model(spec, C, shape, seed=seed).to(device).train()
    return {
        "model": model, "batch": b, "meta_batch": m,
        "opt": torch.optim.SGD(model.parameters(), lr=LR, momentum=0.8 if name.startswith("resnet") else 0.0),
        "x": torch.randn((b, *shape), generator=g).to(device),
        "y": torch.randint(0, C, (b,), generator=g).to(device),
        "w": torch.ones(b, device=device),
        "xm": torch.randn((m, *shape), generator=g).to(device),
        "ym": torch.randint(0, C, (m,), generator=g).to(device),
    }


def _steps(s: dict[str, Any]) -> dict[str, Any]:
    model, opt = s["model"], s["opt"]
    rw = {mode: build_reweighter(mode, meta_lr=META_LR) for mode in ("direct", "l2rw")}
    rw |= {f"l2rw_{form}_pass": build_reweighter("l2rw", one_pass=form == "one") for form in ("one", "two")}

    def plain() -> None:
        loss = F.cross_entropy(model(s["x"]), s["y"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def meta(mode: str):
        def step() -> None:
            rw[mode].step(model=model, optimizer=opt, x=s["x"], y=s["y"], w=s["w"], x_meta=s["xm"], y_meta=s["ym"],
                          lr=LR, global_batch=s["batch"], reducer=LocalReducer())
        return step

    params = [p for p in model.parameters() if p.requires_grad]
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    v = _unflat(torch.randn(sum(p.numel() for p in params), device=s["x"].device), params)

    @torch.no_grad()
    def forward() -> None:
        model(s["x"])

    def jvp() -> None:
        per_sample_grad_dot(model, named, s["x"], s["y"], v)

    return {"sgd": plain, "direct": meta("direct"), "l2rw": meta("l2rw"), "l2rw_one_pass": meta("l2rw_one_pass"),
            "l2rw_two_pass": meta("l2rw_two_pass"), "eval_forward": forward, "jvp": jvp,
            "direct_double_backward": lambda: _direct_step(s, "double_backward"),
            "direct_finite_difference": lambda: _direct_step(s, "finite_difference")}


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    repeats = args.repeats or (5 if args.size == "full" else 1)
    results: dict[str, Any] = {}
    for name in args.models:
        s = _setup(name, args.size, device)
        fns = _steps(s)
        t = _common.interleaved(fns, repeats=repeats, device=device, warmup=1 if args.size == "full" else 0)
        mem = {}
        for k in ("sgd", "direct", "l2rw", "l2rw_one_pass", "l2rw_two_pass", "direct_double_backward",
                  "direct_finite_difference"):  # one step each, after the warm-up
            with _common.peak_memory(device) as pm:
                fns[k]()
                _common.sync(device)
            mem[k] = pm["peak"]
        r = {"batch": s["batch"], "meta_batch": s["meta_batch"], "seconds": t, "peak_bytes": mem,
             "memory_method": pm["method"],
             "time_ratio_direct": t["direct"] / t["sgd"], "time_ratio_l2rw": t["l2rw"] / t["sgd"],
             "mem_ratio_direct": mem["direct"] / max(mem["sgd"], 1), "mem_ratio_l2rw": mem["l2rw"] / max(mem["sgd"], 1),
             "l2rw_one_pass_over_two_pass": {"time": t["l2rw_one_pass"] / t["l2rw_two_pass"],
                                             "peak_memory": mem["l2rw_one_pass"] / max(mem["l2rw_two_pass"], 1)},
             "jvp_over_eval_forward": t["jvp"] / t["eval_forward"],
             "direct_routes_over_sgd": {k: t[f"direct_{k}"] / t["sgd"] for k in ("double_backward", "finite_difference")},
             "direct_routes_peak_over_sgd": {k: mem[f"direct_{k}"] / max(mem["sgd"], 1)
                                             for k in ("double_backward", "finite_difference")},
             "dots_error": dots_error(_setup(name, args.size, device)),  # a fresh model: the steps fit the tiny batch
             "sgd_over_eval_forward": t["sgd"] / t["eval_forward"]}
        results[name] = r
        print(f"{name} batch {s['batch']}: sgd {t['sgd']*1e3:.1f} ms, direct {t['direct']*1e3:.1f} ms, "
              f"l2rw {t['l2rw']*1e3:.1f} ms (one pass {t['l2rw_one_pass']*1e3:.1f}, two {t['l2rw_two_pass']*1e3:.1f}), "
              f"eval fwd {t['eval_forward']*1e3:.1f} ms, jvp {t['jvp']*1e3:.1f} ms")
        print("  " + _common.fmt_ratio("time direct/sgd", r["time_ratio_direct"], "<= 2.0") + "; "
              + _common.fmt_ratio("time l2rw/sgd", r["time_ratio_l2rw"], "<= 2.0"))
        print(f"  peak memory (MiB) sgd {mem['sgd']/2**20:.1f}, direct {mem['direct']/2**20:.1f}, "
              f"l2rw {mem['l2rw']/2**20:.1f} (one pass {mem['l2rw_one_pass']/2**20:.1f}, two "
              f"{mem['l2rw_two_pass']/2**20:.1f}); ratio direct {r['mem_ratio_direct']:.2f}, l2rw {r['mem_ratio_l2rw']:.2f}")
        q = r["l2rw_one_pass_over_two_pass"]
        print(f"  l2rw one pass / two passes: time {q['time']:.2f}, peak memory {q['peak_memory']:.2f}")
        a, pk, e = r["direct_routes_over_sgd"], r["direct_routes_peak_over_sgd"], r["dots_error"]
        print(f"  direct with the dots by double backward: time/sgd {a['double_backward']:.2f}, peak/sgd "
              f"{pk['double_backward']:.2f}, error {e['double_backward']:.1e}; by finite difference: time/sgd "
              f"{a['finite_difference']:.2f}, peak/sgd {pk['finite_difference']:.2f}, error {e['finite_difference']:.1e}")
        del s, fns
    return _common.write_result(args, "reweight_step", device, results, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
