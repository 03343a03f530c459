//! Shared by the integration tests: a server on loopback, requests, and an SSE reader
//! that rebuilds the message a stream describes, as an SDK does.
#![allow(dead_code)]

use clawos_scripted_model::{Script, ScriptedModel, serve};
use serde_json::{Value, json};

/// A stand-in serving on a free loopback port until dropped.
pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start(model: ScriptedModel) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, model, async {
        let _ = rx.await;
    }));
    Server {
        url,
        stop: Some(tx),
    }
}

pub fn script(json: &str) -> Script {
    Script::from_json(json).expect("test script")
}

pub async fn start_script(json: &str) -> Server {
    start(ScriptedModel::new(script(json))).await
}

/// A Messages request body with `messages`.
pub fn body(messages: Value, stream: bool) -> Value {
    json!({"model": "claude-scripted-test", "max_tokens": 64, "messages": messages, "stream": stream})
}

/// POSTs `body` to `/v1/messages` with `key` as x-api-key; status and response.
pub async fn post(url: &str, key: Option<&str>, body: &Value) -> (u16, reqwest::Response) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let r = req.send().await.expect("request");
    (r.status().as_u16(), r)
}

/// POSTs and parses the JSON answer.
pub async fn post_json(url: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let (status, r) = post(url, key, body).await;
    (status, r.json().await.expect("JSON answer"))
}

/// One SSE frame: its `event:` name and parsed `data:`.
pub fn parse_sse(text: &str) -> Vec<(String, Value)> {
    assert!(text.ends_with("\n\n"), "stream ends mid-frame: {text:?}");
    text.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|frame| {
            let mut lines = frame.lines();
            let event = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .unwrap_or_else(|| panic!("no event line in {frame:?}"));
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("no data line in {frame:?}"));
            assert!(lines.next().is_none(), "extra lines in {frame:?}");
            let data: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(data["type"], event, "event name and data type differ");
            (event.to_owned(), data)
        })
        .collect()
}

/// The message a stream describes, rebuilt as an SDK does: text deltas appended,
/// `partial_json` pieces concatenated and parsed at the block's stop.
pub fn reassemble(events: &[(String, Value)]) -> Value {
    let mut msg = Value::Null;
    let mut json_bufs: Vec<String> = Vec::new();
    for (name, e) in events {
        match name.as_str() {
            "message_start" => {
                msg = e["message"].clone();
                assert_eq!(msg["content"], json!([]));
            }
            "ping" => {}
            "content_block_start" => {
                let i = e["index"].as_u64().expect("index") as usize;
                let blocks = msg["content"].as_array_mut().expect("content");
                assert_eq!(blocks.len(), i, "blocks start in order");
                blocks.push(e["content_block"].clone());
                json_bufs.push(String::new());
            }
            "content_block_delta" => {
                let i = e["index"].as_u64().expect("index") as usize;
                let block = &mut msg["content"][i];
                match e["delta"]["type"].as_str() {
                    Some("text_delta") => {
                        let t = format!(
                            "{}{}",
                            block["text"].as_str().expect("text block"),
                            e["delta"]["text"].as_str().expect("delta text")
                        );
                        block["text"] = json!(t);
                    }
                    Some("input_json_delta") => {
                        json_bufs[i].push_str(e["delta"]["partial_json"].as_str().expect("piece"))
                    }
                    other => panic!("unknown delta {other:?}"),
                }
            }
            "content_block_stop" => {
                let i = e["index"].as_u64().expect("index") as usize;
                if msg["content"][i]["type"] == "tool_use" {
                    msg["content"][i]["input"] =
                        serde_json::from_str(&json_bufs[i]).expect("partial_json reassembles");
                }
            }
            "message_delta" => {
                msg["stop_reason"] = e["delta"]["stop_reason"].clone();
                msg["stop_sequence"] = e["delta"]["stop_sequence"].clone();
                msg["usage"]["output_tokens"] = e["usage"]["output_tokens"].clone();
            }
            "message_stop" => {}
            other => panic!("unknown event {other}"),
        }
    }
    msg
}
