//! The `dump` checkpoint backend: a logical `pg_dump -Fc` of one database, for
//! any PostgreSQL URL. Restore renames the damaged database to
//! `<db>_backstop_<run>` (kept, connections disabled) and recreates the original
//! name from the dump with `pg_restore --create`. Needs a role that may create
//! databases. The data-loss window is everything written after the dump.

use std::path::PathBuf;

use chrono::Utc;

use super::{tree_size, Checkpoint, CheckpointError, CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::db::{ident, Database};
use crate::pgbin;

/// Settings of the dump backend.
#[derive(Debug, Clone)]
pub struct DumpBackend {
    /// PostgreSQL client programs.
    pub bindir: pgbin::Bindir,
    /// Where dumps are kept (`<state>/checkpoints`).
    pub store: PathBuf,
}

impl DumpBackend {
    fn kept_name(db: &Database, run_id: &str) -> String {
        let mut name = format!("{}_backstop_{}", db.dbname(), run_id.replace('-', "_"));
        name.truncate(63);
        name
    }
}

#[async_trait::async_trait]
impl Checkpoint for DumpBackend {
    fn name(&self) -> &'static str {
        "dump"
    }

    async fn preflight(&self, db: &Database) -> Result<(), CheckpointError> {
        // pg_dump must be there before a run starts, not only when it needs it.
        crate::checkpoint::program(&self.bindir, "pg_dump", None)?;
        db.session().await?.release().await;
        Ok(())
    }

    async fn create(&self, db: &Database, run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        let dir = self.store.join(run_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| CheckpointError::Io {
                step: "create dump folder",
                path: dir.clone(),
                source,
            })?;
        let file = dir.join(format!("{}.dump", db.dbname()));
        let started_at = Utc::now();
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_dump", None)?;
        cmd.envs(db.libpq_env()).args(["-Fc", "--no-password", "-f"]).arg(&file);
        let _progress = crate::progress::Progress::bytes_of("checkpoint: pg_dump", file.clone(), None);
        pgbin::run(cmd, "pg_dump")
            .await
            .map_err(|source| CheckpointError::Tool {
                step: format!("pg_dump of {}", db.describe()),
                source,
            })?;
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: file.display().to_string(),
            database: db.describe(),
            started_at,
            completed_at: Utc::now(),
            size_bytes: tree_size(&file),
            restore_drill: "not run (dump backend)".into(),
            drill: crate::checkpoint::DrillVerdict::NotRun,
            base: None,
        })
    }

    async fn drill(
        &self,
        _db: &Database,
        checkpoint: &CheckpointRecord,
    ) -> Result<crate::checkpoint::DrillOutcome, CheckpointError> {
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_restore", None)?;
        cmd.arg("--list").arg(&checkpoint.location);
        let listing = pgbin::run(cmd, "pg_restore --list")
            .await
            .map_err(|source| CheckpointError::Tool {
                step: format!("reading the dump {}", checkpoint.location),
                source,
            })?;
        let entries = listing
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .count();
        Ok(crate::checkpoint::DrillOutcome::Passed(format!(
            "the dump is readable: {entries} entries listed by pg_restore"
        )))
    }

    async fn restore(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        _target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        let started_at = Utc::now();
        let name = db.dbname().to_string();
        let kept = Self::kept_name(db, run_id);
        let restored = self.store.join(run_id).join("restored");
        let admin = db.sibling("postgres");
        let client = admin.connect().await?;
        let database = admin.describe();
        let query = |step: &'static str| {
            let database = database.clone();
            move |source| CheckpointError::Query { database, step, source }
        };
        let exists = |n: String| {
            let client = &client;
            async move {
                client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&n])
                    .await
                    .map(|r| r.is_some())
            }
        };
        if exists(kept.clone())
            .await
            .map_err(query("looking for the kept database"))?
        {
            // Resumed: the damaged database is already kept. A database under
            // the original name is either the finished restore, live and maybe
            // written to (never dropped), or a half-finished one whose
            // pg_restore died with backstop (rebuilt).
            let finished = exists(name.clone()).await.map_err(query("looking for the database"))?;
            if finished && restored.exists() {
                return Ok(RestoreRecord {
                    started_at,
                    finished_at: Utc::now(),
                    target: format!("dump taken at {}", checkpoint.completed_at.to_rfc3339()),
                    kept: format!("database {kept}"),
                    manifest_patch: None,
                    databases: vec![name.clone()],
                    writes_stopped_at: None,
                    lost_commits: None,
                    lost_writes: None,
                });
            }
            if finished {
                // A rename or drop fails while a session is still there.
                crate::db::end_sessions_on(&client, &name, 0)
                    .await
                    .map_err(query("closing sessions"))?;
                client
                    .batch_execute(&format!("DROP DATABASE {}", ident(&name)))
                    .await
                    .map_err(query("dropping a partial restore"))?;
            }
        } else {
            client
                .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", ident(&name)))
                .await
                .map_err(query("refusing new connections"))?;
            crate::db::end_sessions_on(&client, &name, 0)
                .await
                .map_err(query("closing sessions"))?;
            client
                .batch_execute(&format!("ALTER DATABASE {} RENAME TO {}", ident(&name), ident(&kept)))
                .await
                .map_err(query("keeping the damaged database"))?;
        }
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_restore", None)?;
        cmd.envs(db.sibling("postgres").libpq_env())
            .args(["--create", "--exit-on-error", "--no-password", "-d", "postgres"])
            .arg(&checkpoint.location);
        let progress = crate::progress::Progress::spinner(&format!("restore: pg_restore of {}", db.dbname()));
        pgbin::run(cmd, "pg_restore")
            .await
            .map_err(|source| CheckpointError::Tool {
                step: format!("pg_restore into {}", db.describe()),
                source,
            })?;
        drop(progress);
        // From now on the restored database is live: a resumed restore keeps it.
        if let Some(dir) = restored.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
                step: "record the finished restore",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::File::create(&restored)
            .and_then(|f| f.sync_all())
            // The name too: a marker lost to a crash would restore again
            // over the live database.
            .and_then(|()| restored.parent().map_or(Ok(()), crate::journal::sync_dir))
            .map_err(|source| CheckpointError::Io {
                step: "record the finished restore",
                path: restored.clone(),
                source,
            })?;
        super::local::pause_point("dump-restored").await;
        Ok(RestoreRecord {
            started_at,
            finished_at: Utc::now(),
            target: format!("dump taken at {}", checkpoint.completed_at.to_rfc3339()),
            kept: format!("database {kept}"),
            manifest_patch: None,
            databases: vec![name.clone()],
            writes_stopped_at: None,
            lost_commits: None,
            lost_writes: None,
        })
    }

    /// The run's dump files (a database its restore kept aside stays: it
    /// lives in the server, where a person decides about it).
    async fn prune(&self, run_id: &str) -> Result<u64, CheckpointError> {
        super::prune_run_dir(&self.store, run_id).await
    }
}
