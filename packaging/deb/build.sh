#!/usr/bin/env bash
# Builds the `clawos` Debian package: the CLI, every daemon, the patched
# vhost-device-vsock, the systemd units, sysusers and tmpfiles entries.
#
#   packaging/deb/build.sh [--profile release|debug] [--out DIR] [--no-build]
#
# It builds the binaries it packs (cargo build --locked; not with --no-build, which packs
# what is already built), strips copies of them, and
# writes DIR/clawos_<version>_<arch>.deb (default DIR: target/deb). Depends: is worked
# out from the shared libraries the binaries link (ldd, then dpkg -S), plus QEMU.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=release
OUT=target/deb
BUILD=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-build) BUILD=no; shift ;;
    *) echo "usage: $0 [--profile release|debug] [--out DIR] [--no-build]" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in
  release) CARGO_PROFILE=(--release); BIN_DIR=target/release ;;
  debug) CARGO_PROFILE=(); BIN_DIR=target/debug ;;
  *) echo "--profile is release or debug, not $PROFILE" >&2; exit 2 ;;
esac
DAEMONS=(identity-manager inference-proxy skill-manager monitor-daemon vm-launcher orchestrator control-plane)
PACKAGES=(-p clawos-cli -p clawos-identity-manager -p clawos-inference-proxy -p clawos-skill-manager
  -p clawos-monitor -p clawos-vm-launcher -p clawos-orchestrator -p clawos-control-plane)
if [ "$BUILD" = yes ]; then
  echo "==> building clawos and the daemons ($PROFILE)"
  cargo build --locked "${CARGO_PROFILE[@]}" "${PACKAGES[@]}"
fi
for b in clawos "${DAEMONS[@]}"; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b is missing: build it first (or leave out --no-build)" >&2; exit 1; }
done
VSOCK=/usr/local/bin/vhost-device-vsock
[ -x "$VSOCK" ] || { echo "$VSOCK is missing: scripts/setup.sh builds it" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/clawos"
echo "==> staging in $ROOT"
install -d -m0755 "$ROOT/usr/bin" "$ROOT/usr/lib/systemd/system" "$ROOT/usr/lib/sysusers.d" \
  "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/share/doc/clawos" "$ROOT/etc/clawos" "$ROOT/DEBIAN"
for b in clawos "${DAEMONS[@]}"; do
  install -m0755 "$BIN_DIR/$b" "$ROOT/usr/bin/$b"
done
install -m0755 "$VSOCK" "$ROOT/usr/bin/vhost-device-vsock"
strip --strip-unneeded "$ROOT"/usr/bin/*
install -m0644 packaging/systemd/*.service packaging/systemd/clawos.target "$ROOT/usr/lib/systemd/system/"
install -m0644 packaging/systemd/clawos.sysusers "$ROOT/usr/lib/sysusers.d/clawos.conf"
install -m0644 packaging/systemd/clawos.tmpfiles "$ROOT/usr/lib/tmpfiles.d/clawos.conf"
install -m0644 README.md "$ROOT/usr/share/doc/clawos/README.md"
install -m0644 crates/host/clawos.toml "$ROOT/usr/share/doc/clawos/clawos.toml"
install -m0644 docs/security.md "$ROOT/usr/share/doc/clawos/security.md"
cat >"$ROOT/usr/share/doc/clawos/copyright" <<'TXT'
ClawOS
License: Apache-2.0
On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
TXT
cat >"$ROOT/etc/clawos/clawos.env" <<'TXT'
# Settings the ClawOS units read (EnvironmentFile=). The image signing public key:
# only images (and skills) signed by its private half are accepted.
#CLAWOS_SIGNING_PUBKEY=<64 hex digits, from `clawos keygen`>
TXT

# Depends: the packages that hold the libraries the binaries link, and QEMU.
libs=$(for b in "$ROOT"/usr/bin/*; do ldd "$b" 2>/dev/null; done | awk '/=> \//{print $3}' | sort -u)
deps=$(for l in $libs; do dpkg -S "$(readlink -f "$l")" 2>/dev/null || dpkg -S "$l" 2>/dev/null; done \
  | cut -d: -f1 | sort -u | tr '\n' ' ')
DEPENDS="qemu-system-x86"
for d in $deps; do DEPENDS="$DEPENDS, $d"; done
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat >"$ROOT/DEBIAN/control" <<TXT
Package: clawos
Version: $VERSION
Architecture: $ARCH
Maintainer: ClawOS developers <dev@clawos.invalid>
Installed-Size: $SIZE
Depends: $DEPENDS
Section: admin
Priority: optional
Homepage: https://github.com/clawos/clawos
Description: run autonomous AI agents in signed, verified microVMs
 ClawOS runs each AI agent in its own hardened microVM: images signed and
 verified before boot, a dm-verity root filesystem, a short-lived identity per
 agent, LLM access only through an audited proxy that keeps the API keys on the
 host, sandboxed skills, and an eBPF audit trail forwarded to a SIEM.
 .
 This package has the clawos CLI, every daemon and their systemd units
 (clawos.target).
TXT
echo /etc/clawos/clawos.env >"$ROOT/DEBIAN/conffiles"
install -m0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$ROOT/DEBIAN/"
mkdir -p "$OUT"
DEB="$OUT/clawos_${VERSION}_${ARCH}.deb"
# A debug package is for tests: the quickest compression (5 s instead of 70 s here, for
# 14 % more bytes).
LEVEL=9
[ "$PROFILE" = debug ] && LEVEL=1
dpkg-deb --root-owner-group -Zgzip -z"$LEVEL" --build "$ROOT" "$DEB" >/dev/null
echo "built $DEB ($(du -h "$DEB" | cut -f1); Depends: $DEPENDS)"
