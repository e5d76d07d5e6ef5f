#!/usr/bin/env bash
# sampo against llama.cpp, side by side in one run on this machine:
#   scripts/bench-vs-llamacpp.sh [MODEL] [ROUNDS]
# Builds (or finds) llama.cpp's llama-bench with ../shared/tools/llamacpp.sh, then runs
# both alternately, ROUNDS (3) times each at 1 and 2 threads: prefill of a 128-token
# prompt and decode of 128 tokens. Prints a markdown table of medians and ratios
# (sampo / llama.cpp) with the machine and date. Uses the workspace's dev-profile
# `sampo` (kernels at opt-level 3), the binary the tests use; with SAMPO_BENCH=example,
# the kernels crate's release `bench_model` example instead (the same measurement,
# built without the node crate: `cargo build -p sampo-kernels -j 1` only).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
rounds=${2:-3}
target=${CARGO_TARGET_DIR:-$HOME/.cache/sampo-target}
tool=$root/../shared/tools/llamacpp.sh
[ -x "$tool" ] || tool=/work/shared/tools/llamacpp.sh
bin=$("$tool")
if [ "${SAMPO_BENCH:-}" = example ]; then
  (cd "$root" && CARGO_TARGET_DIR=$target cargo build -q --release -p sampo-kernels --example bench_model -j 1)
  example=$target/release/examples/bench_model
  run_sampo() { "$example" "$model" "$1" 1 128 128; }
else
  (cd "$root" && CARGO_TARGET_DIR=$target cargo build -q -p sampo-node --bin sampo)
  sampo=$target/debug/sampo
  run_sampo() {
    "$sampo" bench --model "$model" --threads "$1" --prompt-tokens 128 --gen-tokens 128 --reps 1 --json
  }
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  for t in 1 2; do
    "$bin/llama-bench" -m "$model" -t "$t" -p 128 -n 128 -r 1 -o json 2>/dev/null >"$out/llama-$t-$r.json"
    run_sampo "$t" 2>/dev/null >"$out/sampo-$t-$r.json"
  done
done
python3 - "$out" "$rounds" "$model" <<'PY'
import json, sys, os, statistics, platform, datetime, subprocess
out, rounds, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def llama(t, r):
    rows = json.load(open(f"{out}/llama-{t}-{r}.json"))
    pp = next(x["avg_ts"] for x in rows if x["n_prompt"] > 0)
    tg = next(x["avg_ts"] for x in rows if x["n_gen"] > 0)
    return pp, tg
def sampo(t, r):
    v = json.loads(open(f"{out}/sampo-{t}-{r}.json").read().strip().splitlines()[-1])
    return v["prefill_tokens_per_s"], v["decode_tokens_per_s"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"model: {os.path.basename(model)}; machine: {cpu}, {os.cpu_count()} vCPUs; date: {datetime.date.today()}; "
      f"{rounds} alternating rounds, medians")
print()
print(f"llama.cpp: llama-bench -m MODEL -t T -p 128 -n 128 -r 1 -o json; sampo: "
      f"{os.environ.get('SAMPO_BENCH') == 'example' and 'bench_model MODEL T 1 128 128' or 'sampo bench --reps 1'}")
print()
print("| | threads | llama.cpp tok/s | sampo tok/s | ratio |")
print("| --- | ---: | ---: | ---: | ---: |")
for i, what in enumerate(["prefill (128)", "decode (128)"]):
    for t in (1, 2):
        l = statistics.median(llama(t, r)[i] for r in range(1, rounds + 1))
        s = statistics.median(sampo(t, r)[i] for r in range(1, rounds + 1))
        print(f"| {what} | {t} | {l:.1f} | {s:.1f} | **{s / l:.2f}×** |")
PY
