//! The durable record of a run: its phase, its steps (intent before, result
//! after), what it took and did, and why it failed, as typed values. Stores
//! persist these records; the state machine ([`super::machine`]) is a pure
//! function over them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::git::CommitInfo;
use crate::manifests::{Carrier, Order, RevertMode};
use crate::report::Report;
use crate::runner::{MigrateOutcome, VerifyOutcome};

/// Phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Locking,
    Planning,
    Checkpointing,
    Migrating,
    Verifying,
    Promoting,
    Remediating,
    Unlocking,
    Succeeded,
    RolledBack,
    Failed,
    /// Ended on a transient fault before the database changed: nothing to
    /// undo, nothing reverted; a later run tries again.
    Deferred,
}

impl Phase {
    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::RolledBack | Phase::Failed | Phase::Deferred
        )
    }

    /// Name as written in records and the crash switch.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Locking => "Locking",
            Phase::Planning => "Planning",
            Phase::Checkpointing => "Checkpointing",
            Phase::Migrating => "Migrating",
            Phase::Verifying => "Verifying",
            Phase::Promoting => "Promoting",
            Phase::Remediating => "Remediating",
            Phase::Unlocking => "Unlocking",
            Phase::Succeeded => "Succeeded",
            Phase::RolledBack => "RolledBack",
            Phase::Failed => "Failed",
            Phase::Deferred => "Deferred",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a run: intent (`started_at`) written before acting, result after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub phase: Phase,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub ok: Option<bool>,
    pub detail: String,
}

/// What kind of failure stopped a run; decides what remediation may do.
/// Only [`FailureKind::Failed`] reverts a developer's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FailureKind {
    /// backstop could not act (an API, a connection, a lock, the remote):
    /// nothing was changed by the failing step. No revert; retried later.
    Transient,
    /// Plan, lint, approval or bad input: nothing was touched; the gate waits
    /// for a new commit.
    Refused,
    /// The migration, its verify or the health gate failed: restore if the
    /// data changed, then revert.
    #[default]
    Failed,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub phase: Phase,
    pub message: String,
    /// Whether the database may hold changes of the run (decides the restore).
    pub data_changed: bool,
    #[serde(default)]
    pub kind: FailureKind,
}

/// A transient fault the run waits out: the step is tried again at `next_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// The step that hit the fault.
    pub step: String,
    pub cause: String,
    /// Attempts so far (1 after the first fault).
    pub attempts: u32,
    /// When the fault was first seen (the stall clock starts here).
    pub since: DateTime<Utc>,
    pub next_at: DateTime<Utc>,
    /// The fault outlasted the migration's timeout: a person should look.
    /// backstop keeps retrying (at the longest backoff) and never reverts.
    pub stalled: bool,
    /// When the last attempt failed (None in records written before
    /// backstop kept it): with it, the wait follows the backoff in force,
    /// not only the one in force when the fault was seen ([`Retry::due`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<DateTime<Utc>>,
}

impl Retry {
    /// When the step may be tried again under `backoff`: `next_at`, or
    /// sooner when the backoff has been lowered since (a person who fixed
    /// the cause and runs again with `--retry-backoff 0` is not kept
    /// waiting by the 30 s, or 10 min, an earlier process scheduled). A
    /// raised backoff never lengthens a wait already scheduled.
    pub fn due(&self, backoff: &crate::run::machine::Backoff) -> DateTime<Utc> {
        let Some(at) = self.failed_at else { return self.next_at };
        let delay = chrono::Duration::from_std(backoff.delay(self.attempts)).unwrap_or(chrono::Duration::MAX);
        self.next_at.min(at.checked_add_signed(delay).unwrap_or(self.next_at))
    }
}

/// The revert a run made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertRecord {
    pub mode: RevertMode,
    /// The revert commit.
    pub commit: String,
    /// Where it was pushed.
    pub branch: String,
    pub pull_request: Option<String>,
    pub note: String,
    /// The revert is pushed but the forge did not open the pull request yet;
    /// a later pass tries again.
    #[serde(default)]
    pub pr_pending: bool,
}

