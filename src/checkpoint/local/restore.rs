//! Point-in-time restore of the local backend, safe to resume.
//!
//! The original data directory is moved aside (never deleted) to
//! `<pgdata>.backstop-<run>`, a new one is built from the base backup, and the
//! server recovers to the target from the WAL archive. Three facts make a
//! resumed or failed restore safe:
//!
//! - **A started server is never restored over.** Right before the restored
//!   server starts, `<store>/<run>/restored-server-started` is written and
//!   synced. Once it exists, the restored server may have been promoted and
//!   taken writes, so a resumed restore makes sure it runs, waits for the end
//!   of recovery and finishes; it never stops it or deletes its directory.
//!   Before that marker, the new directory holds only files backstop
//!   extracted, and a resumed restore rebuilds it.
//! - **A complete segment wins over a partial one.** An archive that ran out
//!   of space can hold a truncated copy of a segment whose complete copy is
//!   still in the old `pg_wal`. The restore command takes only full-size
//!   segments from the archive, and the complete copies from the old `pg_wal`
//!   are put in the new `pg_wal`, where recovery finds them.
//! - **A failed recovery puts the original back.** When the restored server
//!   does not start or does not reach the end of recovery (so it never took a
//!   write), it is stopped and moved to `<pgdata>.backstop-<run>-failed`, the
//!   original directory is moved back and started, and the error says so. The
//!   run then ends `Failed`: a person decides, and the gate does not move.

use std::path::{Path, PathBuf};

use chrono::Utc;

