"""Concurrent clients on one sampo node, with the official `openai` package.

Usage: openai_concurrent.py http://127.0.0.1:PORT/v1 N

1. N different chat requests (greedy and seeded sampling, streaming and not) run one
   after another, then all at once: every answer must be the same text, because a
   sequence's tokens do not depend on what shares its batch.
2. A short request sent while a long stream is decoding finishes while that stream is
   still going: it joins the running batch instead of waiting for it to end."""
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base, n = sys.argv[1], int(sys.argv[2])
client = OpenAI(base_url=base, api_key="unused", timeout=300)
model = client.models.list().data[0].id
topics = ["the sea", "a mountain", "bread", "a clock", "rain", "a library", "trains", "bees", "snow", "a bridge"]


def request(i):
    return dict(
        model=model,
        messages=[{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]}."}],
        max_tokens=12 + 3 * i,
        temperature=0 if i % 2 == 0 else 0.8,
        seed=1000 + i,
    )


def run(i):
    if i % 3 == 1:
        pieces, final = [], None
        for chunk in client.chat.completions.create(stream=True, **request(i)):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if (chunk.model_extra or {}).get("sampo"):
                final = chunk.model_extra["sampo"]
        assert final and final["verdict"] == "finalized" and final["streamed_tokens_match_verdict"], final
        return "".join(pieces)
    resp = client.chat.completions.create(**request(i))
    assert (resp.model_extra or {}).get("sampo", {}).get("verdict") == "finalized", resp.model_extra
    return resp.choices[0].message.content


alone = [run(i) for i in range(n)]
assert all(alone), alone
with ThreadPoolExecutor(max_workers=n) as pool:
    together = list(pool.map(run, range(n)))
for i, (a, t) in enumerate(zip(alone, together)):
    assert a == t, (i, a, t)
print(f"concurrent ok: {n} answers identical alone and together")

# A long stream, and a short request sent once the stream has produced its first token.
long_tokens, long_done, first = [], threading.Event(), threading.Event()


def long_stream():
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to two hundred in words."}],
        max_tokens=300,
        temperature=0,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            long_tokens.append(time.monotonic())
            first.set()
    long_done.set()


t = threading.Thread(target=long_stream)
t.start()
assert first.wait(120), "the long stream produced nothing"
short = client.chat.completions.create(**request(0))
assert short.choices[0].message.content == alone[0]
still = not long_done.is_set()
seen = len(long_tokens)
t.join()
assert still, f"the short request waited for the long stream to end ({seen} of {len(long_tokens)} pieces)"
print(f"mid-batch ok: the short request finished after {seen} of the long stream's {len(long_tokens)} pieces")
