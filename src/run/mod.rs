//! Runs (DESIGN section 3): one candidate commit for one guarded target,
//! driven through its phases by the backend traits (checkpoint, runner, forge,
//! cluster) and recorded durably in a [`RunStore`]. This module knows no
//! backend and no Kubernetes. Its parts:
//!
//! - [`record`]: the run record types (phase, steps, failure taxonomy, retries);
//! - [`machine`]: the pure transition: what to do next, and how a result
//!   changes the record;
//! - [`exec`]: the executor performing the machine's actions through the
//!   traits, writing each step's intent before acting and its result after,
//!   so a restarted process resumes where it stopped and never repeats a
//!   backup, a restore or a revert;
//! - this file: the pass, the scheduler that picks what runs and moves the
//!   gate (always through [`crate::gate`], which checks the gate invariant).

mod claims;
pub mod exec;
pub mod machine;
pub mod record;
pub mod retention;
pub mod summary;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;

pub use record::{
    chain, Acknowledged, Failure, FailureKind, Outcome, Phase, Retry, RevertRecord, RunRecord, RunStore, Step,
    StepDetail, StoreError, WarmTarget,
};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::cluster::Cluster;
use crate::forge::Forge;
use crate::gate::{self, Exempt, GateError, GateStatus, GateView, History, Move, TreeState, Wait};
use crate::git::{GitError, GitRepo};
use crate::manifests::{CheckpointKind, RevertMode};
use crate::plan::{self, PlanError, Prepared};
use crate::runner::Runner;
use claims::{Claimed, OWED_WINDOW};
use machine::Backoff;

/// Errors that stop a pass (not failures of a run, which are remediated).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
}

/// Branches and paths the engine guards.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upstream: String,
    pub gate: String,
    /// Folder of the repo the guarded target applies (empty: everything).
    pub path: String,
    /// Folders other guarded targets apply from the same gate branch: the
    /// gate invariant is checked on them too before the gate moves (their
    /// migrations are theirs to run).
    pub also_guarded: Vec<String>,
    /// Whether this engine moves a shared gate over pending commits that
    /// touch none of its own path (always, when the gate is not shared).
    /// Of the Kustomizations sharing a gate, one is the steward; the others
    /// skip a pass whose pending commits leave their path untouched, so a
    /// push wakes a hundred Kustomizations but only those it concerns work.
    /// Skipping never moves the gate, so the invariant does not depend on
    /// it; the gate moves on the steward's pass, or on the pass of the
    /// Kustomization whose carrier runs.
    pub steward: bool,
    /// Overrides the carriers' `backstop.dev/revert` when set.
    pub revert: Option<RevertMode>,
    /// Sets every carrier's `backstop.dev/replay` to `auto` when true.
    pub replay_lost_writes: bool,
    /// Waits after transient faults.
    pub backoff: Backoff,
    /// This instance's identity when it claims a database ([`crate::owner`]).
    pub owner: String,
    /// Checkpoints of the newest this many ended runs are kept; older ones
    /// are deleted (0: keep all). See [`retention::prunable`].
    pub keep_checkpoints: usize,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Runs that ended in this pass: (id, outcome, report location).
    pub runs: Vec<(String, Outcome, String)>,
    /// Their records as they ended (as saved), in the same order: what
    /// the pass's summary says, without reading the journal again.
    pub records: Vec<RunRecord>,
    /// Where the gate is after the pass.
    pub gate: String,
    /// Why the gate waits, if it does.
    pub waiting: Option<Wait>,
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
    /// The gate tree read last (a pass reads the gate's tree to schedule,
    /// and again at the gate move): see [`GateView::tree`].
    pub last_gate_tree: crate::gate::LastTree,
}

/// How a drive of a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Ended(Outcome),
    /// A transient fault is waited out; the run stays open.
    Waiting,
}

