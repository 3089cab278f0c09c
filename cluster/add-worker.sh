#!/usr/bin/env bash
# Add a worker node on this machine to the cluster of `cluster/start-local.sh --multi-node`, and
# return once the cluster lists it as ALIVE.
#
#   cluster/add-worker.sh [RAY START OPTIONS...]
#   NUM_CPUS=1 NODE_NAME=node-b cluster/add-worker.sh --resources '{"node_b": 1}'
#   cluster/status.sh                  # the nodes
#   cluster/stop-local.sh node-b       # this node only (cluster/stop-local.sh: all of them)
#
# The node is a separate `ray start --address ... --block` with its own free ports, its own temp dir
# (DIGITS_CLUSTER_DIR/NODE_NAME), NUM_CPUS CPUs (default 1) and whatever RAY START OPTIONS add.
# Environment: NODE_NAME (default worker-N; at most 10 letters, digits, '-' or '_'),
# DIGITS_CLUSTER_DIR (as for start-local.sh), START_TIMEOUT (seconds, default 120).
set -euo pipefail

die() { echo "add-worker.sh: $*" >&2; exit 1; }

command -v ray >/dev/null || die "ray is not on PATH: activate the project's environment (. .venv/bin/activate)"
dir="${DIGITS_CLUSTER_DIR:-/tmp/digits-ray-$(id -u)}"
timeout_s="${START_TIMEOUT:-120}"
here="$(cd "$(dirname "$0")" && pwd)"
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
[[ -f "$dir/cluster" ]] || die "no cluster in $dir: start one with cluster/start-local.sh --multi-node"
cluster_id="$(sed -n 's/^CLUSTER_ID=//p' "$dir/cluster")"
mode="$(sed -n 's/^MODE=//p' "$dir/cluster")"
gcs_address="$(sed -n 's/^GCS_ADDRESS=//p' "$dir/cluster")"
dashboard_url="$(sed -n 's/^DASHBOARD_URL=//p' "$dir/cluster")"
[[ -n "$gcs_address" ]] || die "the cluster in $dir has not finished starting"
[[ "$mode" == "multi-node" ]] ||
  die "the head in $dir runs in loopback mode, where Ray refuses worker nodes; restart it with:
  cluster/stop-local.sh && cluster/start-local.sh --multi-node"

if [[ -n "${NODE_NAME:-}" ]]; then
  name="$NODE_NAME"
else
  n=1
  while [[ -e "$dir/nodes/worker-$n.pid" ]]; do n=$((n + 1)); done
  name="worker-$n"
fi
[[ "$name" =~ ^[A-Za-z0-9_-]{1,10}$ && "$name" != "head" && "$name" != "nodes" ]] ||
  die "NODE_NAME=$name: use at most 10 letters, digits, '-' or '_' (not 'head')"
[[ ! -e "$dir/nodes/$name.pid" ]] || die "a node named $name is already recorded in $dir/nodes"
rm -rf "${dir:?}/$name"

# The node manager and object manager bind a free port themselves (0); the agents' ports are named at start.
read -r agent_http agent_grpc runtime_env_agent metrics <<<"$(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"

echo "Adding node $name (${NUM_CPUS:-1} CPUs) to $gcs_address; log: $dir/nodes/$name.log" >&2
env RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS="$dashboard_url" \
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}" \
  DIGITS_RAY_CLUSTER="$cluster_id" DIGITS_RAY_NODE="$cluster_id:$name" \
  setsid ray start --address "$gcs_address" --block --node-name "$name" --num-cpus "${NUM_CPUS:-1}" \
  --dashboard-agent-listen-port "$agent_http" --dashboard-agent-grpc-port "$agent_grpc" \
  --node-manager-port 0 --object-manager-port 0 \
  --runtime-env-agent-port "$runtime_env_agent" --metrics-export-port "$metrics" \
  --min-worker-port 0 --max-worker-port 0 --temp-dir "$dir/$name" --disable-usage-stats "$@" \
  </dev/null >"$dir/nodes/$name.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/nodes/$name.pid"

fail() {
  echo "add-worker.sh: $*" >&2
  echo "--- last lines of $dir/nodes/$name.log (Ray's own logs: $dir/$name/session_latest/logs)" >&2
  tail -n 20 "$dir/nodes/$name.log" >&2 || true
  DIGITS_CLUSTER_DIR="$dir" "$here/stop-local.sh" "$name" >&2 || true
  exit 1
}
alive() {
  RAY_AUTH_MODE=token ray list nodes --address "$dashboard_url" --format json \
    --filter "node_name=$name" --filter "state=ALIVE" 2>/dev/null | grep -q '"node_id"'
}
trap 'fail "interrupted"' INT TERM
deadline=$((SECONDS + timeout_s))
until alive; do
  kill -0 "$pid" 2>/dev/null || fail "the node exited before it joined"
  ((SECONDS < deadline)) || fail "the node did not join within ${timeout_s}s (START_TIMEOUT)"
  sleep 2
done
echo "node $name joined the cluster at $gcs_address (cluster/status.sh lists the nodes)"
