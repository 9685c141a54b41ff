#!/usr/bin/env bash
# Reproduces the README's performance figures: XML-RPC throughput and latency of
#
#   ceiling   examples/ceiling.rs, an HTTP server that does nothing: the bound for one hop
#   node      one durable storage node, called directly (put(key, value) and get(key) as a
#             Python client sends them; the node writes its own copy only)
#   balancer  a load balancer over three durable storage nodes, N=3 R=2 W=2, the nodes with
#             each other as -s peers (anti-entropy at its default interval), as
#             examples/local_cluster.sh starts them: the configuration users run
#   isolated  the same, the nodes without peers (no anti-entropy): what the rounds cost
#   hung      (not in the default set) the balancer set-up again, healthy, then with one of the
#             three nodes hung (SIGSTOP: it accepts TCP connections and never answers): put and
#             get throughput and latency side by side, with the ratios hung/healthy, the
#             latency of the first seconds after the hang (when the balancer still waits one
#             --timeout-ms for the node), and how long the balancer takes to see the node up
#             again after SIGCONT. With "balancer hung" both parts share one cluster and the
#             balancer part's runs are the healthy figures.
#
# each measured RUNS times for DURATION seconds by examples/loadgen.rs (64 keep-alive
# connections, 100k keys, 100-byte values; gets after a preload of every key), then a table of
# medians, with each throughput as a fraction of the ceiling's for the same operation, the CPU
# time each side spent per request (from /proc: the daemon loadgen talks to, the storage nodes
# behind a balancer, loadgen itself), and the memory (VmRSS) of the daemons after their runs.
# It first checks that loadgen's bodies are byte for byte Python xmlrpc.client's. Everything
# it starts is stopped on exit. Daemons listen on 127.0.0.1, ports PORT_BASE..PORT_BASE+5
# (23700-23705: below Linux's ephemeral range, so outgoing connections cannot take them).
# A stopped node is always sent SIGCONT before it is stopped for good.
#
#   examples/bench.sh                      # RUNS=3 DURATION=10: about 6 minutes, plus the build
#   RUNS=3 DURATION=5 examples/bench.sh
#   PARTS="balancer hung" examples/bench.sh  # about 2.5 minutes
#
# Settings (environment): RUNS DURATION WARMUP CONNECTIONS KEYS VALUE_BYTES PORT_BASE
# LOADGEN_THREADS CARGO_TARGET_DIR, PARTS (default "ceiling node balancer isolated"; "hung" also
# exists)
# to run only some of the set-ups, BUILD=0 to use the binaries already built, TIMEOUT_MS (the
# balancer's --timeout-ms, default 1000 as the daemon's), ONSET_SECS (default 3: the mixed
# load measured right after the hang, with no warm-up), PEERS=0 to start the "balancer"
# part's nodes without peers. The load generator shares the
# machine with the daemons it measures: on a 2-core machine the figures are what both sides
# together can do, and any other work on the machine lowers them (the CPU time per request
# is the steadier figure).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-64}
KEYS=${KEYS:-100000}
VALUE_BYTES=${VALUE_BYTES:-100}
PORT_BASE=${PORT_BASE:-23700}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
PARTS=${PARTS:-ceiling node balancer isolated}
BUILD=${BUILD:-1}
TIMEOUT_MS=${TIMEOUT_MS:-1000}
ONSET_SECS=${ONSET_SECS:-3}
PEERS=${PEERS:-1}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
bin=$target_dir/release
loadgen=$bin/examples/loadgen

