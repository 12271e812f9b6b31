//! Unit tests of the pure transition: every phase and failure kind.

use super::*;

use chrono::{Duration, TimeZone};

use crate::checkpoint::{CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::run::record::RevertRecord;
use crate::runner::VerifyOutcome;

use crate::git::CommitInfo;
use crate::manifests::{self, Carrier};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

/// Base 30 s, max 600 s, stall after 600 s.
const POLICY: Policy = Policy {
    backoff: Backoff {
        base: std::time::Duration::from_secs(30),
        max: std::time::Duration::from_secs(600),
    },
    timeout: std::time::Duration::from_secs(600),
};

const GATE_BEFORE: &str = "gate000000000000000000000000000000000000";
const RUN_COMMIT: &str = "c0ffee0000000000000000000000000000000000";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(secs)
}

/// A carrier parsed from a small ConfigMap (one transactional statement).
fn carrier(id: &str) -> Carrier {
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {id}\n  annotations:\n    backstop.dev/migration: \"{id}\"\n    backstop.dev/database: url:DB\ndata:\n  a.sql: \"CREATE TABLE {id} (id int)\"\n"
    );
    let file = format!("m/{id}.yaml");
    let snap = manifests::Snapshot::from([(file.clone(), yaml.clone().into_bytes())]);
    let mut c = manifests::parse_file(&snap, &file, yaml.as_bytes()).unwrap().remove(0);
    c.verify = Some(format!("SELECT count(*) FROM {id}"));
    c
}

/// Builds a fresh `Pending` run record.
struct Build {
    run: RunRecord,
}

impl Build {
    fn new(ids: &[&str]) -> Self {
        let migrations: Vec<Carrier> = ids.iter().map(|id| carrier(id)).collect();
        assert!(migrations.iter().all(|m| m.statements.iter().all(|s| s.transactional)));
        Build {
            run: RunRecord {
                id: "20240501-120000000-c0ffee0".into(),
                created_at: t0(),
                commit: CommitInfo {
                    sha: RUN_COMMIT.into(),
                    subject: "add tables".into(),
                    author: "dev <dev@example.com>".into(),
                    time: t0().to_rfc3339(),
                    trailers: Vec::new(),
                },
                upstream_branch: "main".into(),
                gate_branch: "backstop/gate".into(),
                gate_before: GATE_BEFORE.into(),
                order: Order::BeforeApply,
                migrations,
                already_applied: Vec::new(),
                plan_hash: "plan-hash".into(),
                findings: Vec::new(),
                facts: Vec::new(),
                approvals: Vec::new(),
                soak: Vec::new(),
                needs_drill: false,
                phase: Phase::Pending,
                steps: Vec::new(),
                checkpoint: None,
                recovery_point: None,
                migrate_results: Vec::new(),
                verify_results: Vec::new(),
                promoted: false,
                promoted_to: None,
                failure: None,
                retry: None,
                restore_decision: None,
                restore: None,
                revert: None,
                hold_released: false,
                hold_waiting: None,
                checkpoint_pruned: false,
                gate_revert: None,
                remediation_errors: Vec::new(),
                report_written: false,
                acknowledged: None,
                set_aside_deleted: None,
                capture_released: None,
                lost_writes_replay: None,
            },
        }
    }

    fn order(mut self, order: Order) -> Self {
        self.run.order = order;
        for m in &mut self.run.migrations {
            m.order = order;
        }
        self
    }

    fn revert(mut self, mode: RevertMode) -> Self {
        for m in &mut self.run.migrations {
            m.revert = mode;
        }
        self
    }

    /// Marks every statement of migration `i` as non-transactional.
    fn non_transactional(mut self, i: usize) -> Self {
        for s in &mut self.run.migrations[i].statements {
            s.transactional = false;
        }
        self
    }

    fn needs_drill(mut self) -> Self {
        self.run.needs_drill = true;
        self
    }

    fn build(self) -> RunRecord {
        self.run
    }
}

fn run_of(ids: &[&str]) -> RunRecord {
    Build::new(ids).build()
}

fn checkpoint_record() -> CheckpointRecord {
    CheckpointRecord {
        backend: "local".into(),
        location: "/backups/cp1".into(),
        database: "app".into(),
        started_at: t0(),
        completed_at: t0(),
        size_bytes: 1234,
        restore_drill: String::new(),
        drill: crate::checkpoint::DrillVerdict::NotRun,
        base: None,
    }
}

fn committed(statements: usize) -> MigrateOutcome {
    MigrateOutcome {
        transactional: true,
        statements_done: statements,
        statements_total: statements,
        error: None,
        committed: true,
        duration_ms: 7,
        own_xids: Vec::new(),
        failed_at: None,
        still_running: None,
    }
}

/// A migration that failed inside one transaction (rolled back).
fn rolled_back_in_transaction() -> MigrateOutcome {
    MigrateOutcome {
        transactional: true,
        statements_done: 0,
        statements_total: 1,
        error: Some("relation \"t\" already exists".into()),
        committed: false,
        duration_ms: 3,
        own_xids: Vec::new(),
        failed_at: None,
        still_running: None,
    }
}

/// What a backend reports when everything works.
fn ok(action: &Action, run: &RunRecord) -> Observation {
    use Observation as O;
    match action {
        Action::Lock => O::Locked(Ok("locked".into())),
        Action::Plan => O::Planned("plan ok".into()),
        Action::Checkpoint => O::Checkpointed(Ok(Some(checkpoint_record()))),
        Action::Drill => O::Drilled(Ok(crate::checkpoint::DrillOutcome::Passed(
            "restored into scratch".into(),
        ))),
        Action::RecoveryPoint => O::RecoveryPoint(Ok(RecoveryPoint {
            time: t0(),
            lsn: "0/16B3748".into(),
            capture: None,
        })),
        Action::Migrate(i) => O::Migrated(*i, Ok(committed(run.migrations[*i].statements.len()))),
        Action::Recover(i) => O::Recovered(*i, Ok(Recovered::Applied)),
        Action::Verify(i) => O::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: true,
                detail: "1 row".into(),
            }),
        ),
        Action::Promote => O::Promoted(Ok((run.commit.sha.clone(), "gate moved".into()))),
        Action::Health => O::Healthy(Ok("ready".into())),
        Action::Restore => O::Restored(Ok(RestoreRecord {
            started_at: t0(),
            finished_at: t0(),
            target: "lsn 0/16B3748".into(),
            kept: "/backups/before-restore".into(),
            manifest_patch: None,
            databases: Vec::new(),
            writes_stopped_at: None,
            lost_commits: None,
            lost_writes: None,
        })),
        Action::RevertGate => O::GateReverted(Ok("gaterevert00".into())),
        Action::Revert => O::Reverted(Ok(RevertRecord {
            mode: revert_mode(run),
            commit: "revert00".into(),
            branch: match revert_mode(run) {
                RevertMode::Commit => "main".into(),
                RevertMode::PullRequest => "backstop/revert-c0ffee0".into(),
            },
            pull_request: None,
            note: "reverted".into(),
            pr_pending: false,
        })),
        Action::PullRequest => O::PullRequest(Ok(Some("https://forge.example/pr/1".into()))),
        Action::Unlock => O::Unlocked(Ok("unlocked".into())),
        Action::Report => O::Reported(Ok("reports/run.json".into())),
        Action::ReleaseCapture => O::CaptureReleased(crate::capture::SlotRelease::Dropped),
        Action::ReplayLostWrites => O::ReplayedLostWrites(crate::capture::replay::AutoReplay::Replayed(
            crate::capture::replay::Replayed {
                applied: vec![7],
                ..Default::default()
            },
        )),
        Action::Advance(_) | Action::Wait(_) | Action::Done => panic!("{action:?} has no observation"),
    }
}

