//! The run state machine as two pure functions over a [`RunRecord`]:
//! [`next`] says what to do now (an [`Action`]), [`apply`] folds what
//! happened (an [`Observation`]) into the record: step results, phase
//! changes and the failure taxonomy. No I/O, no backend, no clock of its own:
//! the executor ([`super::Engine`]) performs the actions through the backend
//! traits, writes the step's intent before and the record after.
//!
//! Failure taxonomy ([`FailureKind`]):
//! - a transient fault before the database changed ends the run `Deferred`
//!   (unlock, no restore, no revert); a later run tries again after a backoff;
//! - a transient fault after it changed (verify could not connect, the gate
//!   push failed, a revert push failed) keeps the run in its phase and retries
//!   the step after a backoff; past the migration's timeout the retry is
//!   marked stalled (visible in `status`), never reverted;
//! - a failure of the migration, its verify or the health gate remediates:
//!   restore when data changed, then revert.

use chrono::{DateTime, Utc};

use super::record::{Failure, FailureKind, Phase, Retry, RunRecord, Step, StepDetail};
use crate::checkpoint::{DrillOutcome, DrillVerdict};
use crate::manifests::{Order, RevertMode};
use crate::runner::MigrateOutcome;

fn step_done(run: &RunRecord, name: &str) -> bool {
    run.steps.iter().any(|s| s.name == name && s.finished_at.is_some())
}

fn checkpoint_done(run: &RunRecord) -> bool {
    run.step_ok("checkpoint")
}

fn drill_pending(run: &RunRecord) -> bool {
    run.needs_drill
        && run
            .checkpoint
            .as_ref()
            .is_some_and(|c| !matches!(c.drill, DrillVerdict::Passed | DrillVerdict::NotSupported))
}

/// The phase after `phase` on the success path, by order.
fn after(phase: Phase, order: Order) -> Phase {
    let before = order == Order::BeforeApply;
    match phase {
        Phase::Pending => Phase::Locking,
        Phase::Locking => Phase::Planning,
        Phase::Planning => Phase::Checkpointing,
        Phase::Checkpointing if before => Phase::Migrating,
        Phase::Checkpointing => Phase::Promoting,
        Phase::Migrating => Phase::Verifying,
        Phase::Verifying if before => Phase::Promoting,
        Phase::Verifying => Phase::Unlocking,
        Phase::Promoting if before => Phase::Unlocking,
        Phase::Promoting => Phase::Migrating,
        Phase::Remediating => Phase::Unlocking,
        other => other,
    }
}

/// The end a run reaches from `Unlocking`.
pub fn end_of(run: &RunRecord) -> Phase {
    match (&run.failure, run.remediation_errors.is_empty()) {
        (None, true) => Phase::Succeeded,
        (Some(f), true) if f.kind != FailureKind::Failed && !f.data_changed => Phase::Deferred,
        (Some(_), true) => Phase::RolledBack,
        (_, false) => Phase::Failed,
    }
}

