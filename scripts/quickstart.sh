#!/usr/bin/env bash
# The main job on a fresh machine: install, build, make and sign the default agent image,
# start vm-launcher, boot an agent VM, show it running, run a command and copy a file in
# it, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CLAWOS_STATE_DIR="${CLAWOS_STATE_DIR:-$HOME/.clawos}"
export PATH="$PWD/target/release:$PATH"
PORT="${CLAWOS_LAUNCHER_PORT:-2080}"
export CLAWOS_LAUNCHER_URL="http://127.0.0.1:$PORT"
mkdir -p "$CLAWOS_STATE_DIR"

KEY="$CLAWOS_STATE_DIR/signing.key"
[ -f "$KEY" ] || clawos keygen --out "$KEY" >/dev/null
IMAGE="$CLAWOS_STATE_DIR/images/default"
if [ ! -f "$IMAGE/manifest.json" ]; then
  echo "==> building the default agent image"
  clawos image build --out "$IMAGE"
fi
PUBKEY=$(clawos image sign "$IMAGE" --key "$KEY" --json | sed -n 's/.*"public_key": "\([0-9a-f]*\)".*/\1/p')
export CLAWOS_SIGNING_PUBKEY="$PUBKEY"
clawos image verify "$IMAGE"

echo "==> starting vm-launcher on 127.0.0.1:$PORT (log: $CLAWOS_STATE_DIR/vm-launcher.log)"
vm-launcher --addr "127.0.0.1:$PORT" --image "$IMAGE" >"$CLAWOS_STATE_DIR/vm-launcher.log" 2>&1 &
LAUNCHER=$!
trap 'kill $LAUNCHER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "$CLAWOS_LAUNCHER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

echo "==> clawos vm start my-agent --model claude-sonnet-4-5 --mem 512"
clawos vm start my-agent --model claude-sonnet-4-5 --mem 512
echo "==> clawos vm list"
clawos vm list
echo "==> guest console (clawos vm logs my-agent)"
clawos vm logs my-agent | grep -E 'clawos|CLAWOS' || true
echo "==> clawos vm exec my-agent -- sh -c 'uname -r; cat /workspace/.env'"
clawos vm exec my-agent -- sh -c 'uname -r; cat /workspace/.env'
echo "==> clawos vm cp (a file into the VM, checksummed inside it)"
echo "hello from the host" > "$CLAWOS_STATE_DIR/hello.txt"
clawos vm cp "$CLAWOS_STATE_DIR/hello.txt" my-agent:/workspace/hello.txt
clawos vm exec my-agent -- sha256sum /workspace/hello.txt
echo "==> clawos vm stop my-agent"
clawos vm stop my-agent
clawos vm list
echo "done: the VM's disks stay in $CLAWOS_STATE_DIR/vms/my-agent (clawos vm rm my-agent deletes them)"