impl Engine {
    fn checkpoint_for(&self, kind: CheckpointKind) -> Result<Option<Arc<dyn Checkpoint>>, String> {
        if kind == CheckpointKind::None {
            return Ok(None);
        }
        self.checkpoints.get(&kind).cloned().map(Some).ok_or_else(|| {
            let mut kinds: Vec<&str> = self.checkpoints.keys().map(|k| k.as_str()).collect();
            kinds.push("none");
            kinds.sort_unstable();
            format!(
                "checkpoint {kind} is not available here (available: {})",
                kinds.join(", ")
            )
        })
    }

    /// The gate of the guarded path.
    pub fn gate(&self) -> GateView<'_> {
        GateView {
            git: &self.git,
            cluster: self.cluster.as_ref(),
            runner: self.runner.as_ref(),
            branch: &self.settings.gate,
            path: &self.settings.path,
            also: &self.settings.also_guarded,
            me: &self.settings.owner,
            last: &self.last_gate_tree,
        }
    }

    /// One pass: fetch, resume open runs, run what is pending in order, and
    /// move the gate as far as the invariant allows. Records the gate status.
    pub async fn pass(&self) -> Result<PassReport, EngineError> {
        let mut report = PassReport::default();
        let result = self.pass_inner(&mut report).await;
        if report.runs.iter().any(|(_, outcome, _)| *outcome == Outcome::Failed) {
            // Its database is held for a person now: the next pass does not
            // log in to it ahead (nor to any other: it stops at that run).
            self.store.save_warm_hint(&[]).await;
        }
        if result.is_ok() {
            // Retention only has something new to let go when runs ended.
            let (status, pruned) = tokio::join!(self.record_status(&report), async {
                match report.runs.is_empty() {
                    true => Ok(()),
                    false => self.prune_checkpoints().await,
                }
            });
            if let (Err(_), Err(e)) = (&status, &pruned) {
                // The status's error is the pass's; this one is said here.
                tracing::warn!(error = %chain(e), "checkpoint retention failed");
            }
            status?;
            pruned?;
        }
        result.map(|()| report)
    }

    async fn pass_inner(&self, report: &mut PassReport) -> Result<(), EngineError> {
        tracing::debug!("pass started");
        // The journal is read while git fetches, and the logins the pass
        // needs first begin before either: to the databases the previous
        // pass named (a hint), then to any other the runs read name.
        let (fetched, previous) = tokio::join!(self.git.fetch(), async {
            let mut hinted = self.store.warm_hint().await;
            // As many as a pass owes at most, whatever the file says.
            hinted.truncate(OWED_WINDOW);
            let early: Vec<_> = hinted.iter().map(|t| self.prewarm(t)).collect();
            let runs = self.store.list().await?;
            self.warm_up(&runs, &hinted, early).await;
            Ok::<_, StoreError>(runs)
        });
        fetched?;
        let previous = previous?;
        tracing::debug!(runs = previous.len(), "pass read the runs");
        self.open_pending_pull_requests(&previous).await?;
        if let Some(gate) = self.git.branch(&self.settings.gate).await? {
            exec::release_holds(self, &previous, &gate).await?;
        }
        for mut run in previous.iter().filter(|r| r.is_open()).cloned() {
            if let Some(carrier) = run.migrations.first() {
                // Re-assert the claim the run took; a database that cannot be
                // reached (a restore stopped it) is the run's own business.
                if let Claimed::Theirs(wait) = self.claim(carrier, Some(&run.id)).await {
                    report.gate = self.git.require_branch(&self.settings.gate).await?;
                    report.waiting = Some(wait);
                    return Ok(());
                }
            }
            tracing::info!(run = %run.id, phase = %run.phase, "resuming run");
            let progress = self.drive(&mut run).await?;
            if let Progress::Ended(outcome) = progress {
                report.runs.push((run.id.clone(), outcome, exec::report_location(&run)));
                report.records.push(run.clone());
            }
            if progress != Progress::Ended(Outcome::Succeeded) {
                report.gate = self.git.require_branch(&self.settings.gate).await?;
                report.waiting = wait_for_run(&run);
                return Ok(());
            }
        }
        // A run whose remediation did not complete holds the gate until a
        // person takes it over (`backstop ack`): the database is in a state
        // nobody checked. (Read again only when a run was driven above:
        // a quiet pass reads its runs once.)
        let resumed = previous.iter().any(changes_in_pass);
        let runs = if resumed { self.store.list().await? } else { previous };
        if let Some(run) = runs.iter().rev().find(|r| r.awaits_person()) {
            report.gate = self.git.require_branch(&self.settings.gate).await?;
            report.waiting = wait_for_run(run);
            return Ok(());
        }
        // Re-read: a resumed run may have pushed.
        if resumed {
            self.git.fetch().await?;
        }
        tracing::debug!("pass schedules");
        self.schedule(report, runs).await
    }

    /// Whether a pass of this engine would find nothing of its own to do:
    /// it shares its gate, is not the gate's steward, and the commits
    /// pending at the gate leave its path untouched (or none are pending).
    /// Run state is the caller's to check: a run that [`changes_in_pass`]
    /// or awaits a person always needs a full pass. Reads git only.
    pub async fn nothing_pending_here(&self) -> Result<bool, EngineError> {
        if self.settings.steward || self.settings.also_guarded.is_empty() {
            return Ok(false);
        }
        self.git.fetch().await?;
        let touched = self
            .git
            .pending_touches(&self.settings.gate, &self.settings.upstream, &self.settings.path)
            .await?;
        // Unknown (no gate yet, or the gate holds a revert upstream has not
        // taken as such): a full pass decides.
        Ok(touched == Some(false))
    }

    /// Deletes the checkpoints retention lets go ([`retention::prunable`]).
    /// A deletion that fails is logged and tried again next pass.
    async fn prune_checkpoints(&self) -> Result<(), EngineError> {
        if self.settings.keep_checkpoints == 0 {
            return Ok(());
        }
        let runs = self.store.list().await?;
        for run in retention::prunable(&runs, self.settings.keep_checkpoints) {
            // The backend that took it, by the name its record carries; one
            // that keeps nothing here (a CNPG Backup) is left alone.
            let Some(name) = run.checkpoint.as_ref().map(|c| c.backend.as_str()) else {
                continue;
            };
            let Some(backend) = self
                .checkpoints
                .values()
                .find(|b| b.name() == name && matches!(name, "local" | "dump"))
            else {
                continue;
            };
            match backend.prune(&run.id).await {
                Ok(freed) => {
                    tracing::info!(run = %run.id, freed_mib = freed / (1 << 20), "retention deleted the checkpoint of an ended run");
                    let mut run = run.clone();
                    run.checkpoint_pruned = true;
                    self.store.save(&run).await?;
                }
                Err(e) => {
                    tracing::warn!(run = %run.id, error = %chain(&e), "retention could not delete a checkpoint; trying again next pass")
                }
            }
        }
        Ok(())
    }

    /// Picks what runs, in order, and moves the gate between runs.
    async fn schedule(&self, report: &mut PassReport, mut runs: Vec<RunRecord>) -> Result<(), EngineError> {
        // The claims are released while git is read (the gate's guarded
        // tree too, when something is pending: kept for the view below).
        let ((), branches) = tokio::join!(self.release_owed(&runs), async {
            let gate = self.git.require_branch(&self.settings.gate).await?;
            let head = self.git.require_branch(&self.settings.upstream).await?;
            // (Not on a path whose steward moves the gate: it may find
            // nothing of its own pending and read no tree.)
            if gate != head && (self.settings.steward || self.settings.also_guarded.is_empty()) {
                self.gate().tree(&gate).await?;
            }
            Ok::<_, GitError>((gate, head))
        });
        let (mut gate, head) = branches?;
        report.gate = gate.clone();
        let holds_revert = runs.iter().any(|r| r.gate_revert.as_deref() == Some(gate.as_str()));
        if gate == head && !holds_revert {
            // Nothing pending: no tree to read (the cheap pass of a controller
            // guarding many quiet Kustomizations).
            return Ok(());
        }
        if !holds_revert && !self.settings.steward && !self.settings.also_guarded.is_empty() {
            let touched = self
                .git
                .pending_touches(&self.settings.gate, &self.settings.upstream, &self.settings.path)
                .await?;
            if touched == Some(false) {
                tracing::debug!("nothing pending under this path; the gate's steward moves the gate");
                return Ok(());
            }
        }
        let view = self.gate();
        let gate_tree = view.tree(&gate).await?;
        tracing::debug!("the gate's guarded tree read");
        let exempt = exempt_at_gate(&gate_tree, &runs);
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
                if at_gate != at_head {
                    report.waiting = Some(Wait::GateRevert {
                        run: reverted.id.clone(),
                        revert: gate.clone(),
                    });
                    return Ok(());
                }
                tracing::info!(run = %reverted.id, "upstream now holds the gate's revert; moving the gate to upstream");
                gate = view.move_to(&head, Move::Join, &exempt).await?;
                report.gate = gate.clone();
            }
        }
        let pending = self
            .git
            .pending(&gate, &head, (&self.settings.gate, &self.settings.upstream))
            .await?;
        if pending.is_empty() {
            return Ok(());
        }
        tracing::debug!(commits = pending.len(), "pending commits listed");
        let trees = view.trees(&gate_tree, &pending).await?;
        tracing::debug!("the guarded tree of each pending commit read");
        let candidates = match plan::discover(&self.git, &gate, &head, &self.settings.path, &trees, &pending).await {
            Ok(c) => {
                tracing::debug!(candidates = c.len(), "migrations discovered");
                // The gate moves next to a run's commit, or to the newest
                // pending commit: their trees are checked again there.
                // (The first runs' only: later ones are past many moves.)
                let runs = trees.iter().filter(|t| c.iter().any(|c| c.commit.sha == t.sha));
                view.remember(runs.take(gate::LastTree::PENDING).chain(trees.last()));
                c
            }
            Err(e) => {
                report.waiting = Some(self.plan_wait(&e, &head).await);
                report.gate = self.advance(&gate, &trees, &exempt).await?;
                return Ok(());
            }
        };
        let checkpoint_for = |k| self.checkpoint_for(k);
        for candidate in candidates {
            // The claim names the run it is for (for the message another
            // instance shows): a plan that makes no run releases it.
            let created = Utc::now();
            let id = run_id(created, &candidate.commit);
            // Own the database before reading its history: no other instance
            // changes it between this plan and the end of the run.
            match self.claim(&candidate.carriers[0], Some(&id)).await {
                Claimed::Ours | Claimed::Unresolved => {}
                Claimed::Theirs(wait) => {
                    report.waiting = Some(wait);
                    report.gate = self.advance(&gate, &trees, &exempt).await?;
                    return Ok(());
                }
                Claimed::Refused(message) => {
                    report.waiting = Some(Wait::Refused {
                        commit: candidate.commit.sha.clone(),
                        message: format!("claiming the database for this run failed: {message}"),
                    });
                    report.gate = self.advance(&gate, &trees, &exempt).await?;
                    return Ok(());
                }
                Claimed::Unknown(cause) => {
                    let ids: Vec<&str> = candidate.carriers.iter().map(|c| c.id.as_str()).collect();
                    let cause = format!(
                        "claiming the database of migration(s) {} failed: {cause}",
                        ids.join(", ")
                    );
                    report.waiting = Some(self.retrying_plan(cause).await);
                    report.gate = self.advance(&gate, &trees, &exempt).await?;
                    return Ok(());
                }
            }
            let prepared =
                match plan::prepare(&candidate, self.cluster.as_ref(), self.runner.as_ref(), &checkpoint_for).await {
                    Ok(p) => p,
                    Err(e) => {
                        self.release(&candidate.carriers[0]).await;
                        report.waiting = Some(self.plan_wait(&e, &candidate.commit.sha).await);
                        report.gate = self.advance(&gate, &trees, &exempt).await?;
                        return Ok(());
                    }
                };
            if prepared.migrations.is_empty() {
                tracing::info!(commit = %candidate.commit.short(), "migrations already applied; nothing to run");
                self.release(&candidate.carriers[0]).await;
                continue;
            }
            let last = latest_run_of(&runs, &prepared);
            if let Some(wait) = last.and_then(|r| blocked_by(r, Utc::now(), &self.settings.backoff)) {
                self.release(&candidate.carriers[0]).await;
                report.waiting = Some(wait);
                report.gate = self.advance(&gate, &trees, &exempt).await?;
                return Ok(());
            }
            gate = self.advance(&gate, &trees, &exempt).await?;
            report.gate = gate.clone();
            let mut run = self.new_run((id, created), &prepared, &gate, last.and_then(|r| r.retry.clone()));
            let progress = self.drive_new(&mut run).await?;
            if let Progress::Ended(outcome) = progress {
                report.runs.push((run.id.clone(), outcome, exec::report_location(&run)));
                report.records.push(run.clone());
            }
            report.gate = self.git.require_branch(&self.settings.gate).await?;
            if progress != Progress::Ended(Outcome::Succeeded) {
                report.waiting = wait_for_run(&run);
                return Ok(());
            }
            gate = report.gate.clone();
            // The run is the only record its drive changed (and it was
            // saved as it ended): the list is kept without reading the
            // journal again.
            runs.push(run);
            runs.sort_by(RunRecord::oldest_first);
        }
        report.gate = self.advance(&gate, &trees, &exempt).await?;
        Ok(())
    }

    /// Moves the gate to the furthest pending commit whose tree satisfies the
    /// invariant (no move when that is the gate itself or nothing qualifies).
    async fn advance(&self, gate: &str, trees: &[TreeState], exempt: &Exempt) -> Result<String, EngineError> {
        // At the newest pending commit already: nothing further to reach
        // (and no history to read).
        if trees.last().is_none_or(|t| t.sha == gate) {
            return Ok(gate.to_string());
        }
        let view = self.gate();
        let history: History = view.history(trees.iter()).await;
        let Some(index) = gate::furthest(trees, &history, exempt) else {
            return Ok(gate.to_string());
        };
        let target = &trees[index].sha;
        if target == gate || self.git.is_ancestor(target, gate).await? {
            return Ok(gate.to_string());
        }
        tracing::info!(from = %short(gate), to = %short(target), "fast-forwarding the gate to the furthest commit whose migrations all ran");
        Ok(view.move_to(target, Move::FastForward, exempt).await?)
    }

    /// What the gate waits for after the plan of `commit` stopped.
    async fn plan_wait(&self, e: &PlanError, commit: &str) -> Wait {
        let message = chain(e);
        if is_transient(e) {
            self.retrying_plan(message).await
        } else {
            Wait::Refused {
                commit: commit.to_string(),
                message,
            }
        }
    }

    /// The plan could not read the database: retried on every pass, stalled
    /// after `--retry-max`.
    async fn retrying_plan(&self, message: String) -> Wait {
        {
            let previous = self.store.load_gate(&self.settings.path).await.ok().flatten();
            let (attempts, since) = match previous.and_then(|p| p.waiting) {
                Some(Wait::Retrying {
                    run: None,
                    attempts,
                    since,
                    ..
                }) => (attempts + 1, since),
                _ => (1, Utc::now()),
            };
            let now = Utc::now();
            let stalled = now - since >= chrono::Duration::from_std(self.settings.backoff.max).unwrap_or_default();
            tracing::warn!(error = %message, attempts, "plan could not read the database; retrying on the next pass (nothing was changed)");
            Wait::Retrying {
                run: None,
                step: "plan".into(),
                cause: message,
                attempts,
                since,
                next_at: now,
                stalled,
            }
        }
    }

    fn new_run(
        &self,
        (id, created_at): (String, chrono::DateTime<Utc>),
        prepared: &Prepared,
        gate: &str,
        retry: Option<Retry>,
    ) -> RunRecord {
        let mut migrations = prepared.migrations.clone();
        for m in &mut migrations {
            if let Some(mode) = self.settings.revert {
                m.revert = mode;
            }
            if self.settings.replay_lost_writes {
                m.replay = crate::manifests::ReplayMode::Auto;
            }
        }
        RunRecord {
            id,
            created_at,
            commit: prepared.commit.clone(),
            upstream_branch: self.settings.upstream.clone(),
            gate_branch: self.settings.gate.clone(),
            gate_before: gate.to_string(),
            order: prepared.order,
            migrations,
            already_applied: prepared.already_applied.clone(),
            plan_hash: prepared.plan_hash.clone(),
            findings: prepared.findings.clone(),
            facts: prepared.facts.clone(),
            approvals: prepared.verdicts.iter().filter_map(|v| v.approved.clone()).collect(),
            soak: prepared.verdicts.iter().filter_map(|v| v.soak.clone()).collect(),
            needs_drill: prepared.needs_drill(),
            phase: Phase::Pending,
            steps: Vec::new(),
            checkpoint: None,
            recovery_point: None,
            migrate_results: Vec::new(),
            verify_results: Vec::new(),
            promoted: false,
            promoted_to: None,
            failure: None,
            // Carried from a deferred attempt: the stall clock keeps running.
            retry: retry.map(|r| Retry {
                next_at: created_at,
                ..r
            }),
            restore_decision: None,
            restore: None,
            revert: None,
            gate_revert: None,
            hold_released: false,
            hold_waiting: None,
            checkpoint_pruned: false,
            remediation_errors: Vec::new(),
            report_written: false,
            acknowledged: None,
            set_aside_deleted: None,
            capture_released: None,
            lost_writes_replay: None,
        }
    }

    async fn record_status(&self, report: &PassReport) -> Result<(), StoreError> {
        let previous = self.store.load_gate(&self.settings.path).await.ok().flatten();
        let now = Utc::now();
        let upstream = self
            .git
            .branch(&self.settings.upstream)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let same = |a: &Wait, b: &Wait| {
            std::mem::discriminant(a) == std::mem::discriminant(b) && wait_subject(a) == wait_subject(b)
        };
        let since = match (
            &report.waiting,
            previous.as_ref().and_then(|p| p.waiting.as_ref().map(|w| (w, p.since))),
        ) {
            (Some(w), Some((old, since))) if same(w, old) => since,
            (Some(w), _) => {
                // Said once: the full reason when it starts, a line after that.
                tracing::warn!(gate = %short(&report.gate), "the gate waits: {w}");
                Some(now)
            }
            (None, _) => None,
        };
        if let (Some(w), Some(since)) = (&report.waiting, since) {
            if since != now {
                tracing::info!(since = %since.to_rfc3339(), "the gate still waits ({})", wait_subject(w));
            }
        }
        self.store
            .save_gate(&GateStatus {
                path: self.settings.path.clone(),
                gate_branch: self.settings.gate.clone(),
                upstream_branch: self.settings.upstream.clone(),
                gate: report.gate.clone(),
                upstream,
                waiting: report.waiting.clone(),
                since,
                updated_at: now,
            })
            .await
    }
}

