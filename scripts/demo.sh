#!/usr/bin/env bash
# The main job: build sampo, start a 5-node local testnet on the real model and ask it
# a question that a committee of three answers and verifies.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}
cargo build -p sampo-node --bin sampo
exec "$CARGO_TARGET_DIR/debug/sampo" testnet --nodes 5 --demo --prompt "${1:-What is the capital of France?}"
