//! The run state machine (DESIGN section 3): one candidate commit for one
//! guarded target, driven through its phases by the traits of the backends
//! (checkpoint, runner, forge, cluster) and recorded durably in a [`RunStore`].
//! Each step writes its intent before acting and its result after, so a
//! restarted process resumes where it stopped and never repeats a backup, a
//! restore or a revert. This module knows no backend.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::checkpoint::{Checkpoint, CheckpointRecord, ManifestPatch, RecoveryPoint, RestoreRecord};
use crate::cluster::Cluster;
use crate::db::Database;
use crate::forge::{Forge, PullRequest};
use crate::git::{CommitInfo, GitError, GitRepo};
use crate::manifests::{Carrier, CheckpointKind, Order, RevertMode};
use crate::plan::{self, PlanError, Prepared};
use crate::report::{self, Report};
use crate::runner::{MigrateOutcome, RunIdentity, Runner, VerifyOutcome};

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
}

impl Phase {
    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack | Phase::Failed)
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

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub phase: Phase,
    pub message: String,
    /// Whether the database may hold changes of the run (decides the restore).
    pub data_changed: bool,
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
    /// Approvals that allowed the run (`approver (source)`).
    #[serde(default)]
    pub approvals: Vec<String>,
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
    pub failure: Option<Failure>,
    /// Why remediation restored or did not.
    pub restore_decision: Option<String>,
    pub restore: Option<RestoreRecord>,
    pub revert: Option<RevertRecord>,
    /// Whatever the restore held (a Kustomization) was released.
    #[serde(default)]
    pub hold_released: bool,
    /// The revert pushed straight to the gate when the commit was already
    /// promoted (the bad code was live): its sha.
    #[serde(default)]
    pub gate_revert: Option<String>,
    /// Remediation steps that failed (a person must act).
    pub remediation_errors: Vec<String>,
    pub report_written: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    /// Failed and rolled back as designed.
    RolledBack,
    /// Remediation itself failed.
    Failed,
}

impl RunRecord {
    /// The outcome, once the run is over.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Succeeded => Some(Outcome::Succeeded),
            Phase::RolledBack => Some(Outcome::RolledBack),
            Phase::Failed => Some(Outcome::Failed),
            _ => None,
        }
    }

    /// Whether the run still has work (including writing its report).
    pub fn is_open(&self) -> bool {
        !self.phase.is_terminal() || !self.report_written
    }

    fn open_step(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name == name && s.finished_at.is_none())
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
    /// Every recorded run, oldest first.
    async fn list(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// Publishes the evidence report; returns where it is.
    async fn write_report(&self, run: &RunRecord, report: &Report) -> Result<String, StoreError>;
}

/// Errors that stop a pass (not failures of a run, which are remediated).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Branches and paths the engine guards.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upstream: String,
    pub gate: String,
    /// Folder of the repo the guarded target applies (empty: everything).
    pub path: String,
    /// Overrides the carriers' `backstop.dev/revert` when set.
    pub revert: Option<RevertMode>,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Runs that ended in this pass: (id, outcome, report location).
    pub runs: Vec<(String, Outcome, String)>,
    /// Where the gate is after the pass.
    pub gate: String,
    /// Why the gate waits, if it does.
    pub waiting: Option<String>,
}

/// Maps a carrier's checkpoint kind to a backend; `none` maps to no checkpoint.
pub type CheckpointSet = HashMap<CheckpointKind, Arc<dyn Checkpoint>>;

/// The engine: git, the backends and the store.
pub struct Engine {
    pub git: GitRepo,
    pub cluster: Arc<dyn Cluster>,
    pub runner: Arc<dyn Runner>,
    pub checkpoints: CheckpointSet,
    pub forge: Arc<dyn Forge>,
    pub store: Arc<dyn RunStore>,
    pub settings: Settings,
}

impl Engine {
    fn checkpoint_for(&self, kind: CheckpointKind) -> Result<Option<Arc<dyn Checkpoint>>, String> {
        if kind == CheckpointKind::None {
            return Ok(None);
        }
        self.checkpoints.get(&kind).cloned().map(Some).ok_or_else(|| {
            format!(
                "checkpoint {kind} is not available here (available: {})",
                self.available_kinds()
            )
        })
    }

    fn available_kinds(&self) -> String {
        let mut kinds: Vec<&str> = self.checkpoints.keys().map(|k| k.as_str()).collect();
        kinds.push("none");
        kinds.sort_unstable();
        kinds.join(", ")
    }

