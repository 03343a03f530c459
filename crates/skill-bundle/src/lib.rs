//! A ClawOS skill bundle, as the operator builds and signs it and skill-manager checks
//! it: [`manifest`] (`skill.toml`, checked before anything else looks at a bundle) and
//! [`bundle`] (the files and the Ed25519 signature over them, by the image key).

pub mod bundle;
pub mod manifest;

use std::path::PathBuf;

/// Why a bundle is refused. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// `skill.toml` is malformed or asks for something not allowed.
    #[error("skill.toml: {reason}")]
    Manifest { reason: String },
    /// A bundle file is missing, unreadable or unsafe to read.
    #[error("{}: {reason}", path.display())]
    Bundle { path: PathBuf, reason: String },
    /// A signing key is configured and the bundle carries no signature.
    #[error(
        "{} is missing: this skill-manager only installs skills signed by its key (sign the bundle with `clawos skill sign`)",
        path.display()
    )]
    Unsigned { path: PathBuf },
    /// The signature does not verify.
    #[error("bad signature: {reason}")]
    BadSignature { reason: String },
}
