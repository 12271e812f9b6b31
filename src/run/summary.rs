//! What a person reads at the end of a `backstop run` pass: each run that
//! ended, what it ran, its outcome, where the gate went, the revert it made,
//! and the one next step a person must take (or that none is needed).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Outcome, PassReport, RunRecord};
use crate::manifests::RevertMode;

/// A pass, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct PassSummary {
    /// The gate after the pass.
    pub gate: String,
    /// Why the gate waits, if it does.
    pub waiting: Option<String>,
    pub runs: Vec<RunSummary>,
}

/// One run that ended in the pass.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub commit: String,
    pub subject: String,
    pub migrations: Vec<String>,
    pub outcome: Outcome,
    pub gate_from: String,
    /// Where the run left the gate (the commit itself when it was promoted).
    pub gate_to: String,
    pub failure: Option<String>,
    /// The data was restored to the checkpoint.
    pub restored: bool,
    pub revert_commit: Option<String>,
    pub revert_branch: Option<String>,
    pub revert_pull_request: Option<String>,
    pub report: String,
    /// What a person must do now.
    pub next: String,
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

impl RunSummary {
    /// The summary of `run` as the pass left it (`report` is where its
    /// evidence report is, `gate` the gate after the pass).
    pub fn of(run: &RunRecord, outcome: Outcome, report: &str, gate: &str) -> Self {
        let revert = run.revert.as_ref();
        let gate_to = match outcome {
            Outcome::Succeeded => run.commit.sha.clone(),
            _ => run.gate_revert.clone().unwrap_or_else(|| gate.to_string()),
        };
        RunSummary {
            id: run.id.clone(),
            commit: run.commit.sha.clone(),
            subject: run.commit.subject.clone(),
            migrations: run.migrations.iter().map(|m| m.id.clone()).collect(),
            outcome,
            gate_from: run.gate_before.clone(),
            gate_to,
            failure: run.failure.as_ref().map(|f| format!("{}: {}", f.phase, f.message)),
            restored: run.restore.is_some(),
            revert_commit: revert.map(|r| r.commit.clone()),
            revert_branch: revert.map(|r| r.branch.clone()),
            revert_pull_request: revert.and_then(|r| r.pull_request.clone()),
            report: report.to_string(),
            next: next_step(run, outcome, report),
        }
    }
}

/// The one thing a person must do after `run` ended with `outcome` (the
/// evidence report is at `report`).
pub fn next_step(run: &RunRecord, outcome: Outcome, report: &str) -> String {
    let revert = run.revert.as_ref();
    {
        match (outcome, revert) {
            (Outcome::Succeeded, _) => format!(
                "nothing: Flux deploys {} from {}",
                short(&run.commit.sha),
                run.gate_branch
            ),
            (Outcome::Deferred, _) => "nothing yet: the run is tried again on a later pass".to_string(),
            (Outcome::Failed, _) => format!(
                "a person must act: read the report ({report}), finish what remediation could not, then `backstop ack {}`",
                run.id
            ),
            (Outcome::RolledBack, Some(r)) => match (&r.pull_request, r.mode) {
                (Some(pr), _) => format!(
                    "review and merge the revert pull request {pr} (branch {}), then fix the migration in a new commit",
                    r.branch
                ),
                (None, RevertMode::PullRequest) => format!(
                    "open a pull request from {} into {} (no forge is configured, or it has not opened one yet), merge it, then fix the migration",
                    r.branch, run.upstream_branch
                ),
                (None, _) => format!(
                    "the revert commit {} is on {}: fix the migration in a new commit",
                    short(&r.commit),
                    r.branch
                ),
            },
            (Outcome::RolledBack, None) => {
                "fix the migration in a new commit (the gate never moved onto this one)".to_string()
            }
        }
    }
}

impl PassSummary {
    /// The summary of a pass, from the records of the runs it ended.
    pub fn of(report: &PassReport) -> Self {
        PassSummary {
            gate: report.gate.clone(),
            waiting: report.waiting.as_ref().map(|w| w.to_string()),
            runs: report
                .runs
                .iter()
                .zip(&report.records)
                .map(|((_, outcome, location), run)| RunSummary::of(run, *outcome, location, &report.gate))
                .collect(),
        }
    }

