#!/usr/bin/env bash
# Start a single-machine Ray cluster for `ray job submit`, bound to this machine only, with Ray's
# token authentication on (the token lives in ~/.ray/auth_token; clients on this machine read it).
#   NUM_CPUS=2 cluster/start-local.sh
#   export RAY_AUTH_MODE=token
#   ray job submit --working-dir . -- python jobs/train.py --workers 2
#   ray stop
# DIGITS_DATA_DIR, if set here, is inherited by every job's driver and worker.
set -euo pipefail
export RAY_AUTH_MODE=token
ray get-auth-token --generate >/dev/null
exec ray start --head \
  --node-ip-address 127.0.0.1 \
  --num-cpus "${NUM_CPUS:-$(nproc)}" \
  --dashboard-host 127.0.0.1 \
  --disable-usage-stats