/// Plays the executor: performs what `next` says, with the observation that
/// `obs` chooses (`None`: the backend succeeds), until `stop` holds for the
/// next action (which is not performed) or the machine says Done/Wait (which
/// is the last entry). Returns every action seen, in order.
fn drive(
    run: &mut RunRecord,
    now: DateTime<Utc>,
    policy: Policy,
    stop: impl Fn(&Action) -> bool,
    mut obs: impl FnMut(&Action, &RunRecord) -> Option<Observation>,
) -> Vec<Action> {
    let mut seen = Vec::new();
    for _ in 0..200 {
        let action = next(run, now);
        if stop(&action) {
            return seen;
        }
        seen.push(action.clone());
        match action {
            Action::Advance(phase) => advance(run, phase),
            Action::Done | Action::Wait(_) => return seen,
            action => {
                let name = action.step(run).expect("an action that records a step");
                begin(run, &name, now);
                let observed = obs(&action, run).unwrap_or_else(|| ok(&action, run));
                apply(run, &name, observed, now, policy);
            }
        }
    }
    panic!(
        "the machine did not stop within 200 actions; last ones: {:?}",
        &seen[seen.len() - 12..]
    );
}

/// Plays until Done/Wait with `obs` choosing observations.
fn play(
    run: &mut RunRecord,
    now: DateTime<Utc>,
    obs: impl FnMut(&Action, &RunRecord) -> Option<Observation>,
) -> Vec<Action> {
    drive(run, now, POLICY, |_| false, obs)
}

/// Plays until Done/Wait with every backend succeeding.
fn play_ok(run: &mut RunRecord, now: DateTime<Utc>) -> Vec<Action> {
    play(run, now, |_, _| None)
}

/// Plays with every backend succeeding until `target` is the next action
/// (not performed). Panics if the run stops before.
fn play_until(run: &mut RunRecord, now: DateTime<Utc>, target: Action) -> Vec<Action> {
    let seen = drive(run, now, POLICY, |a| *a == target, |_, _| None);
    assert_eq!(next(run, now), target, "the run never reached {target:?}; saw {seen:?}");
    seen
}

/// Performs exactly one action (begin + apply) with the given observation.
fn perform(run: &mut RunRecord, action: &Action, observed: Observation, now: DateTime<Utc>, policy: Policy) {
    let name = action.step(run).expect("an action that records a step");
    begin(run, &name, now);
    apply(run, &name, observed, now, policy);
}

/// Performs exactly one action with the observation of a working backend.
fn perform_ok(run: &mut RunRecord, action: &Action, now: DateTime<Utc>) {
    let observed = ok(action, run);
    perform(run, action, observed, now, POLICY);
}

fn phases(actions: &[Action]) -> Vec<Phase> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Advance(p) => Some(*p),
            _ => None,
        })
        .collect()
}

/// The actions that touch something (no Advance).
fn performed(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Advance(_)))
        .cloned()
        .collect()
}

fn is_remediation(a: &Action) -> bool {
    matches!(
        a,
        Action::Restore | Action::RevertGate | Action::Revert | Action::PullRequest
    )
}

fn step_names(run: &RunRecord) -> Vec<&str> {
    run.steps.iter().map(|s| s.name.as_str()).collect()
}

fn last_step<'a>(run: &'a RunRecord, name: &str) -> &'a Step {
    run.steps
        .iter()
        .rev()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {:?}", step_names(run)))
}

// ---------------------------------------------------------------------------
// Success paths
// ---------------------------------------------------------------------------

#[test]
fn success_before_apply_walks_every_phase_in_order_then_reports_and_is_done() {
    let mut run = run_of(&["m1"]);
    let actions = play_ok(&mut run, t0());
    assert_eq!(
        actions,
        vec![
            Action::Advance(Phase::Locking),
            Action::Lock,
            Action::Advance(Phase::Planning),
            Action::Plan,
            Action::Advance(Phase::Checkpointing),
            Action::Checkpoint,
            Action::Advance(Phase::Migrating),
            Action::RecoveryPoint,
            Action::Migrate(0),
            Action::Advance(Phase::Verifying),
            Action::Verify(0),
            Action::Advance(Phase::Promoting),
            Action::Promote,
            Action::Health,
            Action::Advance(Phase::Unlocking),
            Action::Unlock,
            Action::Advance(Phase::Succeeded),
            Action::Report,
            Action::Done,
        ]
    );
    assert_eq!(run.phase, Phase::Succeeded);
    assert_eq!(end_of(&run), Phase::Succeeded);
    assert!(run.report_written);
    assert!(run.failure.is_none());
    assert!(run.retry.is_none());
    assert!(run.restore_decision.is_none());
    assert!(run.revert.is_none() && run.restore.is_none() && run.gate_revert.is_none());
    assert!(run.promoted);
    assert_eq!(run.promoted_to.as_deref(), Some(RUN_COMMIT));
    assert_eq!(run.checkpoint, Some(checkpoint_record()));
    assert_eq!(run.recovery_point.as_ref().map(|p| p.lsn.as_str()), Some("0/16B3748"));
    assert_eq!(run.migrate_results, vec![("m1".to_string(), committed(1))]);
    assert_eq!(run.verify_results.len(), 1);
    // Done stays Done.
    assert_eq!(next(&run, at(3600)), Action::Done);
}

#[test]
fn success_before_apply_records_every_step_in_order_finished_and_ok() {
    let mut run = run_of(&["m1"]);
    play_ok(&mut run, t0());
    assert_eq!(
        step_names(&run),
        vec![
            "lock",
            "plan",
            "checkpoint",
            "recovery-point",
            "migrate m1",
            "verify m1",
            "promote",
            "health",
            "unlock",
            "report"
        ]
    );
    for s in &run.steps {
        assert_eq!(s.ok, Some(true), "step {} not ok: {}", s.name, s.detail);
        assert_eq!(s.finished_at, Some(t0()), "step {} not finished", s.name);
        assert_eq!(s.started_at, t0());
    }
    let phase_of = |name: &str| last_step(&run, name).phase;
    assert_eq!(phase_of("lock"), Phase::Locking);
    assert_eq!(phase_of("plan"), Phase::Planning);
    assert_eq!(phase_of("checkpoint"), Phase::Checkpointing);
    assert_eq!(phase_of("recovery-point"), Phase::Migrating);
    assert_eq!(phase_of("migrate m1"), Phase::Migrating);
    assert_eq!(phase_of("verify m1"), Phase::Verifying);
    assert_eq!(phase_of("promote"), Phase::Promoting);
    assert_eq!(phase_of("health"), Phase::Promoting);
    assert_eq!(phase_of("unlock"), Phase::Unlocking);
    assert_eq!(phase_of("report"), Phase::Succeeded);
    assert_eq!(
        last_step(&run, "checkpoint").detail,
        "local checkpoint at /backups/cp1 (1234 bytes)"
    );
    assert_eq!(
        last_step(&run, "migrate m1").detail,
        "1/1 statements, one transaction, 7 ms"
    );
}

#[test]
fn success_with_two_migrations_migrates_then_verifies_each_in_order() {
    let mut run = run_of(&["m1", "m2"]);
    let actions = performed(&play_ok(&mut run, t0()));
    let middle: Vec<Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::RecoveryPoint | Action::Migrate(_) | Action::Verify(_)))
        .cloned()
        .collect();
    assert_eq!(
        middle,
        vec![
            Action::RecoveryPoint,
            Action::Migrate(0),
            Action::Migrate(1),
            Action::Verify(0),
            Action::Verify(1)
        ]
    );
    assert_eq!(run.phase, Phase::Succeeded);
    let ids: Vec<&str> = run.migrate_results.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["m1", "m2"]);
}

#[test]
fn migration_without_verify_query_skips_the_verify_step() {
    let mut run = run_of(&["m1"]);
    run.migrations[0].verify = None;
    let actions = play_ok(&mut run, t0());
    assert!(!actions.iter().any(|a| matches!(a, Action::Verify(_))), "{actions:?}");
    assert!(phases(&actions).contains(&Phase::Verifying));
    assert_eq!(run.phase, Phase::Succeeded);
    assert!(!step_names(&run).iter().any(|n| n.starts_with("verify")));
}

