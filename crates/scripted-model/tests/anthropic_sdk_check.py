"""The official anthropic SDK against clawos-scripted-model (used by anthropic_sdk.rs).

usage: anthropic_sdk_check.py BASE_URL API_KEY  -> JSON results on stdout

The script served must be: turn 1 calls write_file {"path": "hello.txt", "content": ...};
turn 2 answers text and expects a tool_result.
"""
import json
import sys

import anthropic

base_url, key = sys.argv[1], sys.argv[2]
out = {}
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
model = "claude-scripted-sdk"
first = [{"role": "user", "content": "please write hello.txt"}]


def blocks(message):
    return [b.model_dump(exclude_none=True) for b in message.content]


r = client.messages.create(model=model, max_tokens=256, messages=first)
out["create"] = {
    "stop_reason": r.stop_reason,
    "content": blocks(r),
    "usage": [r.usage.input_tokens, r.usage.output_tokens],
    "model": r.model,
    "tool_input_type": type(r.content[-1].input).__name__,
}

events = []
with client.messages.stream(model=model, max_tokens=256, messages=first) as s:
    for e in s:
        events.append(e.type)
    final = s.get_final_message()
out["stream"] = {
    "stop_reason": final.stop_reason,
    "content": blocks(final),
    "usage": [final.usage.input_tokens, final.usage.output_tokens],
    "events": events,
}

tool_use = r.content[-1]
second = first + [
    {"role": "assistant", "content": blocks(r)},
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "wrote it"}],
    },
]
r2 = client.messages.create(model=model, max_tokens=256, messages=second)
out["second_create"] = {"stop_reason": r2.stop_reason, "text": r2.content[0].text}
with client.messages.stream(model=model, max_tokens=256, messages=second) as s:
    out["second_stream_text"] = "".join(s.text_stream)

out["count_tokens"] = client.messages.count_tokens(model=model, messages=second).input_tokens

try:
    client.messages.create(
        model=model,
        max_tokens=256,
        messages=second[:2] + [{"role": "user", "content": "no result, sorry"}],
    )
    out["missing_tool_result"] = "accepted"
except anthropic.BadRequestError as e:
    out["missing_tool_result"] = [e.status_code, e.body["error"]["type"]]

try:
    anthropic.Anthropic(base_url=base_url, api_key="not-the-key", max_retries=0).messages.create(
        model=model, max_tokens=16, messages=first
    )
    out["bad_key"] = "accepted"
except anthropic.AuthenticationError as e:
    out["bad_key"] = [e.status_code, e.body["error"]["message"]]

print(json.dumps(out))
