#!/usr/bin/env bash
# GPU check in two parts, for a GPU machine that has the CUDA driver and toolkit, PyTorch and
# Triton, but no Rust and no network:
#
#   scripts/gpu-check.sh build            # here (Rust): the GPU test binaries and dsv3, stripped, into .devbin/
#   scripts/gpu-check.sh run [OUTDIR]     # there (GPU): everything below, ≤ 6 minutes, into OUTDIR
#
# `run` finds NVRTC and the headers in the toolkit (/usr/local/cuda, or $CUDA_HOME), prints the
# device, runs the sm_90a compile check (registers/spills), the GPU-vs-reference property tests
# (REQUIRE_GPU=1), `dsv3 verify --gpu require`, `dsv3 gpu-bench` and the PyTorch yardsticks
# (benches/gpu_torch.py, same shapes, same run), and the calibration (benches/calibrate.py: our
# Triton kernel with kernel.py's semantics, torch._scaled_mm with block scales, our wgmma and simt
# backends, on V3 shapes and the accumulation probes). OUTDIR (default gpu-out, or $OUT) gets
# report.txt, verify.json and calib/calib_*.safetensors: 5 files, the largest ~12 MiB. Every step
# has a time limit and the whole run a deadline (RUN_SECONDS, default 340 s < 6 minutes). Back on
# any machine: `dsv3 judge-calibration OUTDIR/calib` says which Tensor Core parameters the
# hardware follows. Exit code 0 only if every step passed. GPU_BENCH_ARGS=--quick shortens the
# benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.devbin

build() {
  set -e
  rm -rf "$BIN" && mkdir -p "$BIN"
  cargo build --release --locked --bin dsv3
  cp target/release/dsv3 "$BIN/dsv3"
  # the test binaries that touch the GPU (they need no source tree at run time)
  cargo test --release --locked --no-run --message-format=json -p dsv3 --test gpu_ops -p dsv3-gpu --test kernels_compile 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        name = m["target"]["name"]
        if name in ("gpu_ops", "kernels_compile"):
            shutil.copy(m["executable"], "'"$BIN"'/" + name)
            print("built", name)
'
  strip "$BIN"/* 2>/dev/null || true
  ls -la "$BIN"
  echo "total: $(du -cm "$BIN"/* | tail -1 | cut -f1) MiB (the device run carries .devbin/; keep it under 40 MiB)"
}

run() {
  local out="${1:-${OUT:-gpu-out}}"
  mkdir -p "$out/calib"
  local report="$out/report.txt"
  # the whole run must end within 6 minutes: each step gets its own limit, cut to what is left
  # of RUN_SECONDS (default 340 s, leaving time to copy the results back)
  local deadline=$(( $(date +%s) + ${RUN_SECONDS:-340} ))
  local cuda="${CUDA_HOME:-/usr/local/cuda}"
  local nvrtc
  nvrtc=$(ls "$cuda"/lib64/libnvrtc.so.13 2>/dev/null || find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
  if [ -z "$nvrtc" ]; then echo "no libnvrtc.so.13 found" | tee "$report"; return 2; fi
  export LD_LIBRARY_PATH="$(dirname "$nvrtc"):/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DSV3_CUDA_INCLUDE="${DSV3_CUDA_INCLUDE:-$cuda/include}"
  export REQUIRE_GPU=1 REQUIRE_NVRTC=1
  local status=0
  : > "$report"
  step() {  # step SECONDS TITLE CMD...: run within SECONDS (and the deadline), append to the report
    local limit="$1" left=$(( deadline - $(date +%s) ))
    shift
    [ "$left" -lt "$limit" ] && limit="$left"
    echo "## $1 (limit ${limit}s)" | tee -a "$report"
    shift
    if [ "$limit" -le 0 ]; then echo "SKIPPED: no time left" | tee -a "$report"; status=1; return; fi
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$report"
    local rc="${PIPESTATUS[0]}"
    [ "$rc" -eq 124 ] && echo "TIMEOUT after ${limit}s" | tee -a "$report"
    echo "(${1##*/}: exit $rc, $(( $(date +%s) - t0 ))s)" | tee -a "$report"
    [ "$rc" -eq 0 ] || status=1
  }
  step 10 "dsv3 GPU check $(date -u +%FT%TZ)" nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  echo "nvrtc: $nvrtc; include: $DSV3_CUDA_INCLUDE" | tee -a "$report"
  step 30 "kernels_compile (sm_90a, registers and spills)" "$BIN/kernels_compile" --nocapture --test-threads=1
  step 90 "gpu_ops (GPU vs reference, REQUIRE_GPU=1)" "$BIN/gpu_ops" --nocapture --test-threads=1
  step 60 "dsv3 verify --gpu require" "$BIN/dsv3" verify --gpu require --report "$out/verify.json"
  step 60 "dsv3 gpu-bench" "$BIN/dsv3" gpu-bench --require ${GPU_BENCH_ARGS:-}
  step 40 "torch yardsticks (benches/gpu_torch.py)" python3 benches/gpu_torch.py ${GPU_BENCH_ARGS:-}
  step 60 "calibration (benches/calibrate.py)" python3 benches/calibrate.py --dsv3 "$BIN/dsv3" --out "$out/calib"
  echo "## status $status" | tee -a "$report"
  return $status
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build | run [OUTDIR]" >&2; exit 2 ;;
esac
