"""The official openai SDK against inference-proxy (used by e2e/proxy.rs).

usage: openai_sdk_check.py BASE_URL AGENT_TOKEN  -> JSON results on stdout
"""
import json
import sys

import openai

base_url, token = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0)
msg = [{"role": "user", "content": "count these five words please"}]
out = {}

r = client.chat.completions.create(model="gpt-test", messages=msg)
out["create_text"] = r.choices[0].message.content
out["create_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]

text, usage = "", None
for chunk in client.chat.completions.create(
    model="gpt-test", messages=msg, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
out["stream_text"], out["stream_usage"] = text, usage

# Without include_usage the client sees no usage chunk (the proxy still counts it).
plain = list(client.chat.completions.create(model="gpt-test", messages=msg, stream=True))
out["plain_chunks_without_choices"] = sum(1 for c in plain if not c.choices)

out["models"] = sorted(m.id for m in client.models.list())
print(json.dumps(out))
