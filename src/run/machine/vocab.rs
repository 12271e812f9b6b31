//! The machine's vocabulary: what it asks for ([`Action`]), what it is
//! told back ([`Observation`], [`Fault`], [`Recovered`]), and the timing
//! of retries ([`Backoff`], [`Policy`]). Types only; the decisions are in
//! the parent module.

use chrono::{DateTime, Duration, Utc};

use crate::checkpoint::{CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::manifests::RevertMode;
use crate::run::record::{FailureKind, Phase, Retry, RevertRecord, RunRecord};
use crate::runner::{MigrateOutcome, VerifyOutcome};

/// What the run must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Move to `Phase` (no effect outside the record).
    Advance(Phase),
    Lock,
    Plan,
    Checkpoint,
    Drill,
    RecoveryPoint,
    /// Run migration `i`.
    Migrate(usize),
    /// Migration `i` was interrupted while it ran: ask the history table.
    Recover(usize),
    Verify(usize),
    /// Move the gate to the run's commit (through the gate's invariant check).
    Promote,
    /// Wait until the promoted revision is live and healthy.
    Health,
    Restore,
    /// Put back the writes the restore discarded (`backstop.dev/replay: auto`).
    ReplayLostWrites,
    /// Revert the promoted commit on the gate itself.
    RevertGate,
    /// Revert the commit on upstream or on a revert branch.
    Revert,
    PullRequest,
    Unlock,
    /// Drop the run's logical slot (whatever the outcome; a forgotten slot
    /// retains WAL forever).
    ReleaseCapture,
    Report,
    /// A retry is due at this time; nothing to do before.
    Wait(DateTime<Utc>),
    Done,
}

impl Action {
    /// Whether the step changes anything outside the record, so that its
    /// intent must be on disk before it acts (a crash then finds it open).
    /// Planning only reads the record; the report is written again whole
    /// by a pass that finds it missing; lock, health and unlock act only
    /// where the cluster does (`cluster_acts`: not in local mode, where they
    /// only say that the gate holds deployments back).
    pub fn acts_outside(&self, cluster_acts: bool) -> bool {
        match self {
            Action::Plan | Action::Report | Action::Advance(_) | Action::Wait(_) | Action::Done => false,
            Action::Lock | Action::Health | Action::Unlock => cluster_acts,
            _ => true,
        }
    }

    /// The name of the step the action records (None: no step).
    pub fn step(&self, run: &RunRecord) -> Option<String> {
        let migration = |i: &usize| run.migrations.get(*i).map(|m| m.id.clone()).unwrap_or_default();
        Some(match self {
            Action::Advance(_) | Action::Wait(_) | Action::Done => return None,
            Action::Lock => "lock".into(),
            Action::Plan => "plan".into(),
            Action::Checkpoint => "checkpoint".into(),
            Action::Drill => "restore-drill".into(),
            Action::RecoveryPoint => "recovery-point".into(),
            Action::Migrate(i) | Action::Recover(i) => format!("migrate {}", migration(i)),
            Action::Verify(i) => format!("verify {}", migration(i)),
            Action::Promote => "promote".into(),
            Action::Health => "health".into(),
            Action::Restore => "restore".into(),
            Action::ReplayLostWrites => "replay-lost-writes".into(),
            Action::RevertGate => "gate-revert".into(),
            Action::Revert => match revert_mode(run) {
                RevertMode::Commit => "revert-commit".into(),
                RevertMode::PullRequest => "revert-branch".into(),
            },
            Action::PullRequest => "pull-request".into(),
            Action::Unlock => "unlock".into(),
            Action::ReleaseCapture => "release-capture".into(),
            Action::Report => "report".into(),
        })
    }
}

/// How the revert of a run is made (the first carrier's choice; the engine
/// may override it through the record's migrations before the run starts).
pub fn revert_mode(run: &RunRecord) -> RevertMode {
    run.migrations
        .first()
        .map(|m| m.revert)
        .unwrap_or(RevertMode::PullRequest)
}

/// A fault an action met: transient (nothing the developer did) or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FailureKind,
    pub message: String,
}

impl Fault {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transient,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Failed,
            message: message.into(),
        }
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }
}

/// What history says about a migration whose step was interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Applied with success by this run.
    Applied,
    /// Not applied by this run.
    NotApplied,
}

/// What happened when an action was performed.
// One lives at a time, between an action and its fold: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    Locked(Result<String, Fault>),
    Planned(String),
    /// `None`: the migrations' checkpoint kind is `none`.
    Checkpointed(Result<Option<CheckpointRecord>, Fault>),
    Drilled(Result<crate::checkpoint::DrillOutcome, Fault>),
    RecoveryPoint(Result<RecoveryPoint, Fault>),
    Migrated(usize, Result<MigrateOutcome, Fault>),
    Recovered(usize, Result<Recovered, Fault>),
    Verified(usize, Result<VerifyOutcome, Fault>),
    /// The gate was moved to (or found at) this commit.
    Promoted(Result<(String, String), Fault>),
    Healthy(Result<String, Fault>),
    Restored(Result<RestoreRecord, Fault>),
    /// Never a fault: replay that cannot start or stops at a conflict is
    /// reported, and the remediation goes on (the writes stay in the file).
    ReplayedLostWrites(crate::capture::replay::AutoReplay),
    GateReverted(Result<String, Fault>),
    Reverted(Result<RevertRecord, Fault>),
    /// The pull request's URL (None: no forge configured).
    PullRequest(Result<Option<String>, Fault>),
    Unlocked(Result<String, Fault>),
    Reported(Result<String, String>),
    /// Never a fault: a slot that could not be dropped is reported, and the
    /// run ends anyway.
    CaptureReleased(crate::capture::SlotRelease),
}

/// Timing of retries after transient faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First wait; doubles per attempt.
    pub base: std::time::Duration,
    /// Longest wait.
    pub max: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: std::time::Duration::from_secs(30),
            max: std::time::Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempts + 1`.
    pub fn delay(&self, attempts: u32) -> std::time::Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The retry record after one more fault of `step`.
    pub fn bump(
        &self,
        previous: Option<&Retry>,
        step: &str,
        cause: &str,
        now: DateTime<Utc>,
        timeout: std::time::Duration,
    ) -> Retry {
        let attempts = previous.map(|r| r.attempts).unwrap_or(0) + 1;
        let since = previous.map(|r| r.since).unwrap_or(now);
        let delay = Duration::from_std(self.delay(attempts)).unwrap_or(Duration::MAX);
        let stalled = now - since >= Duration::from_std(timeout).unwrap_or(Duration::MAX);
        Retry {
            step: step.to_string(),
            cause: cause.to_string(),
            attempts,
            since,
            next_at: now + delay,
            stalled,
            failed_at: Some(now),
        }
    }
}

/// What the failure taxonomy needs from the engine.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub backoff: Backoff,
    /// How long a transient fault may last before the run is marked stalled.
    pub timeout: std::time::Duration,
}
