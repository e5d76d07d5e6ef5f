#!/usr/bin/env bash
# The main job: build sampo and run it on the real model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}
cargo build -p sampo-node --bin sampo
exec "$CARGO_TARGET_DIR/debug/sampo" model run models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --chat --prompt "${1:-What is the capital of France?}" --max-tokens 64
