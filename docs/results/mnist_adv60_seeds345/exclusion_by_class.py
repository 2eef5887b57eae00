"""Which true classes the exclusion step of round 1 drops (rbc, MNIST 60% adversarial, seeds 3-5).

Run from the repository root: python docs/results/mnist_adv60_seeds345/exclusion_by_class.py \
    outputs/compare/mnist_adv60_seeds345 3 4 5   (needs the runs' feature tables, not committed)
"""
import collections, csv, json, sys
from pathlib import Path
import numpy as np
from pivotal_ray.core.featuretable import read_factor_table
from pivotal_ray.core.kmeans import as_shard_set, _exclude, n_excluded
from pivotal_ray.core.data import build_data

root = Path(sys.argv[1])
for seed in map(int, sys.argv[2:]):
    run = root / "runs/default/rbc" / f"seed{seed}"
    man = json.loads((run / "manifest.json").read_text())
    cfg = man["config"]
    bundle = build_data(cfg["data"] | {"root": "/work/shared/data"}, cfg["noise"], seed)
    y_true = dict(zip(bundle.train.sample_id.tolist(), bundle.train.y_true.tolist()))
    y_obs = dict(zip(bundle.train.sample_id.tolist(), bundle.train.y_obs.tolist()))
    sel = list(csv.DictReader(open(run / "selection.csv")))
    meta = np.array([int(r["sample_id"]) for r in sel if r["round"] == "0"])
    feats = read_factor_table(run / "rounds/round_1/features")
    shards = as_shard_set(feats)
    cand = np.setdiff1d(np.asarray(feats.sample_id), meta)
    shards.call("set_active", exclude_ids=meta)
    n_ex = n_excluded(cand.size, cfg["selection"]["exclude_frac"])
    # rbc's runs clustered signed (l2rw); its label-free factors are non-negative, so signed and
    # |cos| exclude the same ids (checked on these seeds). Not for gbc's features: pass signed=True
    ex = _exclude(shards, meta_ids=meta, n_exclude=n_ex, signed=False)
    tot = collections.Counter(y_true[i] for i in cand)
    exc = collections.Counter(y_true[i] for i in ex)
    print(f"seed {seed}: meta classes {sorted(y_true[i] for i in meta)}; excluded {ex.size} of {cand.size}")
    print("  true class: share excluded", {c: round(exc[c] / tot[c], 3) for c in sorted(tot)})
