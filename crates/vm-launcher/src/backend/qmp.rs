//! A minimal QMP client (QEMU's JSON control protocol on the VM's `qmp.sock`):
//! greeting, capabilities, then one command at a time; events that arrive meanwhile
//! are kept for [`Qmp::wait_event`].

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::qemu::QMP_SOCKET;
use super::{BackendError, connect_in_dir};
use crate::store::VmDir;

/// Longest a save or load of the migration stream may take.
const MIGRATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A minimal QMP client: greeting, capabilities, then one command at a time.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events that arrived while waiting for a command's answer.
    events: Vec<Value>,
}

pub(super) fn qmp_err(detail: impl std::fmt::Display) -> BackendError {
    BackendError::Control {
        backend: "qemu",
        detail: format!("QMP: {detail}"),
    }
}

impl Qmp {
    /// Connects to a VM's QMP socket and negotiates capabilities.
    pub async fn connect(dir: &VmDir) -> Result<Self, BackendError> {
        let stream = connect_in_dir(&dir.root, QMP_SOCKET)
            .await
            .map_err(qmp_err)?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.map_err(qmp_err)? == 0 {
            return Err(qmp_err("connection closed"));
        }
        serde_json::from_str(&line).map_err(qmp_err)
    }

    /// Runs one command and returns its `return` value (events in between are skipped).
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, BackendError> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(qmp_err)?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(qmp_err(format!("{cmd}: {e}")));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Waits for an event (for `device`, one whose `data.device` is it).
    pub async fn wait_event(
        &mut self,
        name: &str,
        device: Option<&str>,
        limit: std::time::Duration,
    ) -> Result<Value, BackendError> {
        let matches = |v: &Value| {
            v.get("event").and_then(Value::as_str) == Some(name)
                && device
                    .is_none_or(|d| v.pointer("/data/device").and_then(Value::as_str) == Some(d))
        };
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i));
        }
        tokio::time::timeout(limit, async {
            loop {
                let v = self.read().await?;
                if matches(&v) {
                    return Ok(v);
                }
            }
        })
        .await
        .map_err(|_| qmp_err(format!("no {name} event within {limit:?}")))?
    }

    /// Polls `query-migrate` until the migration completes; its error if it fails.
    pub async fn wait_migration(&mut self) -> Result<(), BackendError> {
        let deadline = std::time::Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(qmp_err(format!("migration failed: {why}")));
                }
                _ => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(qmp_err(format!(
                    "migration did not finish within {MIGRATE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
