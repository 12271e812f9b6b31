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
        while std::time::Instant::now() < deadline {
            if self.wal_archive.join(&segment).exists() {
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
        let started_at = Utc::now();
        let kept = self.kept_dir(run_id);
        let base = PathBuf::from(&checkpoint.location);
        let owner = if kept.exists() {
            // Resumed: the original is already safe in `kept`; anything at pgdata is
            // our own half-finished restore.
            let owner = pgbin::owner_of(&kept).map_err(Self::tool("inspecting the kept data directory"))?;
            if self.pgdata.exists() {
                let _ = self
                    .pg_ctl(
                        &["stop", "-D", &self.pgdata.to_string_lossy(), "-m", "immediate", "-w"],
                        owner,
                        "stop",
                    )
                    .await;
                tokio::fs::remove_dir_all(&self.pgdata)
                    .await
                    .map_err(Self::io("remove partial restore", &self.pgdata))?;
            }
            owner
        } else {
            let owner = pgbin::owner_of(&self.pgdata).map_err(Self::tool("inspecting the data directory"))?;
            self.flush_wal(db, target).await;
            let pgdata = self.pgdata.to_string_lossy().into_owned();
            if self.pgdata.join("postmaster.pid").exists() {
                self.pg_ctl(
                    &["stop", "-D", &pgdata, "-m", "fast", "-w", "-t", "120"],
                    owner,
                    "stopping the server",
                )
                .await?;
            }
            tokio::fs::rename(&self.pgdata, &kept)
                .await
                .map_err(Self::io("keep the old data directory", &kept))?;
            owner
        };

        // New data directory from the base backup.
        std::fs::create_dir(&self.pgdata).map_err(Self::io("create data directory", &self.pgdata))?;
        set_mode_0700(&self.pgdata).map_err(Self::io("set data directory mode", &self.pgdata))?;
        untar(&base.join("base.tar"), &self.pgdata).await?;
        let wal = self.pgdata.join("pg_wal");
        tokio::fs::create_dir_all(&wal)
            .await
            .map_err(Self::io("create pg_wal", &wal))?;
        untar(&base.join("pg_wal.tar"), &wal).await?;
        // WAL that never reached the archive (server stopped early): take it from
        // the old pg_wal, as the PostgreSQL PITR procedure says.
        copy_unarchived_wal(&kept.join("pg_wal"), &wal, &self.wal_archive)?;

        // The LSN read before the migration is exact; a time target (from a
        // CNPG recovery manifest) is the fallback. PostgreSQL wants
        // `YYYY-MM-DD HH:MM:SS.ffffff+00`, not RFC 3339.
        let time = target.time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        let (target_line, target_text) = if target.lsn.is_empty() {
            (format!("recovery_target_time = '{time}'"), format!("time {time}"))
        } else {
            (
                format!("recovery_target_lsn = '{}'", target.lsn),
                format!("lsn {} (time {time})", target.lsn),
            )
        };
        let settings = format!(
            "\n{MARK} (run {run_id})\nrestore_command = 'cp \"{archive}/%f\" \"%p\"'\n{target_line}\n\
             recovery_target_inclusive = off\nrecovery_target_timeline = 'current'\nrecovery_target_action = 'promote'\n",
            archive = self.wal_archive.display(),
        );
        let auto = self.pgdata.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
        conf.push_str(&settings);
        std::fs::write(&auto, conf).map_err(Self::io("write recovery settings", &auto))?;
        let signal = self.pgdata.join("recovery.signal");
        std::fs::write(&signal, "").map_err(Self::io("write recovery.signal", &signal))?;
        pgbin::chown_tree(&self.pgdata, owner)
            .await
            .map_err(Self::tool("giving the data directory to its owner"))?;

        let log = self.pgdata.join("backstop-restore.log");
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        self.pg_ctl(
            &["start", "-D", &pgdata, "-w", "-t", "300", "-l", &log.to_string_lossy()],
            owner,
            "starting the restored server",
        )
        .await
        .map_err(|e| match e {
            CheckpointError::Tool { step, source } => CheckpointError::Tool {
                step: format!(
                    "{step} (server log: {})",
                    pgbin::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5)
                ),
                source,
            },
            other => other,
        })?;

        // Wait for promotion, then drop the recovery settings.
        let deadline = tokio::time::Instant::now() + self.recovery_timeout;
        loop {
            if let Ok(client) = db.connect().await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !row.get::<_, bool>(0) {
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
                        break;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CheckpointError::RecoveryTimeout {
                    pgdata: self.pgdata.clone(),
                    seconds: self.recovery_timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(RestoreRecord {
            started_at,
            finished_at: Utc::now(),
            target: target_text,
            kept: kept.display().to_string(),
            manifest_patch: None,
        })
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

async fn untar(archive: &Path, into: &Path) -> Result<(), CheckpointError> {
    let mut cmd = tokio::process::Command::new("tar");
    cmd.arg("-xf").arg(archive).arg("-C").arg(into);
    pgbin::run(cmd, "tar")
        .await
        .map(|_| ())
        .map_err(|source| CheckpointError::Tool {
            step: format!("extracting {}", archive.display()),
            source,
        })
}

/// Copies WAL segment files from `old` to `new` that the archive does not hold.
fn copy_unarchived_wal(old: &Path, new: &Path, archive: &Path) -> Result<(), CheckpointError> {
    let Ok(entries) = std::fs::read_dir(old) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        let is_segment = text.len() == 24 && text.chars().all(|c| c.is_ascii_hexdigit());
        if !is_segment || archive.join(text).exists() {
            continue;
        }
        let dest = new.join(text);
        std::fs::copy(entry.path(), &dest).map_err(|source| CheckpointError::Io {
            step: "copy unarchived WAL",
            path: dest.clone(),
            source,
        })?;
    }
    Ok(())
}
