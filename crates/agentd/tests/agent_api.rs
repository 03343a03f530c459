//! agentd end to end: its agent API in-process, the real scripted model on loopback as
//! the LLM, a temporary directory as the workspace.

mod common;

use std::time::{Duration, Instant};

use clawos_agentd::session::INTERRUPTED;
use clawos_agentd_api::{
    ChatCompletion, EVENT_ERROR, EVENT_TOOL_CALL, EVENT_TOOL_RESULT, ErrorBody, Health,
    SESSION_HEADER, SessionList, ToolCallEvent, ToolResultEvent, code,
};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE_THEN_DONE: &str = r#"{"turns":[
    {"text":"Writing it.","tool_use":[{"name":"write_file","input":{"path":"hello.txt","content":"hi"}}]},
    {"text":"done","expect_tool_result":true}
]}"#;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("send")
}

async fn error_of(resp: reqwest::Response) -> ErrorBody {
    resp.json().await.expect("error body")
}

#[tokio::test]
async fn two_turn_task_writes_a_file_and_answers() {
    let model = model_with_key(WRITE_THEN_DONE, Some("sk-test")).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(ws.path(), &model.url);
    cfg.api_key = Some("sk-test".into());
    let agentd = agentd(cfg).await;

    let resp = post(&agentd.url, &chat("write hello.txt")).await;
    assert_eq!(resp.status(), 200);
    let session = resp
        .headers()
        .get(SESSION_HEADER)
        .expect("session header")
        .to_str()
        .expect("text")
        .to_owned();
    assert!(clawos_agentd_api::is_valid_session_id(&session));
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(c.object, "chat.completion");
    assert!(c.id.starts_with("chatcmpl-"));
    assert_eq!(
        c.model, "claude-test",
        "`default` means the runtime's model"
    );
    assert_eq!(c.session, session);
    assert_eq!(c.choices[0].message.role, "assistant");
    assert_eq!(c.choices[0].message.content, "done");
    assert_eq!(c.choices[0].finish_reason, "stop");
    assert_eq!(c.clawos.steps, 2);
    assert_eq!(c.clawos.tool_calls.len(), 1);
    let call = &c.clawos.tool_calls[0];
    assert_eq!(call.name, "write_file");
    assert_eq!(call.input["path"], "hello.txt");
    assert!(call.ok);
    assert_eq!(call.output_preview, "wrote 2 bytes to hello.txt");
    assert!(c.usage.prompt_tokens > 0 && c.usage.completion_tokens > 0);
    assert_eq!(
        c.usage.total_tokens,
        c.usage.prompt_tokens + c.usage.completion_tokens
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("hello.txt")).expect("file"),
        "hi"
    );

    // What the model saw: two streaming calls with the version header and the key.
    let reqs = model.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r["path"], "/v1/messages");
        assert_eq!(r["stream"], true);
        assert_eq!(r["model"], "claude-test");
        assert_eq!(r["anthropic_version"], "2023-06-01");
        assert_eq!(r["x_api_key"], "sk-test");
        assert_eq!(r["turn"], i);
    }
    assert_eq!(
        reqs[1]["messages"], 3,
        "user, assistant tool_use, tool_result"
    );

    // The transcript: the messages as sent and received.
    let t = transcript(ws.path(), &session);
    assert_eq!(t.len(), 4);
    assert_eq!(t[0], json!({"role":"user","content":"write hello.txt"}));
    assert_eq!(t[1]["content"][1]["type"], "tool_use");
    assert_eq!(t[1]["content"][1]["name"], "write_file");
    assert_eq!(tool_results(&t)[0]["content"], "wrote 2 bytes to hello.txt");
    assert_eq!(t[3]["content"][0]["text"], "done");
    agentd.stop().await;
}