#[test]
fn success_after_apply_promotes_before_migrating_and_verifies_before_unlocking() {
    let mut run = Build::new(&["m1"]).order(Order::AfterApply).build();
    let actions = play_ok(&mut run, t0());
    assert_eq!(
        phases(&actions),
        vec![
            Phase::Locking,
            Phase::Planning,
            Phase::Checkpointing,
            Phase::Promoting,
            Phase::Migrating,
            Phase::Verifying,
            Phase::Unlocking,
            Phase::Succeeded
        ]
    );
    assert_eq!(
        performed(&actions),
        vec![
            Action::Lock,
            Action::Plan,
            Action::Checkpoint,
            Action::Promote,
            Action::Health,
            Action::RecoveryPoint,
            Action::Migrate(0),
            Action::Verify(0),
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert_eq!(run.phase, Phase::Succeeded);
    assert!(run.steps.iter().all(|s| s.ok == Some(true)));
}

#[test]
fn restore_drill_runs_once_after_the_checkpoint_when_the_run_needs_one() {
    let mut run = Build::new(&["m1"]).needs_drill().build();
    let actions = performed(&play_ok(&mut run, t0()));
    assert_eq!(
        &actions[..4],
        &[Action::Lock, Action::Plan, Action::Checkpoint, Action::Drill]
    );
    assert_eq!(actions.iter().filter(|a| **a == Action::Drill).count(), 1);
    assert_eq!(
        run.checkpoint.as_ref().unwrap().restore_drill,
        "passed: restored into scratch"
    );
    assert_eq!(
        run.checkpoint.as_ref().unwrap().drill,
        crate::checkpoint::DrillVerdict::Passed
    );
    assert_eq!(last_step(&run, "restore-drill").ok, Some(true));
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn restore_drill_not_needed_when_the_backend_does_not_support_it() {
    let mut run = Build::new(&["m1"]).needs_drill().build();
    let actions = performed(&play(&mut run, t0(), |a, _| match a {
        Action::Drill => Some(Observation::Drilled(Ok(crate::checkpoint::DrillOutcome::NotSupported(
            "cannot drill".into(),
        )))),
        _ => None,
    }));
    assert_eq!(actions.iter().filter(|a| **a == Action::Drill).count(), 1);
    let checkpoint = run.checkpoint.as_ref().unwrap();
    assert_eq!(checkpoint.restore_drill, "cannot drill");
    assert_eq!(checkpoint.drill, crate::checkpoint::DrillVerdict::NotSupported);
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn no_checkpoint_kind_records_a_step_and_goes_on_without_a_checkpoint() {
    let mut run = run_of(&["m1"]);
    play(&mut run, t0(), |a, _| match a {
        Action::Checkpoint => Some(Observation::Checkpointed(Ok(None))),
        _ => None,
    });
    assert_eq!(run.phase, Phase::Succeeded);
    assert!(run.checkpoint.is_none());
    assert_eq!(last_step(&run, "checkpoint").ok, Some(true));
    assert!(last_step(&run, "checkpoint").detail.contains("no checkpoint"));
}

// ---------------------------------------------------------------------------
// Transient faults before the database changed: Deferred
// ---------------------------------------------------------------------------

/// The transient faults a run can meet before any data changed: (order, the
/// action that fails, its failing observation, the step name).
fn early_transient_faults() -> Vec<(Order, Action, Observation, &'static str)> {
    use Observation as O;
    vec![
        (
            Order::BeforeApply,
            Action::Lock,
            O::Locked(Err(Fault::transient("lease busy"))),
            "lock",
        ),
        (
            Order::BeforeApply,
            Action::Checkpoint,
            O::Checkpointed(Err(Fault::transient("backup API unreachable"))),
            "checkpoint",
        ),
        (
            Order::BeforeApply,
            Action::RecoveryPoint,
            O::RecoveryPoint(Err(Fault::transient("connection refused"))),
            "recovery-point",
        ),
        (
            Order::BeforeApply,
            Action::Migrate(0),
            O::Migrated(0, Err(Fault::transient("connection refused"))),
            "migrate m1",
        ),
        // after-apply: the gate push fails before the migration ran.
        (
            Order::AfterApply,
            Action::Promote,
            O::Promoted(Err(Fault::transient("push rejected: remote hung up"))),
            "promote",
        ),
    ]
}

#[test]
fn transient_fault_before_data_changed_defers_with_backoff_and_no_remediation() {
    for (order, action, observed, step) in early_transient_faults() {
        let mut run = Build::new(&["m1"]).order(order).build();
        let before = play_until(&mut run, t0(), action.clone());
        let phase = run.phase;
        perform(&mut run, &action, observed, t0(), POLICY);

        // The decision right after the fault.
        assert_ne!(run.phase, Phase::Remediating, "{action:?}");
        assert_eq!(run.phase, Phase::Unlocking, "{action:?}");
        let failure = run.failure.clone().unwrap_or_else(|| panic!("{action:?}: no failure"));
        assert_eq!(failure.kind, FailureKind::Transient, "{action:?}");
        assert!(!failure.data_changed, "{action:?}");
        assert_eq!(failure.phase, phase, "{action:?}");
        let retry = run.retry.clone().unwrap_or_else(|| panic!("{action:?}: no retry"));
        assert_eq!(retry.step, step);
        assert_eq!(retry.attempts, 1);
        assert_eq!(retry.since, t0());
        assert_eq!(retry.next_at, t0() + Duration::seconds(30), "{action:?}");
        assert!(!retry.stalled);
        assert_eq!(end_of(&run), Phase::Deferred, "{action:?}");
        assert!(
            run.restore_decision.as_deref().unwrap_or("").starts_with("no restore"),
            "{action:?}: {:?}",
            run.restore_decision
        );
        let s = last_step(&run, step);
        assert_eq!(s.ok, Some(false));
        assert!(s.finished_at.is_some());

        // Whenever the run goes on, it only unlocks and ends Deferred.
        let after = play_ok(&mut run, at(3600));
        assert_eq!(
            performed(&after),
            vec![Action::Unlock, Action::Report, Action::Done],
            "{action:?}"
        );
        assert_eq!(run.phase, Phase::Deferred, "{action:?}");
        assert_eq!(run.retry.as_ref().map(|r| r.step.as_str()), Some(step), "{action:?}");
        assert!(!before.iter().chain(&after).any(is_remediation), "{action:?}");
        assert!(run.restore.is_none() && run.revert.is_none() && run.gate_revert.is_none());
        assert!(run.remediation_errors.is_empty());
        assert!(
            run.steps.iter().all(|s| s.phase != Phase::Remediating),
            "{action:?}: {:?}",
            step_names(&run)
        );
        assert_eq!(run.outcome(), Some(crate::run::record::Outcome::Deferred));
    }
}

/// BUG (see the report): a transient fault before the data changed should end
/// the run at once (unlock, Deferred; the module doc: "unlock, no restore, no
/// revert; a later run tries again after a backoff"). Instead `next` checks
/// the retry before the phase and answers Wait in `Unlocking`: the lock is
/// held for the whole backoff.
#[test]
fn transient_fault_before_data_changed_unlocks_at_once() {
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Lock);
    perform(
        &mut run,
        &Action::Lock,
        Observation::Locked(Err(Fault::transient("lease busy"))),
        t0(),
        POLICY,
    );
    assert_eq!(next(&run, t0()), Action::Unlock);
}

/// The next run reads the Deferred record's retry (`blocked_by`, `new_run`):
/// the unlock (another step) and the end must not clear it.
#[test]
fn deferred_run_keeps_its_retry_after_unlocking_for_the_next_run() {
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Lock);
    perform(
        &mut run,
        &Action::Lock,
        Observation::Locked(Err(Fault::transient("lease busy"))),
        t0(),
        POLICY,
    );
    play_ok(&mut run, at(3600));
    assert_eq!(run.phase, Phase::Deferred);
    let retry = run.retry.expect("a Deferred run keeps its retry");
    assert_eq!(retry.step, "lock");
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.since, t0());
}

#[test]
fn refused_fault_before_data_changed_ends_deferred_without_remediation() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(*i, Err(Fault::refused("no such database")))),
        _ => None,
    });
    let actions = [actions, play_ok(&mut run, at(3600))].concat();
    assert!(!actions.iter().any(is_remediation), "{actions:?}");
    let failure = run.failure.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Refused);
    assert!(failure.message.contains("migration m1 could not run: no such database"));
    assert!(!failure.data_changed);
    assert_eq!(run.phase, Phase::Deferred);
}

// ---------------------------------------------------------------------------
// Transient faults after the database changed: retry in place
// ---------------------------------------------------------------------------

