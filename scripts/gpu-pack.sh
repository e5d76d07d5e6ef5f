#!/usr/bin/env bash
# Packs a GPU run for the `device` tool's machines (CUDA 13 driver, NVRTC and
# compute-sanitizer; no Rust toolchain, no network; at most 64 MiB carried a call).
# Builds here, then splits what travels into two carries:
#   .gpu/1  the model's first part and llama.cpp's sources; call 1 runs .gpu/1/start.sh:
#           copies them to /tmp/sampo-gpu and starts llama.cpp's CUDA build (setsid)
#   .gpu/2  the rest of the model, `sampo` (release), the CUDA test binary and run.sh;
#           call 2 (back to back, the machine still warm) runs .gpu/2/run.sh
# As run on 2026-11-30 (docs/BENCHMARKS.md, "CUDA backend"): about 40 s + 5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
./scripts/fetch-model.sh >/dev/null
cargo build --release -p sampo-node --bin sampo
test_bin=$(cargo test -p sampo-kernels --test cuda_gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cuda_gpu" and m.get("executable"): print(m["executable"])' | tail -1)
rm -rf .gpu && mkdir -p .gpu/1 .gpu/2 .gpu/bins
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 48000000 "$model" > .gpu/1/model.part.00
tail -c +48000001 "$model" > .gpu/2/model.part.01
sha256sum "$model" | cut -d' ' -f1 > .gpu/2/model.sha256
strip -o .gpu/bins/sampo "$CARGO_TARGET_DIR/release/sampo"
strip -o .gpu/bins/cuda_gpu "$test_bin"
tar cJf .gpu/2/bins.tar.xz -C .gpu/bins sampo cuda_gpu && rm -rf .gpu/bins
cp kernels/tests/data/smollm2-llamacpp.json .gpu/2/
# llama.cpp's sources from the shared tool's sdist, without models, docs or the web UI.
llama=$(ls -d "$HOME"/.cache/sampo-llamacpp/*/src/vendor/llama.cpp 2>/dev/null | tail -1 || true)
if [[ -n $llama ]]; then
  tar cJf .gpu/1/llamacpp-src.tar.xz -C "$(dirname "$llama")" --exclude=llama.cpp/models --exclude=llama.cpp/build \
    --exclude=llama.cpp/media --exclude=llama.cpp/docs --exclude=llama.cpp/tools/ui --exclude=llama.cpp/gguf-py \
    --exclude='*.gguf' llama.cpp
fi
cat > .gpu/1/start.sh <<'RUN'
#!/usr/bin/env bash
set -uo pipefail
G=/tmp/sampo-gpu; mkdir -p $G/models; cp .gpu/1/model.part.00 $G/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f .gpu/1/llamacpp-src.tar.xz ] || exit 0
tar xJf .gpu/1/llamacpp-src.tar.xz -C $G && cd $G/llama.cpp
setsid nohup bash -c "cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > $G/llama-build.log 2>&1 \
  && nice -n 5 cmake --build build --target llama-bench -j14 >> $G/llama-build.log 2>&1; echo BUILD-DONE \$? >> $G/llama-build.log" \
  >/dev/null 2>&1 </dev/null &
RUN
cat > .gpu/2/run.sh <<'RUN'
#!/usr/bin/env bash
set -uo pipefail
G=/tmp/sampo-gpu; M=$G/models/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p $G/kernels/tests/data
cat $G/model.part.00 .gpu/2/model.part.01 > $M
echo "$(cat .gpu/2/model.sha256)  $M" | sha256sum -c - || exit 1
cp .gpu/2/smollm2-llamacpp.json $G/kernels/tests/data/
tar xJf .gpu/2/bins.tar.xz -C $G; cd $G
export SAMPO_REQUIRE_CUDA=1 SAMPO_MODEL_DIR=$G/models SAMPO_REPO_ROOT=$G
timeout 200 ./cuda_gpu --test-threads=1 --nocapture --skip gemma3 > $OUT/cuda_gpu.log 2>&1; echo "cuda_gpu rc $?"
grep -E "^test |result|panicked" $OUT/cuda_gpu.log | cut -c1-300
P=$(python3 -c 'print("The printing press changed how books were made. " * 60)')
for tool in memcheck racecheck synccheck; do
  echo "== $tool"; timeout 120 compute-sanitizer --tool $tool --print-limit 5 ./sampo model run --backend cuda $M \
    --prompt "$P" --max-tokens 4 --temperature 0.7 --top-k 40 2>&1 | tail -3
done 2>&1 | tee $OUT/sanitizer.log
for i in $(seq 60); do grep -qs BUILD-DONE $G/llama-build.log && break; sleep 5; done
LB=$G/llama.cpp/build/bin/llama-bench
for round in 1 2; do
  for p in 128 512 2048; do for s in 1 8; do timeout 60 ./sampo bench --backend cuda --model $M --prompt-tokens $p --streams $s --reps 3 --json; done; done
  [ -x $LB ] && timeout 90 $LB -m $M -ngl 99 -p 128,512,2048 -n 128 -r 3 -o json
  [ -x $LB ] && timeout 60 $LB -m $M -ngl 99 -p 0 -n 128 -d 512,2048 -r 3 -o json
done 2>&1 | tee $OUT/bench.txt | grep -E '^\{"backend|"avg_ts"'
RUN
chmod +x .gpu/1/start.sh .gpu/2/run.sh
du -sh .gpu/*
