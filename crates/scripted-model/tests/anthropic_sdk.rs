//! The official Anthropic Python SDK against the binary: proof that the wire format is
//! the real one, not merely what our own parsers accept. Skipped, loudly, when the SDK
//! is not installed (`pip install anthropic`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const SCRIPT: &str = r#"{"turns": [
    {"text": "Writing it.", "tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "Hello ✓\n"}}]},
    {"text": "I wrote hello.txt in the workspace.", "expect_tool_result": true}
]}"#;

/// The SDK is what these tests are about: without it they fail (CI installs it with
/// pip); they never pass by skipping.
fn require_sdk() {
    let status = Command::new("python3")
        .args(["-c", "import anthropic"])
        .status()
        .expect("python3 must be runnable for the Anthropic SDK test");
    assert!(
        status.success(),
        "the anthropic Python SDK is required (pip install anthropic)"
    );
}

#[test]
fn the_official_python_sdk_parses_json_and_streamed_turns() {
    require_sdk();
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("script.json");
    std::fs::write(&script, SCRIPT).expect("script");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawos-scripted-model"))
        .args(["--addr", "127.0.0.1:0", "--api-key", "sdk-key", "--script"])
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log"))
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let url = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();

    let check = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/anthropic_sdk_check.py");
    let out = Command::new("python3")
        .args([check, &url, "sdk-key"])
        .output()
        .expect("python3");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "SDK check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON from the check");

    let tool_use = json!({"type": "tool_use", "id": "toolu_scripted_00_00", "name": "write_file",
        "input": {"path": "hello.txt", "content": "Hello ✓\n"}});
    let content = json!([{"type": "text", "text": "Writing it."}, tool_use]);
    assert_eq!(r["create"]["stop_reason"], "tool_use");
    assert_eq!(r["create"]["content"], content);
    assert_eq!(r["create"]["tool_input_type"], "dict");
    assert_eq!(r["create"]["model"], "claude-scripted-sdk");
    // 3 words in; 2 words + len({"path":"hello.txt","content":"Hello ✓\n"}) / 4 out.
    let input_len = tool_use["input"].to_string().len() as u64;
    assert_eq!(r["create"]["usage"], json!([3, 2 + input_len / 4]));
    assert_eq!(r["stream"]["stop_reason"], "tool_use");
    assert_eq!(
        r["stream"]["content"], content,
        "the stream rebuilds the same blocks"
    );
    assert_eq!(r["stream"]["usage"], r["create"]["usage"]);
    let events: Vec<&str> = r["stream"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert!(events.contains(&"input_json"), "{events:?}");
    assert_eq!(events.last(), Some(&"message_stop"));

    assert_eq!(
        r["second_create"],
        json!({"stop_reason": "end_turn", "text": "I wrote hello.txt in the workspace."})
    );
    assert_eq!(
        r["second_stream_text"],
        "I wrote hello.txt in the workspace."
    );
    assert!(r["count_tokens"].as_u64().is_some_and(|n| n > 3), "{r}");
    assert_eq!(
        r["missing_tool_result"],
        json!([400, "invalid_request_error"])
    );
    assert_eq!(r["bad_key"], json!([401, "invalid x-api-key"]));
}
