#!/usr/bin/env bash
# Growing a cluster under load: a fourth node joins three that hold KEYS keys. How long the
# transition takes, how many bytes move against the ideal, and what the balancer's put and
# get latencies are during the move against before it.
#
# Each run, from scratch (fresh data directories):
#
#   1. three durable storage nodes A, B, C, each with the other two as -s peers (-N 3,
#      anti-entropy at its default interval: the configuration examples/local_cluster.sh
#      starts), and a balancer over them (N=3 R=2 W=2);
#   2. KEYS keys (default 1,000,000) of VALUE_BYTES put through the balancer
#      (examples/loadgen.rs --preload), then a wait until every node holds every key
#      (stats(): keys == KEYS, keys_counted);
#   3. before: loadgen against the balancer for DURATION seconds, GET_RATIO gets,
#      CONNECTIONS connections. loadgen has no rate limit: each connection sends its next
#      request when the last is answered (closed loop), so the load is what the machine
#      sustains, and the during-move figures show throughput lost as well as latency gained;
#   4. during: a fourth durable node D started with A as its only -s; cluster.stage_add(D)
#      and cluster.apply(2) through the balancer, the same loadgen run started just before
#      the apply and lasting MOVE_SECS: a fixed window from the apply (loadgen cannot be
#      stopped with its figures kept), meant to cover the move; by default KEYS / 10,000
#      seconds, at least DURATION, a guess with room to spare. Each run prints the share of
#      the window the move took, and says when the transition outlasted it.
#      cluster.status() on the balancer is polled every POLL_MS (with every node's stats())
#      until `transition` is false: the transition time is apply → that. Also recorded:
#      when D's `syncing` fell to 0 (D has every partition), and when the cluster settled
#      (every node's rehome_left 0 and 3 × KEYS keys over the four nodes: the old holders
#      handed over and dropped what they no longer replicate; the wait gives up after
#      SETTLE_TIMEOUT, or when nothing moved for STALL_SECS with no rehoming left to retry);
#   5. bytes moved: over the four nodes, sync_bytes_received (values D took from one holder
#      and the keys another holder had otherwise) + sync_listing_bytes (entry-hash listings
#      from the other holders) + rehome_bytes_sent (what the old holders sent to drop what
#      they no longer replicate: the entry-hash questions to the replicas and their answers,
#      then the keys a replica did not hold as they do, key and value bytes). The ideal is one copy of what D
#      holds: D's keys × the bytes of one entry as a transfer page carries it (postcard: the
#      key, then its sibling set: dot, vector clock, timestamp, value), computed exactly
#      from A's local.explain of EXPLAIN_SAMPLE random keys just before the apply. D's
#      sync_bytes_received / sync_keys_received is printed beside it (that also counts keys
#      fetched twice);
#   6. nothing lost: SAMPLE random keys read through the balancer each equal what loadgen
#      wrote (loadgen's value for a key is fixed: letters from one that depends on the key),
#      and each is held (local.get) by exactly 3 of the 4 nodes.
#
# After RUNS runs, a table of each run and the medians. Sizes in MB are 10^6 bytes. Every
# daemon is stopped on exit (Ctrl-C included). The binaries are copied into the work
# directory first, so a rebuild during the runs changes nothing. Daemons listen on
# 127.0.0.1, ports PORT_BASE..PORT_BASE+4 (checked free before each run).
#
#   examples/grow_bench.sh                  # 1M keys, RUNS=3: roughly 15 minutes (a guess
#                                           # from 50k-key runs), plus the build
#   KEYS=50000 BUILD=0 examples/grow_bench.sh   # about 3 minutes
#
# Settings (environment): KEYS VALUE_BYTES RUNS DURATION MOVE_SECS GET_RATIO
# CONNECTIONS PRELOAD_CONNECTIONS SAMPLE EXPLAIN_SAMPLE POLL_MS SETTLE_TIMEOUT (default 900)
# STALL_SECS (default 60: give up waiting for the settling when, after the transition, no
# node has rehoming left to retry and nothing changed for that long) PORT_BASE
# LOADGEN_THREADS CARGO_TARGET_DIR, BUILD=0 to use the binaries already built, KEEP=1 to keep
# the work directory (logs, per-run status traces and loadgen output) and say where it is.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
VALUE_BYTES=${VALUE_BYTES:-100}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
MOVE_SECS=${MOVE_SECS:-}
GET_RATIO=${GET_RATIO:-0.5}
CONNECTIONS=${CONNECTIONS:-32}
PRELOAD_CONNECTIONS=${PRELOAD_CONNECTIONS:-64}
SAMPLE=${SAMPLE:-20000}
EXPLAIN_SAMPLE=${EXPLAIN_SAMPLE:-1000}
POLL_MS=${POLL_MS:-100}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-900}
STALL_SECS=${STALL_SECS:-60}
PORT_BASE=${PORT_BASE:-23760}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-grow.XXXXXX")
mkdir "$work/bin"
for b in storage_node load_balancer examples/loadgen; do
    if ! cp "$target_dir/release/$b" "$work/bin/"; then
        rm -rf "$work"
        echo "grow_bench: $target_dir/release/$b is missing: build it (BUILD=1)" >&2
        exit 1
    fi
