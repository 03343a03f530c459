//! The agent identity the launcher holds for each running VM.
//!
//! No credential enters a VM: the guest's identity is its vsock channel, which only the
//! launcher holds. For every running VM the launcher keeps a short-lived JWT minted by
//! identity-manager for that agent and boot, replaces it before it expires (a fresh
//! token, then the old one revoked), and revokes it when the VM ends. The relays read the
//! current token from an [`AgentIdentity`] and attach it to what the guest sends.
//!
//! The current token's `jti` is also written to the VM's directory, so a launcher that
//! was killed while holding one revokes it when it comes back (and re-adopts the VM, or
//! deletes it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clawos_identity_manager_api::{IdentityClient, IssueRequest, Issued, RevokeRequest};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::IdentitySettings;
use crate::names::VmName;
use crate::store::VmRecord;

/// The file in a VM's directory naming the LLM token the launcher holds for it.
const JTI_FILE: &str = "identity.jti";

/// Which host service a held token is for. Each has an audience of its own, so a token
/// one service receives is refused by the other (skill-manager cannot spend an agent's
/// LLM budget with what it is sent, nor the proxy call skills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFor {
    /// inference-proxy (the LLM relay).
    Llm,
    /// skill-manager (the skills relay).
    Skills,
}

impl TokenFor {
    /// Every kind, for what is done to all of a VM's tokens (revoking leftovers).
    pub const ALL: [Self; 2] = [Self::Llm, Self::Skills];

    /// The file in the VM's directory naming the token of this kind held for it.
    fn jti_file(self) -> &'static str {
        match self {
            Self::Llm => JTI_FILE,
            Self::Skills => "identity-skills.jti",
        }
    }

    fn audience(self, settings: &IdentitySettings) -> &str {
        match self {
            Self::Llm => &settings.llm_audience,
            Self::Skills => &settings.skills_audience,
        }
    }
}

/// How long identity-manager gets per call: a VM's relays wait on nothing, but a
/// stop waits for the revocation.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A held token: the JWT and its id.
#[derive(Clone)]
pub struct HeldToken {
    pub jwt: Arc<str>,
    pub jti: Arc<str>,
    pub expires_at: u64,
}

impl std::fmt::Debug for HeldToken {
    // The JWT is a bearer credential: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("jti", &self.jti)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a relay has no token to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoToken {
    /// The launcher runs without identity-manager.
    NotConfigured,
    /// identity-manager has not issued one yet (it is down, or refused).
    NotYet(String),
    /// The VM is ending; its token was revoked.
    Released,
}

impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotConfigured => f.write_str(
                "vm-launcher has no identity-manager configured (CLAWOS_IDENTITY_URL), so this VM has no agent identity and its requests to host services are not forwarded",
            ),
            Self::NotYet(why) => write!(f, "this VM's agent token is not available yet: {why}"),
            Self::Released => f.write_str("this VM is stopping; its agent token was revoked"),
        }
    }
}

/// What relays read: the VM's current token, or why there is none.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    current: watch::Receiver<Result<HeldToken, NoToken>>,
}

impl AgentIdentity {
    /// An identity that never has a token (no identity-manager configured).
    pub fn unconfigured() -> Self {
        let (_tx, rx) = watch::channel(Err(NoToken::NotConfigured));
        Self { current: rx }
    }

    /// An identity that always has `jwt` (tests of what the relays attach).
    #[cfg(test)]
    pub(crate) fn fixed(jwt: &str) -> Self {
        let (_tx, rx) = watch::channel(Ok(HeldToken {
            jwt: jwt.into(),
            jti: "test-jti".into(),
            expires_at: u64::MAX,
        }));
        Self { current: rx }
    }

    /// The token to attach now.
    pub fn token(&self) -> Result<HeldToken, NoToken> {
        self.current.borrow().clone()
    }

    /// Waits up to `limit` for a token (the first one is minted while the VM boots; a
    /// guest request racing it waits a little instead of being refused).
    pub async fn token_within(&self, limit: Duration) -> Result<HeldToken, NoToken> {
        let mut rx = self.current.clone();
        let wait = rx.wait_for(|t| !matches!(t, Err(NoToken::NotYet(_))));
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(t)) => t.clone(),
            _ => self.token(),
        }
    }
}