    /// One pass: fetch, resume open runs, run what is pending in order, and move
    /// the gate as far as it may go.
    pub async fn pass(&self) -> Result<PassReport, EngineError> {
        let mut report = PassReport::default();
        self.git.fetch().await?;
        let previous = self.store.list().await?;
        self.open_pending_pull_requests(&previous).await?;
        if let Some(gate) = self.git.branch(&self.settings.gate).await? {
            release_holds(self, &previous, &gate).await?;
        }
        for mut run in previous.iter().filter(|r| r.is_open()).cloned() {
            tracing::info!(run = %run.id, phase = %run.phase, "resuming run");
            let outcome = self.drive(&mut run).await?;
            report.runs.push((run.id.clone(), outcome, self.report_location(&run)));
            if outcome != Outcome::Succeeded {
                report.gate = self.git.require_branch(&self.settings.gate).await?;
                return Ok(report);
            }
        }
        // Re-read: a resumed run may have pushed.
        self.git.fetch().await?;
        let runs = self.store.list().await?;
        let mut gate = self.git.require_branch(&self.settings.gate).await?;
        let head = self.git.require_branch(&self.settings.upstream).await?;
        if let Some(reverted) = runs
            .iter()
            .rev()
            .find(|r| r.gate_revert.as_deref() == Some(gate.as_str()))
        {
            if !self.git.is_ancestor(&gate, &head).await? {
                // The gate holds a revert that upstream does not have as such.
                // Once upstream's guarded tree equals the gate's (the revert was
                // merged or squashed), the gate joins upstream; until then it waits.
                let (at_gate, at_head) = (
                    self.git.snapshot(&gate, &self.settings.path).await?,
                    self.git.snapshot(&head, &self.settings.path).await?,
                );
                if at_gate == at_head {
                    tracing::info!(run = %reverted.id, "upstream now holds the gate's revert; moving the gate to upstream");
                    self.git.force_push(&head, &self.settings.gate).await?;
                    gate = head.clone();
                } else {
                    report.gate = gate;
                    report.waiting = Some(format!(
                        "the gate holds the revert made by run {}; upstream {} diverges from it under {:?} until that revert is merged",
                        reverted.id, self.settings.upstream, self.settings.path
                    ));
                    return Ok(report);
                }
            }
        }
        let pending = self
            .git
            .pending(&gate, &head, (&self.settings.gate, &self.settings.upstream))
            .await?;
        if pending.is_empty() {
            report.gate = gate;
            return Ok(report);
        }
        let candidates = plan::discover(&self.git, &gate, &head, &self.settings.path, &pending).await?;
        let checkpoint_for = |k| self.checkpoint_for(k);
        for candidate in candidates {
            let prepared =
                plan::prepare(&candidate, self.cluster.as_ref(), self.runner.as_ref(), &checkpoint_for).await?;
            if prepared.migrations.is_empty() {
                tracing::info!(commit = %candidate.commit.short(), "migrations already applied; nothing to run");
                continue;
            }
            if let Some(reason) = blocked_by(&runs, &prepared) {
                let before = previous_commit(&pending, &candidate.commit.sha);
                gate = self.advance_gate(&gate, before).await?;
                report.gate = gate;
                report.waiting = Some(reason);
                return Ok(report);
            }
            let before = previous_commit(&pending, &candidate.commit.sha);
            gate = self.advance_gate(&gate, before).await?;
            let mut run = self.new_run(&prepared, &gate);
            self.store.save(&run).await?;
            let outcome = self.drive(&mut run).await?;
            report.runs.push((run.id.clone(), outcome, self.report_location(&run)));
            if outcome != Outcome::Succeeded {
                report.gate = gate;
                return Ok(report);
            }
            gate = candidate.commit.sha.clone();
        }
        report.gate = self.advance_gate(&gate, Some(&head)).await?;
        Ok(report)
    }

    fn report_location(&self, run: &RunRecord) -> String {
        run.steps
            .iter()
            .rev()
            .find(|s| s.name == "report")
            .map(|s| s.detail.clone())
            .unwrap_or_default()
    }

    /// Fast-forwards the gate to `to` (no-op when `to` is None or the gate is there).
    async fn advance_gate(&self, gate: &str, to: Option<&str>) -> Result<String, EngineError> {
        let Some(to) = to else { return Ok(gate.to_string()) };
        if to == gate {
            return Ok(gate.to_string());
        }
        tracing::info!(from = %short(gate), to = %short(to), "fast-forwarding gate through commits without migrations");
        self.git.push(to, &self.settings.gate).await?;
        Ok(to.to_string())
    }

