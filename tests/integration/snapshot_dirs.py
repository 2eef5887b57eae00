"""Checkpoint directories in the snapshot layout, with untrained models standing in for training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from pivotal_ray.core.models import build_model


def write_snapshots(root: Path, *, model_spec: dict, bundle, epochs: Sequence[int], seed_base: int,
                    val_accs: Sequence[float]) -> list[dict]:
    """One ``checkpoint_<k>`` dir per epoch (model.pt + metrics.json); different init seeds per k."""
    out = []
    for k, (epoch, val) in enumerate(zip(epochs, val_accs)):
        model = build_model(model_spec, bundle.num_classes, bundle.input_shape, seed=seed_base + k)
        d = root / f"checkpoint_{k:06d}"
        d.mkdir()
        torch.save(model.state_dict(), d / "model.pt")
        (d / "metrics.json").write_text(json.dumps({"epoch": epoch, "val_acc": val, "test_acc": val,
                                                    "train_loss": 1.0}))
        out.append({"path": str(d), "epoch": epoch, "val_acc": val})
    return out
