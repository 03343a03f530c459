#!/usr/bin/env bash
# Runs every test: unit tests, the veritysetup cross-check, and end-to-end tests that
# boot real VMs under QEMU through the real vm-launcher and clawos binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
CLAWOS_PROFILE=debug scripts/setup.sh
# Real clients the tests use: PyJWT (independent token verifier) and the official
# anthropic and openai SDKs (inference-proxy).
if ! python3 -c "import jwt, cryptography, anthropic, openai" 2>/dev/null; then
  echo "==> installing PyJWT and the anthropic and openai SDKs for the tests"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip install --quiet pyjwt cryptography anthropic openai 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages pyjwt cryptography anthropic openai
fi
skipped=target/e2e/SKIPPED
mkdir -p target/e2e && rm -f "$skipped"
# Two cores: VM tests are CPU bound under software emulation.
status=0
cargo test --locked --workspace -- --test-threads=2 || status=$?
if [ -s "$skipped" ]; then
  echo "==> tests that could not run on this machine:"
  sed 's/^/    /' "$skipped"
fi
exit $status
