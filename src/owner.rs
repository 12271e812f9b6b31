//! One owner per state directory and per database.
//!
//! - **State**: a process that runs passes holds an exclusive `flock` on
//!   `<state>/lock` for its whole lifetime ([`StateLock`]). A second process
//!   on the same state directory is refused at once with the holder's pid;
//!   it touches nothing. The kernel drops the lock when the process dies,
//!   `kill -9` included, so there is no stale lock to clean up.
//! - **Database**: a run claims its database in `backstop.run_owner`, a
//!   one-row table next to the migration history, before it plans (so the
//!   plan reads a history no other instance is changing) and releases it when
//!   the run ends. The claim is a committed row, not a session lock, so it
//!   survives what a session lock would not: the crash of the owner (its
//!   restart finds its own claim and resumes) and the restore itself (the
//!   claim is written before the checkpoint, so the restored database still
//!   holds it). An instance with another state directory that finds the claim
//!   does not plan, run, restore, revert or move the gate past that
//!   database's carriers; it waits and says who owns the database.
//!
//! The owner's identity is the state id, a random id written once to
//! `<state>/id` (in Kubernetes: the guarded Kustomization).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::db::{Database, DbError};

/// Failures to take or read ownership.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("another backstop process (pid {pid}) is running with state directory {state}; nothing was done (wait for it, or stop it)")]
    StateBusy { state: PathBuf, pid: String },
    #[error("failed to lock the state directory {state}")]
    StateLock { state: PathBuf, source: std::io::Error },
    #[error("failed to read or create the state id in {state}")]
    StateId { state: PathBuf, source: std::io::Error },
    #[error("the claim on {database} was released by its owner while this instance asked; the next pass claims it")]
    Raced { database: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("query on {database} failed while {step}")]
    Query {
        database: String,
        step: &'static str,
        source: tokio_postgres::Error,
    },
}

impl OwnerError {
    /// Whether asking again later may succeed (the connection, the server's
    /// state), rather than a refusal (permissions, a broken schema).
    pub fn is_transient(&self) -> bool {
        match self {
            OwnerError::Db(_) | OwnerError::Raced { .. } => true,
            OwnerError::Query { source, .. } => match source.code() {
                None => true,
                // connection, operator intervention, resources, rollbacks, locks
                Some(code) => ["08", "57", "53", "40", "55"]
                    .iter()
                    .any(|c| code.code().starts_with(c)),
            },
            _ => false,
        }
    }
}