    /// For people: a few lines per run.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for r in &self.runs {
            let outcome = match r.outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::RolledBack => "rolled back",
                Outcome::Failed => "FAILED",
                Outcome::Deferred => "deferred",
            };
            let _ = writeln!(s, "run {} ({} \"{}\"): {outcome}", r.id, short(&r.commit), r.subject);
            let _ = writeln!(s, "  migrations: {}", r.migrations.join(", "));
            if let Some(f) = &r.failure {
                let _ = writeln!(s, "  failure: {f}");
            }
            let moved = if r.gate_from == r.gate_to { " (stays)" } else { "" };
            let _ = writeln!(s, "  gate: {} -> {}{moved}", short(&r.gate_from), short(&r.gate_to));
            if r.restored {
                let _ = writeln!(s, "  data: restored to the checkpoint");
            }
            if let Some(c) = &r.revert_commit {
                let on = r.revert_branch.as_deref().unwrap_or("");
                let pr = r
                    .revert_pull_request
                    .as_deref()
                    .map(|p| format!(", pull request {p}"))
                    .unwrap_or_default();
                let _ = writeln!(s, "  revert: {} on {on}{pr}", short(c));
            }
            let _ = writeln!(s, "  report: {}", r.report);
            let _ = writeln!(s, "  next: {}", r.next);
        }
        if let Some(w) = self.waiting_line() {
            let _ = writeln!(s, "{w}");
        }
        s
    }

    /// The runs' part of [`text`](Self::text), without the waiting line.
    pub fn runs_text(&self) -> String {
        PassSummary {
            waiting: None,
            ..self.clone()
        }
        .text()
    }

    /// `gate <sha> waits: <why>`, when it waits.
    pub fn waiting_line(&self) -> Option<String> {
        let w = self.waiting.as_ref()?;
        Some(format!("gate {} waits: {w}", short(&self.gate)))
    }
}

/// What a watching `backstop run` says about a condition that lasts: said
/// once with its time, then not again while it holds; when it changes or
/// ends, how long it lasted and how many passes saw it. An hourly reminder
/// keeps a long one from going quiet in the log.
#[derive(Debug, Default)]
pub struct Repeats {
    /// Key, text last said, since, passes.
    current: Option<(String, String, DateTime<Utc>, u64)>,
    reminded: Option<DateTime<Utc>>,
}

/// How often a condition that lasts is said again.
const REMIND_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

impl Repeats {
    /// Lines to print for this pass, which saw `message` (or nothing when
    /// `None`: the condition ended).
    pub fn see(&mut self, message: Option<&str>, now: DateTime<Utc>) -> Vec<String> {
        self.see_keyed(message.map(|m| (m, m)), now)
    }

    /// [`see`](Self::see) for a condition whose text changes while it
    /// lasts (attempt counts, next try): `key` says which condition it is.
    pub fn see_keyed(&mut self, seen: Option<(&str, &str)>, now: DateTime<Utc>) -> Vec<String> {
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut out = Vec::new();
        if let Some((key, last, since, count)) = &mut self.current {
            if let Some((k, text)) = seen.filter(|(k, _)| *k == key.as_str()) {
                let _ = k;
                *count += 1;
                *last = text.to_string();
                let due = self.reminded.unwrap_or(*since) + REMIND_EVERY;
                if now >= due {
                    out.push(format!(
                        "{} still ({} passes since {}): {last}",
                        stamp(now),
                        count,
                        stamp(*since)
                    ));
                    self.reminded = Some(now);
                }
                return out;
            }
            if *count > 1 {
                out.push(format!(
                    "{} ended after {} passes since {}: {last}",
                    stamp(now),
                    count,
                    stamp(*since)
                ));
            }
        }
        self.current = seen.map(|(k, m)| (k.to_string(), m.to_string(), now, 1));
        self.reminded = None;
        if let Some((_, m)) = seen {
            out.push(format!("{} {m}", stamp(now)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_condition_is_said_once_then_summarised_when_it_changes() {
        let t0: DateTime<Utc> = "2026-12-04T10:00:00Z".parse().unwrap();
        let at = |m: i64| t0 + chrono::TimeDelta::minutes(m);
        let mut r = Repeats::default();
        assert_eq!(r.see(Some("db down"), at(0)), vec!["2026-12-04T10:00:00Z db down"]);
        for m in 1..10 {
            assert!(r.see(Some("db down"), at(m)).is_empty(), "said once");
        }
        assert_eq!(
            r.see(Some("gate waits"), at(10)),
            vec![
                "2026-12-04T10:10:00Z ended after 10 passes since 2026-12-04T10:00:00Z: db down",
                "2026-12-04T10:10:00Z gate waits"
            ]
        );
        // An hour on, a reminder; then quiet again.
        assert!(r.see(Some("gate waits"), at(69)).is_empty());
        assert_eq!(r.see(Some("gate waits"), at(70)).len(), 1);
        assert!(r.see(Some("gate waits"), at(71)).is_empty());
        // A text that changes under one key (attempt 1, 2, ...) is one condition.
        let mut keyed = Repeats::default();
        assert_eq!(keyed.see_keyed(Some(("db", "down, attempt 1")), at(0)).len(), 1);
        assert!(keyed.see_keyed(Some(("db", "down, attempt 2")), at(1)).is_empty());
        assert_eq!(
            keyed.see_keyed(None, at(2)),
            vec!["2026-12-04T10:02:00Z ended after 2 passes since 2026-12-04T10:00:00Z: down, attempt 2"]
        );
        // Said once and gone: nothing to summarise.
        let mut once = Repeats::default();
        once.see(Some("x"), at(0));
        assert!(once.see(None, at(1)).is_empty());
        assert!(once.see(None, at(2)).is_empty());
    }
}
