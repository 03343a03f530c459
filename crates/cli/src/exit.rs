//! Exit codes: the `Exit` error every command returns, and how an outcome becomes the
//! process's exit code. A service's error exits with the status its error code maps to
//! (`clawos_api::exit_code`), never one read off an HTTP status.

use std::process::ExitCode;

use clawos_api::ClientError;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Exit(pub u8, pub anyhow::Error);

impl From<ClientError> for Exit {
    fn from(e: ClientError) -> Self {
        Self(e.exit_code(), e.into())
    }
}

/// A service's error as the `Exit` its code maps to (for `map_err`).
pub fn api_exit(e: ClientError) -> Exit {
    e.into()
}

/// The process's exit code for a command's outcome. An error is printed to stderr
/// first; a status is exited with silently.
pub fn exit_code(outcome: Result<u8, Exit>) -> ExitCode {
    match outcome {
        Ok(status) => ExitCode::from(status),
        Err(Exit(code, e)) => {
            eprintln!("clawos: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
