#!/usr/bin/env bash
# Runs the README's quick start exactly as written (the first ```sh block after "## Quick start"),
# in the repository, then checks that the agent wrote the files of step 4. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
block=$(awk '/^## Quick start/ {q=1} q && /^```sh$/ {b=1; next} b && /^```$/ {exit} b {print}' README.md)
[ -n "$block" ] || { echo "no quick start block in README.md" >&2; exit 1; }
for path in flotilla-data agent-state edge-1.yaml; do
    [ ! -e "$path" ] || { echo "$path exists already; not running the quick start over it" >&2; exit 1; }
done
rm -rf /tmp/flotilla-demo
cleanup() {
    # The quick start leaves the control plane and the agent running in the background.
    pkill -f -- "--data-dir ./flotilla-data" || true
    pkill -f -- "--state-dir ./agent-state" || true
    sleep 1
    rm -rf flotilla-data agent-state edge-1.yaml /tmp/flotilla-demo
}
trap cleanup EXIT
timeout 600 bash -euo pipefail -c "$block"
for _ in $(seq 1 60); do
    [ -f /tmp/flotilla-demo/motd ] && [ -f /tmp/flotilla-demo/app.conf ] && break
    sleep 1
done
grep -qx "Welcome to edge-1" /tmp/flotilla-demo/motd
grep -qx "listen = 8080" /tmp/flotilla-demo/app.conf
[ "$(stat -c %a /tmp/flotilla-demo/app.conf)" = 600 ]
echo "quick start: the agent applied the spec as the README says"
