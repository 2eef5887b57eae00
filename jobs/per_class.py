"""Per-class test accuracy of a finished run's final model, beside its meta set and the noise.

    python -m jobs.per_class /abs/output_dir [--checkpoint best|last]

Reads ``manifest.json`` (the resolved config and seed), ``metrics.json`` (the final run's
best-validation and last checkpoints) and ``selection.csv`` (the meta set) of ``output_dir``, and
prints, per class: test accuracy, the class most often predicted instead, the meta samples of that
class (by cleaned label) and where the noise sends the class's flipped labels (for adversarial
noise, the derangement ``pi``: a 2-cycle ``c <-> pi(c)`` swaps two classes wholesale). Used to
explain seed-to-seed spread in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import torch

from pivotal_ray import storage
from pivotal_ray.config import from_dict
from pivotal_ray.core.data import build_data
from pivotal_ray.core.models import build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jobs.per_class", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--checkpoint", choices=["best", "last"], default="best")
    a = ap.parse_args(argv)
    for f in ("manifest.json", "metrics.json", "selection.csv"):
        if not (a.output_dir / f).is_file():
            raise SystemExit(f"{a.output_dir / f} not found: pass the output_dir of a finished jobs.select run")
    manifest = json.loads((a.output_dir / "manifest.json").read_text())
    cfg, seed = from_dict(manifest["config"]), int(manifest["seed"])
    run = json.loads((a.output_dir / "metrics.json").read_text())["final_run"]
    ckpt = run["best_snapshot" if a.checkpoint == "best" else "snapshot"]
    if not storage.exists(storage.join(ckpt, "model.pt")):
        raise SystemExit(f"{storage.join(ckpt, 'model.pt')}, the model of the run's {a.checkpoint} checkpoint, is not "
                         "there: per_class needs the run's Ray Train storage as well as its output_dir (the copies "
                         "under docs/results/ hold only selection.csv, metrics.json and manifest.json); run the "
                         "command that made the run again to recreate it (docs/results.md gives each)")

    bundle = build_data(cfg.data, cfg.noise, seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    model.load_state_dict(storage.torch_load(storage.join(ckpt, "model.pt"), map_location="cpu"))
    model.eval()
    test, train = bundle.test, bundle.train
    y_test = np.asarray(test.y_true)
    with torch.no_grad():
        pred = np.concatenate([model(test.inputs(np.arange(s, min(s + 4096, len(test))))).argmax(1).numpy()
                               for s in range(0, len(test), 4096)])
    # the labels the run trained its meta samples with (a person's, under labels=file), not the true ones
    meta_cleaned = np.asarray(pacsv.read_csv(a.output_dir / "selection.csv").column("cleaned_label").to_numpy(),
                              np.int64)
    y_obs, y_true = np.asarray(train.y_obs), np.asarray(train.y_true)

    print(f"{a.output_dir}  ({a.checkpoint} checkpoint {ckpt})\ntest accuracy {np.mean(pred == y_test):.4f}")
    print("class  test_acc  confused_with  meta_samples  flipped_to")
    for c in range(bundle.num_classes):
        m = y_test == c
        wrong = pred[m & (pred != c)]
        flipped = y_obs[(y_true == c) & (y_obs != c)]
        print(f"{c:>5}  {np.mean(pred[m] == c):8.3f}  {np.bincount(wrong).argmax() if wrong.size else '-':>13}  "
              f"{int(np.sum(meta_cleaned == c)):>12}  {np.bincount(flipped).argmax() if flipped.size else '-':>10}")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    main()
