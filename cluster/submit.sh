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
# The cluster runs with Ray's token authentication (cluster/README.md); the job client
# sends the same token. Never turned off here: without a token we stop and say how to get it.
if [ "${RAY_AUTH_MODE:-token}" != "token" ]; then
  echo "submit.sh: RAY_AUTH_MODE=${RAY_AUTH_MODE} but asteer clusters run with token auth;" \
       "unset it (or set it to token)" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "submit.sh: no Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token);" \
       "use the cluster's token: the file you created with \`ray get-auth-token --generate\`" \
       "before \`ray up\` (cluster/README.md)" >&2
  exit 2
fi
# Check the config (fields, alpha grids, model paths) before anything is uploaded.
asteer-build plan "$CONFIG" >/dev/null
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env cluster/runtime_env.yaml --submission-id "$RUN" \
  -- asteer-build run --config "$CONFIG" --executor ray --no-progress --json "$@"
