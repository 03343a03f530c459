//! The MCP server agents see (official `rmcp`, Streamable HTTP at `/mcp`): one tool
//! per skill enabled for the calling agent, named and described by the skill's
//! manifest, its input schema the manifest's. Who calls is the agent the verified JWT
//! names ([`AgentIdentity`], put in the request by [`crate::http`]); nothing in the
//! MCP messages can change it. A call past the agent's limits is answered as the
//! tool's error, which the model reads.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::ErrorData as McpError;
use rmcp::handler::server::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};

use crate::host::{Caller, HostError, SkillHost};

/// The agent a request comes from, as its token said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent: String,
    pub vm_id: String,
}

/// One MCP session's handler.
#[derive(Debug, Clone)]
pub struct SkillsMcp {
    pub host: Arc<SkillHost>,
}

fn caller(context: &RequestContext<RoleServer>) -> Result<AgentIdentity, McpError> {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<AgentIdentity>())
        .cloned()
        .ok_or_else(|| McpError::internal_error("no agent identity on the request", None))
}

impl ServerHandler for SkillsMcp {
    fn get_info(&self) -> ServerConfig {
        let mut c = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        c.server_info = Implementation::new("clawos-skill-manager", env!("CARGO_PKG_VERSION"));
        c.instructions = Some(
            "ClawOS skills: each tool runs sandboxed on the host with only the network \
             access its manifest allows."
                .into(),
        );
        c
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let who = caller(&context)?;
        let tools = self
            .host
            .tools_for(&who.agent)
            .into_iter()
            .map(|(info, schema)| {
                let schema = match schema {
                    serde_json::Value::Object(o) => o,
                    _ => serde_json::Map::new(),
                };
                Tool::new(
                    Cow::Owned(info.name),
                    Cow::Owned(info.description),
                    Arc::new(schema),
                )
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let who = caller(&context)?;
        let input = serde_json::Value::Object(request.arguments.unwrap_or_default());
        let caller = Caller::Agent {
            agent: who.agent,
            vm_id: who.vm_id,
        };
        // A call whose client went away (rmcp cancels the request's token when the
        // connection goes; in stateless mode it does not pass on an MCP
        // `notifications/cancelled`, which comes on a request of its own) is dropped
        // here: the sandbox stops, and the host audits it as aborted.
        let answer = tokio::select! {
            a = self.host.call(&request.name, &caller, &input) => a,
            () = context.ct.cancelled() => {
                return Err(McpError::internal_error("the call was cancelled", None));
            }
        };
        match answer {
            Ok(r) => Ok(match (r.output, r.error) {
                (Some(out), _) => CallToolResult::success(vec![ContentBlock::text(out)]),
                (None, e) => CallToolResult::error(vec![ContentBlock::text(
                    e.unwrap_or_else(|| "the skill gave no answer".into()),
                )]),
            }
            .into()),
            // The model is told, as the tool's answer, and can wait and try again.
            Err(e @ (HostError::RateLimited { .. } | HostError::Busy { .. })) => {
                Ok(CallToolResult::error(vec![ContentBlock::text(e.to_string())]).into())
            }
            Err(HostError::NotFound(name)) => Err(McpError::invalid_params(
                format!("no tool named {name:?}"),
                None,
            )),
            Err(e) => Err(McpError::internal_error(e.to_string(), None)),
        }
    }
}
