#!/usr/bin/env bash
# The cluster of cluster/start-local.sh: its addresses, its nodes (`ray list nodes`) and its
# resources (`ray status`). Exits 1 when DIGITS_CLUSTER_DIR (default /tmp/digits-ray-$(id -u))
# records no cluster.
#
#   cluster/status.sh
set -euo pipefail

dir="${DIGITS_CLUSTER_DIR:-/tmp/digits-ray-$(id -u)}"
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
if [[ ! -f "$dir/cluster" ]]; then
  echo "status.sh: no cluster recorded in $dir (cluster/start-local.sh starts one)" >&2
  exit 1
fi
mode="$(sed -n 's/^MODE=//p' "$dir/cluster")"
gcs_address="$(sed -n 's/^GCS_ADDRESS=//p' "$dir/cluster")"
dashboard_url="$(sed -n 's/^DASHBOARD_URL=//p' "$dir/cluster")"
echo "mode $mode; dashboard $dashboard_url; GCS ${gcs_address:-(starting)}; state and logs in $dir"
echo "metrics (Prometheus): http://127.0.0.1:$(sed -n 's/^METRICS_PORT=//p' "$dir/cluster")/metrics;" \
  "Serve's HAProxy: stats http://127.0.0.1:$(sed -n 's/^HAPROXY_STATS_PORT=//p' "$dir/cluster")/stats," \
  "metrics http://127.0.0.1:$(sed -n 's/^HAPROXY_METRICS_PORT=//p' "$dir/cluster")/metrics"
export RAY_AUTH_MODE=token
# Loopback mode: Ray would turn 127.0.0.1 into this machine's address unless told it is one machine.
[[ "$mode" == "multi-node" ]] || export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
ray list nodes --address "$dashboard_url"
[[ -z "$gcs_address" ]] || ray status --address "$gcs_address"
