//! The local backend's restore drill.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::restore::{restore_command, untar};
use super::{set_mode_0700, LocalBackend, MARK};
use crate::checkpoint::{CheckpointError, CheckpointRecord};
use crate::db::Database;
use crate::pgbin;

impl LocalBackend {
    /// The restore drill: a copy built from the checkpoint's base backup
    /// replays the archived WAL up to the checkpoint's recovery point, is
    /// promoted (archiving off: it writes nothing anywhere else), answers a
    /// query, and is deleted. It proves the base backup and every WAL
    /// segment a restore needs.
    pub(super) async fn drill_copy(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
    ) -> Result<String, CheckpointError> {
        let clock = std::time::Instant::now();
        let base = PathBuf::from(&checkpoint.location);
        let label = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut name = self.pgdata.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".backstop-drill-{label}"));
        // Next to the data directory, where the server's owner can reach it.
        let dir = self.pgdata.with_file_name(name);
        let owner = pgbin::owner_of(&self.pgdata).map_err(Self::tool("inspecting the data directory"))?;
        if dir.exists() {
            let _ = self
                .server()
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
        if let Some(used) = &checkpoint.base {
            let settings = format!(
                "\n{MARK} (drill)\nrestore_command = '{}'\nrecovery_target_lsn = '{}'\n\
                 recovery_target_inclusive = on\nrecovery_target_timeline = 'current'\nrecovery_target_action = 'promote'\n",
                restore_command(&self.wal_archive, segment_size(&wal)),
                used.checkpoint_lsn
            );
            let auto = dir.join("postgresql.auto.conf");
            let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
            conf.push_str(&settings);
            std::fs::write(&auto, conf).map_err(Self::io("write drill recovery settings", &auto))?;
            let signal = dir.join("recovery.signal");
            std::fs::write(&signal, "").map_err(Self::io("write recovery.signal", &signal))?;
        }
        pgbin::chown_tree(&dir, owner)
            .await
            .map_err(Self::tool("giving the drill directory to its owner"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Self::io("find a free port", &dir))?
            .port();
        // TCP only: a socket in the drill directory would have a path of the
        // data directory's length plus the label's, and PostgreSQL refuses
        // socket paths over 107 bytes (the drill then failed on a data
        // directory only ~45 bytes long).
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c archive_mode=off -c hot_standby=on"
        );
        let log = dir.join("backstop-drill.log");
        let dir_s = dir.to_string_lossy().into_owned();
        let started = self
            .server()
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
            .await
            .map_err(|e| crate::checkpoint::server::with_log_tail(e, &log));
        let copy = db.at("127.0.0.1", port);
        let answer = match started {
            Ok(_) if checkpoint.base.is_some() => match self.await_copy_promoted(&copy, &dir).await {
                Ok(()) => query_drill(copy).await,
                Err(e) => Err(e),
            },
            Ok(_) => query_drill(copy).await,
            Err(e) => Err(e),
        };
        let answer = answer.map(|said| match &checkpoint.base {
            Some(used) => format!(
                "{said}; it replayed the WAL to the recovery point in {:.1} s: {}",
                clock.elapsed().as_secs_f64(),
                used.describe()
            ),
            None => said,
        });
        let _ = self
            .server()
            .pg_ctl(
                &["stop", "-D", &dir_s, "-m", "immediate", "-w"],
                owner,
                "stopping the drill copy",
            )
            .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        answer
    }

    /// Waits until the drill copy has replayed to its target and been promoted.
    async fn await_copy_promoted(&self, copy: &Database, dir: &Path) -> Result<(), CheckpointError> {
        let deadline = tokio::time::Instant::now() + self.recovery_timeout;
        loop {
            if let Ok(client) = copy.connect().await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !row.get::<_, bool>(0) {
                        return Ok(());
                    }
                }
            }
            if !dir.join("postmaster.pid").exists() {
                let log = dir.join("backstop-drill.log");
                return Err(CheckpointError::RecoveryStopped {
                    pgdata: dir.to_path_buf(),
                    log: pgbin::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CheckpointError::RecoveryTimeout {
                    pgdata: dir.to_path_buf(),
                    seconds: self.recovery_timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The WAL segment size, read from a segment in `pg_wal` (16 MiB when none).
fn segment_size(pg_wal: &Path) -> u64 {
    std::fs::read_dir(pg_wal)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit())
        })
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
        .unwrap_or(16 * 1024 * 1024)
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
        "a copy restored from the checkpoint started and answered ({relations} relations in {})",
        copy.dbname()
    ))
}
