#!/usr/bin/env bash
# Runs every test: unit tests, the veritysetup cross-check, and end-to-end tests that
# boot real VMs under QEMU through the real vm-launcher and clawos binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
CLAWOS_PROFILE=debug scripts/setup.sh
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
