//! One request's exchange with its upstream, run to its end in its own task: the
//! answer passed through (a JSON body whole, an SSE stream chunk by chunk, unbuffered),
//! the usage the upstream reported read out of it, and the request settled and
//! recorded whatever the client does.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Proxy, Slot, error_for};
use crate::config::ApiKind;
use crate::ledger::Record;
use crate::request::Endpoint;
use crate::usage::{OpenAiSse, SseUsage, Usage, from_openai};

/// Reads usage out of a stream, in either API's event format.
enum StreamParser {
    Anthropic(SseUsage),
    Openai(OpenAiSse),
}

impl StreamParser {
    /// Returns the bytes to forward to the client.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Self::Anthropic(p) => {
                p.feed(&chunk);
                chunk
            }
            Self::Openai(p) => Bytes::from(p.feed(&chunk)),
        }
    }
    fn finish(&mut self) -> Bytes {
        match self {
            Self::Anthropic(_) => Bytes::new(),
            Self::Openai(p) => Bytes::from(p.finish()),
        }
    }
    fn usage(&self) -> Usage {
        match self {
            Self::Anthropic(p) => p.usage,
            Self::Openai(p) => p.usage,
        }
    }
    fn complete(&self) -> bool {
        match self {
            Self::Anthropic(p) => p.complete,
            Self::Openai(p) => p.complete,
        }
    }
    fn error_event(&self, message: &str) -> Bytes {
        Bytes::from(match self {
            Self::Anthropic(_) => {
                let ev = json!({ "type": "error", "error": { "type": "api_error", "message": message } });
                format!("event: error\ndata: {ev}\n\n")
            }
            Self::Openai(_) => {
                let ev = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": null } });
                format!("data: {ev}\n\n")
            }
        })
    }
}

/// One request's exchange with its upstream, run to its end in its own task.
pub(super) struct Exchange {
    pub(super) p: Arc<Proxy>,
    pub(super) ep: Endpoint,
    pub(super) upstream: String,
    pub(super) client_wants_usage: bool,
    pub(super) record: Record,
    pub(super) slot: Slot,
    pub(super) started: Instant,
    pub(super) id: String,
}

impl Exchange {
    fn fail(mut self, status: StatusCode, kind: &str, log: String, message: &str) -> Response {
        self.record.status = status.as_u16();
        self.record.error = Some(log);
        self.record.latency_ms = self.started.elapsed().as_millis() as u64;
        self.p.finish(self.record, self.slot);
        error_for(self.ep.api(), status, kind, message)
    }

    fn with_id(&self, mut out: Response) -> Response {
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            out.headers_mut().insert("request-id", v);
        }
        out
    }

    pub(super) async fn run(
        mut self,
        req: reqwest::RequestBuilder,
        answer: tokio::sync::oneshot::Sender<Response>,
    ) {
        let api = self.ep.api();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let (status, kind) = if e.is_timeout() {
                    (StatusCode::GATEWAY_TIMEOUT, "timeout_error")
                } else {
                    (StatusCode::BAD_GATEWAY, "api_error")
                };
                let msg = format!("upstream {} unreachable", self.upstream);
                let log = format!("upstream {}: {e}", self.upstream);
                let _ = answer.send(self.fail(status, kind, log, &msg));
                return;
            }
        };
        if resp.status().is_redirection() {
            // Never followed: the host's key goes to the configured URL and nowhere else.
            let code = resp.status().as_u16();
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            let log = format!(
                "upstream {} answered a {code} redirect to {location:?}; redirects are not followed",
                self.upstream
            );
            let msg = format!(
                "upstream {} answered a redirect ({code}); the proxy does not follow redirects",
                self.upstream
            );
            let _ = answer.send(self.fail(StatusCode::BAD_GATEWAY, "api_error", log, &msg));
            return;
        }
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        self.record.status = status.as_u16();
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    let log = format!("upstream body: {e}");
                    let r = self.fail(
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        log,
                        "upstream answer was cut off",
                    );
                    let _ = answer.send(r);
                    return;
                }
            };
            if self.ep != Endpoint::CountTokens
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
            {
                self.record.usage = match api {
                    ApiKind::Anthropic => Usage::from_anthropic(&v["usage"]),
                    ApiKind::Openai => from_openai(&v["usage"]),
                };
            }
            self.record.latency_ms = self.started.elapsed().as_millis() as u64;
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let out = self.with_id(out);
            // Settled before the client has the answer, so its next request finds the
            // slot and the budget free.
            self.p.finish(self.record, self.slot);
            let _ = answer.send(out);
            return;
        }
        // Stream: read the upstream to its end whatever the client does, so usage is
        // never lost; the client gets chunks as they arrive, unbuffered.
        let mut parser = match api {
            ApiKind::Anthropic => StreamParser::Anthropic(SseUsage::default()),
            ApiKind::Openai => StreamParser::Openai(OpenAiSse::new(self.client_wants_usage)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let mut out = Response::new(Body::from_stream(tokio_stream_from(rx)));
        *out.status_mut() = status;
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        out.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let out = self.with_id(out);
        let mut client_gone = answer.send(out).is_err();
        let mut upstream = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(self.p.upstream_timeout, upstream.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    self.record.error = Some(format!(
                        "upstream stream stalled for {} s",
                        self.p.upstream_timeout.as_secs()
                    ));
                    break;
                }
            };
            match chunk {
                Ok(b) => {
                    let out = parser.feed(b);
                    if !client_gone && !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                        client_gone = true;
                    }
                }
                Err(e) => {
                    self.record.error = Some(format!("upstream stream broke: {e}"));
                    break;
                }
            }
        }
        let rest = parser.finish();
        if !client_gone && !rest.is_empty() {
            let _ = tx.send(Ok(rest)).await;
        }
        if !parser.complete() && self.record.error.is_none() {
            self.record.error = Some("upstream stream ended before its end marker".into());
        }
        if let Some(err) = &self.record.error
            && !client_gone
        {
            let _ = tx.send(Ok(parser.error_event(err))).await;
        }
        if client_gone && self.record.error.is_none() {
            self.record.error = Some("client disconnected; upstream read to the end".into());
        }
        self.record.usage = parser.usage();
        self.record.latency_ms = self.started.elapsed().as_millis() as u64;
        // Settled before the client sees the end of the stream.
        self.p.finish(self.record, self.slot);
        drop(tx);
    }
}

/// A receiver as a stream.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