/// What the run must do next.
pub fn next(run: &RunRecord, now: DateTime<Utc>) -> Action {
    if run.phase.is_terminal() {
        return if run.capture_slot().is_some() && run.capture_released.is_none() {
            Action::ReleaseCapture
        } else if run.report_written {
            Action::Done
        } else {
            Action::Report
        };
    }
    // A run that ends (Unlocking after a fault) unlocks at once; only the
    // step being retried waits out its backoff.
    if let Some(r) = &run.retry {
        if now < r.next_at && run.phase != Phase::Unlocking {
            return Action::Wait(r.next_at);
        }
    }
    match run.phase {
        Phase::Pending => Action::Advance(Phase::Locking),
        Phase::Locking if run.step_ok("lock") => Action::Advance(Phase::Planning),
        Phase::Locking => Action::Lock,
        Phase::Planning if run.step_ok("plan") => Action::Advance(Phase::Checkpointing),
        Phase::Planning => Action::Plan,
        Phase::Checkpointing if !checkpoint_done(run) => Action::Checkpoint,
        Phase::Checkpointing if drill_pending(run) => Action::Drill,
        Phase::Checkpointing => Action::Advance(after(Phase::Checkpointing, run.order)),
        Phase::Migrating => {
            if run.recovery_point.is_none() && !run.migrations.is_empty() {
                return Action::RecoveryPoint;
            }
            for (i, m) in run.migrations.iter().enumerate() {
                if run.migrate_results.iter().any(|(id, _)| id == &m.id) {
                    continue;
                }
                return if run.open_step(&format!("migrate {}", m.id)) {
                    Action::Recover(i)
                } else {
                    Action::Migrate(i)
                };
            }
            Action::Advance(Phase::Verifying)
        }
        Phase::Verifying => {
            for (i, m) in run.migrations.iter().enumerate() {
                if m.verify.is_some() && !run.verify_results.iter().any(|(id, _)| id == &m.id) {
                    return Action::Verify(i);
                }
            }
            Action::Advance(after(Phase::Verifying, run.order))
        }
        Phase::Promoting if !run.promoted => Action::Promote,
        Phase::Promoting if !run.step_ok("health") => Action::Health,
        Phase::Promoting => Action::Advance(after(Phase::Promoting, run.order)),
        Phase::Remediating => remediation(run),
        Phase::Unlocking if step_done(run, "unlock") && !run.open_step("unlock") => Action::Advance(end_of(run)),
        Phase::Unlocking => Action::Unlock,
        Phase::Succeeded | Phase::RolledBack | Phase::Failed | Phase::Deferred => Action::Done,
    }
}

/// Whether the run still owes its own replay of the writes its restore
/// kept: asked for (`backstop.dev/replay: auto` on a carrier), the restore
/// kept them, and no replay has finished. One interrupted by a crash is
/// done again: replay skips what `backstop.replayed` says it applied.
fn wants_replay(run: &RunRecord) -> bool {
    run.migrations
        .iter()
        .any(|m| m.replay == crate::manifests::ReplayMode::Auto)
        && matches!(
            run.restore.as_ref().and_then(|r| r.lost_writes.as_ref()),
            Some(crate::capture::Captured::Kept(w)) if w.transactions > 0
        )
        && run.lost_writes_replay.is_none()
}

fn remediation(run: &RunRecord) -> Action {
    let Some(failure) = &run.failure else {
        return Action::Advance(Phase::Unlocking);
    };
    let restore_finished = step_done(run, "restore") && !run.open_step("restore");
    // Never under a migration that may still be writing (a Job that did
    // not stop): the run holds the database for a person instead.
    if failure.data_changed
        && run.checkpoint.is_some()
        && run.restore.is_none()
        && !restore_finished
        && live_writer(run).is_none()
    {
        return Action::Restore;
    }
    // The bad code off the gate first (when it was promoted): replay is
    // not what should keep it live.
    let gate_moved = run.promoted_to.as_deref() != Some(run.gate_before.as_str());
    if run.promoted && gate_moved && run.gate_revert.is_none() && !step_failed_for_good(run, "gate-revert") {
        return Action::RevertGate;
    }
    if wants_replay(run) {
        return Action::ReplayLostWrites;
    }
    let revert_step = Action::Revert.step(run).unwrap_or_default();
    if run.revert.is_none() && !step_failed_for_good(run, &revert_step) {
        return Action::Revert;
    }
    if let Some(r) = &run.revert {
        if r.mode == RevertMode::PullRequest
            && r.pull_request.is_none()
            && !r.pr_pending
            && !step_done(run, "pull-request")
        {
            return Action::PullRequest;
        }
    }
    Action::Advance(Phase::Unlocking)
}

/// A step that failed with an error recorded for a person (not retried).
fn step_failed_for_good(run: &RunRecord, name: &str) -> bool {
    run.steps.iter().any(|s| s.name == name && s.ok == Some(false)) && run.retry.as_ref().is_none_or(|r| r.step != name)
}

