#!/usr/bin/env bash
# Inside the Ray head's container: run the Prefect worker of the vit-pipeline pool (`stop`: stop it).
# Started by prefect-worker.service. One at a time: a worker left by an earlier start (a `docker exec`
# whose client died) is stopped first, so a second `ray up` never leaves two workers polling the pool.
set -euo pipefail
pidfile="${VIT_PIPELINE_WORKER_PIDFILE:-/tmp/vit-pipeline-prefect-worker.pid}"

stop_previous() {
  [ -s "$pidfile" ] || return 0
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop_previous
if [ "${1:-}" = stop ]; then
  exit 0
fi
: "${PREFECT_API_URL:?not set: the head did not read its secret vit-pipeline/prefect-env}"
: "${RAY_AUTH_TOKEN:?not set: the container did not get its secret vit-pipeline/cluster-env}"
echo $$ >"$pidfile"
# The default queue only: the `launcher` queue (the weekly cifar10 run) is the off-cluster worker's.
exec prefect worker start --pool vit-pipeline --work-queue default --type process --name "vit-pipeline-head-$(hostname)"
