//! One ClawOS host as a whole: its configuration file ([`config`], `clawos.toml`),
//! what runs on it and how the daemons are wired together ([`plan`]), and starting,
//! stopping and looking at them ([`supervise`]). The `clawos up`, `down`, `status` and
//! `config` commands are thin over this.

pub mod config;
pub mod plan;
pub mod supervise;

pub use config::{ConfigError, HostConfig};
pub use plan::{Daemon, Found, Plan, plan};
pub use supervise::{Host, StatusRow, Step, SuperviseError, monitor_unavailable};