#[test]
fn transient_verify_fault_after_commit_keeps_phase_waits_then_retries_verify() {
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Verify(0));
    perform(
        &mut run,
        &Action::Verify(0),
        Observation::Verified(0, Err(Fault::transient("connection reset"))),
        t0(),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Verifying);
    assert!(run.failure.is_none(), "{:?}", run.failure);
    assert!(run.restore_decision.is_none());
    let retry = run.retry.clone().expect("retry");
    assert_eq!(retry.step, "verify m1");
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.next_at, at(30));
    assert!(retry.cause.contains("verify of m1 could not run: connection reset"));
    assert!(!retry.stalled);
    assert!(last_step(&run, "verify m1").detail.starts_with("transient: "));

    assert_eq!(next(&run, t0()), Action::Wait(at(30)));
    assert_eq!(next(&run, at(29)), Action::Wait(at(30)));
    assert_eq!(next(&run, at(30)), Action::Verify(0));
    assert_eq!(next(&run, at(31)), Action::Verify(0));

    // The retry succeeds: retry cleared, the run goes on and succeeds.
    perform_ok(&mut run, &Action::Verify(0), at(30));
    assert!(run.retry.is_none());
    let actions = play_ok(&mut run, at(30));
    assert!(!actions.iter().any(is_remediation), "{actions:?}");
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn transient_promote_fault_after_commit_keeps_phase_waits_then_retries_promote() {
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Promote);
    perform(
        &mut run,
        &Action::Promote,
        Observation::Promoted(Err(Fault::transient("push failed: timeout"))),
        t0(),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Promoting);
    assert!(run.failure.is_none());
    assert!(!run.promoted);
    let retry = run.retry.clone().expect("retry");
    assert_eq!(retry.step, "promote");
    assert_eq!(retry.next_at, at(30));
    assert_eq!(next(&run, at(10)), Action::Wait(at(30)));
    assert_eq!(next(&run, at(30)), Action::Promote);

    let actions = play_ok(&mut run, at(30));
    assert_eq!(
        performed(&actions),
        vec![
            Action::Promote,
            Action::Health,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert!(run.retry.is_none());
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn repeated_transient_faults_back_off_doubling_and_mark_stall_past_timeout_never_revert() {
    let policy = Policy {
        backoff: POLICY.backoff,
        timeout: secs(60),
    };
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Verify(0));
    let fail = |run: &mut RunRecord, now| {
        assert_eq!(next(run, now), Action::Verify(0));
        perform(
            run,
            &Action::Verify(0),
            Observation::Verified(0, Err(Fault::transient("connection refused"))),
            now,
            policy,
        );
        run.retry.clone().expect("retry")
    };
    let r1 = fail(&mut run, t0());
    assert_eq!((r1.attempts, r1.next_at, r1.stalled), (1, at(30), false));
    let r2 = fail(&mut run, at(30));
    assert_eq!((r2.attempts, r2.next_at, r2.stalled), (2, at(90), false));
    let r3 = fail(&mut run, at(90));
    assert_eq!((r3.attempts, r3.next_at, r3.stalled), (3, at(210), true));
    for r in [&r1, &r2, &r3] {
        assert_eq!(r.since, t0());
        assert_eq!(r.step, "verify m1");
    }
    assert_eq!(run.phase, Phase::Verifying);
    assert!(run.failure.is_none());
    assert_eq!(next(&run, at(209)), Action::Wait(at(210)));

    // Stalled is only a mark: the step is still retried and success clears it.
    let actions = drive(&mut run, at(210), policy, |_| false, |_, _| None);
    assert!(!actions.iter().any(is_remediation), "{actions:?}");
    assert!(run.retry.is_none());
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn stall_is_marked_exactly_when_the_fault_lasted_the_timeout() {
    let b = POLICY.backoff;
    let first = b.bump(None, "verify m1", "x", t0(), secs(60));
    assert!(!b.bump(Some(&first), "verify m1", "x", at(59), secs(60)).stalled);
    assert!(b.bump(Some(&first), "verify m1", "x", at(60), secs(60)).stalled);
}

#[test]
fn transient_fault_of_a_later_migration_after_an_earlier_commit_retries_instead_of_deferring() {
    let mut run = run_of(&["m1", "m2"]);
    play_until(&mut run, t0(), Action::Migrate(1));
    perform(
        &mut run,
        &Action::Migrate(1),
        Observation::Migrated(1, Err(Fault::transient("connection refused"))),
        t0(),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Migrating);
    assert!(run.failure.is_none());
    assert_eq!(run.retry.as_ref().map(|r| r.step.as_str()), Some("migrate m2"));
    assert_eq!(next(&run, at(1)), Action::Wait(at(30)));
    assert_eq!(next(&run, at(30)), Action::Migrate(1));
    play_ok(&mut run, at(30));
    assert_eq!(run.phase, Phase::Succeeded);
}

// ---------------------------------------------------------------------------
// Failures: remediation
// ---------------------------------------------------------------------------

#[test]
fn failure_inside_one_transaction_reverts_without_restore_and_ends_rolled_back() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(*i, Ok(rolled_back_in_transaction()))),
        _ => None,
    });
    let from = actions.iter().position(|a| *a == Action::Migrate(0)).unwrap();
    assert_eq!(
        &actions[from..],
        &[
            // apply() itself moves the run to Remediating (no Advance).
            Action::Migrate(0),
            Action::Revert,
            Action::PullRequest,
            Action::Advance(Phase::Unlocking),
            Action::Unlock,
            Action::Advance(Phase::RolledBack),
            Action::Report,
            Action::Done,
        ]
    );
    assert!(!actions.contains(&Action::Restore));
    assert_eq!(last_step(&run, "revert-branch").phase, Phase::Remediating);
    assert_eq!(last_step(&run, "pull-request").phase, Phase::Remediating);
    let failure = run.failure.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Failed);
    assert_eq!(failure.phase, Phase::Migrating);
    assert!(!failure.data_changed);
    assert!(failure
        .message
        .contains("migration m1 failed: relation \"t\" already exists"));
    let decision = run.restore_decision.clone().unwrap();
    assert!(decision.contains("zero data loss"), "{decision}");
    assert!(run.retry.is_none());
    assert!(run.restore.is_none());
    assert_eq!(
        run.revert.as_ref().unwrap().pull_request.as_deref(),
        Some("https://forge.example/pr/1")
    );
    assert_eq!(last_step(&run, "migrate m1").ok, Some(false));
    assert_eq!(run.phase, Phase::RolledBack);
    assert_eq!(end_of(&run), Phase::RolledBack);
}

/// A Job migration that timed out: it may have written anything.
fn timed_out_job(still_running: Option<&str>) -> MigrateOutcome {
    MigrateOutcome {
        transactional: false,
        statements_done: 0,
        statements_total: 0,
        error: Some("Job default/m1-run did not finish within 600s".into()),
        committed: true,
        duration_ms: 600_000,
        own_xids: Vec::new(),
        failed_at: None,
        still_running: still_running.map(str::to_string),
    }
}

#[test]
fn a_failed_migration_that_may_still_be_writing_is_never_restored_under_and_holds_for_a_person() {
    // Stopped: the usual remediation restores the checkpoint.
    let mut stopped = run_of(&["m1"]);
    let actions = play(&mut stopped, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(*i, Ok(timed_out_job(None)))),
        _ => None,
    });
    assert!(actions.contains(&Action::Restore));
    assert_eq!(stopped.phase, Phase::RolledBack);

    let mut live = run_of(&["m1"]);
    let actions = play(&mut live, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(
            *i,
            Ok(timed_out_job(Some(
                "Job default/m1-run did not end within 630s of being told to stop",
            ))),
        )),
        _ => None,
    });
    assert!(!actions.contains(&Action::Restore), "{actions:?}");
    assert!(live.restore.is_none());
    // The code change is still taken back, and the run holds for a person.
    assert!(actions.contains(&Action::Revert), "{actions:?}");
    assert_eq!(live.phase, Phase::Failed);
    assert!(live.awaits_person());
    assert!(
        live.restore_decision
            .as_deref()
            .unwrap()
            .contains("no restore: a migration may still be writing to the database (Job default/m1-run did not end"),
        "{:?}",
        live.restore_decision
    );
    assert!(
        live.remediation_errors[0].contains("Job default/m1-run did not end within 630s"),
        "{:?}",
        live.remediation_errors
    );
}