/// The task holding a VM's token; [`IdentityHolder::release`] revokes it.
#[derive(Debug)]
pub struct IdentityHolder {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl IdentityHolder {
    /// Stops renewing and revokes the VM's token (waits for identity-manager's answer,
    /// a few seconds at most).
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT * 2, &mut self.task).await;
    }
}

/// What a VM's token says about it.
#[derive(Debug, Clone)]
pub struct VmIdentityClaims {
    pub agent: VmName,
    /// This boot of the VM: `<name>-<start time>`.
    pub vm_id: String,
    pub image_root_hash: String,
    /// Total LLM tokens the agent may spend: the scope `clawos.budget.total:<N>`
    /// (enforced by inference-proxy). The token never enters the VM, so the guest
    /// cannot ask for another.
    pub token_budget: Option<u64>,
}

impl VmIdentityClaims {
    /// The claims of the current boot of the VM `record` describes.
    pub fn of(name: &VmName, record: &VmRecord) -> Self {
        Self {
            agent: name.clone(),
            vm_id: format!("{name}-{}", record.started_at.unwrap_or(0)),
            image_root_hash: record.root_hash.clone(),
            token_budget: record.token_budget,
        }
    }

    /// The scopes its tokens carry.
    pub fn scopes(&self) -> Vec<String> {
        self.token_budget
            .map(clawos_agent_token::scopes::budget_total)
            .into_iter()
            .collect()
    }
}

/// Starts holding a token `purpose` for a VM (`vm_dir` keeps its `jti`). Without
/// identity-manager configured, the identity has no token and nothing runs.
pub fn hold(
    settings: Option<&IdentitySettings>,
    claims: VmIdentityClaims,
    vm_dir: &Path,
    purpose: TokenFor,
) -> (AgentIdentity, Option<IdentityHolder>) {
    let Some(settings) = settings else {
        return (AgentIdentity::unconfigured(), None);
    };
    let (tx, rx) = watch::channel(Err(NoToken::NotYet("being issued".into())));
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(hold_loop(
        settings.clone(),
        claims,
        purpose,
        vm_dir.to_owned(),
        tx,
        stop_rx,
    ));
    (
        AgentIdentity { current: rx },
        Some(IdentityHolder {
            stop: Some(stop_tx),
            task,
        }),
    )
}

fn client(settings: &IdentitySettings) -> Result<IdentityClient, String> {
    let token = std::fs::read_to_string(&settings.service_token_path).map_err(|e| {
        format!(
            "cannot read identity-manager's service credential {}: {e}",
            settings.service_token_path.display()
        )
    })?;
    Ok(IdentityClient::with_service_token(&settings.url, token.trim()).with_timeout(CALL_TIMEOUT))
}

/// What the launcher asks identity-manager for, for one of a VM's tokens.
fn issue_request(
    settings: &IdentitySettings,
    claims: &VmIdentityClaims,
    purpose: TokenFor,
) -> IssueRequest {
    IssueRequest {
        agent: claims.agent.to_string(),
        vm_id: claims.vm_id.clone(),
        image_root_hash: claims.image_root_hash.clone(),
        audience: purpose.audience(settings).to_owned(),
        ttl_secs: Some(settings.token_ttl.as_secs()),
        scopes: claims.scopes(),
    }
}

async fn issue(
    settings: &IdentitySettings,
    claims: &VmIdentityClaims,
    purpose: TokenFor,
) -> Result<Issued, String> {
    client(settings)?
        .issue(&issue_request(settings, claims, purpose))
        .await
        .map_err(|e| e.to_string())
}

/// Revokes one token; failures are logged (the token still expires on its own).
async fn revoke(settings: &IdentitySettings, vm: &VmName, jti: &str) -> bool {
    let result = match client(settings) {
        Ok(c) => c
            .revoke(&RevokeRequest::jti(jti))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            tracing::info!(vm = %vm, jti, "agent token revoked");
            true
        }
        Err(e) => {
            tracing::warn!(vm = %vm, jti, error = %e, "cannot revoke the agent token; it expires on its own");
            false
        }
    }
}

/// Revokes the token a previous launcher left recorded in `vm_dir` (it was killed while
/// the VM ran); used before a re-adopted VM gets a new one, and when a VM is deleted.
pub async fn revoke_leftover(
    settings: Option<&IdentitySettings>,
    vm: &VmName,
    vm_dir: &Path,
    purpose: TokenFor,
) {
    let path = vm_dir.join(purpose.jti_file());
    let Ok(jti) = std::fs::read_to_string(&path) else {
        return;
    };
    let jti = jti.trim();
    let done = match settings {
        Some(s) if !jti.is_empty() => revoke(s, vm, jti).await,
        _ => true,
    };
    if done {
        let _ = std::fs::remove_file(&path);
    }
}

