//! The official `openai` Python SDK against agentd's chat-completions endpoint, stream
//! and non-stream: the compatibility the endpoint claims. Skipped (loudly) where
//! python3 or the SDK is missing.

mod common;

use common::*;
use serde_json::Value;

const WRITE_THEN_DONE: &str = r#"{"turns":[
    {"text":"Writing it.","tool_use":[{"name":"write_file","input":{"path":"hello.txt","content":"hi"}}]},
    {"text":"done","expect_tool_result":true}
]}"#;

/// Non-stream, then stream (with ClawOS's tool events, and without), in one session;
/// prints what the SDK made of each as one JSON line.
const CLIENT: &str = r#"
import json, os, sys
import openai
client = openai.OpenAI(base_url=os.environ["AGENTD_URL"] + "/v1", api_key="unused", max_retries=0)
out = {}
r = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "write hello.txt"}],
    extra_body={"session": "sdk"},
)
out["plain"] = {
    "content": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "total_tokens": r.usage.total_tokens,
    "session": (r.model_extra or {}).get("session"),
    "steps": (r.model_extra or {}).get("clawos", {}).get("steps"),
}
for name, headers in [("stream", {}), ("stream_quiet", {"x-clawos-tool-events": "off"})]:
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "again"}],
        stream=True,
        extra_headers={"x-clawos-session": "sdk-" + name.replace("_", "-"), **headers},
    )
    content, finish, usage, other = "", None, None, 0
    for chunk in stream:
        # ClawOS's tool events reach an SDK iterator as chunks with empty choices,
        # as OpenAI's usage chunk does.
        if len(chunk.choices) == 0:
            other += 1
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        finish = c.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.total_tokens
    out[name] = {"content": content, "finish_reason": finish, "total_tokens": usage, "non_chunks": other}
try:
    client.chat.completions.create(model="default", messages=[{"role": "system", "content": "x"}])
    out["error"] = None
except openai.BadRequestError as e:
    out["error"] = {"status": e.status_code, "code": e.code, "message": e.message}
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_openai_python_sdk_can_use_agentd() {
    // The SDK is what this test is about: without it the test fails (CI installs it with
    // pip); it never passes by skipping.
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .expect("python3 must be runnable for the OpenAI SDK test");
    assert!(
        probe.status.success(),
        "the openai Python SDK is required (pip install openai): {}",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let model = model(WRITE_THEN_DONE).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let out = tokio::process::Command::new("python3")
        .args(["-c", CLIENT])
        .env("AGENTD_URL", &agentd.url)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "the SDK client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON line");
    assert_eq!(v["plain"]["content"], "done");
    assert_eq!(v["plain"]["finish_reason"], "stop");
    assert_eq!(v["plain"]["session"], "sdk");
    assert_eq!(v["plain"]["steps"], 2);
    assert!(v["plain"]["total_tokens"].as_u64().expect("tokens") > 0);
    for name in ["stream", "stream_quiet"] {
        assert_eq!(v[name]["content"], "Writing it.\n\ndone", "{name}: {v}");
        assert_eq!(v[name]["finish_reason"], "stop", "{name}");
        assert!(v[name]["total_tokens"].as_u64().expect("tokens") > 0);
    }
    assert_eq!(v["stream"]["non_chunks"], 2, "one tool call, one result");
    assert_eq!(v["stream_quiet"]["non_chunks"], 0);
    assert_eq!(v["error"]["status"], 400);
    assert_eq!(v["error"]["code"], "no_user_message");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("hello.txt")).expect("file"),
        "hi"
    );
    agentd.stop().await;
}
