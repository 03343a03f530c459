//! Shared set-up of the agentd tests: the scripted model (`clawos-scripted-model`) on
//! loopback as the LLM, and agentd's own server in-process on a temporary workspace.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clawos_agentd::Config;
use clawos_scripted_model::{Script, ScriptedModel};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The scripted model, serving until dropped.
pub struct Model {
    pub url: String,
    pub record: PathBuf,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Model {
    /// Every request the model received, as recorded (one JSON object each).
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("record line"))
            .collect()
    }
}

pub async fn model(script: &str) -> Model {
    model_with_key(script, None).await
}

pub async fn model_with_key(script: &str, key: Option<&str>) -> Model {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("record.jsonl");
    let mut m = ScriptedModel::new(Script::from_json(script).expect("script"))
        .record_to(&record)
        .expect("record");
    if let Some(k) = key {
        m = m.api_key(k).expect("key");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(clawos_scripted_model::serve(listener, m, async move {
        let _ = rx.await;
    }));
    Model {
        url,
        record,
        _stop: tx,
        _dir: dir,
    }
}

/// agentd serving in-process.
pub struct Agentd {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Agentd {
    /// Stops the server and waits until it has returned (its tasks stopped).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("agentd stops promptly")
                .expect("agentd task");
        }
    }
}

/// A config for `workspace` calling `llm_url`, tightened for tests.
pub fn config(workspace: &Path, llm_url: &str) -> Config {
    let mut c = Config::new(workspace);
    c.llm_url = llm_url.to_owned();
    c.model = "claude-test".into();
    c.max_task = Duration::from_secs(60);
    c
}

pub async fn agentd(config: Config) -> Agentd {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        clawos_agentd::serve(listener, config, async move {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    Agentd {
        url,
        stop: Some(tx),
        task: Some(task),
    }
}

/// One frame of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// `None` for plain `data:` frames.
    pub event: Option<String>,
    pub data: String,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("frame data is JSON")
    }
}

/// Splits an event stream's text into frames.
pub fn frames(text: &str) -> Vec<Frame> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let mut event = None;
            let mut data = Vec::new();
            for line in f.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            Frame {
                event,
                data: data.join("\n"),
            }
        })
        .collect()
}

/// The transcript's message lines.
pub fn transcript(workspace: &Path, session: &str) -> Vec<Value> {
    let path = workspace.join(format!(".clawos/sessions/{session}.jsonl"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("transcript line"))
        .filter(|l| l["type"] == "message")
        .map(|l| l["message"].clone())
        .collect()
}

/// The tool_result blocks of a transcript, in order.
pub fn tool_results(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .cloned()
        .collect()
}

/// A chat request body.
pub fn chat(input: &str) -> Value {
    serde_json::json!({"model": "default", "messages": [{"role": "user", "content": input}]})
}
