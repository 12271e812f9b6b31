//! The `pgbackrest` checkpoint backend, for servers that already back up
//! with pgBackRest: backstop uses the stanza instead of keeping copies of
//! its own.
//!
//! - **Checkpoint** = a recovery point in the stanza's archive: write a WAL
//!   record, switch the segment, and wait until `pg_stat_archiver` reports
//!   it archived (the stanza's `archive-push` is the server's
//!   `archive_command`). It relies on the stanza's newest backup of this
//!   server on its current timeline; `pgbackrest backup --type=incr` runs only
//!   when the [`BasePolicy`] says so (pgBackRest makes the first one full).
//!   PostgreSQL archives segments in order and retries a failed one until it
//!   succeeds, so a healthy archiver that reached the switched segment has
//!   every segment since that backup.
//! - **Restore** = stop the server, `pgbackrest restore --delta --type=lsn
//!   --target=<LSN before the migration> --target-exclusive --set=<the
//!   checkpoint's backup> --target-action=promote`, start it, wait for the
//!   promotion. `--delta` rewrites only the files that differ, so the data
//!   directory is restored in place: the writes after the recovery point are
//!   not kept in a directory but stay in the stanza's archive on the old
//!   timeline (the record says where).
//! - **Resumable**: `<store>/<run>/restore-begun` is written before the server
//!   is stopped, `<store>/<run>/server-stopped` once it is down,
//!   `<store>/<run>/restored-server-started` before the restored one starts.
//!   After the last, a resumed restore only finishes (starts the server if
//!   down, waits for the promotion); it never restores over a server that
//!   may have taken writes. Before the server is known down, a resumed
//!   restore stops it (the original, still running or shutting down). After
//!   that, it runs the idempotent `--delta` restore again, unless a server
//!   runs there that it did not start: then a person decides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::base::{format_lsn, parse_lsn, BaseBackup, BasePolicy, BaseUse, ServerPosition};
use super::server::Server;
use super::{Checkpoint, CheckpointError, CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::db::Database;
use crate::pgbin;

/// Settings of the pgbackrest backend.
#[derive(Debug, Clone)]
pub struct PgBackRestBackend {
    /// The `pgbackrest` program.
    pub program: PathBuf,
    pub stanza: String,
    /// `--config` for pgbackrest (None: its default).
    pub config: Option<PathBuf>,
    /// The server restored in place (`--pgdata`).
    pub server: Server,
    /// Where restore markers are kept (`<state>/checkpoints`).
    pub store: PathBuf,
    /// When a checkpoint runs an incremental backup.
    pub policy: BasePolicy,
}

const BEGUN: &str = "restore-begun";
const STARTED: &str = "restored-server-started";
/// Written once the original server is down: a server running after it was
/// started by someone else.
const STOPPED: &str = "server-stopped";
/// How long a checkpoint waits for the switched segment to be archived.
const ARCHIVE_WAIT: Duration = Duration::from_secs(30);

impl PgBackRestBackend {
    fn owner(&self) -> Result<(u32, u32), CheckpointError> {
        pgbin::owner_of(&self.server.pgdata).map_err(|source| CheckpointError::Tool {
            step: "inspecting the data directory".into(),
            source,
        })
    }

    /// Runs `pgbackrest [--config] --stanza <args>` as the data directory's owner.
    async fn pgbackrest(&self, args: &[&str], step: &str) -> Result<String, CheckpointError> {
        let owner = self.owner()?;
        let mut cmd = pgbin::tool(&self.program.to_string_lossy());
        if nix::unistd::geteuid().is_root() && owner.0 != 0 {
            cmd.uid(owner.0).gid(owner.1);
        }
        if let Some(config) = &self.config {
            cmd.arg(format!("--config={}", config.display()));
        }
        cmd.arg(format!("--stanza={}", self.stanza)).args(args);
        pgbin::run(cmd, "pgbackrest")
            .await
            .map_err(|source| CheckpointError::Tool {
                step: format!("{step} (pgbackrest stanza {})", self.stanza),
                source,
            })
    }

    fn query_err(db: &Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CheckpointError {
        let database = db.describe();
        move |source| CheckpointError::Query { database, step, source }
    }

    /// System identifier and WAL position of the server.
    async fn here(
        &self,
        db: &Database,
        client: &tokio_postgres::Client,
    ) -> Result<(String, ServerPosition), CheckpointError> {
        let row = client
            .query_one(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                        pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text",
                &[],
            )
            .await
            .map_err(Self::query_err(db, "reading the server's WAL position"))?;
        let file: String = row.get(1);
        Ok((
            row.get(0),
            ServerPosition {
                timeline: timeline_of(&file),
                lsn: parse_lsn(&row.get::<_, String>(2)).unwrap_or(0),
            },
        ))
    }

    /// The stanza's newest backup of server `system`.
    async fn newest(&self, system: &str) -> Result<Option<BaseBackup>, CheckpointError> {
        let out = self
            .pgbackrest(&["--output=json", "info"], "reading the backups")
            .await?;
        Ok(newest_backup(&out, system))
    }

    /// Writes a record, switches the segment and waits until the archiver
    /// has pushed it. Returns the record's position.
    async fn switch_and_confirm(&self, db: &Database, client: &tokio_postgres::Client) -> Result<u64, CheckpointError> {
        let mark: String = client
            .query_one(
                "SELECT pg_logical_emit_message(false, 'backstop', 'checkpoint')::text",
                &[],
            )
            .await
            .map_err(Self::query_err(db, "writing the checkpoint's WAL record"))?
            .get(0);
        let segment: String = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(Self::query_err(db, "switching the WAL segment"))?
            .get(0);
        match super::base::await_archived(client, &segment, ARCHIVE_WAIT).await {
            Ok(()) => Ok(parse_lsn(&mark).unwrap_or(0)),
            Err(super::base::NotArchived::Unreadable(e)) => Err(Self::query_err(db, "reading pg_stat_archiver")(e)),
            Err(super::base::NotArchived::Waited(detail)) => Err(CheckpointError::ArchiveNotReached {
                database: db.describe(),
                archive: PathBuf::from(format!("pgbackrest stanza {}", self.stanza)),
                segment,
                seconds: ARCHIVE_WAIT.as_secs(),
                detail,
            }),
        }
    }

    fn marker(&self, run_id: &str, name: &str) -> PathBuf {
        self.store.join(run_id).join(name)
    }

    fn running(&self) -> bool {
        self.server.pgdata.join("postmaster.pid").exists()
    }
}

#[async_trait::async_trait]
impl Checkpoint for PgBackRestBackend {
    fn name(&self) -> &'static str {
        "pgbackrest"
    }

    /// The stanza is configured and healthy (`pgbackrest check` switches a
    /// segment and waits for it in the repository), and `--pgdata` is the
    /// data directory of the server in the URL.
    async fn preflight(&self, db: &Database) -> Result<(), CheckpointError> {
        if self.stanza.is_empty() {
            return Err(CheckpointError::Misconfigured {
                what: "--pgbackrest-stanza to name the server's stanza".into(),
            });
        }
        // pg_ctl stops and starts the server around a restore: it must be there first.
        crate::checkpoint::program(&self.server.bindir, "pg_ctl", None)?;
        if !self.server.pgdata.join("PG_VERSION").is_file() {
            return Err(CheckpointError::Misconfigured {
                what: format!(
                    "--pgdata to name the server's data directory ({:?} holds no PG_VERSION)",
                    self.server.pgdata.display()
                ),
            });
        }
        let client = db.connect().await?;
        let port: String = client
            .query_one("SHOW data_directory", &[])
            .await
            .map_err(Self::query_err(db, "reading data_directory"))?
            .get(0);
        let same = |p: &Path| std::fs::canonicalize(p).ok();
        if same(Path::new(&port)) != same(&self.server.pgdata) {
            return Err(CheckpointError::Misconfigured {
                what: format!(
                    "--pgdata to be the data directory of {} (it is {port}, not {})",
                    db.describe(),
                    self.server.pgdata.display()
                ),
            });
        }
        self.pgbackrest(&["check"], "checking the stanza").await.map(|_| ())
    }

    async fn create(&self, db: &Database, _run_id: &str) -> Result<CheckpointRecord, CheckpointError> {
        let started_at = Utc::now();
        let client = db.connect().await?;
        let (system, here) = self.here(db, &client).await?;
        let newest = self.newest(&system).await?;
        let due = self.policy.due(newest.as_ref(), &here, Utc::now());
        let base = match (&due, newest) {
            (None, Some(base)) => base,
            _ => {
                tracing::info!(stanza = %self.stanza, why = %due.as_ref().map(ToString::to_string).unwrap_or_default(), "checkpoint: running an incremental pgBackRest backup");
                self.pgbackrest(&["--type=incr", "--start-fast", "backup"], "backing up")
                    .await?;
                let (_, again) = self.here(db, &client).await?;
                self.newest(&system)
                    .await?
                    .filter(|b| b.timeline == again.timeline)
                    .ok_or_else(|| CheckpointError::Misconfigured {
                        what: format!(
                            "a backup of {} in stanza {} on timeline {} after `pgbackrest backup` (none listed)",
                            db.describe(),
                            self.stanza,
                            again.timeline
                        ),
                    })?
            }
        };
        let lsn = self.switch_and_confirm(db, &client).await?;
        let start = parse_lsn(&base.start_lsn).unwrap_or(0);
        let used = BaseUse {
            taken_because: due.as_ref().map(ToString::to_string),
            checkpoint_lsn: format_lsn(lsn),
            replay_bytes: lsn.saturating_sub(start),
            base,
        };
        Ok(CheckpointRecord {
            backend: self.name().into(),
            location: format!("pgbackrest stanza {} backup {}", self.stanza, used.base.label),
            database: db.describe(),
            started_at,
            completed_at: Utc::now(),
            size_bytes: if due.is_some() { used.base.size_bytes } else { 0 },
            restore_drill: "not run (pgbackrest backend: restore is exercised on failure)".into(),
            drill: crate::checkpoint::DrillVerdict::NotRun,
            base: Some(used),
        })
    }

    async fn restore(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        let started_at = Utc::now();
        let owner = self.owner()?;
        let (begun, started) = (self.marker(run_id, BEGUN), self.marker(run_id, STARTED));
        let stopped = self.marker(run_id, STOPPED);
        let io = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { step, path, source }
        };
        let set =
            checkpoint
                .base
                .as_ref()
                .map(|b| b.base.label.clone())
                .ok_or_else(|| CheckpointError::Misconfigured {
                    what: format!("the checkpoint of run {run_id} to name its pgBackRest backup"),
                })?;
        if target.lsn.is_empty() {
            return Err(CheckpointError::Misconfigured {
                what: format!("an LSN recovery point for run {run_id}"),
            });
        }
        let mut kept = format!(
            "the writes after LSN {} stay in pgBackRest stanza {}'s WAL archive on the timeline the server was on",
            target.lsn, self.stanza
        );
        if !started.exists() {
            if !begun.exists() {
                // The target's segment goes to the archive before the server stops.
                if let Some(client) = crate::checkpoint::local::LocalBackend::server_connection(db).await {
                    if let Ok((_, here)) = self.here(db, &client).await {
                        kept = format!(
                            "the writes after LSN {} stay in pgBackRest stanza {}'s WAL archive on timeline {} (a restore with --type=lsn --target-timeline={} brings them back)",
                            target.lsn, self.stanza, here.timeline, here.timeline
                        );
                    }
                    if let Err(e) = self.switch_and_confirm(db, &client).await {
                        tracing::warn!(error = %crate::run::chain(&e), "the WAL before the restore did not reach the archive; recovery uses what is there");
                    }
                }
                super::local::write_marker(&begun).map_err(io("record that the restore begins", &begun))?;
                super::local::pause_point("pgbackrest-restore-begun").await;
            }
            if !stopped.exists() {
                // The original server (an attempt killed before it was down
                // leaves it running, or still shutting down).
                self.server.stop("fast", owner, "stopping the server").await?;
                super::local::write_marker(&stopped).map_err(io("record that the server is down", &stopped))?;
                super::local::pause_point("pgbackrest-server-stopped").await;
            } else if self.running() {
                return Err(CheckpointError::Misconfigured {
                    what: format!(
                        "a person to look at {}: a server runs there that this restore did not start, after the restore began",
                        self.server.pgdata.display()
                    ),
                });
            }
            let target_arg = format!("--target={}", target.lsn);
            let set_arg = format!("--set={set}");
            self.pgbackrest(
                &[
                    "--delta",
                    "--type=lsn",
                    &target_arg,
                    "--target-exclusive",
                    "--target-action=promote",
                    "--target-timeline=current",
                    &set_arg,
                    "restore",
                ],
                "restoring",
            )
            .await?;
            super::local::write_marker(&started).map_err(io("record that the restored server starts", &started))?;
            super::local::pause_point("pgbackrest-restored").await;
        }
        if !self.running() {
            self.server.start(owner, "starting the restored server").await?;
        }
        self.server.await_promotion(db).await?;
        self.server.clear_recovery_settings(db).await?;
        Ok(RestoreRecord {
            started_at,
            finished_at: Utc::now(),
            target: format!("lsn {} from pgBackRest backup {set}", target.lsn),
            kept,
            manifest_patch: None,
            databases: Vec::new(),
            writes_stopped_at: None,
            lost_commits: None,
            lost_writes: None,
        })
    }

    /// Nothing of pgBackRest's: its own retention (`repo1-retention-*`)
    /// governs the stanza. The run's markers go.
    async fn prune(&self, run_id: &str) -> Result<u64, CheckpointError> {
        super::prune_run_dir(&self.store, run_id).await
    }
}

