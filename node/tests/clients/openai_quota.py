"""An empty account gets HTTP 402 from a sampo node, which the official `openai`
package raises as an APIStatusError. Usage: openai_quota.py http://127.0.0.1:PORT/v1 KEY"""
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
model = client.models.list().data[0].id
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
except openai.APIStatusError as e:
    assert e.status_code == 402, e
    assert "insufficient_quota" in str(e.body), e.body
    print("402 ok:", e.body)
else:
    raise SystemExit("an empty account was served")
