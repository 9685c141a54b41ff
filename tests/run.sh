#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the tests need beyond cargo, then
# `cargo test`. Extra arguments go to cargo test (e.g. `tests/run.sh --test late_write`).
#
# - python3: the integration tests drive the cluster with Python's standard xmlrpc.client;
# - iproute2 (`ip`): the partition test puts each daemon in a network namespace of its own
#   (it needs root, and skips, saying why, without it);
# - faketime (libfaketime): the clock tests run daemons whose clocks are off by seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 >/dev/null 2>&1 \
    || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "tests/run.sh: ${missing[*]} missing; install them (Debian: apt-get install ${missing[*]}); the tests that need them will say they skipped" >&2
    fi
fi

exec cargo test "$@"
