#!/usr/bin/env bash
# What TLS costs: put and get through a load balancer over three durable storage nodes that
# know their peers (-s, as examples/local_cluster.sh starts them), N=3 R=2 W=2, in two
# configurations measured back to back in each round:
#
#   plain  HTTP on every hop, with client passwords (--auth-user/--auth-password-file) and
#          the cluster secret (--cluster-secret-file) on every daemon, loadgen sending the
#          password
#   tls    the same, and TLS on every hop: every daemon serves HTTPS (--tls-cert/--tls-key)
#          and calls the others over HTTPS, verifying them (--tls-ca); loadgen speaks HTTPS
#          and verifies the balancer (--tls-ca)
#
# The order alternates between rounds (plain first in odd rounds, tls first in even ones), so
# that drift of a shared machine falls on both alike. Each configuration starts a fresh
# cluster; examples/loadgen.rs measures DURATION seconds of puts (after WARMUP), puts every
# key once (the preload), then DURATION seconds of gets, with bench.sh's balancer settings
# (64 keep-alive connections, 100k keys, 100-byte values, loadgen on one thread). At the end a
# table of medians across rounds, with the TLS/plain ratios, and beside the figures:
#
#   - the CPU time per request of the balancer, of the three nodes together and of loadgen
#     (from /proc, as bench.sh reports it; warm-up included);
#   - loadgen's time to open its connections one after the other before the run (with TLS, a
#     handshake each: what a client pays per new connection);
#   - the connections the daemons accepted during a run (their /metrics), beyond loadgen's
#     own: with TLS each is a handshake, so this shows whether the pools keep them;
#   - the CPU that other processes used during each run, as a share of the machine (from
#     /proc/stat: user, nice, system, irq and softirq time of all CPUs, less what the daemons
#     and loadgen used).
#
# The machine may be shared: before each round the script waits for it to be quiet (others
# using under MAX_OTHER_CPU percent of it over 3 s, for at most QUIET_WAIT seconds), and a
# round in which others used more than that during any run is measured again (up to RETRIES
# times; the last attempt is kept whatever it saw, and said so). The table is of the rounds
# kept; the others are listed above it.
#
# It makes its own CA and node certificate with openssl (EC P-256 keys; the certificate names
# IP:127.0.0.1, and every daemon presents it), a cluster secret and a password (files of mode
# 600). Everything it starts is stopped on exit, and its data (a temporary directory) removed.
# Daemons listen on 127.0.0.1, on four consecutive ports from PORT_BASE on (23720; the first
# four free ones above it, picked again for every cluster; below Linux's ephemeral range).
#
#   examples/tls_bench.sh                  # ROUNDS=3 DURATION=10: about 3 minutes, plus the build
#   ROUNDS=5 examples/tls_bench.sh         # about 5.5 minutes on a quiet machine
#
# Settings (environment): ROUNDS DURATION WARMUP CONNECTIONS KEYS VALUE_BYTES PORT_BASE
# LOADGEN_THREADS TIMEOUT_MS CARGO_TARGET_DIR, BUILD=0 to use the binaries already built;
# MAX_OTHER_CPU (default 5, in percent of the machine; 100 turns the check off), RETRIES
# (default 3), QUIET_WAIT (default 300). The load generator shares the machine with the
# daemons it measures: any other work on the machine lowers the figures (the CPU time per
# request is the steadier figure).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-64}
KEYS=${KEYS:-100000}
VALUE_BYTES=${VALUE_BYTES:-100}
PORT_BASE=${PORT_BASE:-23720}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
BUILD=${BUILD:-1}
TIMEOUT_MS=${TIMEOUT_MS:-1000}
MAX_OTHER_CPU=${MAX_OTHER_CPU:-5}
RETRIES=${RETRIES:-3}
QUIET_WAIT=${QUIET_WAIT:-300}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
bin=$target_dir/release
loadgen=$bin/examples/loadgen
for tool in openssl curl python3; do
    command -v "$tool" >/dev/null || {
        echo "tls_bench: needs $tool" >&2
        exit 1
    }
