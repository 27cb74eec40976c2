#!/usr/bin/env bash
# `safeguard bench engine` on the 20b-shaped random model, on a quiet many-core machine: writes the model,
# then runs the bench with the model mapped vs read into memory and at two thread counts, so that the
# report shows decode against the bandwidth bound and the peak RSS each way.
#   bash scripts/device/bench_engine_20b.sh [path/to/safeguard] [out-dir]
set -uo pipefail
bin=${1:-target/release/safeguard}
out=${2:-${OUT:-/tmp/safeguard-bench}}
model=${MODEL:-/tmp/gpt-oss-20b-shapes.gguf}
mkdir -p "$out"
log="$out/bench_engine_20b.log"
{
  echo "# $(date -u +%FT%TZ) $(uname -m)"
  nproc
  lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|Socket|NUMA node\(s\)|L3" || true
  free -g | head -2
  started=$(date +%s)
  [ -f "$model" ] || "$bin" models tiny --shape 20b --out "$model" || exit 1
  echo "model written in $(( $(date +%s) - started )) s: $(du -h "$model" | cut -f1)"
  cat "$model" > /dev/null # page cache warm, so that load time measures llama.cpp, not the disk
  common=(--model "$model" --prefix-tokens 512 --content-tokens 64 --decode-tokens 32)
  for threads in ${THREADS:-16 8}; do
    for mode in "" --mmap; do
      echo; echo "## threads $threads ${mode:-(read into memory)}"
      timeout 240 "$bin" bench engine "${common[@]}" --threads "$threads" $mode
    done
  done
} 2>&1 | tee "$log"
