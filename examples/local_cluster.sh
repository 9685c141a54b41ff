#!/usr/bin/env bash
# Starts a local Dynamite cluster: three storage nodes (ports 20050-20052) and a load
# balancer on port 30000, as in the original Dynamite session. Ctrl-C stops all four.
#
#   examples/local_cluster.sh            # data in ./dynamite-data
#   examples/local_cluster.sh --in-memory
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
bin=${CARGO_TARGET_DIR:-target}/release
storage_args=("$@")
pids=()
stop() {
    trap - INT TERM EXIT
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

ports=(20050 20051 20052)
for port in "${ports[@]}"; do
    # Each node learns its peers (-s), so it can hand off hints and run anti-entropy.
    peers=()
    for other in "${ports[@]}"; do
        [ "$other" = "$port" ] || peers+=(-s "127.0.0.1:$other")
    done
    "$bin/storage_node" -p "$port" --bind 127.0.0.1 "${peers[@]}" "${storage_args[@]}" &
    pids+=($!)
done
"$bin/load_balancer" -s 127.0.0.1:20050 -s 127.0.0.1:20051 -s 127.0.0.1:20052 -p 30000 --bind 127.0.0.1 &
pids+=($!)

for _ in $(seq 1 100); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30000/health', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done

cat <<'MSG'

Dynamite is up: storage nodes on 20050-20052, load balancer on 30000.
Talk to it from Python:

    python3 -c "import xmlrpc.client as x; p = x.ServerProxy('http://localhost:30000'); print(p.put('john', 'novatnack'), p.get('john'))"

Press Ctrl-C to stop the cluster.
MSG
wait
