#!/usr/bin/env bash
# Submit (or resume) a build as a Ray job.
#
#   cluster/submit.sh RUN_ID CONFIG [extra asteer-build run flags...]
#
# RUN_ID names the job (a new one per attempt: Ray keeps ids unique); resuming is just
# submitting again with the same CONFIG and output: committed shards are skipped.
# RAY_ADDRESS defaults to the local dashboard (ray dashboard cluster/asteer-cluster.yaml
# forwards it from a launched cluster).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_ID CONFIG [asteer-build run flags...]" >&2
  exit 2
fi
RUN="$1"; CONFIG="$2"; shift 2
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
# Clusters started by `ray start` (Ray >= 2.5x) want the auth token from ~/.ray/auth_token.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Check the config (fields, alpha grids, model paths) before anything is uploaded.
asteer-build plan "$CONFIG" >/dev/null
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env cluster/runtime_env.yaml --submission-id "$RUN" \
  -- asteer-build run --config "$CONFIG" --executor ray --no-progress --json "$@"
