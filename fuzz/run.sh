#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a while from the seed corpus in
# fuzz/corpus/<target>; exits non-zero if any target crashes (the input is left in
# fuzz/artifacts/<target>/).
#
#   fuzz/run.sh                      # every target, 25 s each (what CI runs)
#   fuzz/run.sh 300 guest_frames     # one target, 5 minutes
#
# The toolchain is the pinned stable one (rust-toolchain.toml) and no nightly can be
# fetched here, but cargo-fuzz passes nightly-only flags (`-Zsanitizer=address`, and
# `-Zbuild-std` never, as we do not ask for it): RUSTC_BOOTSTRAP=1 makes the stable
# rustc accept them. The stable toolchain ships the ASan runtime for
# x86_64-unknown-linux-gnu, so nothing else is needed.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-25}
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(guest_frames audit_stream image_manifest proxy_request)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
# `cargo fmt --all` at the root does not reach this workspace.
cargo fmt --check
# fuzz/Cargo.lock is kept in the repository (copied from the main workspace's, so the
# same versions are fuzzed); a dependency added to a fuzzed crate since is resolved here
# and added to it (commit the change).
# -a: debug assertions and overflow checks on, so arithmetic overflow is a crash too.
cargo fuzz build -a
status=0
for t in "${targets[@]}"; do
  # libFuzzer adds what it finds to the first directory: a scratch one, so the seeds
  # in corpus/ stay as they are.
  mkdir -p "work/$t"
  echo "==> fuzzing $t for ${secs}s"
  if ! cargo fuzz run -a "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"work/$t.log" 2>&1; then
    status=1
    echo "FUZZ CRASH in $t:"
    tail -n 60 "work/$t.log"
    ls -1 "artifacts/$t" 2>/dev/null | sed "s|^|    artifact: fuzz/artifacts/$t/|"
    continue
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "work/$t.log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "work/$t.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "work/$t.log" | tail -1)
  echo "    $t: ${runs:-?} runs, ${speed:-?} exec/s, ${cov:-cov: ?}, no crash"
done
exit $status
