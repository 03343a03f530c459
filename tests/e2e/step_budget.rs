//! A VM's token budget, end to end without a VM: identity-manager and inference-proxy
//! as real daemons, `clawos-scripted-model` as the upstream. The launcher asks
//! identity-manager for a VM's token with the scope `clawos.budget.total:<N>` when the
//! VM was started with `token_budget: N`; here the test asks for such a token itself,
//! through the identity-manager client, as the launcher does.
//!
//! Shown: calls pass until the 300 tokens are spent (reservations included), then a
//! 429 that names the VM's budget; a request that could never fit is a 400 naming it;
//! the spend is counted from the ledger again after a proxy restart; another agent's
//! token without the scope is unaffected; a malformed budget scope is refused (403),
//! never ignored. Then the token the launcher's own identity holder gets for a VM
//! started with a budget (`clawos_vm_launcher::identity::hold`, as its supervisor
//! calls it) is held to that budget by the proxy.

use std::path::Path;
use std::time::{Duration, Instant};

use clawos_e2e::runtime;
use clawos_e2e::stack::{HostServices, ScriptedModel};
use clawos_identity_manager_api::{IdentityClient, IssueRequest};
use clawos_vm_launcher::config::IdentitySettings;
use clawos_vm_launcher::identity::{VmIdentityClaims, hold};
use clawos_vm_launcher::names::VmName;
use serde_json::{Value, json};

const MODEL: &str = "claude-step";

/// 49 words: `output_tokens` 49 per answer; with the one word of the prompt, 50 tokens
/// charged per call.
fn answer() -> String {
    vec!["done"; 49].join(" ")
}

