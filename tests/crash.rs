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
    // Before the first intent (local mode: the checkpoint's, written once
    // the run is in Checkpointing) the run has no record and nothing was
    // done: the next pass plans the commit afresh.
    let unrecorded = matches!(phase, "Pending" | "Locking" | "Planning" | "Checkpointing");
    assert_eq!(
        f.journal_len(),
        if unrecorded { 1 } else { 2 },
        "records after a crash at {phase}"
    );
    let resumed = f.run(&["--revert", "commit"]).await;
    let out = text(&resumed);
    assert_eq!(out.contains("resuming run"), !unrecorded, "{out}");
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
    success_starts_afresh_after_crash_at_pending: "Pending", false;
    success_starts_afresh_after_crash_at_locking: "Locking", false;
    success_starts_afresh_after_crash_at_planning: "Planning", false;
    success_starts_afresh_after_crash_at_checkpointing: "Checkpointing", false;
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

#[tokio::test]
async fn lock_files_a_killed_process_left_in_the_mirror_are_removed_and_the_next_pass_runs() {
    // SIGKILL while libgit2 updates a ref leaves `<ref>.lock`: every later
    // fetch of that ref would fail until a person deleted it. The state's
    // lock admits one process, so the next one removes them.
    let (f, _) = with_orders().await;
    let mirror = f.state().join("git").join("mirror.git");
    let left = [
        mirror.join("refs/remotes/origin/main.lock"),
        mirror.join(format!("refs/remotes/origin/{GATE}.lock")),
        mirror.join("packed-refs.lock"),
    ];
    for lock in &left {
        std::fs::write(lock, "").unwrap();
    }
    let c2 = f.commit_carrier(&passing(), "add note");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("removed a lock file a killed process left"),
        "{}",
        text(&out)
    );
    assert_eq!(f.gate(), c2);
    for lock in &left {
        assert!(!lock.exists(), "{} is gone", lock.display());
    }
}

#[tokio::test]
async fn a_lock_a_killed_push_left_in_a_local_remote_makes_the_run_wait_without_revert_until_removed() {
    // The remote is not backstop's: a lock there may be anyone's, so the run
    // waits (naming the file) and nothing is reverted; once a person removes
    // it, the next pass promotes.
    let (f, _) = with_orders().await;
    let lock = f.remote.path().join(format!("refs/heads/{GATE}.lock"));
    std::fs::write(&lock, "").unwrap();
    let c2 = f.commit_carrier(&passing(), "add note");
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(&format!("{GATE}.lock")), "{}", text(&out));
    assert!(text(&out).contains("nothing was reverted"), "{}", text(&out));
    assert_ne!(f.gate(), c2);
    f.assert_nothing_reverted();
    std::fs::remove_file(&lock).unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2, "{}", text(&out));
    assert_eq!(f.reports().last().unwrap()["outcome"], "Succeeded");
}

#[tokio::test]
async fn a_wait_an_earlier_process_scheduled_follows_a_lowered_retry_backoff() {
    // A push that meets a lock schedules its retry with the backoff then in
    // force (30 s by default). Once a person removes the lock, a rerun with
    // the same backoff still waits it out; one with `--retry-backoff 0`
    // retries at once instead of waiting for the old schedule.
    let (f, _) = with_orders().await;
    let lock = f.remote.path().join(format!("refs/heads/{GATE}.lock"));
    std::fs::write(&lock, "").unwrap();
    let c2 = f.commit_carrier(&passing(), "add note");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_ne!(f.gate(), c2);
    std::fs::remove_file(&lock).unwrap();
    let out = f.run(&["--revert", "commit"]).await;
    assert_ne!(
        f.gate(),
        c2,
        "the 30 s the first attempt scheduled are waited out: {}",
        text(&out)
    );
    f.assert_nothing_reverted();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2, "{}", text(&out));
    assert_eq!(f.reports().last().unwrap()["outcome"], "Succeeded");
    f.assert_nothing_reverted();
}

#[tokio::test]
async fn a_server_whose_shutdown_ends_while_the_restore_stops_it_is_restored_not_failed() {
    // An attempt killed while the server shut down leaves that shutdown
    // going: it can end between the restore's look at the server and its
    // `pg_ctl stop`, which then finds no PID file. A stopped server is what
    // the restore wanted, so it goes on (this once ended `Failed`, holding
    // for a person, in the kill soak).
    let (f, _) = with_orders().await;
    let schema = f.schema().await;
    f.commit_carrier(&failing_backfill(""), "backfill");
    let go = f.dir.path().join("go");
    let mut child = f.spawn_run(
        &f.state(),
        &["--revert", "commit"],
        &[
            ("BACKSTOP_TEST_PAUSE_AT", "server-stop-looked"),
            ("BACKSTOP_TEST_PAUSE_UNTIL", go.to_str().unwrap()),
        ],
    );
    // stderr is read to its end (a closed pipe would end the process).
    let stderr = child.stderr.take().unwrap();
    let (paused, mut at_pause) = tokio::sync::mpsc::channel(1);
    let log = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut seen = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("test pause at server-stop-looked") {
                let _ = paused.send(()).await;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    tokio::time::timeout(std::time::Duration::from_secs(120), at_pause.recv())
        .await
        .expect("the restore paused before stopping the server");
    let pid_file = f.server.data_dir().join("postmaster.pid");
    let pid_text = std::fs::read_to_string(&pid_file).unwrap();
    let pid = pid_text.lines().next().unwrap().trim().to_string();
    let asked = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(asked.success());
    while pid_file.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    std::fs::write(&go, "").unwrap();
    let status = child.wait().await.unwrap();
    let log = log.await.unwrap();
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{log}\n{report}");
    assert_eq!(status.code(), Some(1));
    assert_eq!(f.schema().await, schema);
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 3);
}

#[tokio::test]
async fn the_gate_does_not_move_when_the_promote_intent_cannot_be_written() {
    // The gate move's invariant check reads while its intent is written;
    // the push waits for the write. A write that fails (test switch
    // `BACKSTOP_TEST_FAIL_SAVE`, as a full disk would) leaves the gate where
    // it was and the run open, and the next pass promotes it.
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&passing(), "second migration");
    let failed = f
        .run_env(&["--revert", "commit"], &[("BACKSTOP_TEST_FAIL_SAVE", "promote")])
        .await;
    let out = text(&failed);
    assert_eq!(
        failed.status.code(),
        Some(3),
        "a journal that cannot be written needs a person: {out}"
    );
    assert!(out.contains("write the journal"), "{out}");
    assert_eq!(f.gate(), c1, "the gate stays without its move's intent on disk");
    let resumed = f.run(&["--revert", "commit"]).await;
    let out = text(&resumed);
    assert_eq!(resumed.status.code(), Some(0), "{out}");
    assert!(out.contains("resuming run"), "{out}");
    assert_eq!(f.gate(), c2);
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-note'")
            .await,
        1
    );
}
