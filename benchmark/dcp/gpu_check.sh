#!/usr/bin/env bash
# The GPU proof of the FlashInfer DCP backend, run on the GPU machine from the repo root:
#
#   bash benchmark/dcp/gpu_check.sh [STAGE ...]     (no STAGE: all of them, in this order)
#
# A STAGE A+B[+...] runs its parts at once: part i on GPUs 2i,2i+1 where the machine has
# 2 GPUs per part (2-GPU stages only), all on GPU 0 in the shared-GPU mode on a 1-GPU machine,
# else one after another, e.g.
#
#   bash benchmark/dcp/gpu_check.sh install kernels+e2e-moe e2e-tp2+e2e-llama e2e-tp4 http summary
#
#   install  an offline SGLang 0.5.14 bundle (.device: the SGLang, sgl-kernel and FlashInfer
#            wheels with their install.sh, for a GPU machine without network) into /tmp/site
#            if missing, then this package, without network, then the FlashInfer kernels
#            compiled ahead where carried (.carry/flashinfer-aot: flashinfer_prebuild.py)
#   kernels  test/srt/gpu/test_gpu_kernels.py: Triton merge + index kernels, DCP partial
#            attention + merge against float64 full attention (D = 2, 4; decode, extend, and the
#            speculative verify tree and draft decode step); test_gpu_allocator.py: SGLang's
#            allocator kernels under DCP, logical pages that are not a power of two;
#            test_gpu_speculative_kernels.py: the CPU speculation test mode's kernels against
#            SGLang's Triton and sgl_kernel's CUDA tree kernels
#   e2e-tp2  test/srt/gpu/test_e2e_gpu.py at tp=2 (1 KV head): dcp 1 vs 2, CUDA graphs on/off
#   e2e-tp4  the same at tp=4 (2 KV heads)                                    (4 GPUs)
#   e2e-dcp4 the same at tp=4, 1 KV head, dcp 4                               (4 GPUs)
#   e2e-llama  the same at tp=2 for Llama at page size 16
#   e2e-fp8  the same at tp=2 with an FP8 KV cache, DCP storing with scale 0.5
#   e2e-moe  the same for Qwen3-MoE (top 2 of 8 experts) at page size 16, its bars scaled by a
#            no-DCP baseline on the triton attention backend
#   e2e-pressure  a load over 4x the logical pool: retractions and evictions, dcp 1 vs 2
#   e2e-spec test/srt/gpu/test_e2e_speculative_gpu.py at tp=2: speculative decoding (NGRAM,
#            EAGLE topk 1 and 4, page 1 and 16, EAGLE3, STANDALONE) under dcp 2 vs dcp 1 with the
#            same settings and vs no speculation, eager
#   e2e-spec-dcp4  the same for EAGLE topk 4 at tp=4, dcp 4                   (4 GPUs)
#   e2e-spec-ngram, e2e-spec-eagle-topk1, e2e-spec-eagle3, e2e-spec-eagle-topk4,
#   e2e-spec-standalone, e2e-spec-page16  e2e-spec's cases one by one (about four eager engines
#            each: its own no-speculation run, dcp 1, dcp 2 per --dcp-comm), to run at once, e.g.
#            with e2e-spec-dcp4 on one GPU:
#            bash benchmark/dcp/gpu_check.sh e2e-spec-ngram+e2e-spec-eagle-topk1+e2e-spec-eagle3+e2e-spec-eagle-topk4+e2e-spec-standalone+e2e-spec-page16+e2e-spec-dcp4
#   e2e-hicache  test/srt/gpu/test_e2e_hicache_gpu.py at tp=2: HiCache (SGLang's host-pool copy
#            kernels, kernel and direct I/O, layouts page_first, layer_first, page_first_direct,
#            L3 file storage) under dcp 2 vs dcp 1 with the same settings and vs no HiCache
#   e2e-hicache-dcp4  the same at tp=4, dcp 4                                 (4 GPUs)
#   http     benchmark/dcp/http_check.py: launch_server --tp 2 --dcp 2, /generate,
#            /v1/completions, sglang.bench_serving, once per --dcp-comm
#   soak     benchmark/dcp/soak.py --device cuda: SOAK_REQUESTS (1000) requests to a dcp 1 server
#            and a dcp 2 server per --dcp-comm, greedy splits judged by the near-tie gap 0.1
#   summary  prints the table of every stage run so far and writes $OUT/gpu_check.json (and
#            $OUT/gpu_shared.json: the rows run in the shared-GPU mode)
#
# Every DCP run is made with each --dcp-comm of DCP_COMM (default a2a,lse). A stage that needs
# more GPUs than the machine (or its part of it) has runs in the shared-GPU test mode
# (SGLANG_DCP_SHARED_GPU=1: all ranks on one GPU over gloo, eager; its CUDA-graph runs are
# skipped and its results say so). DCP_COMMIT names the code in the summary.
#
# Logs and per-stage results collect in $WORK (default /tmp/dcp_gpu_work, kept while the
# machine is warm); the summary stage also packs the logs into $OUT/gpu_check_logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmark/dcp/gpu_common.sh
export DCP_COMM=${DCP_COMM:-a2a,lse}

