//! Checkpoint retention: which ended runs' checkpoints may be deleted.
//!
//! The newest `keep` ended runs that took a checkpoint keep it (a person may
//! want to go back to one of them by hand); older ones are let go. Never
//! pruned: a run still open (it may restore), and a failed run awaiting a
//! person (`backstop ack` not given: the checkpoint may be what they need).

use super::record::RunRecord;

/// Runs whose checkpoint retention deletes now, oldest first.
pub fn prunable(runs: &[RunRecord], keep: usize) -> Vec<&RunRecord> {
    let mut ended: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.checkpoint.is_some() && r.phase.is_terminal() && !r.awaits_person())
        .collect();
    ended.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    let cut = ended.len().saturating_sub(keep);
    ended.truncate(cut);
    ended.retain(|r| !r.checkpoint_pruned);
    ended
}
