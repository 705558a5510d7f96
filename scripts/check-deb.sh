#!/usr/bin/env bash
# Builds the .debs from BINARY_DIR (default target/debug), checks what they hold, and installs them
# with dpkg into a scratch root (its own dpkg database; maintainer scripts leave the host alone),
# then runs the installed binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug}
out=$(mktemp -d)
scratch=$(mktemp -d)
trap 'rm -rf "$out" "$scratch"' EXIT
mapfile -t debs < <(scripts/build-deb.sh "$bin" "$out")
[ "${#debs[@]}" -eq 2 ] || { echo "expected two packages, got: ${debs[*]}" >&2; exit 1; }

expect() { # package, path, mode
    line=$(dpkg-deb --contents "$1" | awk -v p="./$2" '$NF == p {print}')
    [ -n "$line" ] || { echo "$(basename "$1") lacks $2" >&2; exit 1; }
    [ -z "${3:-}" ] || [[ "$line" == "$3"* ]] || { echo "$(basename "$1"): $2 is $line, expected $3" >&2; exit 1; }
}
server=$(printf '%s\n' "${debs[@]}" | grep '/flotilla_')
agent=$(printf '%s\n' "${debs[@]}" | grep '/flotilla-agent_')
expect "$server" usr/bin/flotilla -rwxr-xr-x
expect "$server" usr/bin/flotctl -rwxr-xr-x
expect "$server" lib/systemd/system/flotilla.service -rw-r--r--
expect "$server" usr/share/flotilla/prometheus/alerts.yml
expect "$agent" usr/bin/flotilla-agent -rwxr-xr-x
expect "$agent" lib/systemd/system/flotilla-agent.service -rw-r--r--
expect "$agent" usr/share/flotilla-agent/greenboot/40_flotilla_agent.sh -rwxr-xr-x
expect "$agent" etc/flotilla/ drwxr-x---
dpkg-deb --field "$agent" Package Version Architecture Depends
if dpkg-deb --contents "$agent" | grep -q 'usr/bin/flotilla$'; then
    echo "the agent package must not carry the control plane" >&2; exit 1
fi

# A scratch root with an empty dpkg database.
mkdir -p "$scratch/var/lib/dpkg/info" "$scratch/var/lib/dpkg/updates"
touch "$scratch/var/lib/dpkg/status" "$scratch/var/lib/dpkg/available"
# --force-depends: the scratch root has no libc6 package (the binaries run with the host's).
if ! dpkg --root="$scratch" --force-script-chrootless --force-not-root --force-depends \
    --log=/dev/null -i "${debs[@]}" >"$out/dpkg.log" 2>&1; then
    cat "$out/dpkg.log" >&2
    exit 1
fi
dpkg --root="$scratch" -l flotilla flotilla-agent | grep -q '^ii  flotilla-agent'
dpkg --root="$scratch" -l flotilla | grep -q '^ii  flotilla '
"$scratch/usr/bin/flotilla" --version
"$scratch/usr/bin/flotctl" --version
"$scratch/usr/bin/flotilla-agent" --version
dpkg --root="$scratch" --force-script-chrootless --force-not-root --log=/dev/null -r flotilla-agent >/dev/null
[ ! -e "$scratch/usr/bin/flotilla-agent" ] || { echo "removal left the agent behind" >&2; exit 1; }
echo "debian packages: built, contents checked, installed and removed in a scratch root"