#[test]
fn a_migration_after_apply_that_may_still_be_writing_takes_the_gate_back_without_a_restore() {
    let mut run = Build::new(&["m1"]).order(Order::AfterApply).build();
    let still = "Job default/m1-run did not end within 630s of being told to stop";
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(*i, Ok(timed_out_job(Some(still))))),
        _ => None,
    });
    assert!(!actions.contains(&Action::Restore), "{actions:?}");
    assert!(
        actions.contains(&Action::RevertGate),
        "the promoted code comes off the gate: {actions:?}"
    );
    assert_eq!(run.phase, Phase::Failed);
    // What holds the restore back survives a save and a reload.
    let reloaded: RunRecord = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
    assert_eq!(reloaded.migrate_results[0].1.still_running.as_deref(), Some(still));
    let mut resumed = reloaded;
    resumed.phase = Phase::Remediating;
    resumed.restore = None;
    assert_ne!(
        next(&resumed, t0()),
        Action::Restore,
        "a resumed remediation does not restore either"
    );
}

#[test]
fn a_verify_failure_after_a_job_that_left_pods_running_holds_for_a_person_without_a_restore() {
    let mut run = run_of(&["m1"]);
    run.migrations[0].verify = Some("SELECT false".into());
    let still = "1 pod(s) of Job default/m1-run were still running 630s after it ended";
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(
            *i,
            Ok(MigrateOutcome {
                still_running: Some(still.into()),
                ..committed(0)
            }),
        )),
        Action::Verify(i) => Some(Observation::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: false,
                detail: "false".into(),
            }),
        )),
        _ => None,
    });
    assert!(!actions.contains(&Action::Restore), "{actions:?}");
    assert_eq!(run.phase, Phase::Failed, "not RolledBack: the data was not restored");
    assert!(run
        .restore_decision
        .as_deref()
        .unwrap()
        .starts_with("no restore: a migration may still be writing"));
    assert!(
        run.remediation_errors[0].contains(still),
        "{:?}",
        run.remediation_errors
    );
}

#[test]
fn a_job_that_was_refused_says_it_did_not_start_and_restores_nothing() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(
            *i,
            Ok(MigrateOutcome {
                transactional: false,
                committed: false,
                error: Some("creating Job default/m1-run was refused: forbidden".into()),
                ..committed(0)
            }),
        )),
        _ => None,
    });
    assert!(!actions.contains(&Action::Restore), "{actions:?}");
    assert!(
        run.restore_decision.as_deref().unwrap().contains("did not start"),
        "{:?}",
        run.restore_decision
    );
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn migration_failing_before_it_started_says_database_unchanged() {
    let mut run = run_of(&["m1"]);
    play(&mut run, t0(), |a, _| match a {
        Action::Migrate(i) => Some(Observation::Migrated(*i, Err(Fault::failed("bad SQL file")))),
        _ => None,
    });
    assert!(run.restore_decision.unwrap().contains("did not start"));
    assert!(run.restore.is_none());
    assert!(run.revert.is_some());
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn verify_failure_after_commit_restores_then_reverts_and_ends_rolled_back() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Verify(i) => Some(Observation::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: false,
                detail: "0 rows".into(),
            }),
        )),
        _ => None,
    });
    let from = actions.iter().position(|a| *a == Action::Verify(0)).unwrap();
    assert_eq!(
        performed(&actions[from..]),
        vec![
            Action::Verify(0),
            Action::Restore,
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert!(!actions.contains(&Action::Promote));
    let failure = run.failure.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Failed);
    assert_eq!(failure.phase, Phase::Verifying);
    assert!(failure.data_changed);
    assert!(failure.message.contains("verify of m1 failed: 0 rows"));
    assert!(run.restore_decision.clone().unwrap().starts_with("restore:"));
    assert!(run.restore.is_some());
    assert_eq!(last_step(&run, "restore").ok, Some(true));
    assert!(run.remediation_errors.is_empty());
    assert_eq!(run.phase, Phase::RolledBack);
}

/// A restore that kept `n` transactions of lost writes.
fn restored_keeping(n: usize) -> Observation {
    let Observation::Restored(Ok(mut rec)) = ok(&Action::Restore, &run_of(&["m1"])) else {
        unreachable!()
    };
    rec.lost_writes = Some(crate::capture::Captured::Kept(crate::capture::LostWrites {
        transactions: n,
        rows: Default::default(),
        first_commit: None,
        last_commit: None,
        own_left_out: 0,
        file: None,
        sequences_advanced: Some(1),
        sequences_not_moved: Vec::new(),
    }));
    Observation::Restored(Ok(rec))
}

fn failing_verify(a: &Action) -> Option<Observation> {
    match a {
        Action::Verify(i) => Some(Observation::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: false,
                detail: "0 rows".into(),
            }),
        )),
        _ => None,
    }
}

#[test]
fn a_run_asked_to_replay_puts_kept_writes_back_right_after_its_restore_and_only_then() {
    // Asked, and the restore kept writes: replay comes right after it.
    let mut run = run_of(&["m1"]);
    run.migrations[0].replay = crate::manifests::ReplayMode::Auto;
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Restore => Some(restored_keeping(3)),
        a => failing_verify(a),
    });
    let from = actions.iter().position(|a| *a == Action::Restore).unwrap();
    assert_eq!(
        performed(&actions[from..from + 3]),
        vec![Action::Restore, Action::ReplayLostWrites, Action::Revert]
    );
    assert_eq!(last_step(&run, "replay-lost-writes").ok, Some(true));
    assert!(run.lost_writes_replay.is_some());
    assert_eq!(run.phase, Phase::RolledBack);

    // A replay that stops at a conflict is reported, never retried, and
    // the run still ends rolled back (the writes stay in the file).
    let mut run = run_of(&["m1"]);
    run.migrations[0].replay = crate::manifests::ReplayMode::Auto;
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Restore => Some(restored_keeping(3)),
        Action::ReplayLostWrites => Some(Observation::ReplayedLostWrites(
            crate::capture::replay::AutoReplay::Replayed(crate::capture::replay::Replayed {
                stopped: Some((9, "duplicate key".into())),
                ..Default::default()
            }),
        )),
        a => failing_verify(a),
    });
    assert_eq!(actions.iter().filter(|a| **a == Action::ReplayLostWrites).count(), 1);
    assert_eq!(last_step(&run, "replay-lost-writes").ok, Some(false));
    assert!(run.remediation_errors.is_empty());
    assert_eq!(run.phase, Phase::RolledBack);

    // Not asked, or nothing kept: no replay.
    for (auto, kept) in [(false, 3), (true, 0)] {
        let mut run = run_of(&["m1"]);
        if auto {
            run.migrations[0].replay = crate::manifests::ReplayMode::Auto;
        }
        let actions = play(&mut run, t0(), |a, _| match a {
            Action::Restore => Some(restored_keeping(kept)),
            a => failing_verify(a),
        });
        assert!(!actions.contains(&Action::ReplayLostWrites), "auto {auto}, kept {kept}");
    }
}

#[test]
fn failed_restore_records_a_remediation_error_still_reverts_and_ends_failed() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Verify(i) => Some(Observation::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: false,
                detail: "0 rows".into(),
            }),
        )),
        Action::Restore => Some(Observation::Restored(Err(Fault::failed("archive missing")))),
        _ => None,
    });
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Restore).count(),
        1,
        "{actions:?}"
    );
    assert!(actions.contains(&Action::Revert));
    assert_eq!(
        run.remediation_errors,
        vec!["restore failed: archive missing".to_string()]
    );
    assert!(run.restore.is_none());
    assert_eq!(last_step(&run, "restore").ok, Some(false));
    assert_eq!(run.phase, Phase::Failed);
    assert_eq!(end_of(&run), Phase::Failed);
}

#[test]
fn committed_failure_without_checkpoint_asks_for_a_manual_restore_and_ends_failed() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Checkpoint => Some(Observation::Checkpointed(Ok(None))),
        Action::Verify(i) => Some(Observation::Verified(
            *i,
            Ok(VerifyOutcome {
                passed: false,
                detail: "0 rows".into(),
            }),
        )),
        _ => None,
    });
    assert!(!actions.contains(&Action::Restore), "{actions:?}");
    assert!(actions.contains(&Action::Revert));
    assert!(run.remediation_errors.iter().any(|e| e.contains("restore by hand")));
    assert!(run.restore_decision.unwrap().contains("no checkpoint"));
    assert_eq!(run.phase, Phase::Failed);
}

