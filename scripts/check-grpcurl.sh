#!/usr/bin/env bash
# Checks the admin endpoint with stock gRPC clients: grpcurl, holding only the admin certificate,
# lists the services through reflection and gets SERVING from the health service; without a client
# certificate the TLS handshake is refused; a service credential created with flotctl (acting as a
# viewer) reads and is refused writes from grpcurl and from a Python grpcio client.
# Usage: scripts/check-grpcurl.sh [path/to/flotilla] (flotctl is taken from the same directory)
set -euo pipefail
flotilla=${1:-target/debug/flotilla}
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
agent_port=$(port); admin_port=$(port)
"$flotilla" serve --data-dir "$work/data" --agent-listen "127.0.0.1:$agent_port" \
    --admin-listen "127.0.0.1:$admin_port" >"$work/out.log" 2>"$work/err.log" &
pid=$!
d="$work/data"
tls=(-cacert "$d/ca/ca.crt" -servername localhost)
admin=("${tls[@]}" -cert "$d/admin/admin.crt" -key "$d/admin/admin.key")
for _ in $(seq 1 200); do
    if [ -f "$d/flotctl.toml" ] && grpcurl "${admin[@]}" "127.0.0.1:$admin_port" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
        break
    fi
    sleep 0.1
done
services=$(grpcurl "${admin[@]}" "127.0.0.1:$admin_port" list)
echo "$services"
for expected in flotilla.admin.v1.DeviceService flotilla.admin.v1.EnrollmentService grpc.health.v1.Health; do
    grep -qx "$expected" <<<"$services" || { echo "missing service $expected" >&2; exit 1; }
done
grpcurl "${admin[@]}" "127.0.0.1:$admin_port" describe flotilla.admin.v1.DeviceService | grep -q ApplyDevice
health=$(grpcurl "${admin[@]}" "127.0.0.1:$admin_port" grpc.health.v1.Health/Check)
echo "$health"
grep -q '"status": "SERVING"' <<<"$health"
if refused=$(grpcurl "${tls[@]}" "127.0.0.1:$admin_port" list 2>&1); then
    echo "grpcurl without a client certificate was not refused" >&2
    exit 1
fi
# The handshake itself demands a client certificate: TLS 1.3 reports it after the client's Finished,
# so grpcurl sees either the alert or the connection closed under it, never an RPC answer.
grep -qE 'certificate required|Failed to dial target host' <<<"$refused" \
    || { echo "unexpected refusal: $refused" >&2; exit 1; }

flotctl="$(dirname "$flotilla")/flotctl"
"$flotctl" --config "$d/flotctl.toml" credential create reporter --role service --acts-as viewer \
    --out "$work/reporter"
svc=(-cacert "$work/reporter/ca.crt" -servername localhost -cert "$work/reporter/reporter.crt" -key "$work/reporter/reporter.key")
grpcurl "${svc[@]}" "127.0.0.1:$admin_port" flotilla.admin.v1.DeviceService/ListDevices >/dev/null
if denied=$(grpcurl "${svc[@]}" -d '{"name":"x"}' "127.0.0.1:$admin_port" flotilla.admin.v1.DeviceService/DeleteDevice 2>&1); then
    echo "a viewer service deleted a device" >&2
    exit 1
fi
grep -q 'PermissionDenied' <<<"$denied" || { echo "unexpected refusal: $denied" >&2; exit 1; }
echo "service credential with grpcurl: reads allowed, writes refused"
python3 "$(dirname "$0")/service-client.py" "$work/reporter" reporter "127.0.0.1:$admin_port"
echo "grpcurl checks passed"
