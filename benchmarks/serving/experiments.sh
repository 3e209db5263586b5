#!/usr/bin/env bash
# Issue #7's experiments on the device, one name each, run in the order given:
#
#   bash benchmarks/serving/experiments.sh s1_adapters s2_variants ...
#
# Each writes OUT/NAME.jsonl (one line per run, appended as the run ends, so a command cut
# off by the device's time limit keeps every finished run) and OUT/NAME.log, then prints the
# report. OUT defaults to the device's $OUT, else /tmp/manylora-serving. Wheels the device
# lacks travel in .whl/ (see the main README) and are installed first.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/manylora-serving}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: capacity_ab runs some benches from another folder
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.:protos${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

bench() {  # NAME serving_bench-options...
  local name=$1
  shift
  python3 -m benchmarks.serving_bench --no-progress --out "$out/$name.jsonl" "$@" 2>&1 |
    tee -a "$out/$name.log"
}

# Issue #20's comparisons: S1, 50 adapters, uniform, R = 40 (twice what either serves), 12 s.
stack_trace=(--preset S1 --num-adapters 50 --alpha 0 --rate 40 --duration 12 --timeout 60)

inproc_run() {  # NAME serving_bench-options...: the engine in the benchmark's process
  local name=$1
  shift
  bench "$name" "$@" --max-rank 8 --max-num-seqs 256 | grep "^\["
}

stack_run() {  # NAME "WORKER FLAGS" serving_bench-options...: store, worker, router as processes
  # (STORE_ARGS from the environment: the store's flags)
  local name=$1 flags=$2
  shift 2
  # shellcheck disable=SC2086  # flags is a list of flags
  WORKER_ARGS="--max-rank 8 --max-num-seqs 256 $flags" bash \
    benchmarks/serving/separate_processes.sh llama-7b cuda "$@" --no-progress \
    --out "$out/$name.jsonl" 2>&1 | tee -a "$out/$name.log" | grep "^\["
}

trace_modes() {  # NAME MODE...: stack_trace once per mode, in the order given: inproc (the
  # engine alone), or a stack whose worker starts cold: fp32 (the store keeps the fp32 uploads
  # as they are), bf16 (it keeps them in bf16), warm (fp32, each adapter fetched before the
  # timed run: --warm-adapters)
  local name=$1 mode
  shift
  for mode in "$@"; do
    case $mode in
      inproc) inproc_run "$name" "${stack_trace[@]}" ;;
      fp32) stack_run "$name" "" "${stack_trace[@]}" ;;
      bf16) STORE_ARGS="--store-dtype bfloat16" stack_run "$name" "" "${stack_trace[@]}" ;;
      warm) stack_run "$name" "" "${stack_trace[@]}" --warm-adapters ;;
      *) echo "trace_modes: unknown mode $mode" >&2 ;;
    esac
  done
}

# The gRPC comparisons' trace: 20 adapters, since the stack uploads each as an fp32 PEFT file.
grpc_trace=(--preset S1 --num-adapters 20 --rate 20 --duration 20 --timeout 100)

