//! The `local` checkpoint backend: a PostgreSQL server whose data directory and
//! WAL archive backstop can reach on disk. A checkpoint is a recovery point:
//! it switches the WAL segment, confirms the archive holds it and every
//! segment since the newest base backup, and relies on that base backup; a
//! new `pg_basebackup` (tar, WAL streamed in) is taken only when the
//! [`BasePolicy`] says so ([`catalog`]). Its cost does not grow with the
//! database. Restore = real point-in-time recovery from that base backup to
//! the LSN read before the migration, restarting the server on a new data
//! directory. The previous data directory is renamed `<pgdata>.backstop-<run>`
//! and never deleted. A restore rewinds the whole server (every database in it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;

use super::base::{format_lsn, BaseDue, BasePolicy, BaseUse};
use super::server::Server;
use super::{Checkpoint, CheckpointError, CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::db::Database;
use crate::pgbin;

mod catalog;
pub use catalog::unused_bases;
mod drill;
mod restore;
mod window;

pub(crate) use restore::pause_point;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    /// PostgreSQL programs.
    pub bindir: pgbin::Bindir,
    /// The server's data directory.
    pub pgdata: PathBuf,
    /// The folder the server's `archive_command` copies WAL segments to.
    pub wal_archive: PathBuf,
    /// Where base backups are kept (`<state>/checkpoints`).
    pub store: PathBuf,
    /// How long recovery may take before the restore is declared failed.
    pub recovery_timeout: Duration,
    /// When a checkpoint takes a new base backup.
    pub policy: BasePolicy,
}

const MARK: &str = "# backstop restore settings";

