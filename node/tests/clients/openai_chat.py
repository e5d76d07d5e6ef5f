"""Drive a sampo node with the official `openai` package: non-streaming and streaming
chat completions. Usage: openai_chat.py http://127.0.0.1:PORT/v1"""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "What is the capital of France?"}]

resp = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
text = resp.choices[0].message.content
assert text, resp
extra = resp.model_extra or {}
assert extra.get("sampo", {}).get("verdict") == "finalized", extra
print("non-streaming ok:", repr(text))

pieces = []
final = None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if (chunk.model_extra or {}).get("sampo"):
        final = chunk.model_extra["sampo"]
streamed = "".join(pieces)
assert streamed == text, (streamed, text)
assert final and final["verdict"] == "finalized" and final["streamed_tokens_match_verdict"], final
print("streaming ok:", repr(streamed))