/// Records the intent of `name` (an open step) before the action runs. A step
/// of that name left open by an interrupted process is the same intent: it is
/// reused, so that its result closes it.
pub fn begin(run: &mut RunRecord, name: &str, now: DateTime<Utc>) {
    if run.open_step(name) {
        return;
    }
    run.steps.push(Step {
        name: name.to_string(),
        phase: run.phase,
        started_at: now,
        finished_at: None,
        ok: None,
        detail: String::new(),
    });
}

/// Records the result of the open step `name`.
pub fn close(run: &mut RunRecord, name: &str, ok: bool, detail: String, now: DateTime<Utc>) {
    if let Some(step) = run
        .steps
        .iter_mut()
        .rev()
        .find(|s| s.name == name && s.finished_at.is_none())
    {
        step.finished_at = Some(now);
        step.ok = Some(ok);
        step.detail = detail;
    }
}

/// Folds the result of `step` into the record.
pub fn apply(run: &mut RunRecord, step: &str, obs: Observation, now: DateTime<Utc>, policy: Policy) {
    use Observation as O;
    let ok_detail = |d: String| (true, d);
    match obs {
        O::Locked(r) => match r {
            Ok(d) => done(run, step, ok_detail(d), now),
            Err(f) => fault(run, step, f, false, now, policy),
        },
        O::Planned(d) => done(run, step, ok_detail(d), now),
        O::Checkpointed(r) => match r {
            Ok(Some(c)) => {
                let detail = c.detail();
                run.checkpoint = Some(c);
                done(run, step, ok_detail(detail), now)
            }
            Ok(None) => done(
                run,
                step,
                ok_detail("no checkpoint (backstop.dev/checkpoint: none)".into()),
                now,
            ),
            Err(f) => fault(run, step, f, false, now, policy),
        },
        O::Drilled(r) => match r {
            Ok(d) => {
                let (verdict, said, detail) = match d {
                    DrillOutcome::Passed(d) => (DrillVerdict::Passed, format!("passed: {d}"), d),
                    DrillOutcome::NotSupported(d) => (DrillVerdict::NotSupported, d.clone(), d),
                };
                if let Some(c) = run.checkpoint.as_mut() {
                    c.drill = verdict;
                    c.restore_drill = said;
                }
                done(run, step, ok_detail(detail), now)
            }
            Err(f) => {
                if let Some(c) = run.checkpoint.as_mut() {
                    c.drill = DrillVerdict::Failed;
                    c.restore_drill = format!("failed: {}", f.message);
                }
                fault(run, step, f, false, now, policy)
            }
        },
        O::RecoveryPoint(r) => match r {
            Ok(p) => {
                let detail = p.detail();
                run.recovery_point = Some(p);
                done(run, step, ok_detail(detail), now)
            }
            Err(f) => fault(run, step, f, false, now, policy),
        },
        O::Migrated(i, r) => {
            let Some(m) = run.migrations.get(i).cloned() else {
                return;
            };
            match r {
                Ok(outcome) => {
                    let detail = outcome.detail();
                    let error = outcome.error.clone();
                    let committed = outcome.committed;
                    run.migrate_results.push((m.id.clone(), outcome));
                    done(run, step, (error.is_none(), detail), now);
                    if let Some(e) = error {
                        let f = Fault::failed(format!("migration {} failed: {e}", m.id));
                        fault(run, step, f, committed, now, policy);
                    }
                }
                Err(f) => {
                    let f = Fault {
                        kind: f.kind,
                        message: format!("migration {} could not run: {}", m.id, f.message),
                    };
                    fault(run, step, f, false, now, policy)
                }
            }
        }
        O::Recovered(i, r) => {
            let Some(m) = run.migrations.get(i).cloned() else {
                return;
            };
            // (A Job's is none: it has no statements, and its absence from the
            // history never says it did not run.)
            let transactional = m.run != crate::manifests::RunKind::Job && m.statements.iter().all(|s| s.transactional);
            match r {
                Ok(Recovered::Applied) => {
                    let total = m.statements.len();
                    run.migrate_results.push((
                        m.id.clone(),
                        MigrateOutcome {
                            transactional,
                            statements_done: total,
                            statements_total: total,
                            error: None,
                            committed: true,
                            duration_ms: 0,
                            own_xids: Vec::new(),
                            failed_at: None,
                            still_running: None,
                        },
                    ));
                    done(
                        run,
                        step,
                        ok_detail("resumed after interruption: found in history".into()),
                        now,
                    )
                }
                Ok(Recovered::NotApplied) if transactional => {
                    // The transaction never committed (its history row is part of
                    // it): PostgreSQL rolled it back. Run it again.
                    close(
                        run,
                        step,
                        false,
                        "interrupted before commit: not in history, PostgreSQL rolled the transaction back; running it again"
                            .into(),
                        now,
                    );
                    run.retry = None;
                }
                Ok(Recovered::NotApplied) => {
                    let outcome = MigrateOutcome {
                        transactional,
                        statements_done: 0,
                        statements_total: m.statements.len(),
                        error: Some("interrupted while running statement by statement; not in history".into()),
                        committed: true,
                        duration_ms: 0,
                        own_xids: Vec::new(),
                        failed_at: None,
                        still_running: None,
                    };
                    run.migrate_results.push((m.id.clone(), outcome));
                    close(
                        run,
                        step,
                        false,
                        "resumed after interruption: not in history".into(),
                        now,
                    );
                    let f = Fault::failed(format!(
                        "migration {} was interrupted outside a transaction; some statements may have run",
                        m.id
                    ));
                    fault(run, step, f, true, now, policy)
                }
                // History unreadable: the step stays open (whether it committed
                // is still unknown) and is asked again on a later pass.
                Err(f) => {
                    run.retry = Some(
                        policy
                            .backoff
                            .bump(run.retry.as_ref(), step, &f.message, now, policy.timeout),
                    );
                }
            }
        }
        O::Verified(i, r) => {
            let Some(m) = run.migrations.get(i).cloned() else {
                return;
            };
            match r {
                Ok(outcome) => {
                    let passed = outcome.passed;
                    let detail = outcome.detail.clone();
                    run.verify_results.push((m.id.clone(), outcome));
                    done(run, step, (passed, detail.clone()), now);
                    if !passed {
                        fault(
                            run,
                            step,
                            Fault::failed(format!("verify of {} failed: {detail}", m.id)),
                            true,
                            now,
                            policy,
                        );
                    }
                }
                Err(f) => {
                    let f = Fault {
                        kind: f.kind,
                        message: format!("verify of {} could not run: {}", m.id, f.message),
                    };
                    fault(run, step, f, true, now, policy)
                }
            }
        }
        O::Promoted(r) => match r {
            Ok((to, detail)) => {
                run.promoted = true;
                run.promoted_to = Some(to);
                done(run, step, ok_detail(detail), now)
            }
            Err(f) => fault(run, step, f, false, now, policy),
        },
        O::Healthy(r) => match r {
            Ok(d) => done(run, step, ok_detail(d), now),
            Err(f) => {
                let f = Fault::failed(format!("health check after promotion failed: {}", f.message));
                fault(run, step, f, true, now, policy)
            }
        },
        O::Restored(r) => match r {
            Ok(rec) => {
                let detail = rec.detail();
                run.restore = Some(rec);
                done(run, step, ok_detail(detail), now)
            }
            Err(f) => {
                close(run, step, false, f.message.clone(), now);
                run.remediation_errors.push(format!("restore failed: {}", f.message));
            }
        },
        O::ReplayedLostWrites(r) => {
            use crate::capture::replay::AutoReplay;
            let (ok, detail) = match &r {
                AutoReplay::Replayed(done) => (
                    done.stopped.is_none(),
                    format!(
                        "put back {} transactions of lost writes ({} already), {} left for a person{}",
                        done.applied.len(),
                        done.already.len(),
                        done.left.len(),
                        done.stopped
                            .as_ref()
                            .map(|(xid, why)| format!("; stopped at xid {xid}: {why}"))
                            .unwrap_or_default()
                    ),
                ),
                AutoReplay::NotReplayed { why } => (false, format!("lost writes not replayed: {why}")),
            };
            close(run, step, ok, detail, now);
            run.lost_writes_replay = Some(r);
        }
        O::GateReverted(r) => match r {
            Ok(sha) => {
                run.gate_revert = Some(sha.clone());
                done(run, step, ok_detail(format!("gate reverted with {sha}")), now)
            }
            Err(f) => remediation_fault(run, step, f, "reverting the gate failed", now, policy),
        },
        O::Reverted(r) => match r {
            Ok(rec) => {
                let detail = rec.detail();
                run.revert = Some(rec);
                done(run, step, ok_detail(detail), now)
            }
            Err(f) => remediation_fault(run, step, f, "revert failed", now, policy),
        },
        O::PullRequest(r) => {
            let Some(rev) = run.revert.as_mut() else { return };
            let (ok, detail) = match r {
                Ok(Some(url)) => {
                    rev.pull_request = Some(url.clone());
                    (true, url)
                }
                Ok(None) => {
                    rev.note = format!("{}; no forge configured, no pull request opened", rev.note);
                    (true, "no forge configured, no pull request opened".into())
                }
                Err(f) => {
                    rev.pr_pending = true;
                    rev.note = format!("{}; revert pushed, pull request pending: {}", rev.note, f.message);
                    (false, f.message)
                }
            };
            close(run, step, ok, detail, now);
        }
        O::Unlocked(r) => match r {
            Ok(d) => done(run, step, ok_detail(d), now),
            Err(f) => {
                close(run, step, false, f.message.clone(), now);
                run.remediation_errors.push(format!("unlock failed: {}", f.message));
            }
        },
        O::CaptureReleased(r) => {
            use crate::capture::SlotRelease;
            let slot = run.capture_slot().unwrap_or_default().to_string();
            let (ok, detail) = match &r {
                SlotRelease::Dropped => (true, format!("dropped logical slot {slot}")),
                SlotRelease::Gone => (true, format!("logical slot {slot} is gone (the restore took the server back before it)")),
                SlotRelease::Failed { why } => (
                    false,
                    format!("logical slot {slot} could not be dropped ({why}); it retains WAL until a person runs SELECT pg_drop_replication_slot('{slot}')"),
                ),
            };
            close(run, step, ok, detail, now);
            run.capture_released = Some(r);
        }
        O::Reported(r) => {
            let (ok, detail) = match r {
                Ok(location) => (true, location),
                Err(e) => (false, e),
            };
            close(run, step, ok, detail, now);
            run.report_written = true;
        }
    }
}

