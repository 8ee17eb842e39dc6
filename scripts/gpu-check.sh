#!/usr/bin/env bash
# GPU check in two parts, for a GPU machine that has the CUDA driver and toolkit but no Rust and
# no network:
#
#   scripts/gpu-check.sh build          # here (Rust): build the GPU test binaries and dsv3 into .devbin/
#   scripts/gpu-check.sh run [REPORT]   # there (GPU): run them with REQUIRE_GPU=1, write one report file
#
# `run` finds NVRTC and the headers in the toolkit (/usr/local/cuda, or $CUDA_HOME), prints the
# device, runs the sm_90a compile check (registers/spills), the GPU-vs-reference property tests,
# `dsv3 verify --gpu require`, `dsv3 gpu-bench` and the PyTorch yardsticks (benches/gpu_torch.py,
# same shapes, same run), and writes everything to REPORT (default gpu-report.txt). Exit code 0
# only if every step passed. GPU_BENCH_ARGS=--quick shortens the benchmarks.
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
}

run() {
  local report="${1:-gpu-report.txt}"
  local cuda="${CUDA_HOME:-/usr/local/cuda}"
  local nvrtc
  nvrtc=$(ls "$cuda"/lib64/libnvrtc.so.13 2>/dev/null || find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
  if [ -z "$nvrtc" ]; then echo "no libnvrtc.so.13 found" | tee "$report"; return 2; fi
  export LD_LIBRARY_PATH="$(dirname "$nvrtc"):/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DSV3_CUDA_INCLUDE="${DSV3_CUDA_INCLUDE:-$cuda/include}"
  export REQUIRE_GPU=1 REQUIRE_NVRTC=1
  local status=0
  : > "$report"
  step() {  # step TITLE CMD...: run, append to the report, remember failure
    echo "## $1" | tee -a "$report"
    shift
    "$@" 2>&1 | tee -a "$report"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  }
  step "dsv3 GPU check $(date -u +%FT%TZ)" nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  echo "nvrtc: $nvrtc; include: $DSV3_CUDA_INCLUDE" | tee -a "$report"
  step "kernels_compile (sm_90a, registers and spills)" "$BIN/kernels_compile" --nocapture --test-threads=1
  step "gpu_ops (GPU vs reference, REQUIRE_GPU=1)" "$BIN/gpu_ops" --nocapture --test-threads=1
  step "dsv3 verify --gpu require" "$BIN/dsv3" verify --gpu require --report "${report%.txt}-verify.json"
  step "dsv3 gpu-bench" "$BIN/dsv3" gpu-bench --require ${GPU_BENCH_ARGS:-}
  step "torch yardsticks (benches/gpu_torch.py)" python3 benches/gpu_torch.py ${GPU_BENCH_ARGS:-}
  echo "## status $status" | tee -a "$report"
  return $status
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build | run [REPORT]" >&2; exit 2 ;;
esac
