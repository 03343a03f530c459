//! The REST API (`clawos_orchestrator_api::routes`) over the engine, behind the
//! operator-credential / Host / Origin / body-type guard every daemon uses.

use std::convert::Infallible;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use clawos_orchestrator_api::{
    Approval, ArtifactRef, EventsQuery, RunEvent, RunState, RunStatus, RunSummary, StepStatus,
    SubmitRun, routes,
};
use clawos_service::guard::Guard;
use clawos_service::http::{ErrorResponse, RouterExt};
use clawos_workflow::{EngineError, JournalEvent, RunId};

use crate::{Config, OrchestratorEngine};

/// Largest spec document accepted (the engine refuses larger ones by its own limit too).
const MAX_BODY: usize = 2 << 20;

#[derive(Clone)]
struct AppState {
    engine: OrchestratorEngine,
    metrics: std::sync::Arc<clawos_service::Metrics>,
}

fn engine_error(e: EngineError) -> ErrorResponse {
    use clawos_api::code;
    let msg = e.to_string();
    match e {
        EngineError::Spec(_) | EngineError::Input { .. } | EngineError::TooLarge { .. } => {
            ErrorResponse::invalid(msg)
        }
        EngineError::UnknownRun(_) | EngineError::UnknownStep { .. } => {
            ErrorResponse::not_found(msg)
        }
        EngineError::NotApproval { .. }
        | EngineError::NotWaiting { .. }
        | EngineError::NotRunning { .. } => {
            ErrorResponse::new(StatusCode::CONFLICT, code::CONFLICT, msg)
        }
        EngineError::ShutDown | EngineError::Stalled { .. } => {
            ErrorResponse::new(StatusCode::SERVICE_UNAVAILABLE, code::UNAVAILABLE, msg)
        }
        other => {
            // The journal's or store's cause is for the log, not the caller.
            tracing::error!(error = ?other, "engine failure");
            ErrorResponse::internal(msg)
        }
    }
}

fn run_id(s: &str) -> Result<RunId, ErrorResponse> {
    s.parse()
        .map_err(|e: clawos_workflow::BadRunId| ErrorResponse::not_found(e.to_string()))
}

fn state_of(s: clawos_workflow::RunState) -> RunState {
    use clawos_workflow::RunState as S;
    match s {
        S::Running => RunState::Running,
        S::Succeeded => RunState::Succeeded,
        S::Failed => RunState::Failed,
        S::Rejected => RunState::Rejected,
        S::Cancelled => RunState::Cancelled,
    }
}

fn summary(s: &clawos_workflow::RunSummary) -> RunSummary {
    RunSummary {
        id: s.run.to_string(),
        workflow: s.name.clone(),
        state: state_of(s.state),
        created_ms: s.created_ms,
        finished_ms: s.finished_ms,
        reason: s.reason.clone(),
    }
}