    fn new_run(&self, prepared: &Prepared, gate: &str) -> RunRecord {
        let now = Utc::now();
        RunRecord {
            id: format!("{}-{}", now.format("%Y%m%d-%H%M%S"), prepared.commit.short()),
            created_at: now,
            commit: prepared.commit.clone(),
            upstream_branch: self.settings.upstream.clone(),
            gate_branch: self.settings.gate.clone(),
            gate_before: gate.to_string(),
            order: prepared.order,
            migrations: prepared.migrations.clone(),
            already_applied: prepared.already_applied.clone(),
            plan_hash: prepared.plan_hash.clone(),
            findings: prepared.findings.clone(),
            approvals: prepared
                .verdicts
                .iter()
                .flat_map(|v| v.notes.iter().filter(|n| n.starts_with("approved by")).cloned())
                .collect(),
            needs_drill: prepared.needs_drill(),
            phase: Phase::Pending,
            steps: Vec::new(),
            checkpoint: None,
            recovery_point: None,
            migrate_results: Vec::new(),
            verify_results: Vec::new(),
            promoted: false,
            failure: None,
            restore_decision: None,
            restore: None,
            revert: None,
            gate_revert: None,
            hold_released: false,
            remediation_errors: Vec::new(),
            report_written: false,
        }
    }

    /// Drives `run` from its current phase to the end.
    pub async fn drive(&self, run: &mut RunRecord) -> Result<Outcome, EngineError> {
        let span = tracing::info_span!("run", run = %run.id, commit = %run.commit.short());
        self.drive_inner(run).instrument(span).await
    }

