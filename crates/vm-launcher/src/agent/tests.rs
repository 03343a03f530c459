use super::*;
use serde_json::json;

fn adapt(body: Value, header: Option<&str>) -> Result<(Value, String), AdaptError> {
    let a = adapt_openclaw_request(&serde_json::to_vec(&body).expect("json"), header, || {
        "0123456789abcdef".to_owned()
    })?;
    Ok((serde_json::from_slice(&a.body).expect("json"), a.session))
}

fn task() -> Value {
    json!({ "messages": [{ "role": "user", "content": "hi" }], "stream": true })
}

fn openclaw(token: Option<&str>) -> Runtime {
    Runtime {
        name: OPENCLAW.into(),
        version: "2026.9.6".into(),
        token: token.map(|t| GatewayToken(t.into())),
    }
}

#[test]
fn a_model_in_the_task_is_refused_and_openclaws_agent_is_asked_for() {
    for asked in ["claude-sonnet-4-5", "gpt-4o", "openclaw/other"] {
        let mut body = task();
        body["model"] = asked.into();
        let e = adapt(body, None).expect_err(asked);
        assert_eq!(e, AdaptError::Model(asked.into()));
        let m = e.to_string();
        assert!(m.contains("clawos vm start --model"), "{m}");
        assert!(m.contains("leave --model out of the task"), "{m}");
    }
    // No model, or the runtime's own (the SDKs' "default"): OpenClaw's agent.
    for model in [
        None,
        Some(json!(null)),
        Some(json!("")),
        Some(json!("default")),
        Some(json!(OPENCLAW_MODEL)),
    ] {
        let mut body = task();
        if let Some(m) = model.clone() {
            body["model"] = m;
        }
        let (out, _) = adapt(body, None).unwrap_or_else(|e| panic!("{model:?}: {e}"));
        assert_eq!(out["model"], OPENCLAW_MODEL, "{model:?}");
        // The rest of the request is kept.
        assert_eq!(out["messages"], task()["messages"]);
        assert_eq!(out["stream"], true);
    }
    let mut body = task();
    body["model"] = json!(7);
    assert!(matches!(adapt(body, None), Err(AdaptError::Malformed(_))));
}

#[test]
fn the_session_in_the_request_becomes_openclaws_session_key() {
    // From the header.
    let (out, session) = adapt(task(), Some("review-1")).expect("adapt");
    assert_eq!(session, "review-1");
    assert_eq!(out["user"], "review-1");
    // From the body (what `clawos agent` and the orchestrator send); the agent
    // API's own fields do not reach OpenClaw.
    let mut body = task();
    body["session"] = "wf-step-a1".into();
    body["tool_events"] = true.into();
    body["user"] = "someone-else".into();
    let (out, session) = adapt(body, None).expect("adapt");
    assert_eq!(session, "wf-step-a1");
    assert_eq!(out["user"], "wf-step-a1");
    assert!(
        out.get("session").is_none() && out.get("tool_events").is_none(),
        "{out}"
    );
    // Both, the same: fine; different: refused.
    let mut body = task();
    body["session"] = "s1".into();
    assert_eq!(adapt(body.clone(), Some("s1")).expect("same").1, "s1");
    assert_eq!(
        adapt(body, Some("s2")).expect_err("differ"),
        AdaptError::SessionsDiffer {
            body: "s1".into(),
            header: "s2".into()
        }
    );
    // Ids the agent API refuses are refused here too.
    for bad in ["../etc", "A", "", &"s".repeat(65)] {
        assert_eq!(
            adapt(task(), Some(bad)).expect_err(bad),
            AdaptError::BadSession(bad.to_owned())
        );
    }
    let mut body = task();
    body["session"] = 3.into();
    assert!(matches!(adapt(body, None), Err(AdaptError::Malformed(_))));
}

#[test]
fn without_a_session_a_new_one_is_made() {
    let (out, session) = adapt(task(), None).expect("adapt");
    assert_eq!(session, "0123456789abcdef");
    assert_eq!(out["user"], "0123456789abcdef");
    // The real generator: agentd's shape, a new one each time.
    let (a, b) = (new_session_id(), new_session_id());
    assert_ne!(a, b);
    for id in [a, b] {
        assert_eq!(id.len(), 16, "{id}");
        assert!(clawos_agentd_api::is_valid_session_id(&id), "{id}");
    }
}

#[test]
fn a_body_that_is_not_a_json_object_is_refused() {
    for bad in [&b"not json"[..], b"[1]", b"\"x\""] {
        let e = adapt_openclaw_request(bad, None, new_session_id).expect_err("bad");
        assert!(matches!(e, AdaptError::Malformed(_)), "{e}");
        assert!(e.to_string().starts_with("malformed agent request"), "{e}");
    }
}

