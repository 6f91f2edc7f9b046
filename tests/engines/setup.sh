#!/bin/sh
# Installs the container engines the engine tests drive and prepares the shared
# fixtures they reuse. Idempotent; run as root before
# `cargo build --workspace && cargo test --workspace`.
#
#   tests/engines/setup.sh            # packages + bookworm systemd guest
#   PORTWAKE_GUEST_DIR=/path tests/engines/setup.sh
#
# The guest (debootstrap, ~1 min, ~250 MB) is built once into
# $PORTWAKE_GUEST_DIR (default /var/tmp/portwake-guest-bookworm) and reused;
# the tests copy nothing into it: each nspawn run boots it with
# --volatile=overlay and its own unit files bound in.
set -eu

GUEST_DIR=${PORTWAKE_GUEST_DIR:-/var/tmp/portwake-guest-bookworm}
# The mirror this machine's apt already uses (first URIs: line of its deb822
# sources), unless PORTWAKE_DEBIAN_MIRROR says otherwise.
MIRROR=${PORTWAKE_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
need=""
for pkg in libvirt-daemon-driver-lxc libvirt-daemon libvirt-clients systemd-container \
    debootstrap crun podman openssh-client; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need="$need $pkg"
done
if [ -n "$need" ]; then
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $need
fi

if [ ! -x "$GUEST_DIR/lib/systemd/systemd" ] || [ ! -x "$GUEST_DIR/usr/sbin/sshd" ]; then
    echo "setup.sh: debootstrapping a bookworm systemd guest into $GUEST_DIR" >&2
    rm -rf "$GUEST_DIR.partial"
    debootstrap --variant=minbase --include=systemd,openssh-server,dbus \
        bookworm "$GUEST_DIR.partial" ${MIRROR:+"$MIRROR"}
    # Nothing in the guest may bind port 22 itself: the tests' sshd is socket
    # activated through portwake.
    chroot "$GUEST_DIR.partial" systemctl disable ssh.service >/dev/null 2>&1 || true
    rm -f "$GUEST_DIR.partial/etc/systemd/system/multi-user.target.wants/ssh.service" \
        "$GUEST_DIR.partial/etc/systemd/system/sshd.service"
    # A quick, quiet boot: no getty on the console, no network management.
    chroot "$GUEST_DIR.partial" systemctl mask console-getty.service getty@tty1.service \
        systemd-networkd.service systemd-resolved.service >/dev/null 2>&1 || true
    ssh-keygen -A -f "$GUEST_DIR.partial" >/dev/null 2>&1 || chroot "$GUEST_DIR.partial" ssh-keygen -A
    mv "$GUEST_DIR.partial" "$GUEST_DIR"
fi
echo "setup.sh: ready (guest: $GUEST_DIR)" >&2
