#!/usr/bin/env bash
# Memory of one durable storage node holding a million keys: starts a node on a fresh data
# directory, puts KEYS keys (default 1,000,000) of VALUE_BYTES (default 100) into it directly
# (its own put, with the bodies Python sends), then reads random keys for READ_SECS (default 10,
# so caches that fill on reads count too), and prints its VmRSS (and peak, VmHWM) from /proc
# at each step, with the size of its data directory. Everything it starts is stopped on exit.
# A few minutes on a 2-core machine.
#
#   examples/rss_check.sh
#   KEYS=200000 examples/rss_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
VALUE_BYTES=${VALUE_BYTES:-100}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-23790}
SETTLE_SECS=${SETTLE_SECS:-3}
READ_SECS=${READ_SECS:-10}
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --release --bins --examples
bin=$target_dir/release

work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-rss.XXXXXX")
node_pid=
stop() {
    trap - EXIT INT TERM
    if [[ -n $node_pid ]]; then
        kill "$node_pid" 2>/dev/null || true
        wait "$node_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap stop EXIT
trap 'exit 130' INT TERM

memory() {
    awk '/^VmRSS/ { rss = $2 } /^VmHWM/ { hwm = $2 }
         END { printf "VmRSS %.1f MiB (peak VmHWM %.1f MiB)", rss / 1024, hwm / 1024 }' \
        "/proc/$node_pid/status"
}

"$bin/storage_node" --bind 127.0.0.1 -p "$PORT" --data-dir "$work/node" --quiet \
    >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 200); do
    kill -0 "$node_pid" 2>/dev/null || {
        echo "rss_check: the storage node did not start:" >&2
        cat "$work/node.log" >&2
        exit 1
    }
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break
    sleep 0.05
done
echo "empty node:            $(memory)"

status=0
"$bin/examples/loadgen" --target "127.0.0.1:$PORT" --local --preload --requests 0 \
    --keys "$KEYS" --value-bytes "$VALUE_BYTES" --connections "$CONNECTIONS" || status=$?
echo "right after $KEYS puts: $(memory)"
sleep "$SETTLE_SECS"
echo "${SETTLE_SECS} s later:             $(memory)"
if ((READ_SECS > 0)); then
    "$bin/examples/loadgen" --target "127.0.0.1:$PORT" --local --get-ratio 1 --keys "$KEYS" \
        --connections "$CONNECTIONS" --duration-secs "$READ_SECS" 2>/dev/null | grep -E '^(throughput|get|requests)' || status=$?
    echo "after ${READ_SECS} s of gets:      $(memory)"
fi
keys=$(curl -fsS -H 'Content-Type: text/xml' --data-binary \
    "<?xml version='1.0'?><methodCall><methodName>stats</methodName><params></params></methodCall>" \
    "http://127.0.0.1:$PORT/RPC2" |
    grep -oE '<name>keys</name><value><(i4|int)>[0-9]+' | grep -oE '[0-9]+$' || true)
echo "node's stats: keys = ${keys:-?}; data directory: $(du -sh "$work/node" | cut -f1)"
if ((status != 0)); then
    echo "!!! the preload had errors: see above" >&2
fi
exit "$status"
