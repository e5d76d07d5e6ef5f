#!/usr/bin/env bash
# Install what the build needs beyond the Rust toolchain, once: libclang (RocksDB's
# bindings) and the real model file. Safe to run repeatedly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
  echo "setup: installing libclang-dev (RocksDB bindings)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libclang-dev >/dev/null
fi
"$root/scripts/fetch-model.sh" >/dev/null
