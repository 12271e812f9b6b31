//! The executor: performs the state machine's actions through the backend
//! traits. For every action it records the step's intent, performs it, folds
//! the result into the record with [`machine::apply`] and saves the record.

use chrono::Utc;
use tracing::Instrument;

use super::machine::{self, Action, Fault, Observation, Policy, Recovered};
use super::record::{chain, Outcome, Phase, RevertRecord, RunRecord, StoreError};
use super::{exempt_at_gate, Engine, EngineError, Progress};
use crate::checkpoint::ManifestPatch;
use crate::db::Database;
use crate::forge::PullRequest;
use crate::gate::{Exempt, GateError, Move};
use crate::git::{GitError, GitRepo};
use crate::manifests::{Order, RevertMode, RunKind};
use crate::report::{self, Report};
use crate::runner::RunIdentity;

mod recover;
mod revert;

/// How recent a fetch the gate's move reads the remote gate from.
const PROMOTE_FETCHED_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
use revert::revert_pull_request;

impl Engine {
    /// Drives `run` from its current phase until it ends or waits out a
    /// transient fault.
    pub async fn drive(&self, run: &mut RunRecord) -> Result<Progress, EngineError> {
        let span = tracing::info_span!("run", run = %run.id, commit = %run.commit.short());
        self.drive_inner(run, false).instrument(span).await
    }

    /// Drives a run never saved yet. Its record is first written with the
    /// intent of the first step that acts outside it (the checkpoint, or the
    /// lock where the cluster acts), or when the drive stops before one: a
    /// crash before that leaves no record and nothing done, and the next
    /// pass plans the commit afresh.
    pub(super) async fn drive_new(&self, run: &mut RunRecord) -> Result<Progress, EngineError> {
        let span = tracing::info_span!("run", run = %run.id, commit = %run.commit.short());
        self.drive_inner(run, true).instrument(span).await
    }

