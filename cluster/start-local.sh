#!/usr/bin/env bash
# Start a Ray cluster on this machine for `ray job submit`, and return once it accepts jobs.
#
#   cluster/start-local.sh [--multi-node] [RAY START OPTIONS...]
#   . /tmp/digits-ray-$(id -u)/env      # RAY_AUTH_MODE=token and RAY_API_SERVER_ADDRESS, for this shell
#   ray job submit --working-dir . -- python jobs/train.py --workers 2
#   cluster/status.sh                   # addresses, nodes, resources
#   cluster/stop-local.sh               # stops exactly this cluster (never `ray stop`)
#
# Every port is one of its own (another Ray on the machine keeps its own): the GCS, node manager and
# object manager bind a free one themselves (port 0; the GCS address is read back); the ports Ray needs
# named at start (dashboard, agents, client, metrics) are free ones picked now. Its own temp dir, and
# Ray's token authentication on (the token is ~/.ray/auth_token, made if missing).
# Default: one node with every port on 127.0.0.1 (Ray's single-machine mode,
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); Ray refuses worker nodes then. --multi-node: a head that
# cluster/add-worker.sh can add nodes to; Ray then uses this machine's address, and its GCS, raylet,
# object manager, agents and metrics listen beyond loopback (see docs/cluster.md, "What listens where").
#
# Environment: NUM_CPUS (default: all cores), DIGITS_CLUSTER_DIR (state and logs; default
# /tmp/digits-ray-$(id -u), at most 30 characters: Ray's socket paths must stay short),
# START_TIMEOUT (seconds, default 120). Variables set here (DIGITS_DATA_DIR, ...) reach every job.
set -euo pipefail

die() { echo "start-local.sh: $*" >&2; exit 1; }

multi=0
if [[ "${1:-}" == "--multi-node" ]]; then
  multi=1
  shift
