#!/bin/bash
# The toy job of tests/integration/test_job_submit.py (2 Ray Train workers of 1 CPU) submitted with
# `ray job submit` to two Ray nodes on this machine (a head and a worker node of 1 CPU each, each with
# its own temp dir and ports, token auth with a private token: local_cluster.sh), then run on one
# local node of 2 CPUs; prints where the actors ran and compares the two runs' outputs. Run from the
# repository root with .venv built:  bash docs/measurements/two_nodes.sh > docs/measurements/two_nodes.txt 2>&1
set -u
REPO=$PWD
. "$REPO/docs/measurements/local_cluster.sh"
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) ($(git status --short --untracked-files=no | wc -l) tracked files changed)"
lc_init prmn; OUT=$ROOT/out
lc_head
lc_worker worker
ARGS="method=rbc seed=0 reweight.epochs=3 features.num_snapshots=2 features.stride=1 selection.budget=6 selection.warmup=2 ray.num_workers=2 ray.cpus_per_worker=1"
echo "\$ ray job submit --address http://127.0.0.1:\$DASHBOARD_PORT --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.select $ARGS output_dir=\$ROOT/out/two_nodes"
/usr/bin/time -f "wall %e s" ray job submit --address http://127.0.0.1:$DASH --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- python -m jobs.select $ARGS output_dir=$OUT/two_nodes > $ROOT/job.log 2>&1
JOB_RC=$?
grep -v 'INFO\|WARN\|^\s*$\|core_worker.cc\|-----' $ROOT/job.log
[ $JOB_RC = 0 ] || { echo "ray job submit exited with $JOB_RC"; lc_stop; exit 1; }
python - "$DASH" <<'PY' 2>&1 | grep -v INFO
import collections, sys
from ray.util.state import list_actors, list_nodes
addr = f"http://127.0.0.1:{sys.argv[1]}"
nodes = {n.node_id: ("head" if n.is_head_node else "worker node") for n in list_nodes(address=addr)}
print("nodes:", sorted(nodes.values()))
kept = ("RayTrainWorker", "TrainController", "MapWorker(MapBatches(_ExtractWorker))", "ShardActor", "ParameterServer", "JobSupervisor")
acts = list_actors(address=addr, detail=True, limit=1000, raise_on_missing_output=False)
count = collections.Counter((a.class_name, nodes.get(a.node_id)) for a in acts if a.class_name in kept)
print("actors (class, node): count:", dict(sorted(count.items())))
PY
lc_stop
echo "\$ python -m jobs.select $ARGS ray.address=local ray.num_cpus=2 output_dir=\$ROOT/out/one_node   # a new local Ray of 2 CPUs"
/usr/bin/time -f "wall %e s" python -m jobs.select $ARGS ray.address=local ray.num_cpus=2 output_dir=$OUT/one_node 2>&1 | grep -v 'INFO\|WARN\|^\s*$\|core_worker.cc' | tail -3
echo "\$ diff one_node/selection.csv two_nodes/selection.csv"
diff $OUT/one_node/selection.csv $OUT/two_nodes/selection.csv && echo "(identical)"
python - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{d}/metrics.json")) for d in ("one_node", "two_nodes"))
for k in ("test_acc_at_best_val", "final_test_acc", "weight_auc"):
    print(f"{k}: one node {a[k]!r}, two nodes {b[k]!r}")
print("K-means objective of every iteration equal:", a["rounds"][0]["objective"] == b["rounds"][0]["objective"])
PY
rm -rf $ROOT
