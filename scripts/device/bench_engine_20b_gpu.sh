#!/usr/bin/env bash
# `safeguard bench engine` on the 20b-shaped random model with every layer on an NVIDIA GPU.
#
# The safeguard binary is built where it is convenient, with llama.cpp as shared libraries:
#   LLAMA_BUILD_SHARED_LIBS=1 cargo build -p safeguard      (libllama.so and libggml*.so land beside the binary)
# This script builds the same llama.cpp source (llama-cpp-sys-2's copy, so the C API is the one the binary was
# generated against) with CUDA on the GPU machine, and runs the binary against those libraries instead. It
# writes the model and measures the GPU's read bandwidth while the CUDA build runs, so the decode bound is
# measured in the same run.
# The binary needs some libllama.so to start at all, so the model is written with CPU_LIBS (any build of the same
# llama.cpp, e.g. the ones beside the binary) while the CUDA build runs.
# With BASELINE_BIN set, the decision-size run is made with that binary first and then with BIN, in the same run.
#   bash scripts/device/bench_engine_20b_gpu.sh BIN LLAMA_CPP_SRC CPU_LIBS [out-dir]
set -uo pipefail
bin=$(realpath "$1")
src=$(realpath "$2")
cpu_libs=$(realpath "$3")
out=${4:-${OUT:-/tmp/safeguard-bench}}
baseline=""
if [ -n "${BASELINE_BIN:-}" ]; then
  [ -x "$BASELINE_BIN" ] || { echo "BASELINE_BIN $BASELINE_BIN is not an executable" >&2; exit 2; }
  baseline=$(realpath "$BASELINE_BIN")
fi
decode_tokens=${DECODE_TOKENS:-256}
model=${MODEL:-/tmp/gpt-oss-20b-shapes.gguf}
build=${BUILD:-/tmp/llama-cuda}
mkdir -p "$out"
log="$out/bench_engine_20b_gpu.log"
{
  echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null | head -1)
  [ -n "$nvcc" ] || { echo "no nvcc"; exit 1; }
  "$nvcc" --version | tail -1

  # Both are CPU- or GPU-light beside the CUDA compile, so they run alongside it.
  started=$(date +%s)
  # Its output goes to its own log, not into the pipe to tee: an early exit must not wait for the model.
  ( [ -f "$model" ] || LD_LIBRARY_PATH="$cpu_libs" "$bin" models tiny --shape 20b --out "$model"
    cat "$model" >/dev/null ) >>"$out/model.log" 2>&1 &
  model_job=$!
  python3 - >"$out/bandwidth.txt" 2>&1 <<'EOF' &
import time, torch
# Read-only traffic, as a decode step's weight reads are: a sum over 8 GiB of bf16.
x = torch.ones(4 << 30, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    x.sum()
torch.cuda.synchronize()
best = float("inf")
for _ in range(10):
    t = time.perf_counter(); x.sum(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - t)
print(f"{x.numel() * 2 / best / 1e9:.1f}")
EOF
  bandwidth_job=$!

  cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$out/cmake.log" 2>&1 \
    || { tail -30 "$out/cmake.log"; exit 1; }
  cmake --build "$build" --target llama -j "$(nproc)" >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "llama.cpp with CUDA built in $(( $(date +%s) - started )) s"
  libs=$(dirname "$(find "$build" -name 'libllama.so*' | head -1)")
  export LD_LIBRARY_PATH="$libs"
  ldd "$bin" | grep -E "llama|ggml"
  ls "$libs" | grep -E "ggml-cuda" || { echo "no CUDA backend library in $libs"; exit 1; }

  wait "$model_job" || { cat "$out/model.log"; exit 1; }
  echo "model ready $(( $(date +%s) - started )) s after the start: $(du -h "$model" | cut -f1)"
  wait "$bandwidth_job"
  bandwidth=$(tail -1 "$out/bandwidth.txt")
  gpu=(--model "$model" --gpu-layers 99 --threads 8)
  if [[ $bandwidth =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "GPU read bandwidth (torch sum over 8 GiB bf16, best of 10): $bandwidth GB/s"
    gpu+=(--bandwidth-gbps "$bandwidth")
  else
    echo "GPU read bandwidth not measured: $(cat "$out/bandwidth.txt")"
  fi

  status=0
  for run in ${baseline:+"$baseline"} "$bin"; do
    echo; echo "## $run: a decision's size: policy prefix 1024, content 256, $decode_tokens reasoning tokens"
    timeout 200 "$run" bench engine "${gpu[@]}" --prefix-tokens 1024 --content-tokens 256 \
      --decode-tokens "$decode_tokens" --batch-sizes 1,4,16,64 || status=1
  done
  echo; echo "## the CPU table's shape: prefix 512, content 64, 32 tokens"
  timeout 150 "$bin" bench engine "${gpu[@]}" --prefix-tokens 512 --content-tokens 64 --decode-tokens 32 \
    --batch-sizes 1,2,4 --json >"$out/bench_cpu_shape.json" || status=1
  cat "$out/bench_cpu_shape.json"
  exit "$status"
} 2>&1 | tee "$log"
