//! The stand-in served on loopback and called over HTTP, as a client or proxy will.

mod common;

use std::time::{Duration, Instant};

use clawos_scripted_model::ScriptedModel;
use common::{body, parse_sse, post, post_json, reassemble, script, start, start_script};
use serde_json::{Value, json};

const TWO_TURNS: &str = r#"{"turns": [
    {"text": "Let me write that file for you now.",
     "tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "hi there, ✓ unicode and \"quotes\"\n"}}]},
    {"text": "I wrote hello.txt.", "expect_tool_result": true}
]}"#;

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": [{"type": "text", "text": text}]})
}

fn tool_result(id: &str) -> Value {
    json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "wrote 4 bytes"}]})
}

#[tokio::test]
async fn a_json_turn_carries_text_and_tool_use_with_usage() {
    let s = start_script(TWO_TURNS).await;
    let (status, r) = post(
        &s.url,
        None,
        &body(json!([user("please write hello.txt")]), false),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        r.headers()["request-id"]
            .to_str()
            .expect("ascii")
            .starts_with("req_"),
        "{:?}",
        r.headers()
    );
    let m: Value = r.json().await.expect("json");
    assert!(m["id"].as_str().expect("id").starts_with("msg_"), "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "claude-scripted-test");
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["stop_sequence"], Value::Null);
    let content = m["content"].as_array().expect("content");
    assert_eq!(content.len(), 2);
    assert_eq!(
        content[0],
        json!({"type": "text", "text": "Let me write that file for you now."})
    );
    assert_eq!(content[1]["type"], "tool_use");
    assert_eq!(content[1]["id"], "toolu_scripted_00_00");
    assert_eq!(content[1]["name"], "write_file");
    assert_eq!(
        content[1]["input"],
        json!({"path": "hello.txt", "content": "hi there, ✓ unicode and \"quotes\"\n"})
    );
    // 3 words in; 8 words + the input's compact JSON length / 4 out.
    let input_json = content[1]["input"].to_string();
    assert_eq!(m["usage"]["input_tokens"], 3);
    assert_eq!(m["usage"]["output_tokens"], 8 + input_json.len() as u64 / 4);
}

#[tokio::test]
async fn a_stream_is_the_real_event_sequence_and_rebuilds_the_json_answer() {
    let s = start_script(TWO_TURNS).await;
    let conversations = [
        json!([user("please write hello.txt")]),
        json!([
            user("please write hello.txt"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_scripted_00_00", "name": "write_file", "input": {"path": "hello.txt"}}]},
            tool_result("toolu_scripted_00_00"),
        ]),
    ];
    for messages in conversations {
        let (status, plain) = post_json(&s.url, None, &body(messages.clone(), false)).await;
        assert_eq!(status, 200, "{plain}");
        let (status, r) = post(&s.url, None, &body(messages, true)).await;
        assert_eq!(status, 200);
        let ct = r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let events = parse_sse(&r.text().await.expect("body"));
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..2], ["message_start", "ping"]);
        assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
        assert_eq!(
            events[0].1["message"]["usage"]["input_tokens"],
            plain["usage"]["input_tokens"]
        );
        let blocks = plain["content"].as_array().expect("content").len();
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "content_block_start")
                .count(),
            blocks
        );
        assert_eq!(
            names.iter().filter(|n| **n == "content_block_stop").count(),
            blocks
        );
        let text_deltas = events
            .iter()
            .filter(|(_, e)| e["delta"]["type"] == "text_delta")
            .count();
        assert!(text_deltas > 1, "text arrives in pieces: {names:?}");
        let mut rebuilt = reassemble(&events);
        rebuilt["id"] = plain["id"].clone();
        assert_eq!(rebuilt, plain, "the stream describes the JSON answer");
    }
    // The tool input arrives as several partial_json pieces, led by an empty one.
    let (_, r) = post(&s.url, None, &body(json!([user("go")]), true)).await;
    let events = parse_sse(&r.text().await.expect("body"));
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(pieces[0], "");
    assert!(pieces.len() >= 3, "{pieces:?}");
    let start = events
        .iter()
        .find(|(_, e)| e["content_block"]["type"] == "tool_use")
        .expect("tool_use block start");
    assert_eq!(start.1["content_block"]["input"], json!({}));
}