/// The token id a VM's directory records, if any (read before the directory is
/// deleted, then revoked with [`revoke_in_background`]).
pub fn recorded_jti(vm_dir: &Path, purpose: TokenFor) -> Option<String> {
    let jti = std::fs::read_to_string(vm_dir.join(purpose.jti_file())).ok()?;
    let jti = jti.trim();
    (!jti.is_empty()).then(|| jti.to_owned())
}

/// Revokes a token without waiting for the answer (a deleted VM's leftover).
pub fn revoke_in_background(settings: Option<&IdentitySettings>, vm: &VmName, jti: String) {
    if let Some(s) = settings.cloned() {
        let vm = vm.clone();
        tokio::spawn(async move {
            revoke(&s, &vm, &jti).await;
        });
    }
}

fn record_jti(path: &Path, jti: &str) {
    if let Err(e) = clawos_service::atomic_write(path, jti.as_bytes(), 0o600) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the agent token's id");
    }
}

/// How long until a token expiring at `expires_at` (unix seconds) is replaced: when a
/// third of its lifetime `ttl` is left. Computed to the subsecond: `exp` is a whole
/// second, and counting `now` in whole seconds too could spend the whole margin (a
/// token issued at x.99 has `exp` x+ttl; renewing at `exp - now_secs - ttl/3` seconds
/// from x.99 is at x+ttl-ttl/3+0.99).
fn renew_in(expires_at: u64, ttl: Duration, now: SystemTime) -> Duration {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(expires_at)
        .saturating_sub(ttl / 3)
        .saturating_sub(now)
}