fn step_state(s: clawos_workflow::StepState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The wire view of a run: a row per step, and one per item of a map step.
pub fn status_view(s: &clawos_workflow::RunStatus) -> RunStatus {
    let mut steps = Vec::new();
    for st in &s.steps {
        steps.push(StepStatus {
            id: st.id.clone(),
            kind: st.kind.clone(),
            state: step_state(st.state),
            attempts: st.attempts,
            started_ms: st.started_ms,
            finished_ms: st.finished_ms,
            duration_ms: st.duration_ms,
            tokens: st.tokens,
            output: (!st.output.is_empty()).then(|| st.output.clone()),
            error: st.error.clone().or_else(|| st.skip_reason.clone()),
            vm: st.vm.clone(),
        });
        for it in &st.items {
            steps.push(StepStatus {
                id: format!("{}[{}]", st.id, it.index),
                kind: "item".into(),
                state: step_state(it.state),
                attempts: it.attempts,
                started_ms: it.started_ms,
                finished_ms: it.finished_ms,
                duration_ms: it
                    .started_ms
                    .zip(it.finished_ms)
                    .map(|(a, b)| b.saturating_sub(a)),
                tokens: it.tokens,
                output: (!it.output.is_empty()).then(|| it.output.clone()),
                error: it.error.clone(),
                vm: it.vm.clone(),
            });
        }
    }
    RunStatus {
        run: RunSummary {
            id: s.run.to_string(),
            workflow: s.name.clone(),
            state: state_of(s.state),
            created_ms: s.created_ms,
            finished_ms: s.finished_ms,
            reason: s.reason.clone(),
        },
        steps,
    }
}

fn event_view(e: &JournalEvent) -> RunEvent {
    RunEvent {
        seq: e.seq,
        run: e.run.to_string(),
        time_ms: e.time_ms,
        kind: e.event.kind().to_owned(),
        step: e.event.step().map(str::to_owned),
        detail: serde_json::to_value(&e.event).unwrap_or_default(),
    }
}

async fn submit(
    State(a): State<AppState>,
    body: Result<Json<SubmitRun>, JsonRejection>,
) -> Result<(StatusCode, Json<RunSummary>), ErrorResponse> {
    let Json(req) =
        body.map_err(|e| ErrorResponse::invalid(format!("request body: {}", e.body_text())))?;
    let run = a
        .engine
        .submit(&req.spec, req.inputs)
        .await
        .map_err(engine_error)?;
    let status = a.engine.status(&run).map_err(engine_error)?;
    tracing::info!(run = %run, workflow = %status.name, "run submitted");
    Ok((StatusCode::CREATED, Json(status_view(&status).run)))
}

async fn list(State(a): State<AppState>) -> Json<Vec<RunSummary>> {
    let mut runs: Vec<RunSummary> = a.engine.list().iter().map(summary).collect();
    runs.sort_by(|x, y| y.created_ms.cmp(&x.created_ms).then(y.id.cmp(&x.id)));
    Json(runs)
}

async fn get_run(
    State(a): State<AppState>,
    Path(run): Path<String>,
) -> Result<Json<RunStatus>, ErrorResponse> {
    let run = run_id(&run)?;
    let s = a.engine.status(&run).map_err(engine_error)?;
    Ok(Json(status_view(&s)))
}

async fn events(
    State(a): State<AppState>,
    Path(run): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ErrorResponse> {
    let Query(q) = q.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let run = run_id(&run)?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_sse {
        let list = a.engine.events(&run, q.after).map_err(engine_error)?;
        return Ok(Json(list.iter().map(event_view).collect::<Vec<_>>()).into_response());
    }
    // Subscribe first, then read the backlog: nothing falls between the two; what both
    // carry is sent once (by sequence number).
    let live = a.engine.subscribe();
    let backlog = a.engine.events(&run, q.after).map_err(engine_error)?;
    let last = backlog.last().map_or(q.after, |e| e.seq);
    // A finished run's stream is its journal, then the end.
    let finished = backlog.iter().any(|e| e.event.kind() == "run_finished")
        || a.engine
            .status(&run)
            .is_ok_and(|s| s.state.is_final() && backlog.is_empty());
    let to_sse = |e: &JournalEvent| {
        SseEvent::default()
            .event(e.event.kind())
            .id(e.seq.to_string())
            .json_data(event_view(e))
            .unwrap_or_default()
    };
    let first: Vec<Result<SseEvent, Infallible>> = backlog.iter().map(|e| Ok(to_sse(e))).collect();
    let engine = a.engine.clone();
    // Live events after the backlog; a receiver that fell behind catches up from the
    // journal (every missed event, in order) before it goes on live.
    let rest = futures_util::stream::unfold(
        (
            live,
            last,
            run,
            engine,
            finished,
            std::collections::VecDeque::new(),
        ),
        move |(mut live, mut last, run, engine, mut done, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop_front() {
                    let e: JournalEvent = e;
                    if e.seq > last {
                        last = e.seq;
                        done = e.event.kind() == "run_finished";
                        return Some((Ok(to_sse(&e)), (live, last, run, engine, done, pending)));
                    }
                    continue;
                }
                if done {
                    return None;
                }
                match live.recv().await {
                    Ok(e) if e.run == run && e.seq > last => pending.push_back(e),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(missed) = engine.events(&run, last) {
                            pending.extend(missed);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(first), rest);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn approve(
    State(a): State<AppState>,
    Path((run, step)): Path<(String, String)>,
    body: Result<Json<Approval>, JsonRejection>,
) -> Result<StatusCode, ErrorResponse> {
    let Json(req) =
        body.map_err(|e| ErrorResponse::invalid(format!("request body: {}", e.body_text())))?;
    let run = run_id(&run)?;
    a.engine
        .approve(&run, &step, req.approved, req.reason)
        .map_err(engine_error)?;
    tracing::info!(run = %run, step, approved = req.approved, "approval decided by an operator");
    Ok(StatusCode::NO_CONTENT)
}

async fn cancel(
    State(a): State<AppState>,
    Path(run): Path<String>,
) -> Result<Json<RunStatus>, ErrorResponse> {
    let run = run_id(&run)?;
    a.engine.cancel(&run).map_err(engine_error)?;
    tracing::info!(run = %run, "run cancelled by an operator");
    let s = a.engine.status(&run).map_err(engine_error)?;
    Ok(Json(status_view(&s)))
}

async fn run_artifacts(
    State(a): State<AppState>,
    Path(run): Path<String>,
) -> Result<Json<Vec<ArtifactRef>>, ErrorResponse> {
    let run = run_id(&run)?;
    let s = a.engine.status(&run).map_err(engine_error)?;
    let mut out = Vec::new();
    for st in &s.steps {
        for r in &st.artifacts {
            out.push(ArtifactRef {
                sha256: r.sha256.clone(),
                size: r.size,
                media_type: r.media_type.clone(),
                name: r.name.clone(),
                step: Some(st.id.clone()),
            });
        }
    }
    Ok(Json(out))
}

async fn artifact(
    State(a): State<AppState>,
    Path(sha): Path<String>,
) -> Result<Response, ErrorResponse> {
    let file = a.engine.store().open(&sha).map_err(|e| match e {
        clawos_workflow::ArtifactError::BadSha(_) => ErrorResponse::invalid(e.to_string()),
        other => ErrorResponse::not_found(format!("artifact {sha}: {other}")),
    })?;
    let body = axum::body::Body::from_stream(tokio_util_stream(file));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// A file as a stream of chunks (artifacts can be large; no whole-file buffering).
fn tokio_util_stream(
    file: std::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let r = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; 256 << 10];
            let n = f.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((buf, f))
        })
        .await;
        match r {
            Ok(Ok((buf, _))) if buf.is_empty() => None,
            Ok(Ok((buf, f))) => Some((Ok(buf), Some(f))),
            Ok(Err(e)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    })
}

async fn metrics(State(a): State<AppState>) -> Response {
    a.metrics.response()
}

/// The router, every route behind the guard.
pub fn router(engine: OrchestratorEngine, cfg: &Config, token: &str) -> Router {
    let mut m = clawos_service::Metrics::new();
    {
        let e = engine.clone();
        m.gauge_fn(
            "clawos_orchestrator_runs_running",
            "Runs not yet finished.",
            move || e.list().iter().filter(|r| !r.state.is_final()).count() as i64,
        );
    }
    let state = AppState {
        engine,
        metrics: std::sync::Arc::new(m),
    };
    let guard = Guard::new()
        .bearer(
            token,
            &clawos_orchestrator_api::token_path(&cfg.state_dir)
                .display()
                .to_string(),
        )
        .open_path(routes::HEALTHZ.path)
        .open_path(routes::METRICS.path)
        .listening_on(cfg.addr)
        .allow_origins(&cfg.allowed_origins);
    let routes = Router::new()
        .at(routes::SUBMIT, submit)
        .at(routes::LIST, list)
        .at(routes::GET, get_run)
        .at(routes::EVENTS, events)
        .at(routes::APPROVE, approve)
        .at(routes::CANCEL, cancel)
        .at(routes::RUN_ARTIFACTS, run_artifacts)
        .at(routes::ARTIFACT, artifact)
        .at(routes::HEALTHZ, || async { "ok\n" })
        .at(routes::METRICS, metrics)
        .fallback(clawos_service::http::no_such_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    guard
        .protect(routes)
        .layer(axum::middleware::from_fn(clawos_service::http::request_id))
}