#[test]
fn health_failure_after_promotion_restores_reverts_gate_then_reverts() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Health => Some(Observation::Healthy(Err(Fault::transient("pods crash looping")))),
        _ => None,
    });
    let from = actions.iter().position(|a| *a == Action::Health).unwrap();
    assert_eq!(
        performed(&actions[from..]),
        vec![
            Action::Health,
            Action::Restore,
            Action::RevertGate,
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    let failure = run.failure.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Failed, "a health failure is never transient");
    assert_eq!(failure.phase, Phase::Promoting);
    assert!(failure.data_changed);
    assert!(failure
        .message
        .contains("health check after promotion failed: pods crash looping"));
    assert_eq!(run.gate_revert.as_deref(), Some("gaterevert00"));
    assert_eq!(last_step(&run, "gate-revert").ok, Some(true));
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn health_failure_when_promotion_left_gate_where_it_was_skips_gate_revert() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Promote => Some(Observation::Promoted(Ok((
            GATE_BEFORE.into(),
            "gate already there".into(),
        )))),
        Action::Health => Some(Observation::Healthy(Err(Fault::failed("readiness timeout")))),
        _ => None,
    });
    assert!(run.promoted);
    assert_eq!(run.promoted_to.as_deref(), Some(GATE_BEFORE));
    assert!(!actions.contains(&Action::RevertGate), "{actions:?}");
    let from = actions.iter().position(|a| *a == Action::Health).unwrap();
    assert_eq!(
        performed(&actions[from..]),
        vec![
            Action::Health,
            Action::Restore,
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert!(run.gate_revert.is_none());
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn permanent_gate_revert_failure_records_error_and_still_reverts_upstream() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Health => Some(Observation::Healthy(Err(Fault::failed("readiness timeout")))),
        Action::RevertGate => Some(Observation::GateReverted(Err(Fault::failed("gate protected")))),
        _ => None,
    });
    assert_eq!(
        actions.iter().filter(|a| **a == Action::RevertGate).count(),
        1,
        "{actions:?}"
    );
    assert!(actions.contains(&Action::Revert));
    assert_eq!(
        run.remediation_errors,
        vec!["reverting the gate failed: gate protected".to_string()]
    );
    assert_eq!(run.phase, Phase::Failed);
}

// ---------------------------------------------------------------------------
// Interrupted migrations
// ---------------------------------------------------------------------------

/// A run whose process died while `migrate <id of i>` ran: the step's intent
/// is in the record, its result is not.
fn interrupted_at_migrate(mut run: RunRecord, i: usize) -> RunRecord {
    play_until(&mut run, t0(), Action::Migrate(i));
    let name = Action::Migrate(i).step(&run).unwrap();
    begin(&mut run, &name, t0());
    run
}

#[test]
fn interrupted_migrate_step_asks_history_instead_of_running_again() {
    let run = interrupted_at_migrate(run_of(&["m1"]), 0);
    assert!(run.open_step("migrate m1"));
    assert_eq!(next(&run, at(60)), Action::Recover(0));
    assert_eq!(Action::Recover(0).step(&run).as_deref(), Some("migrate m1"));
}

#[test]
fn interrupted_migration_found_in_history_counts_as_applied_and_goes_on_to_verify() {
    let mut run = interrupted_at_migrate(run_of(&["m1"]), 0);
    perform(
        &mut run,
        &Action::Recover(0),
        Observation::Recovered(0, Ok(Recovered::Applied)),
        at(60),
        POLICY,
    );
    let (id, outcome) = run.migrate_results.last().cloned().unwrap();
    assert_eq!(id, "m1");
    assert!(outcome.committed && outcome.error.is_none());
    assert_eq!((outcome.statements_done, outcome.statements_total), (1, 1));
    assert!(outcome.transactional);
    assert_eq!(last_step(&run, "migrate m1").ok, Some(true));
    assert_eq!(next(&run, at(60)), Action::Advance(Phase::Verifying));

    let actions = play_ok(&mut run, at(60));
    assert!(!actions.iter().any(|a| matches!(a, Action::Migrate(_))), "{actions:?}");
    assert!(actions.contains(&Action::Verify(0)));
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn interrupted_transactional_migration_not_in_history_closes_the_open_step_and_runs_again() {
    // apply() alone, on the interrupted step itself.
    let mut run = interrupted_at_migrate(run_of(&["m1"]), 0);
    apply(
        &mut run,
        "migrate m1",
        Observation::Recovered(0, Ok(Recovered::NotApplied)),
        at(60),
        POLICY,
    );
    assert!(!run.open_step("migrate m1"));
    let step = last_step(&run, "migrate m1");
    assert_eq!(step.ok, Some(false));
    assert!(step.detail.contains("running it again"));
    assert!(run.failure.is_none());
    assert!(run.retry.is_none());
    assert!(run.migrate_results.is_empty());
    assert_eq!(next(&run, at(60)), Action::Migrate(0));

    let actions = play_ok(&mut run, at(60));
    assert!(!actions.iter().any(is_remediation), "{actions:?}");
    assert_eq!(run.phase, Phase::Succeeded);
    assert!(run.failure.is_none());
}

/// BUG (see the report): the executor records the intent of `Recover(i)` with
/// `begin("migrate <id>")` like every action, so the record holds two open
/// steps of that name; `close` only closes the newest, the interrupted one
/// stays open and `next` answers `Recover(i)` again, forever.
#[test]
fn interrupted_transactional_migration_not_in_history_runs_again_through_the_executor() {
    let mut run = interrupted_at_migrate(run_of(&["m1"]), 0);
    perform(
        &mut run,
        &Action::Recover(0),
        Observation::Recovered(0, Ok(Recovered::NotApplied)),
        at(60),
        POLICY,
    );
    assert!(run.failure.is_none());
    assert_eq!(next(&run, at(60)), Action::Migrate(0));
}

#[test]
fn interrupted_non_transactional_migration_not_in_history_fails_with_changed_data_and_restores() {
    let mut run = interrupted_at_migrate(Build::new(&["m1"]).non_transactional(0).build(), 0);
    assert_eq!(next(&run, at(60)), Action::Recover(0));
    perform(
        &mut run,
        &Action::Recover(0),
        Observation::Recovered(0, Ok(Recovered::NotApplied)),
        at(60),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Remediating);
    let failure = run.failure.clone().unwrap();
    assert_eq!(failure.kind, FailureKind::Failed);
    assert!(failure.data_changed);
    assert!(failure.message.contains("interrupted outside a transaction"));
    let (_, outcome) = run.migrate_results.last().cloned().unwrap();
    assert!(outcome.committed && !outcome.transactional && outcome.error.is_some());
    assert_eq!(next(&run, at(60)), Action::Restore);

    let actions = performed(&play_ok(&mut run, at(60)));
    assert_eq!(
        actions,
        vec![
            Action::Restore,
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn unreadable_history_retries_recover_after_the_backoff() {
    let mut run = interrupted_at_migrate(run_of(&["m1"]), 0);
    perform(
        &mut run,
        &Action::Recover(0),
        Observation::Recovered(0, Err(Fault::transient("connection refused"))),
        at(60),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Migrating);
    assert!(run.failure.is_none());
    assert_eq!(run.retry.as_ref().map(|r| r.next_at), Some(at(90)));
    assert_eq!(next(&run, at(60)), Action::Wait(at(90)));
    assert_eq!(next(&run, at(90)), Action::Recover(0));
}

// ---------------------------------------------------------------------------
// Reverts and pull requests
// ---------------------------------------------------------------------------

/// A run failed inside one transaction and now in Remediating, next: Revert.
fn remediating_without_restore(mode: RevertMode) -> RunRecord {
    let mut run = Build::new(&["m1"]).revert(mode).build();
    drive(
        &mut run,
        t0(),
        POLICY,
        |a| *a == Action::Revert,
        |a, _| match a {
            Action::Migrate(i) => Some(Observation::Migrated(*i, Ok(rolled_back_in_transaction()))),
            _ => None,
        },
    );
    assert_eq!(run.phase, Phase::Remediating);
    assert_eq!(next(&run, t0()), Action::Revert);
    run
}

#[test]
fn transient_revert_push_fault_retries_revert_after_the_backoff() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    perform(
        &mut run,
        &Action::Revert,
        Observation::Reverted(Err(Fault::transient("push timed out"))),
        t0(),
        POLICY,
    );
    assert_eq!(run.phase, Phase::Remediating);
    assert!(run.remediation_errors.is_empty());
    assert!(run.revert.is_none());
    let retry = run.retry.clone().unwrap();
    assert_eq!(retry.step, "revert-branch");
    assert_eq!(retry.next_at, at(30));
    assert_eq!(next(&run, at(29)), Action::Wait(at(30)));
    assert_eq!(next(&run, at(30)), Action::Revert);

    let actions = performed(&play_ok(&mut run, at(30)));
    assert_eq!(
        actions,
        vec![
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    assert!(run.retry.is_none());
    assert!(run.revert.is_some());
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn permanent_revert_failure_records_a_remediation_error_and_ends_failed() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Revert => Some(Observation::Reverted(Err(Fault::failed("branch protected")))),
        _ => None,
    });
    assert_eq!(
        performed(&actions),
        vec![Action::Revert, Action::Unlock, Action::Report, Action::Done]
    );
    assert_eq!(
        run.remediation_errors,
        vec!["revert failed: branch protected".to_string()]
    );
    assert!(run.revert.is_none());
    assert_eq!(last_step(&run, "revert-branch").ok, Some(false));
    assert_eq!(run.phase, Phase::Failed);
}

/// BUG (see the report): a permanent failure does not clear the retry left by
/// an earlier transient fault of the same step, so `step_failed_for_good` is
/// false and `next` asks for Revert again at once, forever.
#[test]
fn permanent_revert_failure_after_a_transient_retry_stops_retrying_and_ends_failed() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    perform(
        &mut run,
        &Action::Revert,
        Observation::Reverted(Err(Fault::transient("push timed out"))),
        t0(),
        POLICY,
    );
    let actions = play(&mut run, at(30), |a, _| match a {
        Action::Revert => Some(Observation::Reverted(Err(Fault::failed("branch protected")))),
        _ => None,
    });
    assert_eq!(
        performed(&actions),
        vec![Action::Revert, Action::Unlock, Action::Report, Action::Done]
    );
    assert_eq!(run.phase, Phase::Failed);
}

#[test]
fn pull_request_mode_opens_a_pull_request_after_the_revert() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    perform_ok(&mut run, &Action::Revert, t0());
    assert_eq!(last_step(&run, "revert-branch").ok, Some(true));
    assert_eq!(next(&run, t0()), Action::PullRequest);
    perform_ok(&mut run, &Action::PullRequest, t0());
    let revert = run.revert.clone().unwrap();
    assert_eq!(revert.pull_request.as_deref(), Some("https://forge.example/pr/1"));
    assert!(!revert.pr_pending);
    assert_eq!(last_step(&run, "pull-request").ok, Some(true));
    assert_eq!(next(&run, t0()), Action::Advance(Phase::Unlocking));
}

#[test]
fn pull_request_failure_marks_it_pending_and_does_not_block_the_end() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::PullRequest => Some(Observation::PullRequest(Err(Fault::transient("forge 502")))),
        _ => None,
    });
    assert_eq!(
        performed(&actions),
        vec![
            Action::Revert,
            Action::PullRequest,
            Action::Unlock,
            Action::Report,
            Action::Done
        ]
    );
    let revert = run.revert.clone().unwrap();
    assert!(revert.pr_pending);
    assert!(revert.pull_request.is_none());
    assert!(
        revert.note.contains("pull request pending: forge 502"),
        "{}",
        revert.note
    );
    assert_eq!(last_step(&run, "pull-request").ok, Some(false));
    assert!(run.remediation_errors.is_empty());
    assert!(run.retry.is_none());
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn pull_request_without_forge_notes_it_and_ends_rolled_back() {
    let mut run = remediating_without_restore(RevertMode::PullRequest);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::PullRequest => Some(Observation::PullRequest(Ok(None))),
        _ => None,
    });
    assert_eq!(actions.iter().filter(|a| **a == Action::PullRequest).count(), 1);
    let revert = run.revert.clone().unwrap();
    assert!(revert.note.contains("no forge configured"));
    assert!(!revert.pr_pending);
    assert_eq!(run.phase, Phase::RolledBack);
}