done

export KEYS VALUE_BYTES RUNS DURATION MOVE_SECS GET_RATIO CONNECTIONS PRELOAD_CONNECTIONS \
    SAMPLE EXPLAIN_SAMPLE POLL_MS SETTLE_TIMEOUT STALL_SECS PORT_BASE LOADGEN_THREADS KEEP
exec python3 - "$work" <<'PY'
"""Drives the runs; see the comment at the top of examples/grow_bench.sh."""
import base64, concurrent.futures, json, os, random, shutil, signal, socket, statistics
import subprocess, sys, threading, time, urllib.request, xmlrpc.client

WORK = sys.argv[1]
BIN = os.path.join(WORK, "bin")
E = os.environ
KEYS, VALUE_BYTES, RUNS = int(E["KEYS"]), int(E["VALUE_BYTES"]), int(E["RUNS"])
DURATION = float(E["DURATION"])
MOVE_SECS = float(E["MOVE_SECS"] or max(DURATION, KEYS / 10000))
GET_RATIO, CONNECTIONS = E["GET_RATIO"], int(E["CONNECTIONS"])
PRELOAD_CONNECTIONS, LOADGEN_THREADS = int(E["PRELOAD_CONNECTIONS"]), E["LOADGEN_THREADS"]
SAMPLE, EXPLAIN_SAMPLE = min(int(E["SAMPLE"]), KEYS), int(E["EXPLAIN_SAMPLE"])
POLL, SETTLE_TIMEOUT = int(E["POLL_MS"]) / 1000, float(E["SETTLE_TIMEOUT"])
STALL_SECS = float(E["STALL_SECS"])
BASE = int(E["PORT_BASE"])
OLD = [BASE, BASE + 1, BASE + 2]
NEW = BASE + 3
BALANCER = BASE + 4
NAMES = {OLD[0]: "A", OLD[1]: "B", OLD[2]: "C", NEW: "D"}
socket.setdefaulttimeout(30)
procs = {}


def say(*args):
    print(*args, flush=True)


def addr(port):
    return "127.0.0.1:%d" % port


def proxy(port):
    return xmlrpc.client.ServerProxy("http://" + addr(port), allow_none=True)


def stats(port):
    return proxy(port).stats()


def stop(name):
    proc = procs.pop(name, None)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all():
    """The load first, then the balancer, then the nodes."""
    for name in sorted(procs, key=lambda n: ["loadgen", "lb"].index(n) if n in ("loadgen", "lb") else 2):
        stop(name)


def check_ports_free():
    for port in OLD + [NEW, BALANCER]:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit("grow_bench: port %d is in use: set PORT_BASE" % port)
        finally:
            s.close()