/// Whether the step `name` just hit a transient fault that keeps the run in
/// its phase, to be retried by a later pass (`before`: the retry record
/// before the step's result was applied).
pub fn retrying_in_place(run: &RunRecord, name: &str, before: Option<&Retry>) -> bool {
    !run.phase.is_terminal()
        && run.phase != Phase::Unlocking
        && run.retry.as_ref().is_some_and(|r| r.step == name && Some(r) != before)
}

/// Moves the record to `phase`. A run that ends for good waits for nothing.
pub fn advance(run: &mut RunRecord, phase: Phase) {
    run.phase = phase;
    if matches!(phase, Phase::Succeeded | Phase::RolledBack | Phase::Failed) {
        run.retry = None;
    }
}

/// A step that succeeded ends the retry it was the subject of.
fn done(run: &mut RunRecord, step: &str, (ok, detail): (bool, String), now: DateTime<Utc>) {
    close(run, step, ok, detail, now);
    if ok && run.retry.as_ref().is_some_and(|r| r.step == step) {
        run.retry = None;
    }
}

fn data_changed(run: &RunRecord) -> bool {
    run.migrate_results.iter().any(|(_, o)| o.committed)
}

fn retry(run: &mut RunRecord, step: &str, cause: &str, now: DateTime<Utc>, policy: Policy) {
    close(run, step, false, format!("transient: {cause}"), now);
    run.retry = Some(
        policy
            .backoff
            .bump(run.retry.as_ref(), step, cause, now, policy.timeout),
    );
}

