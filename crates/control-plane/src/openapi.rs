//! The OpenAPI 3.1 document of the public API, generated from the same endpoint table
//! the router mounts and authorizes from ([`crate::http::endpoints`]) and from the wire
//! types themselves (`utoipa::ToSchema`), so it cannot describe a route or a field the
//! server does not have. Served at `/api/v1/openapi.json`; `docs/openapi.json` is a
//! checked-in copy, and a test fails when the two differ.

use clawos_api::RouteMethod;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ComponentsBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Ref, RefOr, Required,
    ResponseBuilder, Schema,
};
use utoipa::{PartialSchema, ToSchema};

use crate::http::{Endpoint, Shape, endpoints};

/// The security scheme's name in the document.
const BEARER: &str = "operator_token";

/// Every named schema a route refers to, with the ones they refer to.
fn schemas() -> Vec<(String, RefOr<Schema>)> {
    fn add<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) {
        out.push((T::name().into_owned(), T::schema()));
        T::schemas(out);
    }
    let mut out = Vec::new();
    add::<clawos_control_plane_api::WhoAmI>(&mut out);
    add::<clawos_control_plane_api::CreateToken>(&mut out);
    add::<clawos_control_plane_api::CreatedToken>(&mut out);
    add::<clawos_control_plane_api::TokenInfo>(&mut out);
    add::<clawos_control_plane_api::Role>(&mut out);
    add::<clawos_control_plane_api::Login>(&mut out);
    add::<clawos_control_plane_api::SessionInfo>(&mut out);
    add::<clawos_control_plane_api::CliToken>(&mut out);
    add::<clawos_control_plane_api::EndedAccess>(&mut out);
    add::<clawos_vm_launcher_api::Vm>(&mut out);
    add::<clawos_vm_launcher_api::VmState>(&mut out);
    add::<clawos_vm_launcher_api::StartVm>(&mut out);
    add::<clawos_vm_launcher_api::Snapshot>(&mut out);
    add::<clawos_vm_launcher_api::CreateSnapshot>(&mut out);
    add::<clawos_vm_launcher_api::RestoreVm>(&mut out);
    add::<crate::audit::AuditRecord>(&mut out);
    add::<clawos_inference_proxy_api::UsageReport>(&mut out);
    add::<clawos_inference_proxy_api::UsageRow>(&mut out);
    add::<clawos_monitor_api::AuditEvent>(&mut out);
    add::<clawos_monitor_api::Kind>(&mut out);
    add::<clawos_orchestrator_api::SubmitRun>(&mut out);
    add::<clawos_orchestrator_api::RunSummary>(&mut out);
    add::<clawos_orchestrator_api::RunStatus>(&mut out);
    add::<clawos_orchestrator_api::RunState>(&mut out);
    add::<clawos_orchestrator_api::StepStatus>(&mut out);
    add::<clawos_orchestrator_api::Approval>(&mut out);
    add::<clawos_orchestrator_api::RunEvent>(&mut out);
    add::<clawos_orchestrator_api::ArtifactRef>(&mut out);
    add::<clawos_identity_manager_api::IssueRequest>(&mut out);
    add::<clawos_identity_manager_api::Issued>(&mut out);
    add::<clawos_identity_manager_api::RevokeRequest>(&mut out);
    add::<clawos_identity_manager_api::IntrospectRequest>(&mut out);
    add::<clawos_identity_manager_api::Introspection>(&mut out);
    add::<clawos_identity_manager_api::RotatedKeys>(&mut out);
    add::<clawos_vm_launcher_api::ImageInfo>(&mut out);
    add::<clawos_vm_launcher_api::VerifiedImage>(&mut out);
    add::<clawos_vm_launcher_api::FileEntry>(&mut out);
    add::<clawos_agentd_api::ChatRequest>(&mut out);
    add::<clawos_agentd_api::ChatCompletion>(&mut out);
    add::<clawos_agentd_api::SessionList>(&mut out);
    add::<clawos_api::ErrorBody>(&mut out);
    add::<clawos_api::ErrorDetail>(&mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

fn content(shape: Shape) -> Option<(&'static str, RefOr<Schema>)> {
    let r = |n: &str| RefOr::Ref(Ref::from_schema_name(n));
    match shape {
        Shape::Empty => None,
        Shape::Json(n) => Some(("application/json", r(n))),
        Shape::JsonArray(n) => Some((
            "application/json",
            ArrayBuilder::new().items(r(n)).build().into(),
        )),
        Shape::Text => Some(("text/plain", String::schema())),
        Shape::Page(mime) => Some((mime, String::schema())),
    }
}

fn operation(e: &Endpoint) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .operation_id(Some(e.action.replace('.', "_")))
        .summary(Some(e.summary))
        .description(Some(match e.role {
            Some(r) => format!("Needs the `{r}` role. Audit action `{}`.", e.action),
            None => "Open: no credential needed.".to_owned(),
        }));
    for segment in e.path.split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .pattern(Some(match name {
                                "id" => "^[0-9a-f]{16}$",
                                "sha256" => "^[0-9a-f]{64}$",
                                "run" | "step" => "^[A-Za-z0-9._\\[\\]-]{1,128}$",
                                _ => "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                            })),
                    )),
            );
        }
    }
    // Query parameters: (name, required, type).
    let query: &[(&str, bool, Type)] = match e.action {
        "vm.console" => &[("offset", false, Type::Integer)],
        "vm.files.put" => &[("path", true, Type::String)],
        "vm.files.get" => &[("path", true, Type::String), ("list", false, Type::Boolean)],
        "workflow.events" => &[("after", false, Type::Integer)],
        "usage.get" => &[
            ("since_ms", false, Type::Integer),
            ("agent", false, Type::String),
        ],
        "audit.events" => &[
            ("after", false, Type::Integer),
            ("limit", false, Type::Integer),
            ("agent", false, Type::String),
        ],
        "operator.audit" => &[("limit", false, Type::Integer)],
        "operator.access.end" => &[("operator", true, Type::String)],
        "session.oidc.start" => &[
            ("cli_port", false, Type::Integer),
            ("cli_state", false, Type::String),
            ("cli_challenge", false, Type::String),
            ("cli_check", false, Type::Boolean),
        ],
        _ => &[],
    };
    for (name, required, ty) in query {
        let mut schema = ObjectBuilder::new().schema_type(ty.clone());
        if *ty == Type::Integer {
            schema = schema.minimum(Some(0));
        }
        op = op.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(if *required {
                    Required::True
                } else {
                    Required::False
                })
                .schema(Some(schema)),
        );
    }
    if let Some((mime, schema)) = content(e.request) {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(mime, ContentBuilder::new().schema(Some(schema)).build())
                .build(),
        ));
    }
    let (status, shape) = e.answer;
    let mut ok = ResponseBuilder::new().description("Success.");
    if let Some((mime, schema)) = content(shape) {
        ok = ok.content(mime, ContentBuilder::new().schema(Some(schema)).build());
    }
    op = op.response(status.to_string(), ok.build());
    let error = |d: &str| {
        ResponseBuilder::new()
            .description(d)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                    .build(),
            )
            .build()
    };
    if e.role.is_some() {
        op = op
            .security(SecurityRequirement::new::<_, _, &str>(BEARER, []))
            .response(
                "400",
                error("The request is invalid; the message names what."),
            )
            .response("401", error("No valid operator credential."))
            .response("403", error("The credential's role is below the route's."));
    }
    op.build()
}

