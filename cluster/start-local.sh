#!/usr/bin/env bash
# Start a single-machine Ray cluster for `ray job submit`, bound to this machine only.
#   NUM_CPUS=2 cluster/start-local.sh          # then: ray job submit --working-dir . -- python jobs/train.py
#   ray stop                                   # when done
# DIGITS_DATA_DIR, if set here, is inherited by every job's driver and worker.
set -euo pipefail
exec ray start --head \
  --node-ip-address 127.0.0.1 \
  --num-cpus "${NUM_CPUS:-$(nproc)}" \
  --dashboard-host 127.0.0.1 \
  --disable-usage-stats
