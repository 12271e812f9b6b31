//! What a local restore discards: the whole server goes back (every database
//! in it), the window ends when the old server stopped taking writes, and the
//! transactions that committed in it are counted in the WAL the old server
//! left (`pg_waldump`, COMMIT records after the recovery point).

use std::path::Path;

use super::LocalBackend;
use crate::checkpoint::LostCommits;
use crate::db::Database;
use crate::pgbin;

impl LocalBackend {
    /// The databases a PITR of this server rewinds (best effort: empty when
    /// the server cannot be asked).
    pub(super) async fn databases(&self, db: &Database) -> Vec<String> {
        let Some(client) = Self::server_connection(db).await else {
            return Vec::new();
        };
        client
            .query(
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname",
                &[],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    }

    /// Counts the COMMIT records between `from_lsn` and the end of the WAL of
    /// the stopped server whose data directory is now `kept`. The segments
    /// are read from the archive and from `kept/pg_wal` (the newest, not yet
    /// archived), linked into `scratch`.
    pub(super) async fn lost_commits(
        &self,
        kept: &Path,
        from_lsn: &str,
        scratch: &Path,
    ) -> Result<LostCommits, String> {
        let mut cmd = self.bindir.command("pg_controldata", None).map_err(|e| e.to_string())?;
        pgbin::untranslated(&mut cmd).arg("-D").arg(kept);
        let control = pgbin::run(cmd, "pg_controldata").await.map_err(|e| e.to_string())?;
        let field = |name: &str| {
            control
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("pg_controldata of {} has no {name:?}", kept.display()))
        };
        // Its last checkpoint ends the WAL only after a clean shutdown.
        let state = field("Database cluster state:")?;
        if state != "shut down" {
            return Err(format!(
                "the old server's state is {state:?}, not \"shut down\": its WAL may go on past its last checkpoint"
            ));
        }
        let to_lsn = field("Latest checkpoint location:")?;
        let timeline: u32 = field("Latest checkpoint's TimeLineID:")?
            .parse()
            .map_err(|e| format!("timeline: {e}"))?;
        link_segments(&[&self.wal_archive, &kept.join("pg_wal")], scratch).map_err(|e| e.to_string())?;
        let args = [
            "--rmgr=Transaction".to_string(),
            format!("--timeline={timeline}"),
            format!("--start={from_lsn}"),
            format!("--end={to_lsn}"),
        ];
        let mut cmd = self.bindir.command("pg_waldump", None).map_err(|e| e.to_string())?;
        pgbin::untranslated(&mut cmd).arg("--path").arg(scratch).args(&args);
        let out = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .map_err(|e| format!("pg_waldump: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Reading up to `--end` it reports the record that starts there as an
        // error (after a segment switch, "incorrect prev-link ... at <end>"):
        // what it printed before is the whole window.
        let at_end = stderr.lines().any(|l| {
            l.starts_with("pg_waldump: error: error in WAL record at ") && l.ends_with(&format!(" at {to_lsn}"))
        });
        if !out.status.success() && !at_end {
            return Err(format!(
                "pg_waldump failed ({}): {}",
                out.status,
                pgbin::tail(&stderr, 5)
            ));
        }
        let dump = String::from_utf8_lossy(&out.stdout);
        let count = dump.lines().filter(|l| l.contains("desc: COMMIT")).count() as u64;
        Ok(LostCommits {
            count,
            from_lsn: from_lsn.to_string(),
            to_lsn,
            timeline,
            command: format!(
                "pg_waldump --path {} {} (the archive, plus {}/pg_wal for the newest segment)",
                self.wal_archive.display(),
                args.join(" "),
                kept.display()
            ),
            not_counted: None,
        })
    }
}

/// Links every complete WAL segment of `dirs` into `into` (the first copy of
/// a name wins, except that a full-size one replaces a truncated one).
fn link_segments(dirs: &[&Path], into: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    for dir in dirs {
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.len() != 24 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            let here = into.join(&name);
            let size = entry.metadata()?.len();
            match std::fs::symlink_metadata(&here) {
                Ok(_) if std::fs::metadata(&here)?.len() >= size => continue,
                Ok(_) => std::fs::remove_file(&here)?,
                Err(_) => {}
            }
            std::os::unix::fs::symlink(entry.path(), &here)?;
        }
    }
    Ok(())
}