    async fn drive_inner(&self, run: &mut RunRecord, new: bool) -> Result<Progress, EngineError> {
        let mut db: Option<Database> = None;
        let policy = Policy {
            backoff: self.settings.backoff,
            timeout: run
                .migrations
                .iter()
                .map(|m| m.timeout)
                .max()
                .unwrap_or(std::time::Duration::from_secs(600)),
        };
        // What the record learns between two intents (a step's result, a
        // phase change: pure decisions from what the record holds) is
        // written with the next step's intent, or when the drive stops. A
        // crash before that write resumes from the last intent, which decides
        // the same again.
        let mut unsaved = new;
        // A wait an earlier process scheduled follows this one's backoff
        // when that is shorter (`--retry-backoff` lowered to retry now).
        if let Some(r) = run.retry.as_mut() {
            let due = r.due(&policy.backoff);
            if due != r.next_at {
                r.next_at = due;
                unsaved = true;
            }
        }
        loop {
            crash_point(run.phase);
            let now = Utc::now();
            let action = machine::next(run, now);
            if unsaved && matches!(action, Action::Done | Action::Wait(_)) {
                // Both return below.
                self.store.save(run).await?;
            }
            match action {
                Action::Done => {
                    let outcome = run.outcome().unwrap_or(Outcome::Failed);
                    // A failed remediation keeps the database claimed until a
                    // person takes it over (`backstop ack`): nobody has checked it.
                    if let (Some(carrier), false) = (run.migrations.first(), run.awaits_person()) {
                        self.release(carrier).await;
                    }
                    match outcome {
                        Outcome::Succeeded => tracing::info!("run succeeded"),
                        Outcome::RolledBack => {
                            tracing::warn!(reason = %run.failure.as_ref().map(|f| f.message.as_str()).unwrap_or("unknown"), "run failed and was rolled back")
                        }
                        Outcome::Deferred => {
                            tracing::warn!(reason = %run.failure.as_ref().map(|f| f.message.as_str()).unwrap_or("unknown"), "run stopped on a transient fault before anything changed; it is tried again later, nothing was reverted")
                        }
                        Outcome::Failed => {
                            tracing::error!(errors = %run.remediation_errors.join("; "), "run failed and remediation did not complete: a person must act")
                        }
                    }
                    return Ok(Progress::Ended(outcome));
                }
                Action::Wait(at) => {
                    let r = run.retry.as_ref();
                    tracing::warn!(
                        phase = %run.phase,
                        step = r.map(|r| r.step.as_str()).unwrap_or(""),
                        cause = r.map(|r| r.cause.as_str()).unwrap_or(""),
                        stalled = r.is_some_and(|r| r.stalled),
                        next = %at.to_rfc3339(),
                        "waiting out a transient fault; nothing is reverted"
                    );
                    return Ok(Progress::Waiting);
                }
                Action::Advance(phase) => {
                    tracing::info!(from = %run.phase, to = %phase, "phase");
                    machine::advance(run, phase);
                    unsaved = true;
                }
                action => {
                    let name = action.step(run).unwrap_or_default();
                    machine::begin(run, &name, now);
                    let observed = match (&action, self.acts_outside(&action, run)) {
                        (Action::Promote, true) => {
                            // The gate move's check only reads: it goes on
                            // while the intent is written, and the gate
                            // moves once the intent is on disk.
                            let (saved, check) = tokio::join!(self.store.save(run), self.promote_check(run));
                            saved?;
                            Observation::Promoted(self.promote_move(check).await)
                        }
                        (_, outside) => {
                            if outside {
                                // The intent is on disk before the step acts.
                                self.store.save(run).await?;
                            }
                            self.perform(&action, run, &mut db).await
                        }
                    };
                    let before = run.retry.clone();
                    machine::apply(run, &name, observed, Utc::now(), policy);
                    // The result goes out with the next step's intent (or
                    // when the drive stops): a crash before that write finds
                    // this step open, as a crash while it acted would, and
                    // the machine takes that case already (a migration asks
                    // the history, a checkpoint is taken again, a gate move
                    // is checked again).
                    unsaved = true;
                    if machine::retrying_in_place(run, &name, before.as_ref()) {
                        self.store.save(run).await?;
                        // The step is tried again on a later pass, never in a loop here.
                        let r = run.retry.as_ref();
                        tracing::warn!(
                            step = %name,
                            cause = r.map(|r| r.cause.as_str()).unwrap_or(""),
                            stalled = r.is_some_and(|r| r.stalled),
                            "transient fault; the step is retried on a later pass, nothing is reverted"
                        );
                        return Ok(Progress::Waiting);
                    }
                }
            }
        }
    }

    /// Whether `action` changes anything outside the record ([`Action::acts_outside`]).
    /// A recovery point only reads the server's clock and WAL position,
    /// unless it starts keeping the writes a restore would discard (a
    /// logical slot, where the backend restores to exactly that point): then
    /// its intent goes first, so that a crash finds the slot to drop.
    fn acts_outside(&self, action: &Action, run: &RunRecord) -> bool {
        match action {
            Action::RecoveryPoint => run
                .checkpoint
                .as_ref()
                .is_some_and(|c| crate::capture::backend_restores_to_the_lsn(&c.backend)),
            action => action.acts_outside(self.cluster.acts()),
        }
    }

    async fn database(&self, run: &RunRecord, cache: &mut Option<Database>) -> Result<Database, Fault> {
        if let Some(db) = cache {
            return Ok(db.clone());
        }
        let first = run
            .migrations
            .first()
            .ok_or_else(|| Fault::refused("the run has no migrations"))?;
        let db = self
            .cluster
            .resolve(&first.database, first.database_name.as_deref())
            .await
            .map_err(|e| Fault::transient(chain(&e)))?;
        *cache = Some(db.clone());
        Ok(db)
    }

