#!/bin/bash
# greenboot health check for bootc-based devices: the boot of a new OS image counts as good only
# when flotilla-agent runs and its health endpoint passes. Install as
# /etc/greenboot/check/required.d/40_flotilla_agent.sh; if it keeps failing, greenboot reboots and
# finally rolls the device back to the previous image, which the agent then reports as a failed
# OS update. Set FLOTILLA_AGENT_HEALTH_URL to the agent's `health_listen` address.
set -u

health_url=${FLOTILLA_AGENT_HEALTH_URL:-http://127.0.0.1:9465/healthz}
timeout=${FLOTILLA_AGENT_HEALTH_TIMEOUT:-300}
interval=${FLOTILLA_AGENT_HEALTH_INTERVAL:-5}
systemctl=${SYSTEMCTL:-systemctl}

deadline=$((SECONDS + timeout))
last="no answer yet"
while ((SECONDS < deadline)); do
    if ! "$systemctl" is-active --quiet flotilla-agent.service; then
        last="flotilla-agent.service is not active"
    elif ! body=$(curl --silent --show-error --max-time 5 --fail "$health_url" 2>&1); then
        last="$health_url: ${body:-failed}"
    else
        echo "flotilla-agent is healthy"
        exit 0
    fi
    sleep "$interval"
done
echo "flotilla-agent is not healthy after ${timeout}s: $last" >&2
exit 1
