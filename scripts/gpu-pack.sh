#!/usr/bin/env bash
# Packs what a GPU run of issue 8 needs for the `device` tool's machines, which have
# CUDA 13 (driver, NVRTC, compute-sanitizer) but no Rust toolchain, no network, and take
# at most 64 MiB of carried files per call. Builds here, then splits into three carries:
#   .gpu/1  first part of the model            (call 1: copy to /tmp/sampo-gpu)
#   .gpu/2  second part of the model           (call 2: copy to /tmp/sampo-gpu)
#   .gpu/3  stripped `sampo` and the CUDA test binary, and gpu-run.sh (call 3: run)
# Back-to-back calls keep the machine (and /tmp) warm; see docs/BENCHMARKS.md, "CUDA".
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
./scripts/fetch-model.sh >/dev/null
cargo build -p sampo-node --bin sampo
test_bin=$(cargo test -p sampo-kernels --test cuda_gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cuda_gpu" and m.get("executable"): print(m["executable"])' | tail -1)
rm -rf .gpu && mkdir -p .gpu/1 .gpu/2 .gpu/3
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
split -b 60M -d "$model" .gpu/model.part.
mv .gpu/model.part.00 .gpu/1/ && mv .gpu/model.part.01 .gpu/2/
strip -o .gpu/3/sampo "$CARGO_TARGET_DIR/debug/sampo"
strip -o .gpu/3/cuda_gpu "$test_bin"
cp kernels/tests/data/smollm2-llamacpp.json .gpu/3/
sha256sum "$model" | cut -d' ' -f1 > .gpu/3/model.sha256
cat > .gpu/3/gpu-run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, after calls 1 and 2 copied the model parts to /tmp/sampo-gpu.
set -uo pipefail
G=/tmp/sampo-gpu; mkdir -p $G/models $G/kernels/tests/data
cat $G/model.part.00 $G/model.part.01 > $G/models/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat model.sha256)  $G/models/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
cp smollm2-llamacpp.json $G/kernels/tests/data/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
export SAMPO_REQUIRE_CUDA=1 SAMPO_MODEL_DIR=$G/models
SAMPO_REPO_ROOT=$G ./cuda_gpu --test-threads=1 --nocapture 2>&1 | tee $OUT/cuda_gpu.log
compute-sanitizer --tool memcheck ./sampo model run --backend cuda $G/models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --prompt "The capital of France is" --max-tokens 8 2>&1 | tail -20 | tee $OUT/sanitizer.log
for s in 1 8; do ./sampo bench --backend cuda --model $G/models/SmolLM2-135M-Instruct.Q4_1.gguf --streams $s --reps 5 --json; done | tee $OUT/bench.json
./sampo bench --backend cpu --threads 16 --model $G/models/SmolLM2-135M-Instruct.Q4_1.gguf --reps 3 --json | tee -a $OUT/bench.json
RUN
chmod +x .gpu/3/gpu-run.sh
du -sh .gpu/*