/// The id of a run of `commit` made at `at` (sorts by time).
fn run_id(at: chrono::DateTime<Utc>, commit: &crate::git::CommitInfo) -> String {
    format!("{}-{}", at.format("%Y%m%d-%H%M%S%3f"), commit.short())
}

/// What identifies a wait across passes (for "said once").
/// What a wait is about, stable while it lasts (its text may change:
/// attempts, next try).
pub fn wait_subject(w: &Wait) -> String {
    match w {
        Wait::Refused { commit, message } => format!("refused {commit} {message}"),
        Wait::RunFailed { run, .. } => format!("run {run} failed"),
        Wait::Retrying { run, step, .. } => format!("retrying {} {step}", run.as_deref().unwrap_or("plan")),
        Wait::GateRevert { run, .. } => format!("gate revert of {run}"),
        Wait::Busy { database, owner } => format!("busy {database} {}", owner.state),
    }
}

/// Whether a plan error is a fault of the surroundings (retry) rather than
/// of the commit (refuse until a commit fixes it).
pub fn is_transient(e: &PlanError) -> bool {
    match e {
        PlanError::History { .. } | PlanError::Git(_) => true,
        PlanError::Preflight { source, .. } => {
            matches!(**source, CheckpointError::Db(_) | CheckpointError::Query { .. })
        }
        _ => false,
    }
}