declare -A GPUS_NEEDED=([kernels]=1 [e2e-tp2]=2 [e2e-tp4]=4 [e2e-dcp4]=4 [e2e-llama]=2 [e2e-fp8]=2
                        [e2e-moe]=2 [e2e-pressure]=2 [e2e-spec]=2 [e2e-spec-dcp4]=4 [e2e-spec-ngram]=2
                        [e2e-spec-eagle-topk1]=2 [e2e-spec-eagle3]=2 [e2e-spec-eagle-topk4]=2
                        [e2e-spec-standalone]=2 [e2e-spec-page16]=2 [e2e-hicache]=2
                        [e2e-hicache-dcp4]=4 [http]=2 [soak]=2)
declare -A E2E_CASES=([e2e-tp2]=tp2-kv1 [e2e-tp4]=tp4-kv2 [e2e-dcp4]=tp4-kv1-dcp4 [e2e-llama]=llama
                      [e2e-moe]=qwen3moe [e2e-fp8]=fp8-kv [e2e-pressure]=memory_pressure
                      [e2e-spec]="not dcp4" [e2e-spec-dcp4]=dcp4 [e2e-spec-ngram]=ngram
                      [e2e-spec-eagle-topk1]=eagle-topk1 [e2e-spec-eagle3]=eagle3
                      [e2e-spec-eagle-topk4]="eagle-topk4 and not page16 and not dcp4"
                      [e2e-spec-standalone]=standalone [e2e-spec-page16]=page16 [e2e-hicache]="not dcp4"
                      [e2e-hicache-dcp4]=dcp4)

visible_gpus() {  # CUDA_VISIBLE_DEVICES' count where set (a part of an A+B stage), else all
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | wc -l
  else nvidia-smi --list-gpus | wc -l; fi
}

share_gpu_if_short() {  # stage: the shared-GPU mode where it needs more GPUs than it sees
  local have
  have=$(visible_gpus)
  if [ "$have" -lt "${GPUS_NEEDED[$1]}" ]; then
    export SGLANG_DCP_SHARED_GPU=1
    echo "=== $1: needs ${GPUS_NEEDED[$1]} GPUs, $have here: shared-GPU mode (one GPU, gloo, eager; CUDA-graph runs skipped)"
  else
    export SGLANG_DCP_SHARED_GPU=0
  fi
}

