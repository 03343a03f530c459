"""The official anthropic SDK against inference-proxy (used by e2e/proxy.rs).

usage: anthropic_sdk_check.py BASE_URL AGENT_TOKEN  -> JSON results on stdout
"""
import json
import sys

import anthropic

base_url, token = sys.argv[1], sys.argv[2]
out = {}
client = anthropic.Anthropic(base_url=base_url, api_key=token, max_retries=0)
msg = [{"role": "user", "content": "hello there proxy friend"}]

r = client.messages.create(model="claude-test-1", max_tokens=16, messages=msg)
out["create_text"] = r.content[0].text
out["create_usage"] = [r.usage.input_tokens, r.usage.output_tokens]

with client.messages.stream(model="claude-test-1", max_tokens=16, messages=msg) as s:
    out["stream_text"] = "".join(s.text_stream)
    final = s.get_final_message()
out["stream_usage"] = [final.usage.input_tokens, final.usage.output_tokens]

try:
    anthropic.Anthropic(base_url=base_url, api_key="not-a-token", max_retries=0).messages.create(
        model="claude-test-1", max_tokens=16, messages=msg
    )
    out["bad_token"] = "accepted"
except anthropic.AuthenticationError as e:
    out["bad_token"] = e.status_code

print(json.dumps(out))
