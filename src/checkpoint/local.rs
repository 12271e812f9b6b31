//! The `local` checkpoint backend: a PostgreSQL server whose data directory and
//! WAL archive backstop can reach on disk. Checkpoint = `pg_basebackup` (tar,
//! WAL streamed in); restore = real point-in-time recovery to the LSN read
//! before the migration, restarting the server on a new data directory. The
//! previous data directory is renamed `<pgdata>.backstop-<run>` and never deleted.
//! A restore rewinds the whole server (every database in it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;

use super::{tree_size, Checkpoint, CheckpointError, CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::db::Database;
use crate::pgbin;

mod restore;

pub(crate) use restore::pause_point;
use restore::untar;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    /// PostgreSQL programs.
    pub bindir: PathBuf,
    /// The server's data directory.
    pub pgdata: PathBuf,
    /// The folder the server's `archive_command` copies WAL segments to.
    pub wal_archive: PathBuf,
    /// Where base backups are kept (`<state>/checkpoints`).
    pub store: PathBuf,
    /// How long recovery may take before the restore is declared failed.
    pub recovery_timeout: Duration,
}

const MARK: &str = "# backstop restore settings";
const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "recovery_target_lsn",
    "recovery_target_time",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
];

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

    fn kept_dir(&self, run_id: &str) -> PathBuf {
        let mut name = self.pgdata.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".backstop-{run_id}"));
        self.pgdata.with_file_name(name)
    }

    async fn pg_ctl(&self, args: &[&str], owner: (u32, u32), step: &str) -> Result<String, CheckpointError> {
        let mut cmd = pgbin::command(&self.bindir, "pg_ctl", Some(owner));
        cmd.args(args);
        pgbin::run(cmd, "pg_ctl").await.map_err(Self::tool(step))
    }

    /// Makes sure the archive holds the WAL segment of the recovery target:
    /// switches segments and waits (bounded) for it. Later segments are not
    /// needed. Best effort: when the server is down, the old data directory's
    /// `pg_wal` supplies what the archive lacks.
    async fn flush_wal(&self, db: &Database, target: &RecoveryPoint) {
        let Ok(client) = db.connect().await else { return };
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
        let mut cmd = pgbin::command(&self.bindir, "pg_controldata", None);
        cmd.arg("-D").arg(&self.pgdata);
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
        let wait = ARCHIVE_PREFLIGHT_WAIT;
        let deadline = std::time::Instant::now() + wait;
        let size: i64 = client
            .query_one(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
                &[],
            )
            .await
            .map_err(query("reading wal_segment_size"))?
            .get(0);
        while std::time::Instant::now() < deadline {
            // Complete, not a truncated copy a full archive left behind.
            let len = std::fs::metadata(self.wal_archive.join(&segment)).map(|m| m.len());
            if len.is_ok_and(|l| l == size as u64) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let detail = client
            .query_one(
                "SELECT format('pg_stat_archiver: last archived %s, last failed %s at %s, %s failures', coalesce(last_archived_wal, '-'), coalesce(last_failed_wal, '-'), coalesce(last_failed_time::text, '-'), failed_count) FROM pg_stat_archiver",
                &[],
            )
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|e| format!("pg_stat_archiver unreadable: {e}"));
        Err(CheckpointError::ArchiveNotReached {
            database: db.describe(),
            archive: self.wal_archive.clone(),
            segment,
            seconds: wait.as_secs(),
            detail,
        })
    }
}

impl LocalBackend {
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

    /// Preflight: room for the base backup in the checkpoint store, and for
    /// a checkpoint's worth of WAL (`max_wal_size`) in the archive.
    async fn room(&self, db: &Database, client: &tokio_postgres::Client) -> Result<(), CheckpointError> {
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
                cluster.max(0) as u64,
                "the base backup is about the size of all databases of the server".to_string(),
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
                    "--pgdata to name the server's data directory ({} holds no PG_VERSION)",
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

    async fn create(&self, db: &Database, run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        let dir = self.store.join(run_id).join("base");
        if dir.exists() {
            // An interrupted attempt of this run: its partial backup is useless.
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(Self::io("remove partial backup", &dir))?;
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(Self::io("create backup folder", &dir))?;
        let started_at = Utc::now();
        let mut cmd = pgbin::command(&self.bindir, "pg_basebackup", None);
        cmd.envs(db.libpq_env())
            .arg("-D")
            .arg(&dir)
            .args(["-Ft", "-X", "stream", "-c", "fast", "--no-password", "-l"])
            .arg(format!("backstop {run_id}"));
        pgbin::run(cmd, "pg_basebackup")
            .await
            .map_err(Self::tool(format!("pg_basebackup of {}", db.describe())))?;
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: dir.display().to_string(),
            database: db.describe(),
            started_at,
            completed_at: Utc::now(),
            size_bytes: tree_size(&dir),
            restore_drill: "not run (local backend: restore is exercised on failure)".into(),
        })
    }

