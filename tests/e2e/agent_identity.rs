//! vm-launcher's agent identity against the real identity-manager: the token a running
//! VM holds says who it is, is replaced before it expires (the old one revoked), is
//! revoked when the VM ends, comes once identity-manager is up, and a launcher's
//! leftover is revoked. Loopback only, no VM: the launcher's identity module is driven
//! through its library API, exactly as its supervisor drives it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clawos_e2e::{KillOnDrop, port, spawn_daemon};
use clawos_identity_manager_api::{IdentityClient, Introspection, IssueRequest};
use clawos_vm_launcher::config::IdentitySettings;
use clawos_vm_launcher::identity::{
    AgentIdentity, HeldToken, NoToken, TokenFor, VmIdentityClaims, hold, revoke_leftover,
};
use clawos_vm_launcher::names::VmName;

const AUDIENCE: &str = "inference-proxy";
/// Short, so renewals come within the test; renewal leaves a third of it (2 s) for the
/// request to identity-manager and the record before the old token expires.
const TTL: Duration = Duration::from_secs(6);

/// A real identity-manager on a loopback port, with its state in `<work>/state`.
struct IdentityManager {
    work: PathBuf,
    port: u16,
    started: usize,
    child: Option<KillOnDrop>,
}

impl IdentityManager {
    fn new(work: &Path) -> Result<Self> {
        std::fs::create_dir_all(work.join("state"))?;
        Ok(Self {
            work: work.to_owned(),
            port: port(),
            started: 0,
            child: None,
        })
    }

    fn start(work: &Path) -> Result<Self> {
        let mut s = Self::new(work)?;
        s.up()?;
        Ok(s)
    }

    /// Starts the daemon (again, on the same port and state).
    fn up(&mut self) -> Result<()> {
        self.started += 1;
        let state = self.work.join("state");
        let child = spawn_daemon(
            "identity-manager",
            &[
                "--addr",
                &format!("127.0.0.1:{}", self.port),
                "--state-dir",
                state.to_str().context("state dir is not UTF-8")?,
            ],
            &[],
            &self
                .work
                .join(format!("identity-manager-{}.log", self.started)),
            self.port,
        )?;
        self.child = Some(KillOnDrop(child));
        Ok(())
    }