#[tokio::test]
async fn streaming_task_shows_text_and_tool_events() {
    let model = model(WRITE_THEN_DONE).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let mut body = chat("write hello.txt");
    body["stream"] = json!(true);
    body["session"] = json!("stream-1");
    let resp = post(&agentd.url, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[SESSION_HEADER], "stream-1");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.expect("body");
    let frames = frames(&text);
    let last = frames.last().expect("frames");
    assert_eq!(last.event, None);
    assert_eq!(last.data, "[DONE]");

    let chunks: Vec<Value> = frames
        .iter()
        .filter(|f| f.event.is_none() && f.data != "[DONE]")
        .map(Frame::json)
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["session"], "stream-1");
    }
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Writing it.\n\ndone");
    let fin = chunks.last().expect("final chunk");
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    assert!(fin["usage"]["total_tokens"].as_u64().expect("usage") > 0);

    let calls: Vec<Value> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some(EVENT_TOOL_CALL))
        .map(Frame::json)
        .collect();
    let results: Vec<Value> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some(EVENT_TOOL_RESULT))
        .map(Frame::json)
        .collect();
    assert_eq!(calls.len(), 1);
    let typed: ToolCallEvent = serde_json::from_value(calls[0].clone()).expect("wire type");
    assert_eq!(typed.name, "write_file");
    let typed: ToolResultEvent = serde_json::from_value(results[0].clone()).expect("wire type");
    assert!(typed.ok);
    assert_eq!(calls[0]["choices"], json!([]), "SDKs skip it as a chunk");
    assert_eq!(
        calls[0]["input"],
        json!({"path":"hello.txt","content":"hi"})
    );
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["id"], calls[0]["id"]);
    assert_eq!(results[0]["ok"], true);
    assert_eq!(results[0]["output"], "wrote 2 bytes to hello.txt");
    // Order: the call and its result come between the two steps' text.
    let pos = |pred: &dyn Fn(&Frame) -> bool| frames.iter().position(pred).expect("frame");
    let call_at = pos(&|f| f.event.as_deref() == Some(EVENT_TOOL_CALL));
    let result_at = pos(&|f| f.event.as_deref() == Some(EVENT_TOOL_RESULT));
    let done_at = pos(&|f| f.data.contains("\"done\""));
    assert!(call_at < result_at && result_at < done_at);
    assert_eq!(
        std::fs::read_to_string(ws.path().join("hello.txt")).expect("file"),
        "hi"
    );

    // Tool events can be turned off for clients that take every event for a chunk.
    let mut body = chat("again");
    body["stream"] = json!(true);
    body["tool_events"] = json!(false);
    let text = post(&agentd.url, &body).await.text().await.expect("body");
    assert!(
        common::frames(&text).iter().all(|f| f.event.is_none()),
        "{text}"
    );
    agentd.stop().await;
}

#[tokio::test]
async fn file_and_shell_tools_through_the_model() {
    let script = json!({"turns": [
        {"tool_use": [
            {"name": "write_file", "input": {"path": "src/a.txt", "content": "hello world\nhello moon\n"}},
            {"name": "edit_file", "input": {"path": "src/a.txt", "old_text": "hello", "new_text": "bye"}},
            {"name": "edit_file", "input": {"path": "/WS/src/a.txt", "old_text": "world", "new_text": "there"}},
            {"name": "read_file", "input": {"path": "src/a.txt"}},
            {"name": "list_files", "input": {}},
            {"name": "list_files", "input": {"path": "src"}}
        ]},
        {"tool_use": [
            {"name": "bash", "input": {"command": "cat src/a.txt; echo oops >&2; exit 4"}},
            {"name": "bash", "input": {"command": "echo begun; sleep 30", "timeout_secs": 1}},
            {"name": "bash", "input": {"command": "head -c 3000 /dev/zero | tr '\\0' y"}}
        ], "expect_tool_result": true},
        {"text": "all done", "expect_tool_result": true}
    ]});
    let ws = tempfile::tempdir().expect("tempdir");
    let script = script
        .to_string()
        .replace("/WS", &ws.path().display().to_string());
    let model = model(&script).await;
    let mut cfg = config(ws.path(), &model.url);
    cfg.output_cap = 1000;
    let agentd = agentd(cfg).await;
    let started = Instant::now();
    let mut body = chat("exercise the tools");
    body["session"] = json!("tools");
    let resp = post(&agentd.url, &body).await;
    assert_eq!(resp.status(), 200);
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(c.choices[0].message.content, "all done");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timed-out command was killed"
    );
    let oks: Vec<bool> = c.clawos.tool_calls.iter().map(|t| t.ok).collect();
    assert_eq!(
        oks,
        [true, false, true, true, true, true, false, false, true]
    );

    let results = tool_results(&transcript(ws.path(), "tools"));
    let text = |i: usize| results[i]["content"].as_str().expect("text").to_owned();
    assert_eq!(results.len(), 9);
    assert!(
        text(1).contains("old_text matches 2 times in src/a.txt"),
        "{}",
        text(1)
    );
    assert_eq!(results[1]["is_error"], true);
    assert_eq!(text(3), "hello there\nhello moon\n");
    assert_eq!(text(4), ".clawos/\nsrc/\n");
    assert_eq!(text(5), "a.txt (23 bytes)\n");
    assert_eq!(text(6), "hello there\nhello moon\noops\n[exit status: 4]");
    assert_eq!(results[6]["is_error"], true);
    assert_eq!(text(7), "begun\n[killed: timed out after 1 s]");
    assert!(
        text(8).starts_with(&"y".repeat(1000)),
        "capped at --output-cap"
    );
    assert!(
        text(8).ends_with("[output truncated: 3000 bytes total]\n[exit status: 0]"),
        "{}",
        text(8)
    );
    assert!(results[8].get("is_error").is_none());
    agentd.stop().await;
}

