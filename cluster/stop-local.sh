#!/usr/bin/env bash
# Stop the cluster that cluster/start-local.sh started, with the nodes cluster/add-worker.sh added,
# and nothing else on the machine (unlike `ray stop`, which stops every Ray of every user).
#
#   cluster/stop-local.sh              # worker nodes first, then the head
#   cluster/stop-local.sh worker-1     # one worker node
#
# Each node's `ray start --block` gets SIGTERM and stops what it started; whatever still carries the
# node's (or the cluster's) marker variable after STOP_TIMEOUT seconds (default 30) gets SIGKILL.
# Logs stay in DIGITS_CLUSTER_DIR (default /tmp/digits-ray-$(id -u)) until the next start-local.sh;
# the jobs' working dirs and pip virtualenvs (runtime_resources) go.
set -euo pipefail

dir="${DIGITS_CLUSTER_DIR:-/tmp/digits-ray-$(id -u)}"
timeout_s="${STOP_TIMEOUT:-30}"
if [[ ! -f "$dir/cluster" ]]; then
  echo "stop-local.sh: no cluster recorded in $dir; nothing to stop"
  exit 0
fi
cluster_id="$(sed -n 's/^CLUSTER_ID=//p' "$dir/cluster")"
[[ -n "$cluster_id" ]] || { echo "stop-local.sh: $dir/cluster names no CLUSTER_ID" >&2; exit 1; }

# A node's processes: those in the session its `setsid ray start` opened (Ray's agents and dashboard
# modules overwrite their /proc/PID/environ with their process title), and those whose environment
# still holds its marker (job drivers run in sessions of their own).
scan() {  # $1: marker entry, $2...: session IDs
  local f pid stat sid want marker="$1"
  shift
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue
    read -r _ _ _ sid _ <<<"${stat##*) }"  # after the command name: state, ppid, pgrp, session
    for want in "$@"; do
      pid="${f#/proc/}"
      pid="${pid%/stat}"
      # A session ID is not reused while a process holds it; "ray" in the command line guards the rest.
      if [[ "$sid" == "$want" ]] && grep -qa ray "/proc/$pid/cmdline" 2>/dev/null; then echo "$pid"; fi
    done
  done
  grep -lzx -- "$marker" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
}
members() {  # scan's PIDs, once each, without this script
  scan "$@" 2>/dev/null | sort -un | grep -vx -- "$$" || true
}

stop_members() {  # $1: marker entry, $2: PID of its `ray start --block` (may be gone), $3...: session IDs
  local marker="$1" leader="$2" left deadline=$((SECONDS + timeout_s))
  shift 2
  left="$(members "$marker" "$@")"
  [[ -n "$left" ]] || return 0
  if [[ -n "$leader" ]] && grep -qx "$leader" <<<"$left"; then
    kill -TERM "$leader" 2>/dev/null || true  # it stops the processes it started
  else
    # shellcheck disable=SC2086  # one PID per word
    kill -TERM $left 2>/dev/null || true  # no `ray start` to ask: each process itself
  fi
  while [[ -n "$left" ]] && ((SECONDS < deadline)); do
    sleep 1
    left="$(members "$marker" "$@")"
  done
  if [[ -n "$left" ]]; then
    echo "stop-local.sh: SIGKILL to what is left after ${timeout_s}s: $(echo "$left" | tr '\n' ' ')" >&2
    # shellcheck disable=SC2086  # one PID per word
    kill -KILL $left 2>/dev/null || true
  fi
}

stop_node() {
  local name="$1" pid
  pid="$(cat "$dir/nodes/$name.pid" 2>/dev/null || true)"
  echo "stopping $name"
  stop_members "DIGITS_RAY_NODE=$cluster_id:$name" "$pid" ${pid:+"$pid"}
  rm -f "$dir/nodes/$name.pid"
  rm -rf "${dir:?}/$name"/session_*/runtime_resources  # working dirs and pip virtualenvs (GBs); logs stay
}

if (($# > 0)); then
  for name in "$@"; do
    [[ "$name" != "head" ]] || { echo "stop-local.sh: the head goes last: run stop-local.sh without names" >&2; exit 1; }
    [[ -f "$dir/nodes/$name.pid" ]] || { echo "stop-local.sh: no node $name in $dir/nodes" >&2; exit 1; }
    stop_node "$name"
  done
  exit 0
fi

sessions=()
for pidfile in "$dir"/nodes/*.pid; do
  [[ -e "$pidfile" ]] || continue
  sessions+=("$(cat "$pidfile")")
  name="$(basename "$pidfile" .pid)"
  [[ "$name" == "head" ]] || stop_node "$name"
done
stop_node head
stop_members "DIGITS_RAY_CLUSTER=$cluster_id" "" "${sessions[@]}"  # whatever outlived its node
rm -f "$dir/cluster" "$dir/env"
echo "stopped the cluster of $dir (logs kept there until the next start-local.sh)"
