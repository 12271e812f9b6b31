//! Base backups as a policy, not a per-migration copy.
//!
//! Point-in-time recovery needs *a* base backup older than the target plus
//! every WAL segment from that backup's start to the target. So a checkpoint
//! is a recovery point: it switches the WAL segment, confirms the archive has
//! it, and relies on the newest base backup. A new base backup is taken only
//! when [`BasePolicy::due`] says so: none on the server's current timeline
//! (a restore starts a new one), the newest is older than `max_age`, more WAL
//! than `max_wal` was written since it started (the replay a restore would
//! need), or the archive has a gap after it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// When a checkpoint takes a new base backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasePolicy {
    /// A base backup older than this is replaced (`Duration::ZERO`: a new
    /// base backup for every checkpoint, the old per-migration behaviour).
    pub max_age: Duration,
    /// A base backup that a restore would have to replay more WAL than this
    /// (bytes) from is replaced: this bounds the restore's replay time.
    pub max_wal: u64,
}

impl Default for BasePolicy {
    fn default() -> Self {
        BasePolicy {
            max_age: Duration::from_secs(24 * 3600),
            max_wal: 4 << 30,
        }
    }
}

/// A base backup a checkpoint may rely on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackup {
    /// The backend's name for it (folder, pgBackRest label, CNPG Backup).
    pub label: String,
    /// When it completed.
    pub taken_at: DateTime<Utc>,
    /// The WAL position replay starts from.
    pub start_lsn: String,
    /// The timeline it was taken on.
    pub timeline: u32,
    pub size_bytes: u64,
}

/// The server as a checkpoint sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPosition {
    pub timeline: u32,
    /// `pg_current_wal_lsn()`.
    pub lsn: u64,
}

/// Why a checkpoint takes a new base backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseDue {
    /// No base backup of this server on its current timeline.
    NoneOnTimeline { timeline: u32 },
    /// The newest is older than `--base-backup-max-age`.
    TooOld { age: Duration, max: Duration },
    /// A restore from the newest would replay more WAL than `--base-backup-max-wal`.
    TooMuchWal { bytes: u64, max: u64 },
    /// A WAL segment after the newest is missing from the archive.
    ArchiveGap { segment: String },
    /// The archive's owner reports archiving unhealthy (CNPG's
    /// `ContinuousArchiving` condition): the WAL since the newest may be lost.
    ArchivingUnhealthy { detail: String },
}

impl std::fmt::Display for BaseDue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
        let age = |d: &Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
        match self {
            BaseDue::NoneOnTimeline { timeline } => write!(f, "no base backup on timeline {timeline}"),
            BaseDue::TooOld { age: a, max } => write!(
                f,
                "the newest base backup is {} old (--base-backup-max-age {})",
                age(a),
                age(max)
            ),
            BaseDue::TooMuchWal { bytes, max } => write!(
                f,
                "a restore from the newest base backup would replay {} of WAL (--base-backup-max-wal {})",
                size(*bytes),
                size(*max)
            ),
            BaseDue::ArchiveGap { segment } => write!(
                f,
                "WAL segment {segment} after the newest base backup is missing from the archive"
            ),
            BaseDue::ArchivingUnhealthy { detail } => {
                write!(f, "continuous archiving is not healthy ({detail})")
            }
        }
    }
}

impl BasePolicy {
    /// Whether `newest` (the newest base backup of this server) still serves.
    pub fn due(&self, newest: Option<&BaseBackup>, server: &ServerPosition, now: DateTime<Utc>) -> Option<BaseDue> {
        let Some(base) = newest.filter(|b| b.timeline == server.timeline) else {
            return Some(BaseDue::NoneOnTimeline {
                timeline: server.timeline,
            });
        };
        let age = (now - base.taken_at).to_std().unwrap_or_default();
        if age >= self.max_age {
            return Some(BaseDue::TooOld { age, max: self.max_age });
        }
        let bytes = server.lsn.saturating_sub(parse_lsn(&base.start_lsn).unwrap_or(0));
        if bytes > self.max_wal {
            return Some(BaseDue::TooMuchWal {
                bytes,
                max: self.max_wal,
            });
        }
        None
    }
}

/// What a checkpoint relied on, for the run record and the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseUse {
    pub base: BaseBackup,
    /// Why this checkpoint took it; `None`: an existing one was reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_because: Option<String>,
    /// The WAL position the checkpoint confirmed archived.
    pub checkpoint_lsn: String,
    /// WAL a restore to the checkpoint replays, from the base backup's start.
    pub replay_bytes: u64,
}

impl BaseUse {
    /// One line for reports and the drill.
    pub fn describe(&self) -> String {
        let size = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
        format!(
            "base backup {} (taken {}, {}, {}) plus {} of archived WAL up to {}",
            self.base.label,
            self.base.taken_at.format("%Y-%m-%d %H:%M:%S UTC"),
            size(self.base.size_bytes),
            match &self.taken_because {
                Some(why) => format!("taken for this checkpoint: {why}"),
                None => "reused".to_string(),
            },
            size(self.replay_bytes),
            self.checkpoint_lsn
        )
    }
}