run_one() {
  case $1 in
    gpu_tests)  # the GPU tests of the engine, the kernels, the worker and the bmm baseline
      python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu_worker \
        tests/benchmarks/test_bmm_baseline.py \
        2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
    s1_adapters)  # 2,000+ adapters, no failures; throughput at 2,000 ≥ 95% of that at 5
      bench "$1" --preset S1 --num-adapters 5,100,1000,2000,4000 --rate 20 --duration 20 \
        --timeout 100 ;;
    s2_adapters)  # the same with ranks 64/32/16/8
      bench "$1" --preset S2 --num-adapters 5,100,1000,2000 --rate 20 --duration 20 \
        --timeout 110 ;;
    s2_rate)  # no target: throughput, latency and SLO attainment as load passes capacity
      bench "$1" --preset S2 --num-adapters 1000 --rate 2,5,10,20 --duration 20 --timeout 100 ;;
    s1_all_linear)  # no target: 2,000 rank-8 adapters on all seven linear layers vs q/k/v/o
      bench "$1" --preset S1 --num-adapters 2000 --alpha 0 --rate 20 --duration 20 --timeout 100
      bench "$1" --preset S1 --num-adapters 2000 --alpha 0 --rate 20 --duration 20 --timeout 100 \
        --target-modules all-linear ;;
    decode_targets)  # no target: decode step, base vs attention-only vs all-linear adapters
      python3 -m benchmarks.decode_bench --targets-table --out "$out" 2>&1 |
        tee "$out/$1.log" | tail -6 ;;
    s1_alpha)  # no target: popularity skew at capacity (α = 0 is uniform)
      bench "$1" --preset S1 --num-adapters 1000 --alpha 0,0.5,1,2 --rate 20 --duration 20 \
        --timeout 100 ;;
    s2_cv)  # no target: burstier arrivals below capacity, where latency shows them
      bench "$1" --preset S2 --num-adapters 1000 --rate 5 --cv 1,2,4 --duration 20 --timeout 60 ;;
    s2_variants)  # unified pool ≥ no-unified-pool, kernels ≥ bmm
      bench "$1" --preset S2 --num-adapters 1000 --rate 20 --duration 20 --timeout 150 \
        --variant manylora,no-unified-pool,bmm ;;
    s2_peft)  # ≥ 30× HF PEFT (PEFT is cut off at the timeout; see benchmarks/README.md)
      bench "$1" --preset S2 --num-adapters 5 --rate 20 --duration 20 --timeout 150 \
        --variant manylora,hf-peft ;;
    grpc)  # the stack as three processes ≥ 90% of the in-process engine, same trace
      bench "$1" "${grpc_trace[@]}"
      WORKER_ARGS="--max-rank 8" bash benchmarks/serving/separate_processes.sh llama-7b cuda \
        "${grpc_trace[@]}" --no-progress --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" ;;
    stack_r40|stack_r2)  # issue #20: three processes >= 95% of in-process at R = 40, same trace
      trace=(--preset S1 --num-adapters 50 --alpha 0 --rate "${1#stack_r}" --duration 25
        --timeout 110)
      bench "$1" "${trace[@]}" --max-rank 8 --max-num-seqs 256
      WORKER_ARGS="--max-rank 8 --max-num-seqs 256" bash benchmarks/serving/separate_processes.sh \
        llama-7b cuda "${trace[@]}" --no-progress --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" ;;
    stack_r40_abba)  # stack_r40 shorter, in-process and stack alternating (A B B A): the
      # first process of a call has run slow on the device; the stack reports its worker's steps
      trace=("${stack_trace[@]}")
      for mode in inproc stack stack inproc; do
        if [ "$mode" = inproc ]; then
          bench "$1" "${trace[@]}" --max-rank 8 --max-num-seqs 256
        else
          WORKER_ARGS="--max-rank 8 --max-num-seqs 256" bash \
            benchmarks/serving/separate_processes.sh llama-7b cuda "${trace[@]}" --no-progress \
            --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" | tail -1
        fi
      done ;;
    stack_engine_process)  # issue #20: the worker's engine in its own process (the default on
      # a GPU) against on a thread of the gRPC process (--engine-process off), beside the
      # engine in-process: in-process, stack, stack off, stack, in-process
      for mode in inproc on off on inproc; do
        if [ "$mode" = inproc ]; then inproc_run "$1" "${stack_trace[@]}"
        else stack_run "$1" "--engine-process $mode" "${stack_trace[@]}"; fi
      done ;;
    stack_warm)  # issue #20: the stack with its worker's host cache cold (each adapter's first
      # request downloads it from the store) and warm (--warm-adapters), beside in-process,
      # whose adapters are in host memory from its start: A B C C A
      trace_modes "$1" inproc fp32 warm warm inproc ;;
    stack_cold)  # issue #20: in-process and the stack with its worker cold (every adapter's
      # first request downloads it from the store), A B B A
      trace_modes "$1" inproc fp32 fp32 inproc ;;
    stack_cold_bf16)  # issue #20: stack_cold with the store keeping adapters in bf16 (half
      # an fp32 upload to download, hash and parse), beside the store as uploaded: A B C C B A
      # (STACK_COLD_MODES: another order, or fewer runs)
      # shellcheck disable=SC2086  # a list of modes
      trace_modes "$1" ${STACK_COLD_MODES:-inproc fp32 bf16 bf16 fp32 inproc} ;;
    adapter_fetch)  # issue #20: a cold worker's burst of adapter downloads, on the host's CPU,
      # from a store keeping fp32 uploads as they are and one keeping them in bf16
      python3 -m benchmarks.adapter_fetch_bench --num-adapters 50 --concurrency 64,2,1 \
        --store-dtype as-uploaded,bfloat16 --repeats 1 --out "$out/$1.jsonl" 2>&1 |
        tee "$out/$1.log" ;;
    stack_by_rate)  # issue #20: in-process and the stack at R = 20 (about what either serves)
      # and R = 40 (twice that): whether the stack's gap comes with overload (admission at
      # its bounds: the lines' pool peaks and queue waits) or at any load
      for rate in 20 40; do
        trace=("${stack_trace[@]}" --rate "$rate")
        inproc_run "$1" "${trace[@]}"
        stack_run "$1" "" "${trace[@]}"
      done ;;
    stack_profile)  # issue #20: one stack run at R = 40 with the worker's threads profiled
      # (--profile-to) and its steps split into host work and waiting for the device
      trace=("${stack_trace[@]}")
      WORKER_ARGS="--max-rank 8 --max-num-seqs 256 --profile-to $out/worker" bash \
        benchmarks/serving/separate_processes.sh llama-7b cuda "${trace[@]}" --no-progress \
        --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" | tail -1
      for thread in engine loop; do
        head -45 "$out/worker.$thread.txt" 2>&1 | tee -a "$out/$1.log"
      done ;;
    stack_load_profile)  # issue #20: where a cold stack's adapter loads spend the engine
      # thread, its engine in a process of its own and on a thread (the tenth session's
      # profile had 721 samples of 2 ms in adapter_layout._on_device in a process, the
      # eighth's 66 on a thread; adapter_load_bench: 1.1 ms a load on an idle device)
      for mode in on off; do
        stack_run "$1" "--engine-process $mode --profile-to $out/worker_$mode" \
          "${stack_trace[@]}"
        grep -E "samples, one|_on_device|write_adapter|synchronize" \
          "$out/worker_$mode.engine.txt" | head -12 | tee -a "$out/$1.log"
      done ;;
    compiles)  # issues #14, #20: a served run compiles no kernel, from an empty Triton cache:
      # one stack run and one in-process run (each run line counts its compilations; the
      # worker logs each one with its specializations)
      trace=("${stack_trace[@]}")
      export TRITON_CACHE_DIR
      TRITON_CACHE_DIR=$(mktemp -d)
      WORKER_ARGS="--max-rank 8 --max-num-seqs 256" bash \
        benchmarks/serving/separate_processes.sh llama-7b cuda "${trace[@]}" --no-progress \
        --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" | grep -E "compiled kernel|^\[" | cut -c1-400
      TRITON_CACHE_DIR=$(mktemp -d)
      bench "$1" "${trace[@]}" --max-rank 8 --max-num-seqs 256 | grep "^\["
      unset TRITON_CACHE_DIR ;;
    sampled)  # issue #14: sampled traffic within 5% of greedy, S1 2,000 adapters, R = 40 (greedy,
      # sampled, greedy: A B A in one process)
      trace=(--preset S1 --num-adapters 2000 --alpha 0 --rate 40 --duration 20 --timeout 80)
      bench "$1" "${trace[@]}"
      bench "$1" "${trace[@]}" --sampled
      bench "$1" "${trace[@]}" ;;
    sampled_top_p)  # top-p without top-k (OpenAI-style requests) against greedy, and the
      # whole-row-sort experiment (no read-back inside the step): greedy, top-p, top-p with
      # --whole-sort, greedy, in one process
      trace=(--preset S1 --num-adapters 2000 --alpha 0 --rate 40 --duration 20 --timeout 80)
      bench "$1" "${trace[@]}"
      bench "$1" "${trace[@]}" --sampling "T 0.8, p 0.9"
      bench "$1" "${trace[@]}" --sampling "T 0.8, p 0.9" --whole-sort
      bench "$1" "${trace[@]}" ;;
    adapter_load)  # the engine thread's time per adapter load, on the device
      timeout 300 python3 -m benchmarks.adapter_load_bench --ranks 8,16,64 --out "$out" 2>&1 |
        tee "$out/$1.log" | tail -24 ;;
    capacity)  # issue #14: S1 at 5 and 2,000 adapters and S2 at 1,000, R = 40, default settings;
      # 5 adapters again last (A B A): the first run of a process has run slow on the device
      bench "$1" --alpha 0 --rate 40 --duration 20 --timeout 80 --preset S1 --num-adapters 5,2000,5
      bench "$1" --alpha 0 --rate 40 --duration 20 --timeout 80 --preset S2 --num-adapters 1000 ;;
    capacity_ab)  # S1, 2,000 adapters, R = 40, default settings: this tree's kernels and those
      # of BASELINE_KERNELS (a folder with another tree's kernels/, e.g. `git archive REV
      # kernels | tar -x -C DIR`), A B B A, each its own process; each run's line in the
      # jsonl names the kernels folder it imported
      if [ ! -d "${BASELINE_KERNELS:-}/kernels" ]; then
        echo "capacity_ab: BASELINE_KERNELS must name a folder holding kernels/" >&2
        return 1
      fi
      local root=$PWD run=(--alpha 0 --rate 40 --duration 20 --timeout 80 --preset S1
        --num-adapters 2000)
      for tree in this baseline baseline this; do
        if [ "$tree" = this ]; then
          bench "$1" "${run[@]}" | grep "^\["
        else
          (cd "$BASELINE_KERNELS" && PYTHONPATH=".:$root:$root/protos:$PYTHONPATH" \
            bench "$1" "${run[@]}") | grep "^\["
        fi
      done ;;
    stack_r40_si4)  # stack_r40's three processes with the worker's --stream-interval 4
      trace=(--preset S1 --num-adapters 50 --alpha 0 --rate 40 --duration 25 --timeout 110)
      WORKER_ARGS="--max-rank 8 --max-num-seqs 256 --stream-interval 4" \
        bash benchmarks/serving/separate_processes.sh llama-7b cuda "${trace[@]}" \
        --no-progress --out "$out/$1.jsonl" 2>&1 | tee -a "$out/$1.log" ;;
    lora_rows)  # the row kernels of decode batches (kernels/lora_rows.py): their GPU tests,
      # then timed beside the tiled kernels (lora_tune), then decode steps with each (profile_step)
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/kernels/test_lora_kernels.py 2>&1 | tee -a "$out/$1.log" | tail -3
      local v=default,rows_tile,rows_rank,rows_rank_n512,rows_rank_min0,rows_k128,rows_split16
      v=$v,rows_rp1,rows_rp4,tiled,tiled_split16
      timeout 240 python3 -m benchmarks.lora_tune --batches 32,48,64,128 --max-rank 128 \
        --variants "$v" --out "$out/$1_mix" 2>&1 | tee -a "$out/$1.log" | tail -28
      timeout 180 python3 -m benchmarks.lora_tune --ranks 8 --groups attention --max-rank 128 \
        --batches 32,64,160,256 --variants default,rows_tile,rows_rank,rows_rp1,rows_rp4,tiled \
        --out "$out/$1_r8" 2>&1 | tee -a "$out/$1.log" | tail -18
      for run in 1_rows 2_tiled 3_rows; do  # A B A: a process's first cases have run slow
        timeout 200 python3 -m benchmarks.profile_step --cases 32x0x0,128x0x0,160x0x0 \
          --kinds base,attention,all-linear --outputs async --overlap on --prefill-graphs off \
          --lora-kernels "${run#*_}" --out "$out/$1_profile_$run" 2>&1 |
          tee -a "$out/$1.log" | tail -10
      done ;;
    lora_order)  # the row kernels with the request as the grid's slowest axis
      # (row_request_major), on batches in descending rank and with the ranks cycled
      local v=default,rows_request_major,rows_request_major_small,rows_sr8,rows_rp4
      for order in cycled by-rank; do
        timeout 200 python3 -m benchmarks.lora_tune --batches 32,64,128 --max-rank 128 \
          --order "$order" --variants "$v" --out "$out/$1_mix_$order" 2>&1 |
          tee -a "$out/$1.log" | grep '^batch'
      done
      timeout 150 python3 -m benchmarks.lora_tune --ranks 8 --groups attention --max-rank 128 \
        --batches 32,160,256 --variants "$v" --out "$out/$1_r8" 2>&1 | tee -a "$out/$1.log" |
        grep '^batch'
      for run in 1_rows 2_rows-request-major 3_rows; do  # then decode steps, A B A
        timeout 200 python3 -m benchmarks.profile_step --cases 32x0x0,128x0x0 \
          --kinds attention,all-linear --outputs async --overlap on --prefill-graphs off \
          --lora-kernels "${run#*_}" --out "$out/$1_profile_$run" 2>&1 |
          tee -a "$out/$1.log" | tail -5
      done ;;
    lora_direct_slots)  # the direct-slot-tables decode LoRA experiment: its GPU tests, then
      # timed beside the default
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/benchmarks/test_lora_direct_slots.py 2>&1 | tee -a "$out/$1.log" | tail -3
      timeout 240 python3 -m benchmarks.lora_tune --batches 32,128 --breakdown \
        --variants default,direct_slots --out "$out/$1_mix" 2>&1 | tee -a "$out/$1.log" | tail -6
      timeout 180 python3 -m benchmarks.lora_tune --ranks 8 --groups attention \
        --batches 32,160,256 --variants default,direct_slots --out "$out/$1_r8" 2>&1 |
        tee -a "$out/$1.log" | tail -4 ;;
    router_cpu)  # issue #20 on the host's CPU: one router's relay rate, the latency of a hop
      for k in 1 3; do  # (results in router_cpu.json: not the serving report's format)
        python3 -m benchmarks.router_bench --rounds 3 --requests 1024 --tokens 256 \
          --tokens-per-message "$k" --out "$out/router_cpu.json" 2>&1 | tee -a "$out/$1.log" |
          tail -3
      done
      python3 -m benchmarks.router_hop_bench --rounds 3 --requests 100 \
        --out "$out/router_cpu.json" 2>&1 | tee -a "$out/$1.log" | tail -4 ;;
    grpc_inproc)  # the stack in the benchmark's own process: a lower bound
      bench "$1" "${grpc_trace[@]}" --mode inprocess,grpc ;;
    *)
      echo "unknown experiment $1" >&2
      return 2 ;;
  esac
}

status=0
for name in "$@"; do
  echo "=== $name ($(date -u +%H:%M:%S))"
  run_one "$name" || status=1
  if [ -s "$out/$name.jsonl" ]; then python3 -m benchmarks.serving.report "$out/$name.jsonl"; fi
done
exit $status
