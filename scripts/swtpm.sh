#!/usr/bin/env bash
# Runs a software TPM 2.0 (swtpm) on loopback, for trying TPM-backed agents and for the TPM tests.
# The first run manufactures it in DIR: RSA-2048 and ECC endorsement keys with certificates from a
# local CA of its own; DIR/tpm-ca.pem is that CA's bundle, for `flotilla serve --tpm-ca`.
# Usage: scripts/swtpm.sh DIR [PORT]  (agent tcti: "swtpm:host=127.0.0.1,port=PORT"; default 2321;
# PORT+1 is swtpm's control port). Needs Debian's swtpm and swtpm-tools.
set -euo pipefail
dir=$(realpath -m "$1")
port=${2:-2321}
mkdir -p "$dir/state" "$dir/ca"
if [ ! -f "$dir/tpm-ca.pem" ]; then
    cat >"$dir/localca.conf" <<CONF
statedir = $dir/ca
signingkey = $dir/ca/signkey.pem
issuercert = $dir/ca/issuercert.pem
certserial = $dir/ca/certserial
CONF
    cat >"$dir/localca.options" <<CONF
--platform-manufacturer Flotilla
--platform-version 2.1
--platform-model swtpm
CONF
    cat >"$dir/setup.conf" <<CONF
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $dir/localca.conf
create_certs_tool_options = $dir/localca.options
active_pcr_banks = sha256
CONF
    swtpm_setup --tpm2 --tpmstate "$dir/state" --create-ek-cert --config "$dir/setup.conf" \
        --overwrite >"$dir/setup.log" 2>&1 || { cat "$dir/setup.log" >&2; exit 1; }
    cat "$dir/ca/issuercert.pem" "$dir/ca/swtpm-localca-rootca-cert.pem" >"$dir/tpm-ca.pem.tmp"
    mv "$dir/tpm-ca.pem.tmp" "$dir/tpm-ca.pem"
fi
exec swtpm socket --tpm2 --tpmstate dir="$dir/state" \
    --server type=tcp,port="$port",bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear
