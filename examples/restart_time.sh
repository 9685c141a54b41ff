#!/usr/bin/env bash
# How long a durable storage node takes to start again after a crash: starts a node on a fresh
# data directory, puts KEYS keys (default 1,000,000) of VALUE_BYTES (default 100) into it
# (its own put, as examples/rss_check.sh does), waits SETTLE_SECS, then RUNS times (default
# 3): puts AGAIN_KEYS keys again (default 100,000: a partly filled active segment, as a node
# under load has), SIGKILLs the node, starts it on the same directory and times it from the
# spawn to its first `GET /health` answered 200, and to its stats() saying keys_counted (the
# count of its keys it makes in the background). Prints each time and the median, with the
# data directory's size and its segment and hint files. Everything it starts is stopped on
# exit. A few minutes on a 2-core machine.
#
#   examples/restart_time.sh
#   KEYS=200000 RUNS=5 examples/restart_time.sh
#   BUILD=0 CARGO_TARGET_DIR=/tmp/other/target examples/restart_time.sh   # another build
#   NO_HINTS=1 examples/restart_time.sh      # hint files removed before each start: replay all
#   COLD=1 examples/restart_time.sh          # the page cache dropped before each start (root)
#
# Unless COLD=1, the segments are in the page cache when the node starts again (it was killed
# a moment before), so this measures the work of a start, not the disk's reads; COLD=1 drops
# the machine's page cache first (/proc/sys/vm/drop_caches), as after a reboot.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
AGAIN_KEYS=${AGAIN_KEYS:-100000}
VALUE_BYTES=${VALUE_BYTES:-100}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-23791}
SETTLE_SECS=${SETTLE_SECS:-3}
RUNS=${RUNS:-3}
BUILD=${BUILD:-1}
NO_HINTS=${NO_HINTS:-0}
COLD=${COLD:-0}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
bin=$target_dir/release

work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-restart.XXXXXX")
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

now_ms() { date +%s%3N; }

# Starts the node; sets `elapsed_ms` to the time from its spawn to /health answering 200.
elapsed_ms=
start_node() {
    local started
    started=$(now_ms)
    "$bin/storage_node" --bind 127.0.0.1 -p "$PORT" --data-dir "$work/node" --quiet \
        >>"$work/node.log" 2>&1 &
    node_pid=$!
    while ! curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null; do
        kill -0 "$node_pid" 2>/dev/null || {
            echo "restart_time: the storage node did not start:" >&2
            tail -n 20 "$work/node.log" >&2
            exit 1
        }
        sleep 0.01
    done
    elapsed_ms=$(($(now_ms) - started))
    # Then the node counts its keys in the background (stats: keys_counted); time that too.
    counted_ms=
    for _ in $(seq 1 3000); do
        if curl -fsS -d '<?xml version="1.0"?><methodCall><methodName>stats</methodName></methodCall>' \
            "http://127.0.0.1:$PORT/" 2>/dev/null | grep -q 'keys_counted</name><value><i4>1<'; then
            counted_ms=$(($(now_ms) - started))
            break
        fi
        sleep 0.05
    done
}

put_keys() {
    "$bin/examples/loadgen" --target "127.0.0.1:$PORT" --local --preload --requests 0 \
        --keys "$1" --value-bytes "$VALUE_BYTES" --connections "$CONNECTIONS" 2>&1 | grep -E '^preload:' || true
}

files() {
    local segments hints
    segments=$(find "$work/node/segments" -name '*.seg' | wc -l)
    hints=$(find "$work/node/segments" -name '*.hint' | wc -l)
    echo "$(du -sh "$work/node" | cut -f1) on disk, $segments segment files, $hints hint files"
}

start_node
put_keys "$KEYS"
sleep "$SETTLE_SECS"
echo "after $KEYS puts: $(files)"
times=()
counted=()
for run in $(seq 1 "$RUNS"); do
    put_keys "$AGAIN_KEYS"
    sleep 1
    kill -KILL "$node_pid"
    wait "$node_pid" 2>/dev/null || true
    node_pid=
    if [[ $NO_HINTS != 0 ]]; then
        find "$work/node/segments" -name '*.hint' -delete
    fi
    if [[ $COLD != 0 ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
    start_node
    times+=("$elapsed_ms")
    # The log engine's own part of the start, where it says it (since hint files).
    index_ms=$(sed 's/\x1b\[[0-9;]*m//g' "$work/node.log" | grep -a "index is rebuilt" | tail -n 1 |
        grep -oE 'ms=[0-9]+' || true)
    counted+=("${counted_ms:-0}")
    echo "restart $run after SIGKILL: $elapsed_ms ms to /health 200, ${counted_ms:--} ms to its keys counted (${index_ms:+index rebuilt in ${index_ms#ms=} ms; }$(files))"
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
counted_median=$(printf '%s\n' "${counted[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
echo "median of $RUNS restarts: $median ms to /health 200, $counted_median ms to the keys counted"
