#!/bin/bash
# A node lost mid-training: the toy job (2 Ray Train workers of 1 CPU, ray.max_failures=3) submitted
# with `ray job submit` to two Ray nodes on this machine (a head and a worker node of 1 CPU each, as in
# docs/measurements/two_nodes.sh); once the warm-up has saved 2 snapshots the worker node's processes
# are killed with SIGKILL (a machine gone without notice) and a new worker node joins. The same job on
# one local node of 2 CPUs, uninterrupted, is the reference. Run from the repository root with .venv
# built:  bash docs/measurements/node_loss.sh > docs/measurements/node_loss.txt 2>&1
set -u
REPO=$PWD; V=$REPO/.venv/bin
ROOT=$(mktemp -d /tmp/prnl-XXXX); OUT=$ROOT/out
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) ($(git status --short --untracked-files=no | wc -l) tracked files changed)"
read -r GCS DASH CLIENT AG AGG MET RTE NM OM P1 P2 P3 P4 P5 P6 Q1 Q2 Q3 Q4 Q5 Q6 < <($V/python -c '
import socket
s = [socket.socket() for _ in range(21)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$ROOT/token RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 PATH=$V:$PATH
unset RAY_ADDRESS PYTHONPATH
$V/python -c "import secrets; print(secrets.token_hex(32))" > $ROOT/token; chmod 600 $ROOT/token
TOKEN=$(cat $ROOT/token)
alive() { curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$DASH/api/v0/nodes?limit=10" | grep -o '"state": "ALIVE"' | wc -l; }
kill_node() {  # SIGKILL a node's process group, then every process still naming its temp dir
  kill -KILL -$(cat $ROOT/$1.pid) 2>/dev/null; sleep 1
  for p in $(pgrep -f "$ROOT/$1/"); do kill -9 $p 2>/dev/null; done
}
stop() {
  for f in worker2 worker head; do [ -f $ROOT/$f.pid ] && kill -TERM -$(cat $ROOT/$f.pid) 2>/dev/null; done; sleep 8
  for f in worker2 worker head; do [ -f $ROOT/$f.pid ] && kill -KILL -$(cat $ROOT/$f.pid) 2>/dev/null; done; sleep 1
  for p in $(pgrep -f "$ROOT/"); do kill -9 $p 2>/dev/null; done
}
worker() {  # worker node $1 (temp dir $ROOT/$1) on ports $2..$7
  setsid ray start --block --address 127.0.0.1:$GCS --num-cpus 1 --object-store-memory 300000000 --node-ip-address 127.0.0.1 \
    --dashboard-agent-listen-port $2 --dashboard-agent-grpc-port $3 --metrics-export-port $4 --runtime-env-agent-port $5 \
    --node-manager-port $6 --object-manager-port $7 --temp-dir $ROOT/$1 --disable-usage-stats > $ROOT/$1.log 2>&1 &
  echo $! > $ROOT/$1.pid
}
setsid ray start --head --block --num-cpus 1 --object-store-memory 300000000 --node-ip-address 127.0.0.1 --port $GCS \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $DASH --ray-client-server-port $CLIENT \
  --dashboard-agent-listen-port $AG --dashboard-agent-grpc-port $AGG --metrics-export-port $MET --runtime-env-agent-port $RTE \
  --node-manager-port $NM --object-manager-port $OM --temp-dir $ROOT/ray --disable-usage-stats > $ROOT/head.log 2>&1 &
echo $! > $ROOT/head.pid
for i in $(seq 90); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" http://127.0.0.1:$DASH/api/jobs/)" = 200 ] && break; sleep 1
done
worker worker $P1 $P2 $P3 $P4 $P5 $P6
for i in $(seq 90); do [ "$(alive)" -ge 2 ] && break; sleep 1; done
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
kill_node worker
sleep 5
echo "$(( $(date +%s) - T0 )) s: a new worker node starts"
worker worker2 $Q1 $Q2 $Q3 $Q4 $Q5 $Q6
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
stop
unset RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH
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
