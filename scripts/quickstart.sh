#!/usr/bin/env bash
# The main job on a fresh machine: install and build; make and sign the default agent
# image; bring the host up (identity-manager, inference-proxy, skill-manager with the
# web-search skill signed, packed, installed and enabled for the agent, vm-launcher);
# boot an agent VM; give its agent a task that makes it write a file with a tool and
# search the web with the skill; show the answer, the file (copied out of the VM), the
# skill call's audit record and the proxy's usage row for that agent; stop the VM.
#
# The model: with ANTHROPIC_API_KEY set, the real Anthropic API. Without it, the
# project's scripted stand-in (clawos-scripted-model), which plays three recorded turns
# (call the write tool, call web-search, answer) in the real API's wire format. It is
# not a model. The search backend is always the project's stand-in
# (clawos-search-standin, SearXNG's JSON API over a small built-in corpus): this
# machine reaches no search engine; point the skill at a real SearXNG with
# `clawos skill install … --set url=…` (and an http.allow entry for it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CLAWOS_STATE_DIR="${CLAWOS_STATE_DIR:-$HOME/.clawos}"
export PATH="$PWD/target/release:$PATH"
# Where the daemons listen: clawos.toml's keys, set here through the environment
# (CLAWOS_<SECTION>_ADDR); the CLI's URLs follow them.
export CLAWOS_LAUNCHER_ADDR="${CLAWOS_LAUNCHER_ADDR:-127.0.0.1:2080}"
export CLAWOS_IDENTITY_ADDR="${CLAWOS_IDENTITY_ADDR:-127.0.0.1:2082}"
export CLAWOS_SKILLS_ADDR="${CLAWOS_SKILLS_ADDR:-127.0.0.1:2083}"
export CLAWOS_PROXY_ADDR="${CLAWOS_PROXY_ADDR:-127.0.0.1:11435}"
export CLAWOS_LAUNCHER_URL="http://$CLAWOS_LAUNCHER_ADDR"
export CLAWOS_IDENTITY_URL="http://$CLAWOS_IDENTITY_ADDR"
export CLAWOS_PROXY_URL="http://$CLAWOS_PROXY_ADDR"
export CLAWOS_SKILLS_URL="http://$CLAWOS_SKILLS_ADDR"
LOGS="$CLAWOS_STATE_DIR/logs"
mkdir -p "$CLAWOS_STATE_DIR" "$LOGS"