async fn hold_loop(
    settings: IdentitySettings,
    claims: VmIdentityClaims,
    purpose: TokenFor,
    vm_dir: PathBuf,
    current: watch::Sender<Result<HeldToken, NoToken>>,
    mut stop: oneshot::Receiver<()>,
) {
    let vm = claims.agent.clone();
    let jti_path = vm_dir.join(purpose.jti_file());
    revoke_leftover(Some(&settings), &vm, &vm_dir, purpose).await;
    let mut held: Option<HeldToken> = None;
    let mut backoff = Duration::from_millis(250);
    let mut complained = false;
    loop {
        // When to act next: at two thirds of the held token's life, or after a failure.
        let wait = match &held {
            Some(t) => renew_in(t.expires_at, settings.token_ttl, SystemTime::now()),
            None => Duration::ZERO,
        };
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(wait) => {}
        }
        match issue(&settings, &claims, purpose).await {
            Ok(issued) => {
                let new = HeldToken {
                    jwt: issued.token.into(),
                    jti: issued.jti.into(),
                    expires_at: issued.expires_at,
                };
                record_jti(&jti_path, &new.jti);
                tracing::info!(vm = %vm, jti = %new.jti, expires_at = new.expires_at, renewal = held.is_some(), "agent token issued");
                let _ = current.send(Ok(new.clone()));
                if let Some(old) = held.replace(new) {
                    revoke(&settings, &vm, &old.jti).await;
                }
                backoff = Duration::from_millis(250);
                complained = false;
            }
            Err(e) => {
                if !complained {
                    complained = true;
                    tracing::warn!(vm = %vm, error = %e, "cannot get an agent token from identity-manager; retrying (the VM's requests to host services wait or get 503)");
                }
                // An expired token is no use to anyone: stop attaching it.
                if held
                    .as_ref()
                    .is_some_and(|t| t.expires_at <= crate::launcher::now_unix())
                {
                    held = None;
                }
                if held.is_none() {
                    let _ = current.send(Err(NoToken::NotYet(e)));
                }
                tokio::select! {
                    _ = &mut stop => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
    let _ = current.send(Err(NoToken::Released));
    if let Some(t) = held
        && revoke(&settings, &vm, &t.jti).await
    {
        let _ = std::fs::remove_file(&jti_path);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn claims() -> VmIdentityClaims {
        VmIdentityClaims {
            agent: VmName::parse("agent-a").expect("name"),
            vm_id: "agent-a-1700000000".into(),
            image_root_hash: "ab".repeat(32),
            token_budget: None,
        }
    }

    /// The record of a VM started with `token_budget`.
    fn record(token_budget: Option<u64>) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "name": "agent-a", "model": null, "mem_mib": 128, "vcpus": 1,
            "image": "default", "root_hash": "ab".repeat(32), "backend": "qemu",
            "state": "starting", "reason": null, "boot_ms": null,
            "started_at": 1_700_000_000u64, "process": null,
            "token_budget": token_budget,
        }))
        .expect("record")
    }

    #[test]
    fn a_vm_started_with_a_token_budget_asks_for_its_scope_in_every_token() {
        let settings = unreachable(PathBuf::from("/nonexistent"));
        let name = VmName::parse("agent-a").expect("name");
        let req = issue_request(
            &settings,
            &VmIdentityClaims::of(&name, &record(Some(300))),
            TokenFor::Llm,
        );
        assert_eq!(req.scopes, vec!["clawos.budget.total:300".to_owned()]);
        assert_eq!(req.agent, "agent-a");
        assert_eq!(req.vm_id, "agent-a-1700000000");
        assert_eq!(req.image_root_hash, "ab".repeat(32));
        assert_eq!(req.audience, "inference-proxy");
        // What the proxy reads back from it.
        assert_eq!(
            clawos_agent_token::scopes::parse_budget_total(&req.scopes),
            Ok(Some(300))
        );
        // Without a budget: no scope, as before budgets existed.
        let req = issue_request(
            &settings,
            &VmIdentityClaims::of(&name, &record(None)),
            TokenFor::Llm,
        );
        assert!(req.scopes.is_empty(), "{:?}", req.scopes);
        // A record from before budgets (no field) has none.
        let mut old = serde_json::to_value(record(Some(5))).expect("json");
        old.as_object_mut().expect("object").remove("token_budget");
        let old: VmRecord = serde_json::from_value(old).expect("old record");
        assert_eq!(old.token_budget, None);
        assert!(
            issue_request(&settings, &VmIdentityClaims::of(&name, &old), TokenFor::Llm)
                .scopes
                .is_empty()
        );
    }

    /// Settings naming an identity-manager that is not there (a closed loopback port).
    fn unreachable(service_token_path: PathBuf) -> IdentitySettings {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        IdentitySettings {
            url: format!("http://127.0.0.1:{port}"),
            service_token_path,
            token_ttl: Duration::from_secs(60),
            llm_audience: "inference-proxy".into(),
            skills_audience: "skill-manager".into(),
        }
    }

    fn token(jti: &str) -> HeldToken {
        HeldToken {
            jwt: "header.payload.signature".into(),
            jti: jti.into(),
            expires_at: u64::MAX,
        }
    }

    /// Waits until the identity's answer satisfies `done`.
    async fn until(
        identity: &AgentIdentity,
        done: impl Fn(&Result<HeldToken, NoToken>) -> bool,
    ) -> Result<HeldToken, NoToken> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = identity.token();
            if done(&now) {
                return now;
            }
            assert!(Instant::now() < deadline, "still {now:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn without_identity_manager_there_is_no_token_and_nothing_waits_for_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (identity, holder) = hold(None, claims(), dir.path(), TokenFor::Llm);
        assert!(holder.is_none());
        assert_eq!(
            identity.token().expect_err("no token"),
            NoToken::NotConfigured
        );
        let started = Instant::now();
        assert_eq!(
            identity
                .token_within(Duration::from_secs(5))
                .await
                .expect_err("no token"),
            NoToken::NotConfigured
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(!dir.path().join(JTI_FILE).exists());
        let why = NoToken::NotConfigured.to_string();
        assert!(why.contains("CLAWOS_IDENTITY_URL"), "{why}");
    }

    #[tokio::test]
    async fn a_request_racing_the_first_token_waits_for_it() {
        let (tx, rx) = watch::channel(Err(NoToken::NotYet("being issued".into())));
        let identity = AgentIdentity { current: rx };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Ok(token("first")));
            // Held open: the identity's holder lives on.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let got = identity
            .token_within(Duration::from_secs(5))
            .await
            .expect("the token minted meanwhile");
        assert_eq!(&*got.jti, "first");
    }

    #[tokio::test]
    async fn a_token_that_does_not_come_in_time_is_not_yet() {
        let (_tx, rx) = watch::channel(Err(NoToken::NotYet("identity-manager is down".into())));
        let identity = AgentIdentity { current: rx };
        let started = Instant::now();
        let why = identity
            .token_within(Duration::from_millis(100))
            .await
            .expect_err("no token");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(why, NoToken::NotYet("identity-manager is down".into()));
        assert!(
            why.to_string().contains("identity-manager is down"),
            "{why}"
        );
    }

    #[test]
    fn a_token_is_replaced_when_a_third_of_its_life_is_left_to_the_subsecond() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let ttl = Duration::from_secs(3);
        // Issued at 100.99 (exp 103): replaced at 102, one second before it expires.
        assert_eq!(renew_in(103, ttl, at(100_990)), Duration::from_millis(1010));
        assert_eq!(renew_in(103, ttl, at(100_000)), Duration::from_secs(2));
        // Past the point: at once.
        assert_eq!(renew_in(103, ttl, at(102_500)), Duration::ZERO);
        assert_eq!(renew_in(103, ttl, at(200_000)), Duration::ZERO);
        assert_eq!(
            renew_in(1_000_900, Duration::from_secs(900), at(1_000_000_000)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn a_held_token_never_shows_its_jwt_in_logs() {
        let shown = format!("{:?}", token("jti-1"));
        assert!(shown.contains("jti-1"), "{shown}");
        assert!(!shown.contains("header.payload.signature"), "{shown}");
    }

    #[test]
    fn the_recorded_token_id_is_read_trimmed_and_an_empty_record_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(recorded_jti(dir.path(), TokenFor::Llm), None);
        std::fs::write(dir.path().join(JTI_FILE), "jti-7\n").expect("write");
        assert_eq!(
            recorded_jti(dir.path(), TokenFor::Llm).as_deref(),
            Some("jti-7")
        );
        std::fs::write(dir.path().join(JTI_FILE), " \n").expect("write");
        assert_eq!(recorded_jti(dir.path(), TokenFor::Llm), None);
    }

    #[tokio::test]
    async fn a_leftover_without_identity_manager_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(JTI_FILE), "jti-7").expect("write");
        revoke_leftover(None, &claims().agent, dir.path(), TokenFor::Llm).await;
        assert!(!dir.path().join(JTI_FILE).exists());
    }

    #[tokio::test]
    async fn a_leftover_that_cannot_be_revoked_stays_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = dir.path().join("service.token");
        std::fs::write(&credential, "service-secret").expect("write");
        std::fs::write(dir.path().join(JTI_FILE), "jti-7").expect("write");
        revoke_leftover(
            Some(&unreachable(credential)),
            &claims().agent,
            dir.path(),
            TokenFor::Llm,
        )
        .await;
        assert_eq!(
            recorded_jti(dir.path(), TokenFor::Llm).as_deref(),
            Some("jti-7")
        );
    }

    #[tokio::test]
    async fn an_unreachable_identity_manager_is_not_yet_and_a_release_is_final() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = dir.path().join("service.token");
        std::fs::write(&credential, "service-secret").expect("write");
        let settings = unreachable(credential);
        let (identity, holder) = hold(Some(&settings), claims(), dir.path(), TokenFor::Llm);
        let holder = holder.expect("a holder");
        // The first attempt's failure replaces "being issued" with why.
        let why = until(
            &identity,
            |t| matches!(t, Err(NoToken::NotYet(why)) if why != "being issued"),
        )
        .await
        .expect_err("no token");
        assert!(why.to_string().contains("not available yet"), "{why}");
        let started = Instant::now();
        holder.release().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a release does not wait out the retry backoff ({:?})",
            started.elapsed()
        );
        assert_eq!(identity.token().expect_err("released"), NoToken::Released);
        assert_eq!(
            identity
                .token_within(Duration::from_secs(5))
                .await
                .expect_err("released"),
            NoToken::Released
        );
        assert!(!dir.path().join(JTI_FILE).exists());
    }

    #[tokio::test]
    async fn a_missing_service_credential_is_named_in_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = dir.path().join("no-such/service.token");
        let (identity, holder) = hold(
            Some(&unreachable(credential.clone())),
            claims(),
            dir.path(),
            TokenFor::Llm,
        );
        let why = until(
            &identity,
            |t| matches!(t, Err(NoToken::NotYet(why)) if why != "being issued"),
        )
        .await
        .expect_err("no token");
        assert!(
            why.to_string().contains(&credential.display().to_string()),
            "{why}"
        );
        holder.expect("a holder").release().await;
    }
}