/// Carriers live at the gate that no run ever took (adopted when the path
/// came under guard), and broken files already live: moving the gate does not
/// make them worse, so they do not block it.
fn exempt_at_gate(gate: &TreeState, runs: &[RunRecord]) -> Exempt {
    let mut exempt = Exempt::default();
    for c in &gate.carriers {
        let taken = runs
            .iter()
            .any(|r| r.migrations.iter().any(|m| m.id == c.id && m.checksum == c.checksum));
        if !taken {
            exempt
                .carriers
                .insert((gate::database_key(c), c.id.clone(), c.checksum.clone()));
        }
    }
    for b in &gate.broken {
        exempt.broken.insert((b.file.clone(), b.digest.clone()));
    }
    exempt
}

/// The most recent run that took any of `prepared`'s (migration, checksum).
fn latest_run_of<'a>(runs: &'a [RunRecord], prepared: &Prepared) -> Option<&'a RunRecord> {
    runs.iter().rev().find(|r| {
        r.migrations.iter().any(|x| {
            prepared
                .migrations
                .iter()
                .any(|m| m.id == x.id && m.checksum == x.checksum)
        })
    })
}

/// Whether the last run of these migrations keeps them from running now: a
/// failed (carrier, checksum) is not retried; a deferred one waits its backoff.
fn blocked_by(run: &RunRecord, now: chrono::DateTime<Utc>, backoff: &Backoff) -> Option<Wait> {
    match run.outcome() {
        Some(Outcome::RolledBack | Outcome::Failed) => wait_for_run(run),
        Some(Outcome::Deferred) => match &run.retry {
            Some(r) if r.due(backoff) > now => wait_for_run(run).map(|mut wait| {
                if let Wait::Retrying { next_at, .. } = &mut wait {
                    *next_at = r.due(backoff);
                }
                wait
            }),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the first steps of a pass may write `run`: it is open (resumed),
/// its revert pull request is pending, or it holds a Kustomization until
/// the recovery manifest is deployed. A pass where no run is any of these
/// reads its runs once.
pub fn changes_in_pass(run: &RunRecord) -> bool {
    run.is_open()
        || run.revert.as_ref().is_some_and(|v| v.pr_pending)
        || (!run.hold_released
            && run
                .restore
                .as_ref()
                .is_some_and(|r| r.manifest_patch.as_ref().is_some_and(|p| p.hold.is_some())))
}

/// What the gate waits for because of `run` (None: it does not).
pub fn wait_for_run(run: &RunRecord) -> Option<Wait> {
    let migrations = run.migrations.iter().map(|m| m.id.clone()).collect();
    if let Some(r) = &run.retry {
        if !run.phase.is_terminal() || run.phase == Phase::Deferred {
            return Some(Wait::Retrying {
                run: Some(run.id.clone()),
                step: r.step.clone(),
                cause: r.cause.clone(),
                attempts: r.attempts,
                since: r.since,
                next_at: r.next_at,
                stalled: r.stalled,
            });
        }
    }
    match run.outcome() {
        Some(Outcome::RolledBack | Outcome::Failed) => Some(Wait::RunFailed {
            run: run.id.clone(),
            migrations,
            revert: run.revert.as_ref().map(|v| match &v.pull_request {
                Some(url) => format!("revert pull request {url}"),
                None if v.mode == RevertMode::Commit => {
                    format!("revert commit {} (pushed to {})", short(&v.commit), v.branch)
                }
                None => format!("revert branch {} ({})", v.branch, short(&v.commit)),
            }),
            needs_person: run.awaits_person(),
            detail: run.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default(),
        }),
        _ => None,
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// Exit status of the test crash switch.
pub const TEST_CRASH_EXIT: i32 = 86;
