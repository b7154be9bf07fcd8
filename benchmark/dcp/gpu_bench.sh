#!/usr/bin/env bash
# The DCP benchmarks on the GPU machine, run from the repo root:
#
#   bash benchmark/dcp/gpu_bench.sh [STAGE ...]     (no STAGE: all of them, in this order)
#
#   install    the offline SGLang 0.5.14 bundle (.device) and this package, as gpu_check.sh
#   serving    bench_serving_sweep.py: capacity, batch-1 TPOT/TTFT, throughput sweep (run it again
#              in the next call if a call's limit cut it short: it resumes from $WORK),
#              TP vs TP+DCP2 at TP=4 on 4+ GPUs, else TP=2 (TP=... overrides; TP=8 runs the
#              upstream PR's table: 64 query / 4 KV heads, 32k/4k and 32k/8k, batch 32..96)
#   attention  bench_attention.py: one layer's decode attention + DCP communication vs its floor
#              (2+ GPUs)
#   stages     bench_attention_stages.py: that layer's local stages on one GPU, and the
#              communication time left over against the attention stage's result of this call
#              or else the one in benchmark/dcp/results
#   transport  bench_transport.py: the LSE all-gather of --dcp-comm lse, NCCL vs peer-to-peer
#              symmetric memory vs custom all-reduce, D = 2 and 4 (4 where 4+ GPUs); not in
#              the default list
#   upstream   the serving benchmarks (batch 1 and the sweep, DCP only) on upstream SGLang 0.5.16's
#              own DCP (Triton backend): installs .device-0.5.16 (an offline bundle of the
#              SGLang 0.5.16 wheels, like .device) into /tmp/site-0.5.16
#   summary    the stage table ($OUT/gpu_bench.json) and the logs ($OUT/gpu_bench_logs.tgz)
#
# SWEEP_EXTRA: more bench_serving_sweep.py arguments for serving and upstream (e.g. a shorter
# "--concurrency 8,16,32" where device time is short).
# Results (JSON + PNG) go to $OUT; copy them to benchmark/dcp/results and run summarize.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/dcp_gpu_bench}
source benchmark/dcp/gpu_common.sh
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install serving attention stages upstream summary)
num_gpus=$(nvidia-smi --list-gpus | wc -l)
TP=${TP:-$([ "$num_gpus" -ge 4 ] && echo 4 || echo 2)}
# --resume: a sweep cut short by a call's time limit goes on in the next call on the warm machine
card=$(gpu_card)
SWEEP_ARGS=(--tp "$TP" --dcp 2 --card "$card" --out "$OUT")
if [ "$TP" -ge 8 ]; then  # the upstream PR's headline tables (8x H20): 32k/4k and 32k/8k
  SWEEP_ARGS+=(--shapes 32768x4096,32768x8192 --concurrency 32,48,64,80,96 --latency-inputs 32768
               --latency-output 4096 --kv-rows 1500000)
fi
read -ra extra <<< "${SWEEP_EXTRA:-}"
SWEEP_ARGS+=("${extra[@]}")

for stage in "${stages[@]}"; do
  case $stage in
    install) install_plugin ;;
    serving)
      setup_env
      TMPDIR=$WORK run_stage serving python3 benchmark/dcp/bench_serving_sweep.py "${SWEEP_ARGS[@]}" \
        --resume "$WORK/serving_sweep_tp$TP.json"
      ;;
    attention)
      setup_env
      run_stage attention python3 benchmark/dcp/bench_attention.py --dcp 2 --out "$OUT"
      ;;
    stages)
      setup_env
      full=$OUT/bench_attention.json  # else the published one, if measured on this card model
      [ -f "$full" ] || full=benchmark/dcp/results/bench_attention.json
      grep -q "\"card\": \"[0-9]*x ${card#*x }\"" "$full" || full=
      run_stage stages python3 benchmark/dcp/bench_attention_stages.py --dcp 2 --batches 1,32,64,256 \
        --contexts 4096,8192,32768,131072 --steps-per-graph 50 ${full:+--full "$full"} --out "$OUT"
      ;;
    transport)
      setup_env
      run_stage transport python3 benchmark/dcp/bench_transport.py --dcp-sizes 2,4 --out "$OUT"
      ;;
    upstream)
      [ -f /tmp/site-0.5.16/sgl_offline_env.py ] || bash .device-0.5.16/install.sh
      setup_env /tmp/site-0.5.16
      # this repo's helpers on the path, its plugin not loaded (SGLANG_PLUGINS: a whitelist)
      PYTHONPATH=$PYTHONPATH:$PWD/python SGLANG_PLUGINS=none TMPDIR=$WORK run_stage upstream \
        python3 benchmark/dcp/bench_serving_sweep.py "${SWEEP_ARGS[@]}" --engine upstream --configs dcp \
        --resume "$WORK/serving_sweep_upstream_tp$TP.json"
      ;;
    summary)
      python3 benchmark/dcp/gpu_summary.py "$WORK" "$OUT/gpu_bench.json" "$card"
      (cd "$WORK" && tar czf "$OUT/gpu_bench_logs.tgz" $(ls *.log dcp_sweep_*/*.log 2>/dev/null))
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