/// A message asking for at most `max_tokens`: reserved as `max_tokens` + 10 (the
/// proxy's input estimate of `{"role": "user", "content": "hi"}`: 6 bytes + 4 per
/// message).
fn body(max_tokens: u64) -> String {
    json!({"model": MODEL, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

/// `POST /v1/messages` with `token` asking for at most `max_tokens`: status,
/// `retry-after`, body.
async fn post_message(url: &str, token: &str, max_tokens: u64) -> (u16, Option<String>, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", token)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body(max_tokens))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, retry, r.json().await.expect("json"))
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or("").to_owned()
}

/// Tokens charged to `agent` in the proxy's ledger, once it holds `rows` of its rows.
fn charged(state: &Path, agent: &str, rows: usize) -> u64 {
    let db = state.join("proxy/ledger.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Option<(usize, u64)> =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| {
                    c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(charged_tokens), 0) FROM requests WHERE agent = ?1",
                [agent],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
                })
                .ok();
        if let Some((n, tokens)) = got
            && n >= rows
        {
            return tokens;
        }
        assert!(
            Instant::now() < deadline,
            "ledger has {got:?} for {agent}, want {rows} rows"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_token_budget_lets_calls_pass_until_it_is_spent_then_names_itself() {
    let work = tempfile::tempdir().expect("tmp");
    let model = ScriptedModel::start(
        work.path(),
        "upstream",
        &json!({"turns": [{"text": answer()}], "repeat_last": true}),
    )
    .expect("scripted model");
    let state = work.path().join("state");
    // No budget configured on the proxy: only the token's applies.
    let mut host = HostServices::start(&state, &[("scripted", &["claude-*"], &model.url)], &[])
        .expect("identity-manager and inference-proxy");
    let rt = runtime();
    let ids = IdentityClient::with_service_token(
        &host.identity_url,
        &host.service_token().expect("service credential"),
    );
    let issue = |agent: &str, scopes: &[&str]| -> String {
        let req = IssueRequest {
            agent: agent.into(),
            vm_id: format!("{agent}-1700000000"),
            image_root_hash: String::new(),
            audience: "inference-proxy".into(),
            ttl_secs: Some(900),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        rt.block_on(ids.issue(&req)).expect("issue").token
    };
    let call =
        |url: &str, token: &str, max_tokens: u64| rt.block_on(post_message(url, token, max_tokens));

    // What the launcher asks for a VM started with `token_budget: 300`.
    let step = issue("step-a", &["clawos.budget.total:300"]);
    // 70 reserved per call, 50 charged: five fit (250 spent), a sixth would need 70
    // with 50 left.
    for i in 0..5 {
        let (status, _, v) = call(&host.proxy_url, &step, 60);
        assert_eq!(status, 200, "call {i}: {v}");
        assert_eq!(v["usage"]["output_tokens"], 49, "{v}");
    }
    assert_eq!(charged(&state, "step-a", 5), 250);
    let (status, retry, v) = call(&host.proxy_url, &step, 60);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    let m = message(&v);
    assert!(
        m.contains("token budget of this VM (clawos.budget.total 300) exhausted")
            && m.contains("has 50 of its 300 tokens left")
            && m.contains("may cost up to 70 tokens"),
        "{m}"
    );
    assert_eq!(retry.as_deref(), Some("86400"), "it does not come back");
    // What is left is still usable, to the token.
    let (status, _, v) = call(&host.proxy_url, &step, 40);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        charged(&state, "step-a", 6),
        300,
        "spent exactly the budget"
    );
    let (status, _, v) = call(&host.proxy_url, &step, 1);
    assert_eq!(status, 429, "{v}");
    assert!(message(&v).contains("has 0 of its 300 tokens left"), "{v}");
    // A request that could never fit: 400, the budget named.
    let (status, _, v) = call(&host.proxy_url, &step, 400);
    assert_eq!(status, 400, "{v}");
    assert!(
        message(&v)
            .contains("more than the whole token budget of this VM (clawos.budget.total 300)"),
        "{v}"
    );

    // Another agent's token without the scope: as before budgets existed.
    let other = issue("other-b", &[]);
    for i in 0..8 {
        let (status, _, v) = call(&host.proxy_url, &other, 60);
        assert_eq!(status, 200, "other agent, call {i}: {v}");
    }
    assert_eq!(charged(&state, "other-b", 8), 400, "past 300, unaffected");

    // A budget scope the proxy cannot honour is refused, never ignored.
    for bad in ["clawos.budget.total:abc", "clawos.budget.total:0"] {
        let t = issue("step-c", &[bad]);
        let (status, _, v) = call(&host.proxy_url, &t, 60);
        assert_eq!(status, 403, "{bad}: {v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        assert!(
            message(&v).contains(bad) && message(&v).contains("malformed budget scope"),
            "{v}"
        );
    }

    // A restarted proxy counts the spend from its ledger: the budget stays spent, and
    // a fresh token of the same VM (a renewal) carries the same budget.
    host.start_proxy().expect("proxy restart");
    let renewed = issue("step-a", &["clawos.budget.total:300"]);
    let (status, _, v) = call(&host.proxy_url, &renewed, 1);
    assert_eq!(status, 429, "after a restart: {v}");
    assert!(message(&v).contains("clawos.budget.total 300"), "{v}");
    let (status, _, v) = call(&host.proxy_url, &other, 60);
    assert_eq!(status, 200, "{v}");

    // The upstream saw only the calls the budget allowed: 6 + 8 + 1.
    let seen = model
        .requests()
        .iter()
        .filter(|r| r["path"] == "/v1/messages")
        .count();
    assert_eq!(seen, 15);
}

#[test]
fn the_token_the_launcher_holds_for_a_budgeted_vm_is_held_to_its_budget() {
    let work = tempfile::tempdir().expect("tmp");
    let model = ScriptedModel::start(
        work.path(),
        "upstream",
        &json!({"turns": [{"text": answer()}], "repeat_last": true}),
    )
    .expect("scripted model");
    let state = work.path().join("state");
    let host = HostServices::start(&state, &[("scripted", &["claude-*"], &model.url)], &[])
        .expect("identity-manager and inference-proxy");
    let vm_dir = work.path().join("vm");
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    runtime().block_on(async {
        let settings = IdentitySettings {
            url: host.identity_url.clone(),
            service_token_path: state.join("identity/service.token"),
            token_ttl: Duration::from_secs(600),
            llm_audience: "inference-proxy".into(),
            skills_audience: "skill-manager".into(),
        };
        // What the supervisor of a VM started with `token_budget: 120` asks for.
        let (identity, holder) = hold(
            Some(&settings),
            VmIdentityClaims {
                agent: VmName::parse("step-h").expect("name"),
                vm_id: "step-h-1700000000".into(),
                image_root_hash: String::new(),
                token_budget: Some(120),
            },
            &vm_dir,
            clawos_vm_launcher::identity::TokenFor::Llm,
        );
        let held = identity
            .token_within(Duration::from_secs(10))
            .await
            .expect("a token from identity-manager");
        let seen = IdentityClient::with_service_token(
            &host.identity_url,
            &host.service_token().expect("service credential"),
        )
        .introspect(&held.jwt)
        .await
        .expect("introspect");
        assert_eq!(
            seen.scope.as_deref(),
            Some("clawos.budget.total:120"),
            "{seen:?}"
        );
        // 70 reserved, 50 charged per call: two fit, the third is refused by name.
        for i in 0..2 {
            let (status, _, v) = post_message(&host.proxy_url, &held.jwt, 60).await;
            assert_eq!(status, 200, "call {i}: {v}");
        }
        let (status, _, v) = post_message(&host.proxy_url, &held.jwt, 60).await;
        assert_eq!(status, 429, "{v}");
        assert!(
            message(&v).contains("token budget of this VM (clawos.budget.total 120) exhausted"),
            "{v}"
        );
        holder.expect("a holder").release().await;
    });
}
