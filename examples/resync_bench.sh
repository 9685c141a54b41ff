#!/usr/bin/env bash
# The time and bytes anti-entropy needs to re-sync a wiped node holding KEYS keys (default
# 100,000), and what a cluster in sync exchanges per round.
#
# Starts three durable storage nodes A, B, C, each with the other two as -s peers, -N 3 and a
# short --aae-interval-ms, and a balancer over them (N=3, W=$W: with W=3 every node holds every
# key as soon as the preload ends); puts KEYS keys of VALUE_BYTES through the balancer
# (examples/loadgen.rs --preload) and waits until every node's stats() says keys == KEYS.
# Then, RUNS times:
#
#   1. in sync: waits until a whole round of every node repairs nothing (the cluster is
#      quiet), then counts the anti-entropy bytes of the next IN_SYNC_ROUNDS rounds of every
#      node (each round is one exchange with each of its two peers);
#   2. re-sync: SIGKILLs C, deletes its data directory, starts it again empty (same port,
#      same flags) and polls its stats() every POLL_MS until keys == KEYS (at most
#      RESYNC_TIMEOUT seconds); reports the time from the restart, the keys per second, and
#      the anti-entropy traffic meanwhile: the sum over the three nodes of their `bytes`
#      counters' growth (payload bytes sent and received by the exchanges a node started,
#      so each exchange counts once), keys pushed and pulled, exchanges started.
#
# and prints the medians. The time is split into start-up (until C first answers stats()), the
# wait for the first repaired key, and the transfer (first repaired key to the last). C is
# killed right after a round of every node (the in-sync window ends there), and a node's first
# round comes one interval after it starts, so the first key arrives about one interval after
# the restart: the worst phase, where a node that fails at a random time waits half an
# interval on average. Everything it starts is stopped on exit. Daemons listen on 127.0.0.1, ports PORT_BASE..PORT_BASE+3.
#
#   examples/resync_bench.sh                     # RUNS=3: about 2 minutes, plus the build
#   AAE_INTERVAL_MS=5000 RUNS=1 examples/resync_bench.sh
#
# Settings (environment): RUNS KEYS VALUE_BYTES CONNECTIONS AAE_INTERVAL_MS AAE_MAX_KEYS
# (empty: the daemon's default) W IN_SYNC_ROUNDS POLL_MS RESYNC_TIMEOUT PORT_BASE
# CARGO_TARGET_DIR, BUILD=0 to use the binaries already built, KEEP=1 to keep the work
# directory (logs, per-run traces of C's key count) and say where it is.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
KEYS=${KEYS:-100000}
VALUE_BYTES=${VALUE_BYTES:-100}
CONNECTIONS=${CONNECTIONS:-64}
AAE_INTERVAL_MS=${AAE_INTERVAL_MS:-500}
AAE_MAX_KEYS=${AAE_MAX_KEYS:-}
W=${W:-3}
IN_SYNC_ROUNDS=${IN_SYNC_ROUNDS:-5}
POLL_MS=${POLL_MS:-100}
RESYNC_TIMEOUT=${RESYNC_TIMEOUT:-300}
PORT_BASE=${PORT_BASE:-23720}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
bin=$target_dir/release

