//! The Anthropic Messages API wire format: the answer to a turn as one JSON message or
//! as the SSE event sequence the real API streams, and the deterministic token counts
//! the stand-in reports in `usage` (so tests can assert a ledger exactly).

use serde_json::{Value, json};

use crate::script::Turn;

/// Whitespace-separated words: the stand-in's measure of text in tokens.
fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// A JSON value in tokens: its compact serialisation's length in bytes / 4 (rounded
/// down), the rule of thumb for JSON.
fn json_tokens(v: &Value) -> u64 {
    v.to_string().len() as u64 / 4
}

/// Words of a `content` or `system` field: a string, or an array of blocks whose
/// `text` blocks count by words, `tool_result` blocks by their own content (a string
/// or text blocks) and `tool_use` blocks by [`json_tokens`] of their input; other
/// blocks (images, documents) count nothing.
fn content_tokens(content: &Value) -> u64 {
    match content {
        Value::String(s) => words(s),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b["type"].as_str() {
                Some("text") => b["text"].as_str().map_or(0, words),
                Some("tool_result") => content_tokens(&b["content"]),
                Some("tool_use") => json_tokens(&b["input"]),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// `usage.input_tokens` (and `count_tokens`' answer) for a request body: the words of
/// `system` and of every message's text and tool results, plus the JSON size / 4 of
/// earlier `tool_use` inputs; at least 1. Tool definitions are not counted.
pub fn input_tokens(req: &Value) -> u64 {
    let messages: u64 = req["messages"]
        .as_array()
        .map(|ms| ms.iter().map(|m| content_tokens(&m["content"])).sum())
        .unwrap_or(0);
    (content_tokens(&req["system"]) + messages).max(1)
}

/// `usage.output_tokens` for an answer: the words of its text plus the JSON size / 4
/// of each tool call's input; at least 1.
pub fn output_tokens(turn: &Turn) -> u64 {
    let text = turn.text.as_deref().map_or(0, words);
    let calls: u64 = turn
        .tool_use
        .iter()
        .map(|c| json_tokens(&Value::Object(c.input.clone())))
        .sum();
    (text + calls).max(1)
}

/// The `id` of the `call`-th (from 0) tool_use block of the answer at `turn_index`:
/// unique within a conversation, and the same every time the turn is played, so a
/// resumed transcript's `tool_result`s still match.
pub fn tool_use_id(turn_index: usize, call: usize) -> String {
    format!("toolu_scripted_{turn_index:02}_{call:02}")
}

/// `stop_reason`: `tool_use` when the answer calls a tool (the client must run it and
/// send the result back), `end_turn` otherwise.
pub fn stop_reason(turn: &Turn) -> &'static str {
    if turn.tool_use.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    }
}

/// The content blocks: the text first, then the tool calls, as Claude orders them.
fn blocks(turn: &Turn, turn_index: usize) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(text) = &turn.text {
        out.push(json!({"type": "text", "text": text}));
    }
    for (c, call) in turn.tool_use.iter().enumerate() {
        out.push(json!({
            "type": "tool_use", "id": tool_use_id(turn_index, c),
            "name": call.name, "input": call.input,
        }));
    }
    out
}

/// What every answer needs to say besides the turn.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    /// `msg_…`.
    pub id: &'a str,
    /// The request's `model`, echoed like the real API does.
    pub model: &'a str,
    /// The turn's index: the number of assistant messages in the request.
    pub turn_index: usize,
    pub input_tokens: u64,
}

/// The non-streaming answer.
pub fn message(a: &Answer<'_>, turn: &Turn) -> Value {
    json!({
        "id": a.id, "type": "message", "role": "assistant", "model": a.model,
        "content": blocks(turn, a.turn_index),
        "stop_reason": stop_reason(turn), "stop_sequence": null,
        "usage": {"input_tokens": a.input_tokens, "output_tokens": output_tokens(turn)},
    })
}

/// The streamed answer, as SSE frames (`event: <type>\ndata: <json>\n\n`) in the real
/// API's order: `message_start` (empty content, input tokens), `ping`, then per block
/// `content_block_start`, its deltas and `content_block_stop`, then `message_delta`
/// (stop reason, output tokens) and `message_stop`. Text arrives in a few
/// `text_delta`s split at word starts; a tool call's input as `input_json_delta`
/// pieces of its JSON, led by an empty one as the real API does, which a client must
/// concatenate before parsing.
pub fn stream_frames(a: &Answer<'_>, turn: &Turn) -> Vec<String> {
    let mut events: Vec<Value> = vec![
        json!({"type": "message_start", "message": {
            "id": a.id, "type": "message", "role": "assistant", "model": a.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": a.input_tokens, "output_tokens": 1},
        }}),
        json!({"type": "ping"}),
    ];
    let mut index = 0;
    if let Some(text) = &turn.text {
        events.push(json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "text", "text": ""}}));
        for piece in text_pieces(text, 4) {
            events.push(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": piece}}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    for (c, call) in turn.tool_use.iter().enumerate() {
        events.push(json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": tool_use_id(a.turn_index, c),
                "name": call.name, "input": {}}}));
        let input = Value::Object(call.input.clone()).to_string();
        for piece in std::iter::once("").chain(json_pieces(&input, 3)) {
            events.push(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    events.push(json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason(turn), "stop_sequence": null},
        "usage": {"output_tokens": output_tokens(turn)}}));
    events.push(json!({"type": "message_stop"}));
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect()
}

