#!/usr/bin/env bash
# Runs the deterministic simulation (tests/simulation, docs/simulation.md) over random seeds,
# in a release build, and prints one line per seed and the full report of every failing one.
#
#   examples/simulate.sh            # 20 random seeds
#   examples/simulate.sh 500        # 500 random seeds
#   examples/simulate.sh 60m        # random seeds for 60 minutes
#   FIRST=12345 examples/simulate.sh 100   # 100 seeds drawn from a given start (repeatable)
#
# A failing seed is replayed, with its history, by
#   DYNAMITE_SEED=<seed> cargo test --test simulation -- one_seed --nocapture
# and once its bug is fixed it joins SEEDS in tests/simulation/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

arg="${1:-20}"
if [[ "$arg" =~ ^([0-9]+)m$ ]]; then
    export DYNAMITE_SIM_MINUTES="${BASH_REMATCH[1]}"
elif [[ "$arg" =~ ^[0-9]+$ ]]; then
    export DYNAMITE_SIM_SEEDS="$arg"
else
    echo "usage: $0 [SEEDS | MINUTESm]" >&2
    exit 2
fi
if [[ -n "${FIRST:-}" ]]; then
    export DYNAMITE_SIM_FIRST="$FIRST"
fi
exec cargo test --release --test simulation -- --ignored random_seeds --nocapture