#[tokio::test]
async fn the_turn_is_the_count_of_assistant_messages_whatever_came_before() {
    let s = start_script(
        r#"{"turns": [{"text": "zero"}, {"text": "one"}, {"text": "two"}], "repeat_last": false}"#,
    )
    .await;
    let convo = |n: usize| {
        let mut ms = vec![user("hi")];
        for i in 0..n {
            ms.push(assistant(&format!("earlier {i}")));
            ms.push(user("more"));
        }
        body(Value::Array(ms), false)
    };
    // Out of order, repeated, and in parallel: no request changes another's answer.
    let order = [2, 0, 1, 0, 2, 1, 1, 0];
    let answers = futures(order.iter().map(|&n| {
        let url = s.url.clone();
        let b = convo(n);
        async move { post_json(&url, None, &b).await }
    }))
    .await;
    for (n, (status, m)) in order.iter().zip(answers) {
        assert_eq!(status, 200);
        assert_eq!(
            m["content"][0]["text"],
            ["zero", "one", "two"][*n],
            "turn {n}"
        );
    }
    // Past the end without repeat_last.
    let (status, m) = post_json(&s.url, None, &convo(3)).await;
    assert_eq!(status, 200);
    assert_eq!(
        m["content"],
        json!([{"type": "text", "text": "(the script has no more turns)"}])
    );
    assert_eq!(m["stop_reason"], "end_turn");
}

/// Runs the futures concurrently (each on its own task) and returns their outputs in order.
async fn futures<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn repeat_last_answers_the_last_turn_again_with_fresh_tool_ids() {
    let s = start_script(
        r#"{"turns": [{"text": "first"}, {"tool_use": [{"name": "ls", "input": {}}]}], "repeat_last": true}"#,
    )
    .await;
    let mut ms = vec![user("hi")];
    for turn in 0..5 {
        let (status, m) = post_json(&s.url, None, &body(Value::Array(ms.clone()), false)).await;
        assert_eq!(status, 200, "{m}");
        if turn == 0 {
            assert_eq!(m["content"][0]["text"], "first");
        } else {
            assert_eq!(m["stop_reason"], "tool_use");
            assert_eq!(
                m["content"][0]["id"],
                format!("toolu_scripted_{turn:02}_00")
            );
        }
        ms.push(json!({"role": "assistant", "content": m["content"]}));
        ms.push(user("again"));
    }
}

