#!/usr/bin/env bash
# Installs what ClawOS needs on a Debian/Ubuntu host and builds it (release).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu-system-x86: the hypervisor on hosts without Firecracker; erofs-utils: the rootfs;
# e2fsprogs: per-VM disks (mkfs.ext4) and debugfs in tests; cryptsetup-bin: veritysetup,
# the independent check of our dm-verity trees; lz4: vmlinux for Firecracker;
# busybox-static: the guest's shell and coreutils; dpkg/apt: the guest kernel package;
# clang + libbpf-dev (+ libelf-dev, zlib1g-dev, pkg-config for libbpf-sys): the
# monitor's eBPF program; rsyslog (+ rsyslog-gnutls, openssl for test certificates):
# the SIEM receiver its tests send CEF to, also over TLS; python3: the monitor tests'
# workload. libelf-dev and zlib1g-dev also carry the static libelf.a and libz.a the
# guest's static clawos-audit links; gcc + libc6-dev: the static workload the guest
# audit test runs inside a VM. libxmlsec1-dev + libxml2-dev + libssl-dev: xmlsec, which
# checks the XML signatures of SAML logins in the control plane (clang's libclang
# generates its bindings at build time). patch: our fix to vhost-device-vsock (below).
# systemd: systemd-analyze, which verifies and scores the units in packaging/systemd;
# systemd-container: systemd-nspawn, which boots this machine's OS under systemd to run
# the Debian package's units (tests/e2e/deb_systemd.rs); nix-bin: nix-instantiate, which parses the flake and evaluates the NixOS modules.
PACKAGES=(qemu-system-x86 erofs-utils e2fsprogs cryptsetup-bin lz4 busybox-static curl ca-certificates patch systemd systemd-container nix-bin
  clang libbpf-dev libelf-dev zlib1g-dev pkg-config rsyslog rsyslog-gnutls openssl python3
  gcc libc6-dev libxmlsec1-dev libxml2-dev libssl-dev)
# npm: `clawos image build --agent openclaw` installs the pinned OpenClaw packages with
# it (on the pinned Node it downloads; the host's own node only runs npm).
command -v npm >/dev/null || PACKAGES+=(npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Skills are C built to WebAssembly components (clawos-skill-build): clang's wasm32
# target links with lld (wasm-ld) against wasi-libc and the wasm32 compiler-rt builtins
# (Debian's default versions, like its clang).
for p in lld wasi-libc libclang-rt-dev-wasm32; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The image builder resolves and downloads the guest kernel package through apt.
policy=$(apt-cache policy linux-image-cloud-amd64 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
  missing+=(apt-lists)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $SUDO apt-get update -qq
  missing=("${missing[@]/apt-lists}")
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ${missing[*]} >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first; rust-toolchain.toml pins the version" >&2
  exit 1
fi
# QEMU's side of the hybrid vsock (Firecracker has it built in): rust-vmm's
# vhost-device-vsock 0.3.0, built from its crates.io source with our fix applied
# (scripts/patches/vhost-device-vsock-0.3.0.patch says what it fixes: a connection busy
# in both directions could hang for good). Installed under /usr/local so the
# unprivileged per-VM user the launcher runs it as can execute it; a stamp beside it
# names the patch it was built with, so a changed patch rebuilds it.
VSOCK_PATCH=scripts/patches/vhost-device-vsock-0.3.0.patch
VSOCK_CRATE_SHA256=52ce95d81af89ad693d067c650e42df0f217addfbc96cc4820f7c62eb4a28b13
VSOCK_STAMP=/usr/local/lib/clawos/vhost-device-vsock.patch.sha256
vsock_want=$(sha256sum "$VSOCK_PATCH" | cut -d' ' -f1)
if [ ! -x /usr/local/bin/vhost-device-vsock ] || [ "$(cat "$VSOCK_STAMP" 2>/dev/null)" != "$vsock_want" ]; then
  echo "==> building vhost-device-vsock 0.3.0 with ClawOS's fix (about two minutes)"
  vtmp=$(mktemp -d)
  curl -fsSL -o "$vtmp/src.crate" \
    https://static.crates.io/crates/vhost-device-vsock/vhost-device-vsock-0.3.0.crate
  echo "$VSOCK_CRATE_SHA256  $vtmp/src.crate" | sha256sum -c --quiet
  tar xzf "$vtmp/src.crate" -C "$vtmp"
  patch -d "$vtmp/vhost-device-vsock-0.3.0" -p1 --quiet < "$VSOCK_PATCH"
  CARGO_TARGET_DIR="$vtmp/target" cargo install --locked --quiet \
    --path "$vtmp/vhost-device-vsock-0.3.0" --root "$vtmp/root"
  $SUDO install -m 0755 "$vtmp/root/bin/vhost-device-vsock" /usr/local/bin/
  $SUDO mkdir -p "$(dirname "$VSOCK_STAMP")"
  echo "$vsock_want" | $SUDO tee "$VSOCK_STAMP" >/dev/null
  rm -rf "$vtmp"
fi
# `--deps-only`: packages and tools, no build (CI lints before it builds).
if [ "${1:-}" = --deps-only ]; then
  exit 0
fi
echo "==> building guest binaries (static)"
scripts/build-guest.sh >/dev/null
echo "==> building clawos and the host daemons (${CLAWOS_PROFILE:-release})"
if [ "${CLAWOS_PROFILE:-release}" = release ]; then
  cargo build --release --locked -p clawos-cli -p clawos-vm-launcher -p clawos-identity-manager -p clawos-inference-proxy -p clawos-monitor -p clawos-scripted-model -p clawos-skill-build -p clawos-skill-manager -p clawos-search-standin -p clawos-orchestrator
else
  cargo build --locked --workspace
fi
echo "==> building the web-search skill (skills/web-search/skill.wasm)"
skills/web-search/build.sh >/dev/null