/// The timeline in a WAL file name.
fn timeline_of(file: &str) -> u32 {
    u32::from_str_radix(file.get(..8).unwrap_or_default(), 16).unwrap_or(0)
}

/// The newest backup of server `system` in `pgbackrest info --output=json`.
fn newest_backup(info: &str, system: &str) -> Option<BaseBackup> {
    let stanzas: serde_json::Value = serde_json::from_str(info).ok()?;
    let stanza = stanzas.as_array()?.first()?;
    let ids: Vec<u64> = stanza
        .get("db")?
        .as_array()?
        .iter()
        .filter(|d| d.get("system-id").map(|s| s.to_string()).as_deref() == Some(system))
        .filter_map(|d| d.get("id")?.as_u64())
        .collect();
    stanza
        .get("backup")?
        .as_array()?
        .iter()
        .filter(|b| b.get("error").and_then(|e| e.as_bool()) != Some(true))
        .filter(|b| {
            b.pointer("/database/id")
                .and_then(|i| i.as_u64())
                .is_some_and(|i| ids.contains(&i))
        })
        .filter_map(|b| {
            Some(BaseBackup {
                label: b.get("label")?.as_str()?.to_string(),
                taken_at: DateTime::from_timestamp(b.pointer("/timestamp/stop")?.as_i64()?, 0)?,
                start_lsn: b.pointer("/lsn/start")?.as_str()?.to_string(),
                timeline: timeline_of(b.pointer("/archive/start")?.as_str()?),
                size_bytes: b.pointer("/info/repository/delta")?.as_u64()?,
            })
        })
        .max_by_key(|b| (b.taken_at, b.label.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000002","min":"000000010000000000000001"}],
      "backup":[
        {"archive":{"start":"000000010000000000000002","stop":"000000010000000000000002"},"database":{"id":1,"repo-key":1},"error":false,"info":{"delta":22992567,"repository":{"delta":3043461,"size":3043461},"size":22992567},"label":"20261122-143401F","lsn":{"start":"0/2000028","stop":"0/2000100"},"prior":null,"reference":null,"timestamp":{"start":1795358041,"stop":1795358045},"type":"full"},
        {"archive":{"start":"000000020000000000000009","stop":"000000020000000000000009"},"database":{"id":1,"repo-key":1},"error":false,"info":{"delta":1,"repository":{"delta":12288,"size":12288},"size":1},"label":"20261122-143401F_20261122-150000I","lsn":{"start":"0/9000028","stop":"0/9000100"},"prior":"20261122-143401F","reference":["20261122-143401F"],"timestamp":{"start":1795360000,"stop":1795360001},"type":"incr"},
        {"archive":{"start":"00000003000000000000000A","stop":"00000003000000000000000A"},"database":{"id":2,"repo-key":1},"error":false,"info":{"delta":1,"repository":{"delta":1,"size":1},"size":1},"label":"other","lsn":{"start":"0/A000028","stop":"0/A000100"},"timestamp":{"start":1795370000,"stop":1795370001},"type":"full"}],
      "db":[{"id":1,"repo-key":1,"system-id":7711004058635780036,"version":"15"},{"id":2,"repo-key":1,"system-id":1,"version":"15"}],
      "name":"demo"}]"#;

    #[test]
    fn the_newest_backup_of_this_server_is_found_in_pgbackrest_info() {
        let b = newest_backup(INFO, "7711004058635780036").unwrap();
        assert_eq!(b.label, "20261122-143401F_20261122-150000I");
        assert_eq!(b.timeline, 2);
        assert_eq!(b.start_lsn, "0/9000028");
        assert_eq!(b.size_bytes, 12288);
        assert!(
            newest_backup(INFO, "42").is_none(),
            "another server's backups do not count"
        );
        assert!(newest_backup("not json", "1").is_none());
    }
}
