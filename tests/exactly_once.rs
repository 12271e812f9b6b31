//! Exactly once under real crashes and concurrent instances (issue 10): a real
//! `backstop` process is killed with SIGKILL at moments chosen by watching the
//! database (`pg_stat_activity`), the remote's hooks or the process's own
//! output, and two real processes run at once on one database. Afterwards a
//! migration is applied exactly once, a good migration is never reverted, a
//! restored server that may have taken writes is never restored over, and
//! git and the database agree.

mod common;

use std::path::Path;

use common::*;

/// Active sessions of backstop runs whose query matches `like`.
async fn run_sessions(f: &Fixture, like: &str) -> i64 {
    f.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backstop run %' AND state = 'active' AND query ILIKE $1",
            &[&like],
        )
        .await
        .unwrap()
        .get(0)
}

/// Starts `backstop run --once` and kills it with SIGKILL once one of its
/// sessions runs a query matching `like` (watched in `pg_stat_activity`).
async fn kill_when_running(f: &Fixture, like: &str, what: &str) {
    let child = f.spawn_run(&f.state(), &["--revert", "commit"], &[]);
    wait_until(what, || async { run_sessions(f, like).await == 1 }).await;
    kill9(child).await;
}

/// SIGKILL, and reap.
async fn history_rows(f: &Fixture, id: &str) -> i64 {
    f.count(&format!(
        "SELECT count(*) FROM backstop.migration_history WHERE id = '{id}' AND success"
    ))
    .await
}

fn slow_migration(id: &str, sql: &str) -> CarrierBuilder {
    carrier(id)
        .sql("001.sql", sql)
        .verify("SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'note'")
}

/// A migration whose COMMIT takes 4 s (a deferred constraint trigger sleeps).
fn slow_commit() -> CarrierBuilder {
    slow_migration(
        "0002-note",
        "ALTER TABLE orders ADD COLUMN note text;
CREATE TABLE slow_commit (id int);
CREATE FUNCTION slow_commit_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(4); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit_check AFTER INSERT ON slow_commit DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_check();
INSERT INTO slow_commit VALUES (1);",
    )
}

/// A good migration whose first statement takes 4 s.
fn slow_statement() -> CarrierBuilder {
    slow_migration(
        "0002-note",
        "SELECT pg_sleep(4);\nALTER TABLE orders ADD COLUMN note text;",
    )
}

async fn assert_applied_once_and_promoted(f: &Fixture, out: &std::process::Output, c2: &str) {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
    assert_eq!(f.gate(), c2, "promoted: {}", text(out));
    assert_eq!(history_rows(f, "0002-note").await, 1, "applied exactly once");
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'")
            .await,
        1
    );
    f.assert_nothing_reverted();
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "Succeeded", "{report}");
}

#[tokio::test]
async fn killed_during_commit_and_rerun_at_once_applies_the_migration_once_without_revert() {
    let (f, _) = with_orders().await;
    let c2 = f.commit_carrier(&slow_commit(), "note column, slow commit");
    kill_when_running(&f, "COMMIT", "the migration's COMMIT").await;
    // Rerun while the killed process's COMMIT is still running on the server.
    let out = f.run(&["--revert", "commit"]).await;
    assert!(text(&out).contains("resuming run"), "{}", text(&out));
    assert_applied_once_and_promoted(&f, &out, &c2).await;
}

#[tokio::test]
async fn killed_during_commit_that_then_lands_is_found_applied_not_reverted() {
    let (f, _) = with_orders().await;
    let c2 = f.commit_carrier(&slow_commit(), "note column, slow commit");
    kill_when_running(&f, "COMMIT", "the migration's COMMIT").await;
    // The server finishes the COMMIT of the dead client.
    wait_until("the orphaned COMMIT to land", || async {
        run_sessions(&f, "%").await == 0 && history_rows(&f, "0002-note").await == 1
    })
    .await;
    let out = f.run(&["--revert", "commit"]).await;
    assert!(
        text(&out).contains("resumed after interruption: found in history") || {
            let r = f.reports().pop().unwrap();
            r.to_string().contains("found in history")
        },
        "{}",
        text(&out)
    );
    assert_applied_once_and_promoted(&f, &out, &c2).await;
}