/// `X/Y` (hex) to a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A byte position as `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The name of the WAL segment holding `lsn` on `timeline`.
pub fn segment_name(timeline: u32, lsn: u64, segment_size: u64) -> String {
    let segno = lsn / segment_size.max(1);
    let per_id = 0x1_0000_0000 / segment_size.max(1);
    format!("{timeline:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// The segments from the one holding `from` to the one holding `to`, inclusive.
pub fn segments_between(timeline: u32, from: u64, to: u64, segment_size: u64) -> Vec<String> {
    let size = segment_size.max(1);
    (from / size..=to / size)
        .map(|segno| segment_name(timeline, segno * size, size))
        .collect()
}

/// `--base-backup-max-age`: `24h`, `90m`, `7d`, `0` (a new one every time).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?} is not a duration such as 24h or 7d: {e}"))
}

/// `--base-backup-max-wal`: `4GiB`, `512MiB`, `1GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{text:?} is not a size such as 4GiB or 512MiB: {e}"))
}

/// Why [`await_archived`] returned without the segment archived.
#[derive(Debug)]
pub enum NotArchived {
    /// Waited in vain; what `pg_stat_archiver` said last.
    Waited(String),
    /// `pg_stat_archiver` could not be read (nothing was waited for).
    Unreadable(tokio_postgres::Error),
}

/// Waits up to `wait` until the server's archiver has pushed WAL segment
/// `segment` (same timeline: names order as positions do).
pub async fn await_archived(client: &tokio_postgres::Client, segment: &str, wait: Duration) -> Result<(), NotArchived> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(last_archived_wal, ''),
                        format('pg_stat_archiver: last archived %s, last failed %s at %s, %s failures', coalesce(last_archived_wal, '-'), coalesce(last_failed_wal, '-'), coalesce(last_failed_time::text, '-'), failed_count)
                   FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(NotArchived::Unreadable)?;
        let last: String = row.get(0);
        if last.len() == 24 && segment.len() == 24 && last[..8] == segment[..8] && last.as_str() >= segment {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(NotArchived::Waited(row.get(1)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(hours_ago: i64, start: &str, timeline: u32) -> BaseBackup {
        BaseBackup {
            label: "b".into(),
            taken_at: Utc::now() - chrono::Duration::hours(hours_ago),
            start_lsn: start.into(),
            timeline,
            size_bytes: 1,
        }
    }

    #[test]
    fn a_recent_base_backup_on_the_timeline_with_little_wal_since_is_reused() {
        let p = BasePolicy::default();
        let server = ServerPosition {
            timeline: 1,
            lsn: parse_lsn("0/9000000").unwrap(),
        };
        assert_eq!(p.due(Some(&base(1, "0/2000028", 1)), &server, Utc::now()), None);
    }

    #[test]
    fn a_new_base_backup_is_due_by_timeline_age_or_wal() {
        let p = BasePolicy {
            max_age: Duration::from_secs(3600 * 24),
            max_wal: 1 << 30,
        };
        let at = |lsn| ServerPosition {
            timeline: 2,
            lsn: parse_lsn(lsn).unwrap(),
        };
        assert!(matches!(
            p.due(None, &at("0/3000000"), Utc::now()),
            Some(BaseDue::NoneOnTimeline { timeline: 2 })
        ));
        assert!(matches!(
            p.due(Some(&base(1, "0/2000000", 1)), &at("0/3000000"), Utc::now()),
            Some(BaseDue::NoneOnTimeline { .. })
        ));
        assert!(matches!(
            p.due(Some(&base(25, "0/2000000", 2)), &at("0/3000000"), Utc::now()),
            Some(BaseDue::TooOld { .. })
        ));
        assert!(matches!(
            p.due(Some(&base(1, "0/2000000", 2)), &at("1/3000000"), Utc::now()),
            Some(BaseDue::TooMuchWal { .. })
        ));
        let zero = BasePolicy {
            max_age: Duration::ZERO,
            ..p
        };
        assert!(zero
            .due(Some(&base(0, "0/2000000", 2)), &at("0/2000001"), Utc::now())
            .is_some());
    }

    #[test]
    fn segment_names_follow_postgresql() {
        let mb16 = 16 << 20;
        assert_eq!(
            segment_name(1, parse_lsn("0/2000028").unwrap(), mb16),
            "000000010000000000000002"
        );
        assert_eq!(
            segment_name(3, parse_lsn("1/FF000000").unwrap(), mb16),
            "0000000300000001000000FF"
        );
        assert_eq!(
            segments_between(
                1,
                parse_lsn("0/FE000000").unwrap(),
                parse_lsn("1/1000000").unwrap(),
                mb16
            ),
            vec![
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert_eq!(format_lsn(parse_lsn("1A/2B").unwrap()), "1A/2B");
    }

    #[test]
    fn policy_values_parse_or_say_what_is_wrong() {
        assert_eq!(parse_age("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_age("0").unwrap(), Duration::ZERO);
        assert!(parse_age("soon").unwrap_err().contains("\"soon\""));
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert!(parse_size("lots").unwrap_err().contains("\"lots\""));
    }
}
