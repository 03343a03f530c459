//! Operator login through a SAML 2.0 identity provider, as a service provider built on
//! `samael` (its XML signature checks are xmlsec's; nothing here touches XML
//! signatures): `GET /api/v1/login/saml` sends the browser to the IdP's single sign-on
//! URL with an AuthnRequest (HTTP-Redirect binding); the IdP posts a Response back to
//! `POST /api/v1/login/saml/acs` (HTTP-POST binding).
//!
//! A response is accepted only when:
//! - its assertion is signed by a certificate in the IdP's metadata, with an allowed
//!   algorithm (RSA/ECDSA with SHA-256 or stronger); samael reduces the document to the
//!   signed elements before reading it, so an unsigned assertion placed beside a signed
//!   one (XML signature wrapping) is never what is read;
//! - its audience is this SP's entity id, its recipient/destination this ACS URL, it
//!   is within NotBefore/NotOnOrAfter (with samael's clock-skew allowance), and it
//!   answers the AuthnRequest this browser started (InResponseTo, bound to the browser
//!   by a cookie; each request id is good once, for ten minutes);
//! - it carries exactly one assertion (signed or encrypted): a response with a second
//!   one — the shape of XML signature wrapping, where a forged assertion sits beside or
//!   around the signed one — is refused outright, whichever of the two samael would
//!   have read;
//! - its assertion id was not seen before (replay), and the user's groups map to a
//!   role.
//!
//! IdP metadata without a signing certificate is refused at start: samael would then
//! check no signature at all.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawos_control_plane_api::Role;
use samael::metadata::EntityDescriptor;
use samael::service_provider::{ServiceProvider, ServiceProviderBuilder};
use samael::traits::ToXml;

/// How long a started login may take to come back.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
const MAX_PENDING: usize = 1000;
/// The cookie binding a login's AuthnRequest id to the browser that started it. The
/// IdP's POST back is cross-site, so it is `SameSite=None` (and `Secure`).
pub const REQUEST_COOKIE: &str = "__Host-clawos_saml";
const HTTP_REDIRECT: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect";

/// What the operator configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamlSettings {
    /// The IdP's metadata (XML file): its entity id, SSO URL and signing certificate.
    pub idp_metadata: PathBuf,
    /// This SP's entity id (also its metadata URL): `https://<host>:8080/api/v1/saml/metadata`.
    pub entity_id: String,
    /// This SP's assertion consumer service: `https://<host>:8080/api/v1/login/saml/acs`.
    pub acs_url: String,
    /// The attribute listing the user's groups.
    pub groups_attribute: String,
    /// Group → role; the highest wins.
    pub role_map: Vec<(String, Role)>,
}

/// Why a SAML login failed; the message is what the browser is shown.
#[derive(Debug, thiserror::Error)]
pub enum SamlError {
    #[error("the login could not be started: {0}")]
    Start(String),
    #[error(
        "this browser started no such login, or it expired or was already used: start the login again"
    )]
    BadState,
    #[error("the SAML response was refused: {0}")]
    Refused(String),
    #[error("the SAML response was refused: assertion {0} was already used (replay)")]
    Replay(String),
    #[error("the SAML response names no user")]
    NoSubject,
    #[error("no ClawOS role for {user}: none of the groups {groups:?} is mapped to a role")]
    NoRole { user: String, groups: Vec<String> },
}

impl SamlError {
    /// 403 for a user without a role, 502 when the login cannot start, else 401.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRole { .. } => 403,
            Self::Start(_) => 502,
            _ => 401,
        }
    }
}

/// A user the IdP vouched for, with the role their groups give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamlUser {
    pub name: String,
    pub role: Role,
}

/// The service provider.
pub struct Saml {
    settings: SamlSettings,
    sp: Arc<ServiceProvider>,
    sso_url: String,
    /// AuthnRequest id → when it was made.
    pending: Mutex<HashMap<String, PendingRequest>>,
    /// Assertion ids accepted, until they can no longer be used anyway.
    seen: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Saml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saml")
            .field("entity_id", &self.settings.entity_id)
            .field("sso_url", &self.sso_url)
            .finish_non_exhaustive()
    }
}

