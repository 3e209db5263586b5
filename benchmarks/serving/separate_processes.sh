#!/usr/bin/env bash
# The serving benchmark against the stack as it is deployed: adapter store, GPU worker and
# router each in its own process, driven through `serving_bench --target` (which first uploads
# the trace's adapters to the store). Stops the three processes it started when it ends.
#
#   bash benchmarks/serving/separate_processes.sh MODEL DEVICE [serving_bench options...]
#
# MODEL is a dummy preset (tiny, llama-7b) and DEVICE cpu or cuda. Environment: PYTHON
# (default python3), STORE_PORT, WORKER_PORT, ROUTER_PORT (50152, 50151, 50150) and
# WORKER_ARGS, more worker flags (e.g. "--max-rank 8" to match an S1 trace's largest rank,
# as the in-process engine does), and STORE_ARGS, more store flags (e.g. "--store-dtype
# bfloat16").
set -euo pipefail
model=$1 device=$2
shift 2
py=${PYTHON:-python3}
store=127.0.0.1:${STORE_PORT:-50152}
worker=127.0.0.1:${WORKER_PORT:-50151}
router=127.0.0.1:${ROUTER_PORT:-50150}
big=1000000  # queue bounds that refuse nothing, as in the in-process runs
data=$(mktemp -d)
pids=()

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
  rm -rf "$data"
}
trap stop_all EXIT

wait_healthy() {  # ADDRESS [SERVICE]; the worker answers only once its model is built
  for _ in $(seq 1 900); do
    "$py" -m services.common.healthcheck "$1" "${2:-}" --timeout 1 >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "$1 never became healthy" >&2
  return 1
}

# shellcheck disable=SC2086  # STORE_ARGS is a list of flags
"$py" -m services.adapter_store --port "${store#*:}" --data-dir "$data" --base-model "$model" \
  --log-level WARNING ${STORE_ARGS:-} &
pids+=($!)
# shellcheck disable=SC2086  # WORKER_ARGS is a list of flags
"$py" -m services.gpu_worker --port "${worker#*:}" --model "$model" --dummy --device "$device" \
  --adapter-store "$store" --max-waiting $big --log-level WARNING ${WORKER_ARGS:-} &
pids+=($!)
wait_healthy "$store"
wait_healthy "$worker"
# The router polls its workers once as it starts: started after the worker is up, it routes
# from the first request on.
"$py" -m services.router --port "${router#*:}" --workers "$worker" --adapter-store "$store" \
  --max-running $big --max-queued $big --log-level WARNING &
pids+=($!)
wait_healthy "$router" manylora.v1.Router  # serving once it sees a healthy worker
"$py" -m benchmarks.serving_bench --target "$router" --store-target "$store" \
  --worker-stats "$worker" "$@"
