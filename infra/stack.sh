#!/usr/bin/env bash
# The local stack, one command each:  infra/stack.sh start | stop | status | restart
#   start   Prefect server (SQLite) + process worker + S3-compatible store (moto) on 127.0.0.1, idempotent;
#           registers the deployments of prefect.yaml and points the DVC remote 'stack' at the store.
#   stop    stops exactly what start started (PID files), after snapshotting the store's objects.
#   status  health of each component (exit 3 if any is down).
# State (PID files, logs, SQLite database, snapshot) lives in infra/.state (override: DINOV2_STACK_DIR);
# ports: DINOV2_STACK_SERVER_PORT (4200), DINOV2_STACK_S3_PORT (9000), DINOV2_STACK_WORKER_PORT (8085).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${DINOV2_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m flows.stack "$@"
