#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install build needs (only those), build, make a tiny model, classify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --build-only
cargo build --release -p safeguard
bin="${CARGO_TARGET_DIR:-target}/release/safeguard"
mkdir -p target/demo
[ -f target/demo/tiny.gguf ] || "$bin" models tiny --out target/demo/tiny.gguf --seed 7
"$bin" policy lint policies/spam.md
"$bin" prompt --policy policies/spam.md --text "Your account is locked. Enter your password here: http://x.co" --format text
"$bin" classify --policy policies/spam.md --model target/demo/tiny.gguf --effort low --max-tokens 64 \
  --text "Your account is locked. Enter your password here: http://x.co" --show-reasoning || true
echo "demo: done (a tiny random model decides nothing real: expect needs_review)"
