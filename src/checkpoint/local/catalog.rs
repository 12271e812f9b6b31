//! The local backend's base backups: shared by checkpoints, taken under the
//! [`BasePolicy`](crate::checkpoint::base::BasePolicy), pruned when no kept
//! run relies on them.
//!
//! Layout in the checkpoint store:
//! - `base/<label>/` a `pg_basebackup -Ft` (`base.tar`, `pg_wal.tar`,
//!   `backup_manifest`) and `backstop-base.json` (what it is). It is built in
//!   `base/.partial-<label>/` and renamed when complete, so a folder without
//!   the prefix is always whole.
//! - `<run>/base-backup` the label a run's checkpoint relies on. Retention
//!   deletes `<run>/` when it lets the run go, then every base backup that is
//!   neither the newest nor named by a remaining run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::LocalBackend;
use crate::checkpoint::base::{format_lsn, parse_lsn, segments_between, BaseBackup, ServerPosition};
use crate::checkpoint::{tree_size, CheckpointError};
use crate::db::Database;
use crate::pgbin;

/// What `backstop-base.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LocalBase {
    /// `pg_control_system().system_identifier` of the server it was taken from.
    pub system: String,
    #[serde(flatten)]
    pub base: BaseBackup,
}

/// The server as a checkpoint reads it.
pub(super) struct Here {
    pub system: String,
    pub position: ServerPosition,
    pub segment_size: u64,
}

const META: &str = "backstop-base.json";
const PARTIAL: &str = ".partial-";
pub(super) const USES: &str = "base-backup";

/// How long a checkpoint waits for the switched segment to be archived.
pub(super) const ARCHIVE_WAIT: Duration = Duration::from_secs(20);

impl LocalBackend {
    fn bases_dir(&self) -> PathBuf {
        self.store.join("base")
    }

    fn query_err(db: &Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CheckpointError {
        let database = db.describe();
        move |source| CheckpointError::Query { database, step, source }
    }

    /// System identifier, timeline, WAL position and segment size.
    pub(super) async fn here(&self, db: &Database, client: &tokio_postgres::Client) -> Result<Here, CheckpointError> {
        let row = client
            .query_one(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                        pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text,
                        (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
                &[],
            )
            .await
            .map_err(Self::query_err(db, "reading the server's WAL position"))?;
        let file: String = row.get(1);
        let lsn: String = row.get(2);
        Ok(Here {
            system: row.get(0),
            position: ServerPosition {
                timeline: u32::from_str_radix(file.get(..8).unwrap_or_default(), 16).unwrap_or(0),
                lsn: parse_lsn(&lsn).unwrap_or(0),
            },
            segment_size: row.get::<_, i64>(3).max(1) as u64,
        })
    }

    /// Complete base backups in the store, oldest first.
    fn all_bases(&self) -> Vec<(PathBuf, LocalBase)> {
        all_bases(&self.bases_dir())
    }

    /// Complete base backups of server `system`, newest last.
    pub(super) fn bases(&self, system: &str) -> Vec<(PathBuf, BaseBackup)> {
        self.all_bases()
            .into_iter()
            .filter(|(_, meta)| meta.system == system)
            .map(|(dir, meta)| (dir, meta.base))
            .collect()
    }

    /// Takes a new base backup (`pg_basebackup`, WAL streamed in).
    pub(super) async fn take_base(
        &self,
        db: &Database,
        run_id: &str,
        system: &str,
    ) -> Result<(PathBuf, BaseBackup), CheckpointError> {
        let bases = self.bases_dir();
        std::fs::create_dir_all(&bases).map_err(Self::io("create the base backup folder", &bases))?;
        // Interrupted attempts left these; only one backstop owns the store.
        for entry in std::fs::read_dir(&bases).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
                let path = entry.path();
                crate::checkpoint::remove_tree(path.clone())
                    .await
                    .map_err(Self::io("remove a partial base backup", &path))?;
            }
        }
        let label = format!("{}-{run_id}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
        let partial = bases.join(format!("{PARTIAL}{label}"));
        std::fs::create_dir_all(&partial).map_err(Self::io("create a base backup folder", &partial))?;
        let mut cmd = crate::checkpoint::program(&self.bindir, "pg_basebackup", None)?;
        cmd.envs(db.libpq_env())
            .arg("-D")
            .arg(&partial)
            .args(["-Ft", "-X", "stream", "-c", "fast", "--no-password", "-l"])
            .arg(format!("backstop {label}"));
        let progress = crate::progress::Progress::bytes_of("base backup", partial.clone(), None);
        pgbin::run(cmd, "pg_basebackup")
            .await
            .map_err(Self::tool(format!("pg_basebackup of {}", db.describe())))?;
        drop(progress);
        let (timeline, start_lsn) = manifest_start(&partial.join("backup_manifest"))?;
        let base = BaseBackup {
            label: label.clone(),
            taken_at: Utc::now(),
            start_lsn,
            timeline,
            size_bytes: tree_size(&partial),
        };
        let meta = LocalBase {
            system: system.to_string(),
            base: base.clone(),
        };
        let path = partial.join(META);
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
        write_synced(&path, text.as_bytes()).map_err(Self::io("record the base backup", &path))?;
        let dir = bases.join(&label);
        std::fs::rename(&partial, &dir).map_err(Self::io("complete the base backup", &dir))?;
        crate::journal::sync_dir(&bases).map_err(Self::io("complete the base backup", &bases))?;
        Ok((dir, base))
    }

    /// Writes a record, switches the WAL segment and waits until the archive
    /// holds that segment whole. Returns the record's position: the
    /// recovery point this checkpoint confirmed restorable.
    pub(super) async fn switch_and_confirm(
        &self,
        db: &Database,
        client: &tokio_postgres::Client,
        segment_size: u64,
    ) -> Result<u64, CheckpointError> {
        // Two statements: the record must precede the switch.
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
        self.await_archived(db, client, &segment, segment_size, ARCHIVE_WAIT)
            .await?;
        Ok(parse_lsn(&mark).unwrap_or(0))
    }

    /// Waits (bounded) until `segment` is in the archive at full size.
    pub(super) async fn await_archived(
        &self,
        db: &Database,
        client: &tokio_postgres::Client,
        segment: &str,
        segment_size: u64,
        wait: Duration,
    ) -> Result<(), CheckpointError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            // Complete, not a truncated copy a full archive left behind.
            let len = std::fs::metadata(self.wal_archive.join(segment)).map(|m| m.len());
            if len.is_ok_and(|l| l == segment_size) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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
            segment: segment.to_string(),
            seconds: wait.as_secs(),
            detail,
        })
    }

    /// The first segment from `base`'s start up to the one holding `upto`
    /// that the archive lacks or holds truncated.
    pub(super) fn first_gap(&self, base: &BaseBackup, upto: u64, segment_size: u64) -> Option<String> {
        let start = parse_lsn(&base.start_lsn).unwrap_or(0);
        segments_between(base.timeline, start, upto.max(start), segment_size)
            .into_iter()
            .find(|s| {
                std::fs::metadata(self.wal_archive.join(s))
                    .map(|m| m.len() != segment_size)
                    .unwrap_or(true)
            })
    }

    /// Records that run `run_id` relies on base backup `label`.
    pub(super) fn record_use(&self, run_id: &str, label: &str) -> Result<(), CheckpointError> {
        let path = self.store.join(run_id).join(USES);
        write_synced(&path, label.as_bytes()).map_err(Self::io("record the run's base backup", &path))
    }

    /// Deletes base backups that are not the newest and that no remaining
    /// run relies on; returns the bytes freed.
    pub(super) async fn prune_bases(&self) -> Result<u64, CheckpointError> {
        let mut freed = 0;
        let unused = unused_bases(&self.store, &Default::default(), &Default::default())
            .map_err(Self::io("read which base backups runs rely on", &self.store))?;
        for (dir, label) in unused {
            freed += crate::checkpoint::remove_tree(dir.clone())
                .await
                .map_err(Self::io("delete a base backup no kept run relies on", &dir))?;
            tracing::info!(base = %label, "retention deleted a base backup no kept run relies on");
        }
        Ok(freed)
    }
}