    /// Performs one action; every outcome is an observation.
    async fn perform(&self, action: &Action, run: &RunRecord, cache: &mut Option<Database>) -> Observation {
        use Observation as O;
        let transient = |e: &dyn std::error::Error| Fault::transient(chain(e));
        match action {
            Action::Lock => O::Locked(self.cluster.lock(&run.id).await.map_err(|e| transient(&e))),
            Action::Plan => O::Planned(format!(
                "plan {}: {} migration(s) {}",
                run.plan_hash,
                run.migrations.len(),
                run.migrations
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Action::Checkpoint => O::Checkpointed(self.take_checkpoint(run, cache).await),
            Action::Drill => O::Drilled(self.drill(run, cache).await),
            Action::RecoveryPoint => O::RecoveryPoint(match self.database(run, cache).await {
                Ok(db) => {
                    // The slot first: it then sees everything committed after
                    // the point. Only where a restore goes to exactly that LSN.
                    let capture = match &run.checkpoint {
                        Some(c) if crate::capture::backend_restores_to_the_lsn(&c.backend) => {
                            Some(crate::capture::start(&db, &run.id).await)
                        }
                        // The report says why under the recovery point (and a
                        // restore's, that they were not kept): no slot is made.
                        Some(c) => Some(crate::capture::Capture::Unavailable {
                            why: crate::capture::why_not_captured(&c.backend),
                            maybe_created: false,
                        }),
                        None => None,
                    };
                    let to_drop = capture.as_ref().and_then(|c| c.slot_to_drop(&run.id));
                    let point = match capture {
                        Some(crate::capture::Capture::Slot {
                            name,
                            start_lsn,
                            xid_horizon: _,
                        }) => crate::capture::recovery_point(&db)
                            .await
                            .map(|(p, xid)| crate::checkpoint::RecoveryPoint {
                                capture: Some(crate::capture::Capture::Slot {
                                    name,
                                    start_lsn,
                                    xid_horizon: Some(xid),
                                }),
                                ..p
                            })
                            .map_err(|e| transient(&e)),
                        capture => self
                            .runner
                            .recovery_point(&db)
                            .await
                            .map(|p| crate::checkpoint::RecoveryPoint { capture, ..p })
                            .map_err(|e| transient(&e)),
                    };
                    if let (Err(_), Some(slot)) = (&point, to_drop) {
                        // Not recorded, so never released later: let it go now.
                        let _ = crate::capture::release(&db, &slot).await;
                    }
                    point
                }
                Err(f) => Err(f),
            }),
            Action::Migrate(i) => O::Migrated(*i, self.migrate(run, *i, false, cache).await),
            // A Job migration resumed after backstop stopped: recorded in
            // the history by this run (or the same version), it ran;
            // otherwise its Job (not a new one) is watched again: there is
            // no transaction whose absence from the history says it never
            // ran. A fault before that keeps the step open, to resume again.
            Action::Recover(i) if run.migrations[*i].run == RunKind::Job => {
                let m = &run.migrations[*i];
                let applied = match self.database(run, cache).await {
                    Ok(db) => self.runner.applied(&db, &m.id).await.map_err(|e| transient(&e)),
                    Err(f) => Err(f),
                };
                match applied {
                    Ok(Some(row)) if ran_before(&row, run, m) => O::Recovered(*i, Ok(Recovered::Applied)),
                    Ok(_) => match self.migrate(run, *i, true, cache).await {
                        Ok(outcome) => O::Migrated(*i, Ok(outcome)),
                        Err(f) => O::Recovered(*i, Err(f)),
                    },
                    Err(f) => O::Recovered(*i, Err(f)),
                }
            }
            Action::Recover(i) => {
                let m = &run.migrations[*i];
                let result = match self.database(run, cache).await {
                    // First end what the killed attempt left running: until its
                    // session is gone, its COMMIT may still land.
                    Ok(db) => match self.runner.settle(&db, &run.id).await {
                        Err(e) => Err(transient(&e)),
                        Ok(ended) => {
                            if ended > 0 {
                                tracing::warn!(sessions = ended, migration = %m.id, "ended the sessions an interrupted attempt left running");
                            }
                            match self.runner.applied(&db, &m.id).await {
                                Ok(Some(row)) if ran_before(&row, run, m) => Ok(Recovered::Applied),
                                Ok(_) => Ok(Recovered::NotApplied),
                                Err(e) => Err(transient(&e)),
                            }
                        }
                    },
                    Err(f) => Err(f),
                };
                O::Recovered(*i, result)
            }
            Action::Verify(i) => {
                let m = &run.migrations[*i];
                let query = m.verify.clone().unwrap_or_default();
                O::Verified(
                    *i,
                    match self.database(run, cache).await {
                        Ok(db) => self
                            .runner
                            .verify(&db, &query, m.timeout)
                            .await
                            .map_err(|e| transient(&e)),
                        Err(f) => Err(f),
                    },
                )
            }
            Action::Promote => O::Promoted(self.promote(run).await),
            Action::Health => {
                let at = run.promoted_to.clone().unwrap_or_else(|| run.commit.sha.clone());
                O::Healthy(
                    self.cluster
                        .promote(&run.id, &at)
                        .await
                        .map_err(|e| Fault::failed(chain(&e))),
                )
            }
            Action::Restore => O::Restored(self.restore(run, cache).await),
            Action::ReplayLostWrites => O::ReplayedLostWrites(self.replay_lost_writes(run, cache).await),
            Action::RevertGate => O::GateReverted(self.revert_gate(run).await),
            Action::Revert => O::Reverted(self.revert(run).await),
            Action::PullRequest => {
                let Some(revert) = &run.revert else {
                    return O::PullRequest(Ok(None));
                };
                let pr = revert_pull_request(run, &revert.branch, &self.settings.upstream);
                O::PullRequest(self.forge.open_pull_request(&pr).await.map_err(|e| transient(&e)))
            }
            Action::Unlock => {
                let held = run
                    .restore
                    .as_ref()
                    .and_then(|r| r.manifest_patch.as_ref())
                    .and_then(|p| p.hold.as_deref())
                    .filter(|_| !run.hold_released);
                O::Unlocked(self.cluster.unlock(&run.id, held).await.map_err(|e| transient(&e)))
            }
            Action::ReleaseCapture => {
                let slot = run.capture_slot().unwrap_or_default();
                O::CaptureReleased(match self.database(run, cache).await {
                    Ok(db) => crate::capture::release(&db, &slot).await,
                    Err(f) => crate::capture::SlotRelease::Failed { why: f.message },
                })
            }
            Action::Report => {
                let report = Report::from_run(run);
                O::Reported(self.store.write_report(run, &report).await.map_err(|e| {
                    tracing::error!(error = %chain(&e), "could not write the evidence report");
                    chain(&e)
                }))
            }
            Action::Advance(_) | Action::Wait(_) | Action::Done => O::Planned(String::new()),
        }
    }

    async fn take_checkpoint(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> Result<Option<crate::checkpoint::CheckpointRecord>, Fault> {
        let kind = run
            .migrations
            .first()
            .map(|m| m.checkpoint)
            .unwrap_or(crate::manifests::CheckpointKind::None);
        let backend = match self.checkpoint_for(kind) {
            Err(e) => return Err(Fault::refused(e)),
            Ok(None) if run.needs_drill => {
                return Err(Fault::refused(
                    "an approved run needs a checkpoint with a restore drill",
                ))
            }
            Ok(None) => return Ok(None),
            Ok(Some(b)) => b,
        };
        let db = self.database(run, cache).await?;
        // The migration's own session logs in while the checkpoint is taken
        // (the bookkeeping keeps the pass's): neither waits for a login after.
        drop(db.prewarm_session(2, crate::runner::MIGRATION_AHEAD));
        backend
            .create(&db, &run.id)
            .await
            .map(Some)
            .map_err(|e| Fault::transient(format!("checkpoint failed: {}", chain(&e))))
    }

    async fn drill(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> Result<crate::checkpoint::DrillOutcome, Fault> {
        let Some(record) = &run.checkpoint else {
            return Err(Fault::refused("no checkpoint to drill"));
        };
        let backend = self.backend_named(&record.backend)?;
        let db = self.database(run, cache).await?;
        backend
            .drill(&db, record)
            .await
            .map_err(|e| Fault::transient(format!("restore drill failed: {}", chain(&e))))
    }

    /// Runs migration `i` of the run (`resumed`: an attempt began before).
    async fn migrate(
        &self,
        run: &RunRecord,
        i: usize,
        resumed: bool,
        cache: &mut Option<Database>,
    ) -> Result<crate::runner::MigrateOutcome, Fault> {
        let m = &run.migrations[i];
        let db = self.database(run, cache).await?;
        let who = RunIdentity {
            run_id: &run.id,
            commit: &run.commit.sha,
            resumed,
        };
        let span = tracing::info_span!("migration", migration = %m.id);
        self.runner
            .migrate(&db, m, who)
            .instrument(span)
            .await
            .map_err(|e| Fault::transient(chain(&e)))
    }

    fn backend_named(&self, name: &str) -> Result<std::sync::Arc<dyn crate::checkpoint::Checkpoint>, Fault> {
        self.checkpoints
            .values()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or_else(|| Fault::failed(format!("no {name} backend configured to restore from")))
    }

    /// Carriers that do not block the gate, plus `extra`.
    async fn exempt(&self, extra: Option<&RunRecord>) -> Result<Exempt, Fault> {
        let gate = self
            .git
            .require_branch(&self.settings.gate)
            .await
            .map_err(|e| Fault::transient(chain(&e)))?;
        let tree = self.gate().tree(&gate).await.map_err(|e| Fault::transient(chain(&e)))?;
        let runs = self.store.list().await.map_err(|e| Fault::transient(chain(&e)))?;
        let mut exempt = exempt_at_gate(&tree, &runs);
        if let Some(run) = extra {
            for m in &run.migrations {
                exempt
                    .carriers
                    .insert((crate::gate::database_key(m), m.id.clone(), m.checksum.clone()));
            }
        }
        Ok(exempt)
    }

    /// Moves the gate to the run's commit through the invariant check. A
    /// before-apply run whose commit still holds a never-run carrier version
    /// (rewritten by a later commit) leaves the gate where it is: the gate
    /// carries the commit with the run that makes its tree whole.
    async fn promote(&self, run: &RunRecord) -> Result<(String, String), Fault> {
        let check = self.promote_check(run).await;
        self.promote_move(check).await
    }

    /// The reads of [`promote`](Self::promote): where the gate is, and the
    /// invariant check of the run's commit. Nothing moves.
    async fn promote_check(&self, run: &RunRecord) -> Result<PromoteCheck, Fault> {
        let gate_name = &self.settings.gate;
        let transient = |e: &GitError| Fault::transient(format!("moving the gate failed: {}", chain(e)));
        // The pass fetched moments ago (and the mirror follows backstop's
        // own pushes): fetch again only after a long migration. A gate moved
        // meanwhile by someone else makes the push below fail (it moves the
        // remote only from the gate the mirror last saw), a transient fault
        // the next pass, which fetches, resolves.
        self.git
            .fetch_unless_within(PROMOTE_FETCHED_WITHIN)
            .await
            .map_err(|e| transient(&e))?;
        let current = self.git.require_branch(gate_name).await.map_err(|e| transient(&e))?;
        let commit = &run.commit.sha;
        if self
            .git
            .is_ancestor(commit, &current)
            .await
            .map_err(|e| transient(&e))?
        {
            return Ok(PromoteCheck::Settled((
                current.clone(),
                format!("gate {gate_name} already at or past {commit}"),
            )));
        }
        let after_apply = run.order == Order::AfterApply;
        let exempt = self.exempt(after_apply.then_some(run)).await?;
        match self.gate().check(commit, &exempt).await {
            Ok(proof) => Ok(PromoteCheck::Move(proof)),
            Err(GateError::Invariant { violations, .. }) if !after_apply => {
                let why: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
                Ok(PromoteCheck::Settled((
                    current.clone(),
                    format!(
                        "gate {gate_name} stays at {}: commit {} also holds {}; it moves once those have run",
                        super::short(&current),
                        run.commit.short(),
                        why.join("; ")
                    ),
                )))
            }
            Err(e @ GateError::Invariant { .. }) => Err(Fault::refused(chain(&e))),
            Err(GateError::Git(e)) => Err(transient(&e)),
        }
    }

    /// The move of [`promote`](Self::promote), once its check passed.
    async fn promote_move(&self, check: Result<PromoteCheck, Fault>) -> Result<(String, String), Fault> {
        let gate_name = &self.settings.gate;
        match check? {
            PromoteCheck::Settled(done) => Ok(done),
            PromoteCheck::Move(proof) => match self.gate().push(&proof, Move::FastForward).await {
                Ok(sha) => Ok((sha, format!("gate {gate_name} fast-forwarded to {}", proof.sha()))),
                Err(e) => Err(Fault::transient(format!("moving the gate failed: {}", chain(&e)))),
            },
        }
    }
}

/// What the check before a gate move found.
enum PromoteCheck {
    /// The gate stays (already at or past the commit, or the commit waits
    /// for a later run): where it is, and why.
    Settled((String, String)),
    /// The commit passed the invariant check: the gate moves there.
    Move(crate::gate::Checked),
}

/// Whether the history row says migration `m` ran before this attempt
/// resumed: recorded by this run, or the same version by any.
fn ran_before(row: &crate::runner::HistoryRow, run: &RunRecord, m: &crate::manifests::Carrier) -> bool {
    row.run_id == run.id || row.checksum == m.checksum
}

/// Where the run's report is.
pub fn report_location(run: &RunRecord) -> String {
    run.steps
        .iter()
        .rev()
        .find(|s| s.name == "report")
        .map(|s| s.detail.clone())
        .unwrap_or_default()
}

/// Resumes what a restore held (the Kustomization owning a recreated cluster)
/// once the gate carries the manifest change.
pub(super) async fn release_holds(engine: &Engine, runs: &[RunRecord], gate: &str) -> Result<(), StoreError> {
    for run in runs.iter().filter(|r| !r.hold_released && r.phase.is_terminal()) {
        let Some(patch) = run.restore.as_ref().and_then(|r| r.manifest_patch.clone()) else {
            continue;
        };
        let Some(hold) = patch.hold.clone() else { continue };
        // What deploys the held object: its source's fetched revision (Flux's
        // GitRepository artifact), else the gate.
        let carried = match engine.cluster.source_revision(&hold).await {
            Ok(Some(at)) => match engine.git.snapshot(&at, "").await {
                Ok(snapshot) => Ok((at, snapshot)),
                Err(e) => Err(format!(
                    "the source of {hold} is at {at}, which cannot be read yet: {}",
                    chain(&e)
                )),
            },
            Ok(None) => match engine.git.snapshot(gate, "").await {
                Ok(snapshot) => Ok((gate.to_string(), snapshot)),
                Err(e) => Err(chain(&e)),
            },
            Err(e) => Err(chain(&e)),
        };
        let waiting = match &carried {
            Ok((at, snapshot)) => {
                let applied = crate::manifests::patch_manifest(
                    snapshot,
                    &patch.kind,
                    &patch.namespace,
                    &patch.name,
                    &patch.merge,
                )
                .is_some_and(|f| f.already);
                (!applied).then(|| {
                    format!(
                        "{hold} stays suspended until what it deploys carries the {} {}/{} recovery manifest (it deploys {})",
                        patch.kind,
                        patch.namespace,
                        patch.name,
                        &at[..at.len().min(12)]
                    )
                })
            }
            Err(e) => Some(format!("{hold} stays suspended: {e}")),
        };
        let mut run = run.clone();
        if let Some(why) = waiting {
            tracing::info!(run = %run.id, held = %hold, "{why}");
            if run.hold_waiting.as_deref() != Some(why.as_str()) {
                run.hold_waiting = Some(why);
                engine.store.save(&run).await?;
            }
            continue;
        }
        let step = format!("release {hold}");
        machine::begin(&mut run, &step, Utc::now());
        engine.store.save(&run).await?;
        match engine.cluster.release(&hold, &run.id).await {
            Ok(detail) => {
                machine::close(&mut run, &step, true, detail, Utc::now());
                run.hold_released = true;
                run.hold_waiting = None;
            }
            Err(e) => machine::close(&mut run, &step, false, chain(&e), Utc::now()),
        }
        engine.store.save(&run).await?;
    }
    Ok(())
}

/// Test hook (debug builds only): `BACKSTOP_TEST_CRASH_AT=<Phase>` ends the
/// process abruptly (exit 86, no cleanup) when the drive is about to act in
/// that phase (the journal may still hold the step before: a phase change
/// and a step's result are written with the next step's intent).
fn crash_point(phase: Phase) {
    #[cfg(debug_assertions)]
    if std::env::var("BACKSTOP_TEST_CRASH_AT").ok().as_deref() == Some(phase.as_str()) {
        eprintln!("backstop: test crash at phase {phase}");
        std::process::exit(super::TEST_CRASH_EXIT);
    }
    #[cfg(not(debug_assertions))]
    let _ = phase;
}