work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-resync.XXXXXX")
pids=()
stop_all() {
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if [[ $KEEP != 0 ]]; then
        echo "resync: work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

ports=("$PORT_BASE" $((PORT_BASE + 1)) $((PORT_BASE + 2)))
names=(A B C)
balancer_port=$((PORT_BASE + 3))
aae_flags=(--aae-interval-ms "$AAE_INTERVAL_MS")
if [[ -n $AAE_MAX_KEYS ]]; then
    aae_flags+=(--aae-max-keys "$AAE_MAX_KEYS")
fi
node_pids=(- - -)

# start_node I: starts node I (0..2) in the background, appending to its log.
start_node() {
    local i=$1 peers=() j
    for j in 0 1 2; do
        if ((j != i)); then peers+=(-s "127.0.0.1:${ports[j]}"); fi
    done
    "$bin/storage_node" --bind 127.0.0.1 -p "${ports[i]}" --data-dir "$work/node-${names[i]}" \
        --quiet "${peers[@]}" -N 3 "${aae_flags[@]}" >>"$work/node-${names[i]}.log" 2>&1 &
    node_pids[i]=$!
    pids+=($!)
}

# wait_up PORT PID
wait_up() {
    local port=$1 pid=$2
    for _ in $(seq 1 400); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "resync: the daemon for port $port did not start:" >&2
            tail -20 "$work"/*.log >&2 || true
            exit 1
        fi
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "resync: nothing answers on port $port" >&2
    exit 1
}

# The storage nodes' stats(), polled from one Python process (a new one every 100 ms would
# cost more CPU than the node being measured).
cat >"$work/aae.py" <<'PY'
"""Anti-entropy measurements from the storage nodes' stats() (XML-RPC)."""
import json, socket, sys, time, xmlrpc.client

socket.setdefaulttimeout(5)
COUNTERS = ("rounds", "in_sync", "keys_pushed", "keys_pulled", "bytes", "failures")


def stats(port):
    return xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % port).stats()


def snapshot(ports):
    """Every node's keys and anti-entropy counters."""
    out = {}
    for port in ports:
        s = stats(port)
        out[port] = dict(keys=s["keys"], **{c: s["anti_entropy"][c] for c in COUNTERS})
    return out


def delta(before, after, restarted=()):
    """Counter growth per node; a restarted node's counters started again from zero."""
    out = {}
    for port, a in after.items():
        b = before.get(port) if port not in restarted else None
        out[port] = {c: a[c] - (b[c] if b else 0) for c in COUNTERS}
    return out


def total(d, counter):
    return sum(node[counter] for node in d.values())


def wait_rounds(ports, rounds, timeout):
    """Waits until every node started `rounds` more rounds (one exchange per peer each)."""
    start = snapshot(ports)
    peers = len(ports) - 1
    deadline = time.time() + timeout
    while True:
        now = snapshot(ports)
        if all(now[p]["rounds"] - start[p]["rounds"] >= rounds * peers for p in ports):
            return start, now
        if time.time() > deadline:
            raise SystemExit("resync: the nodes did not do %d rounds in %d s" % (rounds, timeout))
        time.sleep(0.05)


def cmd_in_sync(ports, rounds, timeout, out):
    # Quiet first: one whole round of every node in which nothing was pushed or pulled.
    t0 = time.time()
    while True:
        a, b = wait_rounds(ports, 1, timeout)
        d = delta(a, b)
        if total(d, "keys_pushed") + total(d, "keys_pulled") == 0:
            break
        if time.time() - t0 > timeout:
            raise SystemExit("resync: the cluster did not become quiet in %d s" % timeout)
    quiet_after = time.time() - t0
    started = time.time()
    a, b = wait_rounds(ports, rounds, timeout)
    window = time.time() - started
    d = delta(a, b)
    exchanges = total(d, "rounds")
    result = dict(quiet_after_s=quiet_after, window_s=window, exchanges=exchanges,
                  bytes=total(d, "bytes"), in_sync=total(d, "in_sync"),
                  pushed=total(d, "keys_pushed"), pulled=total(d, "keys_pulled"),
                  failures=total(d, "failures"),
                  bytes_per_exchange=total(d, "bytes") / max(exchanges, 1),
                  keys={str(p): b[p]["keys"] for p in ports})
    open(out, "a").write(json.dumps(result) + "\n")
    print("  in sync:  %d exchanges in %.1f s (%d found the trees equal): %d bytes, %.1f per "
          "exchange, %.1f per node-round; %d keys pushed, %d pulled, %d failures" % (
              exchanges, window, result["in_sync"], result["bytes"],
              result["bytes_per_exchange"], result["bytes_per_exchange"] * (len(ports) - 1),
              result["pushed"], result["pulled"], result["failures"]))


def cmd_snapshot(ports, out):
    json.dump(snapshot(ports), open(out, "w"))


def cmd_wait_keys(ports, wiped, keys, started_ns, poll, timeout, before_file, out, trace):
    """Polls the wiped node until it holds `keys` keys; records the timeline and traffic."""
    before = {int(p): v for p, v in json.load(open(before_file)).items()}
    start = started_ns / 1e9
    up = first = None
    rows = []
    proxy = None
    while True:
        now = time.time()
        if now - start > timeout:
            break
        try:
            if proxy is None:
                proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % wiped)
            s = proxy.stats()
        except (OSError, xmlrpc.client.Error):
            proxy = None
            time.sleep(poll / 4)
            continue
        t = time.time() - start
        if up is None:
            up = t
        k = s["keys"]
        a = s["anti_entropy"]
        rows.append((round(t, 3), k, a["rounds"], a["keys_pulled"]))
        if k > 0 and first is None:
            first = t
        if k >= keys:
            break
        time.sleep(max(0.0, poll - (time.time() - now)))
    elapsed = time.time() - start if rows and rows[-1][1] >= keys else None
    after = snapshot(ports)
    d = delta(before, after, restarted=(wiped,))
    with open(trace, "w") as f:
        f.write("# seconds since restart, C's keys, C's exchanges started, C's keys pulled\n")
        for row in rows:
            f.write("%.3f %d %d %d\n" % row)
    result = dict(ok=elapsed is not None, elapsed_s=elapsed, up_s=up, first_key_s=first,
                  keys_reached=rows[-1][1] if rows else 0,
                  bytes=total(d, "bytes"), pushed=total(d, "keys_pushed"),
                  pulled=total(d, "keys_pulled"), exchanges=total(d, "rounds"),
                  failures=total(d, "failures"),
                  per_node={str(p): d[p] for p in ports})
    open(out, "a").write(json.dumps(result) + "\n")
    if elapsed is None:
        print("  re-sync:  !!! C reached only %d of %d keys in %d s" % (
            result["keys_reached"], keys, timeout))
    else:
        print("  re-sync:  %.2f s (up after %.2f s, first key after %.2f s, then %.2f s of "
              "transfer), %.0f keys/s; %d bytes (%.1f per key), %d keys pushed, %d pulled, "
              "%d exchanges, %d failures" % (
                  elapsed, up, first, elapsed - first, keys / elapsed, result["bytes"],
                  result["bytes"] / keys,
                  result["pushed"], result["pulled"], result["exchanges"], result["failures"]))
    return result


def cmd_keys_everywhere(ports, keys, timeout):
    deadline = time.time() + timeout
    while True:
        counts = {p: stats(p)["keys"] for p in ports}
        if all(c == keys for c in counts.values()):
            return counts
        if time.time() > deadline:
            raise SystemExit("resync: keys per node %s, not %d, after %d s" % (counts, keys, timeout))
        time.sleep(0.1)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    ports = [int(p) for p in args[0].split(",")]
    if cmd == "snapshot":
        cmd_snapshot(ports, args[1])
    elif cmd == "in-sync":
        cmd_in_sync(ports, int(args[1]), float(args[2]), args[3])
    elif cmd == "keys-everywhere":
        t0 = time.time()
        counts = cmd_keys_everywhere(ports, int(args[1]), float(args[2]))
        print("  every node holds %s keys (after %.1f s of waiting)" % (
            "/".join(str(c) for c in counts.values()), time.time() - t0))
    elif cmd == "wait-keys":
        cmd_wait_keys(ports, int(args[1]), int(args[2]), int(args[3]), float(args[4]),
                      float(args[5]), args[6], args[7], args[8])


main()
PY
aae() {
    python3 "$work/aae.py" "$@"
}
port_list=$(IFS=,; echo "${ports[*]}")

echo "resync: $KEYS keys of $VALUE_BYTES bytes, 3 durable nodes with -N 3 and" \
    "--aae-interval-ms $AAE_INTERVAL_MS${AAE_MAX_KEYS:+ --aae-max-keys $AAE_MAX_KEYS}," \
    "balancer N=3 W=$W; $RUNS runs; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for i in 0 1 2; do start_node "$i"; done
servers=()
for i in 0 1 2; do
    wait_up "${ports[i]}" "${node_pids[i]}"
    servers+=(-s "127.0.0.1:${ports[i]}")
done
"$bin/load_balancer" --bind 127.0.0.1 -p "$balancer_port" "${servers[@]}" -N 3 -R 2 -W "$W" \
    >"$work/balancer.log" 2>&1 &
pids+=($!)
wait_up "$balancer_port" $!

status=0
if ! "$bin/examples/loadgen" --target "127.0.0.1:$balancer_port" --preload --requests 0 \
    --keys "$KEYS" --value-bytes "$VALUE_BYTES" --connections "$CONNECTIONS" \
    >"$work/preload.out" 2>"$work/preload.err"; then
    echo "resync: !!! the preload had errors:" >&2
    grep -E 'ERROR|!!!|^ +[0-9]+ ' "$work/preload.err" | head -20 >&2 || true
    status=1
fi
grep '^preload' "$work/preload.err" | sed 's/^/  /' || true
aae keys-everywhere "$port_list" "$KEYS" "$RESYNC_TIMEOUT"

in_sync=$work/in_sync.jsonl resync=$work/resync.jsonl
: >"$in_sync"
: >"$resync"
for run in $(seq 1 "$RUNS"); do
    echo "run $run:"
    aae in-sync "$port_list" "$IN_SYNC_ROUNDS" 120 "$in_sync"
    aae snapshot "$port_list" "$work/before.$run.json"
    kill -KILL "${node_pids[2]}"
    wait "${node_pids[2]}" 2>/dev/null || true
    rm -rf "$work/node-C"
    echo "--- run $run: restarted empty" >>"$work/node-C.log"
    started_ns=$(date +%s%N)
    start_node 2
    aae wait-keys "$port_list" "${ports[2]}" "$KEYS" "$started_ns" "$(echo "$POLL_MS" | awk '{ print $1 / 1000 }')" \
        "$RESYNC_TIMEOUT" "$work/before.$run.json" "$resync" "$work/trace.$run" || status=1
    # C's keys at each interval since the restart, to see what paces the re-sync.
    awk -v step="$AAE_INTERVAL_MS" 'NR > 1 {
            slot = int($1 * 1000 / step)
            if (!(slot in seen)) { seen[slot] = 1; line = line sprintf(" %.1fs:%d", $1, $2) }
        } END { print "  C'"'"'s keys by interval:" line }' "$work/trace.$run"
done
echo "after the last run:"
aae in-sync "$port_list" "$IN_SYNC_ROUNDS" 120 "$in_sync"

echo
python3 - "$in_sync" "$resync" "$KEYS" "$AAE_INTERVAL_MS" "$IN_SYNC_ROUNDS" <<'PY'
import json, statistics, sys
in_sync = [json.loads(l) for l in open(sys.argv[1])]
resync = [json.loads(l) for l in open(sys.argv[2])]
keys, interval = int(sys.argv[3]), int(sys.argv[4])
med = statistics.median
ok = [r for r in resync if r["ok"]]
print("re-sync of a wiped node holding %d keys (--aae-interval-ms %d): medians of %d runs"
      % (keys, interval, len(ok)))
if ok:
    print("%10s %10s %8s %10s %10s %12s %10s %10s %10s %10s %9s" % (
        "seconds", "keys/s", "up s", "1st key s", "transfer s", "bytes", "bytes/key", "pushed",
        "pulled", "exchanges", "failures"))
    print("%10.2f %10.0f %8.2f %10.2f %10.2f %12d %10.1f %10d %10d %10d %9d" % (
        med([r["elapsed_s"] for r in ok]), med([keys / r["elapsed_s"] for r in ok]),
        med([r["up_s"] for r in ok]), med([r["first_key_s"] for r in ok]),
        med([r["elapsed_s"] - r["first_key_s"] for r in ok]),
        med([r["bytes"] for r in ok]), med([r["bytes"] / keys for r in ok]),
        med([r["pushed"] for r in ok]), med([r["pulled"] for r in ok]),
        med([r["exchanges"] for r in ok]), sum(r["failures"] for r in ok)))
    print("  each run: " + "; ".join("%.2f s, %d bytes" % (r["elapsed_s"], r["bytes"]) for r in ok))
if len(ok) < len(resync):
    print("!!! %d runs did not re-sync in time: see above" % (len(resync) - len(ok)))
print()
print("a cluster in sync: medians of %d windows of %s rounds (a node's round: one exchange with"
      " each of its 2 peers; a cluster round: 3 node-rounds)" % (len(in_sync), sys.argv[5]))
print("%12s %15s %18s %10s %8s %8s %9s" % (
    "bytes/exch.", "bytes/node-rnd", "bytes/cluster-rnd", "exchanges", "pushed", "pulled",
    "failures"))
per = med([r["bytes_per_exchange"] for r in in_sync])
print("%12.1f %15.1f %18.1f %10d %8d %8d %9d" % (
    per, per * 2, per * 6, med([r["exchanges"] for r in in_sync]),
    sum(r["pushed"] for r in in_sync), sum(r["pulled"] for r in in_sync),
    sum(r["failures"] for r in in_sync)))
PY
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
