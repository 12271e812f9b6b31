//! Transient faults never revert a developer's commit: the advisory lock held
//! by another session past the timeout, the database down before anything
//! ran, the remote refusing the gate push at promotion. Each time: no revert,
//! no restore, the gate unchanged, `status` says what it waits for, and the
//! next pass (fault gone) succeeds.

mod common;

use common::*;

/// backstop's advisory lock key ("backstop" in ASCII).
const LOCK_KEY: i64 = 0x6261_636b_7374_6f70;

fn note_column() -> CarrierBuilder {
    carrier("0002-note")
        .annotation("timeout", "3s")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;")
        .verify("SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'note'")
}

#[tokio::test]
async fn advisory_lock_held_past_the_timeout_defers_without_revert_and_retries() {
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&note_column(), "add note");
    let holder = f.client().await;
    holder
        .query_one("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a transient fault is not a failure: {}",
        text(&out)
    );
    assert!(text(&out).contains("migration lock"), "{}", text(&out));
    assert_eq!(f.gate(), c1, "gate unchanged");
    f.assert_nothing_reverted();
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'")
            .await,
        0
    );
    let s = f.status();
    assert_eq!(s["runs"][1]["outcome"], "Deferred", "{s}");
    assert_eq!(s["runs"][1]["failure"]["kind"], "Transient", "{s}");
    let waiting = &s["gates"][0]["waiting"];
    assert_eq!(waiting["kind"], "retrying", "{s}");
    assert!(waiting["cause"].as_str().unwrap().contains("migration lock"), "{s}");
    assert!(waiting["next_at"].is_string(), "{s}");

    // The lock is released: the next pass runs the migration.
    holder
        .query_one("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2, "gate moved once the fault was gone");
    f.assert_nothing_reverted();
    let s = f.status();
    assert!(s["gates"][0]["waiting"].is_null(), "{s}");
    assert_eq!(s["runs"][2]["outcome"], "Succeeded", "{s}");
    // The retry knew it was one: the attempt count carried over.
    assert_eq!(s["runs"][2]["retry"], serde_json::Value::Null, "{s}");
}

#[tokio::test]
async fn a_deferred_run_waits_its_backoff_before_the_next_attempt() {
    let (f, c1) = with_orders().await;
    f.commit_carrier(&note_column(), "add note");
    let holder = f.client().await;
    holder
        .query_one("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "3600"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    holder
        .query_one("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "3600"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("next try at"), "{}", text(&out));
    assert_eq!(f.gate(), c1, "still waiting for the retry time");
    assert_eq!(f.journal_len(), 2, "no new run before the retry time");
}

#[tokio::test]
async fn database_down_before_anything_ran_waits_without_revert_and_retries() {
    let (mut f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&note_column(), "add note");
    f.server.stop().await.unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1, "gate unchanged");
    assert_eq!(f.revert_commits("main"), 0, "no revert on main");
    let s = f.status();
    let waiting = &s["gates"][0]["waiting"];
    assert_eq!(waiting["kind"], "retrying", "{s}");
    assert!(waiting["cause"].as_str().unwrap().contains("0002-note"), "{s}");
    assert_eq!(s["runs"].as_array().unwrap().len(), 1, "no run started: {s}");

    f.server.restart().await.unwrap();
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2);
    f.assert_nothing_reverted();
}

/// Makes the remote refuse pushes to the gate while `flag` exists.
fn refuse_gate_pushes(f: &Fixture, flag: &std::path::Path) {
    let hook = f.remote.path().join("hooks").join("pre-receive");
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nwhile read old new ref; do\n  if [ \"$ref\" = refs/heads/{GATE} ] && [ -e {} ]; then echo 'gate is frozen' >&2; exit 1; fi\ndone\nexit 0\n",
            flag.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn remote_refusing_the_gate_push_at_promotion_retries_without_restore_or_revert() {
    const TOKEN: &str = "t0ken";
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&note_column(), "add note");
    let flag = f.dir.path().join("frozen");
    std::fs::write(&flag, "").unwrap();
    refuse_gate_pushes(&f, &flag);
    // Over smart HTTP, where the remote runs its hooks.
    let server = common::http::git_server(f.dir.path().to_path_buf(), "x-access-token", TOKEN).await;
    let url = format!("{}/sre.git", server.url());
    let flags = [
        "--git-token-env",
        "GIT_TOKEN",
        "--revert",
        "commit",
        "--retry-backoff",
        "0",
    ];
    let env = [("GIT_TOKEN", TOKEN)];
    let out = f.run_url(&url, &flags, &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("pre-receive hook declined"), "{}", text(&out));
    assert_eq!(f.gate(), c1, "the remote refused the gate push");
    f.assert_nothing_reverted();
    // The migration stays applied and verified: the run waits in Promoting.
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-note' AND success")
            .await,
        1
    );
    let s = f.status();
    assert_eq!(s["runs"][1]["phase"], "Promoting", "{s}");
    assert_eq!(s["gates"][0]["waiting"]["step"], "promote", "{s}");

    std::fs::remove_file(&flag).unwrap();
    let out = f.run_url(&url, &flags, &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("resuming run"), "{}", text(&out));
    assert_eq!(f.gate(), c2, "promoted once the remote accepted");
    f.assert_nothing_reverted();
    assert_eq!(f.journal_len(), 2, "the same run finished; no second run");
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-note'")
            .await,
        1,
        "migrated exactly once"
    );
}
