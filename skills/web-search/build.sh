#!/usr/bin/env bash
# Builds the web-search skill's component into skills/web-search/skill.wasm with the
# workspace's clawos-skill-build (scripts/setup.sh runs this). Sign the bundle with
# `clawos skill sign` (or the image key) before installing it on a host that checks.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
profile_dir="${CLAWOS_PROFILE:-release}"
[ "$profile_dir" = dev ] && profile_dir=debug
bin="${CARGO_TARGET_DIR:-$root/target}/$profile_dir/clawos-skill-build"
[ -x "$bin" ] || { echo "$bin is missing: build the workspace first (scripts/setup.sh)" >&2; exit 1; }
"$bin" -o "$here/skill.wasm" --cflag="-I$root/skills/sdk" \
  "$here/web_search.c" "$root/skills/sdk/skill_http.c" "$root/skills/sdk/skill_json.c"
