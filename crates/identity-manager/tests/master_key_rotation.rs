//! `identity-manager rotate-master-key` killed (SIGKILL) at many points, each landing
//! classified from what it left on disk, and at least one landing known to be inside
//! the re-seal: `<key>.next` written, the transaction not committed. After every kill
//! the store must open with all its keys, under the old key or the new one, and tokens
//! issued before must still verify.
//!
//! Kills at fixed delays after the start land wherever the machine's speed puts them
//! (before the new key exists, during the re-seal, after the rename); so the test also
//! kills on sight of `<key>.next` (written atomically, just before the re-seal begins)
//! until a kill has landed inside the re-seal, and fails if none did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawos_identity_manager::{Identity, IssuerConfig, MasterKeySource, open_store};
use clawos_identity_manager_api::IssueRequest;

/// Enough agent keys that the re-seal takes a while (each is opened and sealed again).
const AGENTS: usize = 1000;

/// Where a kill landed, read from the files it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Landing {
    /// Before `<key>.next` existed: the key file and the store are untouched.
    BeforeNewKey,
    /// `<key>.next` written, the re-seal not committed: start-up discards the new key.
    InsideReseal,
    /// The re-seal committed, `<key>.next` not yet renamed: start-up promotes it.
    AfterCommit,
    /// The key file holds the new key (renamed; or the rotation finished).
    Done,
}

struct Store {
    _dir: tempfile::TempDir,
    state: PathBuf,
    db: PathBuf,
    key: PathBuf,
    next: PathBuf,
    /// Signing keys in the store (agent keys are [`AGENTS`]).
    signing: usize,
    token: String,
}

fn issuer() -> IssuerConfig {
    IssuerConfig::new("http://127.0.0.1:2082", "clawos.local")
}

impl Store {
    fn create() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        let idir = state.join("identity");
        std::fs::create_dir_all(&idir).expect("identity dir");
        let (db, key) = (idir.join("identity.db"), idir.join("master.key"));
        let next = idir.join("master.key.next");
        let id = open_store(&db, &MasterKeySource::Path(key.clone()), &issuer()).expect("create");
        let mut token = String::new();
        for i in 0..AGENTS {
            token = id
                .issue(&IssueRequest {
                    agent: format!("a{i}"),
                    vm_id: "vm".into(),
                    image_root_hash: String::new(),
                    audience: "inference-proxy".into(),
                    ttl_secs: None,
                    scopes: vec![],
                })
                .expect("issue")
                .token;
        }
        let (signing, agents) = id.open_all_keys().expect("keys");
        assert_eq!(agents, AGENTS);
        Self {
            _dir: dir,
            state,
            db,
            key,
            next,
            signing,
            token,
        }
    }

    fn read_key(&self) -> Vec<u8> {
        std::fs::read(&self.key).expect("master key")
    }

    /// Starts a rotation as an operator runs it (the service stopped).
    fn rotate(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_identity-manager"))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("rotate-master-key")
            .env_remove("CLAWOS_MASTER_KEY")
            .env_remove("CLAWOS_MASTER_KEY_PATH")
            .env_remove("CLAWOS_STATE_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("identity-manager rotate-master-key")
    }

    /// Classifies where the rotation that started with `before` in the key file ended,
    /// then opens the store as the service does at start-up and checks it whole.
    fn land(&self, before: &[u8], label: &str) -> Landing {
        let next = std::fs::read(&self.next).ok();
        let now = self.read_key();
        let id = self.open(label);
        let after = self.read_key();
        assert!(
            !self.next.exists(),
            "{label}: start-up left {} behind",
            self.next.display()
        );
        drop(id);
        match next {
            None if now == before => Landing::BeforeNewKey,
            None => Landing::Done,
            Some(_) if now != before => {
                panic!("{label}: the key file changed and <key>.next is still there")
            }
            Some(_) if after == before => Landing::InsideReseal,
            Some(n) if after == n => Landing::AfterCommit,
            Some(_) => panic!("{label}: the key file holds neither the old nor the new key"),
        }
    }

    fn open(&self, label: &str) -> Identity {
        let id = open_store(
            &self.db,
            &MasterKeySource::Path(self.key.clone()),
            &issuer(),
        )
        .unwrap_or_else(|e| panic!("{label}: the store must open with the old or new key: {e}"));
        assert_eq!(
            id.open_all_keys()
                .unwrap_or_else(|e| panic!("{label}: {e}")),
            (self.signing, AGENTS),
            "{label}: every key decrypts"
        );
        id.verify(&self.token, None)
            .unwrap_or_else(|e| panic!("{label}: a token from before no longer verifies: {e}"));
        id
    }
}

/// Waits until `path` exists or `child` has ended; whether it exists.
fn wait_for(path: &Path, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if path.exists() {
            return true;
        }
        if child.try_wait().expect("try_wait").is_some() {
            return path.exists();
        }
        assert!(
            Instant::now() < deadline,
            "the rotation neither ended nor began"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_rotation_killed_anywhere_leaves_a_store_that_opens_and_one_kill_lands_in_the_reseal() {
    let s = Store::create();
    // A rotation that runs to its end: the new key is in place.
    let before = s.read_key();
    let status = s.rotate().wait().expect("wait");
    assert!(status.success(), "{status}");
    assert_eq!(s.land(&before, "a clean rotation"), Landing::Done);

    let mut landings = Vec::new();
    let mut kill = |mut child: Child, before: &[u8], label: String| {
        let _ = child.kill();
        let _ = child.wait();
        let l = s.land(before, &label);
        landings.push((label, l));
        l
    };
    // Spread-out moments after the start.
    for delay_ms in [0u64, 2, 5, 10, 20, 35, 60, 100, 200, 400] {
        let before = s.read_key();
        let child = s.rotate();
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill(
            child,
            &before,
            format!("killed {delay_ms} ms after the start"),
        );
    }
    // On sight of the new key file: the re-seal is about to begin or under way.
    for attempt in 0..10 {
        let before = s.read_key();
        let mut child = s.rotate();
        let seen = wait_for(&s.next, &mut child);
        let l = kill(
            child,
            &before,
            format!("killed on sight of <key>.next (attempt {attempt}, seen: {seen})"),
        );
        if l == Landing::InsideReseal {
            break;
        }
    }
    eprintln!("rotation kills landed: {landings:#?}");
    assert!(
        landings.iter().any(|(_, l)| *l == Landing::InsideReseal),
        "no kill landed inside the re-seal, so its crash safety went untested: {landings:#?}"
    );
}
