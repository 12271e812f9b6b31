//! Checkpoints: the trait every backend implements (take a checkpoint before a
//! migration, restore to a recovery point after a failure) and the records a
//! run keeps of them. Backends: [`local`] (physical base backup + WAL archive,
//! real PITR) and [`dump`] (logical `pg_dump -Fc` / `pg_restore`).

pub mod base;
pub mod cnpg;
pub mod dump;
pub mod local;
pub mod pgbackrest;
pub mod server;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::db::{Database, DbError};
use crate::pgbin::PgBinError;

/// Failures of checkpoint backends.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{database} is not archiving WAL ({detail}); the local backend needs archive_mode = on and an archive_command writing to {archive}")]
    NotArchiving {
        database: String,
        detail: String,
        archive: PathBuf,
    },
    #[error("--pgdata {pgdata} belongs to another server than {database}: the database reports system identifier {server}, the data directory's pg_control says {data}; point --pgdata at the data directory of the server in the URL")]
    WrongServer {
        database: String,
        pgdata: PathBuf,
        server: String,
        data: String,
    },
    #[error("WAL of {database} does not reach --wal-archive {archive}: segment {segment} was switched but did not arrive within {seconds}s ({detail}); point --wal-archive at the folder the server's archive_command writes to, and check that archiving works")]
    ArchiveNotReached {
        database: String,
        archive: PathBuf,
        segment: String,
        seconds: u64,
        detail: String,
    },
    #[error("WAL archiving of {database} is failing ({detail}); a checkpoint now could not be restored: fix the archive (full disk? a truncated segment left behind?) first")]
    ArchiveFailing { database: String, detail: String },
    #[error("role {user} of {database} may not take base backups: it needs the REPLICATION attribute (ALTER ROLE {user} REPLICATION) or superuser")]
    NoReplication { database: String, user: String },
    #[error("{what} {path} has {free} MiB free, but {needed} MiB are needed ({why})")]
    NoSpace {
        what: &'static str,
        path: PathBuf,
        free: u64,
        needed: u64,
        why: String,
    },
    #[error("local checkpoints need {what}")]
    Misconfigured { what: String },
    #[error("{backend} checkpoints are not available here: {why}")]
    Unavailable { backend: &'static str, why: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("query on {database} failed while {step}")]
    Query {
        database: String,
        step: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("{step} failed")]
    Tool { step: String, source: PgBinError },
    #[error("failed to {step} at {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the restored server at {pgdata} did not finish recovery within {seconds}s")]
    RecoveryTimeout { pgdata: PathBuf, seconds: u64 },
    #[error("the restored server at {pgdata} stopped during recovery (server log: {log})")]
    RecoveryStopped { pgdata: PathBuf, log: String },
    #[error("WAL segment {segment} of {database} is missing from the archive {archive}, after a base backup taken for this checkpoint; the archive is not continuous")]
    ArchiveGap {
        database: String,
        archive: String,
        segment: String,
    },
    #[error("restore failed; {put_back}")]
    RestoreFailed {
        source: Box<CheckpointError>,
        put_back: String,
    },
}

/// What a run keeps of a checkpoint it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Backend name (`local`, `dump`).
    pub backend: String,
    /// Where the checkpoint is.
    pub location: String,
    /// The database it covers (no secrets).
    pub database: String,
    pub started_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub size_bytes: u64,
    /// Result of a restore drill, where the backend runs one, in words.
    pub restore_drill: String,
    /// Where the restore drill stands; what decides whether it runs again.
    /// Journals written before this field read as [`DrillVerdict::NotRun`]:
    /// a run that needs a drill then drills again (a copy apart from the
    /// live database, so that costs time only).
    #[serde(default)]
    pub drill: DrillVerdict,
    /// The base backup a restore starts from and the WAL it replays, for
    /// backends whose checkpoint is a recovery point ([`base`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<base::BaseUse>,
}

/// What a restore drill found when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrillOutcome {
    /// A copy restored from the checkpoint came up and answered; what it showed.
    Passed(String),
    /// The backend cannot run a drill; why.
    NotSupported(String),
}

/// Where a checkpoint's restore drill stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrillVerdict {
    #[default]
    NotRun,
    Passed,
    NotSupported,
    Failed,
}

/// The point a restore goes back to: read over the database connection just
/// before the migration starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub time: DateTime<Utc>,
    /// `pg_current_wal_insert_lsn()` at that time.
    pub lsn: String,
    /// The logical slot that captures the writes after it, or why none
    /// ([`crate::capture`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::capture::Capture>,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The recovery target used, in the backend's terms.
    pub target: String,
    /// Where the state before the restore was kept (never deleted).
    pub kept: String,
    /// A change the repository must get so that git and cluster agree (a
    /// recreated CNPG Cluster); it goes into the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_patch: Option<ManifestPatch>,
    /// What went back with it: every database of a server a PITR rewound,
    /// or the one database a dump restored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<String>,
    /// When the old server stopped taking writes: the data-loss window ends
    /// here, not when the restore began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes_stopped_at: Option<DateTime<Utc>>,
    /// Transactions that committed after the recovery point, counted in the WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_commits: Option<LostCommits>,
    /// The writes themselves, read from the run's logical slot before the
    /// restore ([`crate::capture`]), or why they were not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_writes: Option<crate::capture::Captured>,
}

/// The transactions a restore discarded, as the WAL records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostCommits {
    /// COMMIT records between the recovery point and the end of the old WAL
    /// (the migration's own transactions among them).
    pub count: u64,
    pub from_lsn: String,
    pub to_lsn: String,
    pub timeline: u32,
    /// The command that lists them.
    pub command: String,
    /// Why they could not be counted (then `count` means nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_counted: Option<String>,
}

