#!/usr/bin/env bash
# What anti-entropy costs the storage nodes in CPU on a large data set: a round when the
# replicas are in sync, and the rounds that repair DIFFER keys that differ among KEYS.
#
# Starts three durable storage nodes A, B, C, each with the other two as -s peers (-N 3), and a
# balancer over them (N=3, W=3, so every node holds every key once the preload ends); puts KEYS
# keys (default 1,000,000) of VALUE_BYTES through it (examples/loadgen.rs --preload). Then:
#
#   1. baseline: the nodes started again with rounds pushed out (--aae-interval-ms 600000):
#      their CPU time over WINDOW seconds, idle. What a node spends on everything else (its
#      timers, the engine's background checks).
#   2. in sync: the nodes started again with rounds every AAE_INTERVAL_MS (default 1000, so
#      a window holds many rounds; a round costs the same at any interval): once a round of
#      every node found its trees equal, their CPU time over WINDOW seconds, the exchanges
#      they started, the keys they read from storage. CPU per exchange = (CPU - baseline) /
#      exchanges; a round is one exchange with each of the two peers.
#   3. DIFFER keys differ: DIFFER new keys put into A alone (its own copy, by the node's
#      `put`), then the nodes' CPU time, exchanges, keys read and keys moved until B and C
#      hold them and a round of every node is in sync again; the same less the baseline.
#
# CPU time is user + system from /proc/PID/stat (clock ticks of 10 ms), summed over the
# three nodes. Everything it starts is stopped on exit. Daemons listen on 127.0.0.1, ports
# PORT_BASE..PORT_BASE+3. About 4 minutes for a million keys, plus the build.
#
#   examples/aae_cost.sh
#   KEYS=100000 WINDOW=20 examples/aae_cost.sh
#
# Settings (environment): KEYS DIFFER VALUE_BYTES CONNECTIONS AAE_INTERVAL_MS WINDOW PORT_BASE
# CARGO_TARGET_DIR, BUILD=0 to use the binaries already built, KEEP=1 to keep the work
# directory (logs) and say where it is.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
DIFFER=${DIFFER:-1000}
VALUE_BYTES=${VALUE_BYTES:-100}
CONNECTIONS=${CONNECTIONS:-64}
AAE_INTERVAL_MS=${AAE_INTERVAL_MS:-1000}
WINDOW=${WINDOW:-60}
PORT_BASE=${PORT_BASE:-23740}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
target_dir=${CARGO_TARGET_DIR:-target}

if [[ $BUILD != 0 ]]; then
    cargo build --release --bins --examples
fi
bin=$target_dir/release