impl Saml {
    /// Reads and checks the IdP's metadata.
    pub fn new(settings: SamlSettings) -> Result<Self, String> {
        use samael::crypto::AllowedSignatureAlgorithm as Alg;
        let path = &settings.idp_metadata;
        let xml = std::fs::read_to_string(path)
            .map_err(|e| format!("--saml-idp-metadata {}: {e}", path.display()))?;
        let idp: EntityDescriptor = xml.parse().map_err(|e| {
            format!(
                "--saml-idp-metadata {}: not SAML metadata: {e}",
                path.display()
            )
        })?;
        let sp = ServiceProviderBuilder::default()
            .entity_id(settings.entity_id.clone())
            .metadata_url(settings.entity_id.clone())
            .acs_url(settings.acs_url.clone())
            .slo_url(None)
            .idp_metadata(idp)
            .allowed_signature_algorithms(vec![
                Alg::RsaSha256,
                Alg::RsaSha384,
                Alg::RsaSha512,
                Alg::EcdsaSha256,
                Alg::EcdsaSha384,
                Alg::EcdsaSha512,
            ])
            .build()
            .map_err(|e| format!("SAML service provider: {e}"))?;
        match sp.idp_signing_certs() {
            Ok(Some(certs)) if !certs.is_empty() => {}
            Ok(_) => {
                return Err(format!(
                    "--saml-idp-metadata {}: no signing certificate in it; without one no assertion could be checked, so none is accepted",
                    path.display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "--saml-idp-metadata {}: its signing certificate does not parse: {e}",
                    path.display()
                ));
            }
        }
        let sso_url = sp.sso_binding_location(HTTP_REDIRECT).ok_or_else(|| {
            format!(
                "--saml-idp-metadata {}: no SingleSignOnService with the HTTP-Redirect binding",
                path.display()
            )
        })?;
        Ok(Self {
            settings,
            sp: Arc::new(sp),
            sso_url,
            pending: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// This SP's metadata, for the IdP.
    pub fn metadata_xml(&self) -> Result<String, String> {
        sp_metadata(&self.settings.entity_id, &self.settings.acs_url)
    }
}

/// How many `Assertion`/`EncryptedAssertion` elements the document holds, at any
/// depth and whatever their prefix (stricter than namespace-exact on purpose).
fn count_assertions(xml: &[u8]) -> Result<usize, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e) | Event::Empty(e)) => {
                let local = e.local_name();
                if matches!(local.as_ref(), b"Assertion" | b"EncryptedAssertion") {
                    n += 1;
                }
            }
            Ok(Event::Eof) => return Ok(n),
            Ok(_) => {}
            Err(e) => return Err(format!("SAMLResponse is not well-formed XML: {e}")),
        }
        buf.clear();
    }
}

/// The metadata of an SP with this entity id and ACS URL, without an IdP yet: what an
/// operator registers at the IdP before it hands out its own metadata
/// (`control-plane --print-saml-sp-metadata`). Built here rather than with
/// `ServiceProvider::metadata`, which insists on advertising a single-logout
/// endpoint this SP does not have; it states that assertions must be signed.
pub fn sp_metadata(entity_id: &str, acs_url: &str) -> Result<String, String> {
    use samael::metadata::{HTTP_POST_BINDING, IndexedEndpoint, SpSsoDescriptor};
    let descriptor = SpSsoDescriptor {
        protocol_support_enumeration: Some("urn:oasis:names:tc:SAML:2.0:protocol".to_owned()),
        authn_requests_signed: Some(false),
        want_assertions_signed: Some(true),
        assertion_consumer_services: vec![IndexedEndpoint {
            binding: HTTP_POST_BINDING.to_owned(),
            location: acs_url.to_owned(),
            index: 0,
            is_default: Some(true),
            ..IndexedEndpoint::default()
        }],
        ..SpSsoDescriptor::default()
    };
    let md = EntityDescriptor {
        entity_id: Some(entity_id.to_owned()),
        sp_sso_descriptors: Some(vec![descriptor]),
        ..EntityDescriptor::default()
    };
    md.to_string().map_err(|e| format!("{e:?}"))
}

/// An AuthnRequest waiting for its Response: when, and from which client.
struct PendingRequest {
    created: Instant,
    client: std::net::IpAddr,
}

impl crate::limits::Waiting for PendingRequest {
    fn client(&self) -> std::net::IpAddr {
        self.client
    }
    fn created(&self) -> Instant {
        self.created
    }
}