/// The durable record of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub commit: CommitInfo,
    pub upstream_branch: String,
    pub gate_branch: String,
    /// Gate commit when the run started.
    pub gate_before: String,
    pub order: Order,
    pub migrations: Vec<Carrier>,
    pub already_applied: Vec<String>,
    pub plan_hash: String,
    /// Findings of the safety analysis.
    #[serde(default)]
    pub findings: Vec<crate::lint::Finding>,
    /// Catalog facts that removed a finding a static analysis reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<String>,
    /// Approvals that allowed the run (`approver (source)`).
    #[serde(default)]
    pub approvals: Vec<String>,
    /// The soak of each contract's expand when the run was planned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soak: Vec<crate::policy::SoakEvidence>,
    /// A restore drill must pass before the migration runs (approved runs).
    #[serde(default)]
    pub needs_drill: bool,
    pub phase: Phase,
    pub steps: Vec<Step>,
    pub checkpoint: Option<CheckpointRecord>,
    pub recovery_point: Option<RecoveryPoint>,
    pub migrate_results: Vec<(String, MigrateOutcome)>,
    pub verify_results: Vec<(String, VerifyOutcome)>,
    pub promoted: bool,
    /// Where the promotion moved the gate (the run's commit, or an earlier
    /// commit when the run's own commit still holds a never-run carrier).
    #[serde(default)]
    pub promoted_to: Option<String>,
    pub failure: Option<Failure>,
    /// A transient fault being waited out.
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Why remediation restored or did not.
    pub restore_decision: Option<String>,
    pub restore: Option<RestoreRecord>,
    pub revert: Option<RevertRecord>,
    /// Whatever the restore held (a Kustomization) was released.
    #[serde(default)]
    pub hold_released: bool,
    /// Retention deleted the run's checkpoint (never the data its restore set aside).
    #[serde(default)]
    pub checkpoint_pruned: bool,
    /// What the hold still waits for (shown on the run until released).
    #[serde(default)]
    pub hold_waiting: Option<String>,
    /// The revert pushed straight to the gate when the commit was already
    /// promoted (the bad code was live): its sha.
    #[serde(default)]
    pub gate_revert: Option<String>,
    /// The run's own replay of the lost writes after its restore
    /// (`backstop.dev/replay: auto`); None: not asked, or not yet done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_writes_replay: Option<crate::capture::replay::AutoReplay>,
    /// Remediation steps that failed (a person must act).
    pub remediation_errors: Vec<String>,
    pub report_written: bool,
    /// A person took over a run whose remediation did not complete
    /// (`backstop ack`); until then the gate does not move.
    #[serde(default)]
    pub acknowledged: Option<Acknowledged>,
    /// A person had the data this run's restore set aside deleted
    /// (`backstop prune --set-aside`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside_deleted: Option<Acknowledged>,
    /// The run's logical slot was let go ([`crate::capture`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_released: Option<crate::capture::SlotRelease>,
}

/// Who did what a person must do for a run (took it over, deleted what it
/// set aside), and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledged {
    pub by: String,
    pub at: DateTime<Utc>,
    pub note: String,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    /// Failed and rolled back as designed.
    RolledBack,
    /// Remediation itself failed.
    Failed,
    /// Stopped on a transient fault before anything changed; tried again later.
    Deferred,
}

impl RunRecord {
    /// The order [`RunStore::list`] gives: oldest first, by creation time
    /// and then id (two runs made in the same instant stay in one order).
    pub fn oldest_first(a: &Self, b: &Self) -> std::cmp::Ordering {
        a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id))
    }

    /// The outcome, once the run is over.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Succeeded => Some(Outcome::Succeeded),
            Phase::RolledBack => Some(Outcome::RolledBack),
            Phase::Failed => Some(Outcome::Failed),
            Phase::Deferred => Some(Outcome::Deferred),
            _ => None,
        }
    }

    /// Whether the run failed in a way only a person can finish and nobody
    /// has taken it over yet (`backstop ack`): it holds the gate and its claim.
    pub fn awaits_person(&self) -> bool {
        self.phase == Phase::Failed && self.acknowledged.is_none()
    }

    /// The logical slot the run created, if any.
    pub fn capture_slot(&self) -> Option<String> {
        self.recovery_point.as_ref()?.capture.as_ref()?.slot_to_drop(&self.id)
    }

    /// Whether the run still has work (including writing its report).
    pub fn is_open(&self) -> bool {
        !self.phase.is_terminal() || !self.report_written
    }

    /// The step named `name` that was started and never finished.
    pub fn open_step(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name == name && s.finished_at.is_none())
    }

    /// Whether any step named `name` finished successfully.
    pub fn step_ok(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name == name && s.ok == Some(true))
    }

    /// The (migration id, checksum) pairs this run is about.
    pub fn keys(&self) -> Vec<(String, String)> {
        self.migrations
            .iter()
            .map(|m| (m.id.clone(), m.checksum.clone()))
            .collect()
    }
}

