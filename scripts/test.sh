#!/usr/bin/env bash
# The test command: formatting, lints, and the whole test suite (real model included).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
# A target dir outside the clone, so repeated runs on one machine reuse the build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}
export SAMPO_MODEL_DIR=${SAMPO_MODEL_DIR:-$root/models}
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