impl Saml {
    /// Starts a login for a browser at `client`: the IdP URL to send it to, and the
    /// request id to bind to it ([`REQUEST_COOKIE`]).
    pub fn start(&self, client: std::net::IpAddr) -> Result<(String, String), SamlError> {
        let mut req = self
            .sp
            .make_authentication_request(&self.sso_url)
            .map_err(|e| SamlError::Start(e.to_string()))?;
        // samael's own ids carry 32 random bits; this one is the browser's binding.
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| SamlError::Start(e.to_string()))?;
        req.id = format!("_{}", hex::encode(b));
        let url = req
            .redirect("")
            .map_err(|e| SamlError::Start(e.to_string()))?
            .ok_or_else(|| SamlError::Start("the AuthnRequest has no destination".into()))?;
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| now.duration_since(p.created) < LOGIN_TTL);
        crate::limits::make_room(&mut pending, client, MAX_PENDING);
        pending.insert(
            req.id.clone(),
            PendingRequest {
                created: now,
                client,
            },
        );
        Ok((url.to_string(), req.id))
    }

    /// Checks a posted `SAMLResponse` for the login this browser started (its
    /// `cookie_request`, consumed either way).
    pub async fn finish(
        &self,
        saml_response: String,
        cookie_request: Option<&str>,
    ) -> Result<SamlUser, SamlError> {
        let request_id = cookie_request.ok_or(SamlError::BadState)?.to_owned();
        let fresh = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request_id)
            .is_some_and(|p| p.created.elapsed() < LOGIN_TTL);
        if !fresh {
            return Err(SamlError::BadState);
        }
        // xmlsec and libxml are blocking C code: off the async workers.
        let sp = Arc::clone(&self.sp);
        let assertion = tokio::task::spawn_blocking(move || {
            use base64::Engine as _;
            let xml = base64::engine::general_purpose::STANDARD
                .decode(saml_response.trim())
                .map_err(|e| format!("SAMLResponse is not base64: {e}"))?;
            let assertions = count_assertions(&xml)?;
            if assertions != 1 {
                return Err(format!(
                    "a response must carry exactly one assertion, this one has {assertions} (XML signature wrapping?)"
                ));
            }
            sp.parse_base64_response(saml_response.trim(), Some(&[request_id.as_str()]))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| SamlError::Refused(format!("checker stopped: {e}")))?
        .map_err(SamlError::Refused)?;
        {
            let now = Instant::now();
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, until| *until > now);
            if seen.contains_key(&assertion.id) {
                return Err(SamlError::Replay(assertion.id.clone()));
            }
            // An assertion is at most valid for its issue delay plus skew; keep ids
            // well past that.
            seen.insert(assertion.id.clone(), now + LOGIN_TTL);
        }
        let name = assertion
            .subject
            .as_ref()
            .and_then(|s| s.name_id.as_ref())
            .map(|n| n.value.trim().to_owned())
            .filter(|n| !n.is_empty())
            .ok_or(SamlError::NoSubject)?;
        let wanted = self.settings.groups_attribute.as_str();
        let groups: Vec<String> = assertion
            .attribute_statements
            .iter()
            .flatten()
            .flat_map(|s| s.attributes.iter())
            .filter(|a| {
                a.name.as_deref() == Some(wanted) || a.friendly_name.as_deref() == Some(wanted)
            })
            .flat_map(|a| a.values.iter())
            .filter_map(|v| v.value.clone())
            .collect();
        let role =
            crate::roles::role_for(&groups, &self.settings.role_map).ok_or(SamlError::NoRole {
                user: name.clone(),
                groups,
            })?;
        Ok(SamlUser { name, role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertions_are_counted_at_any_depth_and_prefix() {
        let one = br#"<samlp:Response xmlns:samlp="p" xmlns:saml="a"><saml:Assertion ID="x"/></samlp:Response>"#;
        assert_eq!(count_assertions(one), Ok(1));
        let wrapped = br#"<ns0:Response xmlns:ns0="p" xmlns:ns1="a"><ns0:Extensions><ns1:Assertion ID="orig"><ns1:Issuer>i</ns1:Issuer></ns1:Assertion></ns0:Extensions><ns1:Assertion ID="forged"></ns1:Assertion></ns0:Response>"#;
        assert_eq!(count_assertions(wrapped), Ok(2));
        assert_eq!(count_assertions(b"<Response></Response>"), Ok(0));
        assert!(count_assertions(b"<Response><Assertion></Response>").is_err());
    }
}