/// An exclusive lock on a state directory, held until dropped (or the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock on `state` without waiting; refuses when another process holds it.
    pub fn acquire(state: &Path) -> Result<Self, OwnerError> {
        let err = |source| OwnerError::StateLock {
            state: state.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(state).map_err(err)?;
        let path = state.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(OwnerError::StateBusy {
                    state: state.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
            Err((_, errno)) => return Err(err(std::io::Error::from(errno))),
        };
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        // Not synced: the pid is for the person told the state is busy, and
        // after a crash of the machine no process holds the lock anyway.
        write!(file, "{}", std::process::id()).map_err(err)?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The state directory's id (created on first use).
pub fn state_id(state: &Path) -> Result<String, OwnerError> {
    let err = |source| OwnerError::StateId {
        state: state.to_path_buf(),
        source,
    };
    let path = state.join("id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(state).map_err(err)?;
    let mut seed = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(err)?;
    let id = format!("state-{}", hex::encode(seed));
    let mut tmp = tempfile::NamedTempFile::new_in(state).map_err(err)?;
    tmp.write_all(id.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    // Durable by name: an instance that came back with a new id would find
    // its own claims held by a stranger.
    crate::journal::sync_dir(state).map_err(err)?;
    Ok(id)
}

/// Who owns a database: an instance (state id) and, once it started, its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub state: String,
    pub run: Option<String>,
    pub host: String,
    pub pid: u32,
    pub since: DateTime<Utc>,
}

impl Owner {
    /// This process, as instance `state`, for `run`.
    pub fn me(state: &str, run: Option<&str>) -> Self {
        Self {
            state: state.to_string(),
            run: run.map(str::to_string),
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            pid: std::process::id(),
            since: Utc::now(),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backstop instance {} (pid {} on {}", self.state, self.pid, self.host)?;
        if let Some(run) = &self.run {
            write!(f, ", run {run}")?;
        }
        write!(f, ", since {})", self.since.format("%Y-%m-%d %H:%M:%S UTC"))
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This instance owns the database (now or already).
    Ours,
    /// Another instance does; nothing may run, restore or revert here.
    Theirs(Owner),
}

/// backstop's tables (history and owner), created once per database.
/// Serialized with an advisory transaction lock: two instances creating them
/// at once would otherwise collide in the catalog (`pg_type` unique key).
pub const SCHEMA_DDL: &str = "SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(7094141864108125185);
CREATE SCHEMA IF NOT EXISTS backstop;
CREATE TABLE IF NOT EXISTS backstop.migration_history (
    seq bigserial PRIMARY KEY,
    id text NOT NULL,
    checksum text NOT NULL,
    phase text NOT NULL,
    commit text NOT NULL,
    run_id text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    success boolean NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS migration_history_applied ON backstop.migration_history (id) WHERE success;
CREATE TABLE IF NOT EXISTS backstop.run_owner (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    state_id text NOT NULL,
    run_id text,
    host text NOT NULL,
    pid integer NOT NULL,
    since timestamptz NOT NULL
);
COMMIT;";

/// Whether backstop's tables exist.
pub const SCHEMA_READY: &str =
    "SELECT to_regclass('backstop.migration_history') IS NOT NULL AND to_regclass('backstop.run_owner') IS NOT NULL";

/// Takes the claim, or refreshes this instance's own (`RETURNING` a row
/// when the claim is this instance's).
pub const CLAIM: &str = "INSERT INTO backstop.run_owner AS o (state_id, run_id, host, pid, since) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (singleton) DO UPDATE SET run_id = COALESCE(EXCLUDED.run_id, o.run_id), host = EXCLUDED.host, pid = EXCLUDED.pid
             WHERE o.state_id = EXCLUDED.state_id
             RETURNING state_id";

/// Who holds the claim.
pub const OWNER: &str = "SELECT state_id, run_id, host, pid, since FROM backstop.run_owner";

/// Lets an instance's claim go.
pub const RELEASE: &str = "DELETE FROM backstop.run_owner WHERE state_id = $1";

/// Creates backstop's tables unless they exist (a role that does not own
/// them may use them, but `CREATE INDEX IF NOT EXISTS` wants the owner).
pub async fn ensure_schema(client: &crate::db::Session) -> Result<(), tokio_postgres::Error> {
    if client.schema_seen() {
        return Ok(());
    }
    let ready: bool = client.query_one(SCHEMA_READY, &[]).await?.get(0);
    if !ready {
        client.batch_execute(SCHEMA_DDL).await?;
    }
    client.see_schema();
    Ok(())
}

fn query_err<'a>(db: &'a Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> OwnerError + 'a {
    move |source| OwnerError::Query {
        database: db.describe(),
        step,
        source,
    }
}

/// Claims `db` for `me`: taken when free, refreshed (run id, pid) when `me`'s
/// instance already holds it, refused when another instance does.
pub async fn claim(db: &Database, me: &Owner) -> Result<Claim, OwnerError> {
    let client = db.session().await?;
    ensure_schema(&client)
        .await
        .map_err(query_err(db, "creating backstop's tables"))?;
    let row = client
        .query_opt(CLAIM, &[&me.state, &me.run, &me.host, &(me.pid as i32), &me.since])
        .await
        .map_err(query_err(db, "claiming the database"))?;
    client.release().await;
    if row.is_some() {
        return Ok(Claim::Ours);
    }
    match current(db).await? {
        Some(other) if other.state != me.state => Ok(Claim::Theirs(other)),
        Some(_) => Ok(Claim::Ours),
        // Released between the two statements: the next pass tries again.
        None => Err(OwnerError::Raced {
            database: db.describe(),
        }),
    }
}

/// Who owns `db` now (None: nobody, or backstop never ran there).
pub async fn current(db: &Database) -> Result<Option<Owner>, OwnerError> {
    let client = db.session().await?;
    let owner = current_on(db, &client).await;
    client.release().await;
    owner
}

/// [`current`], asked on `client`, a session to `db`.
pub async fn current_on(db: &Database, client: &crate::db::Session) -> Result<Option<Owner>, OwnerError> {
    owner_from(db, client.query(OWNER, &[]).await)
}

/// The owner [`OWNER`]'s answer names (none when backstop's tables are
/// not there: nobody ever claimed the database).
pub fn owner_from(
    db: &Database,
    rows: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<Option<Owner>, OwnerError> {
    match rows {
        Ok(rows) => Ok(rows.first().map(|r| Owner {
            state: r.get(0),
            run: r.get(1),
            host: r.get(2),
            pid: r.get::<_, i32>(3) as u32,
            since: r.get(4),
        })),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(query_err(db, "reading the database's owner")(e)),
    }
}

/// Releases `state`'s claim on `db` (no-op when it holds none).
pub async fn release(db: &Database, state: &str) -> Result<(), OwnerError> {
    let client = db.session().await?;
    let deleted = client.execute(RELEASE, &[&state]).await;
    client.release().await;
    match deleted {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(()),
        Err(e) => Err(query_err(db, "releasing the database")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_state_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn the_state_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = state_id(dir.path()).unwrap();
        assert!(a.starts_with("state-") && a.len() == 38, "{a}");
        assert_eq!(state_id(dir.path()).unwrap(), a);
    }

    #[test]
    fn the_ddl_lock_key_spells_bstpddl() {
        // The advisory lock key serializing backstop's schema changes: "bstpddl" + 1.
        assert!(SCHEMA_DDL.contains(&0x6273_7470_6464_6c01_i64.to_string()));
    }
}
