#!/usr/bin/env bash
# The unprivileged user kvmotion runs QEMU as (kvmotion/qemu/confine.py), idempotently (root):
# system user and group kvmotion-qemu, no login, no home; in group kvm when the host has it, so
# QEMU can open /dev/kvm.
set -euo pipefail

NAME=kvmotion-qemu

if [ "$(id -u)" != 0 ]; then
    echo "qemu-user: run as root (it creates the system user $NAME)" >&2
    exit 1
fi
getent group "$NAME" >/dev/null || groupadd --system "$NAME"
if ! getent passwd "$NAME" >/dev/null; then
    useradd --system --gid "$NAME" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "kvmotion QEMU" "$NAME"
    echo "setup: created system user $NAME (QEMU runs as it)"
fi
if getent group kvm >/dev/null && ! id -nG "$NAME" | tr ' ' '\n' | grep -qx kvm; then
    usermod -a -G kvm "$NAME"
    echo "setup: added $NAME to group kvm"
fi
