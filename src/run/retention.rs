//! Checkpoint retention: which ended runs' checkpoints may be deleted.
//!
//! The newest `keep` ended runs that took a checkpoint keep it (a person may
//! want to go back to one of them by hand); older ones are let go. Never
//! pruned: a run still open (it may restore), and a failed run awaiting a
//! person (`backstop ack` not given: the checkpoint may be what they need).
//! The data directory a restore set aside is not a checkpoint: it holds the
//! only copy of the writes made after the recovery point, and only a person
//! deletes it (`backstop prune --set-aside RUN`).

use super::record::RunRecord;

/// What retention does with one run's checkpoint, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Older than the newest `keep` ended runs: deleted.
    Delete,
    /// The run is not over: it may still restore from it.
    KeepOpen,
    /// The run failed and waits for `backstop ack`.
    KeepAwaitsPerson,
    /// Among the newest `keep` ended runs (or `keep` is 0: keep all).
    KeepNewest,
    /// Deleted by an earlier pass.
    AlreadyDeleted,
}

impl Verdict {
    /// Why, in words, for `backstop prune`.
    pub fn why(self, keep: usize) -> String {
        match self {
            Verdict::Delete => format!("older than the newest {keep} ended runs"),
            Verdict::KeepOpen => "the run is not over; it may still restore from it".into(),
            Verdict::KeepAwaitsPerson => "the run failed and waits for `backstop ack`".into(),
            Verdict::KeepNewest if keep == 0 => "retention is off (--keep-checkpoints 0)".into(),
            Verdict::KeepNewest => format!("among the newest {keep} ended runs"),
            Verdict::AlreadyDeleted => "already deleted".into(),
        }
    }
}

/// The verdict on every run that took a checkpoint, oldest first.
pub fn verdicts(runs: &[RunRecord], keep: usize) -> Vec<(&RunRecord, Verdict)> {
    let mut with: Vec<&RunRecord> = runs.iter().filter(|r| r.checkpoint.is_some()).collect();
    with.sort_by(|a, b| RunRecord::oldest_first(a, b));
    let ended = with
        .iter()
        .filter(|r| r.phase.is_terminal() && !r.awaits_person())
        .count();
    let mut older = if keep == 0 { 0 } else { ended.saturating_sub(keep) };
    with.into_iter()
        .map(|r| {
            let verdict = if !r.phase.is_terminal() {
                Verdict::KeepOpen
            } else if r.awaits_person() {
                Verdict::KeepAwaitsPerson
            } else if older > 0 {
                older -= 1;
                if r.checkpoint_pruned {
                    Verdict::AlreadyDeleted
                } else {
                    Verdict::Delete
                }
            } else if r.checkpoint_pruned {
                Verdict::AlreadyDeleted
            } else {
                Verdict::KeepNewest
            };
            (r, verdict)
        })
        .collect()
}

/// Runs whose checkpoint retention deletes now, oldest first.
pub fn prunable(runs: &[RunRecord], keep: usize) -> Vec<&RunRecord> {
    verdicts(runs, keep)
        .into_iter()
        .filter(|(_, v)| *v == Verdict::Delete)
        .map(|(r, _)| r)
        .collect()
}
