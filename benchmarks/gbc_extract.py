"""Benchmark 6: GBC per-sample gradient extraction / plain backward over the same data (issue 4, item 6).

LeNet-5 on MNIST-shaped inputs, ``GBCExtractor`` with the paper's R = 5 drawn tensors and
``proj_dim`` = 4096 (count-sketch): ``extract(x, y)`` (per-sample gradients of the drawn tensors
by ``vmap(grad)``, scaling, projection of blocks longer than proj_dim, copy to the output row) vs
a plain eval-mode forward + backward of the summed label-free loss over the same batch (what one
training step's gradient costs). The projection's share is the time spent inside the projection
function (wrapped with a timer) divided by the extraction time. ``fit`` (the importances A^(l),
one backward per batch) is timed as well.

    python -m benchmarks.gbc_extract --size full --out benchmarks/results/gbc_extract.jsonl

Target (issue 4): extraction / plain backward <= 3.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pivotal_ray.config import FeatureConfig
from pivotal_ray.core.gbc import GBCExtractor, label_free_loss
from pivotal_ray.core.models import build_model

from . import _common

SIZES = {"full": dict(n=2048, batch=1024), "tiny": dict(n=32, batch=16)}


def run(args) -> dict[str, Any]:
    device = _common.setup(args)
    repeats = args.repeats or (3 if args.size == "full" else 1)
    cfg = SIZES[args.size]
    g = torch.Generator().manual_seed(0)
    model = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=0).to(device).eval()
    xs = torch.randn((cfg["n"], 1, 28, 28), generator=g).to(device)
    ys = torch.randint(0, 10, (cfg["n"],), generator=g).to(device)
    batches = [(xs[s:s + cfg["batch"]], ys[s:s + cfg["batch"]]) for s in range(0, cfg["n"], cfg["batch"])]
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=5, proj_dim=4096), seed=0)
    t_fit = _common.timed(lambda: ext.fit(batches), device)

    proj = {"s": 0.0, "calls": 0}
    inner = ext._project

    def timed_project(blk: torch.Tensor, **kw: Any) -> torch.Tensor:
        _common.sync(device)
        t0 = time.perf_counter()
        out = inner(blk, **kw)
        _common.sync(device)
        proj["s"] += time.perf_counter() - t0
        proj["calls"] += 1
        return out

    ext._project = timed_project

    def extract() -> None:
        for x, y in batches:
            ext.extract(x, y)

    params = [p for p in model.parameters() if p.requires_grad]

    def backward() -> None:
        for x, _ in batches:
            loss = label_free_loss(model(x)).sum()
            torch.autograd.grad(loss, params)

    t = _common.interleaved({"extract": extract, "backward": backward}, repeats=repeats, device=device,
                            warmup=1 if args.size == "full" else 0)
    proj["s"], proj["calls"] = 0.0, 0
    t_ext = _common.timed(extract, device)  # one more pass, projection timed alone
    res = {**cfg, "num_layers": 5, "proj_dim": 4096, "drawn": list(ext.draws.names), "width": ext.width,
           "seconds": t, "fit_s": t_fit, "ratio_extract_over_backward": t["extract"] / t["backward"],
           "projection_share": proj["s"] / t_ext, "projection_calls_per_pass": proj["calls"],
           "fit_over_backward": t_fit / t["backward"]}
    print(f"n={cfg['n']} batch={cfg['batch']} drawn={list(ext.draws.names)}: extract {t['extract']*1e3:.0f} ms, "
          f"plain fwd+bwd {t['backward']*1e3:.0f} ms, fit {t_fit*1e3:.0f} ms")
    print("  " + _common.fmt_ratio("extract/backward", res["ratio_extract_over_backward"], "<= 3.0")
          + f"; projection share {res['projection_share']:.3f} ({proj['calls']} projections per pass)")
    return _common.write_result(args, "gbc_extract", device, res, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