#[tokio::test]
async fn killed_mid_migration_of_a_good_migration_reruns_it_instead_of_reverting() {
    let (f, _) = with_orders().await;
    let c2 = f.commit_carrier(&slow_statement(), "note column after a slow statement");
    kill_when_running(&f, "%pg_sleep%", "the slow statement").await;
    let out = f.run(&["--revert", "commit"]).await;
    assert_applied_once_and_promoted(&f, &out, &c2).await;
}

/// Two processes at once, on one state directory or on two: exactly one
/// migration, no restore, no revert; the second is told who is busy.
async fn two_instances(shared_state: bool, staggered: bool) {
    let (f, _) = with_orders().await;
    let c2 = f.commit_carrier(&slow_statement(), "note column after a slow statement");
    let other_state = f.dir.path().join(if shared_state { "state" } else { "state-b" });
    let a = f.spawn_run(&f.state(), &["--revert", "commit"], &[]);
    if staggered {
        wait_until("the first instance's migration", || async {
            run_sessions(&f, "%pg_sleep%").await == 1
        })
        .await;
    }
    let b = f.spawn_run(&other_state, &["--revert", "commit"], &[]);
    let (a, b) = (a.wait_with_output().await.unwrap(), b.wait_with_output().await.unwrap());
    let codes = [a.status.code(), b.status.code()];
    let all = format!("first:\n{}\nsecond:\n{}", text(&a), text(&b));
    assert!(codes.iter().all(|c| *c == Some(0) || *c == Some(4)), "{codes:?}\n{all}");
    if staggered {
        assert_eq!(codes[1], Some(4), "the second instance is told it is busy:\n{all}");
        let expected = if shared_state {
            "another backstop process (pid"
        } else {
            "is owned by another backstop instance"
        };
        assert!(text(&b).contains(expected), "{all}");
    }
    assert_eq!(history_rows(&f, "0002-note").await, 1, "exactly one migration:\n{all}");
    f.assert_nothing_reverted();
    // Whoever was busy catches up: nothing left to run.
    for state in [f.state(), other_state] {
        let out = f
            .command(
                &state,
                &f.server.data_dir(),
                &f.server.archive(),
                &["--revert", "commit"],
                &[],
            )
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    assert_eq!(f.gate(), c2);
    assert_eq!(history_rows(&f, "0002-note").await, 1);
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.run_owner").await,
        0,
        "no claim left behind"
    );
    f.assert_nothing_reverted();
}

#[tokio::test]
async fn a_second_process_on_the_same_state_is_refused_while_the_first_migrates() {
    two_instances(true, true).await;
}

#[tokio::test]
async fn a_second_instance_on_another_state_waits_while_the_first_owns_the_database() {
    two_instances(false, true).await;
}

#[tokio::test]
async fn two_processes_started_together_on_one_state_migrate_once() {
    two_instances(true, false).await;
}

#[tokio::test]
async fn two_instances_started_together_on_two_states_migrate_once() {
    two_instances(false, false).await;
}

#[tokio::test]
async fn killed_after_the_restored_server_was_promoted_keeps_its_writes() {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    f.commit_carrier(&failing_backfill(""), "backfill that fails verify");
    let mut child = f.spawn_run(
        &f.state(),
        &["--revert", "commit"],
        &[("BACKSTOP_TEST_PAUSE_AT", "restored-server-promoted")],
    );
    wait_for_line(&mut child, "test pause at restored-server-promoted").await;
    let in_recovery: bool = f
        .client()
        .await
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery, "the restored server is promoted");
    // The application writes to the restored server, then backstop dies.
    f.client()
        .await
        .batch_execute("INSERT INTO orders (customer, qty) VALUES ('after-restore', 9)")
        .await
        .unwrap();
    kill9(child).await;

    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'after-restore'")
            .await,
        1,
        "the write to the promoted server survives the resumed restore"
    );
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 4);
    assert_eq!(f.schema().await, schema, "the migration is rolled back");
    assert_eq!(f.kept_data_dirs(), 1, "one restore, not two");
    assert_eq!(f.revert_commits("main"), 1, "one revert");
    assert_eq!(f.gate(), c1);
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{report}");
}

