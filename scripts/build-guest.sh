#!/usr/bin/env bash
# Builds the guest binaries (clawos-init, clawos-agent, clawos-audit, clawos-agentd) as static
# executables: they run as PID 1 and inside an image without a dynamic loader.
# clawos-audit links libbpf (vendored) with Debian's libelf.a and libz.a.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p clawos-guest -p clawos-guest-audit -p clawos-agentd "$@"
echo "guest binaries: $(pwd)/target/x86_64-unknown-linux-gnu/release/{clawos-init,clawos-agent,clawos-audit,clawos-agentd}"
