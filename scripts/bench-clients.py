"""Aggregate tokens/s of N concurrent OpenAI clients on one node, beside the bare
runtime's batched decode (`sampo bench --streams N`).

Usage: python3 scripts/bench-clients.py SAMPO_BIN MODEL [--clients 1,8] [--rounds 3]
       [--requests 3] [--max-tokens 64] [--threads 0] [--stream]

Starts one node (k = 1, execution.max_concurrent = the largest N) serving MODEL and
warms it up. Each round then runs, for every N in turn (alternating, so that a noisy
machine hurts every N alike): N client threads, each sending --requests chat
completions back to back with the official `openai` package (greedy, --max-tokens,
each client its own prompt); the figure is all completion tokens over the wall time
of the whole burst. Then `sampo bench --streams N` for the same N, right after. Prints
the median of the rounds, and the medians of the per-round ratios (each ratio's two
figures were measured back to back, so they suffer the same load).

Non-streaming by default: with k = 1 a streamed request is decoded twice on its own
coordinator (the local stream and the committee seat), which --stream shows."""
import argparse
import json
import statistics
import subprocess
import threading
import time

from openai import OpenAI

from localnode import local_node

ap = argparse.ArgumentParser()
ap.add_argument("sampo")
ap.add_argument("model")
ap.add_argument("--clients", default="1,8")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--requests", type=int, default=3)
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--stream", action="store_true")
a = ap.parse_args()
clients = [int(c) for c in a.clients.split(",")]
topics = ["the sea", "a mountain", "bread", "a clock", "rain", "a library", "trains", "bees", "snow", "a bridge",
          "a lighthouse", "tea", "a violin", "the moon", "a garden", "copper"]


def burst(client, name, n):
    """n clients, each sending a.requests requests back to back: (tokens, seconds)."""
    counts = [0] * n
    errors = []

    def one(i):
        try:
            for r in range(a.requests):
                msgs = [{"role": "user", "content": f"Tell a long story about {topics[(i + r) % len(topics)]}."}]
                if a.stream:
                    k = 0
                    for chunk in client.chat.completions.create(model=name, messages=msgs, max_tokens=a.max_tokens,
                                                                temperature=0, stream=True):
                        if chunk.choices and chunk.choices[0].delta.content:
                            k += 1
                    counts[i] += k
                else:
                    resp = client.chat.completions.create(model=name, messages=msgs, max_tokens=a.max_tokens,
                                                          temperature=0)
                    counts[i] += resp.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    return sum(counts), secs


def runtime(n):
    out = subprocess.run([a.sampo, "bench", "--model", a.model, "--streams", str(n), "--gen-tokens",
                          str(a.max_tokens), "--reps", "1", "--threads", str(a.threads), "--json"],
                         capture_output=True, check=True)
    return json.loads(out.stdout)["decode_tokens_per_s"]


api = {n: [] for n in clients}
bare = {n: [] for n in clients}
with local_node(a.sampo, a.model, f'[execution]\nthreads = {a.threads}\nmax_concurrent = {max(clients)}\n'
                f'max_tokens_per_task = {max(512, a.max_tokens)}\n') as url:
    client = OpenAI(base_url=url + "/v1", api_key="x", timeout=600)
    name = client.models.list().data[0].id
    burst(client, name, 2)  # warm-up
    for r in range(a.rounds):
        for n in clients:
            tokens, secs = burst(client, name, n)
            api[n].append(tokens / secs)
            bare[n].append(runtime(n))
            print(f"round {r + 1}: {n} clients {tokens} tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s; "
                  f"sampo bench --streams {n}: {bare[n][-1]:.1f} tok/s", flush=True)

med = statistics.median
mode = "streaming" if a.stream else "non-streaming"
print(f"\n{mode}, {a.requests} requests per client, max_tokens {a.max_tokens}, median of {a.rounds} rounds")
print(f"| clients | API aggregate tok/s | sampo bench --streams N decode tok/s | API / bench | API vs {clients[0]} client(s) "
      f"| bench vs --streams {clients[0]} |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
base = clients[0]
for n in clients:
    vs_bench = med([x / y for x, y in zip(api[n], bare[n])])
    vs_one = med([x / y for x, y in zip(api[n], api[base])])
    bare_vs_one = med([x / y for x, y in zip(bare[n], bare[base])])
    print(f"| {n} | {med(api[n]):.1f} | {med(bare[n]):.1f} | {vs_bench:.2f} | {vs_one:.2f} | {bare_vs_one:.2f} |")