impl LostCommits {
    /// The record of a count that failed, and why.
    pub fn not_counted(why: String) -> Self {
        LostCommits {
            count: 0,
            from_lsn: String::new(),
            to_lsn: String::new(),
            timeline: 0,
            command: String::new(),
            not_counted: Some(why),
        }
    }
}

/// A JSON merge patch for one object's manifest in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPatch {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// RFC 7386 merge patch of the manifest.
    pub merge: serde_json::Value,
    /// `NS/NAME` of the Kustomization held suspended until the gate has the change.
    pub hold: Option<String>,
}

/// A checkpoint backend.
#[async_trait::async_trait]
pub trait Checkpoint: Send + Sync {
    /// Backend name for records and reports.
    fn name(&self) -> &'static str;
    /// Checks, before anything is touched, that a checkpoint can be taken.
    async fn preflight(&self, db: &Database) -> Result<(), CheckpointError>;
    /// Takes a checkpoint of `db` for run `run_id`. A partial checkpoint left
    /// by an interrupted earlier attempt of the same run is replaced.
    async fn create(&self, db: &Database, run_id: &str) -> Result<CheckpointRecord, CheckpointError>;
    /// Proves the checkpoint restores: brings a copy up apart from the live
    /// database and queries it. Backends that cannot say so.
    async fn drill(&self, db: &Database, checkpoint: &CheckpointRecord) -> Result<DrillOutcome, CheckpointError> {
        let _ = (db, checkpoint);
        Ok(DrillOutcome::NotSupported(format!(
            "not supported by the {} backend",
            self.name()
        )))
    }
    /// Brings `db` back to `target` from `checkpoint`. Safe to call again after
    /// an interruption: the state before the first attempt stays kept.
    async fn restore(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError>;
    /// Deletes what this backend keeps for run `run_id` (its checkpoint,
    /// and the data set aside by its restore); returns the bytes freed.
    /// Called by retention only for runs nothing needs any more.
    async fn prune(&self, run_id: &str) -> Result<u64, CheckpointError> {
        let _ = run_id;
        Ok(0)
    }
}

/// A backend that refuses, with the reason, before anything is touched
/// (e.g. `dump` in a controller whose state is not on a durable volume).
pub struct Unavailable {
    pub backend: &'static str,
    pub why: String,
}

impl Unavailable {
    fn error(&self) -> CheckpointError {
        CheckpointError::Unavailable {
            backend: self.backend,
            why: self.why.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Checkpoint for Unavailable {
    fn name(&self) -> &'static str {
        self.backend
    }
    async fn preflight(&self, _db: &Database) -> Result<(), CheckpointError> {
        Err(self.error())
    }
    async fn create(&self, _db: &Database, _run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        Err(self.error())
    }
    async fn restore(
        &self,
        _db: &Database,
        _checkpoint: &CheckpointRecord,
        _target: &RecoveryPoint,
        _run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        Err(self.error())
    }
}

/// Whether `id` has the shape backstop gives run ids (`YYYYMMDD-HHMMSSmmm-
/// <commit>`): a journal entry edited by hand or hostile must never make a
/// deletion reach outside the run's own folder (`..`, `/`, empty).
pub fn is_run_id(id: &str) -> bool {
    let mut parts = id.splitn(3, '-');
    let (Some(day), Some(time), Some(commit)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    day.len() == 8
        && day.bytes().all(|b| b.is_ascii_digit())
        && time.len() == 9
        && time.bytes().all(|b| b.is_ascii_digit())
        && !commit.is_empty()
        && commit.len() <= 40
        && commit.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Retention's deletion for backends that keep a run's checkpoint in
/// `<store>/<run_id>/`; returns the bytes freed.
pub(crate) async fn prune_run_dir(store: &std::path::Path, run_id: &str) -> Result<u64, CheckpointError> {
    if !is_run_id(run_id) {
        return Err(CheckpointError::Io {
            step: "delete a checkpoint retention let go",
            path: store.join(run_id),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a backstop run id"),
        });
    }
    let dir = store.join(run_id);
    remove_tree(dir.clone()).await.map_err(|source| CheckpointError::Io {
        step: "delete a checkpoint retention let go",
        path: dir,
        source,
    })
}

/// Removes `dir` (absent is fine); returns the bytes it held.
pub(crate) async fn remove_tree(dir: std::path::PathBuf) -> std::io::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let size = tree_size(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Size in bytes of all files below `path`.
pub(crate) fn tree_size(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_size(&e.path()))
        .sum()
}

/// A command for PostgreSQL program `name` (see [`crate::pgbin::command`]);
/// not finding the programs is this step's failure.
pub(crate) fn program(
    bindir: &crate::pgbin::Bindir,
    name: &str,
    owner: Option<(u32, u32)>,
) -> Result<tokio::process::Command, CheckpointError> {
    bindir.command(name, owner).map_err(|source| CheckpointError::Tool {
        step: format!("finding {name}"),
        source,
    })
}

#[cfg(test)]
mod run_id_tests {
    #[test]
    fn only_backstop_run_ids_name_a_folder_to_delete() {
        assert!(super::is_run_id("20261204-174512345-1a2b3c4"));
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc",
            "20261204-174512345-",
            "20261204-174512345-1a2b/../x",
            "2026120-174512345-1a2b3c4",
        ] {
            assert!(!super::is_run_id(bad), "{bad:?}");
        }
    }
}
