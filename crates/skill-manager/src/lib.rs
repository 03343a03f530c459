//! skill-manager: installs skills — WebAssembly components with a signed manifest — and
//! runs them for agents under wasmtime with only what their manifest grants.
//!
//! - [`manifest`], [`bundle`]: `skill.toml` and the signed bundle (the
//!   `clawos-skill-bundle` crate, shared with the CLI);
//! - [`runtime`]: the engine, the compiled-component cache and one sandboxed call;
//! - [`outbound`]: the host side of the skill's `wasi:http/outgoing-handler`, where each
//!   request is checked against `http.allow` and secrets are added;
//! - [`store`] (SQLite) → [`host`] (install, enable, call, audit) → [`http`] (the
//!   operator API) + [`mcp`] (the agents' MCP server).

pub mod host;
pub mod http;
pub mod mcp;
pub mod outbound;
pub mod runtime;
pub mod store;

use std::path::PathBuf;

pub use clawos_skill_bundle::{BundleError, bundle, manifest};

/// Why a skill could not be installed or run. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// The bundle or its manifest is refused.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The component cannot run as a skill (not a component, wrong exports, imports
    /// something skills do not get).
    #[error("not a usable skill component: {reason}")]
    Component { reason: String },
    /// The call ran out of time.
    #[error("the skill ran longer than its {limit_ms} ms limit and was stopped")]
    Timeout { limit_ms: u64 },
    /// The call ran out of fuel.
    #[error("the skill used up its fuel ({fuel}) and was stopped")]
    OutOfFuel { fuel: u64 },
    /// The component tried to grow its memory past the cap.
    #[error("the skill tried to use more than its {limit_mib} MiB of memory and was stopped")]
    MemoryLimit { limit_mib: u32 },
    /// The component trapped (a bug in the skill, or an abort).
    #[error("the skill crashed: {reason}")]
    Trap { reason: String },
    /// The skill itself answered with an error.
    #[error("the skill answered with an error: {message}")]
    Failed { message: String },
    /// Reading or writing the compiled-component cache failed.
    #[error("component cache {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