def wait_up(port, proc, where):
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit("grow_bench: the daemon for port %d exited; see %s" % (port, where))
        try:
            urllib.request.urlopen("http://%s/health" % addr(port), timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("grow_bench: nothing answers on port %d" % port)


def start_node(run_dir, port, seeds):
    name = NAMES[port]
    log = open(os.path.join(run_dir, "node-%s.log" % name), "a")
    procs[name] = subprocess.Popen(
        [os.path.join(BIN, "storage_node"), "--bind", "127.0.0.1", "-p", str(port),
         "--data-dir", os.path.join(run_dir, "node-%s" % name), "--quiet", "-N", "3",
         *[a for s in seeds for a in ("-s", addr(s))]],
        stdout=log, stderr=log)
    return procs[name]


def loadgen(label, seconds, seed, out):
    """Starts loadgen's mixed run against the balancer; its stdout and stderr go to `out`."""
    procs["loadgen"] = subprocess.Popen(
        [os.path.join(BIN, "loadgen"), "--target", addr(BALANCER), "--get-ratio", GET_RATIO,
         "--connections", str(CONNECTIONS), "--keys", str(KEYS), "--value-bytes",
         str(VALUE_BYTES), "--duration-secs", str(seconds), "--threads", LOADGEN_THREADS,
         "--seed", str(seed), "--label", label, "--json"],
        stdout=open(out + ".out", "w"), stderr=open(out + ".err", "w"))
    return procs["loadgen"]


def loadgen_result(proc, out):
    proc.wait()
    lines = [l for l in open(out + ".out") if l.startswith("{")]
    if not lines:
        sys.exit("grow_bench: loadgen gave no result: %s" % open(out + ".err").read()[-2000:])
    result = json.loads(lines[-1])
    if result["errors"]:
        say("  !!! loadgen (%s) had %d errors: see %s.err" % (result["label"], result["errors"], out))
    return result


def varint_len(n):
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def entry_bytes(key, explained):
    """Bytes of (key, sibling set) as postcard encodes it in a transfer page."""
    total = varint_len(len(key)) + len(key) + varint_len(len(explained["versions"]))
    for v in explained["versions"]:
        actor, counter = v["dot"].split(":")
        past = base64.b64decode(v["context"]) if v["context"] else b"\x00"
        total += varint_len(int(actor, 16)) + varint_len(int(counter)) + len(past)
        total += varint_len(v["timestamp_us"])
        total += 1 if v["tombstone"] else 1 + varint_len(v["size"]) + v["size"]
    return total


def expected_value(index):
    start = index % 26
    return "".join(chr(ord("a") + (start + i) % 26) for i in range(VALUE_BYTES))


def verify(run_dir):
    """SAMPLE random keys: each reads back what loadgen wrote and is held by exactly 3 nodes."""
    rng = random.Random(12345)
    indexes = rng.sample(range(KEYS), SAMPLE)
    local = threading.local()

    def call(port, method, key):
        """A call, tried again after a fault (a quorum not met on a busy machine)."""
        last = None
        for attempt in range(5):
            try:
                return getattr(local.proxies[port], method)(key), None
            except xmlrpc.client.Fault as fault:
                last = fault
                time.sleep(0.1 * (attempt + 1))
        return None, last

    def check(index):
        if not hasattr(local, "proxies"):
            local.proxies = {p: proxy(p) for p in OLD + [NEW, BALANCER]}
        key = "key-%06d" % index
        value, fault = call(BALANCER, "get", key)
        holders = []
        for p in OLD + [NEW]:
            held, local_fault = call(p, "local.get", key)
            fault = fault or local_fault
            if held is not None:
                holders.append(p)
        return key, value == expected_value(index), value is None and not fault, holders, fault

    wrong = missing = faults = 0
    holders_count = {}
    bad = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for key, ok, nil, holders, fault in pool.map(check, indexes, chunksize=64):
            faults += fault is not None
            if fault is not None:
                bad.append((key, "fault %s" % fault.faultString, [NAMES[h] for h in holders]))
                continue
            wrong += not ok
            missing += nil
            holders_count[len(holders)] = holders_count.get(len(holders), 0) + 1
            if len(holders) != 3 or not ok:
                bad.append((key, ok, [NAMES[h] for h in holders]))
    with open(os.path.join(run_dir, "verify.txt"), "w") as f:
        for row in bad:
            f.write("%s value_ok=%s holders=%s\n" % row)
    return dict(sampled=SAMPLE, wrong=wrong, nil=missing, faults=faults,
                not_three=sum(n for h, n in holders_count.items() if h != 3),
                holders=holders_count)


def one_run(run):
    run_dir = os.path.join(WORK, "run-%d" % run)
    os.makedirs(run_dir)
    check_ports_free()
    say("run %d:" % run)

    # 1. Three nodes that know each other, a balancer over them.
    for port in OLD:
        start_node(run_dir, port, [p for p in OLD if p != port])
    for port in OLD:
        wait_up(port, procs[NAMES[port]], run_dir)
    log = open(os.path.join(run_dir, "balancer.log"), "a")
    procs["lb"] = subprocess.Popen(
        [os.path.join(BIN, "load_balancer"), "--bind", "127.0.0.1", "-p", str(BALANCER),
         "-N", "3", "-R", "2", "-W", "2", *[a for p in OLD for a in ("-s", addr(p))]],
        stdout=log, stderr=log)
    wait_up(BALANCER, procs["lb"], run_dir)

    # 2. Preload; every node holds every key.
    t = time.time()
    # A put that failed (a replica too slow on a busy machine) is made again by putting
    # every key again: the same value, so nothing else changes.
    for attempt in range(1, 4):
        err = os.path.join(run_dir, "preload-%d.err" % attempt)
        procs["loadgen"] = subprocess.Popen(
            [os.path.join(BIN, "loadgen"), "--target", addr(BALANCER), "--connections",
             str(PRELOAD_CONNECTIONS), "--keys", str(KEYS), "--value-bytes", str(VALUE_BYTES),
             "--threads", LOADGEN_THREADS, "--preload", "--requests", "0"],
            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
        if procs["loadgen"].wait() == 0:
            break
        errors = [l for l in open(err) if l.startswith("preload:")]
        say("  !!! the preload had errors (%s): putting every key again"
            % (errors[-1].strip() if errors else "see %s" % err))
    else:
        sys.exit("grow_bench: the preload failed 3 times: %s" % open(err).read()[-2000:])
    loaded = time.time() - t
    deadline = time.time() + SETTLE_TIMEOUT
    while True:
        s = [stats(p) for p in OLD]
        if all(x["keys"] == KEYS and x.get("keys_counted", 1) for x in s):
            break
        if time.time() > deadline:
            sys.exit("grow_bench: keys per node %s, not %d" % ([x["keys"] for x in s], KEYS))
        time.sleep(0.2)
    say("  preload: %d keys of %d bytes in %.1f s; every node holds all of them %.1f s later"
        % (KEYS, VALUE_BYTES, loaded, time.time() - t - loaded))

    # 3. Before.
    out = os.path.join(run_dir, "before")
    before = loadgen_result(loadgen("before", DURATION, run, out), out)

    # 4. D joins: stage, start the load, apply, watch.
    start_node(run_dir, NEW, [OLD[0]])
    wait_up(NEW, procs["D"], run_dir)
    deadline = time.time() + 60
    while stats(NEW)["layout_version"] < 1:
        if time.time() > deadline:
            sys.exit("grow_bench: D did not learn the layout from A within 60 s")
        time.sleep(0.1)
    balancer = proxy(BALANCER)
    balancer.cluster.stage_add(addr(NEW))
    # One entry's bytes, from keys as they stand at the apply (A holds every key then).
    rng = random.Random(run)
    node_a = proxy(OLD[0])
    explained = [entry_bytes(key, node_a.local.explain(key)) for key in
                 ("key-%06d" % i for i in rng.sample(range(KEYS), min(EXPLAIN_SAMPLE, KEYS)))]
    per_entry = statistics.mean(explained)
    out = os.path.join(run_dir, "during")
    load = loadgen("during", MOVE_SECS, run + 1000, out)
    time.sleep(0.2)  # its connections open
    t0 = time.monotonic()
    applied = balancer.cluster.apply(2)
    apply_s = time.monotonic() - t0
    trace = open(os.path.join(run_dir, "trace.txt"), "w")
    trace.write("# seconds since apply, transition, read_version, D syncing, keys A B C D, "
                "rehome_left A B C\n")
    transition_s = synced_s = settled_s = None
    seen_syncing = False
    unsettled = None  # why the wait for the settling ended without it
    last_change, last_seen = 0.0, None
    while True:
        now = time.monotonic() - t0
        status = balancer.cluster.status()
        s = {p: stats(p) for p in OLD + [NEW]}
        d = s[NEW]
        trace.write("%.2f %d %d %d %s %s\n" % (
            now, status["transition"], status["read_version"], d["syncing"],
            " ".join(str(s[p]["keys"]) for p in OLD + [NEW]),
            " ".join(str(s[p]["rehome_left"]) for p in OLD)))
        if d["layout_version"] >= 2 and d["syncing"] > 0:
            seen_syncing = True
        if synced_s is None and seen_syncing and d["syncing"] == 0:
            synced_s = now
        if transition_s is None and status["version"] >= 2 and not status["transition"]:
            transition_s = now
            if synced_s is None:
                synced_s = now
        if transition_s is not None and all(x["rehome_left"] == 0 for x in s.values()) \
                and sum(x["keys"] for x in s.values()) == 3 * KEYS:
            settled_s = now
            break
        # Stalled: the transition is over, no node has a rehoming pass to try again
        # (rehome_left 0 everywhere), yet more than 3 × KEYS keys, and nothing moved for
        # STALL_SECS: no pass will run until the layout changes again.
        seen = tuple((x["keys"], x["rehomed"]) for x in s.values())
        if seen != last_seen:
            last_change, last_seen = now, seen
        if transition_s is not None and all(x["rehome_left"] == 0 for x in s.values()) \
                and now - last_change > STALL_SECS:
            unsettled = ("rehoming stalled: for %.0f s every rehome_left 0, keys %s, %d over 3 x KEYS"
                         % (now - last_change, " ".join("%s %d" % (NAMES[p], s[p]["keys"]) for p in s),
                            sum(x["keys"] for x in s.values()) - 3 * KEYS))
            break
        if now > SETTLE_TIMEOUT:
            unsettled = "not settled within SETTLE_TIMEOUT=%g s" % SETTLE_TIMEOUT
            break
        time.sleep(max(0.0, POLL - (time.monotonic() - t0 - now)))
    trace.close()
    during = loadgen_result(load, out)
    final = {p: stats(p) for p in OLD + [NEW]}

    # 5. Bytes.
    sync_bytes = sum(x["sync_bytes_received"] for x in final.values())
    listing = sum(x["sync_listing_bytes"] for x in final.values())
    rehome = sum(x["rehome_bytes_sent"] for x in final.values())
    rehomed = sum(x["rehomed"] for x in final.values())
    moved = sync_bytes + listing + rehome
    d = final[NEW]

    ideal = d["keys"] * per_entry
    hash_queries = 0  # counted in rehome_bytes_sent now

    # 6. Nothing lost.
    t = time.time()
    check = verify(run_dir)
    stop_all()

    result = dict(
        run=run, keys=KEYS, apply=applied, apply_s=apply_s, transition_s=transition_s,
        synced_s=synced_s, settled_s=settled_s, unsettled=unsettled, move_secs=MOVE_SECS,
        keys_after={NAMES[p]: final[p]["keys"] for p in OLD + [NEW]},
        sync_bytes=sync_bytes, listing_bytes=listing, rehome_bytes=rehome, rehomed=rehomed,
        moved=moved, per_entry=per_entry, entries_explained=len(explained), ideal=ideal,
        d_sync_keys=d["sync_keys_received"], d_sync_bytes=d["sync_bytes_received"],
        hash_queries_est=hash_queries, check=check, before=before, during=during)
    open(os.path.join(WORK, "results.jsonl"), "a").write(json.dumps(result) + "\n")

    def lat(r):
        return "put p50/p99 %.2f/%.2f ms, get p50/p99 %.2f/%.2f ms, %.0f req/s, %d errors" % (
            r["put"]["p50_us"] / 1e3, r["put"]["p99_us"] / 1e3, r["get"]["p50_us"] / 1e3,
            r["get"]["p99_us"] / 1e3, r["throughput"], r["errors"])

    say("  before (%.0f s): %s" % (before["elapsed_s"], lat(before)))
    say("  apply: version %s, %s partition replicas move (the call took %.2f s)"
        % (applied["version"], applied["moved"], apply_s))
    fmt = lambda x: "%.1f s" % x if x is not None else "never"
    say("  D has every partition after %s; transition over after %s; settled after %s"
        % (fmt(synced_s), fmt(transition_s), fmt(settled_s)))
    if unsettled:
        say("  !!! %s (see %s)" % (unsettled, trace.name))
    move_end = settled_s or transition_s
    say("  during (%.0f s from the apply%s): %s" % (
        during["elapsed_s"], "; the move, to the %s, took %.0f%% of it" % (
            "settling" if settled_s else "transition's end",
            100 * min(move_end, during["elapsed_s"]) / during["elapsed_s"]) if move_end else "",
        lat(during)))
    if transition_s is None or transition_s > during["elapsed_s"]:
        say("  !!! the load window (MOVE_SECS=%g) ended before the transition: raise MOVE_SECS"
            % MOVE_SECS)
    say("  keys after: %s (%d keys rehomed)" % (
        " ".join("%s %d" % kv for kv in result["keys_after"].items()), rehomed))
    say("  bytes: sync values %.2f MB + listings %.2f MB + rehome %.2f MB = %.2f MB moved; "
        "ideal %d keys x %.1f B = %.2f MB; ratio %.2f"
        % (sync_bytes / 1e6, listing / 1e6, rehome / 1e6, moved / 1e6, d["keys"], per_entry,
           ideal / 1e6, moved / ideal))
    say("  D: %d keys received, %.1f B each on average (%d B)"
        % (d["sync_keys_received"], d["sync_bytes_received"] / max(d["sync_keys_received"], 1),
           d["sync_bytes_received"]))
    say("  check (%.0f s): %d keys sampled, %d read back wrong (%d nil, %d still faulting after "
        "5 tries), %d not on exactly 3 nodes%s"
        % (time.time() - t, check["sampled"], check["wrong"], check["nil"], check["faults"],
           check["not_three"], "" if not (check["not_three"] or check["wrong"] or check["faults"])
           else " !!! see verify.txt"))
    if E.get("KEEP", "0") == "0":
        for name in os.listdir(run_dir):
            if name.startswith("node-") and not name.endswith(".log"):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    return result


def table(results):
    nan = float("nan")

    def med(values):
        """The median of the values that exist (a run that never settled has no time)."""
        values = [v for v in values if v == v]
        return statistics.median(values) if values else nan

    p99 = lambda r, op: r[op]["p99_us"] / 1e3
    rows = []
    for r in results:
        b, d, c = r["before"], r["during"], r["check"]
        rows.append(("%d%s" % (r["run"], "*" if r["unsettled"] else ""),
                     r["synced_s"] or nan, r["transition_s"] or nan, r["settled_s"] or nan,
                     r["moved"] / 1e6, r["ideal"] / 1e6, r["moved"] / r["ideal"],
                     p99(b, "put"), p99(d, "put"), p99(b, "get"), p99(d, "get"),
                     b["throughput"], d["throughput"], d["errors"],
                     c["wrong"] + c["not_three"] + c["faults"]))
    cols = list(zip(*[row[1:] for row in rows]))
    rows.append(("median",) + tuple(med(c) for c in cols[:-2]) + (sum(cols[-2]), sum(cols[-1])))
    say()
    say("adding a 4th node to 3 holding %d keys of %d bytes (N=3 R=2 W=2), under a closed-loop "
        "load of %d connections, %s gets; %d run(s); %d cores, load average %s"
        % (KEYS, VALUE_BYTES, CONNECTIONS, GET_RATIO, len(results), os.cpu_count(),
           " ".join(open("/proc/loadavg").read().split()[:3])))
    head = ("run", "D synced s", "trans. s", "settled s", "moved MB", "ideal MB", "ratio",
            "put p99 bef", "put p99 dur", "get p99 bef", "get p99 dur", "req/s bef",
            "req/s dur", "errors dur", "bad keys")
    say("%-6s %10s %8s %9s %9s %9s %6s %11s %11s %11s %11s %10s %10s %10s %8s" % head)
    for row in rows:
        say("%-6s %10.1f %8.1f %9.1f %9.2f %9.2f %6.2f %11.2f %11.2f %11.2f %11.2f %10.0f %10.0f "
            "%10d %8d" % row)
    say("seconds from the apply; p99 in ms; 'during' is a %g s window from the apply; 'settled':"
        " the old holders have dropped what they no longer replicate; MB = 10^6 bytes; 'bad "
        "keys': sampled keys read back wrong, not on exactly 3 nodes, or still faulting after 5 "
        "tries; medians over the runs that have the figure; errors and bad keys are totals"
        % MOVE_SECS)
    if any(r["unsettled"] for r in results):
        say("* did not settle: its moved bytes lack what the stalled nodes would have sent")
    short = [r["run"] for r in results
             if r["transition_s"] is None or r["transition_s"] > r["during"]["elapsed_s"]]
    if short:
        say("!!! runs %s: the transition outlasted the load window; raise MOVE_SECS"
            % " ".join(map(str, short)))


def on_signal(*_):
    sys.exit(130)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGHUP, on_signal)
say("grow_bench: %d keys of %d bytes, %d run(s), load %d connections %s gets, before %g s, "
    "during %g s from the apply; %d cores, load average %s"
    % (KEYS, VALUE_BYTES, RUNS, CONNECTIONS, GET_RATIO, DURATION, MOVE_SECS, os.cpu_count(),
       " ".join(open("/proc/loadavg").read().split()[:3])))
results = []
try:
    for run in range(1, RUNS + 1):
        results.append(one_run(run))
        stop_all()
    table(results)
finally:
    stop_all()
    if E.get("KEEP", "0") != "0":
        say("grow_bench: work directory kept: %s" % WORK)
    else:
        shutil.rmtree(WORK, ignore_errors=True)
PY
