//! What the proxy reads from an agent's request before it forwards it: a JSON object
//! with no key given twice (parsers disagree on which copy wins, so the proxy would
//! check one and the upstream obey the other), the fields whose types decide what the
//! request costs (`stream` a boolean, `max_tokens` a positive integer), and an upper
//! bound on its input tokens for the budget reservation.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::config::ApiKind;

/// The agent-facing endpoints that reach an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/messages` (Anthropic).
    Messages,
    /// `POST /v1/messages/count_tokens` (Anthropic).
    CountTokens,
    /// `POST /v1/chat/completions` (OpenAI-compatible).
    ChatCompletions,
}

impl Endpoint {
    /// The API the endpoint speaks (and answers errors in).
    pub fn api(self) -> ApiKind {
        match self {
            Self::Messages | Self::CountTokens => ApiKind::Anthropic,
            Self::ChatCompletions => ApiKind::Openai,
        }
    }

    /// The `kind` of its ledger rows and audit lines.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
            Self::ChatCompletions => "chat_completions",
        }
    }

    /// The upstream path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Messages => "/v1/messages",
            Self::CountTokens => "/v1/messages/count_tokens",
            Self::ChatCompletions => "/v1/chat/completions",
        }
    }
}

/// A JSON value parsed with duplicate object keys refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses a request body: a JSON object, no key given twice at any depth.
pub fn parse(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Strict>(body) {
        Ok(Strict(v @ Value::Object(_))) => Ok(v),
        Ok(_) => Err("request body must be a JSON object".into()),
        Err(e) => Err(format!("malformed JSON body: {e}")),
    }
}

/// What a request is, as far as admitting and charging it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub model: String,
    pub stream: bool,
    /// The most output tokens the request may produce (`max_tokens`, times `n` choices
    /// on the OpenAI API), if it says.
    pub max_output: Option<u64>,
    /// How many output sequences it asks for (OpenAI's `n`; 1 otherwise).
    pub choices: u64,
    /// An upper bound on its input tokens (see [`input_estimate`]).
    pub input_estimate: u64,
}

/// `field` is absent, or a positive integer.
fn positive_int(v: &Value, field: &str) -> Result<Option<u64>, String> {
    match v.get(field) {
        None => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("{field}: must be a positive integer, got {x}")),
        },
    }
}

/// Checks the fields that decide cost and routing; an `Err` is a 400 message.
pub fn check(ep: Endpoint, v: &Value) -> Result<Shape, String> {
    let model = match v.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(x) => return Err(format!("model: must be a non-empty string, got {x}")),
        None => return Err("model: field required".into()),
    };
    let stream = match v.get("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(x) => return Err(format!("stream: must be a boolean, got {x}")),
    };
    let (max_output, choices) = match ep {
        Endpoint::Messages => match positive_int(v, "max_tokens")? {
            Some(n) => (Some(n), 1),
            None => return Err("max_tokens: field required".into()),
        },
        Endpoint::CountTokens => (positive_int(v, "max_tokens")?, 1),
        Endpoint::ChatCompletions => {
            let a = positive_int(v, "max_tokens")?;
            let b = positive_int(v, "max_completion_tokens")?;
            let n = positive_int(v, "n")?.unwrap_or(1);
            (a.max(b).map(|m| m.saturating_mul(n)), n)
        }
    };
    Ok(Shape {
        model,
        stream: stream && ep != Endpoint::CountTokens,
        max_output,
        choices,
        input_estimate: input_estimate(ep, v),
    })
}

/// Tokens added for each image or document block on top of its bytes: a small file
/// (a tiny PNG scaled up, a compressed PDF page) can cost more tokens than it has bytes.
pub const MEDIA_BLOCK_TOKENS: u64 = 5_000;
/// Tokens added when tools are declared (the provider's hidden tool-use instructions).
pub const TOOLS_OVERHEAD_TOKENS: u64 = 1_000;
/// Tokens added per message (role and turn markers).
pub const PER_MESSAGE_TOKENS: u64 = 4;

/// Bytes of every string in `v` (keys not included) and the number of image and
/// document blocks.
fn text_bytes(v: &Value, media: &mut u64) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(|x| text_bytes(x, media)).sum(),
        Value::Object(o) => {
            if matches!(
                o.get("type").and_then(Value::as_str),
                Some("image" | "document" | "image_url" | "input_audio" | "file")
            ) {
                *media += 1;
            }
            o.values().map(|x| text_bytes(x, media)).sum()
        }
        _ => 0,
    }
}

