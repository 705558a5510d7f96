#!/usr/bin/env bash
# Builds the Debian packages with Debian's own dpkg-deb from binaries already built:
#   flotilla        the control plane and flotctl, its systemd unit, a `flotilla` system user
#   flotilla-agent  the device agent, its systemd unit, the greenboot check, a hardening drop-in
# Usage: scripts/build-deb.sh [BINARY_DIR] [OUT_DIR]   (default: target/release, target/debian)
# `cargo build --release` first. Prints the paths of the packages it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release}")
out=$(realpath -m "${2:-target/debian}")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for binary in flotilla flotctl flotilla-agent; do
    [ -x "$bin/$binary" ] || { echo "$bin/$binary is missing: build it first" >&2; exit 1; }
done

control() { # package, description, extra fields
    cat <<EOF
Package: $1
Version: $version
Architecture: $arch
Maintainer: Flotilla <flotilla@example.com>
Section: admin
Priority: optional
Depends: libc6
Homepage: https://github.com/flotilla/flotilla
$3
Description: $2
EOF
}

# Maintainer scripts do nothing when dpkg installs into another root (DPKG_ROOT: an image build or
# a scratch root); on the host they create the user and tell systemd about the unit.
postinst() { # extra commands for "configure"
    cat <<EOF
#!/bin/sh
set -e
[ -z "\${DPKG_ROOT:-}" ] || exit 0
if [ "\$1" = configure ]; then
$1
    if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
fi
EOF
}

package() { # name, staging dir
    chmod 0755 "$2/DEBIAN"
    find "$2/DEBIAN" -name 'post*' -o -name 'pre*' | xargs -r chmod 0755
    dpkg-deb --root-owner-group --build "$2" "$out/$1_${version}_${arch}.deb" >/dev/null
    echo "$out/$1_${version}_${arch}.deb"
}

# The control plane.
root="$work/flotilla"
install -D -m 0755 "$bin/flotilla" "$root/usr/bin/flotilla"
install -D -m 0755 "$bin/flotctl" "$root/usr/bin/flotctl"
install -D -m 0644 deploy/systemd/flotilla.service "$root/lib/systemd/system/flotilla.service"
install -D -m 0644 README.md "$root/usr/share/doc/flotilla/README.md"
install -D -m 0644 docs/metrics.md "$root/usr/share/doc/flotilla/metrics.md"
install -d -m 0755 "$root/usr/share/flotilla"
cp -r deploy/prometheus deploy/grafana "$root/usr/share/flotilla/"
mkdir -p "$root/DEBIAN"
control flotilla "Flotilla control plane for fleets of Linux edge devices" "Recommends: postgresql-client" \
    >"$root/DEBIAN/control"
postinst '    getent passwd flotilla >/dev/null || adduser --system --group --home /var/lib/flotilla --no-create-home flotilla' \
    >"$root/DEBIAN/postinst"
package flotilla "$root"

# The agent.
root="$work/flotilla-agent"
install -D -m 0755 "$bin/flotilla-agent" "$root/usr/bin/flotilla-agent"
install -D -m 0644 deploy/systemd/flotilla-agent.service "$root/lib/systemd/system/flotilla-agent.service"
install -D -m 0644 deploy/systemd/flotilla-agent.service.d/hardening.conf.example \
    "$root/usr/share/doc/flotilla-agent/hardening.conf.example"
install -D -m 0755 deploy/greenboot/40_flotilla_agent.sh \
    "$root/usr/share/flotilla-agent/greenboot/40_flotilla_agent.sh"
install -d -m 0750 "$root/etc/flotilla"
mkdir -p "$root/DEBIAN"
control flotilla-agent "Flotilla device agent: enrolls, holds the mTLS stream, applies pushed specs" "Suggests: podman" \
    >"$root/DEBIAN/control"
postinst '    :' >"$root/DEBIAN/postinst"
package flotilla-agent "$root"
