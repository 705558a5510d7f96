#!/usr/bin/env bash
# Checks deploy/: alert rules (promtool check + unit tests), systemd units (systemd-analyze verify,
# with ExecStart pointed at the built binaries), every YAML and JSON file parses, then the dashboards
# and alerts against a real Prometheus scraping a real control plane and agent.
# Usage: scripts/check-deploy.sh [TARGET_DIR]   (default: target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug}")

(cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml)

units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for unit in deploy/systemd/*.service; do
    sed -e "s#/usr/bin/flotilla-agent#$bin/flotilla-agent#" -e "s#/usr/bin/flotilla #$bin/flotilla #" \
        "$unit" >"$units/$(basename "$unit")"
done
systemd-analyze verify "$units"/*.service
echo "systemd units verified"

for script in deploy/greenboot/*.sh; do
    bash -n "$script"
    [ -x "$script" ] || { echo "$script is not executable" >&2; exit 1; }
done
echo "greenboot checks parse"

python3 - <<'PY'
import glob, json, yaml
files = 0
for path in glob.glob("deploy/**/*.y*ml", recursive=True):
    list(yaml.safe_load_all(open(path)))
    files += 1
for path in glob.glob("deploy/**/*.json", recursive=True):
    json.load(open(path))
    files += 1
for doc in yaml.safe_load_all(open("deploy/kubernetes/flotilla.yaml")):
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
print(f"{files} deploy files parse")
PY

python3 scripts/check-observability.py "$bin"
