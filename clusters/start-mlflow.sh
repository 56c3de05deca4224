#!/usr/bin/env bash
# Start (or restart) the MLflow tracking server on the Ray head node (clusters/*.yaml call this).
#   start-mlflow.sh PRIVATE_ADDRESS ARTIFACT_URI
# SQL backend store (SQLite on the head's disk: MLflow 3.13+ refuses plain file stores),
# artifacts proxied to ARTIFACT_URI (s3://, gs:// or a shared path). The server binds to the
# node's private address only; it is never exposed on every interface (DESIGN.md §6).
set -euo pipefail
addr=${1:?usage: start-mlflow.sh PRIVATE_ADDRESS ARTIFACT_URI}
artifacts=${2:?usage: start-mlflow.sh PRIVATE_ADDRESS ARTIFACT_URI}
store=${KN_DIST_MLFLOW_DIR:-$HOME/mlflow}
case "$addr" in
  0.0.0.0 | "::" | "[::]" | "") echo "start-mlflow.sh: refusing to bind to '$addr'; give the private address" >&2; exit 2 ;;
esac
mkdir -p "$store"
if [ -f "$store/server.pid" ]; then
  kill "$(cat "$store/server.pid")" 2>/dev/null || true
fi
nohup mlflow server --backend-store-uri "sqlite:///$store/mlflow.db" --artifacts-destination "$artifacts" \
  --host "$addr" --port 5000 >"$store/server.log" 2>&1 &
echo $! >"$store/server.pid"
echo "MLflow tracking server: http://$addr:5000 (log: $store/server.log)"