fi
command -v ray >/dev/null || die "ray is not on PATH: activate the project's environment (. .venv/bin/activate)"
dir="${DIGITS_CLUSTER_DIR:-/tmp/digits-ray-$(id -u)}"
((${#dir} <= 30)) || die "DIGITS_CLUSTER_DIR=$dir is longer than 30 characters (Ray's socket paths would be too long)"
timeout_s="${START_TIMEOUT:-120}"
here="$(cd "$(dirname "$0")" && pwd)"
# A shell that sourced another cluster's env file must not point this one's probes (or jobs) there.
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS

if [[ -f "$dir/cluster" ]]; then
  head_pid="$(cat "$dir/nodes/head.pid" 2>/dev/null || true)"
  cluster_id="$(sed -n 's/^CLUSTER_ID=//p' "$dir/cluster")"
  if [[ -n "$head_pid" ]] && grep -qzx "DIGITS_RAY_CLUSTER=$cluster_id" "/proc/$head_pid/environ" 2>/dev/null; then
    die "a cluster is already running from $dir: cluster/stop-local.sh stops it (or set DIGITS_CLUSTER_DIR)"
  fi
  DIGITS_CLUSTER_DIR="$dir" "$here/stop-local.sh" >/dev/null  # a stale one: whatever is left of it
fi
for old in "$dir"/nodes/*.log; do  # the previous cluster's logs and temp dirs
  [[ -e "$old" ]] && rm -rf "${dir:?}/$(basename "$old" .log)"
done
rm -rf "$dir/nodes"
mkdir -p "$dir/nodes"

free_ports() {  # N ports free on every interface right now
  python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
read -r dashboard agent_http agent_grpc runtime_env_agent metrics client autoscaler_metrics dashboard_metrics \
  haproxy_stats haproxy_metrics <<<"$(free_ports 10)"
# Serve's start-up switches (HAProxy in front of the replicas; digits_ray/serve/settings.py), read once by
# every Ray process: they must be in the environment `ray start` runs with.
read -r -a serve_env <<<"$(python -m digits_ray.serve.settings | tr '\n' ' ')" ||
  die "python -m digits_ray.serve.settings failed: install the project (pip install -e .) in this environment"

cluster_id="$(date +%s)-$$-$RANDOM"
mode=$([[ $multi == 1 ]] && echo multi-node || echo loopback)
# The markers let stop-local.sh find this node's processes. RAY_API_SERVER_ADDRESS: Ray's own State API
# clients (Ray Train's placement-group cleaner) cannot tell which of several Rays on a machine is theirs.
# No drain on SIGTERM: Ray 2.60 would wait up to 30s for an idle node before stopping.
node_env=("${serve_env[@]}" RAY_SERVE_HAPROXY_STATS_PORT="$haproxy_stats" RAY_SERVE_HAPROXY_METRICS_PORT="$haproxy_metrics"
          RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dashboard"
          RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
          AUTOSCALER_METRIC_PORT="$autoscaler_metrics" DASHBOARD_METRIC_PORT="$dashboard_metrics"
          DIGITS_RAY_CLUSTER="$cluster_id" DIGITS_RAY_NODE="$cluster_id:head")  # last: a long title overwrites the first
ip_args=()
if [[ $multi == 0 ]]; then
  # Ray's single-machine mode: node IP 127.0.0.1, so every server binds loopback only.
  node_env=(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "${node_env[@]}")
  ip_args=(--node-ip-address 127.0.0.1)
fi
cat >"$dir/cluster" <<EOF
CLUSTER_ID=$cluster_id
MODE=$mode
DASHBOARD_URL=http://127.0.0.1:$dashboard
METRICS_PORT=$metrics
HAPROXY_STATS_PORT=$haproxy_stats
HAPROXY_METRICS_PORT=$haproxy_metrics
EOF

RAY_AUTH_MODE=token ray get-auth-token --generate >/dev/null
echo "Starting the Ray head ($mode, ${NUM_CPUS:-$(nproc)} CPUs); log: $dir/nodes/head.log" >&2
env "${node_env[@]}" setsid ray start --head --block "${ip_args[@]}" \
  --num-cpus "${NUM_CPUS:-$(nproc)}" --node-name head \
  --port 0 --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
  --dashboard-agent-listen-port "$agent_http" --dashboard-agent-grpc-port "$agent_grpc" \
  --node-manager-port 0 --object-manager-port 0 \
  --runtime-env-agent-port "$runtime_env_agent" --metrics-export-port "$metrics" \
  --ray-client-server-port "$client" --min-worker-port 0 --max-worker-port 0 \
  --temp-dir "$dir/head" --disable-usage-stats "$@" \
  </dev/null >"$dir/nodes/head.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/nodes/head.pid"

fail() {
  echo "start-local.sh: $*" >&2
  echo "--- last lines of $dir/nodes/head.log (Ray's own logs: $dir/head/session_latest/logs)" >&2
  tail -n 20 "$dir/nodes/head.log" >&2 || true
  DIGITS_CLUSTER_DIR="$dir" "$here/stop-local.sh" >&2 || true
  exit 1
}
accepts_jobs() {  # the job agent answers, and the dashboard takes our token
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
    "http://127.0.0.1:$agent_http/api/healthz" 2>/dev/null &&
    RAY_AUTH_MODE=token ray job list --address "http://127.0.0.1:$dashboard" >/dev/null 2>&1
}
trap 'fail "interrupted"' INT TERM
deadline=$((SECONDS + timeout_s))
until accepts_jobs; do
  kill -0 "$pid" 2>/dev/null || fail "the head exited before it accepted jobs"
  ((SECONDS < deadline)) || fail "the head did not accept jobs within ${timeout_s}s (START_TIMEOUT)"
  sleep 2
done
gcs_address="$(cat "$dir/head/ray_current_cluster")"
echo "GCS_ADDRESS=$gcs_address" >>"$dir/cluster"
cat >"$dir/env" <<EOF
# Written by cluster/start-local.sh: source it to use that cluster from a shell.
export RAY_AUTH_MODE=token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard
EOF

cat <<EOF
Ray head up ($mode): dashboard http://127.0.0.1:$dashboard, GCS $gcs_address
  logs:       $dir/nodes/head.log, $dir/head/session_latest/logs
  this shell: . $dir/env
  then:       ray job submit --working-dir . -- python jobs/train.py --workers 2
  stop:       cluster/stop-local.sh
EOF
