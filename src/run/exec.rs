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
use crate::manifests::{Order, RevertMode};
use crate::report::{self, Report};
use crate::runner::RunIdentity;

impl Engine {
    /// Drives `run` from its current phase until it ends or waits out a
    /// transient fault.
    pub async fn drive(&self, run: &mut RunRecord) -> Result<Progress, EngineError> {
        let span = tracing::info_span!("run", run = %run.id, commit = %run.commit.short());
        self.drive_inner(run).instrument(span).await
    }

    async fn drive_inner(&self, run: &mut RunRecord) -> Result<Progress, EngineError> {
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
        let mut unsaved = false;
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
                    if action.acts_outside(self.cluster.acts()) {
                        // The intent is on disk before the step acts.
                        self.store.save(run).await?;
                    }
                    let observed = self.perform(&action, run, &mut db).await;
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
            Action::Migrate(i) => {
                let m = &run.migrations[*i];
                let result = match self.database(run, cache).await {
                    Ok(db) => {
                        let who = RunIdentity {
                            run_id: &run.id,
                            commit: &run.commit.sha,
                        };
                        let span = tracing::info_span!("migration", migration = %m.id);
                        self.runner
                            .migrate(&db, m, who)
                            .instrument(span)
                            .await
                            .map_err(|e| transient(&e))
                    }
                    Err(f) => Err(f),
                };
                O::Migrated(*i, result)
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
                                Ok(Some(row)) if row.run_id == run.id || row.checksum == m.checksum => {
                                    Ok(Recovered::Applied)
                                }
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
        let gate_name = &self.settings.gate;
        let transient = |e: &GitError| Fault::transient(format!("moving the gate failed: {}", chain(e)));
        self.git.fetch().await.map_err(|e| transient(&e))?;
        let current = self.git.require_branch(gate_name).await.map_err(|e| transient(&e))?;
        let commit = &run.commit.sha;
        if self
            .git
            .is_ancestor(commit, &current)
            .await
            .map_err(|e| transient(&e))?
        {
            return Ok((current.clone(), format!("gate {gate_name} already at or past {commit}")));
        }
        let after_apply = run.order == Order::AfterApply;
        let exempt = self.exempt(after_apply.then_some(run)).await?;
        match self.gate().move_to(commit, Move::FastForward, &exempt).await {
            Ok(sha) => Ok((sha, format!("gate {gate_name} fast-forwarded to {commit}"))),
            Err(GateError::Invariant { violations, .. }) if !after_apply => {
                let why: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
                Ok((
                    current.clone(),
                    format!(
                        "gate {gate_name} stays at {}: commit {} also holds {}; it moves once those have run",
                        super::short(&current),
                        run.commit.short(),
                        why.join("; ")
                    ),
                ))
            }
            Err(e @ GateError::Invariant { .. }) => Err(Fault::refused(chain(&e))),
            Err(GateError::Git(e)) => Err(transient(&e)),
        }
    }

    async fn restore(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> Result<crate::checkpoint::RestoreRecord, Fault> {
        let Some(checkpoint) = run.checkpoint.clone() else {
            return Err(Fault::failed("the run has no checkpoint"));
        };
        let point = run.recovery_point.clone().unwrap_or(crate::checkpoint::RecoveryPoint {
            time: checkpoint.completed_at,
            lsn: String::new(),
            capture: None,
        });
        let backend = self.backend_named(&checkpoint.backend)?;
        let db = self.database(run, cache).await.map_err(|f| Fault::failed(f.message))?;
        let (mut lost, sequences) = match self.keep_lost_writes(run, &db, &point).await {
            Some((captured, sequences)) => (Some(captured), sequences),
            None => (None, Vec::new()),
        };
        let quiesced = matches!(point.capture, Some(crate::capture::Capture::Slot { .. }));
        let restored = backend.restore(&db, &checkpoint, &point, &run.id).await;
        // The restored database is resolved again: a CNPG restore recreates
        // the Cluster, whose app secret and CA may be new.
        let db = match &restored {
            Ok(_) => {
                *cache = None;
                self.database(run, cache).await.unwrap_or(db)
            }
            Err(_) => db,
        };
        if let (Ok(_), Some(crate::capture::Captured::Kept(summary))) = (&restored, lost.as_mut()) {
            // At once, before the database is opened again: the application
            // hands out ids from here on. (A restore that brings the database
            // back open leaves the milliseconds since its promotion: an
            // insert then may take a lost row's id, and replay stops at it.)
            match crate::capture::advance_sequences(&db, &sequences).await {
                Ok(done) => {
                    summary.sequences_advanced = Some(done.moved);
                    summary.sequences_not_moved = done.failed;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %chain(&e),
                        "could not move the sequences past the ids the lost writes used; `backstop replay` tries again"
                    );
                    summary.sequences_not_moved = vec![("(all)".into(), chain(&e))];
                }
            }
        }
        // Whatever happened, the application is let back in (a no-op where
        // the restore already took the database back to before the close).
        let reopened = if quiesced {
            crate::capture::reopen(&db).await.err().map(|e| {
                format!(
                    "; the database still refuses connections ({}): run ALTER DATABASE {} ALLOW_CONNECTIONS true",
                    chain(&e),
                    db.dbname()
                )
            })
        } else {
            None
        };
        let mut record = match restored {
            Ok(r) => r,
            Err(e) => return Err(Fault::failed(format!("{}{}", chain(&e), reopened.unwrap_or_default()))),
        };
        if let Some(warning) = reopened {
            tracing::error!("{}", warning.trim_start_matches("; "));
        }
        record.lost_writes = lost;
        Ok(record)
    }

    /// Reads what the restore will discard from the run's slot, writes it to
    /// the run folder, and drops the slot ([`crate::capture`]).
    async fn keep_lost_writes(
        &self,
        run: &RunRecord,
        db: &Database,
        point: &crate::checkpoint::RecoveryPoint,
    ) -> Option<(crate::capture::Captured, Vec<crate::capture::sequences::SequenceValue>)> {
        use crate::capture::{self, Capture, Captured};
        let not_kept = |why: String| Some((Captured::NotKept { why }, Vec::new()));
        let (name, horizon) = match point.capture.as_ref()? {
            Capture::Slot { name, xid_horizon, .. } => (name.clone(), *xid_horizon),
            Capture::Unavailable { why, .. } => return not_kept(why.clone()),
        };
        if !self.store.keeps_files() {
            // Read, they would be kept nowhere: do not close the database for that.
            return not_kept(
                "this run store keeps no files (a controller without --durable-state: its --state volume goes with the pod): the writes are not kept".into(),
            );
        }
        let own: std::collections::HashSet<u32> = run
            .migrate_results
            .iter()
            .flat_map(|(_, o)| o.own_xids.iter().copied())
            .collect();
        let kept = async {
            // `read` closes the database first: nothing may commit between
            // the read and the restore.
            let store = |e: crate::run::StoreError| chain(&e);
            let (mut file, own_left_out) = match capture::read(db, &run.id, &name, &point.lsn, horizon, &own).await {
                Ok(read) => read,
                // Resumed after the restore began (the slot gone with the old
                // state, or the restored server not answering yet): an
                // earlier attempt kept them. Not for other errors: the slot
                // may hold writes committed after that attempt.
                Err(e @ (capture::CaptureError::NoSlot { .. } | capture::CaptureError::Connect { .. })) => {
                    let Some(bytes) = self.store.read_file(run, capture::LOST_SUMMARY).await.map_err(store)? else {
                        return Err(chain(&e));
                    };
                    let summary = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                    let sequences = self.lost_file(run).await?.map(|f| f.sequences).unwrap_or_default();
                    return Ok((summary, sequences));
                }
                Err(e) => return Err(chain(&e)),
            };
            file.migrated = Some(capture::replay::migrated_tables(&run.migrations).map(|t| t.into_iter().collect()));
            let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
            self.store
                .write_file(run, capture::LOST_FILE, &json)
                .await
                .map_err(store)?;
            let path = self
                .store
                .write_file(run, capture::LOST_SQL, file.sql().as_bytes())
                .await
                .map_err(store)?;
            let summary = file.summary(own_left_out, path);
            let bytes = serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?;
            self.store
                .write_file(run, capture::LOST_SUMMARY, &bytes)
                .await
                .map_err(store)?;
            Ok::<_, String>((summary, file.sequences))
        }
        .await;
        // The slot stays until the run's release step: a restore to the
        // recovery point takes it away, and a restore that fails leaves it.
        match kept {
            Ok((summary, sequences)) => {
                tracing::info!(
                    transactions = summary.transactions,
                    "kept the writes the restore discards"
                );
                Some((Captured::Kept(summary), sequences))
            }
            Err(why) => {
                tracing::warn!(error = %why, "could not read the writes the restore discards");
                not_kept(why)
            }
        }
    }

    /// The run's kept `lost-writes.json`, if any; why it cannot be read.
    async fn lost_file(&self, run: &RunRecord) -> Result<Option<crate::capture::LostFile>, String> {
        use crate::capture::LOST_FILE;
        match self.store.read_file(run, LOST_FILE).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{LOST_FILE}: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(chain(&e)),
        }
    }