/// Installs `hook` (post-receive or pre-receive) on the remote: for a pushed
/// ref matching `refs`, it touches `<dir>/started`, sleeps 3 s, then touches
/// `<dir>/done`; while `<dir>/refuse` exists it refuses instead.
fn install_hook(f: &Fixture, hook: &str, refs: &str, dir: &Path) {
    let path = f.remote.path().join("hooks").join(hook);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nwhile read old new ref; do\n  case \"$ref\" in {refs})\n    if [ -e {d}/refuse ]; then echo 'remote is down for pushes' >&2; exit 1; fi\n    touch {d}/started; sleep 3; touch {d}/done;;\n  esac\ndone\nexit 0\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

const TOKEN: &str = "t0ken";

async fn wait_file(path: &Path) {
    let p = path.to_path_buf();
    wait_until(&format!("{}", p.display()), || {
        let p = p.clone();
        async move { p.exists() }
    })
    .await;
}

/// Serves the remote over smart HTTP with a post-receive hook on `refs`,
/// runs backstop there and kills it with SIGKILL while the remote is in the
/// hook (the push accepted, backstop not yet told); returns once the hook
/// has finished. The server and its URL are for the rerun.
async fn kill_during_push(
    f: &Fixture,
    refs: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> (common::http::Server, String) {
    let hooks = f.dir.path().join("hook");
    std::fs::create_dir_all(&hooks).unwrap();
    install_hook(f, "post-receive", refs, &hooks);
    let server = common::http::git_server(f.dir.path().to_path_buf(), "x-access-token", TOKEN).await;
    let url = format!("{}/sre.git", server.url());
    let child = f
        .url_command(&url, flags, env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&hooks.join("started")).await;
    kill9(child).await;
    wait_file(&hooks.join("done")).await;
    (server, url)
}

#[tokio::test]
async fn killed_during_the_gate_push_that_the_remote_accepted_promotes_once_without_revert() {
    let (f, _) = with_orders().await;
    let c2 = f.commit_carrier(
        &slow_migration("0002-note", "ALTER TABLE orders ADD COLUMN note text;"),
        "note",
    );
    let flags = ["--git-token-env", "GIT_TOKEN", "--revert", "commit"];
    let env = [("GIT_TOKEN", TOKEN)];
    let (_server, url) = kill_during_push(&f, &format!("refs/heads/{GATE}"), &flags, &env).await;
    assert_eq!(f.gate(), c2, "the remote took the push before backstop died");

    let out = f.run_url(&url, &flags, &env).await;
    assert!(text(&out).contains("resuming run"), "{}", text(&out));
    assert_applied_once_and_promoted(&f, &out, &c2).await;
}

#[tokio::test]
async fn killed_during_the_revert_branch_push_makes_one_revert() {
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&failing_backfill(""), "backfill that fails verify");
    let flags = ["--git-token-env", "GIT_TOKEN", "--revert", "pull-request"];
    let env = [("GIT_TOKEN", TOKEN)];
    let (_server, url) = kill_during_push(&f, "refs/heads/backstop/revert-*", &flags, &env).await;

    let out = f.run_url(&url, &flags, &env).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    let branch = format!("backstop/revert-{}", &c2[..7]);
    let log = git(f.remote.path(), &["log", "--format=%s%n%b", &format!("main..{branch}")]);
    assert_eq!(
        log.matches("Backstop-Run:").count(),
        1,
        "exactly one revert commit:\n{log}"
    );
    assert_eq!(f.gate(), c1);
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{report}");
    let restores = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "restore" && s["ok"] == true)
        .count();
    assert_eq!(restores, 1, "one restore: {report}");
}