impl LocalBackend {
    fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
        move |source| CheckpointError::Io {
            step,
            path: path.to_path_buf(),
            source,
        }
    }

    fn tool(step: impl Into<String>) -> impl FnOnce(pgbin::PgBinError) -> CheckpointError {
        let step = step.into();
        move |source| CheckpointError::Tool { step, source }
    }

    /// The server whose data directory this backend restores.
    pub(crate) fn server(&self) -> Server {
        Server {
            bindir: self.bindir.clone(),
            pgdata: self.pgdata.clone(),
            recovery_timeout: self.recovery_timeout,
        }
    }

    fn kept_dir(&self, run_id: &str) -> PathBuf {
        let mut name = self.pgdata.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".backstop-{run_id}"));
        self.pgdata.with_file_name(name)
    }

    /// Makes sure the archive holds the WAL segment of the recovery target:
    /// switches segments and waits (bounded) for it. Later segments are not
    /// needed. Best effort: when the server is down, the old data directory's
    /// `pg_wal` supplies what the archive lacks.
    /// A connection to the server: to `db`, or to its `postgres` database
    /// when `db` refuses connections (a restore that kept the lost writes
    /// closed it first).
    pub(crate) async fn server_connection(db: &Database) -> Option<tokio_postgres::Client> {
        match db.connect().await {
            Ok(c) => Some(c),
            Err(_) => db.sibling("postgres").connect().await.ok(),
        }
    }

    async fn flush_wal(&self, db: &Database, target: &RecoveryPoint) {
        let Some(client) = Self::server_connection(db).await else {
            return;
        };
        // Without an LSN (a time target), the segment being written now.
        let lsn = if target.lsn.is_empty() {
            "pg_current_wal_lsn()".to_string()
        } else {
            "$1::text::pg_lsn".to_string()
        };
        let query = format!("SELECT pg_walfile_name({lsn})");
        let result = if target.lsn.is_empty() {
            client.query_one(&query, &[]).await
        } else {
            client.query_one(&query, &[&target.lsn]).await
        };
        let Ok(row) = result else {
            return;
        };
        let segment: String = row.get(0);
        if self.wal_archive.join(&segment).exists() {
            return;
        }
        if client.query_one("SELECT pg_switch_wal()", &[]).await.is_err() {
            return;
        }
        let archived = self.wal_archive.join(&segment);
        for _ in 0..600 {
            if archived.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(segment, "WAL segment not archived after 60s; relying on the old pg_wal");
    }

    /// Preflight: the server behind the URL is the one whose data directory
    /// is `--pgdata` (a restore stops that server and replaces its data).
    async fn same_server(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
        let server: String = client
            .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
            .await
            .map_err(|source| CheckpointError::Query {
                database: db.describe(),
                step: "reading the system identifier",
                source,
            })?
            .get(0);
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_controldata", None)?;
        pgbin::untranslated(&mut cmd).arg("-D").arg(&self.pgdata);
        let out = pgbin::run(cmd, "pg_controldata")
            .await
            .map_err(Self::tool(format!("pg_controldata of {}", self.pgdata.display())))?;
        let data = out
            .lines()
            .find_map(|l| l.strip_prefix("Database system identifier:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        if data != server {
            return Err(CheckpointError::WrongServer {
                database: db.describe(),
                pgdata: self.pgdata.clone(),
                server,
                data,
            });
        }
        Ok(())
    }

    /// Preflight: WAL really reaches `--wal-archive`: switch a segment and
    /// wait (bounded) for it to arrive there.
    async fn archive_reached(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
        let query = |step| {
            let database = db.describe();
            move |source| CheckpointError::Query { database, step, source }
        };
        // Write a little WAL so that the switch closes a segment of our own.
        client
            .query_one(
                "SELECT pg_logical_emit_message(false, 'backstop', 'preflight')::text",
                &[],
            )
            .await
            .map_err(query("writing a WAL record"))?;
        let segment: String = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(query("switching the WAL segment"))?
            .get(0);
        let size: i64 = client
            .query_one(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
                &[],
            )
            .await
            .map_err(query("reading wal_segment_size"))?
            .get(0);
        self.await_archived(db, client, &segment, size.max(1) as u64, ARCHIVE_PREFLIGHT_WAIT)
            .await
    }
}

impl LocalBackend {
    /// Whether a checkpoint now takes a new base backup, and why.
    fn due(&self, here: &catalog::Here) -> Option<BaseDue> {
        let newest = self.bases(&here.system).pop();
        self.policy
            .due(newest.as_ref().map(|(_, b)| b), &here.position, Utc::now())
    }

    /// Preflight: the role may run `pg_basebackup`.
    async fn may_replicate(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
        let row = client
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|source| CheckpointError::Query {
                database: db.describe(),
                step: "reading the role's attributes",
                source,
            })?;
        if row.get::<_, bool>(1) {
            return Ok(());
        }
        Err(CheckpointError::NoReplication {
            database: db.describe(),
            user: row.get(0),
        })
    }

    /// Preflight: the archiver's last attempt did not fail (a full archive
    /// leaves the archiver failing on every retry).
    async fn archiver_healthy(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
        let row = client
            .query_one(
                "SELECT failed_count > 0 AND last_failed_time > coalesce(last_archived_time, '-infinity'),
                        format('%s failure(s), the last of %s at %s; last archived %s at %s', failed_count,
                               coalesce(last_failed_wal, '-'), coalesce(last_failed_time::text, '-'),
                               coalesce(last_archived_wal, '-'), coalesce(last_archived_time::text, '-'))
                   FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(|source| CheckpointError::Query {
                database: db.describe(),
                step: "reading pg_stat_archiver",
                source,
            })?;
        if row.get::<_, Option<bool>>(0) == Some(true) {
            return Err(CheckpointError::ArchiveFailing {
                database: db.describe(),
                detail: format!("pg_stat_archiver: {}", row.get::<_, String>(1)),
            });
        }
        Ok(())
    }

    /// Preflight: room for a base backup in the checkpoint store when the
    /// policy will take one, and for a checkpoint's worth of WAL
    /// (`max_wal_size`) in the archive.
    async fn room(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
        let here = self.here(db, client).await?;
        let due = self.due(&here).is_some();
        let row = client
            .query_one(
                "SELECT (SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint,
                        (SELECT setting::bigint FROM pg_settings WHERE name = 'max_wal_size') * 1024 * 1024",
                &[],
            )
            .await
            .map_err(|source| CheckpointError::Query {
                database: db.describe(),
                step: "reading the server's size",
                source,
            })?;
        let (cluster, max_wal): (i64, i64) = (row.get(0), row.get(1));
        let mib = |b: u64| b / (1024 * 1024);
        std::fs::create_dir_all(&self.store).map_err(Self::io("create the checkpoint store", &self.store))?;
        let checks = [
            (
                "the checkpoint store",
                &self.store,
                if due { cluster.max(0) as u64 } else { 0 },
                "a new base backup is due, and it is about the size of all databases of the server".to_string(),
            ),
            (
                "the WAL archive",
                &self.wal_archive,
                max_wal.max(0) as u64,
                "max_wal_size: the WAL a migration may write before the next checkpoint".to_string(),
            ),
        ];
        for (what, path, needed, why) in checks {
            let free = free_bytes(path).map_err(Self::io("measure free space", path))?;
            if free < needed {
                return Err(CheckpointError::NoSpace {
                    what,
                    path: path.clone(),
                    free: mib(free),
                    needed: mib(needed),
                    why,
                });
            }
        }
        Ok(())
    }
}

/// Bytes available to an unprivileged writer under `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// How long the archive preflight waits for a switched segment.
const ARCHIVE_PREFLIGHT_WAIT: Duration = Duration::from_secs(20);

#[async_trait::async_trait]
impl Checkpoint for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn preflight(&self, db: &Database) -> Result<(), CheckpointError> {
        if !self.pgdata.join("PG_VERSION").is_file() {
            return Err(CheckpointError::Misconfigured {
                what: format!(
                    "--pgdata to name the server's data directory ({:?} holds no PG_VERSION)",
                    self.pgdata.display()
                ),
            });
        }
        if !self.wal_archive.is_dir() {
            return Err(CheckpointError::Misconfigured {
                what: format!(
                    "--wal-archive to name an existing folder ({} is not one)",
                    self.wal_archive.display()
                ),
            });
        }
        let client = db.connect().await?;
        self.may_replicate(db, &client).await?;
        let query = |e| CheckpointError::Query {
            database: db.describe(),
            step: "reading archive settings",
            source: e,
        };
        let mode: String = client.query_one("SHOW archive_mode", &[]).await.map_err(query)?.get(0);
        let command: String = client
            .query_one("SHOW archive_command", &[])
            .await
            .map_err(query)?
            .get(0);
        if mode == "off" || command.trim().is_empty() || command == "(disabled)" {
            return Err(CheckpointError::NotArchiving {
                database: db.describe(),
                detail: format!("archive_mode = {mode}, archive_command = {command:?}"),
                archive: self.wal_archive.clone(),
            });
        }
        self.same_server(db, &client).await?;
        self.archiver_healthy(db, &client).await?;
        self.room(db, &client).await?;
        self.archive_reached(db, &client).await
    }

    /// A recovery point, not a copy: the newest base backup plus the archived
    /// WAL since; a new base backup only when the policy says so, or when
    /// the archive has a gap after the newest.
    async fn create(&self, db: &Database, run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        let started_at = Utc::now();
        let client = db.connect().await?;
        let here = self.here(db, &client).await?;
        let mut due = self.due(&here);
        let (mut dir, mut base) = match (&due, self.bases(&here.system).pop()) {
            (None, Some(newest)) => newest,
            _ => self.take_base(db, run_id, &here.system).await?,
        };
        let mut lsn = self.switch_and_confirm(db, &client, here.segment_size).await?;
        if let Some(segment) = self.first_gap(&base, lsn, here.segment_size) {
            if due.is_some() {
                return Err(CheckpointError::ArchiveGap {
                    database: db.describe(),
                    archive: self.wal_archive.display().to_string(),
                    segment,
                });
            }
            tracing::warn!(segment, base = %base.label, "the WAL archive has a gap after the newest base backup; taking a new one");
            due = Some(BaseDue::ArchiveGap { segment });
            (dir, base) = self.take_base(db, run_id, &here.system).await?;
            lsn = self.switch_and_confirm(db, &client, here.segment_size).await?;
            if let Some(segment) = self.first_gap(&base, lsn, here.segment_size) {
                return Err(CheckpointError::ArchiveGap {
                    database: db.describe(),
                    archive: self.wal_archive.display().to_string(),
                    segment,
                });
            }
        }
        self.record_use(run_id, &base.label)?;
        let start = super::base::parse_lsn(&base.start_lsn).unwrap_or(0);
        let used = BaseUse {
            taken_because: due.as_ref().map(ToString::to_string),
            checkpoint_lsn: format_lsn(lsn),
            replay_bytes: lsn.saturating_sub(start),
            base,
        };
        tracing::info!(base = %used.base.label, taken = due.is_some(), replay_bytes = used.replay_bytes, "checkpoint: recovery point confirmed in the WAL archive");
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: dir.display().to_string(),
            database: db.describe(),
            started_at,
            completed_at: Utc::now(),
            size_bytes: if due.is_some() { used.base.size_bytes } else { 0 },
            restore_drill: "not run (local backend: restore is exercised on failure)".into(),
            drill: crate::checkpoint::DrillVerdict::NotRun,
            base: Some(used),
        })
    }

    async fn drill(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
    ) -> Result<crate::checkpoint::DrillOutcome, CheckpointError> {
        self.drill_copy(db, checkpoint)
            .await
            .map(crate::checkpoint::DrillOutcome::Passed)
    }

    async fn restore(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        self.restore_in_place(db, checkpoint, target, run_id).await
    }

    /// The run's claim on its base backup. The data directory a restore set aside stays:
    /// it holds the writes of the data-loss window, the only copy; a person
    /// deletes it (the report names it).
    /// Base backups no kept run relies on go too (never the newest).
    async fn prune(&self, run_id: &str) -> Result<u64, CheckpointError> {
        let run = super::prune_run_dir(&self.store, run_id).await?;
        Ok(run + self.prune_bases().await?)
    }
}

fn set_mode_0700(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Writes an empty marker file durably (file and folder synced).
pub(crate) fn write_marker(path: &Path) -> std::io::Result<()> {
    catalog::write_synced(path, b"")
}
