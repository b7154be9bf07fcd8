# Shared by gpu_check.sh and gpu_bench.sh (sourced from the repo root on the GPU machine).
# WORK collects logs and per-stage results while the machine is warm; OUT gets what comes back.
export WORK=${WORK:-/tmp/dcp_gpu_work}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"

install_plugin() {  # the SGLang 0.5.14 bundle (.device) into /tmp/site if missing, then this
  # package, then FlashInfer kernels compiled ahead where carried (.carry/flashinfer-aot, from
  # benchmark/dcp/flashinfer_prebuild.py build)
  [ -f /tmp/site/sgl_offline_env.py ] || bash .device/install.sh
  rm -rf build
  python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target /tmp/site .
  if [ -d .carry/flashinfer-aot ]; then
    (setup_env && python3 benchmark/dcp/flashinfer_prebuild.py install --src .carry/flashinfer-aot)
  fi
}

setup_env() {  # SITE (default /tmp/site) on PYTHONPATH, with the bundle's offline environment
  export PYTHONPATH=${1:-/tmp/site}
  eval "$(python3 "$PYTHONPATH/sgl_offline_env.py")"
}

free_gpus() {  # kill what an earlier stage stopped by a timeout left on the GPUs (SGLang
  # servers run in their own session, so they outlive the stage's process group): only on the
  # GPUs of CUDA_VISIBLE_DEVICES (indices or UUIDs) where set, so that the other parts of an
  # A+B stage of gpu_check.sh live on, on every GPU where unset
  local gpus=all
  [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && gpus=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader |
    awk -F', ' -v vis=",$CUDA_VISIBLE_DEVICES," 'index(vis, "," $1 ",") || index(vis, "," $2 ",") {print $2}')
  for pid in $(nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader |
               awk -F', ' -v gpus="$gpus" 'gpus == "all" || index(gpus, $2) {print $1}' | sort -u); do
    kill -9 "$pid"
  done
}

run_stage() {  # name, command...: log to $WORK/<name>.log, record the exit code, time and
  # commit (DCP_COMMIT); the command sees its stage's name in DCP_STAGE;
  # STAGE_TIMEOUT (seconds; unset: none) stops the command there (exit code 124), so that a
  # stage cut short still leaves the call time to pack its results. KEEP_GPU_PROCESSES=1: the
  # stage shares its GPU with others running now, so nothing on it is killed first
  local name=$1; shift
  local t0=$SECONDS
  [ "${KEEP_GPU_PROCESSES:-0}" = 1 ] || free_gpus
  echo "=== $name: $*"
  DCP_STAGE=$name timeout "${STAGE_TIMEOUT:-0}" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local shared=false
  [ "${SGLANG_DCP_SHARED_GPU:-0}" = 1 ] && shared=true
  echo "{\"stage\": \"$name\", \"returncode\": $rc, \"seconds\": $((SECONDS - t0)), \"shared_gpu\": $shared," \
    "\"commit\": \"${DCP_COMMIT:-unknown}\", \"finished\": \"$(date -u '+%Y-%m-%d %H:%M UTC')\"}" > "$WORK/stage_$name.json"
  tail -n 5 "$WORK/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

gpu_card() {  # e.g. "2x NVIDIA H100 80GB HBM3"
  nvidia-smi --query-gpu=name --format=csv,noheader | awk '{n++; name=$0} END {print n "x " name}'
}
