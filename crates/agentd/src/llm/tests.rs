use super::*;

#[test]
fn endpoints() {
    let e = Endpoint::parse("http://127.0.0.1:11435").expect("parse");
    assert_eq!(e.authority, "127.0.0.1:11435");
    assert_eq!(e.messages_path, "/v1/messages");
    let e = Endpoint::parse("http://relay/anthropic/").expect("parse");
    assert_eq!(e.authority, "relay:80");
    assert_eq!(e.messages_path, "/anthropic/v1/messages");
    let e = Endpoint::parse("http://[::1]").expect("parse");
    assert_eq!(e.authority, "[::1]:80");
    assert!(Endpoint::parse("https://api.anthropic.com").is_err());
    assert!(Endpoint::parse("http://").is_err());
    assert!(Endpoint::parse("http://h/?x").is_err());
}

fn assemble(sse: &str) -> (Result<ModelTurn, ModelError>, String) {
    let mut text = String::new();
    let mut on_text = |t: &str| text.push_str(t);
    let mut p = SseParser::default();
    let mut a = Assembler::default();
    // Feed in small pieces: events split across reads must reassemble.
    let mut result = Err(ModelError::Protocol("no message_stop".into()));
    'outer: for piece in sse.as_bytes().chunks(7) {
        match p.feed(piece) {
            Ok(events) => {
                for (ev, data) in events {
                    if let Err(e) = a.on_event(&ev, &data, &mut on_text) {
                        result = Err(e);
                        break 'outer;
                    }
                    if a.finished {
                        result = std::mem::take(&mut a).finish();
                        break 'outer;
                    }
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    (result, text)
}

#[test]
fn assembles_text_and_tool_use() {
    let sse = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\r\n\r\n\
            event: ping\ndata: {\"type\": \"ping\"}\n\n\
            : a comment\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n\
            event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"bash\",\"input\":{}}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"comm\"}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"and\\\": \\\"ls\\\"}\"}}\n\n\
            event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":42}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let (turn, text) = assemble(sse);
    let turn = turn.expect("assembled");
    assert_eq!(text, "Hello");
    assert_eq!(turn.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(turn.usage.input, 10);
    assert_eq!(turn.usage.output, 42);
    assert_eq!(
        turn.content,
        vec![
            json!({"type":"text","text":"Hello"}),
            json!({"type":"tool_use","id":"toolu_1","name":"bash","input":{"command":"ls"}}),
        ]
    );
}

#[test]
fn stream_error_event_is_surfaced() {
    let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n\
            event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let (turn, _) = assemble(sse);
    let e = turn.expect_err("error event");
    assert_eq!(
        e.to_string(),
        "the model's stream reported an error (overloaded_error): Overloaded"
    );
}

#[test]
fn bad_tool_json_is_a_protocol_error() {
    let sse = "data: {\"type\":\"message_start\",\"message\":{}}\n\n\
            data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"bash\",\"input\":{}}}\n\n\
            data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{nope\"}}\n\n\
            data: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
    let (turn, _) = assemble(sse);
    assert!(
        turn.expect_err("bad json")
            .to_string()
            .contains("input is not JSON")
    );
}

#[test]
fn refusals_keep_the_endpoints_words() {
    let anthropic =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert_eq!(
        refusal(StatusCode::from_u16(529).expect("status"), anthropic, None).to_string(),
        "model call refused (529 overloaded_error): Overloaded"
    );
    let clawos = br#"{"error":{"code":"rate_limited","message":"token budget exhausted for agent a","request_id":"req_1"}}"#;
    let e = refusal(StatusCode::TOO_MANY_REQUESTS, clawos, Some("30"));
    assert_eq!(e.status(), Some(429));
    assert_eq!(
        e.to_string(),
        "model call refused (429 rate_limited): token budget exhausted for agent a (retry after 30 s) (request req_1)"
    );
    let e = refusal(StatusCode::BAD_GATEWAY, b"upstream down\n", None);
    assert_eq!(
        e.to_string(),
        "model call refused (502 Bad Gateway): upstream down"
    );
    let e = refusal(StatusCode::INTERNAL_SERVER_ERROR, b"", None);
    assert!(e.to_string().ends_with("(empty body)"), "{e}");
}