#[test]
fn commit_mode_reverts_on_upstream_without_a_pull_request() {
    let mut run = remediating_without_restore(RevertMode::Commit);
    assert_eq!(Action::Revert.step(&run).as_deref(), Some("revert-commit"));
    let actions = performed(&play_ok(&mut run, t0()));
    assert_eq!(
        actions,
        vec![Action::Revert, Action::Unlock, Action::Report, Action::Done]
    );
    assert_eq!(run.revert.as_ref().unwrap().mode, RevertMode::Commit);
    assert_eq!(last_step(&run, "revert-commit").ok, Some(true));
    assert_eq!(run.phase, Phase::RolledBack);
}

// ---------------------------------------------------------------------------
// Unlock, report, end
// ---------------------------------------------------------------------------

#[test]
fn failed_unlock_records_a_remediation_error_and_ends_failed() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Unlock => Some(Observation::Unlocked(Err(Fault::failed("lease gone")))),
        _ => None,
    });
    assert_eq!(actions.iter().filter(|a| **a == Action::Unlock).count(), 1);
    assert_eq!(run.remediation_errors, vec!["unlock failed: lease gone".to_string()]);
    assert_eq!(run.phase, Phase::Failed);
}

/// BUG (see the report): like Recover, a repeated `begin("unlock")` after an
/// interrupted unlock leaves the first step open, and `next` keeps asking for
/// Unlock.
#[test]
fn interrupted_unlock_is_done_once_more_then_the_run_ends() {
    let mut run = run_of(&["m1"]);
    play_until(&mut run, t0(), Action::Unlock);
    begin(&mut run, "unlock", t0()); // the process died here
    assert_eq!(next(&run, at(60)), Action::Unlock);
    perform_ok(&mut run, &Action::Unlock, at(60));
    assert_eq!(next(&run, at(60)), Action::Advance(Phase::Succeeded));
}

#[test]
fn report_failure_still_marks_the_report_written_and_ends_done() {
    let mut run = run_of(&["m1"]);
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Report => Some(Observation::Reported(Err("disk full".into()))),
        _ => None,
    });
    assert_eq!(actions.last(), Some(&Action::Done));
    assert!(run.report_written);
    assert_eq!(last_step(&run, "report").ok, Some(false));
    assert_eq!(run.phase, Phase::Succeeded);
}

#[test]
fn terminal_run_asks_for_its_report_once_then_is_done() {
    for end in [Phase::Succeeded, Phase::RolledBack, Phase::Failed, Phase::Deferred] {
        let mut run = run_of(&["m1"]);
        run.phase = end;
        assert_eq!(next(&run, t0()), Action::Report, "{end}");
        run.report_written = true;
        assert_eq!(next(&run, t0()), Action::Done, "{end}");
    }
}

#[test]
fn end_of_maps_failure_kind_data_change_and_remediation_errors_to_the_end_phase() {
    let failure = |kind, data_changed| Failure {
        phase: Phase::Migrating,
        message: "x".into(),
        data_changed,
        kind,
    };
    let mut run = run_of(&["m1"]);
    assert_eq!(end_of(&run), Phase::Succeeded);
    run.failure = Some(failure(FailureKind::Transient, false));
    assert_eq!(end_of(&run), Phase::Deferred);
    run.failure = Some(failure(FailureKind::Refused, false));
    assert_eq!(end_of(&run), Phase::Deferred);
    run.failure = Some(failure(FailureKind::Transient, true));
    assert_eq!(end_of(&run), Phase::RolledBack);
    run.failure = Some(failure(FailureKind::Failed, false));
    assert_eq!(end_of(&run), Phase::RolledBack);
    run.failure = Some(failure(FailureKind::Failed, true));
    assert_eq!(end_of(&run), Phase::RolledBack);
    run.remediation_errors.push("restore failed".into());
    assert_eq!(end_of(&run), Phase::Failed);
    run.failure = None;
    assert_eq!(end_of(&run), Phase::Failed);
}