#[test]
fn openclaw_gets_its_token_and_session_key_and_the_session_is_answered() {
    let mut h = HeaderMap::new();
    h.insert(SESSION_HEADER, HeaderValue::from_static("s1"));
    h.insert(TOOL_EVENTS_HEADER, HeaderValue::from_static("off"));
    let body = serde_json::to_vec(&task()).expect("json");
    let p = prepare("a1", &openclaw(Some("t0k3n")), Call::Chat, &h, body.into()).expect("prepare");
    assert_eq!(p.session.as_deref(), Some("s1"));
    assert_eq!(p.headers[OPENCLAW_SESSION_HEADER], "s1");
    let auth = &p.headers[header::AUTHORIZATION];
    assert_eq!(auth, "Bearer t0k3n");
    assert!(auth.is_sensitive());
    assert!(p.headers.get(TOOL_EVENTS_HEADER).is_none());
    let sent: Value = serde_json::from_slice(&p.body).expect("json");
    assert_eq!(
        (sent["model"].as_str(), sent["user"].as_str()),
        (Some(OPENCLAW_MODEL), Some("s1"))
    );
    // The token never shows in what may be logged.
    let shown = format!("{:?}", openclaw(Some("t0k3n")));
    assert!(!shown.contains("t0k3n"), "{shown}");
}

#[test]
fn other_runtimes_get_the_request_unchanged() {
    let mut h = HeaderMap::new();
    h.insert(SESSION_HEADER, HeaderValue::from_static("s1"));
    h.insert(TOOL_EVENTS_HEADER, HeaderValue::from_static("off"));
    let mut body = task();
    body["model"] = "claude-x".into();
    let body = axum::body::Bytes::from(serde_json::to_vec(&body).expect("json"));
    for rt in [
        Runtime::unreported(),
        Runtime {
            name: BUILTIN_RUNTIME.into(),
            version: "0.1.0".into(),
            token: Some(GatewayToken("abc".into())),
        },
    ] {
        let p = prepare("a1", &rt, Call::Chat, &h, body.clone()).expect("prepare");
        assert_eq!(p.body, body);
        assert_eq!(p.session, None);
        assert_eq!(p.headers[SESSION_HEADER], "s1");
        assert_eq!(p.headers[TOOL_EVENTS_HEADER], "off");
        assert!(p.headers.get(OPENCLAW_SESSION_HEADER).is_none());
        let auth = p.headers.get(header::AUTHORIZATION);
        assert_eq!(auth.is_some(), rt.token.is_some(), "{rt:?}");
    }
    let p = prepare(
        "a1",
        &Runtime::unreported(),
        Call::Sessions,
        &HeaderMap::new(),
        axum::body::Bytes::new(),
    )
    .expect("sessions");
    assert!(p.headers.get(header::AUTHORIZATION).is_none());
}

#[test]
fn openclaw_sessions_are_not_listed() {
    let e = prepare(
        "a1",
        &openclaw(Some("t")),
        Call::Sessions,
        &HeaderMap::new(),
        axum::body::Bytes::new(),
    )
    .expect_err("not listed");
    assert!(matches!(e, LauncherError::Conflict(_)), "{e}");
    let m = e.to_string();
    assert!(
        m.contains("/workspace/.openclaw") && m.contains("openclaw"),
        "{m}"
    );
    assert_eq!(ErrorResponse::from(e).status, StatusCode::CONFLICT);
}

#[test]
fn openclaws_answer_is_completed_to_the_agent_apis() {
    let answer = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "openclaw/default",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": null }, "finish_reason": "stop" }],
    });
    let done = complete_openclaw_answer(&serde_json::to_vec(&answer).expect("json"), "s1")
        .expect("completed");
    let c: clawos_agentd_api::ChatCompletion =
        serde_json::from_slice(&done).expect("an agent-API answer");
    assert_eq!(c.session, "s1");
    assert_eq!(c.usage.total_tokens, 0);
    assert_eq!(c.clawos.steps, 0);
    assert_eq!(c.choices[0].message.content, "");
    // What OpenClaw gives is kept.
    let mut answer = answer;
    answer["usage"] = json!({ "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5 });
    answer["choices"][0]["message"]["content"] = "done".into();
    let done = complete_openclaw_answer(&serde_json::to_vec(&answer).expect("json"), "s1")
        .expect("completed");
    let c: clawos_agentd_api::ChatCompletion = serde_json::from_slice(&done).expect("answer");
    assert_eq!(
        (c.usage.total_tokens, c.choices[0].message.content.as_str()),
        (5, "done")
    );
    assert_eq!(complete_openclaw_answer(b"oops", "s1"), None);
}
