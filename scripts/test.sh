#!/usr/bin/env bash
# Runs every test: unit tests, the veritysetup cross-check, and end-to-end tests that
# boot real VMs under QEMU through the real vm-launcher and clawos binaries.
#
# Every test that does not run records a line `SKIP <test>: <why>` in
# <target>/e2e/SKIPPED. The run fails on any skip not allowed below, naming it and why:
# a missing tool (qemu, veritysetup, the Firecracker spec, ...) turns it red.
# `scripts/test.sh --check-skips FILE` checks a SKIPPED file alone.
set -euo pipefail

# Skips a machine may have for good reason, as `<test>: <start of the reason>`.
ALLOWED_SKIPS=(
  # Firecracker needs hardware KVM (vmx/svm and /dev/kvm), which hosts running the
  # tests under QEMU/TCG (cloud and nested VMs) lack, and scripts/setup.sh installs no
  # firecracker for that reason. The QEMU backend's tests boot the same images there.
  "firecracker_backend_boots_and_stops_a_vm: no firecracker binary on PATH"
  "firecracker_backend_boots_and_stops_a_vm: no hardware KVM"
  "jailed_firecracker_boots_and_stops_a_vm: no firecracker binary on PATH"
  "jailed_firecracker_boots_and_stops_a_vm: no hardware KVM"
)

# Lists the skips in $1; fails if one is not in ALLOWED_SKIPS.
check_skips() {
  local file=$1 line allowed ok bad=0
  [ -s "$file" ] || return 0
  echo "==> tests that could not run on this machine:"
  while IFS= read -r line; do
    ok=""
    for allowed in "${ALLOWED_SKIPS[@]}"; do
      case "$line" in "SKIP $allowed"*) ok=1; break ;; esac
    done
    if [ -n "$ok" ]; then
      echo "    (allowed) $line"
    else
      echo "    NOT ALLOWED: $line"
      bad=$((bad + 1))
    fi
  done < <(sort -u "$file")
  if [ "$bad" -gt 0 ]; then
    echo "==> FAILED: $bad skip(s) not on the allow-list (ALLOWED_SKIPS in scripts/test.sh):" \
      "give the tests what each names (scripts/setup.sh installs the tools), or allow it" \
      "there with why a machine cannot"
    return 1
  fi
}

if [ "${1:-}" = "--check-skips" ]; then
  check_skips "${2:?usage: scripts/test.sh --check-skips FILE}"
  exit
fi

cd "$(dirname "$0")/.."
CLAWOS_PROFILE=debug scripts/setup.sh
# Real clients the tests use: PyJWT (independent token verifier), the official
# anthropic and openai SDKs (inference-proxy) and the official MCP SDK (skill-manager).
if ! python3 -c "import jwt, cryptography, anthropic, openai, mcp" 2>/dev/null; then
  echo "==> installing PyJWT and the anthropic, openai and mcp SDKs for the tests"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip install --quiet pyjwt cryptography anthropic openai mcp 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages pyjwt cryptography anthropic openai mcp
fi
# Test-only tools, not the host's: pebble (+ pebble-challtestsrv), the ACME CA the
# control plane's certificate tests get certificates from; chromium, the browser its
# web-console test drives.
test_missing=()
# python3-pysaml2 (+ python3-lxml, xmlsec1): the SAML identity provider the SAML login
# test logs in through (it runs on Debian's /usr/bin/python3).
for p in pebble chromium python3-pysaml2 python3-lxml xmlsec1; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || test_missing+=("$p")
done
if [ ${#test_missing[@]} -gt 0 ]; then
  echo "==> installing ${test_missing[*]} for the tests"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${test_missing[@]}" >/dev/null
fi
# playwright-core (pinned in its package-lock.json; it drives Debian's chromium, it
# downloads no browser) for the web console's browser test.
if [ ! -d tests/e2e/console/node_modules/playwright-core ]; then
  echo "==> installing playwright-core for the web console test"
  (cd tests/e2e/console && npm ci --no-audit --no-fund --silent)
fi
# oidc-provider (the certified OpenID provider library, pinned) for the login tests.
if [ ! -d tests/e2e/oidc/node_modules/oidc-provider ]; then
  echo "==> installing oidc-provider for the OIDC login test"
  (cd tests/e2e/oidc && npm ci --no-audit --no-fund --silent)
fi
skipped=${CARGO_TARGET_DIR:-target}/e2e/SKIPPED
measured=${CARGO_TARGET_DIR:-target}/e2e/MEASURED
mkdir -p "$(dirname "$skipped")" && rm -f "$skipped" "$measured"
# Two cores: VM tests are CPU bound under software emulation. --no-fail-fast: a failing
# test binary does not hide the results of every one after it.
status=0
echo "==> setup done in $SECONDS s; building and running the tests"
cargo test --locked --workspace --no-fail-fast -- --test-threads=2 || status=$?
echo "==> tests done ($SECONDS s since scripts/test.sh started)"
# What the end-to-end tests measured on the way (docs/benchmarks.md quotes them).
if [ -s "$measured" ]; then
  echo "==> measured in this run:"
  sed 's/^/    /' "$measured"
fi
check_skips "$skipped" || [ "$status" -ne 0 ] || status=1
exit $status
