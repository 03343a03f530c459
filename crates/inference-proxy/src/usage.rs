//! Token usage as the upstream itself reports it.
//!
//! Anthropic JSON answers carry `usage`; streams carry input (and cache) tokens in
//! `message_start` and the final output count in the last `message_delta`. The SSE
//! parser is incremental: chunks may split lines anywhere.

use serde_json::Value;

/// Tokens charged for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
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
            }
            Some("message_delta") => {
                if let Some(o) = v["usage"]["output_tokens"].as_u64() {
                    // Cumulative: the last delta carries the final count.
                    self.usage.output_tokens = o;
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
                    cache_read_input_tokens: 3
                },
                "chunk size {size}"
            );
            assert!(p.complete);
        }
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
