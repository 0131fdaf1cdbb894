#!/usr/bin/env bash
# `make demo`: the pipeline as users run it, on this machine. Starts a Prefect server (SQLite under
# runs/.prefect), a local Ray head and a process serving the deployments; runs
# `prefect deployment run vit-pipeline/$DEPLOYMENT --watch`; prints where the results are; and stops
# everything it started, also when interrupted.
set -euo pipefail
set -m  # background jobs get their own process groups: a Ctrl-C reaches this script, whose trap stops them in order

BIN="${BIN:-.venv/bin}"
DEPLOYMENT="${DEPLOYMENT:-smoke}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
RAY_PORT="${RAY_PORT:-6390}"
RAY_CPUS="${RAY_CPUS:-4}"        # logical CPUs: two 2-worker trainings fit side by side
STARTUP_SECONDS="${STARTUP_SECONDS:-120}"
SHUTDOWN_SECONDS=20
LOGS="runs/demo-logs"

export PREFECT_HOME="$PWD/runs/.prefect"            # the demo's own database, not ~/.prefect
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-tasks,flows}"
export RAY_ADDRESS="127.0.0.1:${RAY_PORT}"
# Ray's token authentication with the demo's own token, which the flow runs present to connect.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$PWD/runs/.ray-auth-token"
mkdir -p "$LOGS" "$PREFECT_HOME"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
fi

pids=()
stop_one() {  # TERM, then KILL
  # TERM, not Ctrl-C: `prefect deployment serve` and `ray start --block` both shut down gracefully on TERM
  # (pause deployments, drain the node), while an INT left them running until the next signal.
  local pid="$1" signal
  for signal in TERM KILL; do
    kill -"$signal" "$pid" 2>/dev/null || return 0
    for _ in $(seq "$SHUTDOWN_SECONDS"); do
      kill -0 "$pid" 2>/dev/null || return 0
      sleep 1
    done
  done
}
stop_all() {
  # Newest first: the served flows leave while the server can still record it; `ray start --block`
  # stops the Ray processes it started (`ray stop` would stop every Ray on the machine).
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_one "${pids[i]}"; done
}
trap stop_all EXIT INT TERM

wait_for() {  # wait_for DESCRIPTION COMMAND...
  local what="$1" deadline=$((SECONDS + STARTUP_SECONDS)); shift
  # A deadline rather than a count of tries: each `prefect` probe itself takes seconds to start.
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "demo: $what did not come up within ${STARTUP_SECONDS}s; see $LOGS/" >&2
  exit 1
}

echo "demo: Prefect server on ${PREFECT_API_URL%/api} (log: $LOGS/prefect-server.log)"
"$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$LOGS/prefect-server.log" 2>&1 &
pids+=($!)
wait_for "the Prefect server" "$BIN/python" -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health')"

echo "demo: Ray head at $RAY_ADDRESS (log: $LOGS/ray.log)"
"$BIN/ray" start --head --block --port="$RAY_PORT" --num-cpus="$RAY_CPUS" --dashboard-host=127.0.0.1 \
  --disable-usage-stats >"$LOGS/ray.log" 2>&1 &
pids+=($!)
wait_for "the Ray head" "$BIN/ray" status --address "$RAY_ADDRESS"

echo "demo: serving the deployments (log: $LOGS/serve.log)"
"$BIN/python" -m flows.deployments >"$LOGS/serve.log" 2>&1 &
pids+=($!)
wait_for "deployment vit-pipeline/$DEPLOYMENT" "$BIN/prefect" deployment inspect "vit-pipeline/$DEPLOYMENT"

echo "demo: prefect deployment run vit-pipeline/$DEPLOYMENT --watch"
# --watch exits non-zero unless the run ends Completed; pipefail carries that through tee.
if ! "$BIN/prefect" deployment run "vit-pipeline/$DEPLOYMENT" --watch 2>&1 | tee "$LOGS/deployment-run.log"; then
  echo "demo: the flow run did not complete; its logs: $LOGS/serve.log" >&2
  exit 1
fi
run_dir="runs/$DEPLOYMENT/latest"  # each flow run writes runs/<run>/<flow run>/; latest is the one just finished
cat <<DONE

demo: vit-pipeline/$DEPLOYMENT Completed.
  report:        $PWD/$run_dir/report/report.html
  evaluation:    $PWD/$run_dir/evaluation.json
  attention:     $PWD/$run_dir/attention/
  W&B (offline): $PWD/$run_dir/wandb/  ->  upload: $BIN/wandb sync $PWD/$run_dir/wandb/offline-run-*
  Prefect UI:    the server is stopped now; browse this run with
                 PREFECT_HOME=$PREFECT_HOME $BIN/prefect server start  (then http://127.0.0.1:4200)
DONE