/// `text` in at most `max` pieces, cut only where a word starts; concatenated they are
/// `text` exactly.
fn text_pieces(text: &str, max: usize) -> Vec<&str> {
    let mut starts = Vec::new();
    let mut prev_space = false;
    for (i, ch) in text.char_indices() {
        if i > 0 && prev_space && !ch.is_whitespace() {
            starts.push(i);
        }
        prev_space = ch.is_whitespace();
    }
    let words = starts.len() + 1;
    let groups = max.clamp(1, words);
    // Piece k begins at word k*words/groups: strictly increasing because groups <= words.
    let cuts = (1..groups).map(|k| starts[k * words / groups - 1]);
    split_at_all(text, cuts)
}

/// `json` in at most `max` non-empty pieces of about equal size, cut at character
/// boundaries (anywhere else, even inside a string, as the real API does).
fn json_pieces(json: &str, max: usize) -> Vec<&str> {
    let max = max.max(1);
    let mut cuts = Vec::new();
    for k in 1..max {
        let mut at = k * json.len() / max;
        while !json.is_char_boundary(at) {
            at += 1;
        }
        if at > cuts.last().copied().unwrap_or(0) && at < json.len() {
            cuts.push(at);
        }
    }
    split_at_all(json, cuts)
}

/// `s` cut at the increasing byte offsets `cuts`.
fn split_at_all(s: &str, cuts: impl IntoIterator<Item = usize>) -> Vec<&str> {
    let mut out = Vec::new();
    let mut from = 0;
    for at in cuts {
        out.push(&s[from..at]);
        from = at;
    }
    out.push(&s[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ToolCall;

    #[test]
    fn text_is_cut_at_word_starts_and_loses_nothing() {
        for (text, max) in [
            ("I wrote hello.txt in the workspace.", 4),
            ("one", 4),
            ("two words", 4),
            ("  leading and trailing  ", 3),
            ("a b c d e f g h i j", 4),
            ("héllo wörld ünïcode ✓ done", 4),
            ("line\nbreaks\tand tabs", 2),
        ] {
            let pieces = text_pieces(text, max);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.len() <= max, "{pieces:?}");
            assert!(pieces.iter().all(|p| !p.is_empty()), "{pieces:?}");
            for p in &pieces[1..] {
                assert!(!p.starts_with(char::is_whitespace), "{pieces:?}");
            }
        }
        assert_eq!(
            text_pieces("a b c d e f g h", 4),
            ["a b ", "c d ", "e f ", "g h"]
        );
    }

    #[test]
    fn json_is_cut_into_nonempty_pieces_at_char_boundaries() {
        for json in [
            "{}",
            "{\"a\":1}",
            r#"{"path":"héllo✓.txt","content":"x"}"#,
            "{\"k\":\"✓✓✓\"}",
        ] {
            for max in 1..6 {
                let pieces = json_pieces(json, max);
                assert_eq!(pieces.concat(), json);
                assert!(pieces.len() <= max);
                assert!(pieces.iter().all(|p| !p.is_empty()), "{pieces:?}");
            }
        }
    }

    #[test]
    fn token_counts_are_the_documented_ones() {
        let req = json!({
            "system": "be brief",
            "messages": [
                {"role": "user", "content": "please write a file"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "sure"},
                    {"type": "tool_use", "id": "t", "name": "w", "input": {"path": "a"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "ok done"},
                    {"type": "tool_result", "tool_use_id": "u", "content": [{"type": "text", "text": "three more words"}]},
                    {"type": "image", "source": {}},
                ]},
            ],
        });
        // 2 (system) + 4 + 1 + len({"path":"a"})=12/4=3 + 2 + 3
        assert_eq!(input_tokens(&req), 15);
        assert_eq!(input_tokens(&json!({"messages": []})), 1);
        let mut input = serde_json::Map::new();
        input.insert("path".into(), json!("hello.txt"));
        let turn = Turn {
            text: Some("two words".into()),
            tool_use: vec![ToolCall {
                name: "w".into(),
                input,
            }],
            ..Turn::default()
        };
        // 2 + len({"path":"hello.txt"})=20/4=5
        assert_eq!(output_tokens(&turn), 7);
        assert_eq!(
            output_tokens(&Turn {
                text: Some(" ".into()),
                ..Turn::default()
            }),
            1
        );
    }
}