# A host left up by an earlier run goes first: this run's model and search stand-ins
# are new, and the daemons must be wired to them.
clawos down >/dev/null
PIDS=()
cleanup() {
  echo "==> clawos down"
  clawos down || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
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

if [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  echo "==> model: the Anthropic API (ANTHROPIC_API_KEY is set; it stays in inference-proxy)"
  MODEL="${CLAWOS_MODEL:-claude-sonnet-4-5}"
  UPSTREAM="https://api.anthropic.com"
else
  echo "==> model: clawos-scripted-model, a scripted STAND-IN for the Anthropic API (set ANTHROPIC_API_KEY to use the real one)"
  MODEL="claude-sonnet-4-5"
  ANTHROPIC_API_KEY="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  SCRIPT="$CLAWOS_STATE_DIR/demo-script.json"
  cat >"$SCRIPT" <<'JSON'
{"turns": [
  {"tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "Hello from your ClawOS agent.\n"}}]},
  {"tool_use": [{"name": "web-search", "input": {"query": "what is clawos", "count": 2}}], "expect_tool_result": true},
  {"text": "I wrote hello.txt in the workspace, and searched the web: ClawOS runs autonomous AI agents in hardened microVMs.", "expect_tool_result": true}
]}
JSON
  exec 3< <(CLAWOS_SCRIPTED_MODEL_KEY="$ANTHROPIC_API_KEY" clawos-scripted-model --addr 127.0.0.1:0 --script "$SCRIPT" 2>"$LOGS/scripted-model.log")
  PIDS+=($!)
  read -r line <&3
  UPSTREAM="${line#listening on }"
fi
SEARCH_PORT="${CLAWOS_SEARCH_PORT:-8888}"
echo "==> search backend: clawos-search-standin on 127.0.0.1:$SEARCH_PORT, a STAND-IN for a SearXNG instance (log: $LOGS/search-standin.log)"
clawos-search-standin --addr "127.0.0.1:$SEARCH_PORT" >"$LOGS/search-standin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SEARCH_PORT/healthz" clawos-search-standin "$LOGS/search-standin.log"

echo "==> clawos up: every daemon of this host, wired together (clawos.toml's defaults;"
echo "    the model and the search name set through the environment; logs in $LOGS)"
# The API key reaches inference-proxy alone; no other daemon, and no VM, gets it.
ANTHROPIC_API_KEY="$ANTHROPIC_API_KEY" CLAWOS_PROXY_ANTHROPIC_URL="$UPSTREAM" \
  CLAWOS_SKILLS_RESOLVE="search.local=127.0.0.1" clawos up
unset ANTHROPIC_API_KEY

echo "==> the web-search skill: clawos skill sign, pack, install, enable web-search my-agent"
BUNDLE="$CLAWOS_STATE_DIR/bundles/web-search"
mkdir -p "$BUNDLE"
cp skills/web-search/skill.toml skills/web-search/skill.wasm "$BUNDLE/"
# The skill may reach its backend only, as its manifest says: here, the stand-in's port.
sed -i "s/search\.local:8888/search.local:$SEARCH_PORT/g" "$BUNDLE/skill.toml"
clawos skill sign "$BUNDLE" --key "$KEY"
clawos skill pack "$BUNDLE" --output "$CLAWOS_STATE_DIR/bundles/web-search.skill"
clawos skill rm web-search >/dev/null 2>&1 || true   # a second run installs it afresh
clawos skill install "$CLAWOS_STATE_DIR/bundles/web-search.skill"
clawos skill enable web-search my-agent
clawos skill list

echo "==> clawos vm start my-agent --model $MODEL --mem 512"
clawos vm start my-agent --model "$MODEL" --mem 512
clawos vm list
AUDIT="$CLAWOS_STATE_DIR/skills/audit.jsonl"
AUDITED=0
[ -f "$AUDIT" ] && AUDITED=$(wc -l <"$AUDIT")
echo "==> clawos agent run my-agent --message '...'"
clawos agent run my-agent --message "Write a short greeting to the file hello.txt in your workspace, search the web for what ClawOS is, then tell me what you did."
echo "==> the file, copied out of the VM (clawos vm cp my-agent:/workspace/hello.txt ...)"
clawos vm cp my-agent:/workspace/hello.txt "$CLAWOS_STATE_DIR/hello.txt"
cat "$CLAWOS_STATE_DIR/hello.txt"
echo "==> skill-manager's audit records of this task's skill calls ($AUDIT)"
tail -n +"$((AUDITED + 1))" "$AUDIT"
if clawos status --json | grep -A1 '"monitor-daemon"' | grep -q '"running"'; then
  echo "==> the same calls in the host's audit trail, as the SIEM gets them (clawos audit tail --agent my-agent)"
  # This boot's calls only: its VM id is in skill-manager's records just shown.
  VMID=$(tail -n +"$((AUDITED + 1))" "$AUDIT" | sed -n 's/.*"vm_id":"\([^"]*\)".*/\1/p' | tail -n 1)
  clawos audit tail --agent my-agent --limit 100000 | grep " skill " | grep -F "/$VMID " || true
fi
echo "==> the proxy's ledger for this agent (clawos usage --agent my-agent)"
clawos usage --agent my-agent
echo "==> clawos vm stop my-agent (its agent token is revoked)"
clawos vm stop my-agent
echo "done: the VM's disks stay in $CLAWOS_STATE_DIR/vms/my-agent (clawos vm rm my-agent deletes them); logs in $LOGS."
echo "The host goes down now (clawos down); \`clawos up\` brings it up again (it needs ANTHROPIC_API_KEY)."