run_one() {  # one stage by name
  case $1 in
    install) install_plugin ;;
    summary)
      python3 benchmark/dcp/gpu_summary.py "$WORK" "$OUT/gpu_check.json" "$(gpu_card)" "${DCP_COMMIT:-unknown}"
      # the kernels compiled on this machine so far (FlashInfer's and SGLang's JIT), by size: what
      # a fresh machine compiles again before its first engine runs
      find "$HOME/.cache" -name '*.so' -printf '%s %TT %p\n' 2>/dev/null | sort -n > "$WORK/jit_cache.log"
      tar czf "$OUT/gpu_check_logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null)
      ;;
    *)
      [ -n "${GPUS_NEEDED[$1]:-}" ] || { echo "unknown stage $1"; exit 2; }
      setup_env
      share_gpu_if_short "$1"
      case $1 in
        kernels)
          run_stage kernels python3 -m pytest -q -p no:cacheprovider test/srt/gpu/test_gpu_kernels.py \
            test/srt/gpu/test_gpu_allocator.py test/srt/gpu/test_gpu_speculative_kernels.py \
            --junitxml "$WORK/kernels.xml"
          ;;
        e2e-*)
          local test_file=test/srt/gpu/test_e2e_gpu.py
          [[ $1 == e2e-spec* ]] && test_file=test/srt/gpu/test_e2e_speculative_gpu.py
          [[ $1 == e2e-hicache* ]] && test_file=test/srt/gpu/test_e2e_hicache_gpu.py
          DCP_RESULTS_DIR=$WORK run_stage "$1" python3 -m pytest -q -s -p no:cacheprovider \
            "$test_file" -k "${E2E_CASES[$1]}" --junitxml "$WORK/$1.xml"
          ;;
        http)  # HTTP_PORT: a port of its own beside the other parts of an A+B stage
          run_stage http bash -c 'rc=0; for comm in ${DCP_COMM//,/ }; do
            python3 benchmark/dcp/http_check.py --tp 2 --dcp 2 --dcp-comm $comm --port "${HTTP_PORT:-30010}" \
              --out "$WORK" || rc=1; done; exit $rc'
          ;;
        soak)
          run_stage soak python3 benchmark/dcp/soak.py --device cuda --dcp-comm "$DCP_COMM" \
            --near-tie-gap 0.1 --num-requests "${SOAK_REQUESTS:-1000}" --time-limit "${SOAK_TIME_LIMIT:-480}" \
            --port "${SOAK_PORT:-30400}" --out "$WORK/soak.json"
          ;;
      esac
      ;;
  esac
}

run_parts() {  # A+B...: at once on GPU pairs, or all on GPU 0 (shared) on a 1-GPU machine
  local parts part i=0 t0=$SECONDS num_gpus
  IFS=+ read -ra parts <<< "$1"
  num_gpus=$(nvidia-smi --list-gpus | wc -l)
  for part in "${parts[@]}"; do
    [ -n "${GPUS_NEEDED[$part]:-}" ] || { echo "$1: $part cannot run as a part"; exit 2; }
    if [ "$num_gpus" -gt 1 ] && [ "${GPUS_NEEDED[$part]}" -gt 2 ]; then
      echo "$1: $part needs ${GPUS_NEEDED[$part]} GPUs; run it on its own"; exit 2
    fi
  done
  if [ "$num_gpus" -gt 1 ] && [ "$num_gpus" -lt $((2 * ${#parts[@]})) ]; then
    echo "=== $1: $num_gpus GPUs, fewer than the $((2 * ${#parts[@]})) it needs: one part after another"
    for part in "${parts[@]}"; do run_one "$part"; done
    return
  fi
  [ "$num_gpus" -gt 1 ] || free_gpus  # once: the parts share GPU 0 and must not kill each other
  for part in "${parts[@]}"; do
    (
      if [ "$num_gpus" -gt 1 ]; then
        export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$((2 * i)),$((2 * i + 1))
      else
        export KEEP_GPU_PROCESSES=1
      fi
      export HTTP_PORT=$((30010 + 10 * i)) SOAK_PORT=$((30400 + 10 * i))
      echo "=== $part on GPUs ${CUDA_VISIBLE_DEVICES:-0 (shared)}"
      run_one "$part"
    ) 2>&1 | sed -u "s/^/[$part] /" &
    i=$((i + 1))
  done
  wait
  echo "=== $1: all ${#parts[@]} parts done in $((SECONDS - t0)) s"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install kernels e2e-tp2 e2e-tp4 e2e-dcp4 e2e-llama e2e-moe e2e-fp8 e2e-pressure
                                   e2e-spec e2e-spec-dcp4 e2e-hicache e2e-hicache-dcp4 http soak summary)

for stage in "${stages[@]}"; do
  case $stage in
    *+*) run_parts "$stage" ;;
    *) run_one "$stage" ;;
  esac
done