    /// Kills the daemon (SIGKILL) and waits for it.
    fn down(&mut self) {
        self.child = None;
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn service_token_path(&self) -> PathBuf {
        self.work.join("state/identity/service.token")
    }

    fn settings(&self) -> IdentitySettings {
        IdentitySettings {
            url: self.url(),
            service_token_path: self.service_token_path(),
            token_ttl: TTL,
            llm_audience: AUDIENCE.into(),
            skills_audience: "skill-manager".into(),
        }
    }

    fn client(&self) -> Result<IdentityClient> {
        let token = std::fs::read_to_string(self.service_token_path())?;
        Ok(IdentityClient::with_service_token(
            &self.url(),
            token.trim(),
        ))
    }

    async fn introspect(&self, t: &HeldToken) -> Result<Introspection> {
        Ok(self.client()?.introspect(&t.jwt).await?)
    }

    /// Whether identity-manager lists `jti` as revoked (an expired token introspects
    /// inactive too; the revocation feed tells the two apart).
    async fn revoked(&self, jti: &str) -> Result<bool> {
        let feed = IdentityClient::new(&self.url()).revocations().await?;
        Ok(feed.tokens.iter().any(|t| t.jti == jti))
    }

    /// Waits (a few seconds at most) until `jti` is listed as revoked.
    async fn wait_revoked(&self, jti: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.revoked(jti).await? {
            ensure!(Instant::now() < deadline, "token {jti} was never revoked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Issues a token for `agent-a` directly (standing in for one a previous launcher
    /// held).
    async fn issue_directly(&self) -> Result<clawos_identity_manager_api::Issued> {
        Ok(self
            .client()?
            .issue(&IssueRequest {
                agent: "agent-a".into(),
                vm_id: "agent-a-1".into(),
                image_root_hash: root_hash(),
                audience: AUDIENCE.into(),
                ttl_secs: Some(600),
                scopes: Vec::new(),
            })
            .await?)
    }
}

fn root_hash() -> String {
    "0123456789abcdef".repeat(4)
}

fn claims(vm_id: &str) -> VmIdentityClaims {
    VmIdentityClaims {
        agent: VmName::parse("agent-a").expect("a VM name"),
        vm_id: vm_id.into(),
        image_root_hash: root_hash(),
        token_budget: None,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn recorded_jti(vm_dir: &Path) -> Option<String> {
    std::fs::read_to_string(vm_dir.join("identity.jti"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The first token, within a few seconds.
async fn first_token(identity: &AgentIdentity) -> Result<HeldToken> {
    identity
        .token_within(Duration::from_secs(10))
        .await
        .map_err(|why| anyhow::anyhow!("no token within 10 s: {why}"))
}

/// Waits for a token other than `old`.
async fn next_token(
    identity: &AgentIdentity,
    old: &HeldToken,
    limit: Duration,
) -> Result<HeldToken> {
    let deadline = Instant::now() + limit;
    loop {
        match identity.token() {
            Ok(t) if t.jti != old.jti => return Ok(t),
            Ok(_) => {}
            Err(why) => bail!("the identity lost its token: {why}"),
        }
        ensure!(
            Instant::now() < deadline,
            "token {} was not replaced within {limit:?}",
            old.jti
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_holds_a_token_that_says_which_agent_boot_and_image_it_is() -> Result<()> {
    let work = tempfile::tempdir()?;
    let im = IdentityManager::start(work.path())?;
    let vm_dir = work.path().join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let (identity, holder) = hold(
        Some(&im.settings()),
        claims("agent-a-1700000001"),
        &vm_dir,
        TokenFor::Llm,
    );
    let holder = holder.context("a holder when identity-manager is configured")?;

    let token = first_token(&identity).await?;
    let seen = im.introspect(&token).await?;
    assert!(seen.active, "{seen:?}");
    assert_eq!(seen.agent.as_deref(), Some("agent-a"), "{seen:?}");
    assert_eq!(
        seen.vm_id.as_deref(),
        Some("agent-a-1700000001"),
        "{seen:?}"
    );
    assert_eq!(seen.image_root_hash, Some(root_hash()), "{seen:?}");
    assert_eq!(seen.aud.as_deref(), Some(AUDIENCE), "{seen:?}");
    assert_eq!(seen.jti.as_deref(), Some(&*token.jti), "{seen:?}");
    assert_eq!(seen.exp, Some(token.expires_at), "{seen:?}");
    let lifetime = token.expires_at - seen.iat.context("iat")?;
    assert_eq!(lifetime, TTL.as_secs(), "the configured lifetime");

    assert_eq!(recorded_jti(&vm_dir).as_deref(), Some(&*token.jti));
    let mode = std::fs::metadata(vm_dir.join("identity.jti"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "identity.jti mode {mode:o}");

    holder.release().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_replaced_before_it_expires_and_the_old_one_revoked() -> Result<()> {
    let work = tempfile::tempdir()?;
    let im = IdentityManager::start(work.path())?;
    let vm_dir = work.path().join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let (identity, holder) = hold(
        Some(&im.settings()),
        claims("agent-a-2"),
        &vm_dir,
        TokenFor::Llm,
    );
    let holder = holder.context("a holder")?;

    let mut old = first_token(&identity).await?;
    // Twice: the holder keeps renewing, not just once.
    for round in 0..2 {
        let new = next_token(&identity, &old, TTL + Duration::from_secs(2)).await?;
        assert!(
            now_unix() < old.expires_at,
            "round {round}: the old token expired ({}) before it was replaced",
            old.expires_at
        );
        assert!(new.expires_at >= old.expires_at, "round {round}");
        im.wait_revoked(&old.jti).await?;
        let was = im.introspect(&old).await?;
        assert!(
            !was.active,
            "round {round}: the replaced token is still active: {was:?}"
        );
        let now = im.introspect(&new).await?;
        assert!(now.active, "round {round}: {now:?}");
        assert_eq!(now.vm_id.as_deref(), Some("agent-a-2"));
        // The record follows the current token (the check can race the next renewal
        // only if a renewal took a whole lifetime).
        let recorded = recorded_jti(&vm_dir).context("a recorded jti")?;
        let current = identity.token().map_err(|why| anyhow::anyhow!("{why}"))?;
        assert_eq!(recorded, &*current.jti, "round {round}");
        old = new;
    }

    holder.release().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_revokes_the_current_token_and_forgets_it() -> Result<()> {
    let work = tempfile::tempdir()?;
    let im = IdentityManager::start(work.path())?;
    let vm_dir = work.path().join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let (identity, holder) = hold(
        Some(&im.settings()),
        claims("agent-a-3"),
        &vm_dir,
        TokenFor::Llm,
    );
    let holder = holder.context("a holder")?;
    let token = first_token(&identity).await?;
    assert!(im.introspect(&token).await?.active);

    let started = Instant::now();
    holder.release().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "release took {:?}",
        started.elapsed()
    );
    // Revoked by the release itself: listed at once, long before it would expire.
    assert!(
        im.revoked(&token.jti).await?,
        "the released token is not listed as revoked"
    );
    let seen = im.introspect(&token).await?;
    assert!(!seen.active, "{seen:?}");
    assert!(
        !vm_dir.join("identity.jti").exists(),
        "identity.jti outlives the release"
    );
    assert_eq!(
        identity.token().map(|t| t.jti),
        Err(NoToken::Released),
        "after release"
    );
    assert_eq!(
        identity
            .token_within(Duration::from_secs(1))
            .await
            .map(|t| t.jti),
        Err(NoToken::Released)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_started_while_identity_manager_is_down_gets_its_token_once_it_is_up() -> Result<()> {
    let work = tempfile::tempdir()?;
    // Started once (so its service credential exists), then down.
    let mut im = IdentityManager::start(work.path())?;
    im.down();
    let vm_dir = work.path().join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let (identity, holder) = hold(
        Some(&im.settings()),
        claims("agent-a-4"),
        &vm_dir,
        TokenFor::Llm,
    );
    let holder = holder.context("a holder")?;

    // Not yet, with identity-manager's failure as the reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        match identity.token() {
            Err(NoToken::NotYet(why)) if why != "being issued" => break why,
            Err(NoToken::NotYet(_)) => {}
            other => bail!("expected no token yet, got {other:?}"),
        }
        ensure!(Instant::now() < deadline, "the first issue never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!why.is_empty());
    let waited = identity.token_within(Duration::from_millis(300)).await;
    assert!(
        matches!(waited, Err(NoToken::NotYet(_))),
        "while identity-manager is down: {waited:?}"
    );
    assert_eq!(recorded_jti(&vm_dir), None);

    // Down for a while (the holder backs off), then up again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| im.up())?;
    let token = identity
        .token_within(Duration::from_secs(20))
        .await
        .map_err(|why| anyhow::anyhow!("no token 20 s after identity-manager came up: {why}"))?;
    let seen = im.introspect(&token).await?;
    assert!(seen.active, "{seen:?}");
    assert_eq!(seen.vm_id.as_deref(), Some("agent-a-4"));
    assert_eq!(recorded_jti(&vm_dir).as_deref(), Some(&*token.jti));

    holder.release().await;
    assert!(!im.introspect(&token).await?.active);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_a_killed_launcher_left_recorded_is_revoked() -> Result<()> {
    let work = tempfile::tempdir()?;
    let im = IdentityManager::start(work.path())?;
    let vm = VmName::parse("agent-a")?;

    // Revoked explicitly (a deleted VM's directory).
    let vm_dir = work.path().join("deleted");
    std::fs::create_dir_all(&vm_dir)?;
    let leftover = im.issue_directly().await?;
    let client = im.client()?;
    assert!(client.introspect(&leftover.token).await?.active);
    std::fs::write(vm_dir.join("identity.jti"), format!("{}\n", leftover.jti))?;
    revoke_leftover(Some(&im.settings()), &vm, &vm_dir, TokenFor::Llm).await;
    assert!(
        im.revoked(&leftover.jti).await?,
        "the leftover is not revoked"
    );
    assert!(!client.introspect(&leftover.token).await?.active);
    assert!(
        !vm_dir.join("identity.jti").exists(),
        "the record outlives the revocation"
    );

    // Revoked by the holder of a re-adopted VM before it takes a new token.
    let vm_dir = work.path().join("readopted");
    std::fs::create_dir_all(&vm_dir)?;
    let leftover = im.issue_directly().await?;
    std::fs::write(vm_dir.join("identity.jti"), &leftover.jti)?;
    let (identity, holder) = hold(
        Some(&im.settings()),
        claims("agent-a-5"),
        &vm_dir,
        TokenFor::Llm,
    );
    let holder = holder.context("a holder")?;
    let token = first_token(&identity).await?;
    assert_ne!(&*token.jti, leftover.jti);
    assert!(
        im.revoked(&leftover.jti).await?,
        "the leftover is not revoked"
    );
    assert!(!client.introspect(&leftover.token).await?.active);
    assert!(client.introspect(&token.jwt).await?.active);
    assert_eq!(recorded_jti(&vm_dir).as_deref(), Some(&*token.jti));
    holder.release().await;
    Ok(())
}