/// Base backups in checkpoint store `store` (folder and label, oldest first)
/// that are not the newest and that no run relies on once the checkpoints
/// of the runs in `going` are deleted too; `also_used` are labels the
/// journal says kept runs rely on. Fails closed: a folder or marker that
/// cannot be read is an error, never "nothing relies on it".
pub fn unused_bases(
    store: &Path,
    going: &std::collections::HashSet<String>,
    also_used: &std::collections::HashSet<String>,
) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut used = also_used.clone();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if going.contains(entry.file_name().to_string_lossy().as_ref()) {
            continue;
        }
        match std::fs::read_to_string(entry.path().join(USES)) {
            Ok(label) => {
                used.insert(label.trim().to_string());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let mut all = all_bases(&store.join("base"));
    all.pop();
    Ok(all
        .into_iter()
        .filter(|(_, meta)| !used.contains(&meta.base.label))
        .map(|(dir, meta)| (dir, meta.base.label))
        .collect())
}

/// Complete base backups in `dir`, oldest first.
fn all_bases(dir: &Path) -> Vec<(PathBuf, LocalBase)> {
    let mut found: Vec<(PathBuf, LocalBase)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(PARTIAL))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join(META)).ok()?;
            Some((e.path(), serde_json::from_str(&text).ok()?))
        })
        .collect();
    found.sort_by(|a, b| (a.1.base.taken_at, &a.1.base.label).cmp(&(b.1.base.taken_at, &b.1.base.label)));
    found
}

/// Timeline and start LSN from a `backup_manifest` (PostgreSQL 13+).
fn manifest_start(path: &Path) -> Result<(u32, String), CheckpointError> {
    let bad = |why: String| CheckpointError::Io {
        step: "read the base backup's manifest",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    };
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        step: "read the base backup's manifest",
        path: path.to_path_buf(),
        source,
    })?;
    let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let range = manifest
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .and_then(|r| r.first())
        .ok_or_else(|| bad("no WAL-Ranges".into()))?;
    let timeline = range
        .get("Timeline")
        .and_then(|t| t.as_u64())
        .ok_or_else(|| bad("no Timeline".into()))?;
    let start = range
        .get("Start-LSN")
        .and_then(|s| s.as_str())
        .and_then(parse_lsn)
        .ok_or_else(|| bad("no Start-LSN".into()))?;
    Ok((timeline as u32, format_lsn(start)))
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        crate::journal::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_gives_the_timeline_and_start_of_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup_manifest");
        std::fs::write(
            &path,
            r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
               "WAL-Ranges": [{"Timeline": 3, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]}"#,
        )
        .unwrap();
        assert_eq!(manifest_start(&path).unwrap(), (3, "0/2000028".to_string()));
        std::fs::write(&path, "{}").unwrap();
        let err = manifest_start(&path).unwrap_err().to_string();
        assert!(err.contains("manifest"), "{err}");
    }
}
