#!/usr/bin/env bash
# Install what the build and the tests need beyond the Rust toolchain, once: libclang
# (RocksDB's bindings), curl and Prometheus' promtool (API and metrics tests), the
# `openai` Python package (the real-client test) and the real model file. Safe to run
# repeatedly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c "import openai" 2>/dev/null || {
  echo "setup: installing the openai Python package" >&2
  python3 -m pip install -q openai
}
# NVRTC 13.0 for the CUDA kernels' compile check (no GPU or toolkit needed).
python3 -c "import nvidia, os, sys; sys.exit(0 if any(os.path.exists(os.path.join(p, 'cu13/lib/libnvrtc.so.13')) for p in nvidia.__path__) else 1)" 2>/dev/null || {
  echo "setup: installing nvidia-cuda-nvrtc==13.0.88 (NVRTC for the kernel compile check)" >&2
  python3 -m pip install -q nvidia-cuda-nvrtc==13.0.88
}
"$root/scripts/fetch-model.sh" smollm2 >/dev/null
"$root/scripts/fetch-model.sh" gemma3 >/dev/null
