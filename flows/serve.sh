#!/usr/bin/env bash
# `make serve`: a local Prefect server and the scheduled retrain (`python -m flows.pipeline serve`), started with
# telemetry off and PREFECT_API_URL set only in the environment of the two processes started here (the Prefect
# profile is not touched: no `prefect config set`), and stopped in the right order on Ctrl-C, on `kill`, or when
# either one dies: first `serve` (it pauses its schedule and cancels a run in flight), then the server.
#
#   CRON="0 3 * * *" bash flows/serve.sh [more `flows.pipeline serve` flags, e.g. --force]
#
# Environment: CRON (default: params.yaml flow.cron), PREFECT_HOST (127.0.0.1), PREFECT_PORT (4200),
# PREFECT_HOME (.prefect: the server's database and log live there), BIN (the venv's bin, default .venv/bin).
set -euo pipefail
# Job control: the server and `serve` get process groups of their own, so a Ctrl-C in the terminal reaches only
# this script, which stops them in order (uvicorn would otherwise stop the server at once and leave `serve`
# hanging on a dead API).
set -m
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
HOST=${PREFECT_HOST:-127.0.0.1}
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_API_URL="http://$HOST:$PORT/api"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
       GX_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1
# the fit stage's temporary server (when the API is not reachable) may need longer than 20 s to create its database
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
mkdir -p "$PREFECT_HOME"
LOG="$PREFECT_HOME/server.log"

health() {
    "$BIN/python" -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).close()
except Exception:
    sys.exit(1)' "$PREFECT_API_URL"
}

if health; then
    echo "error: a Prefect server already answers on $PREFECT_API_URL; stop it, or pick another PREFECT_PORT" >&2
    exit 1
fi

server="" serve=""
stop() {
    trap - EXIT INT TERM
    if [ -n "$serve" ] && kill -0 "$serve" 2>/dev/null; then
        echo "make serve: stopping the schedule (pid $serve)" >&2
        kill -TERM "$serve" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$serve" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$serve" 2>/dev/null || true
    fi
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        echo "make serve: stopping the Prefect server (pid $server)" >&2
        kill -TERM "$server" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server" 2>/dev/null || true
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "make serve: starting the Prefect server on http://$HOST:$PORT (log: $LOG)" >&2
"$BIN/prefect" server start --host "$HOST" --port "$PORT" >"$LOG" 2>&1 &
server=$!
for _ in $(seq 1 600); do  # a fresh database takes ~30 s to create on 2 CPU cores
    health && break
    if ! kill -0 "$server" 2>/dev/null; then
        echo "error: the Prefect server exited; see $LOG" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done
health || { echo "error: the Prefect server did not answer within 300 s; see $LOG" >&2; exit 1; }
echo "make serve: UI on http://$HOST:$PORT; Ctrl-C stops the schedule, then the server" >&2

"$BIN/python" -m flows.pipeline serve ${CRON:+--cron "$CRON"} "$@" &
serve=$!
wait "$serve"
