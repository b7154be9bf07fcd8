#!/usr/bin/env bash
# The GPU proof of the FlashInfer DCP backend, run on the GPU machine from the repo root:
#
#   bash benchmark/dcp/gpu_check.sh [STAGE ...]     (no STAGE: all of them, in this order)
#
# A STAGE A+B[+...] of 2-GPU stages (kernels, e2e-tp2, e2e-llama, e2e-moe, e2e-fp8, http) runs its parts at once,
# part i on GPUs 2i,2i+1 (one after another where there are too few GPUs), e.g.
#
#   bash benchmark/dcp/gpu_check.sh install kernels+e2e-moe e2e-tp2+e2e-llama e2e-tp4 http summary
#
#   install  an offline SGLang 0.5.14 bundle (.device: the SGLang, sgl-kernel and FlashInfer
#            wheels with their install.sh, for a GPU machine without network) into /tmp/site
#            if missing, then this package, without network
#   kernels  test/srt/gpu/test_gpu_kernels.py: Triton merge + index kernels, DCP partial
#            attention + merge against float64 full attention (D = 2, 4); test_gpu_allocator.py:
#            SGLang's allocator kernels under DCP, logical pages that are not a power of two
#   e2e-tp2  test/srt/gpu/test_e2e_gpu.py at tp=2 (1 KV head): dcp 1 vs 2, CUDA graphs on/off
#   e2e-tp4  the same at tp=4 (2 KV heads); needs 4 GPUs
#   e2e-llama  the same at tp=2 for Llama at page size 16
#   e2e-fp8  the same at tp=2 with an FP8 KV cache, DCP storing with scale 0.5 (issue 13)
#   e2e-moe  the same for Qwen3-MoE (top 2 of 8 experts) at page size 16, its bars scaled by a
#            no-DCP baseline on the triton attention backend
#   http     benchmark/dcp/http_check.py: launch_server --tp 2 --dcp 2, /generate,
#            /v1/completions, sglang.bench_serving
#   summary  prints the table of every stage run so far and writes $OUT/gpu_check.json
#
# Logs and per-stage results collect in $WORK (default /tmp/dcp_gpu_work, kept while the
# machine is warm); the summary stage also packs the logs into $OUT/gpu_check_logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmark/dcp/gpu_common.sh

run_one() {  # one stage by name
  case $1 in
    install) install_plugin ;;
    kernels)
      setup_env
      run_stage kernels python3 -m pytest -q -p no:cacheprovider test/srt/gpu/test_gpu_kernels.py \
        test/srt/gpu/test_gpu_allocator.py --junitxml "$WORK/kernels.xml"
      ;;
    e2e-tp2|e2e-tp4|e2e-llama|e2e-moe|e2e-fp8)
      setup_env
      declare -A cases=([e2e-tp2]=tp2-kv1 [e2e-tp4]=tp4-kv2 [e2e-llama]=llama [e2e-moe]=qwen3moe [e2e-fp8]=fp8-kv)
      DCP_RESULTS_DIR=$WORK run_stage "$1" python3 -m pytest -q -s -p no:cacheprovider \
        test/srt/gpu/test_e2e_gpu.py -k "${cases[$1]}" --junitxml "$WORK/$1.xml"
      ;;
    http)  # HTTP_PORT: a port of its own beside the other parts of an A+B stage
      setup_env
      run_stage http python3 benchmark/dcp/http_check.py --tp 2 --dcp 2 --port "${HTTP_PORT:-30010}" \
        --out "$WORK"
      ;;
    summary)
      python3 benchmark/dcp/gpu_summary.py "$WORK" "$OUT/gpu_check.json" "$(gpu_card)"
      tar czf "$OUT/gpu_check_logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null)
      ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}

run_parts() {  # A+B...: part i on GPUs 2i,2i+1 (nvidia-smi's order), all at once, their output
  # prefixed by [part]; one after another where the machine has fewer than 2 GPUs a part
  local parts part i=0 t0=$SECONDS num_gpus
  IFS=+ read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    case $part in
      kernels|e2e-tp2|e2e-llama|e2e-moe|e2e-fp8|http) ;;
      *) echo "$1: $part is not a 2-GPU stage (kernels e2e-tp2 e2e-llama e2e-moe e2e-fp8 http)"; exit 2 ;;
    esac
  done
  num_gpus=$(nvidia-smi --list-gpus | wc -l)
  if [ "$num_gpus" -lt $((2 * ${#parts[@]})) ]; then
    echo "=== $1: $num_gpus GPUs, fewer than the $((2 * ${#parts[@]})) it needs: one part after another"
    for part in "${parts[@]}"; do run_one "$part"; done
    return
  fi
  for part in "${parts[@]}"; do
    (
      export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$((2 * i)),$((2 * i + 1))
      export HTTP_PORT=$((30010 + 10 * i))
      echo "=== $part on GPUs $CUDA_VISIBLE_DEVICES"
      run_one "$part"
    ) 2>&1 | sed -u "s/^/[$part] /" &
    i=$((i + 1))
  done
  wait
  echo "=== $1: all ${#parts[@]} parts done in $((SECONDS - t0)) s"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install kernels e2e-tp2 e2e-tp4 e2e-llama e2e-moe e2e-fp8 http summary)

for stage in "${stages[@]}"; do
  case $stage in
    *+*) run_parts "$stage" ;;
    *) run_one "$stage" ;;
  esac
done
