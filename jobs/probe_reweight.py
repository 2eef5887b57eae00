"""Probe a re-weighting mode on MNIST without Ray: per-epoch val/test accuracy and mean weights.

    python -m jobs.probe_reweight --mode l2rw --batch 1024 --epochs 12 --momentum 0 --meta-lr 0
    python -m jobs.probe_reweight --mode direct --batch 1024 --epochs 12 --momentum 0 --meta-lr 300

60% adversarial noise, LeNet-5, SGD lr 0.1, the same 10 random meta samples as the warm-up of
``experiment=mnist_adv60`` (seed 0), or a finished run's meta set (``--meta-from``). Prints one
line per epoch: ``ep E val V acc A [ema E] w_clean WC w_noisy WN Ts`` (validation and test
accuracy as the pipeline splits them, the weight average's test accuracy with ``--ema``, and the
mean learned weight of clean / noisy training samples). ``--train-seed`` changes only the model
init and batch order, to measure run-to-run noise on a fixed meta set. Used to choose the MNIST
re-weighting mode and batch size (docs/results.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pivotal_ray.config import DataConfig, ExperimentConfig, ModelConfig, NoiseConfig, SelectionConfig
from pivotal_ray.core.data import build_data
from pivotal_ray.core.models import build_model
from pivotal_ray.core.reweight import LocalReducer, build_reweighter
from pivotal_ray.training import warmup_ids


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="direct")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--meta-lr", type=float, default=300.0)
    ap.add_argument("--milestones", type=int, nargs="*", default=[], help="epochs where lr is cut by 10")
    ap.add_argument("--cosine", action="store_true", help="cosine-anneal lr to 0 over --epochs (ignores --milestones)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--balanced-meta", action="store_true", help="class-balanced meta loss (l2rw)")
    ap.add_argument("--meta-from", default=None,
                    help="a finished run's selection.csv: use its meta set (cleaned labels) instead of the warm-up draw")
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seed of the model init (default: --seed, which also draws the noise and the meta set)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="also report the accuracy of an exponential moving average of the weights (decay per step)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 each when two probes share 2 cores)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data, noise = DataConfig(name="mnist", root=a.root), NoiseConfig(kind="adversarial", rate=0.6)
    b = build_data(data, noise, a.seed)
    tr = b.train
    n = len(tr)
    X, Xt = tr.inputs(np.arange(n)), b.test.inputs(np.arange(len(b.test)))
    Xv, yv = b.val.inputs(np.arange(len(b.val))), torch.as_tensor(b.val.y_true)
    y = torch.as_tensor(tr.y_obs).clone()
    clean = torch.as_tensor(tr.y_obs == tr.y_true)
    if a.meta_from:
        import pyarrow.csv as pacsv

        meta = np.array(pacsv.read_csv(a.meta_from).column("sample_id").to_numpy(), dtype=np.int64)
    else:  # the pipeline's warm-up draw for this seed
        cfg = ExperimentConfig(seed=a.seed, data=data, noise=noise, selection=SelectionConfig(budget=20, warmup=10))
        meta = warmup_ids(cfg, b)
    try:
        meta = tr.positions_of(meta)
    except KeyError as e:
        raise SystemExit(f"--meta-from {a.meta_from}: {e.args[0]} (a selection.csv of MNIST with this --seed)") from None
    y[meta] = torch.as_tensor(tr.y_true[meta])
    print(f"meta {len(meta)} samples, per class {np.bincount(tr.y_true[meta], minlength=b.num_classes).tolist()}",
          flush=True)
    torch.manual_seed(a.seed if a.train_seed is None else a.train_seed)
    model = build_model(ModelConfig(name="lenet5"), 10, (1, 28, 28))
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    if a.cosine:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=a.milestones, gamma=0.1)
    w = torch.ones(n)
    ema = None
    if a.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(a.ema))
    rw = build_reweighter(a.mode, meta_lr=a.meta_lr, meta_class_balanced=a.balanced_meta)
    for ep in range(a.epochs):
        t = time.perf_counter()
        order = np.random.default_rng(ep if a.train_seed is None else (a.train_seed, ep)).permutation(n)  # a local Generator per epoch
        for s in range(0, n, a.batch):
            idx = order[s : s + a.batch]
            out = rw.step(model=model, optimizer=opt, x=X[idx], y=y[idx], w=w[idx], x_meta=X[meta], y_meta=y[meta],
                          lr=sched.get_last_lr()[0], global_batch=len(idx), reducer=LocalReducer())
            w[idx] = out.weights.float()
            if ema is not None:
                ema.update_parameters(model)
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(Xt).argmax(1) == torch.as_tensor(b.test.y_true)).float().mean()
            val = (model(Xv).argmax(1) == yv).float().mean()
            ema_txt = "" if ema is None else f"ema {(ema(Xt).argmax(1) == torch.as_tensor(b.test.y_true)).float().mean():.4f} "
        model.train()
        print(f"ep {ep} val {val:.3f} acc {acc:.4f} {ema_txt}w_clean {w[clean].mean():.3f} w_noisy {w[~clean].mean():.3f} "
              f"{time.perf_counter() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
