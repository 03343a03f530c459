//! A stand-in for the hosted Anthropic Messages API that plays a script of turns from
//! a file. **It is not a model**: it does not read the conversation to decide what to
//! say, it has no knowledge and no judgement; it answers the next scripted turn, in the
//! real API's wire format, so that ClawOS can be tested, and demonstrated offline,
//! without a hosted model, an API key or a network.
//!
//! What it does speak faithfully is the wire format: `POST /v1/messages` answered as
//! one JSON message or, with `"stream": true`, as the real SSE event sequence
//! (`message_start`, `ping`, `content_block_start` / `content_block_delta` /
//! `content_block_stop` per block, `message_delta`, `message_stop`), with `text` and
//! `tool_use` blocks, `stop_reason` and `usage`; `POST /v1/messages/count_tokens`;
//! API-key authentication (`x-api-key`, or `Authorization: Bearer` as recent official
//! SDKs send it); errors in the API's shape
//! (`{"type": "error", "error": {"type": ..., "message": ...}}`). The official SDKs
//! parse it (the crate's tests run the Python SDK against it when it is installed).
//!
//! # The script
//!
//! ```json
//! {"turns": [
//!   {"tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "hi"}}]},
//!   {"text": "I wrote hello.txt.", "expect_tool_result": true}
//! ], "repeat_last": false}
//! ```
//!
//! A turn has `text` (a non-empty string), `tool_use` (an array of
//! `{"name": ..., "input": {...}}`; `input` defaults to `{}`), or both: the text block
//! comes first; with tool calls the answer's `stop_reason` is `tool_use`, otherwise
//! `end_turn`. Optional per turn: `"expect_tool_result": true` answers 400 to a request
//! whose user turn (the user messages since the last assistant message) has no `tool_result` block (a broken tool loop fails loudly
//! instead of being answered), and `"delay_ms": N` waits before answering. Unknown
//! fields are errors, so a typo is not silently ignored. Mistakes are reported at load
//! with their place, turns counted from 1: `turn 2: tool_use without a name (call 1)`.
//!
//! **Which turn answers is stateless**: the turn index is the number of `assistant`
//! messages already in the request. Every conversation plays the script from the
//! start, parallel conversations do not interfere, and a client that resumes a saved
//! transcript gets the next turn. Past the last turn, the last turn again if
//! `repeat_last`, otherwise the text `(the script has no more turns)`
//! ([`NO_MORE_TURNS`]) with `end_turn`. `tool_use` ids are
//! `toolu_scripted_<turn>_<call>`, the same each time a turn is played. `max_tokens` is
//! required, as by the real API, but does not shorten answers.
//!
//! Without a script the binary plays [`DEFAULT_SCRIPT`] (the offline demo): a
//! `write_file` call writing `hello.txt`, then the text "I wrote hello.txt in the
//! workspace.".
//!
//! # Usage
//!
//! Deterministic, so tests can assert a ledger exactly ([`input_tokens`],
//! [`output_tokens`]): `input_tokens` is the number of whitespace-separated words in
//! `system` and in the messages' text and tool results, plus the compact JSON length / 4
//! of earlier `tool_use` inputs, at least 1; `output_tokens` is the words of the turn's
//! text plus the compact JSON length / 4 of each tool input, at least 1.
//!
//! # The record
//!
//! With a record file ([`ScriptedModel::record_to`], `--record`), every request except
//! `GET /healthz`, accepted or not, appends one JSON line, written whole and at once
//! (the file is made 0600: it holds the credentials that arrived):
//!
//! - `path`: the request path;
//! - `x_api_key`, `authorization`, `anthropic_version`: those headers, or null;
//! - `anthropic_beta`: every `anthropic-beta` header value, in order;
//! - `model`, `stream`: from the body, or null;
//! - `turn`: the turn index the request selects (from 0), or null (count_tokens, a
//!   body that is not JSON);
//! - `messages`: how many messages the body had, or null;
//! - `tools`: the names of the tools the body offered, or null;
//! - `tool_results`: the text of each `tool_result` block in the user's turn (the user
//!   messages since the last assistant message).
//!
//! Tests use it to prove what an upstream saw, for instance only the host's key.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use clawos_scripted_model::{Script, ScriptedModel, serve};
//! let script = Script::from_json(r#"{"turns": [{"text": "hello"}]}"#)?;
//! let model = ScriptedModel::new(script).api_key("test-key")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}", listener.local_addr()?);
//! tokio::spawn(serve(listener, model, std::future::pending()));
//! # let _ = url; Ok(()) }
//! ```

mod script;
mod server;
mod wire;

use std::path::PathBuf;

pub use script::{
    DEFAULT_SCRIPT, MAX_DELAY_MS, NO_MORE_TURNS, Script, ScriptError, ToolCall, Turn, TurnProblem,
    default_script,
};
pub use server::{MAX_BODY_BYTES, ScriptedModel, router, serve};
pub use wire::{input_tokens, output_tokens, tool_use_id};

/// Why a stand-in cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the script {path}: {source}")]
    ReadScript {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the script {path} is wrong: {source}")]
    Script { path: PathBuf, source: ScriptError },
    #[error("cannot open the record file {path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key is empty: leave it out to accept any key")]
    EmptyApiKey,
}
