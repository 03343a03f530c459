//! Token usage as the upstream itself reports it.
//!
//! Anthropic JSON answers carry `usage`; streams carry input (and cache) tokens in
//! `message_start` and the final output count in the last `message_delta`. Server-side
//! tool calls the provider ran (web searches, fetches) are in `usage.server_tool_use`.
//! The SSE parser is incremental: chunks may split lines anywhere.

use serde_json::Value;

/// Tokens charged for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Server-side tool calls the provider ran for this request (the sum of
    /// `usage.server_tool_use`: web searches, web fetches, ...). Not tokens.
    pub server_tool_requests: u64,
}

/// The sum of the counters in a `server_tool_use` object.
fn server_tool_requests(u: &Value) -> u64 {
    u.get("server_tool_use")
        .and_then(Value::as_object)
        .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
}

impl Usage {
    /// Reads an Anthropic `usage` object (missing fields count as 0).
    pub fn from_anthropic(u: &Value) -> Self {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        Self {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
            server_tool_requests: server_tool_requests(u),
        }
    }

    /// All tokens, for per-minute and per-day budgets.
    pub fn total(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
    }
}

/// Incremental reader of an Anthropic SSE stream's usage.
#[derive(Debug, Default)]
pub struct SseUsage {
    partial: Vec<u8>,
    pub usage: Usage,
    /// Whether `message_stop` was seen (the stream ended properly).
    pub complete: bool,
}

impl SseUsage {
    /// Feeds a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let u = Usage::from_anthropic(&v["message"]["usage"]);
                self.usage.input_tokens = u.input_tokens;
                self.usage.cache_creation_input_tokens = u.cache_creation_input_tokens;
                self.usage.cache_read_input_tokens = u.cache_read_input_tokens;
                self.usage.output_tokens = self.usage.output_tokens.max(u.output_tokens);
                self.usage.server_tool_requests = u.server_tool_requests;
            }
            Some("message_delta") => {
                let u = &v["usage"];
                if let Some(o) = u["output_tokens"].as_u64() {
                    // Cumulative: the last delta carries the final count.
                    self.usage.output_tokens = o;
                }
                // Also cumulative; with server tools the input grows by what they
                // returned, and the delta says so.
                if let Some(i) = u["input_tokens"].as_u64() {
                    self.usage.input_tokens = self.usage.input_tokens.max(i);
                }
                let s = server_tool_requests(u);
                if s > 0 {
                    self.usage.server_tool_requests = s;
                }
            }
            Some("message_stop") => self.complete = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":3}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn stream_usage_is_read_across_any_chunking() {
        for size in [1, 2, 7, 64, STREAM.len()] {
            let mut p = SseUsage::default();
            for c in STREAM.as_bytes().chunks(size) {
                p.feed(c);
            }
            assert_eq!(
                p.usage,
                Usage {
                    input_tokens: 25,
                    output_tokens: 15,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 3,
                    server_tool_requests: 0,
                },
                "chunk size {size}"
            );
            assert!(p.complete);
        }
    }

    #[test]
    fn server_tool_use_is_counted_from_json_and_streams() {
        let u = Usage::from_anthropic(&serde_json::json!({"input_tokens": 5, "output_tokens": 2,
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1}}));
        assert_eq!(u.server_tool_requests, 3);
        assert_eq!(u.total(), 7, "server tool calls are not tokens");
        let mut p = SseUsage::default();
        p.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n");
        p.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":900,\"output_tokens\":9,\"server_tool_use\":{\"web_search_requests\":1}}}\n");
        assert_eq!(
            (
                p.usage.input_tokens,
                p.usage.output_tokens,
                p.usage.server_tool_requests
            ),
            (900, 9, 1)
        );
    }

    #[test]
    fn a_cut_stream_is_incomplete_but_keeps_what_it_counted() {
        let mut p = SseUsage::default();
        p.feed(&STREAM.as_bytes()[..STREAM.find("event: message_delta").expect("delta")]);
        assert!(!p.complete);
        assert_eq!(p.usage.input_tokens, 25);
        assert_eq!(p.usage.output_tokens, 1);
    }
}

/// OpenAI's `usage` object (`prompt_tokens`, `completion_tokens`, cached prompt tokens).
pub fn from_openai(u: &Value) -> Usage {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    Usage {
        input_tokens: n(&u["prompt_tokens"]),
        output_tokens: n(&u["completion_tokens"]),
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: n(&u["prompt_tokens_details"]["cached_tokens"]),
        server_tool_requests: 0,
    }
}

/// Incremental reader of an OpenAI chat-completions stream: usage from the final
/// `include_usage` chunk, completion from `data: [DONE]`. The proxy always asks the
/// upstream for usage; when the client did not, that chunk is removed from what the
/// client sees (a chunk with no `choices` would surprise it).
#[derive(Debug, Default)]
pub struct OpenAiSse {
    pending: Vec<u8>,
    pub usage: Usage,
    pub complete: bool,
    /// Pass the usage chunk on to the client.
    pub client_wants_usage: bool,
}

impl OpenAiSse {
    /// A parser; `client_wants_usage` keeps the usage chunk in what the client sees.
    pub fn new(client_wants_usage: bool) -> Self {
        Self {
            client_wants_usage,
            ..Self::default()
        }
    }

    /// Feeds a chunk; returns the bytes to forward (whole events only).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            if self.event(&event) {
                out.extend_from_slice(&event);
            }
        }
        out
    }

    /// What remains at the end of the stream (an unterminated last event).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Records what the event says; returns whether the client gets it.
    fn event(&mut self, event: &[u8]) -> bool {
        let Some(data) = event
            .split(|&b| b == b'\n')
            .find_map(|l| l.strip_prefix(b"data:"))
        else {
            return true;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.complete = true;
            return true;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return true;
        };
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            self.usage = from_openai(&v["usage"]);
            let usage_only = v["choices"].as_array().is_some_and(Vec::is_empty);
            return self.client_wants_usage || !usage_only;
        }
        true
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod openai_tests {
    use super::*;

    const STREAM: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn usage_is_counted_and_hidden_unless_asked_for() {
        for wants in [false, true] {
            for size in [1, 5, 64, STREAM.len()] {
                let mut p = OpenAiSse::new(wants);
                let mut out = Vec::new();
                for c in STREAM.as_bytes().chunks(size) {
                    out.extend(p.feed(c));
                }
                out.extend(p.finish());
                assert!(p.complete);
                assert_eq!(
                    (
                        p.usage.input_tokens,
                        p.usage.output_tokens,
                        p.usage.cache_read_input_tokens
                    ),
                    (9, 2, 4)
                );
                let text = String::from_utf8(out).expect("utf8");
                assert_eq!(text.contains("prompt_tokens"), wants, "size {size}");
                assert!(text.ends_with("data: [DONE]\n\n"));
            }
        }
    }
}
