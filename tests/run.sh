#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need beyond cargo, then
# `cargo test`. Extra arguments go to cargo test (e.g. `tests/run.sh --test late_write`).
#
# - python3: the integration tests drive the cluster with Python's standard xmlrpc.client;
# - iproute2 (`ip`): the partition test puts each daemon in a network namespace of its own
#   (it needs root, and skips, saying why, without it);
# - faketime (libfaketime): the clock tests run daemons whose clocks are off by seconds;
# - systemd (`systemd-analyze`, libseccomp): tests/deploy.rs verifies the units in deploy/
#   and runs the daemons under their system call filter (systemd is not started);
# - chromium: tests/status_page.rs opens the status page in headless Chromium;
# - Python modules: PyYAML (tests/deploy.rs reads deploy/compose.yaml), websocket-client
#   (tests/status_page.rs drives Chromium), prometheus_client (tests/metrics.rs reads
#   /metrics with the Prometheus project's parser).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 >/dev/null 2>&1 \
    || missing+=(faketime)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "tests/run.sh: ${missing[*]} missing; install them (Debian: apt-get install ${missing[*]}); the tests that need them will say they skipped" >&2
    fi
fi
# The Python modules for whichever python3 is first on the PATH: pip where it may install (a
# pyenv or venv Python), Debian's packages for Debian's own Python (which refuses pip installs).
if command -v python3 >/dev/null 2>&1 \
    && ! python3 -c 'import yaml, websocket, prometheus_client' >/dev/null 2>&1; then
    python3 -m pip install -q PyYAML websocket-client prometheus_client 2>/dev/null \
        || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
            && apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                python3-yaml python3-websocket python3-prometheus-client; } \
        || echo "tests/run.sh: Python's PyYAML, websocket-client or prometheus_client missing (pip install PyYAML websocket-client prometheus_client); the tests that need them will say so" >&2
fi

exec cargo test "$@"