#[test]
fn a_step_succeeding_clears_only_its_own_retry() {
    let mut run = run_of(&["m1"]);
    // Carried from a deferred attempt whose checkpoint hit a transient fault.
    run.retry = Some(
        POLICY
            .backoff
            .bump(None, "checkpoint", "backup API unreachable", t0(), POLICY.timeout),
    );
    run.retry.as_mut().unwrap().next_at = t0();
    let before = run.retry.clone();
    play_until(&mut run, t0(), Action::Checkpoint);
    assert_eq!(
        run.retry, before,
        "lock and plan succeeding leave the checkpoint's retry"
    );
    perform_ok(&mut run, &Action::Checkpoint, t0());
    assert!(run.retry.is_none());
}

#[test]
fn a_retry_carried_into_a_failing_attempt_counts_on_and_keeps_the_stall_clock() {
    let mut run = run_of(&["m1"]);
    let mut carried = POLICY.backoff.bump(None, "lock", "lease busy", t0(), POLICY.timeout);
    carried.next_at = at(600);
    run.retry = Some(carried);
    perform(
        &mut run,
        &Action::Lock,
        Observation::Locked(Err(Fault::transient("lease busy"))),
        at(600),
        POLICY,
    );
    let r = run.retry.clone().unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.since, t0());
    assert_eq!(r.next_at, at(660));
    assert!(r.stalled, "600 s since the first fault reaches the 600 s timeout");
}

#[test]
fn ending_succeeded_rolled_back_or_failed_drops_any_retry_but_deferred_keeps_it() {
    for (end, kept) in [
        (Phase::Succeeded, false),
        (Phase::RolledBack, false),
        (Phase::Failed, false),
        (Phase::Deferred, true),
    ] {
        let mut run = run_of(&["m1"]);
        run.phase = Phase::Unlocking;
        run.retry = Some(POLICY.backoff.bump(None, "lock", "lease busy", t0(), POLICY.timeout));
        advance(&mut run, end);
        assert_eq!(run.phase, end);
        assert_eq!(run.retry.is_some(), kept, "{end}");
    }
}

#[test]
fn remediating_without_a_failure_goes_straight_to_unlocking() {
    let mut run = run_of(&["m1"]);
    run.phase = Phase::Remediating;
    assert_eq!(next(&run, t0()), Action::Advance(Phase::Unlocking));
}

#[test]
fn a_retry_that_is_due_does_not_wait() {
    let mut run = run_of(&["m1"]);
    run.retry = Some(POLICY.backoff.bump(None, "lock", "lease busy", t0(), POLICY.timeout));
    assert_eq!(next(&run, at(29)), Action::Wait(at(30)));
    assert_eq!(next(&run, at(30)), Action::Advance(Phase::Locking));
}

// ---------------------------------------------------------------------------
// Step names and backoff
// ---------------------------------------------------------------------------

#[test]
fn actions_name_their_steps_and_bookkeeping_actions_record_none() {
    let run = run_of(&["m1", "m2"]);
    let name = |a: Action| a.step(&run);
    assert_eq!(name(Action::Lock).as_deref(), Some("lock"));
    assert_eq!(name(Action::Drill).as_deref(), Some("restore-drill"));
    assert_eq!(name(Action::RecoveryPoint).as_deref(), Some("recovery-point"));
    assert_eq!(name(Action::Migrate(1)).as_deref(), Some("migrate m2"));
    assert_eq!(name(Action::Recover(1)).as_deref(), Some("migrate m2"));
    assert_eq!(name(Action::Verify(0)).as_deref(), Some("verify m1"));
    assert_eq!(name(Action::RevertGate).as_deref(), Some("gate-revert"));
    assert_eq!(name(Action::Revert).as_deref(), Some("revert-branch"));
    assert_eq!(name(Action::PullRequest).as_deref(), Some("pull-request"));
    assert_eq!(name(Action::Advance(Phase::Locking)), None);
    assert_eq!(name(Action::Wait(t0())), None);
    assert_eq!(name(Action::Done), None);
    assert_eq!(revert_mode(&run), RevertMode::PullRequest);
}

#[test]
fn backoff_delay_doubles_per_attempt_and_caps_at_max() {
    let b = Backoff {
        base: secs(30),
        max: secs(600),
    };
    assert_eq!(b.delay(0), secs(30));
    assert_eq!(b.delay(1), secs(30));
    assert_eq!(b.delay(2), secs(60));
    assert_eq!(b.delay(3), secs(120));
    assert_eq!(b.delay(4), secs(240));
    assert_eq!(b.delay(5), secs(480));
    assert_eq!(b.delay(6), secs(600));
    assert_eq!(b.delay(7), secs(600));
    assert_eq!(b.delay(u32::MAX), secs(600));
    assert_eq!(Backoff::default(), b);
}

#[test]
fn backoff_bump_counts_attempts_keeps_since_and_schedules_next() {
    let b = Backoff::default();
    let r1 = b.bump(None, "promote", "push failed", t0(), secs(600));
    assert_eq!(r1.attempts, 1);
    assert_eq!(r1.since, t0());
    assert_eq!(r1.next_at, at(30));
    assert_eq!((r1.step.as_str(), r1.cause.as_str()), ("promote", "push failed"));
    let r2 = b.bump(Some(&r1), "promote", "push failed again", at(30), secs(600));
    assert_eq!(r2.attempts, 2);
    assert_eq!(r2.since, t0());
    assert_eq!(r2.next_at, at(90));
    assert_eq!(r2.cause, "push failed again");
    assert!(!r2.stalled);
}

#[test]
fn a_failed_restore_drill_is_recorded_as_failed_and_the_run_defers_without_migrating() {
    let mut run = Build::new(&["m1"]).needs_drill().build();
    let actions = play(&mut run, t0(), |a, _| match a {
        Action::Drill => Some(Observation::Drilled(Err(Fault::transient("the copy did not start")))),
        _ => None,
    });
    let actions = [actions, play_ok(&mut run, at(1))].concat();
    assert!(!actions.iter().any(|a| matches!(a, Action::Migrate(_))), "{actions:?}");
    assert!(!actions.iter().any(is_remediation), "{actions:?}");
    let checkpoint = run.checkpoint.as_ref().unwrap();
    assert_eq!(checkpoint.drill, crate::checkpoint::DrillVerdict::Failed);
    assert_eq!(checkpoint.restore_drill, "failed: the copy did not start");
    assert_eq!(run.phase, Phase::Deferred);
}

#[test]
fn a_checkpoint_recorded_before_the_drill_verdict_existed_reads_as_not_drilled() {
    let old = r#"{"backend":"local","location":"/b","database":"app","started_at":"2026-01-01T00:00:00Z",
        "completed_at":"2026-01-01T00:00:00Z","size_bytes":0,"restore_drill":"passed: it answered"}"#;
    let record: CheckpointRecord = serde_json::from_str(old).unwrap();
    assert_eq!(record.drill, crate::checkpoint::DrillVerdict::NotRun);
}

#[test]
fn a_scheduled_retry_follows_a_lowered_backoff_and_never_a_raised_one() {
    let backoff = |base: u64| Backoff {
        base: std::time::Duration::from_secs(base),
        max: std::time::Duration::from_secs(600),
    };
    let timeout = std::time::Duration::from_secs(600);
    // The second fault, seen at 30 s under a 30 s backoff: due at 90 s.
    let first = backoff(30).bump(None, "promote", "locked", t0(), timeout);
    let r = backoff(30).bump(Some(&first), "promote", "locked", at(30), timeout);
    assert_eq!((r.next_at, r.failed_at), (at(90), Some(at(30))));
    assert_eq!(r.due(&backoff(30)), at(90));
    assert_eq!(r.due(&backoff(0)), at(30), "retried at once");
    assert_eq!(r.due(&backoff(10)), at(50), "10 s doubled once, from the last fault");
    assert_eq!(r.due(&backoff(300)), at(90), "a raised backoff does not lengthen it");
    // A record written before `failed_at` was kept waits as scheduled.
    let old = Retry { failed_at: None, ..r };
    assert_eq!(old.due(&backoff(0)), at(90));
}
