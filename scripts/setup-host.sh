#!/usr/bin/env bash
# Install what kvmotion needs on a Debian 12 machine, idempotently (root).
# QEMU comes from bookworm-backports: Debian 12's own 7.2 corrupts TCG guests that write memory
# during migration (fixed upstream in 9.0).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (it installs Debian packages and creates network namespaces)" >&2
    exit 1
fi

BACKPORTS=/etc/apt/sources.list.d/kvmotion-backports.sources
BP_PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios"
PKGS="busybox-static gcc libc6-dev lz4 iproute2 kmod python3-venv nbdkit nbdkit-plugin-python libnbd-bin chromium"

missing=""
for p in $BP_PKGS $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
qemu_ok=0
if command -v qemu-system-x86_64 >/dev/null; then
    major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
    [ "${major:-0}" -ge 9 ] && qemu_ok=1
fi

if [ -n "$missing" ] || [ "$qemu_ok" = 0 ]; then
    if [ ! -f "$BACKPORTS" ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The mirror bookworm itself comes from: only URIs:/deb lines (comments may name snapshot
        # archives); a missing sources file must not stop the script (pipefail).
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
                 | grep -E '^[[:space:]]*(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?' \
                 | grep -v security | head -1 || true)
        cat > "$BACKPORTS" <<SRC
Types: deb
URIs: ${mirror:-http://deb.debian.org/debian}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    echo "setup: installing Debian packages:${missing:- qemu (>= 9.0)}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q -t bookworm-backports $BP_PKGS
    apt-get install -y -q $PKGS
fi

# The unprivileged user QEMU runs as.
bash "$(dirname "$0")/qemu-user.sh"
