#!/usr/bin/env bash
# Runs every test: unit tests, the veritysetup cross-check, and end-to-end tests that
# boot real VMs under QEMU through the real vm-launcher and clawos binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
CLAWOS_PROFILE=debug scripts/setup.sh
# Two cores: VM tests are CPU bound under software emulation.
cargo test --locked --workspace -- --test-threads=2