#[tokio::test]
async fn paths_outside_the_workspace_are_refused() {
    let ws = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret"), "top secret").expect("write");
    std::os::unix::fs::symlink(outside.path(), ws.path().join("link")).expect("symlink");
    let script = json!({"turns": [
        {"tool_use": [
            {"name": "read_file", "input": {"path": "../x"}},
            {"name": "read_file", "input": {"path": "/etc/passwd"}},
            {"name": "read_file", "input": {"path": "link/secret"}},
            {"name": "write_file", "input": {"path": "link/planted", "content": "x"}},
            {"name": "write_file", "input": {"path": "../planted", "content": "x"}},
            {"name": "edit_file", "input": {"path": "link/secret", "old_text": "top", "new_text": "no"}},
            {"name": "list_files", "input": {"path": "link"}}
        ]},
        {"text": "refused", "expect_tool_result": true}
    ]});
    let model = model(&script.to_string()).await;
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let mut body = chat("escape");
    body["session"] = json!("escape");
    let c: ChatCompletion = post(&agentd.url, &body)
        .await
        .json()
        .await
        .expect("completion");
    assert_eq!(c.clawos.tool_calls.len(), 7);
    for t in &c.clawos.tool_calls {
        assert!(!t.ok, "{t:?}");
        assert!(
            t.output_preview.contains("outside") || t.output_preview.contains("escapes"),
            "{t:?}"
        );
        assert!(!t.output_preview.contains("top secret"));
        assert!(!t.output_preview.contains("root:"));
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("ls").count(),
        1,
        "nothing planted outside"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).expect("read"),
        "top secret"
    );
    assert!(!ws.path().parent().expect("parent").join("planted").exists());
    agentd.stop().await;
}

const FOREVER_TOOLS: &str =
    r#"{"turns":[{"tool_use":[{"name":"bash","input":{"command":"true"}}]}],"repeat_last":true}"#;

#[tokio::test]
async fn step_limit_fails_the_task_with_422() {
    let model = model(FOREVER_TOOLS).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(ws.path(), &model.url);
    cfg.max_steps = 3;
    let agentd = agentd(cfg).await;
    let mut body = chat("loop");
    body["session"] = json!("steps");
    let resp = post(&agentd.url, &body).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.headers()[SESSION_HEADER], "steps");
    let e = error_of(resp).await;
    assert_eq!(e.error.code.as_deref(), Some(code::STEP_LIMIT));
    assert!(
        e.error.message.contains("step limit"),
        "{}",
        e.error.message
    );
    assert!(e.error.message.contains("3 model calls (--max-steps)"));
    assert_eq!(model.requests().len(), 3);
    // The transcript stays valid: the last call's tools are answered as not run.
    let t = transcript(ws.path(), "steps");
    let last = t.last().expect("messages");
    assert_eq!(last["role"], "user");
    assert!(
        last["content"][0]["content"]
            .as_str()
            .expect("text")
            .starts_with("not run: the task reached its step limit")
    );

    // Streaming: the failure is an `error` event and the stream has no [DONE].
    body["stream"] = json!(true);
    let resp = post(&agentd.url, &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    let frames = frames(&text);
    let last = frames.last().expect("frames");
    assert_eq!(last.event.as_deref(), Some(EVENT_ERROR), "{text}");
    assert_eq!(last.json()["error"]["code"], code::STEP_LIMIT);
    assert!(!text.contains("[DONE]"));
    agentd.stop().await;
}