/// Failure to persist run records.
#[derive(Debug, thiserror::Error)]
#[error("failed to {action} for run {run}")]
pub struct StoreError {
    pub action: &'static str,
    pub run: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where runs are recorded durably (a journal folder, or `MigrationRun` objects).
#[async_trait::async_trait]
pub trait RunStore: Send + Sync {
    /// Writes the record (atomically: all of it or the previous version).
    async fn save(&self, run: &RunRecord) -> Result<(), StoreError>;
    /// Every recorded run, oldest first ([`RunRecord::oldest_first`]).
    async fn list(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// Publishes the evidence report; returns where it is.
    async fn write_report(&self, run: &RunRecord, report: &Report) -> Result<String, StoreError>;
    /// Writes a file of the run beside its report (`lost-writes.sql`);
    /// where it went, or None when this store keeps no files.
    /// A file [`write_file`](Self::write_file) wrote for the run, if any.
    async fn read_file(&self, run: &RunRecord, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let _ = (run, name);
        Ok(None)
    }
    /// Whether [`write_file`](Self::write_file) keeps anything.
    fn keeps_files(&self) -> bool {
        false
    }
    async fn write_file(&self, run: &RunRecord, name: &str, bytes: &[u8]) -> Result<Option<String>, StoreError> {
        let _ = (run, name, bytes);
        Ok(None)
    }
    /// Records where the gate of `path` is and what it waits for.
    async fn save_gate(&self, status: &crate::gate::GateStatus) -> Result<(), StoreError> {
        let _ = status;
        Ok(())
    }
    /// The last recorded gate status of `path`.
    async fn load_gate(&self, path: &str) -> Result<Option<crate::gate::GateStatus>, StoreError> {
        let _ = path;
        Ok(None)
    }
    /// The databases the previous pass found its successor would log in to
    /// first ([`save_warm_hint`](Self::save_warm_hint)): read before the
    /// runs are, so those logins overlap the fetch and the journal read.
    /// Empty when this store keeps no hint, or the hint is missing or
    /// unreadable.
    async fn warm_hint(&self) -> Vec<WarmTarget> {
        Vec::new()
    }
    /// Keeps `targets` for the next pass's [`warm_hint`](Self::warm_hint).
    /// Best effort and not synced: a lost or torn hint only makes a login
    /// begin later.
    async fn save_warm_hint(&self, targets: &[WarmTarget]) {
        let _ = targets;
    }
}

/// A database a pass logs in to: its reference and database name, as a
/// carrier names them (no URL, no secret).
pub type WarmTarget = (crate::manifests::DatabaseRef, Option<String>);

/// How a step's successful result is written into the record.
pub trait StepDetail {
    fn detail(&self) -> String;
}

impl StepDetail for String {
    fn detail(&self) -> String {
        self.clone()
    }
}
impl StepDetail for () {
    fn detail(&self) -> String {
        String::new()
    }
}
impl StepDetail for CheckpointRecord {
    fn detail(&self) -> String {
        let base = self
            .base
            .as_ref()
            .map(|b| format!("; a restore starts from {}", b.describe()))
            .unwrap_or_default();
        format!(
            "{} checkpoint at {} ({} bytes){base}",
            self.backend, self.location, self.size_bytes
        )
    }
}
impl StepDetail for RecoveryPoint {
    fn detail(&self) -> String {
        format!("time {} lsn {}", self.time.to_rfc3339(), self.lsn)
    }
}
impl StepDetail for MigrateOutcome {
    fn detail(&self) -> String {
        format!(
            "{}/{} statements, {}, {} ms{}",
            self.statements_done,
            self.statements_total,
            if self.transactional {
                "one transaction"
            } else {
                "non-transactional"
            },
            self.duration_ms,
            self.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        )
    }
}
impl StepDetail for VerifyOutcome {
    fn detail(&self) -> String {
        self.detail.clone()
    }
}
impl StepDetail for RestoreRecord {
    fn detail(&self) -> String {
        format!("restored to {}; previous state kept at {}", self.target, self.kept)
    }
}
impl StepDetail for RevertRecord {
    fn detail(&self) -> String {
        format!("{} on {} ({})", self.commit, self.branch, self.note)
    }
}
impl StepDetail for Option<String> {
    fn detail(&self) -> String {
        self.clone().unwrap_or_else(|| "no pull request opened".into())
    }
}

/// An error with its causes, `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
