#!/usr/bin/env bash
# The main job on a fresh machine: install and build; make and sign the default agent
# image; bring the host up (identity-manager, inference-proxy, vm-launcher); boot an agent
# VM; give its agent a task that makes it write a file with a tool; show the answer, the
# file (copied out of the VM) and the proxy's usage row for that agent; stop the VM.
#
# The model: with ANTHROPIC_API_KEY set, the real Anthropic API. Without it, the
# project's scripted stand-in (clawos-scripted-model), which plays two recorded turns
# (call the write tool, then answer) in the real API's wire format. It is not a model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CLAWOS_STATE_DIR="${CLAWOS_STATE_DIR:-$HOME/.clawos}"
export PATH="$PWD/target/release:$PATH"
PORT="${CLAWOS_LAUNCHER_PORT:-2080}"
ID_PORT="${CLAWOS_IDENTITY_PORT:-2082}"
PROXY_PORT="${CLAWOS_PROXY_PORT:-11435}"
export CLAWOS_LAUNCHER_URL="http://127.0.0.1:$PORT"
export CLAWOS_IDENTITY_URL="http://127.0.0.1:$ID_PORT"
export CLAWOS_PROXY_URL="http://127.0.0.1:$PROXY_PORT"
LOGS="$CLAWOS_STATE_DIR/logs"
mkdir -p "$CLAWOS_STATE_DIR" "$LOGS"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_http() {
  for _ in $(seq 200); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$2 did not come up; its log: $3" >&2; tail -20 "$3" >&2; exit 1
}

KEY="$CLAWOS_STATE_DIR/signing.key"
[ -f "$KEY" ] || clawos keygen --out "$KEY" >/dev/null
IMAGE="$CLAWOS_STATE_DIR/images/default"
if [ ! -f "$IMAGE/manifest.json" ]; then
  echo "==> building the default agent image (kernel, verified rootfs, the built-in agent runtime)"
  clawos image build --out "$IMAGE"
fi
PUBKEY=$(clawos image sign "$IMAGE" --key "$KEY" --json | sed -n 's/.*"public_key": "\([0-9a-f]*\)".*/\1/p')
export CLAWOS_SIGNING_PUBKEY="$PUBKEY"
clawos image verify "$IMAGE"

echo "==> identity-manager on 127.0.0.1:$ID_PORT (log: $LOGS/identity-manager.log)"
identity-manager --addr "127.0.0.1:$ID_PORT" >"$LOGS/identity-manager.log" 2>&1 &
PIDS+=($!)
wait_http "$CLAWOS_IDENTITY_URL/healthz" identity-manager "$LOGS/identity-manager.log"

if [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  echo "==> model: the Anthropic API (ANTHROPIC_API_KEY is set; it stays in inference-proxy)"
  MODEL="${CLAWOS_MODEL:-claude-sonnet-4-5}"
  UPSTREAM="https://api.anthropic.com"
else
  echo "==> model: clawos-scripted-model, a scripted STAND-IN for the Anthropic API (set ANTHROPIC_API_KEY to use the real one)"
  MODEL="claude-sonnet-4-5"
  ANTHROPIC_API_KEY="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  exec 3< <(CLAWOS_SCRIPTED_MODEL_KEY="$ANTHROPIC_API_KEY" clawos-scripted-model --addr 127.0.0.1:0 2>"$LOGS/scripted-model.log")
  PIDS+=($!)
  read -r line <&3
  UPSTREAM="${line#listening on }"
fi
echo "==> inference-proxy on 127.0.0.1:$PROXY_PORT (log: $LOGS/inference-proxy.log)"
ANTHROPIC_API_KEY="$ANTHROPIC_API_KEY" CLAWOS_PROXY_ANTHROPIC_URL="$UPSTREAM" \
  CLAWOS_IDENTITY_ISSUER="$CLAWOS_IDENTITY_URL" \
  inference-proxy --addr "127.0.0.1:$PROXY_PORT" >"$LOGS/inference-proxy.log" 2>&1 &
PIDS+=($!)
unset ANTHROPIC_API_KEY
wait_http "$CLAWOS_PROXY_URL/healthz" inference-proxy "$LOGS/inference-proxy.log"

echo "==> vm-launcher on 127.0.0.1:$PORT (log: $LOGS/vm-launcher.log)"
vm-launcher --addr "127.0.0.1:$PORT" --image "$IMAGE" \
  --identity-url "$CLAWOS_IDENTITY_URL" --inference-proxy-url "$CLAWOS_PROXY_URL" \
  >"$LOGS/vm-launcher.log" 2>&1 &
PIDS+=($!)
wait_http "$CLAWOS_LAUNCHER_URL/healthz" vm-launcher "$LOGS/vm-launcher.log"

echo "==> clawos vm start my-agent --model $MODEL --mem 512"
clawos vm start my-agent --model "$MODEL" --mem 512
clawos vm list
echo "==> clawos agent run my-agent --message '...'"
clawos agent run my-agent --message "Write a short greeting to the file hello.txt in your workspace, then tell me what you did."
echo "==> the file, copied out of the VM (clawos vm cp my-agent:/workspace/hello.txt ...)"
clawos vm cp my-agent:/workspace/hello.txt "$CLAWOS_STATE_DIR/hello.txt"
cat "$CLAWOS_STATE_DIR/hello.txt"
echo "==> the proxy's ledger for this agent (clawos usage --agent my-agent)"
clawos usage --agent my-agent
echo "==> clawos vm stop my-agent (its agent token is revoked)"
clawos vm stop my-agent
echo "done: the VM's disks stay in $CLAWOS_STATE_DIR/vms/my-agent (clawos vm rm my-agent deletes them); logs in $LOGS"