    async fn drive_inner(&self, run: &mut RunRecord) -> Result<Outcome, EngineError> {
        let mut db: Option<Database> = None;
        loop {
            crash_point(run.phase);
            let order = run.order;
            match run.phase {
                Phase::Pending => self.advance(run, Phase::Locking).await?,
                Phase::Locking => {
                    let id = run.id.clone();
                    let result = self.step(run, "lock", self.cluster.lock(&id)).await?;
                    match result {
                        Ok(_) => self.advance(run, Phase::Planning).await?,
                        Err(e) => self.fail(run, format!("lock failed: {e}"), false).await?,
                    }
                }
                Phase::Planning => {
                    let detail = format!(
                        "plan {}: {} migration(s) {}",
                        run.plan_hash,
                        run.migrations.len(),
                        run.migrations
                            .iter()
                            .map(|m| m.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    self.step(run, "plan", async { Ok::<_, String>(detail) }).await?.ok();
                    self.advance(run, Phase::Checkpointing).await?
                }
                Phase::Checkpointing => {
                    self.checkpoint(run, &mut db).await?;
                    if run.phase == Phase::Checkpointing {
                        let next = if order == Order::BeforeApply {
                            Phase::Migrating
                        } else {
                            Phase::Promoting
                        };
                        self.advance(run, next).await?
                    }
                }
                Phase::Migrating => {
                    self.migrate(run, &mut db).await?;
                    if run.phase == Phase::Migrating {
                        self.advance(run, Phase::Verifying).await?
                    }
                }
                Phase::Verifying => {
                    self.verify(run, &mut db).await?;
                    if run.phase == Phase::Verifying {
                        let next = if order == Order::BeforeApply {
                            Phase::Promoting
                        } else {
                            Phase::Unlocking
                        };
                        self.advance(run, next).await?
                    }
                }
                Phase::Promoting => {
                    self.promote(run).await?;
                    if run.phase == Phase::Promoting {
                        let next = if order == Order::BeforeApply {
                            Phase::Unlocking
                        } else {
                            Phase::Migrating
                        };
                        self.advance(run, next).await?
                    }
                }
                Phase::Remediating => {
                    self.remediate(run, &mut db).await?;
                    self.advance(run, Phase::Unlocking).await?
                }
                Phase::Unlocking => {
                    let id = run.id.clone();
                    if let Err(e) = self.step(run, "unlock", self.cluster.unlock(&id)).await? {
                        run.remediation_errors.push(format!("unlock failed: {e}"));
                    }
                    let end = match (&run.failure, run.remediation_errors.is_empty()) {
                        (None, true) => Phase::Succeeded,
                        (Some(_), true) => Phase::RolledBack,
                        (_, false) => Phase::Failed,
                    };
                    self.advance(run, end).await?
                }
                Phase::Succeeded | Phase::RolledBack | Phase::Failed => {
                    let report = Report::from_run(run);
                    let snapshot = run.clone();
                    let location = self
                        .step(run, "report", self.store.write_report(&snapshot, &report))
                        .await?;
                    if let Err(e) = location {
                        tracing::error!(error = %e, "could not write the evidence report");
                    }
                    run.report_written = true;
                    self.store.save(run).await?;
                    let outcome = run.outcome().unwrap_or(Outcome::Failed);
                    match outcome {
                        Outcome::Succeeded => tracing::info!("run succeeded"),
                        Outcome::RolledBack => {
                            tracing::warn!(reason = ?run.failure.as_ref().map(|f| &f.message), "run failed and was rolled back")
                        }
                        Outcome::Failed => {
                            tracing::error!(errors = ?run.remediation_errors, "run failed and remediation did not complete: a person must act")
                        }
                    }
                    return Ok(outcome);
                }
            }
        }
    }

    async fn advance(&self, run: &mut RunRecord, phase: Phase) -> Result<(), StoreError> {
        tracing::info!(from = %run.phase, to = %phase, "phase");
        run.phase = phase;
        self.store.save(run).await
    }

    async fn fail(&self, run: &mut RunRecord, message: String, data_changed: bool) -> Result<(), StoreError> {
        let data_changed = data_changed || run.migrate_results.iter().any(|(_, o)| o.committed);
        tracing::warn!(phase = %run.phase, error = %message, "run step failed");
        run.failure = Some(Failure {
            phase: run.phase,
            message,
            data_changed,
        });
        self.advance(run, Phase::Remediating).await
    }

    /// Records the step's intent, runs `action`, records its result.
    async fn step<T, E: std::fmt::Display>(
        &self,
        run: &mut RunRecord,
        name: &str,
        action: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, StoreError>
    where
        T: StepDetail,
    {
        let phase = run.phase;
        run.steps.push(Step {
            name: name.to_string(),
            phase,
            started_at: Utc::now(),
            finished_at: None,
            ok: None,
            detail: String::new(),
        });
        self.store.save(run).await?;
        let result = action.await;
        if let Some(step) = run
            .steps
            .iter_mut()
            .rev()
            .find(|s| s.name == name && s.finished_at.is_none())
        {
            step.finished_at = Some(Utc::now());
            step.ok = Some(result.is_ok());
            step.detail = match &result {
                Ok(v) => v.detail(),
                Err(e) => e.to_string(),
            };
        }
        self.store.save(run).await?;
        Ok(result)
    }

    async fn database(&self, run: &RunRecord, cache: &mut Option<Database>) -> Result<Database, String> {
        if let Some(db) = cache {
            return Ok(db.clone());
        }
        let first = &run.migrations[0];
        let db = self
            .cluster
            .resolve(&first.database, first.database_name.as_deref())
            .await
            .map_err(|e| chain(&e))?;
        *cache = Some(db.clone());
        Ok(db)
    }

    /// Takes the checkpoint (once) and, for approved runs, the restore drill.
    async fn checkpoint(&self, run: &mut RunRecord, cache: &mut Option<Database>) -> Result<(), StoreError> {
        let kind = run.migrations[0].checkpoint;
        let backend = match self.checkpoint_for(kind) {
            Err(e) => return self.fail(run, e, false).await,
            Ok(None) if run.needs_drill => {
                return self
                    .fail(
                        run,
                        "an approved run needs a checkpoint with a restore drill".into(),
                        false,
                    )
                    .await
            }
            Ok(None) => return Ok(()),
            Ok(Some(backend)) => backend,
        };
        if run.checkpoint.is_none() {
            let database = match self.database(run, cache).await {
                Ok(db) => db,
                Err(e) => return self.fail(run, e, false).await,
            };
            let id = run.id.clone();
            match self.step(run, "checkpoint", backend.create(&database, &id)).await? {
                Ok(record) => {
                    run.checkpoint = Some(record);
                    self.store.save(run).await?;
                }
                Err(e) => return self.fail(run, format!("checkpoint failed: {}", chain(&e)), false).await,
            }
        }
        let Some(record) = run.checkpoint.clone() else {
            return Ok(());
        };
        if !run.needs_drill
            || record.restore_drill.starts_with("passed")
            || record.restore_drill.starts_with("not supported")
        {
            return Ok(());
        }
        let database = match self.database(run, cache).await {
            Ok(db) => db,
            Err(e) => return self.fail(run, e, false).await,
        };
        let result = self
            .step(run, "restore-drill", backend.drill(&database, &record))
            .await?;
        let failure = match &result {
            Ok(detail) => {
                if let Some(c) = run.checkpoint.as_mut() {
                    c.restore_drill = if detail.starts_with("not supported") {
                        detail.clone()
                    } else {
                        format!("passed: {detail}")
                    };
                }
                None
            }
            Err(e) => {
                let text = chain(e);
                if let Some(c) = run.checkpoint.as_mut() {
                    c.restore_drill = format!("failed: {text}");
                }
                Some(text)
            }
        };
        self.store.save(run).await?;
        match failure {
            Some(text) => self.fail(run, format!("restore drill failed: {text}"), false).await,
            None => Ok(()),
        }
    }

    async fn migrate(&self, run: &mut RunRecord, cache: &mut Option<Database>) -> Result<(), StoreError> {
        let db = match self.database(run, cache).await {
            Ok(db) => db,
            Err(e) => return self.fail(run, e, false).await,
        };
        if run.recovery_point.is_none() {
            match self
                .step(run, "recovery-point", self.runner.recovery_point(&db))
                .await?
            {
                Ok(point) => {
                    run.recovery_point = Some(point);
                    self.store.save(run).await?;
                }
                Err(e) => {
                    return self
                        .fail(run, format!("reading the recovery point failed: {}", chain(&e)), false)
                        .await
                }
            }
        }
        for m in run.migrations.clone() {
            if run.migrate_results.iter().any(|(id, _)| id == &m.id) {
                continue;
            }
            let name = format!("migrate {}", m.id);
            let span = tracing::info_span!("migration", migration = %m.id);
            if run.open_step(&name) {
                // Interrupted while the migration ran: history says whether it committed.
                let applied = self.runner.applied(&db, &m.id).await.ok().flatten();
                let outcome = match applied {
                    Some(row) if row.run_id == run.id => MigrateOutcome {
                        transactional: true,
                        statements_done: m.statements.len(),
                        statements_total: m.statements.len(),
                        error: None,
                        committed: true,
                        duration_ms: 0,
                    },
                    _ => MigrateOutcome {
                        transactional: m.statements.iter().all(|s| s.transactional),
                        statements_done: 0,
                        statements_total: m.statements.len(),
                        error: Some("interrupted while running; not in history".into()),
                        committed: !m.statements.iter().all(|s| s.transactional),
                        duration_ms: 0,
                    },
                };
                if let Some(s) = run
                    .steps
                    .iter_mut()
                    .rev()
                    .find(|s| s.name == name && s.finished_at.is_none())
                {
                    s.finished_at = Some(Utc::now());
                    s.ok = Some(outcome.error.is_none());
                    s.detail = format!(
                        "resumed after interruption: {}",
                        outcome.error.as_deref().unwrap_or("found in history")
                    );
                }
                if let Some(e) = outcome.error.clone() {
                    let changed = outcome.committed;
                    run.migrate_results.push((m.id.clone(), outcome));
                    return self.fail(run, format!("migration {} failed: {e}", m.id), changed).await;
                }
                run.migrate_results.push((m.id.clone(), outcome));
                self.store.save(run).await?;
                continue;
            }
            let (run_id, commit) = (run.id.clone(), run.commit.sha.clone());
            let who = RunIdentity {
                run_id: &run_id,
                commit: &commit,
            };
            let result = self
                .step(run, &name, self.runner.migrate(&db, &m, who).instrument(span))
                .await?;
            match result {
                Err(e) => {
                    return self
                        .fail(run, format!("migration {} could not run: {}", m.id, chain(&e)), false)
                        .await
                }
                Ok(outcome) => {
                    let error = outcome.error.clone();
                    let changed = outcome.committed;
                    if let Some(step) = run.steps.iter_mut().rev().find(|s| s.name == name) {
                        step.ok = Some(error.is_none());
                    }
                    run.migrate_results.push((m.id.clone(), outcome));
                    self.store.save(run).await?;
                    if let Some(e) = error {
                        return self.fail(run, format!("migration {} failed: {e}", m.id), changed).await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn verify(&self, run: &mut RunRecord, cache: &mut Option<Database>) -> Result<(), StoreError> {
        let db = match self.database(run, cache).await {
            Ok(db) => db,
            Err(e) => return self.fail(run, e, true).await,
        };
        for m in run.migrations.clone() {
            let Some(query) = m.verify.clone() else { continue };
            if run.verify_results.iter().any(|(id, _)| id == &m.id) {
                continue;
            }
            let name = format!("verify {}", m.id);
            let result = self
                .step(run, &name, self.runner.verify(&db, &query, m.timeout))
                .await?;
            match result {
                Err(e) => {
                    return self
                        .fail(run, format!("verify of {} could not run: {}", m.id, chain(&e)), true)
                        .await
                }
                Ok(outcome) => {
                    let passed = outcome.passed;
                    let detail = outcome.detail.clone();
                    if let Some(step) = run.steps.iter_mut().rev().find(|s| s.name == name) {
                        step.ok = Some(passed);
                    }
                    run.verify_results.push((m.id.clone(), outcome));
                    self.store.save(run).await?;
                    if !passed {
                        return self
                            .fail(run, format!("verify of {} failed: {detail}", m.id), true)
                            .await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn promote(&self, run: &mut RunRecord) -> Result<(), StoreError> {
        if !run.promoted {
            let commit = run.commit.sha.clone();
            let gate = self.settings.gate.clone();
            let git = self.git.clone();
            let push = async move {
                // Idempotent: a resumed run may find the gate already there.
                if git.branch(&gate).await?.as_deref() == Some(commit.as_str()) {
                    return Ok::<_, GitError>(format!("gate already at {commit}"));
                }
                git.push(&commit, &gate).await?;
                Ok(format!("gate {gate} fast-forwarded to {commit}"))
            };
            match self.step(run, "promote", push).await? {
                Ok(_) => {
                    run.promoted = true;
                    self.store.save(run).await?;
                }
                Err(e) => {
                    return self
                        .fail(run, format!("moving the gate failed: {}", chain(&e)), false)
                        .await
                }
            }
        }
        let id = run.id.clone();
        let sha = run.commit.sha.clone();
        if let Err(e) = self.step(run, "health", self.cluster.promote(&id, &sha)).await? {
            return self
                .fail(run, format!("health check after promotion failed: {}", chain(&e)), true)
                .await;
        }
        Ok(())
    }

    async fn remediate(&self, run: &mut RunRecord, cache: &mut Option<Database>) -> Result<(), StoreError> {
        let Some(failure) = run.failure.clone() else {
            return Ok(());
        };
        if failure.data_changed {
            if run.restore.is_none() {
                self.restore(run, cache).await?;
            }
        } else if run.restore_decision.is_none() {
            let why = if run.migrate_results.is_empty() {
                "no restore: the migration did not start, the database is unchanged"
            } else {
                "no restore: the migration failed inside one transaction, which PostgreSQL rolled back (zero data loss)"
            };
            run.restore_decision = Some(why.into());
            self.store.save(run).await?;
        }
        if run.promoted && run.gate_revert.is_none() {
            // The commit is live: revert it on the gate at once, so Flux rolls
            // the code back now; upstream gets its revert below.
            let trailer = format!("Backstop-Run: {}", run.id);
            let (git, gate, commit) = (self.git.clone(), self.settings.gate.clone(), run.commit.sha.clone());
            let body = format!("backstop run {} rolls back the promoted commit on the gate.", run.id);
            let work = async move {
                let (sha, _) = push_revert(&git, &commit, &gate, &gate, &body, &trailer, None).await?;
                Ok::<_, GitError>(sha)
            };
            match self.step(run, "gate-revert", work).await? {
                Ok(sha) => run.gate_revert = Some(sha),
                Err(e) => run
                    .remediation_errors
                    .push(format!("reverting the gate failed: {}", chain(&e))),
            }
            self.store.save(run).await?;
        }
        if run.revert.is_none() {
            let revert = self.revert(run);
            let result = revert.await;
            match result {
                Ok(record) => {
                    run.revert = Some(record);
                    self.store.save(run).await?;
                }
                Err(e) => {
                    run.remediation_errors.push(format!("revert failed: {e}"));
                    self.store.save(run).await?;
                }
            }
        }
        Ok(())
    }

    async fn restore(&self, run: &mut RunRecord, cache: &mut Option<Database>) -> Result<(), StoreError> {
        let (checkpoint, point) = match (run.checkpoint.clone(), run.recovery_point.clone()) {
            (Some(c), Some(p)) => (c, p),
            (None, _) => {
                run.restore_decision = Some("restore needed (data changed) but the run has no checkpoint".into());
                run.remediation_errors.push(
                    "data changed and there is no checkpoint to restore (checkpoint: none); restore by hand".into(),
                );
                return self.store.save(run).await;
            }
            (Some(c), None) => {
                let p = RecoveryPoint {
                    time: c.completed_at,
                    lsn: String::new(),
                };
                (c, p)
            }
        };
        run.restore_decision = Some(format!(
            "restore: the failure left committed changes ({}), so the database goes back to the checkpoint",
            run.failure.as_ref().map(|f| f.message.as_str()).unwrap_or("")
        ));
        let Some(backend) = self
            .checkpoints
            .values()
            .find(|b| b.name() == checkpoint.backend)
            .cloned()
        else {
            run.remediation_errors
                .push(format!("no {} backend configured to restore from", checkpoint.backend));
            return self.store.save(run).await;
        };
        let db = match self.database(run, cache).await {
            Ok(db) => db,
            Err(e) => {
                run.remediation_errors.push(format!("restore failed: {e}"));
                return self.store.save(run).await;
            }
        };
        let id = run.id.clone();
        match self
            .step(run, "restore", backend.restore(&db, &checkpoint, &point, &id))
            .await?
        {
            Ok(record) => run.restore = Some(record),
            Err(e) => run.remediation_errors.push(format!("restore failed: {}", chain(&e))),
        }
        // A restore replaced the server: cached connections settings stay valid.
        self.store.save(run).await
    }

    async fn revert(&self, run: &mut RunRecord) -> Result<RevertRecord, String> {
        let mode = self.settings.revert.unwrap_or(run.migrations[0].revert);
        let trailer = format!("Backstop-Run: {}", run.id);
        let failure = run.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
        let ids: Vec<&str> = run.migrations.iter().map(|m| m.id.as_str()).collect();
        let body = format!(
            "backstop run {} failed on migration(s) {}: {failure}",
            run.id,
            ids.join(", ")
        );
        let commit = run.commit.sha.clone();
        let name = match mode {
            RevertMode::Commit => "revert-commit",
            RevertMode::PullRequest => "revert-branch",
        };
        let upstream = self.settings.upstream.clone();
        let git = self.git.clone();
        // A recreated database cluster: its manifest change rides with the revert.
        let patch = run.restore.as_ref().and_then(|r| r.manifest_patch.clone());
        let work = async {
            match mode {
                RevertMode::Commit => {
                    // Fast-forward only: when upstream moved, redo on the new head.
                    for _ in 0..5 {
                        match push_revert(&git, &commit, &upstream, &upstream, &body, &trailer, patch.as_ref()).await {
                            Ok((sha, found)) => return Ok((sha, upstream.clone(), note(found, "pushed to upstream"))),
                            Err(GitError::Rejected { .. }) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    Err(GitError::Rejected {
                        sha: commit.clone(),
                        branch: upstream.clone(),
                        url: git.url().to_string(),
                        reason: "upstream kept moving; gave up after 5 attempts".into(),
                    })
                }
                RevertMode::PullRequest => {
                    let branch = format!("backstop/revert-{}", &commit[..7.min(commit.len())]);
                    let (sha, found) =
                        push_revert(&git, &commit, &upstream, &branch, &body, &trailer, patch.as_ref()).await?;
                    Ok((sha, branch, note(found, "pushed revert branch")))
                }
            }
        };
        let (sha, branch, note) = match self.step(run, name, async { work.await.map(RevertPushed) }).await {
            Ok(Ok(RevertPushed(v))) => v,
            Ok(Err(e)) => return Err(chain(&e)),
            Err(e) => return Err(chain(&e)),
        };
        let mut record = RevertRecord {
            mode,
            commit: sha,
            branch: branch.clone(),
            pull_request: None,
            note,
            pr_pending: false,
        };
        if mode == RevertMode::PullRequest {
            let pr = revert_pull_request(run, &branch, &upstream);
            match self.step(run, "pull-request", self.forge.open_pull_request(&pr)).await {
                Ok(Ok(Some(url))) => record.pull_request = Some(url),
                Ok(Ok(None)) => record.note = format!("{}; no forge configured, no pull request opened", record.note),
                Ok(Err(e)) => {
                    record.pr_pending = true;
                    record.note = format!("{}; revert pushed, pull request pending: {e}", record.note);
                }
                Err(e) => return Err(chain(&e)),
            }
        }
        Ok(record)
    }

    /// Opens the pull requests that a forge outage left pending.
    async fn open_pending_pull_requests(&self, runs: &[RunRecord]) -> Result<(), StoreError> {
        for run in runs.iter().filter(|r| r.revert.as_ref().is_some_and(|v| v.pr_pending)) {
            let mut run = run.clone();
            let Some(revert) = run.revert.clone() else { continue };
            let pr = revert_pull_request(&run, &revert.branch, &self.settings.upstream);
            match self
                .step(&mut run, "pull-request", self.forge.open_pull_request(&pr))
                .await?
            {
                Ok(url) => {
                    if let Some(v) = run.revert.as_mut() {
                        v.pr_pending = false;
                        v.pull_request = url.clone();
                        v.note = format!("{}; pull request opened by a later pass", v.note);
                    }
                    tracing::info!(run = %run.id, url = ?url, "opened the pending revert pull request");
                    let report = Report::from_run(&run);
                    let snapshot = run.clone();
                    if let Err(e) = self.store.write_report(&snapshot, &report).await {
                        tracing::error!(error = %e, "could not rewrite the evidence report");
                    }
                    self.store.save(&run).await?;
                }
                Err(e) => {
                    tracing::warn!(run = %run.id, error = %e, "revert pull request still pending");
                    self.store.save(&run).await?;
                }
            }
        }
        Ok(())
    }
}

/// Reverts `commit` on top of `base`'s head and pushes it to `target` (no
/// force), with the manifest change a restore asks for. A revert that `target`
/// already carries (same `Backstop-Run:` trailer) is reused: `(sha, true)`.
async fn push_revert(
    git: &GitRepo,
    commit: &str,
    base: &str,
    target: &str,
    body: &str,
    trailer: &str,
    patch: Option<&ManifestPatch>,
) -> Result<(String, bool), GitError> {
    git.fetch().await?;
    if let Some(sha) = git.find_on_branch(target, trailer, 200).await? {
        return Ok((sha, true));
    }
    let head = git.require_branch(base).await?;
    let files = repo_changes(git, &head, patch).await?;
    let sha = git.revert_with(commit, &head, body, trailer, files).await?;
    git.push(&sha, target).await?;
    Ok((sha, false))
}

/// How a revert step describes what it did.
fn note(found: bool, done: &str) -> String {
    if found {
        "found from an earlier attempt".into()
    } else {
        done.into()
    }
}

/// The files a revert must also change so that git matches the cluster.
async fn repo_changes(
    git: &GitRepo,
    head: &str,
    patch: Option<&ManifestPatch>,
) -> Result<Vec<(String, String)>, GitError> {
    let Some(p) = patch else { return Ok(Vec::new()) };
    let snapshot = git.snapshot(head, "").await?;
    Ok(
        match crate::manifests::patch_manifest(&snapshot, &p.kind, &p.namespace, &p.name, &p.merge) {
            Some(f) if !f.already => vec![(f.path, f.content)],
            Some(_) => Vec::new(),
            None => {
                tracing::warn!(kind = %p.kind, namespace = %p.namespace, name = %p.name, "manifest not found in the repository; update it by hand");
                Vec::new()
            }
        },
    )
}

/// Resumes what a restore held (the Kustomization owning a recreated cluster)
/// once the gate carries the manifest change.
async fn release_holds(engine: &Engine, runs: &[RunRecord], gate: &str) -> Result<(), StoreError> {
    for run in runs.iter().filter(|r| !r.hold_released && r.phase.is_terminal()) {
        let Some(patch) = run.restore.as_ref().and_then(|r| r.manifest_patch.clone()) else {
            continue;
        };
        let Some(hold) = patch.hold.clone() else { continue };
        let Ok(snapshot) = engine.git.snapshot(gate, "").await else {
            continue;
        };
        let applied =
            crate::manifests::patch_manifest(&snapshot, &patch.kind, &patch.namespace, &patch.name, &patch.merge)
                .is_some_and(|f| f.already);
        if !applied {
            tracing::info!(run = %run.id, held = %hold, "held until the gate carries the {} manifest change", patch.kind);
            continue;
        }
        let mut run = run.clone();
        let id = run.id.clone();
        if engine
            .step(&mut run, &format!("release {hold}"), engine.cluster.release(&hold, &id))
            .await?
            .is_ok()
        {
            run.hold_released = true;
        }
        engine.store.save(&run).await?;
    }
    Ok(())
}

/// The pull request for a run's revert branch; its body is the evidence report.
fn revert_pull_request(run: &RunRecord, branch: &str, upstream: &str) -> PullRequest {
    PullRequest {
        title: format!("Revert \"{}\"", run.commit.subject),
        body: report::markdown(&Report::from_run(run)),
        head: branch.to_string(),
        base: upstream.to_string(),
        labels: vec!["backstop".into(), "revert".into()],
        full_report: format!(
            "runs/{}/report.md in backstop's state directory (`backstop report {}`)",
            run.id, run.id
        ),
    }
}

struct RevertPushed((String, String, String));

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
        format!(
            "{} checkpoint at {} ({} bytes)",
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
impl StepDetail for RevertPushed {
    fn detail(&self) -> String {
        format!("{} on {} ({})", self.0 .0, self.0 .1, self.0 .2)
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

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// The pending commit just before `sha` (None when `sha` is the first).
fn previous_commit<'a>(pending: &'a [CommitInfo], sha: &str) -> Option<&'a str> {
    let index = pending.iter().position(|c| c.sha == sha)?;
    index.checked_sub(1).map(|i| pending[i].sha.as_str())
}

/// A (migration, checksum) whose run failed is not retried: the gate waits.
fn blocked_by(runs: &[RunRecord], prepared: &Prepared) -> Option<String> {
    for m in &prepared.migrations {
        let failed = runs.iter().rev().find(|r| {
            matches!(r.outcome(), Some(Outcome::RolledBack | Outcome::Failed))
                && r.migrations.iter().any(|x| x.id == m.id && x.checksum == m.checksum)
        });
        if let Some(r) = failed {
            let revert = r
                .revert
                .as_ref()
                .map(|v| match &v.pull_request {
                    Some(url) => format!("revert pull request {url}"),
                    None => format!("revert {} on branch {}", short(&v.commit), v.branch),
                })
                .unwrap_or_else(|| "no revert was made".into());
            return Some(format!(
                "migration {} (checksum {}) failed in run {}; the gate waits for the {revert} to be merged or for a commit that changes the carrier",
                m.id,
                short(&m.checksum),
                r.id
            ));
        }
    }
    None
}

/// Exit status of the test crash switch.
pub const TEST_CRASH_EXIT: i32 = 86;

/// Test hook (debug builds only): `BACKSTOP_TEST_CRASH_AT=<Phase>` ends the
/// process abruptly (exit 86, no cleanup) when a run enters that phase, right
/// after the journal recorded it.
fn crash_point(phase: Phase) {
    #[cfg(debug_assertions)]
    if std::env::var("BACKSTOP_TEST_CRASH_AT").ok().as_deref() == Some(phase.as_str()) {
        eprintln!("backstop: test crash at phase {phase}");
        std::process::exit(TEST_CRASH_EXIT);
    }
    #[cfg(not(debug_assertions))]
    let _ = phase;
}