    async fn drill(&self, db: &Database, checkpoint: &CheckpointRecord) -> Result<String, CheckpointError> {
        let base = PathBuf::from(&checkpoint.location);
        let run = base
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut name = self.pgdata.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".backstop-drill-{run}"));
        // Next to the data directory, where the server's owner can reach it.
        let dir = self.pgdata.with_file_name(name);
        let owner = pgbin::owner_of(&self.pgdata).map_err(Self::tool("inspecting the data directory"))?;
        if dir.exists() {
            let _ = self
                .pg_ctl(
                    &["stop", "-D", &dir.to_string_lossy(), "-m", "immediate", "-w"],
                    owner,
                    "stop",
                )
                .await;
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(Self::io("remove an old drill", &dir))?;
        }
        std::fs::create_dir(&dir).map_err(Self::io("create drill directory", &dir))?;
        set_mode_0700(&dir).map_err(Self::io("set drill directory mode", &dir))?;
        untar(&base.join("base.tar"), &dir).await?;
        let wal = dir.join("pg_wal");
        tokio::fs::create_dir_all(&wal)
            .await
            .map_err(Self::io("create pg_wal", &wal))?;
        untar(&base.join("pg_wal.tar"), &wal).await?;
        // Servers whose configuration lives elsewhere (Debian's /etc) get a minimal one.
        for (file, text) in [
            ("postgresql.conf", ""),
            ("pg_hba.conf", "local all all trust\nhost all all 127.0.0.1/32 trust\n"),
        ] {
            let path = dir.join(file);
            if !path.exists() {
                std::fs::write(&path, text).map_err(Self::io("write drill configuration", &path))?;
            }
        }
        pgbin::chown_tree(&dir, owner)
            .await
            .map_err(Self::tool("giving the drill directory to its owner"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Self::io("find a free port", &dir))?
            .port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c archive_mode=off -c hot_standby=on",
            dir.display()
        );
        let log = dir.join("backstop-drill.log");
        let dir_s = dir.to_string_lossy().into_owned();
        let started = self
            .pg_ctl(
                &[
                    "start",
                    "-D",
                    &dir_s,
                    "-w",
                    "-t",
                    "300",
                    "-o",
                    &options,
                    "-l",
                    &log.to_string_lossy(),
                ],
                owner,
                "starting the drill copy",
            )
            .await;
        let answer = match started {
            Ok(_) => query_drill(db.at("127.0.0.1", port)).await,
            Err(e) => Err(e),
        };
        let _ = self
            .pg_ctl(
                &["stop", "-D", &dir_s, "-m", "immediate", "-w"],
                owner,
                "stopping the drill copy",
            )
            .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        answer
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

    /// The run's base backup. The data directory a restore set aside stays:
    /// it holds the writes of the data-loss window, the only copy; a person
    /// deletes it (the report names it).
    async fn prune(&self, run_id: &str) -> Result<u64, CheckpointError> {
        super::prune_run_dir(&self.store, run_id).await
    }
}

/// Queries the drill copy with the checkpointed database's credentials.
async fn query_drill(copy: Database) -> Result<String, CheckpointError> {
    let client = copy.connect().await?;
    let row = client
        .query_one("SELECT count(*) FROM pg_class WHERE relnamespace NOT IN (SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema', 'pg_toast'))", &[])
        .await
        .map_err(|source| CheckpointError::Query { database: copy.describe(), step: "querying the drill copy", source })?;
    let relations: i64 = row.get(0);
    Ok(format!(
        "a copy restored from the base backup started and answered ({relations} relations in {})",
        copy.dbname()
    ))
}

fn set_mode_0700(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}