done

started_at=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-tls-bench.XXXXXX")
results=$work/results.jsonl
attempt=$work/attempt.jsonl
rejected=$work/rejected.jsonl
: >"$results"
: >"$rejected"
cores=$(nproc)
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
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    pids=()
}

# --- The secrets: a CA, one certificate every daemon presents, a cluster secret, a password.
pki=$work/pki
mkdir -m 700 "$pki"
(
    cd "$pki"
    umask 077
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days 2 -subj "/CN=dynamite tls_bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout node.key -out node.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=IP:127.0.0.1" >node.ext
    openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -extfile node.ext -out node.pem 2>/dev/null
    openssl verify -CAfile ca.pem node.pem >/dev/null
    openssl rand -hex 32 >cluster.secret
    openssl rand -hex 16 >password
    # What curl sends to read /metrics (kept off its command line).
    printf 'Authorization: Basic %s\n' "$(printf 'bench:%s' "$(cat password)" | base64 -w0)" >auth.header
    chmod 600 ca.key node.key cluster.secret password auth.header
)
secure=(--auth-user bench --auth-password-file "$pki/password" --cluster-secret-file "$pki/cluster.secret")
tls_daemon=(--tls-cert "$pki/node.pem" --tls-key "$pki/node.key" --tls-ca "$pki/ca.pem")
loadgen_auth=(--auth-user bench --auth-password-file "$pki/password")

balancer_quiet=()
if "$bin/load_balancer" --help | grep -q -- '--quiet'; then
    balancer_quiet=(--quiet)
fi

# Sets config's settings: scheme, daemon_flags, loadgen_flags, curl_flags.
configure() {
    case $1 in
        plain)
            scheme=http daemon_flags=("${secure[@]}") loadgen_flags=("${loadgen_auth[@]}")
            curl_flags=()
            ;;
        tls)
            scheme=https daemon_flags=("${secure[@]}" "${tls_daemon[@]}")
            loadgen_flags=("${loadgen_auth[@]}" --tls-ca "$pki/ca.pem")
            curl_flags=(--cacert "$pki/ca.pem")
            ;;
    esac
}

# Picks four consecutive free ports on 127.0.0.1, from PORT_BASE up: the balancer's, then the
# three nodes'.
pick_ports() {
    local base
    base=$(python3 - "$PORT_BASE" <<'PY'
import socket, sys
base = int(sys.argv[1])
while base + 4 < 32768:
    sockets = []
    try:
        for port in range(base, base + 4):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", port))
        print(base)
        break
    except OSError:
        base += 4
    finally:
        for s in sockets:
            s.close()
else:
    sys.exit("tls_bench: no four free ports from %s up" % sys.argv[1])
PY
)
    balancer_port=$base
    node_ports=($((base + 1)) $((base + 2)) $((base + 3)))
}