#[tokio::test]
async fn a_revert_the_remote_refused_is_owed_in_status_and_made_by_a_later_pass() {
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&failing_backfill(""), "backfill that fails verify");
    let hooks = f.dir.path().join("hook");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::write(hooks.join("refuse"), "").unwrap();
    install_hook(&f, "pre-receive", "refs/heads/backstop/revert-*", &hooks);
    let server = common::http::git_server(f.dir.path().to_path_buf(), "x-access-token", TOKEN).await;
    let url = format!("{}/sre.git", server.url());
    let flags = [
        "--git-token-env",
        "GIT_TOKEN",
        "--revert",
        "pull-request",
        "--retry-backoff",
        "0",
    ];
    let env = [("GIT_TOKEN", TOKEN)];
    let out = f.run_url(&url, &flags, &env).await;
    assert!(text(&out).contains("pre-receive hook declined"), "{}", text(&out));
    let s = f.status();
    let waiting = &s["gates"][0]["waiting"];
    assert_eq!(waiting["kind"], "retrying", "the revert is owed: {s}");
    assert!(waiting["step"].as_str().unwrap().starts_with("revert"), "{s}");
    assert_eq!(f.gate(), c1);

    // Later passes keep trying; once the remote takes pushes, the revert exists.
    let again = f.run_url(&url, &flags, &env).await;
    assert!(text(&again).contains("pre-receive hook declined"), "{}", text(&again));
    std::fs::remove_file(hooks.join("refuse")).unwrap();
    let out = f.run_url(&url, &flags, &env).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    let branch = format!("backstop/revert-{}", &c2[..7]);
    let log = git(f.remote.path(), &["log", "--format=%b", &format!("main..{branch}")]);
    assert_eq!(log.matches("Backstop-Run:").count(), 1, "{log}");
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{report}");
}

#[tokio::test]
async fn a_failed_restore_puts_the_original_data_directory_back_and_stops_the_gate() {
    let (f, c1) = with_orders().await;
    f.commit_carrier(&failing_backfill(""), "backfill that fails verify");
    let crashed = f
        .run_env(&["--revert", "commit"], &[("BACKSTOP_TEST_CRASH_AT", "Verifying")])
        .await;
    assert_eq!(crashed.status.code(), Some(86), "{}", text(&crashed));
    // The checkpoint is damaged before the restore needs it.
    let checkpoints = f.state().join("checkpoints");
    // The newest run's checkpoint (run ids start with their time) names the
    // base backup it relies on; damage that one.
    let run = std::fs::read_dir(&checkpoints)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("base-backup").is_file())
        .max()
        .unwrap();
    let label = std::fs::read_to_string(run.join("base-backup")).unwrap();
    let tar = checkpoints.join("base").join(label.trim()).join("base.tar");
    let len = std::fs::metadata(&tar).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tar)
        .unwrap()
        .set_len(len / 3)
        .unwrap();

    let out = f.run(&["--revert", "commit"]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(3), "a person must act: {all}");
    assert!(all.contains("the original data directory is back at"), "{all}");
    // The original (migrated) server runs again on its own directory.
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'total'")
            .await,
        1
    );
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 4);
    let failed: Vec<String> = std::fs::read_dir(f.server.data_dir().parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-failed"))
        .collect();
    assert_eq!(failed.len(), 1, "the failed restore is kept aside: {failed:?}");
    assert_eq!(f.gate(), c1, "the gate does not move");
    let again = f.run(&["--revert", "commit"]).await;
    assert_eq!(again.status.code(), Some(3), "still a person's: {}", text(&again));
    assert!(
        text(&again).contains("the gate holds until `backstop ack"),
        "{}",
        text(&again)
    );
    assert_eq!(f.gate(), c1);
    // The database is the person's: the next pass no longer logs in to it ahead.
    let hint: serde_json::Value = serde_json::from_slice(&std::fs::read(f.state().join("warm.json")).unwrap()).unwrap();
    assert_eq!(hint, serde_json::json!([]), "the hint names no held database");
    // A person takes it over; then the gate goes on (to the revert, whose tree is c1's).
    let report = f.reports().pop().unwrap();
    // Even while another process (a watching `backstop run`) holds the state.
    let _watcher = backstop::owner::StateLock::acquire(&f.state()).unwrap();
    let ack = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args([
            "ack",
            report["run"].as_str().unwrap(),
            "--by",
            "sre-on-call",
            "--note",
            "checked",
            "--state",
        ])
        .arg(f.state())
        .output()
        .unwrap();
    assert_eq!(ack.status.code(), Some(0), "{}", text(&ack));
    drop(_watcher);
    let after = f.run(&["--revert", "commit"]).await;
    assert_eq!(after.status.code(), Some(0), "{}", text(&after));
    assert!(f.reports().pop().unwrap()["acknowledged"]["by"] == "sre-on-call");
}