#[tokio::test]
async fn time_limit_fails_the_task_with_422() {
    let model = model(r#"{"turns":[{"text":"slow","delay_ms":5000}]}"#).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(ws.path(), &model.url);
    cfg.max_task = Duration::from_secs(1);
    let agentd = agentd(cfg).await;
    let started = Instant::now();
    let resp = post(&agentd.url, &chat("hurry")).await;
    assert_eq!(resp.status(), 422);
    assert!(started.elapsed() < Duration::from_secs(4));
    let e = error_of(resp).await;
    assert_eq!(e.error.code.as_deref(), Some(code::TIME_LIMIT));
    assert!(
        e.error.message.contains("1 s (--max-task-secs)"),
        "{}",
        e.error.message
    );
    agentd.stop().await;
}

/// A model endpoint that answers every request with one canned HTTP answer.
async fn canned_upstream(answer: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                // Read the request head and its body before answering.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    url
}

fn http_answer(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn upstream_refusals_are_surfaced_verbatim() {
    let ws = tempfile::tempdir().expect("tempdir");
    // The inference proxy's own error body, a token budget exhausted.
    let budget = canned_upstream(http_answer(
        "429 Too Many Requests",
        "retry-after: 3600\r\n",
        r#"{"error":{"code":"rate_limited","message":"token budget exhausted: agent demo used 100000 of 100000 tokens today","request_id":"req_abc"}}"#,
    ))
    .await;
    let agentd1 = agentd(config(ws.path(), &budget)).await;
    let resp = post(&agentd1.url, &chat("hi")).await;
    assert_eq!(resp.status(), 429);
    let e = error_of(resp).await;
    assert_eq!(e.error.code.as_deref(), Some(code::RATE_LIMITED));
    assert_eq!(e.error.kind, "rate_limit_error");
    assert_eq!(
        e.error.message,
        "model call refused (429 rate_limited): token budget exhausted: agent demo used 100000 of 100000 tokens today (retry after 3600 s) (request req_abc)"
    );
    agentd1.stop().await;

    // Anthropic's error shape; not a rate limit, so 502.
    let overloaded = canned_upstream(http_answer(
        "529 Overloaded",
        "",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ))
    .await;
    let agentd2 = agentd(config(ws.path(), &overloaded)).await;
    let mut body = chat("hi");
    body["stream"] = json!(true);
    let resp = post(&agentd2.url, &body).await;
    // Streaming: the refusal arrives as the stream's error event.
    let text = resp.text().await.expect("body");
    let last = frames(&text).pop().expect("frames");
    assert_eq!(last.event.as_deref(), Some(EVENT_ERROR));
    assert_eq!(
        last.json()["error"]["message"],
        "model call refused (529 overloaded_error): Overloaded"
    );
    assert_eq!(last.json()["error"]["code"], code::MODEL_ERROR);
    let resp = post(&agentd2.url, &chat("hi")).await;
    assert_eq!(resp.status(), 502);
    agentd2.stop().await;

    // Nobody listening.
    let dead = format!("http://127.0.0.1:{}", clawos_test_ports::free_port());
    let agentd3 = agentd(config(ws.path(), &dead)).await;
    let resp = post(&agentd3.url, &chat("hi")).await;
    assert_eq!(resp.status(), 502);
    let e = error_of(resp).await;
    assert!(
        e.error
            .message
            .starts_with("cannot reach the model endpoint at 127.0.0.1:"),
        "{}",
        e.error.message
    );
    agentd3.stop().await;
}

#[tokio::test]
async fn sessions_resume_after_a_restart() {
    let script = r#"{"turns":[
        {"tool_use":[{"name":"write_file","input":{"path":"notes.md","content":"one"}}]},
        {"text":"first task done","expect_tool_result":true},
        {"text":"second task done"}
    ]}"#;
    let model = model(script).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let first = agentd(config(ws.path(), &model.url)).await;
    let mut body = chat("start");
    body["session"] = json!("resume-me");
    let c: ChatCompletion = post(&first.url, &body)
        .await
        .json()
        .await
        .expect("completion");
    assert_eq!(c.choices[0].message.content, "first task done");
    first.stop().await;

    // A new runtime on the same workspace; the session named by the header this time,
    // and the request's earlier messages ignored (the transcript is the history).
    let second = agentd(config(ws.path(), &model.url)).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", second.url))
        .header(SESSION_HEADER, "resume-me")
        .json(&json!({"model":"default","messages":[
            {"role":"user","content":"ignored history"},
            {"role":"assistant","content":"ignored"},
            {"role":"user","content":"continue"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[SESSION_HEADER], "resume-me");
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(
        c.choices[0].message.content, "second task done",
        "the model saw the two earlier answers"
    );
    let last = model.requests().pop().expect("request");
    assert_eq!(last["turn"], 2);
    assert_eq!(last["messages"], 5);
    let t = transcript(ws.path(), "resume-me");
    assert_eq!(t.len(), 6);
    assert_eq!(t[4], json!({"role":"user","content":"continue"}));

    let list: SessionList = client()
        .get(format!("{}/v1/sessions", second.url))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("list");
    assert_eq!(list.sessions.len(), 1);
    assert_eq!(list.sessions[0].id, "resume-me");
    assert_eq!(list.sessions[0].messages, 6);
    assert_eq!(
        list.sessions[0].last_user_message.as_deref(),
        Some("continue")
    );
    second.stop().await;
}

#[tokio::test]
async fn a_new_session_takes_the_requests_history() {
    let model = model(r#"{"turns":[{"text":"a"},{"text":"b"}]}"#).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let resp = post(
        &agentd.url,
        &json!({"model":"claude-other","session":"hist","messages":[
            {"role":"system","content":"Be terse."},
            {"role":"user","content":"earlier question"},
            {"role":"assistant","content":"earlier answer"},
            {"role":"user","content":[{"type":"text","text":"now this"}]}]}),
    )
    .await;
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(
        c.choices[0].message.content, "b",
        "one assistant message in the history"
    );
    assert_eq!(c.model, "claude-other");
    assert_eq!(model.requests()[0]["model"], "claude-other");
    let t = transcript(ws.path(), "hist");
    assert_eq!(t[0]["content"], "earlier question");
    assert_eq!(t[1]["content"], "earlier answer");
    assert_eq!(t[2]["content"], "now this");
    agentd.stop().await;
}

#[tokio::test]
async fn a_task_killed_mid_tool_is_repaired_on_resume() {
    let script = r#"{"turns":[
        {"tool_use":[{"name":"bash","input":{"command":"sleep 2 && touch late"}}]},
        {"text":"noted the interruption","expect_tool_result":true}
    ]}"#;
    let model = model(script).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let first = agentd(config(ws.path(), &model.url)).await;
    let url = first.url.clone();
    let pending = tokio::spawn(async move {
        let mut body = chat("run it");
        body["session"] = json!("killed");
        client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
    });
    // Wait until the tool call is in the transcript, then stop the runtime.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let path = ws.path().join(".clawos/sessions/killed.jsonl");
        if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("tool_use")) {
            break;
        }
        assert!(Instant::now() < deadline, "the tool call never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.stop().await;
    let _ = pending.await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !ws.path().join("late").exists(),
        "the tool's processes died with the task"
    );
    let t = transcript(ws.path(), "killed");
    assert_eq!(t.last().expect("messages")["role"], "assistant");

    let second = agentd(config(ws.path(), &model.url)).await;
    let mut body = chat("what happened?");
    body["session"] = json!("killed");
    let resp = post(&second.url, &body).await;
    assert_eq!(resp.status(), 200);
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(c.choices[0].message.content, "noted the interruption");
    let t = transcript(ws.path(), "killed");
    let results = tool_results(&t);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["content"], INTERRUPTED);
    assert_eq!(results[0]["is_error"], true);
    assert_eq!(results[0]["tool_use_id"], t[1]["content"][0]["id"]);
    second.stop().await;
}

