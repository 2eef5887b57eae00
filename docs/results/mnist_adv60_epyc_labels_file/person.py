"""Stand-in for the person: fills in the newest to_label_round<r>.csv with MNIST's true labels and appends it to labels.csv."""
import sys
from pathlib import Path

import pandas as pd

from pivotal_ray.core.data import build_data

out = Path(sys.argv[1])
todo = max(out.glob("to_label_round*.csv"), key=lambda p: int(p.stem.removeprefix("to_label_round")))
bundle = build_data({"name": "mnist", "root": "/work/shared/data"}, {"kind": "adversarial", "rate": 0.6}, seed=0)
truth = dict(zip(bundle.train.sample_id.tolist(), bundle.train.y_true.tolist()))
df = pd.read_csv(todo)
df["label"] = [truth[int(i)] for i in df["sample_id"]]
labels = out / "labels.csv"
df.to_csv(labels, mode="a", header=not labels.exists(), index=False)
print(f"labelled {len(df)} samples of {todo.name} into {labels}")