/// The document.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for e in endpoints() {
        let method = match e.method {
            RouteMethod::Get => HttpMethod::Get,
            RouteMethod::Post => HttpMethod::Post,
            RouteMethod::Put => HttpMethod::Put,
            RouteMethod::Delete => HttpMethod::Delete,
        };
        paths.add_path_operation(&e.path, vec![method], operation(&e));
    }
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas())
        .security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("ClawOS control plane")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The public API of a ClawOS host: agent VMs and operators. Every route but /healthz and this document needs `Authorization: Bearer <operator token>`; every request is recorded in the operator audit trail.",
                ))
                .build(),
        )
        .paths(paths)
        .components(Some(components))
        .build()
}

/// The document as served: pretty JSON with a final newline, the form
/// `docs/openapi.json` keeps.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot encode the OpenAPI document: {e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_referenced_schema_is_defined() {
        let doc = document_json();
        let v: serde_json::Value = serde_json::from_str(&doc).expect("json");
        assert!(v["openapi"].as_str().expect("version").starts_with("3.1"));
        let defined = v["components"]["schemas"].as_object().expect("schemas");
        let mut refs = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        walk(&v, &mut refs);
        assert!(refs.len() > 10);
        for r in refs {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(defined.contains_key(name), "{r} is not defined");
        }
    }

    /// The checked-in copy is the served document: regenerate it with
    /// `CLAWOS_UPDATE_OPENAPI=1 cargo test -p clawos-control-plane openapi`.
    #[test]
    fn docs_openapi_json_is_the_served_document() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let doc = document_json();
        if std::env::var_os("CLAWOS_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &doc).expect("write docs/openapi.json");
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == doc,
            "docs/openapi.json differs from the document the control plane serves; regenerate it with CLAWOS_UPDATE_OPENAPI=1 cargo test -p clawos-control-plane openapi"
        );
    }
}