# wait_up PORT PID: waits for the daemon to answer /health; stops if it died.
wait_up() {
    local port=$1 pid=$2
    for _ in $(seq 1 200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "tls_bench: the daemon for port $port did not start:" >&2
            cat "$work"/*.log >&2 2>/dev/null || true
            exit 1
        fi
        if curl -fsS "${curl_flags[@]}" -o /dev/null "$scheme://127.0.0.1:$port/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "tls_bench: nothing answers on port $port" >&2
    exit 1
}

# accepted PORT...: the connections these daemons accepted so far (their /metrics; the
# connection this reading comes on is counted in it).
accepted() {
    local port total=0 n
    for port in "$@"; do
        n=$(curl -fsS "${curl_flags[@]}" -H @"$pki/auth.header" "$scheme://127.0.0.1:$port/metrics" |
            awk '$1 == "dynamite_connections_accepted_total" { print $2 }')
        total=$((total + ${n:-0}))
    done
    echo "$total"
}

# CPU time (user + nice + system + irq + softirq, in clock ticks of 10 ms) every CPU of the
# machine has spent so far. (A process's system time includes the softirqs it ran, such as its
# loopback traffic's, which /proc/stat counts apart.)
machine_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat
}

# wait_quiet: waits until others use under MAX_OTHER_CPU percent of the machine over 3 s (at
# most QUIET_WAIT seconds; then it goes on, saying so). None of our processes runs meanwhile.
wait_quiet() {
    local since=$SECONDS before busy said=
    while :; do
        before=$(machine_ticks)
        sleep 3
        busy=$((($(machine_ticks) - before) * 100 / (300 * cores)))
        ((busy < MAX_OTHER_CPU)) && return 0
        if ((SECONDS - since >= QUIET_WAIT)); then
            echo "  (others still use $busy% of the machine after ${QUIET_WAIT}s: measuring anyway)"
            return 0
        fi
        [[ -n $said ]] || echo "  (others use $busy% of the machine: waiting for it to be quiet)"
        said=1
        sleep 2
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

# start_cluster CONFIG ROUND: three durable storage nodes, each with the other two as -s
# peers, and a balancer over them, with CONFIG's flags.
start_cluster() {
    local config=$1 round=$2 i j
    local -a peers servers=()
    configure "$config"
    pick_ports
    node_pids=()
    for i in 0 1 2; do
        peers=()
        for j in 0 1 2; do
            [[ $j == "$i" ]] || peers+=(-s "127.0.0.1:${node_ports[j]}")
        done
        "$bin/storage_node" --bind 127.0.0.1 -p "${node_ports[i]}" --data-dir "$work/r$round-$config-$i" \
            --quiet "${peers[@]}" "${daemon_flags[@]}" >"$work/r$round-$config-$i.log" 2>&1 &
        pids+=($!)
        node_pids+=($!)
        servers+=(-s "127.0.0.1:${node_ports[i]}")
    done
    "$bin/load_balancer" --bind 127.0.0.1 -p "$balancer_port" "${servers[@]}" -N 3 -R 2 -W 2 \
        --timeout-ms "$TIMEOUT_MS" "${balancer_quiet[@]}" "${daemon_flags[@]}" \
        >"$work/r$round-$config-balancer.log" 2>&1 &
    balancer_pid=$!
    pids+=("$balancer_pid")
    for i in 0 1 2; do wait_up "${node_ports[i]}" "${node_pids[i]}"; done
    wait_up "$balancer_port" "$balancer_pid"
}

# measure CONFIG OP ROUND: one run of loadgen through the balancer; one line, JSON kept.
measure() {
    local config=$1 op=$2 round=$3 ratio out front behind conns_b conns_n machine started
    [[ $op == put ]] && ratio=0 || ratio=1
    out=$work/r$round-$config-$op
    conns_b=$(accepted "$balancer_port")
    conns_n=$(accepted "${node_ports[@]}")
    front=$(cpu_ticks "$balancer_pid")
    behind=$(cpu_ticks "${node_pids[@]}")
    machine=$(machine_ticks)
    started=$(date +%s%N)
    if ! "$loadgen" --target "127.0.0.1:$balancer_port" --get-ratio "$ratio" \
        --connections "$CONNECTIONS" --keys "$KEYS" --value-bytes "$VALUE_BYTES" \
        --duration-secs "$DURATION" --warmup-secs "$WARMUP" --threads "$LOADGEN_THREADS" \
        --seed "$round" --label "$config-$op" --json "${loadgen_flags[@]}" >"$out.out" 2>"$out.err"; then
        echo "tls_bench: !!! $config $op round $round had errors:" >&2
        grep -E 'ERROR|!!!|^ +[0-9]+ ' "$out.err" | head -20 >&2 || true
    fi
    if ! grep -q '^{' "$out.out"; then
        echo "tls_bench: !!! $config $op round $round gave no result:" >&2
        tail -5 "$out.err" >&2
        return
    fi
    machine=$(($(machine_ticks) - machine))
    started=$(($(date +%s%N) - started))
    front=$(($(cpu_ticks "$balancer_pid") - front))
    behind=$(($(cpu_ticks "${node_pids[@]}") - behind))
    # Each reading of /metrics is a connection of its own: one per daemon in the second one.
    conns_b=$(($(accepted "$balancer_port") - conns_b - 1 - CONNECTIONS))
    conns_n=$(($(accepted "${node_ports[@]}") - conns_n - 3))
    grep '^{' "$out.out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); a = r["all"]
config, op, round_, front, behind, conns_b, conns_n, machine, wall_ns, cores, out = sys.argv[1:12]
n = max(r["answered_with_warmup"], 1)
# loadgen counts its CPU from after its connections are open; close enough here.
loadgen_ticks = (r["loadgen_cpu_us_per_req"] or 0.0) * r["answered_with_warmup"] / 1e4
others = int(machine) - int(front) - int(behind) - loadgen_ticks
r.update(config=config, op=op, round=int(round_),
         balancer_cpu_us_per_req=int(front) * 1e4 / n, nodes_cpu_us_per_req=int(behind) * 1e4 / n,
         new_conns_balancer=int(conns_b), new_conns_nodes=int(conns_n),
         others_cpu_pct=others * 1e9 / (int(wall_ns) * int(cores)))
open(out, "a").write(json.dumps(r) + "\n")
print("  %-5s %s round %s: %6.0f req/s  p50 %5.2f ms  p99 %6.2f ms  max %7.2f ms  errors %d  "
      "CPU us/req %.1f + %.1f + %.1f  connect %.2f ms  new conns %d + %d  others %.0f%%" % (
    config, op, round_, r["throughput"], a["p50_us"] / 1e3, a["p99_us"] / 1e3,
    a["max_us"] / 1e3, r["errors"], r["balancer_cpu_us_per_req"], r["nodes_cpu_us_per_req"],
    r["loadgen_cpu_us_per_req"] or 0.0, r["connect_ms"] / r["connections"], int(conns_b),
    int(conns_n), max(r["others_cpu_pct"], 0)))
' "$config" "$op" "$round" "$front" "$behind" "$conns_b" "$conns_n" "$machine" "$started" \
        "$cores" "$attempt"
}

# preload ROUND CONFIG: puts every key once, so that gets find them.
preload() {
    local round=$1 config=$2
    if ! "$loadgen" --target "127.0.0.1:$balancer_port" --connections "$CONNECTIONS" \
        --keys "$KEYS" --value-bytes "$VALUE_BYTES" --threads "$LOADGEN_THREADS" \
        --preload --requests 0 "${loadgen_flags[@]}" >"$work/preload.out" 2>"$work/preload.err"; then
        echo "tls_bench: !!! preload ($config, round $round) had errors:" >&2
        grep -E 'ERROR|!!!' "$work/preload.err" | head -20 >&2 || true
    fi
}

# run_config CONFIG ROUND: a fresh cluster, puts, preload, gets, stop.
run_config() {
    local config=$1 round=$2
    start_cluster "$config" "$round"
    measure "$config" put "$round"
    preload "$round" "$config"
    measure "$config" get "$round"
    stop_daemons
    rm -rf "$work/r$round-$config"-[0-9]
}

echo "tls_bench: $ROUNDS rounds of plain and tls back to back, each ${DURATION}s (+${WARMUP}s warm-up)" \
    "of puts then of gets; $CONNECTIONS connections, $KEYS keys, $VALUE_BYTES-byte values," \
    "loadgen on $LOADGEN_THREADS thread(s), $cores cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "(per run: CPU us per request of the balancer + the three nodes + loadgen; loadgen's time to" \
    "open one connection; connections the balancer (beyond loadgen's) and nodes accepted; others'" \
    "CPU, % of the machine)"
for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then order=(plain tls); else order=(tls plain); fi
    for try in $(seq 0 "$RETRIES"); do
        wait_quiet
        : >"$attempt"
        echo "round $round (${order[*]}), $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg):"
        for config in "${order[@]}"; do
            run_config "$config" "$round"
        done
        busiest=$(python3 -c '
import json, sys
print(int(max([json.loads(l)["others_cpu_pct"] for l in open(sys.argv[1])] or [0])))' "$attempt")
        if ((busiest < MAX_OTHER_CPU)); then
            cat "$attempt" >>"$results"
            break
        elif ((try == RETRIES)); then
            echo "  others used up to $busiest% of the machine in this round; kept (no retry left)"
            cat "$attempt" >>"$results"
        else
            echo "  others used up to $busiest% of the machine in this round: measuring it again"
            cat "$attempt" >>"$rejected"
        fi
    done
done

echo
python3 - "$results" "$ROUNDS" "$rejected" <<'PY'
import json, statistics, sys
again = sum(1 for _ in open(sys.argv[3])) // 4
if again:
    print("%d round(s) measured again because other processes were busy" % again)
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["config"], r["op"]), []).append(r)
med = statistics.median
fields = [
    ("req/s", lambda r: r["throughput"], "%8.0f"),
    ("p50 ms", lambda r: r["all"]["p50_us"] / 1e3, "%7.2f"),
    ("p99 ms", lambda r: r["all"]["p99_us"] / 1e3, "%7.2f"),
    ("p999 ms", lambda r: r["all"]["p999_us"] / 1e3, "%7.2f"),
    ("bal us", lambda r: r["balancer_cpu_us_per_req"], "%6.1f"),
    ("nodes us", lambda r: r["nodes_cpu_us_per_req"], "%8.1f"),
    ("lg us", lambda r: r["loadgen_cpu_us_per_req"] or 0.0, "%5.1f"),
    ("conn ms", lambda r: r["connect_ms"] / r["connections"], "%7.3f"),
    ("oth%", lambda r: max(r["others_cpu_pct"], 0), "%4.0f"),
]
print("medians of %s rounds (CPU us per request: balancer, three nodes, loadgen; conn ms: loadgen's"
      " time to open one connection; oth%%: others' CPU, %% of the machine)" % sys.argv[2])
print("%-11s %5s " % ("", "runs") + " ".join("%*s" % (len(f % 0), name) for name, _, f in fields)
      + "  errors  new conns bal+nodes")
def width(f):
    return len(f % 0)
for op in ("put", "get"):
    medians = {}
    for config in ("plain", "tls"):
        runs = rows.get((config, op), [])
        if not runs:
            continue
        medians[config] = [med([pick(r) for r in runs]) for _, pick, _ in fields]
        print("%-11s %5d " % ("%s %s" % (config, op), len(runs))
              + " ".join(f % v for (_, _, f), v in zip(fields, medians[config]))
              + "  %6d  %s" % (sum(r["errors"] for r in runs),
                               " ".join("%d+%d" % (r["new_conns_balancer"], r["new_conns_nodes"])
                                        for r in runs)))
    if len(medians) == 2:
        print("%-11s %5s " % ("tls/plain", "")
              + " ".join("%*s" % (width(f), "%.2f" % (t / p) if p and name != "oth%" else "")
                         for (name, _, f), p, t in zip(fields, medians["plain"], medians["tls"])))
        paired = []
        for pick in (lambda r: r["throughput"], lambda r: r["all"]["p99_us"]):
            plain = {r["round"]: pick(r) for r in rows[("plain", op)]}
            tls = {r["round"]: pick(r) for r in rows[("tls", op)]}
            paired.append([tls[k] / plain[k] for k in sorted(plain) if k in tls and plain[k]])
        print("%-11s        each round's tls/plain: req/s %s (median %.2f), p99 %s (median %.2f)" % (
            "", " ".join("%.2f" % x for x in paired[0]), med(paired[0]),
            " ".join("%.2f" % x for x in paired[1]), med(paired[1])))
    print()
if any(r["errors"] for runs in rows.values() for r in runs):
    print("!!! SOME RUNS HAD ERRORS: their figures are not valid !!!")
if any(r["all"]["nil"] for (config, op), runs in rows.items() if op == "get" for r in runs):
    print("!!! some gets answered nil: the preload missed keys !!!")
PY
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
echo "took $(($(date +%s) - started_at)) s"
