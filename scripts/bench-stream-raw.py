#!/usr/bin/env python3
"""8 concurrent clients on plain http.client (no openai package), streaming and not, alternating,
each burst followed by `sampo bench --streams 8`: separates the node's streaming cost from the
openai client's per-chunk parsing (both on the same cores). Usage: bench-stream-raw.py SAMPO MODEL"""
import sys, threading, time, json, http.client, urllib.parse, subprocess
sys.path.insert(0, __import__("os").path.dirname(__file__))
from localnode import local_node
topics = ["the sea", "a mountain", "bread", "a clock", "rain", "a library", "trains", "bees"]
with local_node(sys.argv[1], sys.argv[2], '[execution]\nthreads = 0\nmax_concurrent = 8\nmax_tokens_per_task = 512\n') as url:
    u = urllib.parse.urlparse(url)
    def models():
        c = http.client.HTTPConnection(u.hostname, u.port); c.request("GET", "/v1/models"); return json.loads(c.getresponse().read())["data"][0]["id"]
    name = models()
    def one_req(i, r, stream):
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": f"Tell a long story about {topics[(i + r) % 8]}."}], "max_tokens": 128, "temperature": 0, "stream": stream})
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        if not stream:
            return json.loads(resp.read())["usage"]["completion_tokens"]
        n = 0
        while True:
            line = resp.readline()
            if not line: break
            if line.startswith(b"data: {") and b'"content"' in line: n += 1
        return n
    for stream in [True, False, True, False]:
        counts = [0]*8
        def one(i):
            for r in range(2): counts[i] += one_req(i, r, stream)
        t0 = time.perf_counter(); th = [threading.Thread(target=one, args=(i,)) for i in range(8)]; [t.start() for t in th]; [t.join() for t in th]
        dt = time.perf_counter() - t0
        out = subprocess.run([sys.argv[1], "bench", "--model", sys.argv[2], "--streams", "8", "--gen-tokens", "128", "--reps", "1", "--threads", "0", "--json"], capture_output=True)
        b = json.loads(out.stdout)["decode_tokens_per_s"]
        print("stream" if stream else "plain ", sum(counts), f"{sum(counts)/dt:.1f} tok/s", f"bench {b:.1f}", f"ratio {sum(counts)/dt/b:.2f}", flush=True)