#[tokio::test]
async fn killed_after_a_dump_restore_finished_keeps_the_restored_databases_writes() {
    let (f, c1) = with_orders().await;
    f.commit_carrier(&failing_backfill(""), "backfill that fails verify");
    let server = common::http::git_server(f.dir.path().to_path_buf(), "x-access-token", TOKEN).await;
    let url = format!("{}/sre.git", server.url());
    let flags = ["--git-token-env", "GIT_TOKEN", "--revert", "commit"];
    let mut child = f
        .url_command(
            &url,
            &flags,
            &[("GIT_TOKEN", TOKEN), ("BACKSTOP_TEST_PAUSE_AT", "dump-restored")],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_line(&mut child, "test pause at dump-restored").await;
    f.client()
        .await
        .batch_execute("INSERT INTO orders (customer, qty) VALUES ('after-restore', 9)")
        .await
        .unwrap();
    kill9(child).await;
    let out = f.run_url(&url, &flags, &[("GIT_TOKEN", TOKEN)]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'after-restore'")
            .await,
        1,
        "the write to the restored database survives the resumed restore"
    );
    assert_eq!(f.revert_commits("main"), 1);
    assert_eq!(f.gate(), c1);
}

#[tokio::test]
async fn the_gate_reads_the_owner_and_the_history_from_one_snapshot() {
    // Another instance claims the database, migrates and records its row
    // between the gate's two reads: seen apart, "nobody owns it" and the
    // row of a run that may yet be rolled back would both count. The
    // history read is held back by a lock while that happens.
    use backstop::runner::Runner;
    let (f, _) = with_orders().await;
    let c = f.client().await;
    c.batch_execute(backstop::owner::SCHEMA_DDL).await.unwrap();
    let db = f.database();
    // Once before: the session is kept and lent again, logged in, so the
    // next call's statements go out back to back.
    let (_, warm) = backstop::runner::SqlRunner.owner_and_history(&db).await.unwrap();
    warm.unwrap();
    let mut other = f.client().await;
    let hold = other.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE backstop.migration_history IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let read = tokio::spawn(async move { backstop::runner::SqlRunner.owner_and_history(&db).await });
    // Until the history read waits on the lock (the owner was read).
    for tries in 0.. {
        assert!(tries < 500, "the history read never waited on the lock");
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%migration_history%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hold.batch_execute(
        "INSERT INTO backstop.run_owner (state_id, run_id, host, pid, since) VALUES ('another', 'r2', 'h', 1, now());
         INSERT INTO backstop.migration_history (id, checksum, phase, commit, run_id, started_at, finished_at, success)
         VALUES ('0009-theirs', 'x', 'expand', 'c', 'r2', now(), now(), true)",
    )
    .await
    .unwrap();
    hold.commit().await.unwrap();
    let (owner, history) = read.await.unwrap().unwrap();
    let rows: Vec<String> = history.unwrap().into_iter().map(|r| r.id).collect();
    match owner {
        None => assert!(
            !rows.contains(&"0009-theirs".to_string()),
            "no owner was seen, so the row of the run under way must not be either: {rows:?}"
        ),
        Some(o) => assert_eq!(o.state, "another"),
    }
}

#[tokio::test]
async fn a_database_backstop_never_claimed_has_no_owner_and_no_history_in_one_read() {
    // No tables yet: the owner's read fails inside the snapshot, and the
    // history is still read there (empty), not given up as unreadable.
    use backstop::runner::Runner;
    let f = Fixture::new().await;
    let db = f.database();
    let (owner, history) = backstop::runner::SqlRunner.owner_and_history(&db).await.unwrap();
    assert!(owner.is_none());
    assert!(history.unwrap().is_empty());
    // The session was lent back outside any transaction: a second read works.
    let (_, again) = backstop::runner::SqlRunner.owner_and_history(&db).await.unwrap();
    assert!(again.unwrap().is_empty());
}
