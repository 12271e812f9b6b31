//! What a person reads at the end of a `backstop run` pass: each run that
//! ended, what it ran, its outcome, where the gate went, the revert it made,
//! and the one next step a person must take (or that none is needed).

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
    /// The summary of a pass; `find` reads a run's record from the journal.
    pub fn of(report: &PassReport, find: impl Fn(&str) -> Option<RunRecord>) -> Self {
        PassSummary {
            gate: report.gate.clone(),
            waiting: report.waiting.as_ref().map(|w| w.to_string()),
            runs: report
                .runs
                .iter()
                .filter_map(|(id, outcome, location)| {
                    find(id).map(|run| RunSummary::of(&run, *outcome, location, &report.gate))
                })
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
        if let Some(w) = &self.waiting {
            let _ = writeln!(s, "gate {} waits: {w}", short(&self.gate));
        }
        s
    }
}