use super::{set_mode_0700, LocalBackend, MARK};
use crate::checkpoint::base::parse_lsn;
use crate::checkpoint::{CheckpointError, CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::db::Database;
use crate::pgbin;

/// Test hook (debug builds only): `BACKSTOP_TEST_PAUSE_AT=<point>` makes the
/// process print `backstop: test pause at <point>` and sleep 60 s there, so a
/// test can `kill -9` it at exactly that moment.
pub(crate) async fn pause_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("BACKSTOP_TEST_PAUSE_AT").ok().as_deref() == Some(point) {
        eprintln!("backstop: test pause at {point}");
        // A minute (the test kills the process), or until the file
        // `BACKSTOP_TEST_PAUSE_UNTIL` names exists (the test let it go on).
        let until = std::env::var_os("BACKSTOP_TEST_PAUSE_UNTIL").map(PathBuf::from);
        for _ in 0..1200 {
            if until.as_ref().is_some_and(|f| f.exists()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

impl LocalBackend {
    fn started_marker(&self, run_id: &str) -> PathBuf {
        self.store.join(run_id).join("restored-server-started")
    }

    pub(super) async fn restore_in_place(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        target: &RecoveryPoint,
        run_id: &str,
    ) -> Result<RestoreRecord, CheckpointError> {
        let started_at = Utc::now();
        tracing::debug!(run = run_id, "restore: begins");
        let kept = self.kept_dir(run_id);
        let marker = self.started_marker(run_id);
        let (_, target_text) = recovery_target(target);
        let record = |started_at| RestoreRecord {
            started_at,
            finished_at: Utc::now(),
            target: target_text.clone(),
            kept: kept.display().to_string(),
            manifest_patch: None,
            databases: Vec::new(),
            writes_stopped_at: None,
            lost_commits: None,
            lost_writes: None,
        };
        if kept.exists() && marker.exists() {
            // Resumed after the restored server was started: it may be live.
            tracing::warn!(pgdata = %self.pgdata.display(), "resuming a restore whose server was already started: continuing on it, never restoring over it");
            let owner = pgbin::owner_of(&self.pgdata).map_err(Self::tool("inspecting the restored data directory"))?;
            if !self.pgdata.join("postmaster.pid").exists() {
                self.server().start(owner, "starting the restored server again").await?;
            }
            self.server().await_promotion(db).await?;
            self.server().clear_recovery_settings(db).await?;
            return Ok(record(started_at));
        }
        // Measured only by the attempt that stops the old server.
        let (mut databases, mut writes_stopped_at, mut lost_commits) = (Vec::new(), None, None);
        let owner = if kept.exists() {
            // Resumed before the restored server ever started: the data directory
            // holds only files this restore extracted.
            let owner = pgbin::owner_of(&kept).map_err(Self::tool("inspecting the kept data directory"))?;
            if self.pgdata.join("postmaster.pid").exists() {
                return Err(CheckpointError::Misconfigured {
                    what: format!(
                        "a person to look at {}: a server runs there that this restore did not start (the original is kept at {})",
                        self.pgdata.display(),
                        kept.display()
                    ),
                });
            }
            if self.pgdata.exists() {
                tokio::fs::remove_dir_all(&self.pgdata)
                    .await
                    .map_err(Self::io("remove partial restore", &self.pgdata))?;
            }
            owner
        } else {
            // A marker left by an earlier, failed attempt that put the original
            // back must not make the next attempt's directory look live.
            if marker.exists() {
                std::fs::remove_file(&marker).map_err(Self::io("remove an old restore marker", &marker))?;
            }
            let owner = pgbin::owner_of(&self.pgdata).map_err(Self::tool("inspecting the data directory"))?;
            databases = self.databases(db).await;
            self.flush_wal(db, target).await;
            tracing::debug!("restore: the target's WAL is archived; stopping the server");
            self.server().stop("fast", owner, "stopping the server").await?;
            writes_stopped_at = Some(Utc::now());
            tokio::fs::rename(&self.pgdata, &kept)
                .await
                .map_err(Self::io("keep the old data directory", &kept))?;
            owner
        };

        // Until the restored server is promoted it has taken no write: any
        // failure up to then puts the original back.
        if let Err(e) = self.recover(db, checkpoint, run_id, owner, &kept, target).await {
            if marker.exists() && !self.pgdata.join("recovery.signal").exists() {
                // PostgreSQL removes recovery.signal when it promotes: the
                // restored server may be live and have taken writes. Leave it.
                return Err(CheckpointError::RestoreFailed {
                    source: Box::new(e),
                    put_back: format!(
                        "the restored server at {} was promoted and may hold writes, so it was left in place (the original is kept at {})",
                        self.pgdata.display(),
                        kept.display()
                    ),
                });
            }
            let put_back = self.put_back(&kept, run_id, owner).await;
            let _ = std::fs::remove_file(&marker);
            return Err(CheckpointError::RestoreFailed {
                source: Box::new(e),
                put_back,
            });
        }
        tracing::debug!("restore: the restored server is promoted");
        pause_point("restored-server-promoted").await;
        self.server().clear_recovery_settings(db).await?;
        // Counted once the database is back (reading the WAL takes time), from
        // the kept directory, which nothing writes to any more.
        if writes_stopped_at.is_some() && !target.lsn.is_empty() {
            let scratch = self.store.join(run_id).join("wal-window");
            lost_commits = Some(match self.lost_commits(&kept, &target.lsn, &scratch).await {
                Ok(lost) => lost,
                Err(e) => {
                    tracing::warn!(error = %e, "could not count the transactions of the data-loss window in the WAL");
                    crate::checkpoint::LostCommits::not_counted(e)
                }
            });
            let _ = std::fs::remove_dir_all(&scratch);
        }
        Ok(RestoreRecord {
            databases,
            writes_stopped_at,
            lost_commits,
            ..record(started_at)
        })
    }

    /// Builds the new data directory from the base backup and recovers it to
    /// the target, up to the end of recovery.
    async fn recover(
        &self,
        db: &Database,
        checkpoint: &CheckpointRecord,
        run_id: &str,
        owner: (u32, u32),
        kept: &Path,
        target: &RecoveryPoint,
    ) -> Result<(), CheckpointError> {
        let (target_line, _) = recovery_target(target);
        let target_lsn = parse_lsn(&target.lsn);
        let marker = self.started_marker(run_id);
        let base = PathBuf::from(&checkpoint.location);
        std::fs::create_dir(&self.pgdata).map_err(Self::io("create data directory", &self.pgdata))?;
        set_mode_0700(&self.pgdata).map_err(Self::io("set data directory mode", &self.pgdata))?;
        tracing::debug!(base = %base.display(), "restore: extracting the base backup");
        let progress = crate::progress::Progress::bytes_of(
            "restore: extracting the base backup",
            self.pgdata.clone(),
            std::fs::metadata(base.join("base.tar")).ok().map(|m| m.len()),
        );
        untar(&base.join("base.tar"), &self.pgdata).await?;
        drop(progress);
        let wal = self.pgdata.join("pg_wal");
        tokio::fs::create_dir_all(&wal)
            .await
            .map_err(Self::io("create pg_wal", &wal))?;
        untar(&base.join("pg_wal.tar"), &wal).await?;
        // WAL that never reached the archive, or reached it truncated: the
        // complete copy from the old pg_wal, as the PostgreSQL PITR procedure says.
        let segment_size = copy_unarchived_wal(&kept.join("pg_wal"), &wal, &self.wal_archive, target_lsn)?;

        let settings = format!(
            "\n{MARK} (run {run_id})\nrestore_command = '{}'\n{target_line}\n\
             recovery_target_inclusive = off\nrecovery_target_timeline = 'current'\nrecovery_target_action = 'promote'\n",
            restore_command(&self.wal_archive, segment_size),
        );
        let auto = self.pgdata.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
        conf.push_str(&settings);
        std::fs::write(&auto, conf).map_err(Self::io("write recovery settings", &auto))?;
        let signal = self.pgdata.join("recovery.signal");
        std::fs::write(&signal, "").map_err(Self::io("write recovery.signal", &signal))?;
        tracing::debug!("restore: recovery settings written");
        pgbin::chown_tree(&self.pgdata, owner)
            .await
            .map_err(Self::tool("giving the data directory to its owner"))?;

        // From here on the restored server may take writes: say so durably first.
        super::catalog::write_synced(&marker, b"")
            .map_err(Self::io("record that the restored server starts", &marker))?;
        self.server().start(owner, "starting the restored server").await?;
        tracing::debug!("restore: the restored server started; waiting for the end of recovery");
        let _progress = crate::progress::Progress::spinner(&format!("restore: replaying WAL to {}", target.lsn));
        self.server().await_promotion(db).await
    }

    /// Stops the failed restored server, moves it aside, moves the original
    /// back and starts it. Returns what it did, for the error.
    async fn put_back(&self, kept: &Path, run_id: &str, owner: (u32, u32)) -> String {
        let mut failed = self.pgdata.file_name().unwrap_or_default().to_os_string();
        failed.push(format!(".backstop-{run_id}-failed"));
        let failed = self.pgdata.with_file_name(failed);
        if let Err(e) = self.server().stop("immediate", owner, "stop").await {
            return format!(
                "the failed restore's server at {} could not be stopped ({}), so nothing was moved; the original data directory is at {}",
                self.pgdata.display(),
                crate::run::chain(&e),
                kept.display()
            );
        }
        if !self.pgdata.exists() {
            // Nothing was built: only the original to move back.
        } else if let Err(e) = std::fs::rename(&self.pgdata, &failed) {
            return format!(
                "the original data directory is still at {} (moving the failed restore aside failed: {e})",
                kept.display()
            );
        }
        if let Err(e) = std::fs::rename(kept, &self.pgdata) {
            return format!(
                "the failed restore is at {}; the original data directory is still at {} (moving it back failed: {e})",
                failed.display(),
                kept.display()
            );
        }
        match self.server().start(owner, "starting the original server again").await {
            Ok(()) => format!(
                "the original data directory is back at {} and its server started; the failed restore is kept at {}",
                self.pgdata.display(),
                failed.display()
            ),
            Err(e) => format!(
                "the original data directory is back at {} but did not start ({}); the failed restore is kept at {}",
                self.pgdata.display(),
                crate::run::chain(&e),
                failed.display()
            ),
        }
    }
}

/// The recovery target line and its description. The LSN read before the
/// migration is exact; a time target (from a CNPG recovery manifest) is the
/// fallback. PostgreSQL wants `YYYY-MM-DD HH:MM:SS.ffffff+00`, not RFC 3339.
fn recovery_target(target: &RecoveryPoint) -> (String, String) {
    let time = target.time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    if target.lsn.is_empty() {
        (format!("recovery_target_time = '{time}'"), format!("time {time}"))
    } else {
        (
            format!("recovery_target_lsn = '{}'", target.lsn),
            format!("lsn {} (time {time})", target.lsn),
        )
    }
}

/// The `restore_command`: WAL segments only when complete (a truncated copy
/// left by a full archive is skipped, so recovery reads the complete copy
/// from `pg_wal`); history and other files as they are.
pub(super) fn restore_command(archive: &Path, segment_size: u64) -> String {
    // The path in shell single quotes; then `%` doubled for PostgreSQL's
    // placeholder expansion (PG16+ rejects unknown codes such as `%s`), and
    // `'` doubled for the configuration file's quoting.
    let dir = format!(
        "'{}'",
        archive.display().to_string().replace('\'', "'\\''").replace('%', "%%")
    );
    let command = format!(
        "f={dir}/%f; case %f in *.history|*.backup|*.partial) cp \"$f\" \"%p\";; *) test \"$(stat -c %%s \"$f\" 2>/dev/null)\" = {segment_size} && cp \"$f\" \"%p\";; esac"
    );
    command.replace('\'', "''")
}

pub(super) async fn untar(archive: &Path, into: &Path) -> Result<(), CheckpointError> {
    let mut cmd = pgbin::tool("tar");
    cmd.arg("-xf").arg(archive).arg("-C").arg(into);
    pgbin::run(cmd, "tar")
        .await
        .map(|_| ())
        .map_err(|source| CheckpointError::Tool {
            step: format!("extracting {}", archive.display()),
            source,
        })
}

fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit())
}

/// Copies WAL segments from `old` to `new` that the archive lacks or holds
/// only truncated, up to the segment after the one holding `upto` (a record
/// that starts before the target may end in the next segment; recovery
/// reads nothing later). Without that bound, `pg_wal`'s recycled segments,
/// named for the future and up to `max_wal_size` of them, would be copied
/// for nothing. Returns the segment size (16 MiB unless the old `pg_wal`
/// shows another).
fn copy_unarchived_wal(old: &Path, new: &Path, archive: &Path, upto: Option<u64>) -> Result<u64, CheckpointError> {
    let mut size = 16 * 1024 * 1024;
    let Ok(entries) = std::fs::read_dir(old) else {
        return Ok(size);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        if !is_segment(text) || !meta.is_file() {
            continue;
        }
        // pg_wal segments are always allocated whole.
        size = meta.len();
        if let Some(upto) = upto {
            // Log and segment number, whatever the timeline.
            let last = crate::checkpoint::base::segment_name(0, upto + size, size);
            if text[8..] > last[8..] {
                continue;
            }
        }
        let archived = std::fs::metadata(archive.join(text)).map(|m| m.len()).ok();
        if archived == Some(meta.len()) {
            continue;
        }
        if archived.is_some() {
            tracing::warn!(segment = text, "the archive holds a truncated copy of this segment; recovery uses the complete one from the old pg_wal");
        }
        let dest = new.join(text);
        std::fs::copy(entry.path(), &dest).map_err(|source| CheckpointError::Io {
            step: "copy unarchived WAL",
            path: dest.clone(),
            source,
        })?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary folder with the old `pg_wal`, the new one and the archive.
    fn wal_dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (old, new, archive) = (
            dir.path().join("old"),
            dir.path().join("new"),
            dir.path().join("archive"),
        );
        for d in [&old, &new, &archive] {
            std::fs::create_dir(d).unwrap();
        }
        (dir, old, new, archive)
    }

    #[test]
    fn a_truncated_archived_segment_is_replaced_by_the_complete_old_copy() {
        let (_dir, old, new, archive) = wal_dirs();
        let seg = |n: u8| format!("0000000100000000000000{n:02X}");
        std::fs::write(old.join(seg(1)), vec![1u8; 4096]).unwrap();
        std::fs::write(old.join(seg(2)), vec![2u8; 4096]).unwrap();
        std::fs::write(old.join(seg(3)), vec![3u8; 4096]).unwrap();
        std::fs::write(archive.join(seg(1)), vec![1u8; 4096]).unwrap();
        std::fs::write(archive.join(seg(2)), vec![2u8; 100]).unwrap();
        assert_eq!(copy_unarchived_wal(&old, &new, &archive, None).unwrap(), 4096);
        assert!(!new.join(seg(1)).exists(), "complete in the archive: not copied");
        assert_eq!(std::fs::read(new.join(seg(2))).unwrap().len(), 4096);
        assert!(new.join(seg(3)).exists());
    }

    #[test]
    fn recycled_segments_past_the_target_are_not_copied() {
        let (_dir, old, new, archive) = wal_dirs();
        let seg = |n: u8| format!("0000000200000000000000{n:02X}");
        for n in 1..=6 {
            std::fs::write(old.join(seg(n)), vec![n; 4096]).unwrap();
        }
        // Target in segment 3: segments 1..=4 are what recovery may read.
        copy_unarchived_wal(&old, &new, &archive, Some(3 * 4096 + 100)).unwrap();
        let mut copied: Vec<String> = std::fs::read_dir(&new)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        copied.sort();
        assert_eq!(copied, (1..=4).map(seg).collect::<Vec<_>>());
    }

    #[test]
    fn the_restore_command_checks_the_segment_size_and_quotes_the_path() {
        let c = restore_command(Path::new("/srv/wal's $x"), 16777216);
        assert!(c.contains("stat -c %%s"), "PG16+ rejects %s: {c}");
        assert!(c.contains("= 16777216 && cp"), "{c}");
        // As the shell sees it after the configuration file's unquoting.
        let shell = c.replace("''", "'");
        assert!(shell.starts_with("f='/srv/wal'\\''s $x'/%f;"), "{shell}");
    }
}
