//! Stopping, starting and watching the PostgreSQL server a restore rewinds,
//! shared by the backends that restore a data directory in place.

use std::path::PathBuf;
use std::time::Duration;

use super::CheckpointError;
use crate::db::Database;
use crate::pgbin;

/// What a recovery writes into `postgresql.auto.conf`, reset after promotion.
pub const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
];

/// The server behind a data directory, run by `pg_ctl` as its owner.
#[derive(Debug, Clone)]
pub struct Server {
    pub bindir: pgbin::Bindir,
    pub pgdata: PathBuf,
    /// How long recovery may take before the restore is declared failed.
    pub recovery_timeout: Duration,
}

impl Server {
    pub(crate) async fn pg_ctl(&self, args: &[&str], owner: (u32, u32), step: &str) -> Result<String, CheckpointError> {
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_ctl", Some(owner))?;
        cmd.args(args);
        pgbin::run(cmd, "pg_ctl").await.map_err(|source| CheckpointError::Tool {
            step: step.to_string(),
            source,
        })
    }

    /// Stops the server when it runs (`pg_ctl stop -m <mode> -w`). A server
    /// that stops on its own meanwhile, as when an earlier attempt (killed)
    /// asked it to shut down and that shutdown ends between the look and
    /// pg_ctl's, is what was asked: pg_ctl's "PID file does not exist" is
    /// then no failure. The postmaster removes its PID file last.
    pub(crate) async fn stop(&self, mode: &str, owner: (u32, u32), step: &str) -> Result<(), CheckpointError> {
        let pid = self.pgdata.join("postmaster.pid");
        if !pid.exists() {
            return Ok(());
        }
        super::local::pause_point("server-stop-looked").await;
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        match self
            .pg_ctl(&["stop", "-D", &pgdata, "-m", mode, "-w", "-t", "120"], owner, step)
            .await
        {
            Err(e) if pid.exists() => Err(e),
            Err(e) => {
                tracing::debug!(error = %crate::run::chain(&e), "the server stopped on its own meanwhile");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    pub(crate) async fn start(&self, owner: (u32, u32), step: &str) -> Result<(), CheckpointError> {
        let log = self.pgdata.join("backstop-restore.log");
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        self.pg_ctl(
            &["start", "-D", &pgdata, "-w", "-t", "300", "-l", &log.to_string_lossy()],
            owner,
            step,
        )
        .await
        .map(|_| ())
        .map_err(|e| with_log_tail(e, &log))
    }

    /// Waits until the restored server has left recovery.
    pub(crate) async fn await_promotion(&self, db: &Database) -> Result<(), CheckpointError> {
        let deadline = tokio::time::Instant::now() + self.recovery_timeout;
        loop {
            if let Ok(client) = db.connect().await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !row.get::<_, bool>(0) {
                        return Ok(());
                    }
                }
            }
            if !self.pgdata.join("postmaster.pid").exists() {
                let log = self.pgdata.join("backstop-restore.log");
                return Err(CheckpointError::RecoveryStopped {
                    pgdata: self.pgdata.clone(),
                    log: pgbin::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CheckpointError::RecoveryTimeout {
                    pgdata: self.pgdata.clone(),
                    seconds: self.recovery_timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops the recovery settings from the promoted server's configuration.
    pub(crate) async fn clear_recovery_settings(&self, db: &Database) -> Result<(), CheckpointError> {
        let client = db.connect().await?;
        // ALTER SYSTEM refuses to run in a (multi-statement) transaction.
        for setting in RECOVERY_SETTINGS {
            client
                .batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
                .await
                .map_err(|source| CheckpointError::Query {
                    database: db.describe(),
                    step: "clearing recovery settings",
                    source,
                })?;
        }
        let _ = client.batch_execute("SELECT pg_reload_conf()").await;
        Ok(())
    }
}

/// A failed `pg_ctl start` with the last lines of the server's log in its
/// step: pg_ctl itself only says "Examine the log output", and the log may
/// be deleted with its directory.
pub(crate) fn with_log_tail(e: CheckpointError, log: &std::path::Path) -> CheckpointError {
    match e {
        CheckpointError::Tool { step, source } => CheckpointError::Tool {
            step: format!(
                "{step} (server log: {})",
                pgbin::tail(&std::fs::read_to_string(log).unwrap_or_default(), 5)
            ),
            source,
        },
        other => other,
    }
}
