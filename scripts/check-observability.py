#!/usr/bin/env python3
"""Checks the dashboards and alert rules against reality: starts a real control plane and agent with
their metrics endpoints, lets a real Prometheus scrape them, and evaluates every expression of
deploy/grafana/dashboards/*.json and deploy/prometheus/alerts.yml through Prometheus' HTTP API.
Each must parse, and each metric it names must be in what Prometheus scraped (the list comes from
the scrape, not from this script). Also runs `promtool check metrics` on both expositions.

Usage: scripts/check-observability.py [TARGET_DIR]   (default: target/debug)
"""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug"))


def free_ports(names):
    """A distinct free loopback port per name: every socket stays bound until all are chosen, so
    two names cannot be handed the same port."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


# The work directory of the run, so that a failure can show the processes' logs.
WORK = None
# The processes started so far by name: a wait ends early, with their logs, when one has exited.
STARTED = {}


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    if WORK:
        for path in sorted(glob.glob(os.path.join(WORK, "*.log"))):
            with open(path, errors="replace") as f:
                tail = f.readlines()[-40:]
            print(f"--- {os.path.basename(path)} (last {len(tail)} lines)", file=sys.stderr)
            sys.stderr.writelines(tail)
    sys.exit(1)


def wait(what, check, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, process in STARTED.items():
            if process.poll() is not None:
                fail(f"{name} exited (code {process.returncode}) while waiting for {what}")
        try:
            if check():
                return
        except Exception:  # the thing waited for is not up yet
            pass
        time.sleep(0.2)
    fail(f"timed out waiting for {what}")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def expressions():
    """(origin, expression) for every dashboard target and alert rule."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy/grafana/dashboards/*.json"))):
        dashboard = json.load(open(path))
        for panel in dashboard.get("panels", []):
            for target in panel.get("targets", []):
                found.append((f"{os.path.basename(path)}: {panel['title']}", target["expr"]))
    rules = yaml.safe_load(open(os.path.join(ROOT, "deploy/prometheus/alerts.yml")))
    for group in rules["groups"]:
        for rule in group["rules"]:
            found.append((f"alerts.yml: {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return found


def main():
    global WORK
    work = WORK = tempfile.mkdtemp(prefix="flotilla-observability-")
    processes = []

    def start(name, log_name, command):
        """Starts `command` with its output in <log_name>.log and <log_name>-out.log."""
        log = lambda suffix: open(os.path.join(work, f"{log_name}{suffix}.log"), "w")
        process = subprocess.Popen(command, stdout=log("-out"), stderr=log(""))
        processes.append(process)
        STARTED[name] = process

    try:
        ports = free_ports(["agent", "admin", "metrics", "health", "prometheus"])
        data = os.path.join(work, "data")
        start("the control plane", "server", [
            os.path.join(BIN, "flotilla"), "serve", "--data-dir", data,
            "--agent-listen", f"127.0.0.1:{ports['agent']}",
            "--admin-listen", f"127.0.0.1:{ports['admin']}",
            "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
            "--heartbeat-interval", "1"])
        metrics_url = f"http://127.0.0.1:{ports['metrics']}"
        wait("the control plane", lambda: get(f"{metrics_url}/readyz").startswith("ready"))
        flotctl = [os.path.join(BIN, "flotctl"), "--config", os.path.join(data, "flotctl.toml")]
        start("the agent", "agent", [
            os.path.join(BIN, "flotilla-agent"), "--config", os.path.join(data, "agent.toml"),
            "--state-dir", os.path.join(work, "agent"), "--name", "observed",
            "--health-listen", f"127.0.0.1:{ports['health']}"])
        wait("the enrollment request", lambda: subprocess.run(
            flotctl + ["approve", "enrollment", "observed"], capture_output=True, timeout=30).returncode == 0)
        health_url = f"http://127.0.0.1:{ports['health']}"
        wait("the agent's session", lambda: '"name":"stream","status":"pass"' in get(f"{health_url}/healthz"))
        # Traffic for every kind of series: a push and its ACK, a renewal, admin calls.
        spec = os.path.join(work, "device.yaml")
        with open(spec, "w") as f:
            f.write(f"kind: Device\nmetadata: {{name: observed}}\nspec:\n  files:\n"
                    f"    - path: {work}/out/motd\n      content: hello\n")
        subprocess.run(flotctl + ["apply", "-f", spec], check=True, capture_output=True, timeout=30)
        fleet = os.path.join(work, "fleet.yaml")
        with open(fleet, "w") as f:
            f.write("kind: Fleet\nmetadata: {name: everyone}\nspec:\n  selector: \"\"\n  template:\n"
                    f"    files:\n      - path: {work}/out/fleet\n        content: \"{{{{ device.name }}}}\"\n")
        subprocess.run(flotctl + ["apply", "-f", fleet], check=True, capture_output=True, timeout=30)
        # A second revision under a rollout policy that the agent rejects (a file below its
        # motd file): the rollout pauses, so the rollout series exist.
        with open(fleet, "w") as f:
            f.write("kind: Fleet\nmetadata: {name: everyone}\nspec:\n  selector: \"\"\n"
                    "  rollout:\n    batches: [{count: 1}]\n    maxUnavailable: 1\n  template:\n"
                    f"    files:\n      - path: {work}/out/motd/child\n        content: x\n")
        subprocess.run(flotctl + ["apply", "-f", fleet], check=True, capture_output=True, timeout=30)
        wait("the rollout to pause", lambda: '"state":"paused"' in subprocess.run(
            flotctl + ["rollout", "status", "everyone", "-o", "json"],
            capture_output=True, text=True, timeout=30).stdout.replace(" ", ""))
        subprocess.run(flotctl + ["cert", "renew", "--device", "observed"], check=True, capture_output=True, timeout=30)
        wait("the renewal", lambda: "renewed" in subprocess.run(
            flotctl + ["audit", "list"], capture_output=True, text=True, timeout=30).stdout)

        for name, url in [("control plane", f"{metrics_url}/metrics"), ("agent", f"{health_url}/metrics")]:
            exposition = get(url)
            check = subprocess.run(["promtool", "check", "metrics"], input=exposition,
                                   capture_output=True, text=True)
            if check.returncode != 0:
                fail(f"promtool check metrics ({name}): {check.stdout}{check.stderr}")
            print(f"promtool check metrics: {name} exposition accepted")

        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [os.path.join(ROOT, "deploy/prometheus/alerts.yml")],
                "scrape_configs": [
                    {"job_name": "flotilla", "static_configs": [{"targets": [f"127.0.0.1:{ports['metrics']}"]}]},
                    {"job_name": "flotilla-agent", "static_configs": [{"targets": [f"127.0.0.1:{ports['health']}"]}]},
                ],
            }, f)
        start("Prometheus", "prometheus", [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={work}/tsdb",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
        api = f"http://127.0.0.1:{ports['prometheus']}/api/v1"

        def query(expr):
            return json.loads(get(f"{api}/query?" + urllib.parse.urlencode({"query": expr})))

        def scraped_both():
            result = query('up == 1')["data"]["result"]
            return {r["metric"]["job"] for r in result} >= {"flotilla", "flotilla-agent"}

        wait("Prometheus to scrape both targets", scraped_both)
        time.sleep(6)  # several scrapes, so rate() windows hold at least two samples
        names = set(json.loads(get(f"{api}/label/__name__/values"))["data"])
        exported = sorted(n for n in names if n.startswith("flotilla_"))
        print(f"Prometheus scraped {len(exported)} flotilla metric names")

        problems = []
        checked = 0
        for origin, expr in expressions():
            checked += 1
            try:
                answer = query(expr)
            except urllib.error.HTTPError as error:
                answer = json.loads(error.read().decode())
            if answer.get("status") != "success":
                problems.append(f"{origin}: does not evaluate: {answer.get('error')}\n    {expr}")
                continue
            referenced = set(re.findall(r"\b(flotilla_[a-z0-9_]+)\b", expr))
            if re.search(r"\bup\b", expr):
                referenced.add("up")
            missing = sorted(referenced - names)
            if missing:
                problems.append(f"{origin}: names metrics the scrape does not contain: {missing}\n    {expr}")
        if problems:
            fail("\n".join(problems))
        print(f"all {checked} dashboard and alert expressions evaluate and name only scraped metrics")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if os.environ.get("KEEP_OBSERVABILITY_WORKDIR"):
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