work=$(mktemp -d "${TMPDIR:-/tmp}/dynamite-aae-cost.XXXXXX")
export KEYS DIFFER VALUE_BYTES CONNECTIONS AAE_INTERVAL_MS WINDOW PORT_BASE KEEP
exec python3 - "$bin" "$work" <<'PY'
"""Drives the cluster; see the comment at the top of examples/aae_cost.sh."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request, xmlrpc.client

BIN, WORK = sys.argv[1], sys.argv[2]
KEYS, DIFFER = int(os.environ["KEYS"]), int(os.environ["DIFFER"])
VALUE_BYTES, CONNECTIONS = int(os.environ["VALUE_BYTES"]), int(os.environ["CONNECTIONS"])
INTERVAL_MS, WINDOW = int(os.environ["AAE_INTERVAL_MS"]), float(os.environ["WINDOW"])
BASE = int(os.environ["PORT_BASE"])
PORTS = [BASE, BASE + 1, BASE + 2]
BALANCER = BASE + 3
TICK = os.sysconf("SC_CLK_TCK")
socket.setdefaulttimeout(30)
procs = {}


def stop(name):
    proc = procs.pop(name, None)
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all(*_):
    for name in list(procs):
        stop(name)
    if os.environ.get("KEEP", "0") != "0":
        print("aae_cost: work directory kept: %s" % WORK)
    else:
        shutil.rmtree(WORK, ignore_errors=True)


def wait_up(port, proc):
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit("aae_cost: the daemon for port %d exited; see %s" % (port, WORK))
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("aae_cost: nothing answers on port %d" % port)


def start_nodes(interval_ms):
    for i, port in enumerate(PORTS):
        peers = [a for p in PORTS if p != port for a in ("-s", "127.0.0.1:%d" % p)]
        log = open(os.path.join(WORK, "node-%d.log" % i), "a")
        procs[i] = subprocess.Popen(
            [os.path.join(BIN, "storage_node"), "--bind", "127.0.0.1", "-p", str(port),
             "--data-dir", os.path.join(WORK, "node-%d" % i), "--quiet", "-N", "3",
             "--aae-interval-ms", str(interval_ms), *peers],
            stdout=log, stderr=log)
    for i, port in enumerate(PORTS):
        wait_up(port, procs[i])
    # A node counts its keys in the background after a start: wait for that.
    deadline = time.time() + 300
    while not all(stats(port).get("keys_counted", 1) for port in PORTS):
        if time.time() > deadline:
            sys.exit("aae_cost: the nodes did not count their keys within 300 s")
        time.sleep(0.2)


def stop_nodes():
    for i in range(3):
        stop(i)


def stats(port):
    return xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % port).stats()


def cpu_ticks():
    total = 0
    for i in range(3):
        fields = open("/proc/%d/stat" % procs[i].pid).read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def counters():
    out = {}
    for port in PORTS:
        s = stats(port)
        for name in ("rounds", "in_sync", "keys_pushed", "keys_pulled", "keys_scanned"):
            out[name] = out.get(name, 0) + s["anti_entropy"][name]
        out["keys_min"] = min(out.get("keys_min", s["keys"]), s["keys"])
    return out


def wait_in_sync(timeout):
    """Until each node started one more exchange per peer after a point, all in sync."""
    deadline = time.time() + timeout
    start = [stats(p)["anti_entropy"] for p in PORTS]
    while time.time() < deadline:
        now = [stats(p)["anti_entropy"] for p in PORTS]
        if all(n["in_sync"] - s["in_sync"] >= 2 and n["rounds"] - n["in_sync"] == s["rounds"] - s["in_sync"]
               for s, n in zip(start, now)):
            return
        if any(n["rounds"] - n["in_sync"] != s["rounds"] - s["in_sync"] for s, n in zip(start, now)):
            start = now  # an exchange repaired or failed: wait for a clean pair of rounds
        time.sleep(0.2)
    sys.exit("aae_cost: the nodes did not get in sync within %d s" % timeout)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
try:
    # Load.
    start_nodes(600000)
    log = open(os.path.join(WORK, "balancer.log"), "a")
    procs["lb"] = subprocess.Popen(
        [os.path.join(BIN, "load_balancer"), "--bind", "127.0.0.1", "-p", str(BALANCER),
         "-N", "3", "-R", "2", "-W", "3",
         *[a for p in PORTS for a in ("-s", "127.0.0.1:%d" % p)]], stdout=log, stderr=log)
    wait_up(BALANCER, procs["lb"])
    loaded = time.time()
    preload = subprocess.run(
        [os.path.join(BIN, "examples", "loadgen"), "--target", "127.0.0.1:%d" % BALANCER,
         "--connections", str(CONNECTIONS), "--keys", str(KEYS), "--value-bytes",
         str(VALUE_BYTES), "--preload", "--requests", "0"], capture_output=True, text=True)
    if preload.returncode != 0:
        sys.exit("aae_cost: preload failed: %s" % preload.stderr[-2000:])
    stop("lb")
    if min(stats(p)["keys"] for p in PORTS) != KEYS:
        sys.exit("aae_cost: a node is missing keys after the preload (W=3)")
    print("aae_cost: %d keys of %d bytes on each of three nodes (%.0f s to load)"
          % (KEYS, VALUE_BYTES, time.time() - loaded))

    # 1. Baseline: rounds pushed out.
    stop_nodes()
    start_nodes(600000)
    time.sleep(2)
    before = cpu_ticks()
    time.sleep(WINDOW)
    baseline = (cpu_ticks() - before) / TICK / WINDOW  # CPU seconds per second, three nodes
    print("1. no rounds (--aae-interval-ms 600000): the three nodes used %.1f ms of CPU per "
          "second, idle" % (baseline * 1e3))

    # 2. In sync.
    stop_nodes()
    start_nodes(INTERVAL_MS)
    wait_in_sync(120)
    c0, t0, w0 = counters(), cpu_ticks(), time.time()
    time.sleep(WINDOW)
    c1, t1, w1 = counters(), cpu_ticks(), time.time()
    exchanges = c1["rounds"] - c0["rounds"]
    in_sync = c1["in_sync"] - c0["in_sync"]
    cpu = (t1 - t0) / TICK
    extra = cpu - baseline * (w1 - w0)
    print("2. in sync, a round every %d ms: %.1f ms of CPU per second; %d exchanges (%d in "
          "sync), %d keys read from storage; CPU per exchange above the baseline: %.2f ms "
          "(a round of a node, two exchanges: %.2f ms)"
          % (INTERVAL_MS, cpu / (w1 - w0) * 1e3, exchanges, in_sync,
             c1["keys_scanned"] - c0["keys_scanned"], extra / max(exchanges, 1) * 1e3,
             2 * extra / max(exchanges, 1) * 1e3))

    # 3. DIFFER keys differ: new keys written to A alone.
    a = xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % PORTS[0])
    letters = "".join(chr(ord("a") + i % 26) for i in range(VALUE_BYTES + 26))
    c0, t0, w0 = counters(), cpu_ticks(), time.time()
    for i in range(DIFFER):
        if getattr(a, "local.put")("differ-%06d" % i, letters[i % 26:i % 26 + VALUE_BYTES]) != "200":
            sys.exit("aae_cost: a put to A failed")
    written = time.time()
    deadline = time.time() + 300
    while counters()["keys_min"] < KEYS + DIFFER:
        if time.time() > deadline:
            sys.exit("aae_cost: B and C did not get the keys within 300 s")
        time.sleep(0.1)
    whole = time.time()
    wait_in_sync(120)
    c1, t1, w1 = counters(), cpu_ticks(), time.time()
    cpu = (t1 - t0) / TICK
    extra = cpu - baseline * (w1 - w0)
    print("3. %d of %d keys differ (written to A alone): B and C whole %.1f s after the "
          "writes; until a round in sync again (%.1f s): %d exchanges, %d keys moved, %d keys "
          "read from storage, %.0f ms of CPU, %.0f ms above the baseline (the %d puts to A "
          "included)"
          % (DIFFER, KEYS + DIFFER, whole - written, w1 - w0, c1["rounds"] - c0["rounds"],
             (c1["keys_pushed"] - c0["keys_pushed"]) + (c1["keys_pulled"] - c0["keys_pulled"]),
             c1["keys_scanned"] - c0["keys_scanned"], cpu * 1e3, extra * 1e3, DIFFER))
finally:
    stop_all()
PY