work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-bench.XXXXXX")
results=$work/results.jsonl
: >"$results"
pids=()
stop_all() {
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        kill -CONT "${pids[@]}" 2>/dev/null || true
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# Stops the daemons started so far (SIGTERM, so durable nodes close their storage cleanly).
stop_daemons() {
    if ((${#pids[@]})); then
        kill -CONT "${pids[@]}" 2>/dev/null || true
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    pids=()
}

# wait_up PORT PID: waits for the daemon to answer; stops if it died (a port in use, say).
wait_up() {
    local port=$1 pid=$2
    for _ in $(seq 1 200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: the daemon for port $port did not start:" >&2
            cat "$work"/*.log >&2 2>/dev/null || true
            exit 1
        fi
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "bench: nothing answers on port $port" >&2
    exit 1
}

# The balancer's stats() as one JSON line: {"counters": {...}, "states": [...]}.
balancer_stats() {
    python3 - "$balancer_port" <<'PY'
import json, socket, sys, xmlrpc.client
socket.setdefaulttimeout(5)
s = xmlrpc.client.ServerProxy("http://127.0.0.1:%s" % sys.argv[1]).stats()
print(json.dumps({"counters": s["counters"], "states": [x["state"] for x in s["servers"]]}))
PY
}

part() {
    [[ " $PARTS " == *" $1 "* ]]
}

rss() {
    awk '/^VmRSS/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"
}

# Checks that loadgen's bodies are byte for byte what Python's xmlrpc.client sends.
check_bodies() {
    command -v python3 >/dev/null || {
        echo "bench: no python3; bodies not compared with xmlrpc.client"
        return
    }
    python3 - "$work/py" "$VALUE_BYTES" <<'PY'
import http.server, sys, threading, xmlrpc.client
out, value_bytes = sys.argv[1], int(sys.argv[2])
bodies = []
class Capture(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        reply = b'<?xml version="1.0"?><methodResponse><params><param><value><string>200</string></value></param></params></methodResponse>'
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Capture)
threading.Thread(target=server.serve_forever, daemon=True).start()
proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % server.server_address[1])
letters = "".join(chr(ord("a") + i % 26) for i in range(value_bytes + 26))
proxy.put("key-000123", letters[123 % 26 : 123 % 26 + value_bytes])
proxy.get("key-000123")
open(out + ".put", "wb").write(bodies[0])
open(out + ".get", "wb").write(bodies[1])
PY
    for op in put get; do
        "$loadgen" --target unused:1 --value-bytes "$VALUE_BYTES" --print-body "$op" >"$work/rust.$op"
        if cmp -s "$work/py.$op" "$work/rust.$op"; then
            echo "bench: $op body is byte-identical to Python's xmlrpc.client ($(wc -c <"$work/rust.$op") bytes)"
        else
            echo "bench: !!! $op body differs from Python's xmlrpc.client" >&2
            exit 1
        fi
    done
}

# CPU time (user + system, in clock ticks of 10 ms) the given processes have used so far.
cpu_ticks() {
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

# The daemons whose CPU time per request is reported: the one loadgen talks to ("front") and
# the storage nodes behind a balancer ("behind").
front_pids=()
behind_pids=()

# measure LABEL PORT GET_RATIO [RUNS DURATION WARMUP]: runs of loadgen (RUNS of them,
# DURATION + WARMUP seconds each, unless given), one line each, JSON kept for the table.
measure() {
    local label=$1 port=$2 ratio=$3 runs=${4:-$RUNS} duration=${5:-$DURATION}
    local warmup=${6:-$WARMUP} run out front behind
    for run in $(seq 1 "$runs"); do
        out=$work/$label.$run
        front=$(cpu_ticks "${front_pids[@]}")
        behind=$(cpu_ticks "${behind_pids[@]}")
        if ! "$loadgen" --target "127.0.0.1:$port" --get-ratio "$ratio" \
            --connections "$CONNECTIONS" --keys "$KEYS" --value-bytes "$VALUE_BYTES" \
            --duration-secs "$duration" --warmup-secs "$warmup" --threads "$LOADGEN_THREADS" \
            --seed "$run" --label "$label" --json ${LOADGEN_LOCAL:+--local} >"$out.out" 2>"$out.err"; then
            echo "bench: !!! $label run $run had errors:" >&2
            grep -E 'ERROR|!!!|^ +[0-9]+ ' "$out.err" | head -20 >&2 || true
        fi
        if ! grep -q '^{' "$out.out"; then
            echo "bench: !!! $label run $run gave no result:" >&2
            tail -5 "$out.err" >&2
            continue
        fi
        front=$(($(cpu_ticks "${front_pids[@]}") - front))
        behind=$(($(cpu_ticks "${behind_pids[@]}") - behind))
        # Each daemon's CPU time per request, over the warm-up and the measured time alike.
        grep '^{' "$out.out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); a = r["all"]
n = max(r["answered_with_warmup"], 1)
r["front_cpu_us_per_req"] = int(sys.argv[2]) * 1e4 / n
r["behind_cpu_us_per_req"] = int(sys.argv[3]) * 1e4 / n if sys.argv[4] else None
open(sys.argv[5], "a").write(json.dumps(r) + "\n")
print("  %-14s run %s: %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  errors %d" % (
    r["label"], sys.argv[1], r["throughput"], a["p50_us"] / 1e3, a["p99_us"] / 1e3,
    a["max_us"] / 1e3, r["errors"]))
' "$run" "$front" "$behind" "${behind_pids[*]}" "$results"
    done
}

# preload PORT: puts every key once, so that gets find them.
preload() {
    local port=$1
    if ! "$loadgen" --target "127.0.0.1:$port" --connections "$CONNECTIONS" \
        --keys "$KEYS" --value-bytes "$VALUE_BYTES" --threads "$LOADGEN_THREADS" \
        --preload --requests 0 ${LOADGEN_LOCAL:+--local} >"$work/preload.out" 2>"$work/preload.err"; then
        echo "bench: !!! preload had errors:" >&2
        grep -E 'ERROR|!!!' "$work/preload.err" | head -20 >&2 || true
    fi
    grep '^preload' "$work/preload.err" | sed 's/^/  /' || true
}

check_bodies
echo "bench: $RUNS runs x ${DURATION}s (+${WARMUP}s warm-up), $CONNECTIONS connections," \
    "$KEYS keys, $VALUE_BYTES-byte values, loadgen on $LOADGEN_THREADS thread(s), $(nproc) cores;" \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)"

ceiling_port=$PORT_BASE
node_port=$((PORT_BASE + 1))
balancer_port=$((PORT_BASE + 2))
node_rss=- cluster_rss=(-) balancer_rss=- isolated_rss=(-)

# 1. The ceiling.
if part ceiling; then
    "$bin/examples/ceiling" --bind 127.0.0.1 --port "$ceiling_port" >"$work/ceiling.log" 2>&1 &
    pids+=($!)
    front_pids=($!) behind_pids=()
    wait_up "$ceiling_port" $!
    echo "ceiling:"
    measure ceiling-put "$ceiling_port" 0
    measure ceiling-get "$ceiling_port" 1
    stop_daemons
fi

# 2. One durable storage node, directly.
if part node; then
    "$bin/storage_node" --bind 127.0.0.1 -p "$node_port" --data-dir "$work/node" --quiet \
        >"$work/node.log" 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
    front_pids=("$node_pid") behind_pids=()
    wait_up "$node_port" "$node_pid"
    echo "one storage node (durable; its own copy: local.put, local.get):"
    LOADGEN_LOCAL=1
    measure node-put "$node_port" 0
    preload "$node_port"
    measure node-get "$node_port" 1
    LOADGEN_LOCAL=
    node_rss=$(rss "$node_pid")
    stop_daemons
fi

# start_cluster LABEL PEERS: three durable storage nodes (each with the other two as -s peers,
# anti-entropy on, when PEERS is 1) and a balancer over them; "LABEL" names the logs.
start_cluster() {
    local label=$1 with_peers=$2 i j port
    local -a peers
    servers=()
    cluster_node_pids=()
    for i in 1 2 3; do
        port=$((PORT_BASE + 2 + i))
        peers=()
        if [[ $with_peers != 0 ]]; then
            for j in 1 2 3; do
                [[ $j == "$i" ]] || peers+=(-s "127.0.0.1:$((PORT_BASE + 2 + j))")
            done
        fi
        "$bin/storage_node" --bind 127.0.0.1 -p "$port" --data-dir "$work/$label-$i" --quiet \
            "${peers[@]}" >"$work/$label-$i.log" 2>&1 &
        pids+=($!)
        cluster_node_pids+=($!)
        servers+=(-s "127.0.0.1:$port")
    done
    balancer_quiet=()
    if "$bin/load_balancer" --help | grep -q -- '--quiet'; then
        balancer_quiet=(--quiet)
    fi
    "$bin/load_balancer" --bind 127.0.0.1 -p "$balancer_port" "${servers[@]}" -N 3 -R 2 -W 2 \
        --timeout-ms "$TIMEOUT_MS" "${balancer_quiet[@]}" >"$work/$label-balancer.log" 2>&1 &
    balancer_pid=$!
    pids+=("$balancer_pid")
    front_pids=("$balancer_pid") behind_pids=("${cluster_node_pids[@]}")
    for i in 1 2 3; do wait_up $((PORT_BASE + 2 + i)) "${cluster_node_pids[i - 1]}"; done
    wait_up "$balancer_port" "$balancer_pid"
}

# 3. Three durable storage nodes that know each other behind a balancer, as
# examples/local_cluster.sh starts them; with "hung", then one of them hung.
if part balancer || part hung; then
    start_cluster balancer "$PEERS"
    echo "balancer over three storage nodes (N=3 R=2 W=2, --timeout-ms $TIMEOUT_MS$(
        [[ $PEERS != 0 ]] && echo ", nodes with peers: anti-entropy on" ||
            echo ", nodes without peers")):"
    measure balancer-put "$balancer_port" 0
    preload "$balancer_port"
    measure balancer-get "$balancer_port" 1
    cluster_rss=()
    for pid in "${cluster_node_pids[@]}"; do cluster_rss+=("$(rss "$pid")"); done
    balancer_rss=$(rss "$balancer_pid")
    if part hung; then
        hung_pid=${cluster_node_pids[2]}
        hung_port=$((PORT_BASE + 5))
        balancer_stats >"$work/hung.stats.before"
        echo "the same cluster with node 127.0.0.1:$hung_port hung (SIGSTOP; it accepts" \
            "connections and never answers):"
        kill -STOP "$hung_pid"
        # The first seconds: the balancer has not yet seen the node fail.
        measure hung-onset "$balancer_port" 0.5 1 "$ONSET_SECS" 0
        measure hung-put "$balancer_port" 0
        measure hung-get "$balancer_port" 1
        balancer_stats >"$work/hung.stats.after"
        kill -CONT "$hung_pid"
        # How long until the balancer's prober sees the node answer again.
        cont_start=$(date +%s%N)
        up_after=
        for _ in $(seq 1 300); do
            if balancer_stats | grep -q '"states": \["up", "up", "up"\]'; then
                up_after=$((($(date +%s%N) - cont_start) / 1000000))
                break
            fi
            sleep 0.05
        done
        python3 - "$work/hung.stats.before" "$work/hung.stats.after" "${up_after:-}" <<'PY'
import json, sys
before, after = (json.loads(open(f).read()) for f in sys.argv[1:3])
delta = {k: after["counters"][k] - before["counters"][k] for k in after["counters"]}
print("  balancer counters while the node was hung: " + ", ".join(
    "%s +%d" % (k, delta[k]) for k in ("puts", "gets", "replica_failures",
                                        "write_quorum_failures", "read_quorum_failures",
                                        "read_repairs")))
print("  node states while hung: %s" % after["states"])
up = sys.argv[3]
print("  after SIGCONT the balancer saw all three nodes up in " +
      ("%.2f s" % (int(up) / 1e3) if up else "-- NOT within 15 s --"))
PY
    fi
    stop_daemons
fi

# 4. The same without peers: no anti-entropy, for comparison.
if part isolated; then
    start_cluster isolated 0
    echo "the same, nodes without peers (no anti-entropy):"
    measure isolated-put "$balancer_port" 0
    preload "$balancer_port"
    measure isolated-get "$balancer_port" 1
    isolated_rss=()
    for pid in "${cluster_node_pids[@]}"; do isolated_rss+=("$(rss "$pid")"); done
    stop_daemons
fi

echo
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["label"], []).append(r)
med = lambda xs: statistics.median(xs)
def ceiling(label):
    op = label.rsplit("-", 1)[1]
    runs = rows.get("ceiling-" + op)
    return med([r["throughput"] for r in runs]) if runs else None
print("%-14s %4s %10s %9s %8s %8s %8s %7s %7s   %s" % (
    "medians", "runs", "req/s", "/ceiling", "p50 ms", "p99 ms", "p999 ms", "errors", "nil",
    "CPU us/request: front daemon + nodes behind + loadgen"))
def cpu(runs, field):
    values = [r.get(field) for r in runs]
    return "%6.1f" % med(values) if None not in values else "     -"
labels = ["ceiling-put", "ceiling-get", "node-put", "node-get", "balancer-put", "balancer-get",
          "isolated-put", "isolated-get", "hung-onset", "hung-put", "hung-get"]
for label in labels:
    runs = rows.get(label)
    if not runs:
        continue
    tput = med([r["throughput"] for r in runs])
    top = ceiling(label)
    print("%-14s %4d %10.0f %9s %8.2f %8.2f %8.2f %7d %7d   %s + %s + %s" % (
        label, len(runs), tput, "%.2f" % (tput / top) if top else "-",
        med([r["all"]["p50_us"] for r in runs]) / 1e3,
        med([r["all"]["p99_us"] for r in runs]) / 1e3,
        med([r["all"]["p999_us"] for r in runs]) / 1e3,
        sum(r["errors"] for r in runs), sum(r["all"]["nil"] for r in runs),
        cpu(runs, "front_cpu_us_per_req"), cpu(runs, "behind_cpu_us_per_req"),
        cpu(runs, "loadgen_cpu_us_per_req")))
if "hung-put" in rows or "hung-get" in rows:
    print()
    print("one of three nodes hung (SIGSTOP), beside the healthy figures of the same cluster:")
    print("%-4s %10s %10s %7s   %8s %8s %7s   %8s %8s %7s   %7s" % (
        "op", "healthy/s", "hung/s", "ratio", "p50 ok", "p50 hung", "ratio",
        "p99 ok", "p99 hung", "ratio", "errors"))
    for op in ("put", "get"):
        ok, hung = rows.get("balancer-" + op), rows.get("hung-" + op)
        if not ok or not hung:
            continue
        figures = []
        for pick in (lambda r: r["throughput"], lambda r: r["all"]["p50_us"] / 1e3,
                     lambda r: r["all"]["p99_us"] / 1e3):
            a, b = med([pick(r) for r in ok]), med([pick(r) for r in hung])
            figures += [a, b, b / a if a else float("nan")]
        print("%-4s %10.0f %10.0f %7.2f   %8.2f %8.2f %7.2f   %8.2f %8.2f %7.2f   %7d" % (
            op, *figures, sum(r["errors"] for r in hung)))
    print("(medians of %d runs each; p50/p99 in ms; ratio = hung / healthy)" % len(rows["hung-put"]))
    for r in rows.get("hung-onset", []):
        a = r["all"]
        print("first %.0f s after the hang (50%% gets, no warm-up): %.0f req/s, p50 %.2f ms, "
              "p99 %.2f ms, max %.2f ms, %d errors" % (
                  r["elapsed_s"], r["throughput"], a["p50_us"] / 1e3, a["p99_us"] / 1e3,
                  a["max_us"] / 1e3, r["errors"]))
if any(r["errors"] for label, runs in rows.items() if label != "hung-onset" for r in runs):
    print("\n!!! SOME RUNS HAD ERRORS: their figures are not valid !!!")
if any(r["errors"] for r in rows.get("hung-onset", [])):
    print("\n!!! requests failed in the first seconds after the hang (see the errors above) !!!")
if any(r["all"]["nil"] for label in ("node-get", "balancer-get", "isolated-get", "hung-get") for r in rows.get(label, [])):
    print("\n!!! some gets answered nil: the preload missed keys (see its errors above) !!!")
PY
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
echo "memory (VmRSS) after the runs:"
echo "  single storage node ($KEYS keys):       $node_rss"
echo "  cluster storage nodes:                 ${cluster_rss[*]}"
echo "  the same without peers:                ${isolated_rss[*]}"
echo "  load balancer:                         $balancer_rss"
