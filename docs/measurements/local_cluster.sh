# Sourced by two_nodes.sh and node_loss.sh: a Ray cluster of several nodes on this machine, each node
# in its own process group with its own temp dir and free ports, token auth with a private token (as
# tests/integration/test_job_submit.py starts one). Needs REPO (the repository root, with .venv built).
# After `lc_init`: ROOT (private temp dir), DASH (job server port), TOKEN, GCS.
lc_ports() {  # N free ports on 127.0.0.1
  "$REPO/.venv/bin/python" -c '
import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}
lc_init() {  # $1: prefix of the private temp dir
  ROOT=$(mktemp -d /tmp/$1-XXXX)
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$ROOT/token RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  export PATH=$REPO/.venv/bin:$PATH
  unset RAY_ADDRESS PYTHONPATH
  python -c "import secrets; print(secrets.token_hex(32))" > $ROOT/token; chmod 600 $ROOT/token
  TOKEN=$(cat $ROOT/token)
}
lc_alive() {  # number of ALIVE nodes
  curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$DASH/api/v0/nodes?limit=10" | grep -o '"state": "ALIVE"' | wc -l
}
lc_head() {  # a 1-CPU head with the job server; waits until it answers
  set -- $(lc_ports 9)  # all at once: ports of separate calls could meet
  GCS=$1 DASH=$2; shift 2
  setsid ray start --head --block --num-cpus 1 --object-store-memory 300000000 --node-ip-address 127.0.0.1 --port $GCS \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $DASH --ray-client-server-port $1 \
    --dashboard-agent-listen-port $2 --dashboard-agent-grpc-port $3 --metrics-export-port $4 --runtime-env-agent-port $5 \
    --node-manager-port $6 --object-manager-port $7 --temp-dir $ROOT/head --disable-usage-stats > $ROOT/head.log 2>&1 &
  echo $! > $ROOT/head.pid
  for i in $(seq 90); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" http://127.0.0.1:$DASH/api/jobs/)" = 200 ] && break
    sleep 1
  done
}
lc_worker() {  # a 1-CPU worker node named $1 (temp dir $ROOT/$1); waits until one more node is alive,
  # unless $2 is "nowait"
  local before wait=${2:-wait}; before=$(lc_alive)
  set -- "$1" $(lc_ports 6)
  setsid ray start --block --address 127.0.0.1:$GCS --num-cpus 1 --object-store-memory 300000000 --node-ip-address 127.0.0.1 \
    --dashboard-agent-listen-port $2 --dashboard-agent-grpc-port $3 --metrics-export-port $4 --runtime-env-agent-port $5 \
    --node-manager-port $6 --object-manager-port $7 --temp-dir $ROOT/$1 --disable-usage-stats > $ROOT/$1.log 2>&1 &
  echo $! > $ROOT/$1.pid
  [ "$wait" = nowait ] && return
  for i in $(seq 90); do [ "$(lc_alive)" -gt "$before" ] && break; sleep 1; done
}
lc_kill() {  # SIGKILL node $1's process group, then every process still naming its temp dir
  kill -KILL -$(cat $ROOT/$1.pid) 2>/dev/null; sleep 1
  for p in $(pgrep -f "$ROOT/$1/"); do kill -9 $p 2>/dev/null; done
}
lc_stop() {  # every node: SIGTERM, then SIGKILL what is left; then leave token auth
  for f in $ROOT/*.pid; do kill -TERM -$(cat $f) 2>/dev/null; done; sleep 8
  for f in $ROOT/*.pid; do kill -KILL -$(cat $f) 2>/dev/null; done; sleep 1
  for p in $(pgrep -f "$ROOT/"); do kill -9 $p 2>/dev/null; done
  unset RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH
}
