//! The server half of the wire conventions in `clawos_api`: every request gets an id
//! ([`request_id`] middleware), every error leaves as one [`ErrorResponse`] body, and
//! routes are mounted from the API crates' route tables ([`RouterExt::at`]).

use axum::extract::Request;
use axum::handler::Handler;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodFilter;
use axum::{Json, Router};
use clawos_api::{ErrorBody, ErrorDetail, REQUEST_ID_HEADER, Route, RouteMethod};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served, or `""` outside a request.
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// Middleware: takes the client's `x-request-id` when it is well formed (16–64
/// characters of `[A-Za-z0-9_-]`), otherwise makes one; serves the request with it in
/// scope (errors and logs carry it) and returns it on the answer.
pub async fn request_id(req: Request, next: Next) -> Response {
    let id = client_request_id(&req).unwrap_or_else(new_request_id);
    serve_with_id(id, req, next).await
}

/// The `x-request-id` a client sent, as [`server_request_id`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequestId(pub String);

/// Middleware for a service whose request ids are evidence (the control plane's audit
/// trail): the id is always the server's own, so no client can make two records share
/// one; a well-formed client `x-request-id` is kept beside it as a
/// [`ClientRequestId`] request extension.
pub async fn server_request_id(mut req: Request, next: Next) -> Response {
    if let Some(theirs) = client_request_id(&req) {
        req.extensions_mut().insert(ClientRequestId(theirs));
    }
    serve_with_id(new_request_id(), req, next).await
}

/// A well-formed client `x-request-id`: 16–64 characters of `[A-Za-z0-9_-]`.
fn client_request_id(req: &Request) -> Option<String> {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (16..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
}

async fn serve_with_id(id: String, req: Request, next: Next) -> Response {
    let span = tracing::debug_span!("request", request_id = %id);
    let mut resp = REQUEST_ID
        .scope(
            id.clone(),
            tracing::Instrument::instrument(next.run(req), span),
        )
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// 16 random bytes as hex.
fn new_request_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: ids need only be unique, not secret.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = n.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One error as it leaves any ClawOS API: status, machine-readable code, message. Each
/// daemon maps its domain errors to this in one place (`impl From<DomainError> for
/// ErrorResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ErrorResponse {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            clawos_api::code::INVALID_REQUEST,
            message,
        )
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            clawos_api::code::UNAUTHORIZED,
            message,
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, clawos_api::code::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            clawos_api::code::INTERNAL,
            message,
        )
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                request_id: current_request_id(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// How long a stopping daemon waits for requests in flight before it exits anyway.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` until `shutdown` resolves, then stops accepting and lets requests in
/// flight finish, for at most `drain`: a client that never finishes (a stuck stream)
/// cannot keep a daemon from stopping.
///
/// `app` is a `Router`, or what `Router::into_make_service_with_connect_info` makes
/// (the bounds are axum's own for a served make-service).
pub async fn serve<L, M, S>(
    listener: L,
    app: M,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: std::time::Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    M: for<'a> tower_service::Service<
            axum::serve::IncomingStream<'a, L>,
            Error = std::convert::Infallible,
            Response = S,
        > + Send
        + 'static,
    for<'a> <M as tower_service::Service<axum::serve::IncomingStream<'a, L>>>::Future: Send,
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served,
        () = async {
            if stopping_rx.await.is_err() {
                // The server ended on its own; `served` answers.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(drain_secs = drain.as_secs(), "requests still in flight after the drain timeout; exiting without them");
            Ok(())
        }
    }
}

/// The answer to a route no API has.
pub async fn no_such_route() -> ErrorResponse {
    ErrorResponse::not_found("no such route")
}

/// Mounting a [`Route`] of an API crate's route table, so the daemon takes path and
/// method from the same constant its typed client uses.
pub trait RouterExt<S> {
    /// Serves `route` (its path, its method) with `handler`. Routes sharing a path
    /// (`GET` and `POST /v1/vms`) merge.
    #[must_use]
    fn at<H, T>(self, route: Route, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static;
}

impl<S: Clone + Send + Sync + 'static> RouterExt<S> for Router<S> {
    fn at<H, T>(self, route: Route, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let filter = match route.method {
            RouteMethod::Get => MethodFilter::GET,
            RouteMethod::Post => MethodFilter::POST,
            RouteMethod::Put => MethodFilter::PUT,
            RouteMethod::Delete => MethodFilter::DELETE,
        };
        self.route(route.path, axum::routing::on(filter, handler))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn fails() -> ErrorResponse {
        ErrorResponse::new(StatusCode::CONFLICT, "conflict", "busy")
    }

    async fn call(app: Router, id: Option<&str>) -> (StatusCode, Option<String>, ErrorBody) {
        let mut req = Request::builder().uri("/x");
        if let Some(id) = id {
            req = req.header(REQUEST_ID_HEADER, id);
        }
        let resp = app
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("answer");
        let status = resp.status();
        let header = resp
            .headers()
            .get(REQUEST_ID_HEADER)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        (
            status,
            header,
            serde_json::from_slice(&bytes).expect("error body"),
        )
    }

    #[tokio::test]
    async fn errors_carry_the_request_id_given_or_made() {
        let app = Router::new()
            .route("/x", get(fails))
            .layer(axum::middleware::from_fn(request_id));
        let (status, header, body) = call(app.clone(), Some("client-chosen-id-0001")).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(header.as_deref(), Some("client-chosen-id-0001"));
        assert_eq!(body.error.request_id, "client-chosen-id-0001");
        assert_eq!(body.error.code, "conflict");
        // A malformed id (a header injection attempt, too short) is replaced.
        let (_, header, body) = call(app, Some("x")).await;
        let made = header.expect("an id is made");
        assert_eq!(made.len(), 32);
        assert_eq!(body.error.request_id, made);
    }
}
