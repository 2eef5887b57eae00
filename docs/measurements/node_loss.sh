#!/bin/bash
# A node lost mid-training: the toy job (2 Ray Train workers of 1 CPU, ray.max_failures=3) submitted
# with `ray job submit` to two Ray nodes on this machine (a head and a worker node of 1 CPU each, as in
# docs/measurements/two_nodes.sh, local_cluster.sh); once the warm-up has saved 2 snapshots the worker node's processes
# are killed with SIGKILL (a machine gone without notice) and a new worker node joins. The same job on
# one local node of 2 CPUs, uninterrupted, is the reference. Run from the repository root with .venv
# built:  bash docs/measurements/node_loss.sh > docs/measurements/node_loss.txt 2>&1
set -u
REPO=$PWD
. "$REPO/docs/measurements/local_cluster.sh"
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) ($(git status --short --untracked-files=no | wc -l) tracked files changed)"
lc_init prnl; OUT=$ROOT/out
lc_head
lc_worker worker
ARGS="method=rbc seed=0 reweight.epochs=30 features.num_snapshots=2 features.stride=1 selection.budget=6 selection.warmup=2 ray.num_workers=2 ray.cpus_per_worker=1 ray.max_failures=3"
echo "\$ ray job submit --address http://127.0.0.1:\$DASHBOARD_PORT --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.select $ARGS output_dir=\$ROOT/out/node_lost"
T0=$(date +%s)
ray job submit --address http://127.0.0.1:$DASH --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- python -m jobs.select $ARGS output_dir=$OUT/node_lost > $ROOT/job.log 2>&1 &
JOB=$!
for i in $(seq 750); do  # until the warm-up has saved two snapshots
  [ "$(ls -d $OUT/node_lost/ray_train/warmup-*/checkpoint_* 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.2
done
echo "$(( $(date +%s) - T0 )) s: the warm-up saved $(ls -d $OUT/node_lost/ray_train/warmup-*/checkpoint_* | wc -l) snapshots; SIGKILL to every process of the worker node"
lc_kill worker
sleep 5
echo "$(( $(date +%s) - T0 )) s: a new worker node starts"
lc_worker worker2 nowait  # joins while the job runs
wait $JOB
JOB_RC=$?
echo "$(( $(date +%s) - T0 )) s: ray job submit exited with $JOB_RC"
grep -v 'INFO\|WARN\|^\s*$\|core_worker.cc\|-----' $ROOT/job.log | grep -v "^\[warmup\|^\[rbc" | cut -c1-300
python - "$DASH" "$OUT/node_lost" <<'PY' 2>&1 | grep -v INFO
import collections, glob, json, sys
from ray.util.state import list_actors, list_nodes
addr = f"http://127.0.0.1:{sys.argv[1]}"
ns = list_nodes(address=addr, detail=True, limit=10, raise_on_missing_output=False)
name = {n.node_id: "head" if n.is_head_node else ("worker node 1 (killed)" if n.state == "DEAD" else "worker node 2")
        for n in ns}
print("nodes:", sorted(f"{name[n.node_id]}: {n.state}" for n in ns))
acts = list_actors(address=addr, detail=True, limit=1000, raise_on_missing_output=False)
groups = collections.defaultdict(list)
for a in acts:
    if a.class_name == "RayTrainWorker":
        groups[a.placement_group_id].append(name.get(a.node_id))
print("Ray Train worker groups (the nodes of each group's 2 workers):")
for g in groups.values():
    print("  ", sorted(g))
for run in sorted(glob.glob(f"{sys.argv[2]}/ray_train/*/")):
    epochs = sorted(json.load(open(m))["epoch"] for m in glob.glob(f"{run}checkpoint_*/metrics.json"))
    print(f"{run.split('/')[-2]}: {len(epochs)} checkpoints, epochs {epochs}")
PY
lc_stop
[ $JOB_RC = 0 ] || { rm -rf $ROOT; exit 1; }
echo "\$ python -m jobs.select $ARGS ray.address=local ray.num_cpus=2 output_dir=\$ROOT/out/one_node   # a new local Ray of 2 CPUs, uninterrupted"
python -m jobs.select $ARGS ray.address=local ray.num_cpus=2 output_dir=$OUT/one_node 2>&1 | grep -v 'INFO\|WARN\|^\s*$\|core_worker.cc' | tail -3
echo "\$ diff one_node/selection.csv node_lost/selection.csv"
diff $OUT/one_node/selection.csv $OUT/node_lost/selection.csv && echo "(identical)"
python - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{d}/metrics.json")) for d in ("one_node", "node_lost"))
for k in ("test_acc_at_best_val", "best_epoch", "final_test_acc", "weight_auc"):
    print(f"{k}: one node {a[k]!r}, node lost {b[k]!r}")
print("K-means objective of every iteration equal:", a["rounds"][0]["objective"] == b["rounds"][0]["objective"])
PY
rm -rf $ROOT
