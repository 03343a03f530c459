//! The SAML login routes (see [`crate::saml`] for what is checked): start, the
//! assertion consumer service, and this SP's metadata.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clawos_service::http::ErrorResponse;

use crate::http::{App, Shared};
use crate::operator_routes::{login_refusal, session_redirect};
use crate::saml::{REQUEST_COOKIE, Saml, SamlError};

type ApiResult = Result<Response, ErrorResponse>;

fn saml_of(app: &App) -> Result<&Arc<Saml>, ErrorResponse> {
    app.saml.as_ref().ok_or_else(|| {
        ErrorResponse::not_found(
            "SAML login is not configured on this control plane (--saml-idp-metadata)",
        )
    })
}

fn cookie_name(app: &App) -> &'static str {
    if app.tls {
        REQUEST_COOKIE
    } else {
        "clawos_saml"
    }
}

/// The request-binding cookie: the IdP's POST back is cross-site, so `SameSite=None`
/// (which browsers accept only with `Secure`, i.e. over TLS).
fn request_cookie(app: &App, value: &str, max_age: u64) -> Option<HeaderValue> {
    let attrs = if app.tls {
        "; Secure; SameSite=None"
    } else {
        "; SameSite=Lax"
    };
    HeaderValue::from_str(&format!(
        "{}={value}; Path=/; HttpOnly; Max-Age={max_age}{attrs}",
        cookie_name(app)
    ))
    .ok()
}

fn error(e: &SamlError) -> ErrorResponse {
    login_refusal(e.status(), e.to_string())
}

pub(crate) async fn start(
    State(app): Shared,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
) -> ApiResult {
    let saml = saml_of(&app)?;
    let (url, request_id) = saml
        .start(crate::operator_routes::client_ip(peer))
        .map_err(|e| error(&e))?;
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&url) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(v) = request_cookie(&app, &request_id, crate::saml::LOGIN_TTL.as_secs()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// The IdP's HTTP-POST form.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct AcsForm {
    #[serde(rename = "SAMLResponse")]
    saml_response: String,
    #[serde(rename = "RelayState", default)]
    _relay_state: Option<String>,
}

pub(crate) async fn acs(
    State(app): Shared,
    headers: HeaderMap,
    form: Result<Form<AcsForm>, FormRejection>,
) -> ApiResult {
    let saml = saml_of(&app)?;
    let Form(form) = form.map_err(|e| ErrorResponse::invalid(e.body_text()))?;
    let name = cookie_name(&app);
    let request = crate::sessions::cookie_in(&headers, name).map(str::to_owned);
    let clear = request_cookie(&app, "", 0);
    let with_clear = |mut resp: Response| {
        if let Some(v) = clear.clone() {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        resp
    };
    let user = match saml.finish(form.saml_response, request.as_deref()).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "SAML login refused");
            return Ok(with_clear(error(&e).into_response()));
        }
    };
    let resp = session_redirect(&app, user.name, user.role, "saml")?;
    Ok(with_clear(resp))
}

pub(crate) async fn metadata(State(app): Shared) -> ApiResult {
    let saml = saml_of(&app)?;
    let xml = saml
        .metadata_xml()
        .map_err(|e| ErrorResponse::internal(format!("SP metadata: {e}")))?;
    let mut resp = xml.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/samlmetadata+xml"),
    );
    Ok(resp)
}
