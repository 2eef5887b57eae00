"""True 9s: what the snapshots of round 1 (rbc, seeds 3-5) predict for them, from the label-free
factors A = softmax (the argmax of A per snapshot). Run from the repository root:
    python docs/results/mnist_adv60_seeds345/predicted_nines.py outputs/compare/mnist_adv60_seeds345 3 4 5
(needs the runs' feature tables, not committed)."""
import json, sys, collections
from pathlib import Path
import numpy as np
from pivotal_ray.core.featuretable import read_factor_table
from pivotal_ray.core.data import build_data
root = Path(sys.argv[1])
for seed in map(int, sys.argv[2:]):
    run = root / "runs/default/rbc" / f"seed{seed}"
    cfg = json.loads((run / "manifest.json").read_text())["config"]
    b = build_data(cfg["data"] | {"root": "/work/shared/data"}, cfg["noise"], seed)
    f = read_factor_table(run / "rounds/round_1/features")
    yt = dict(zip(b.train.sample_id.tolist(), b.train.y_true.tolist()))
    y = np.array([yt[int(i)] for i in f.sample_id])
    pred = f.A.argmax(2)  # (n, K) predicted class per snapshot
    acc = [(pred[:, k] == y).mean() for k in range(pred.shape[1])]
    first, nine = pred[y == 9, 0], pred[y == 9, -1]
    print(f"seed {seed}: train accuracy per snapshot {np.round(acc, 3).tolist()}; true 9s predicted as (last snapshot):",
          collections.Counter(nine.tolist()).most_common(4), "first snapshot:", collections.Counter(first.tolist()).most_common(3), "of", int((y == 9).sum()))
