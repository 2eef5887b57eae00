"""Benchmark 2: RBC extraction through Ray Data / a bare eval-mode forward pass (issue 4, item 2).

The same candidates, the same K snapshot models, the same resources: ``extract_features`` with
one actor of ``--extract-cpus`` Ray CPUs (the pipeline's ``ray.extract_actors=1``,
``ray.extract_cpus``; the actor runs ``max(1, floor(cpus))`` torch threads) against, in this
process with the same thread count, a loop over the same batches that builds the inputs
(``split.inputs``) and runs every snapshot model's eval forward (``rbc_factors``, no Ray, no
parquet). The Ray time is the whole call: actor start, data bundle and model loading in the actor,
Arrow conversion, parquet write and the row-count check; the bare loop has its bundle and models
ready. Throughput is rows/s with K rows per sample.

Full size: MNIST train split (60000 samples), LeNet-5, K = 5 snapshots (untrained weights,
different seeds: the cost does not depend on the values), batch 1024. Tiny: the toy set, an MLP,
K = 2.

    python -m benchmarks.extract_ray --size full --out benchmarks/results/extract_ray.jsonl

Target (issue 4): Ray / bare <= 1.3.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _common

DATA_ROOT = os.environ.get("PIVOTAL_SHARED_DATA", str(_common.REPO.parent / "shared" / "data"))
SIZES = {
    "full": dict(data={"name": "mnist", "root": DATA_ROOT}, model={"name": "lenet5"}, K=5, batch=1024),
    "tiny": dict(data={"name": "toy"}, model={"name": "mlp", "hidden": 8, "depth": 2}, K=2, batch=128),
}


def run(args) -> dict[str, Any]:
    import ray

    from pivotal_ray.config import DataConfig, NoiseConfig, to_dict
    from pivotal_ray.core.data import build_data
    from pivotal_ray.core.features import rbc_factors
    from pivotal_ray.core.models import build_model
    from pivotal_ray.distributed.extract import extract_features

    device = _common.setup(args)
    cfg = SIZES[args.size]
    data_cfg = to_dict(DataConfig(**cfg["data"]))
    noise_cfg = to_dict(NoiseConfig(kind="none", rate=0.0))
    data_spec = {"data": data_cfg, "noise": noise_cfg, "seed": 0}
    bundle = build_data(data_cfg, noise_cfg, 0)
    ids = bundle.train.sample_id
    threads = max(1, math.floor(args.extract_cpus))
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    started = _common.ray_init()
    try:
        snapshots, models = [], []
        for k in range(cfg["K"]):
            model = build_model(cfg["model"], bundle.num_classes, bundle.input_shape, seed=100 + k).eval()
            d = work / f"checkpoint_{k:06d}"
            d.mkdir()
            torch.save(model.state_dict(), d / "model.pt")
            snapshots.append({"path": str(d), "epoch": 2 * k})
            models.append(model.to(device))  # the bare forward on the device the actor uses

        def bare() -> None:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for s in range(0, len(ids), cfg["batch"]):
                    x = bundle.train.inputs(bundle.train.positions_of(ids[s:s + cfg["batch"]]), augment=False)
                    x = x.to(device)
                    for m in models:
                        A, xt = rbc_factors(m, x, label_aware=False)
                        A.cpu(), xt.cpu()  # the actor hands its rows back on the host, as numpy
            finally:
                torch.set_num_threads(prev)

        def through_ray(sample_ids: np.ndarray = ids) -> None:
            out = work / f"features_{time.perf_counter_ns()}"
            extract_features(data_spec=data_spec, model_spec=cfg["model"], snapshots=snapshots, sample_ids=sample_ids,
                             feature_spec={"kind": "rbc"}, output_path=str(out), num_actors=1,
                             num_cpus=args.extract_cpus, num_gpus=1.0 if device.type == "cuda" else 0.0,
                             batch_size=cfg["batch"])
            shutil.rmtree(out, ignore_errors=True)

        repeats = args.repeats or (2 if args.size == "full" else 1)
        # warm-up: Ray Data's first dataset in a session pays one-off start costs; not per round
        fns = {"ray": through_ray, "bare": bare}
        if args.size == "full":  # one batch through Ray: the fixed cost per call (actor, bundle, models)
            fns["ray_one_batch"] = lambda: through_ray(ids[:cfg["batch"]])
        t = _common.interleaved(fns, repeats=repeats, device=device, warmup=1 if args.size == "full" else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:
            ray.shutdown()
    rows = cfg["K"] * len(ids)
    res = {"n": int(len(ids)), "K": cfg["K"], "rows": rows, "batch": cfg["batch"], "extract_cpus": args.extract_cpus,
           "threads": threads, "seconds": t, "rows_per_s": {k: rows / v for k, v in t.items()},
           "ratio_ray_over_bare": t["ray"] / t["bare"]}
    if "ray_one_batch" in t:  # per-row cost through Ray once the fixed cost is paid
        marginal = (t["ray"] - t["ray_one_batch"]) / (rows - cfg["K"] * cfg["batch"]) * rows
        res["ray_fixed_s"] = t["ray_one_batch"]
        res["ratio_marginal_ray_over_bare"] = marginal / t["bare"]
        print(f"  fixed cost per call (one batch through Ray) {t['ray_one_batch']:.2f} s; marginal Ray / bare "
              f"{res['ratio_marginal_ray_over_bare']:.3f}")
    print(f"n={len(ids)} K={cfg['K']} ({rows} rows), 1 actor x {args.extract_cpus} CPU, {threads} thread(s): "
          f"Ray Data {t['ray']:.2f} s ({rows / t['ray']:.0f} rows/s), bare forward {t['bare']:.2f} s "
          f"({rows / t['bare']:.0f} rows/s)")
    print("  " + _common.fmt_ratio("Ray / bare", res["ratio_ray_over_bare"], "<= 1.3"))
    return _common.write_result(args, "extract_ray", device, res, repeats=repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--extract-cpus", type=float, default=1.0, help="Ray CPUs of the one extraction actor")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
