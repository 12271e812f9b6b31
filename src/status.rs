//! `backstop status`: each guarded path's gate and what it waits for since
//! when, then the runs with their age and how long they took (like `flyway
//! info` or `atlas migrate status`), and what a person must do.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::gate::GateStatus;
use crate::run::{Outcome, RunRecord};

/// One run, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunLine {
    pub id: String,
    pub commit: String,
    pub phase: &'static str,
    pub outcome: Option<Outcome>,
    pub migrations: Vec<String>,
    pub report: String,
    pub created_at: DateTime<Utc>,
    /// When its last step finished (ended runs).
    pub finished_at: Option<DateTime<Utc>>,
    /// From its start to its end, or to now while it is open.
    pub duration_seconds: f64,
    pub failure: Option<crate::run::Failure>,
    pub retry: Option<crate::run::Retry>,
    /// What a person must do for it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

impl RunLine {
    pub fn of(run: &RunRecord, report: String, now: DateTime<Utc>) -> Self {
        let finished_at = run
            .phase
            .is_terminal()
            .then(|| run.steps.iter().filter_map(|s| s.finished_at).max())
            .flatten();
        let end = finished_at.unwrap_or(now);
        let slot_left = match (&run.capture_released, run.capture_slot()) {
            (Some(crate::capture::SlotRelease::Failed { why }), Some(slot)) => Some(format!(
                "logical slot {slot} could not be dropped ({why}): it retains WAL until SELECT pg_drop_replication_slot('{slot}')"
            )),
            (None, Some(slot)) if run.phase.is_terminal() => Some(format!(
                "logical slot {slot} is not dropped yet (the run's next pass drops it)"
            )),
            _ => None,
        };
        let action = if let Some(warning) = slot_left {
            Some(warning)
        } else if run.awaits_person() {
            Some(format!(
                "a person must act: read `backstop report {}`, put the database right, then `backstop ack {}`",
                run.id, run.id
            ))
        } else {
            None
        };
        RunLine {
            id: run.id.clone(),
            commit: run.commit.sha.clone(),
            phase: run.phase.as_str(),
            outcome: run.outcome(),
            migrations: run.migrations.iter().map(|m| m.id.clone()).collect(),
            report,
            created_at: run.created_at,
            finished_at,
            duration_seconds: (end - run.created_at).num_milliseconds().max(0) as f64 / 1000.0,
            failure: run.failure.clone(),
            retry: run.retry.clone(),
            action,
        }
    }
}

/// The whole status, as `-o json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub gates: Vec<GateStatus>,
    pub runs: Vec<RunLine>,
}

/// `3s`, `4m05s`, `2h07m`, `3d04h`: the two largest units.
pub fn span(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ago", span((now - t).num_milliseconds() as f64 / 1000.0))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// The text rendering, ages counted to `now`.
pub fn text(status: &Status, now: DateTime<Utc>, state: &std::path::Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for g in &status.gates {
        let path = if g.path.is_empty() {
            "(whole repository)"
        } else {
            g.path.as_str()
        };
        let _ = writeln!(
            s,
            "path {path}: gate {} at {}, upstream {} at {} (checked {})",
            g.gate_branch,
            short(&g.gate),
            g.upstream_branch,
            short(&g.upstream),
            ago(g.updated_at, now)
        );
        let _ = match (&g.waiting, g.since) {
            (Some(w), Some(since)) => writeln!(
                s,
                "  waiting for {} (since {}): {w}",
                span((now - since).num_milliseconds() as f64 / 1000.0),
                since.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            (Some(w), None) => writeln!(s, "  waiting: {w}"),
            (None, _) if g.gate == g.upstream => writeln!(s, "  up to date"),
            (None, _) => writeln!(s, "  not waiting"),
        };
    }
    if status.runs.is_empty() {
        let _ = writeln!(s, "no runs in {}", state.display());
        return s;
    }
    let _ = writeln!(
        s,
        "{:<27} {:<7} {:<12} {:<10} {:<10} {:<8} MIGRATIONS",
        "RUN", "COMMIT", "PHASE", "OUTCOME", "STARTED", "TOOK"
    );
    for r in &status.runs {
        let outcome = r.outcome.map(|o| format!("{o:?}")).unwrap_or_else(|| "-".into());
        let took = match r.finished_at {
            Some(_) => span(r.duration_seconds),
            None => format!("{}+", span(r.duration_seconds)),
        };
        let _ = writeln!(
            s,
            "{:<27} {:<7} {:<12} {:<10} {:<10} {:<8} {}",
            r.id,
            short(&r.commit),
            r.phase,
            outcome,
            ago(r.created_at, now),
            took,
            r.migrations.join(",")
        );
        if let Some(a) = &r.action {
            let _ = writeln!(s, "  {a}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_in_the_two_largest_units() {
        assert_eq!(span(0.31), "0.3s");
        assert_eq!(span(42.0), "42s");
        assert_eq!(span(245.0), "4m05s");
        assert_eq!(span(7620.0), "2h07m");
        assert_eq!(span(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(span(-5.0), "0.0s");
    }
}