    /// The run's own replay of the writes its restore kept
    /// ([`crate::capture::replay`]): all tables but the migrated ones,
    /// stopping at the first conflict.
    async fn replay_lost_writes(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> crate::capture::replay::AutoReplay {
        use crate::capture::replay::{self, AutoReplay};
        let not = |why: String| {
            tracing::warn!(error = %why, "the lost writes were not replayed; `backstop replay` can");
            AutoReplay::NotReplayed { why }
        };
        let file = match self.lost_file(run).await {
            Ok(Some(file)) => file,
            Ok(None) => return not(format!("{} is missing", crate::capture::LOST_FILE)),
            Err(why) => return not(why),
        };
        let db = match self.database(run, cache).await {
            Ok(db) => db,
            Err(f) => return not(f.message),
        };
        let migrated = match replay::migrated_tables(&run.migrations) {
            Ok(tables) => tables,
            Err(why) => {
                return not(format!(
                    "{why}; `backstop replay --tables` replays the tables a person names"
                ))
            }
        };
        let how = replay::Options {
            bounded: true,
            ..Default::default()
        };
        match replay::replay(&db, &file, &migrated, &how).await {
            Ok(done) => {
                tracing::info!(
                    applied = done.applied.len(),
                    left = done.left.len(),
                    stopped = done.stopped.is_some(),
                    "replayed the lost writes"
                );
                AutoReplay::Replayed(done)
            }
            Err(e) => not(chain(&e)),
        }
    }

    /// Reverts the promoted commit on the gate itself (the bad code is live),
    /// through the invariant check.
    async fn revert_gate(&self, run: &RunRecord) -> Result<String, Fault> {
        let trailer = format!("Backstop-Run: {}", run.id);
        let gate = &self.settings.gate;
        let body = format!("backstop run {} rolls back the promoted commit on the gate.", run.id);
        let git_fault = |e: GitError| match e {
            GitError::RevertConflict { .. } => Fault::failed(chain(&e)),
            e => Fault::transient(chain(&e)),
        };
        self.git.fetch().await.map_err(git_fault)?;
        if let Some(sha) = self.git.find_on_branch(gate, &trailer, 200).await.map_err(git_fault)? {
            return Ok(sha);
        }
        let head = self.git.require_branch(gate).await.map_err(git_fault)?;
        let sha = self
            .git
            .revert_with(&run.commit.sha, &head, &body, &trailer, Vec::new())
            .await
            .map_err(git_fault)?;
        let exempt = self.exempt(None).await?;
        match self.gate().move_to(&sha, Move::FastForward, &exempt).await {
            Ok(sha) => Ok(sha),
            Err(e @ GateError::Invariant { .. }) => Err(Fault::failed(chain(&e))),
            Err(GateError::Git(e)) => Err(git_fault(e)),
        }
    }

    /// Pushes the revert to upstream (commit mode) or to a revert branch.
    async fn revert(&self, run: &RunRecord) -> Result<RevertRecord, Fault> {
        let mode = machine::revert_mode(run);
        let trailer = format!("Backstop-Run: {}", run.id);
        let failure = run.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
        let ids: Vec<&str> = run.migrations.iter().map(|m| m.id.as_str()).collect();
        let body = format!(
            "backstop run {} failed on migration(s) {}: {failure}",
            run.id,
            ids.join(", ")
        );
        let commit = &run.commit.sha;
        let upstream = &self.settings.upstream;
        // A recreated database cluster: its manifest change rides with the revert.
        let patch = run.restore.as_ref().and_then(|r| r.manifest_patch.clone());
        let git_fault = |e: GitError| match e {
            GitError::RevertConflict { .. } => Fault::failed(chain(&e)),
            e => Fault::transient(chain(&e)),
        };
        let (sha, branch, note) = match mode {
            RevertMode::Commit => {
                // Fast-forward only: when upstream moved, redo on the new head.
                let mut pushed = None;
                for _ in 0..5 {
                    match push_revert(&self.git, commit, upstream, upstream, &body, &trailer, patch.as_ref()).await {
                        Ok((sha, found)) => {
                            pushed = Some((sha, upstream.clone(), note(found, "pushed to upstream")));
                            break;
                        }
                        Err(GitError::Rejected { .. }) => continue,
                        Err(e) => return Err(git_fault(e)),
                    }
                }
                pushed.ok_or_else(|| Fault::transient("upstream kept moving; gave up after 5 attempts"))?
            }
            RevertMode::PullRequest => {
                let branch = format!("backstop/revert-{}", &commit[..7.min(commit.len())]);
                let (sha, found) = push_revert(&self.git, commit, upstream, &branch, &body, &trailer, patch.as_ref())
                    .await
                    .map_err(git_fault)?;
                (sha, branch, note(found, "pushed revert branch"))
            }
        };
        Ok(RevertRecord {
            mode,
            commit: sha,
            branch,
            pull_request: None,
            note,
            pr_pending: false,
        })
    }

    /// Opens the pull requests that a forge outage left pending.
    pub(super) async fn open_pending_pull_requests(&self, runs: &[RunRecord]) -> Result<(), StoreError> {
        for run in runs.iter().filter(|r| r.revert.as_ref().is_some_and(|v| v.pr_pending)) {
            let mut run = run.clone();
            let Some(revert) = run.revert.clone() else { continue };
            let pr = revert_pull_request(&run, &revert.branch, &self.settings.upstream);
            machine::begin(&mut run, "pull-request", Utc::now());
            self.store.save(&run).await?;
            match self.forge.open_pull_request(&pr).await {
                Ok(url) => {
                    machine::close(
                        &mut run,
                        "pull-request",
                        true,
                        url.clone().unwrap_or_default(),
                        Utc::now(),
                    );
                    if let Some(v) = run.revert.as_mut() {
                        v.pr_pending = false;
                        v.pull_request = url.clone();
                        v.note = format!("{}; pull request opened by a later pass", v.note);
                    }
                    tracing::info!(run = %run.id, url = %url.as_deref().unwrap_or("(the forge gave none)"), "opened the pending revert pull request");
                    let report = Report::from_run(&run);
                    if let Err(e) = self.store.write_report(&run, &report).await {
                        tracing::error!(error = %e, "could not rewrite the evidence report");
                    }
                }
                Err(e) => {
                    machine::close(&mut run, "pull-request", false, chain(&e), Utc::now());
                    tracing::warn!(run = %run.id, error = %e, "revert pull request still pending");
                }
            }
            self.store.save(&run).await?;
        }
        Ok(())
    }
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

/// Reverts `commit` on top of `base`'s head and pushes it to `target` (no
/// force; never the gate), with the manifest change a restore asks for. A
/// revert that `target` already carries (same `Backstop-Run:` trailer) is
/// reused: `(sha, true)`.
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
