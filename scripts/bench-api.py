"""API overhead and time to first token against the bare runtime.

Usage: python3 scripts/bench-api.py SAMPO_BIN MODEL. Starts one node (k = 1) serving
MODEL, warms it up, then times 10 non-streaming and 10 streaming chat completions with
the official openai client, and the same generation with `sampo model run --json`."""
import json, statistics, subprocess, sys, time

from openai import OpenAI

from localnode import local_node

sampo, model = sys.argv[1], sys.argv[2]
prompt = "What is the capital of France?"
max_tokens = 32

out = subprocess.run([sampo, "model", "run", model, "--chat", "--prompt", prompt, "--max-tokens", str(max_tokens),
                      "--temperature", "0", "--json", "--repeat", "10"], capture_output=True, check=True)
t = json.loads(out.stdout)["timings"]
# The fastest of 10 warm in-process runs.
bare = [(t["prefill_ms"], t["prefill_ms"] + t["decode_ms"])]

with local_node(sampo, model) as url:
    client = OpenAI(base_url=url + "/v1", api_key="x")
    name = client.models.list().data[0].id
    msgs = [{"role": "user", "content": prompt}]
    for _ in range(2):
        client.chat.completions.create(model=name, messages=msgs, max_tokens=max_tokens, temperature=0)
    full, ttft = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        client.chat.completions.create(model=name, messages=msgs, max_tokens=max_tokens, temperature=0)
        full.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(model=name, messages=msgs, max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = (time.perf_counter() - t0) * 1000
        ttft.append(first)

med = statistics.median
print(f"bare runtime (sampo model run --repeat 10, fastest): prefill {med([b[0] for b in bare]):.1f} ms, whole generation {med([b[1] for b in bare]):.1f} ms")
print(f"API, non-streaming (k = 1, verdict included): median {med(full):.1f} ms -> overhead {med(full) - med([b[1] for b in bare]):.1f} ms")
print(f"API, streaming time to first token: median {med(ttft):.1f} ms -> overhead {med(ttft) - med([b[0] for b in bare]):.1f} ms")