/// An upper bound on a request's input tokens, without the provider's tokenizer: a
/// token is at least one byte of text, so the UTF-8 bytes of every string in the
/// prompt (system, messages, and tool definitions as JSON, keys included), plus
/// [`PER_MESSAGE_TOKENS`] per message, [`TOOLS_OVERHEAD_TOKENS`] when tools are declared
/// and [`MEDIA_BLOCK_TOKENS`] per image or document. It overestimates text about
/// fourfold; the reservation is replaced by the reported usage when the request ends.
pub fn input_estimate(ep: Endpoint, v: &Value) -> u64 {
    let mut media = 0;
    let messages = &v["messages"];
    let mut n = text_bytes(messages, &mut media)
        + PER_MESSAGE_TOKENS * messages.as_array().map_or(0, |a| a.len() as u64);
    if ep != Endpoint::ChatCompletions {
        n += text_bytes(&v["system"], &mut media);
    }
    let mut tools = false;
    for field in ["tools", "functions", "tool_choice", "response_format"] {
        if let Some(x) = v.get(field).filter(|x| !x.is_null()) {
            n += x.to_string().len() as u64;
            tools |= field != "response_format" && x.as_array().is_none_or(|a| !a.is_empty());
        }
    }
    if tools {
        n += TOOLS_OVERHEAD_TOKENS;
    }
    n + media * MEDIA_BLOCK_TOKENS
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(parse(br#"{"a":1,"b":{"c":[1,{"d":2}]}}"#).is_ok());
        for bad in [
            r#"{"stream":false,"stream":"yes"}"#,
            r#"{"tools":[{"type":"custom","type":"web_search_20250305"}]}"#,
        ] {
            let e = parse(bad.as_bytes()).expect_err(bad);
            assert!(e.contains("duplicate key"), "{e}");
        }
        assert!(parse(b"[1]").is_err());
        assert!(parse(b"{").is_err());
    }

    #[test]
    fn cost_fields_are_strictly_typed() {
        let ok = json!({"model": "m", "max_tokens": 10, "stream": true, "messages": []});
        let s = check(Endpoint::Messages, &ok).expect("ok");
        assert_eq!((s.stream, s.max_output), (true, Some(10)));
        for bad in [
            json!({"model": "m", "max_tokens": 10, "stream": "yes"}),
            json!({"model": "m", "max_tokens": 10, "stream": 1}),
            json!({"model": "m", "max_tokens": 10, "stream": null}),
            json!({"model": "m", "max_tokens": 0}),
            json!({"model": "m", "max_tokens": 1.5}),
            json!({"model": "m", "max_tokens": "10"}),
            json!({"model": "m"}),
            json!({"model": 7, "max_tokens": 1}),
        ] {
            assert!(check(Endpoint::Messages, &bad).is_err(), "{bad}");
        }
        // OpenAI: optional, but typed; n multiplies the output.
        let s = check(
            Endpoint::ChatCompletions,
            &json!({"model": "g", "max_completion_tokens": 100, "n": 3}),
        )
        .expect("ok");
        assert_eq!((s.max_output, s.choices), (Some(300), 3));
        assert_eq!(
            check(Endpoint::ChatCompletions, &json!({"model": "g"}))
                .expect("ok")
                .max_output,
            None
        );
        assert!(check(Endpoint::ChatCompletions, &json!({"model": "g", "n": 0})).is_err());
    }

    #[test]
    fn the_estimate_bounds_text_tokens() {
        let text = "the quick brown fox ".repeat(50);
        let v = json!({"model": "m", "max_tokens": 1, "system": "be brief",
            "messages": [{"role": "user", "content": text}]});
        let e = input_estimate(Endpoint::Messages, &v);
        assert!(e >= text.len() as u64 + 8, "{e}");
        let with_tools = json!({"model": "m", "messages": [],
            "tools": [{"name": "t", "input_schema": {"type": "object"}}]});
        assert!(input_estimate(Endpoint::Messages, &with_tools) > TOOLS_OVERHEAD_TOKENS);
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]});
        assert!(input_estimate(Endpoint::Messages, &image) >= MEDIA_BLOCK_TOKENS);
    }
}