#[tokio::test]
async fn a_busy_session_answers_409() {
    let model = model(r#"{"turns":[{"text":"slow answer","delay_ms":1500}]}"#).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let url = agentd.url.clone();
    let mut body = chat("one");
    body["session"] = json!("busy");
    let b = body.clone();
    let first = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&b)
            .send()
            .await
            .expect("send")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first task never called the model"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = post(&agentd.url, &body).await;
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.headers()[SESSION_HEADER], "busy");
    let e = error_of(resp).await;
    assert_eq!(e.error.code.as_deref(), Some(code::SESSION_BUSY));
    assert!(e.error.message.contains("session busy is busy"), "{e:?}");
    // Another session is not held up.
    let mut other = chat("two");
    other["session"] = json!("other");
    let resp = post(&agentd.url, &other).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(first.await.expect("first").status(), 200);
    // Free again once the first task is done.
    assert_eq!(post(&agentd.url, &body).await.status(), 200);
    agentd.stop().await;
}

#[tokio::test]
async fn bad_requests_name_the_problem() {
    let model = model(r#"{"turns":[{"text":"x"}]}"#).await;
    let ws = tempfile::tempdir().expect("tempdir");
    let agentd = agentd(config(ws.path(), &model.url)).await;
    let raw = |body: &'static str| {
        client()
            .post(format!("{}/v1/chat/completions", agentd.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(reqwest::Response, u16, &str, &str)> = vec![
        (
            raw("{not json").await.expect("send"),
            400,
            code::MALFORMED_REQUEST,
            "malformed JSON",
        ),
        (
            raw(r#"{"messages":"no"}"#).await.expect("send"),
            400,
            code::MALFORMED_REQUEST,
            "not a chat completion request: invalid type",
        ),
        (
            post(
                &agentd.url,
                &json!({"messages":[{"role":"system","content":"s"}]}),
            )
            .await,
            400,
            code::NO_USER_MESSAGE,
            "no user message",
        ),
        (
            post(
                &agentd.url,
                &json!({"messages":[{"role":"user","content":"  "}]}),
            )
            .await,
            400,
            code::NO_USER_MESSAGE,
            "empty",
        ),
        (
            post(
                &agentd.url,
                &json!({"session":"../etc","messages":[{"role":"user","content":"x"}]}),
            )
            .await,
            400,
            code::BAD_SESSION_ID,
            "bad session id \"../etc\"",
        ),
        (
            client()
                .post(format!("{}/v1/chat/completions", agentd.url))
                .header(SESSION_HEADER, "UPPER")
                .json(&chat("x"))
                .send()
                .await
                .expect("send"),
            400,
            code::BAD_SESSION_ID,
            "a-z, 0-9 and -",
        ),
        (
            client()
                .post(format!("{}/v1/chat/completions", agentd.url))
                .header(SESSION_HEADER, "a")
                .json(&json!({"session":"b","messages":[{"role":"user","content":"x"}]}))
                .send()
                .await
                .expect("send"),
            400,
            code::BAD_SESSION_ID,
            "differ",
        ),
        (
            post(
                &agentd.url,
                &json!({"messages":[{"role":"user","content":"x".repeat(1 << 20)}]}),
            )
            .await,
            413,
            code::BODY_TOO_LARGE,
            "over 1048576 bytes",
        ),
        (
            client()
                .get(format!("{}/v1/nothing", agentd.url))
                .send()
                .await
                .expect("send"),
            404,
            code::NOT_FOUND,
            "no route /v1/nothing",
        ),
        (
            client()
                .get(format!("{}/v1/chat/completions", agentd.url))
                .send()
                .await
                .expect("send"),
            405,
            code::METHOD_NOT_ALLOWED,
            "GET is not allowed",
        ),
    ];
    for (resp, status, want_code, want) in cases {
        assert_eq!(resp.status(), status, "{want}");
        let e = error_of(resp).await;
        assert_eq!(e.error.code.as_deref(), Some(want_code), "{e:?}");
        assert!(e.error.message.contains(want), "{want}: {e:?}");
    }
    assert!(
        model.requests().is_empty(),
        "no bad request reached the model"
    );
    assert!(
        !ws.path().join(".clawos/sessions/a.jsonl").exists(),
        "no session made for a refused request"
    );

    let h: Health = client()
        .get(format!("{}/healthz", agentd.url))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("health");
    assert_eq!(h.status, "ok");
    assert_eq!(h.model, "claude-test");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    agentd.stop().await;
}
