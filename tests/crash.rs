//! Crash safety: the process is ended abruptly at every phase boundary of a
//! run (test switch `BACKSTOP_TEST_CRASH_AT`), then rerun on the same state.
//! The run finishes correctly with exactly one checkpoint, at most one restore
//! and at most one revert.

mod common;

use common::*;

const CRASH_EXIT: i32 = 86;

fn passing() -> CarrierBuilder {
    carrier("0002-note")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;")
        .verify("SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'note'")
}

async fn crash_then_resume(phase: &str, fails: bool) {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    let migration = if fails { failing_backfill("") } else { passing() };
    let c2 = f.commit_carrier(&migration, "second migration");
    let crashed = f
        .run_env(&["--revert", "commit"], &[("BACKSTOP_TEST_CRASH_AT", phase)])
        .await;
    assert_eq!(
        crashed.status.code(),
        Some(CRASH_EXIT),
        "expected a crash at {phase}: {}",
        text(&crashed)
    );
    let resumed = f.run(&["--revert", "commit"]).await;
    let out = text(&resumed);
    assert!(out.contains("resuming run"), "{out}");
    assert_eq!(f.journal_len(), 2, "one run per migration, no duplicate run");
    assert_eq!(f.checkpoints(), 2, "exactly one checkpoint for the crashed run");
    let report = f.reports().pop().unwrap();
    let steps = |name: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == name)
            .count()
    };
    assert_eq!(steps("checkpoint"), 1, "one checkpoint step: {report}");
    assert_eq!(steps("restore"), usize::from(fails), "restore steps: {report}");
    assert_eq!(steps("revert-commit"), usize::from(fails), "revert steps: {report}");
    assert_eq!(steps("promote"), usize::from(!fails), "promote steps: {report}");
    if fails {
        assert_eq!(resumed.status.code(), Some(1), "{out}");
        assert_eq!(report["outcome"], "RolledBack", "{report}");
        assert_eq!(f.kept_data_dirs(), 1, "exactly one restore");
        assert_eq!(f.revert_commits("main"), 1, "exactly one revert");
        assert_eq!(f.gate(), c1);
        assert_eq!(f.schema().await, schema);
        assert_eq!(f.count("SELECT count(*) FROM orders").await, 3);
    } else {
        assert_eq!(resumed.status.code(), Some(0), "{out}");
        assert_eq!(report["outcome"], "Succeeded", "{report}");
        assert_eq!(f.kept_data_dirs(), 0);
        assert_eq!(f.revert_commits("main"), 0);
        assert_eq!(f.gate(), c2);
        assert_eq!(
            f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-note'")
                .await,
            1
        );
    }
    // A further pass has nothing left to do.
    let again = f.run(&["--revert", "commit"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(f.journal_len(), 2);
}

macro_rules! crash_tests {
    ($($name:ident: $phase:literal, $fails:literal;)*) => {$(
        #[tokio::test]
        async fn $name() {
            crash_then_resume($phase, $fails).await;
        }
    )*};
}

crash_tests! {
    success_resumes_after_crash_at_pending: "Pending", false;
    success_resumes_after_crash_at_locking: "Locking", false;
    success_resumes_after_crash_at_planning: "Planning", false;
    success_resumes_after_crash_at_checkpointing: "Checkpointing", false;
    success_resumes_after_crash_at_migrating: "Migrating", false;
    success_resumes_after_crash_at_verifying: "Verifying", false;
    success_resumes_after_crash_at_promoting: "Promoting", false;
    success_resumes_after_crash_at_unlocking: "Unlocking", false;
    success_resumes_after_crash_at_succeeded: "Succeeded", false;
    rollback_resumes_after_crash_at_migrating: "Migrating", true;
    rollback_resumes_after_crash_at_verifying: "Verifying", true;
    rollback_resumes_after_crash_at_remediating: "Remediating", true;
    rollback_resumes_after_crash_at_unlocking: "Unlocking", true;
    rollback_resumes_after_crash_at_rolled_back: "RolledBack", true;
}
