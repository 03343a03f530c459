//! Installed skills and who may call them, in SQLite (`<state>/skills/skills.db`, WAL,
//! 0600 in a 0700 directory). A skill's bundle is stored whole in its row, so an
//! install is one transaction: either all of it is there or none.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// A store failure; the message names the database and why.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("skill store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("skill store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a skill named {0:?} is installed already (remove it first)")]
    Exists(String),
}

/// One installed skill, as stored.
#[derive(Debug, Clone)]
pub struct StoredSkill {
    pub name: String,
    pub manifest: String,
    pub component: Vec<u8>,
    pub instructions: Option<String>,
    pub signed: bool,
    pub digest: String,
    pub installed_at: String,
    /// The operator's setting overrides.
    pub config: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct SkillStore {
    conn: Mutex<Connection>,
}

impl SkillStore {
    /// Opens (creating) the store in `dir` (made 0700; the database 0600).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io)?;
        let path = dir.join("skills.db");
        if !path.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode_0600()
                .open(&path)
                .map_err(io)?;
        }
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS skills (
                name TEXT PRIMARY KEY,
                manifest TEXT NOT NULL,
                component BLOB NOT NULL,
                instructions TEXT,
                signed INTEGER NOT NULL,
                digest TEXT NOT NULL,
                installed_at TEXT NOT NULL,
                config TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS enabled (
                skill TEXT NOT NULL REFERENCES skills(name) ON DELETE CASCADE,
                agent TEXT NOT NULL,
                PRIMARY KEY (skill, agent)
            );",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a skill; refuses a name already installed.
    pub fn insert(&self, s: &StoredSkill) -> Result<(), StoreError> {
        let config = serde_json::to_string(&s.config).unwrap_or_else(|_| "{}".into());
        let r = self.conn().execute(
            "INSERT INTO skills (name, manifest, component, instructions, signed, digest, installed_at, config)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                s.name,
                s.manifest,
                s.component,
                s.instructions,
                s.signed,
                s.digest,
                s.installed_at,
                config
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists(s.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every installed skill.
    pub fn all(&self) -> Result<Vec<StoredSkill>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT name, manifest, component, instructions, signed, digest, installed_at, config
             FROM skills ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            let config: String = r.get(7)?;
            Ok(StoredSkill {
                name: r.get(0)?,
                manifest: r.get(1)?,
                component: r.get(2)?,
                instructions: r.get(3)?,
                signed: r.get(4)?,
                digest: r.get(5)?,
                installed_at: r.get(6)?,
                config: serde_json::from_str(&config).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a skill (and its enablements); whether it was there.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM skills WHERE name = ?1", params![name])?
            > 0)
    }

    /// Enables `skill` for `agent`; false when no such skill.
    pub fn enable(&self, skill: &str, agent: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM skills WHERE name = ?1",
                params![skill],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Ok(false);
        }
        conn.execute(
            "INSERT OR IGNORE INTO enabled (skill, agent) VALUES (?1, ?2)",
            params![skill, agent],
        )?;
        Ok(true)
    }

    /// Disables `skill` for `agent`; whether it was enabled.
    pub fn disable(&self, skill: &str, agent: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM enabled WHERE skill = ?1 AND agent = ?2",
            params![skill, agent],
        )? > 0)
    }

    /// Every (skill, agent) enablement.
    pub fn enablements(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT skill, agent FROM enabled ORDER BY skill, agent")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skill(name: &str) -> StoredSkill {
        StoredSkill {
            name: name.into(),
            manifest: "m".into(),
            component: vec![1, 2, 3],
            instructions: None,
            signed: true,
            digest: "d".into(),
            installed_at: "t".into(),
            config: BTreeMap::from([("k".into(), "v".into())]),
        }
    }

    #[test]
    fn skills_and_enablements_survive_a_reopen_and_go_with_their_skill() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("skills");
        {
            let s = SkillStore::open(&dir).expect("open");
            s.insert(&skill("a")).expect("insert");
            assert!(matches!(s.insert(&skill("a")), Err(StoreError::Exists(_))));
            assert!(s.enable("a", "agent-1").expect("enable"));
            assert!(!s.enable("missing", "agent-1").expect("enable"));
        }
        let s = SkillStore::open(&dir).expect("reopen");
        let all = s.all().expect("all");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].component, vec![1, 2, 3]);
        assert_eq!(all[0].config["k"], "v");
        assert_eq!(
            s.enablements().expect("en"),
            [("a".into(), "agent-1".into())]
        );
        assert!(s.remove("a").expect("remove"));
        assert!(s.enablements().expect("en").is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("skills.db")), 0o600);
    }
}