/// The failure taxonomy in one place.
fn fault(run: &mut RunRecord, step: &str, f: Fault, changed: bool, now: DateTime<Utc>, policy: Policy) {
    let data_changed = changed || data_changed(run);
    match f.kind {
        FailureKind::Transient if data_changed || run.phase == Phase::Remediating => {
            retry(run, step, &f.message, now, policy)
        }
        FailureKind::Transient | FailureKind::Refused => {
            close(run, step, false, f.message.clone(), now);
            run.retry = Some(
                policy
                    .backoff
                    .bump(run.retry.as_ref(), step, &f.message, now, policy.timeout),
            );
            run.failure = Some(Failure {
                phase: run.phase,
                message: f.message,
                data_changed: false,
                kind: f.kind,
            });
            run.restore_decision =
                Some("no restore: nothing was changed; the run ends and is tried again later".into());
            run.phase = Phase::Unlocking;
        }
        FailureKind::Failed => {
            close(run, step, false, f.message.clone(), now);
            run.retry = None;
            run.restore_decision = Some(if data_changed {
                if run.checkpoint.is_some() {
                    format!(
                        "restore: the failure left committed changes ({}), so the database goes back to the checkpoint",
                        f.message
                    )
                } else {
                    run.remediation_errors.push(
                        "data changed and there is no checkpoint to restore (checkpoint: none); restore by hand".into(),
                    );
                    "restore needed (data changed) but the run has no checkpoint".into()
                }
            } else if run.migrate_results.is_empty() || run.migrate_results.iter().all(|(_, o)| !o.transactional) {
                "no restore: the migration did not start, the database is unchanged".into()
            } else {
                "no restore: the migration failed inside one transaction, which PostgreSQL rolled back (zero data loss)"
                    .into()
            });
            run.failure = Some(Failure {
                phase: run.phase,
                message: f.message,
                data_changed,
                kind: FailureKind::Failed,
            });
            if let Some(what) = data_changed.then(|| live_writer(run)).flatten() {
                // A restore under a live writer would mix its writes into
                // the restored data (remediation skips it): a person decides.
                run.restore_decision = Some(format!(
                    "no restore: a migration may still be writing to the database ({what})"
                ));
                run.remediation_errors.push(format!(
                    "{what}; nothing was restored while it may still write: stop it, then restore by hand and take the run over (backstop ack, or the backstop.dev/acknowledged-by annotation on its MigrationRun)"
                ));
            }
            run.phase = Phase::Remediating;
        }
    }
}

/// What may still be writing to the database: a migration's Job that was
/// not seen to stop ([`MigrateOutcome::still_running`]), whatever its
/// own outcome (one that completed can leave pods running).
pub fn live_writer(run: &RunRecord) -> Option<String> {
    run.migrate_results.iter().find_map(|(_, o)| o.still_running.clone())
}

fn remediation_fault(run: &mut RunRecord, step: &str, f: Fault, what: &str, now: DateTime<Utc>, policy: Policy) {
    if f.kind == FailureKind::Transient {
        retry(run, step, &f.message, now, policy);
    } else {
        close(run, step, false, f.message.clone(), now);
        // Failed for good: no longer the subject of a retry.
        run.retry = None;
        run.remediation_errors.push(format!("{what}: {}", f.message));
    }
}

mod vocab;
pub use vocab::*;

#[cfg(test)]
mod tests;