#[tokio::test]
async fn expect_tool_result_refuses_a_broken_tool_loop() {
    let s = start_script(TWO_TURNS).await;
    let call = json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_scripted_00_00", "name": "write_file", "input": {}}]});
    let (status, e) = post_json(
        &s.url,
        None,
        &body(
            json!([user("write"), call.clone(), user("I forgot the result")]),
            false,
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let msg = e["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("turn 2") && msg.contains("tool_result"),
        "{msg}"
    );
    let (status, m) = post_json(
        &s.url,
        None,
        &body(
            json!([user("write"), call, tool_result("toolu_scripted_00_00")]),
            false,
        ),
    )
    .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["content"][0]["text"], "I wrote hello.txt.");
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_refused_like_the_real_api() {
    let s = start(
        ScriptedModel::new(script(TWO_TURNS))
            .api_key("host-key")
            .expect("key"),
    )
    .await;
    let b = body(json!([user("hi")]), false);
    for key in [None, Some("agent-token"), Some("host-key-but-longer")] {
        let (status, e) = post_json(&s.url, key, &b).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(
            e,
            json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
        );
    }
    let (status, _) = post_json(&s.url, Some("host-key"), &b).await;
    assert_eq!(status, 200);
    // The key as a bearer, as recent SDKs send it; but a wrong x-api-key decides.
    let bearer = |x_api_key: Option<&str>| {
        let mut r = reqwest::Client::new()
            .post(format!("{}/v1/messages", s.url))
            .header("authorization", "Bearer host-key")
            .json(&b);
        if let Some(k) = x_api_key {
            r = r.header("x-api-key", k);
        }
        r.send()
    };
    assert_eq!(bearer(None).await.expect("bearer").status().as_u16(), 200);
    assert_eq!(
        bearer(Some("wrong")).await.expect("both").status().as_u16(),
        401
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", s.url))
        .json(&b)
        .send()
        .await
        .expect("count_tokens");
    assert_eq!(r.status().as_u16(), 401);
    assert!(ScriptedModel::new(script(TWO_TURNS)).api_key("").is_err());
}

#[tokio::test]
async fn bad_requests_get_the_api_error_shape() {
    let s = start_script(TWO_TURNS).await;
    let client = reqwest::Client::new();
    let raw = |path: &str, payload: &'static str| {
        client
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(payload)
            .send()
    };
    let cases: [(&str, &'static str, u16, &str, &str); 9] = [
        (
            "/v1/messages",
            "{not json",
            400,
            "invalid_request_error",
            "not valid JSON",
        ),
        (
            "/v1/messages",
            "[]",
            400,
            "invalid_request_error",
            "must be a JSON object",
        ),
        (
            "/v1/messages",
            r#"{"model": "m", "max_tokens": 5}"#,
            400,
            "invalid_request_error",
            "messages: Field required",
        ),
        (
            "/v1/messages",
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}]}"#,
            400,
            "invalid_request_error",
            "max_tokens: Field required",
        ),
        (
            "/v1/messages",
            r#"{"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}"#,
            400,
            "invalid_request_error",
            "model: Field required",
        ),
        (
            "/v1/messages",
            r#"{"model": "m", "max_tokens": 5, "messages": []}"#,
            400,
            "invalid_request_error",
            "at least one message",
        ),
        (
            "/v1/messages",
            r#"{"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}"#,
            400,
            "invalid_request_error",
            "messages.0.role",
        ),
        (
            "/v1/messages",
            r#"{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
            400,
            "invalid_request_error",
            "stream: Input should be a valid boolean",
        ),
        ("/v1/complete", "{}", 404, "not_found_error", "/v1/complete"),
    ];
    for (path, payload, want_status, want_type, want_msg) in cases {
        let r = raw(path, payload).await.expect("request");
        assert_eq!(r.status().as_u16(), want_status, "{payload}");
        let e: Value = r.json().await.expect("json error");
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["type"], want_type, "{e}");
        let msg = e["error"]["message"].as_str().expect("message");
        assert!(msg.contains(want_msg), "{payload}: {msg}");
    }
    let r = client
        .get(format!("{}/v1/messages", s.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 405);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let r = client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn count_tokens_counts_like_usage() {
    let s = start_script(TWO_TURNS).await;
    let b =
        json!({"model": "m", "system": "be brief", "messages": [user("four words right here")]});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", s.url))
        .json(&b)
        .send()
        .await
        .expect("count");
    assert_eq!(r.status().as_u16(), 200);
    let n: Value = r.json().await.expect("json");
    assert_eq!(n, json!({"input_tokens": 6}));
    let mut full = b.clone();
    full["max_tokens"] = json!(10);
    let (_, m) = post_json(&s.url, None, &full).await;
    assert_eq!(m["usage"]["input_tokens"], 6);
}

#[tokio::test]
async fn delay_ms_holds_the_answer_back() {
    let s = start_script(r#"{"turns": [{"text": "slow", "delay_ms": 300}]}"#).await;
    let t = Instant::now();
    let (status, _) = post_json(&s.url, None, &body(json!([user("hi")]), false)).await;
    assert_eq!(status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn the_record_holds_one_private_line_per_request_accepted_or_not() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("record.jsonl");
    // An existing, world-readable file is made private.
    std::fs::write(&path, "").expect("create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let model = ScriptedModel::new(script(r#"{"turns": [{"text": "a"}, {"text": "b"}]}"#))
        .api_key("host-key")
        .expect("key")
        .record_to(&path)
        .expect("record");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let s = start(model).await;
    let b = body(json!([user("hi"), assistant("x"), user("go on")]), true);
    let (status, r) = post(&s.url, Some("host-key"), &b).await;
    assert_eq!(status, 200);
    let _ = r.text().await;
    let (status, _) = post(
        &s.url,
        Some("leaked-agent-token"),
        &body(json!([user("hi")]), false),
    )
    .await;
    assert_eq!(status, 401);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", s.url))
        .header("x-api-key", "host-key")
        .header("authorization", "Bearer nope")
        .header("anthropic-beta", "a-1")
        .header("anthropic-beta", "b-2")
        .json(&json!({"model": "m", "messages": [user("hi")]}))
        .send()
        .await
        .expect("count");
    assert_eq!(r.status().as_u16(), 200);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages", s.url))
        .body("not json")
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status().as_u16(), 401);

    let text = std::fs::read_to_string(&path).expect("record");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines[0],
        json!({"path": "/v1/messages", "x_api_key": "host-key", "authorization": null,
               "anthropic_version": "2023-06-01", "anthropic_beta": [],
               "model": "claude-scripted-test", "stream": true, "turn": 1, "messages": 3,
               "tools": null, "tool_results": []})
    );
    assert_eq!(lines[1]["x_api_key"], "leaked-agent-token");
    assert_eq!(lines[1]["turn"], 0);
    assert_eq!(lines[1]["stream"], false);
    assert_eq!(lines[2]["path"], "/v1/messages/count_tokens");
    assert_eq!(lines[2]["authorization"], "Bearer nope");
    assert_eq!(lines[2]["anthropic_beta"], json!(["a-1", "b-2"]));
    assert_eq!(lines[2]["turn"], Value::Null);
    assert_eq!(lines[2]["messages"], 1);
    assert_eq!(lines[3]["x_api_key"], Value::Null);
    assert_eq!(lines[3]["model"], Value::Null);
    assert_eq!(lines[3]["messages"], Value::Null);
}
