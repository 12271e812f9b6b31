//! The `pgbackrest` checkpoint backend against Debian's pgBackRest with a
//! real stanza: the server archives into it, a checkpoint is a recovery point
//! in it, a failed migration is undone by `pgbackrest restore --delta
//! --type=lsn`, and a restore killed with SIGKILL at its two risky moments
//! finishes when backstop runs again.

mod common;

use std::path::PathBuf;

use common::backrest::{backups, with_stanza};
use common::*;

fn flags(config: &std::path::Path) -> Vec<String> {
    let mut flags = common::backrest::checkpoint_flags(config);
    flags.extend(["--revert".into(), "commit".into()]);
    flags
}

/// The stanza, `orders` applied through backstop (one backup taken), rows
/// the app wrote after that checkpoint, and a failing migration committed.
async fn failing_migration_pending() -> (Fixture, PathBuf, String, String) {
    let (f, config) = with_stanza().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let flags = flags(&config);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = f.run(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let first = f.reports().pop().unwrap();
    assert!(
        first["checkpoint"]["base"]["taken_because"]
            .as_str()
            .unwrap()
            .contains("no base backup on timeline 1"),
        "{first}"
    );
    assert_eq!(backups(&f, &config).len(), 1, "the first checkpoint backs up");
    insert_orders(&f).await;
    f.client()
        .await
        .batch_execute("INSERT INTO orders (customer, qty) SELECT 'bulk', g FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let schema = f.schema().await;
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    (f, config, c1, schema)
}

async fn assert_restored(f: &Fixture, c1: &str, schema: &str) {
    assert_eq!(f.gate(), c1, "gate unchanged");
    assert_eq!(f.schema().await, schema, "schema back to before the migration");
    assert_eq!(
        f.count("SELECT count(*) FROM orders").await,
        5003,
        "rows written before the checkpoint are present"
    );
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'mallory'").await,
        0,
        "the migration's rows are gone"
    );
    let in_recovery: bool = f
        .client()
        .await
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery, "the restored server is promoted");
}

#[tokio::test]
async fn a_failed_migration_is_undone_by_pgbackrest_restore_to_the_recovery_point() {
    let (f, config, c1, schema) = failing_migration_pending().await;
    let flags = flags(&config);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = f.run(&args).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    assert_restored(&f, &c1, &schema).await;
    assert_eq!(backups(&f, &config).len(), 1, "the second checkpoint backed nothing up");
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{report}");
    assert_eq!(report["checkpoint"]["base"]["taken_because"], serde_json::Value::Null);
    let target = report["restore"]["target"].as_str().unwrap();
    assert!(
        target.starts_with("lsn ") && target.contains("from pgBackRest backup"),
        "{target}"
    );
    assert!(
        report["restore"]["kept"]
            .as_str()
            .unwrap()
            .contains("WAL archive on timeline 1"),
        "{report}"
    );
    assert_eq!(f.revert_commits("main"), 1);

    // The server is on timeline 2 now: the next checkpoint backs up again
    // (incremental: pgBackRest reuses the full backup's unchanged files).
    let note = carrier("0003-note")
        .phase("expand")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;");
    f.commit_carrier(&note, "orders: note");
    let out = f.run(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let labels = backups(&f, &config);
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert!(labels[1].ends_with('I'), "incremental: {labels:?}");
}

#[tokio::test]
async fn a_pgbackrest_restore_killed_at_its_risky_moments_finishes_when_run_again() {
    for point in ["pgbackrest-server-stopped", "pgbackrest-restored"] {
        let (f, config, c1, schema) = failing_migration_pending().await;
        let flags = flags(&config);
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut child = f.spawn_run(&f.state(), &args, &[("BACKSTOP_TEST_PAUSE_AT", point)]);
        wait_for_line(&mut child, &format!("test pause at {point}")).await;
        kill9(child).await;
        assert!(
            !f.server.data_dir().join("postmaster.pid").exists(),
            "{point}: the server is down while the restore is under way"
        );
        let out = f.run(&args).await;
        assert_eq!(out.status.code(), Some(1), "{point}: rolled back: {}", text(&out));
        assert_restored(&f, &c1, &schema).await;
        assert_eq!(f.revert_commits("main"), 1, "{point}");
    }
}

#[tokio::test]
async fn a_pgbackrest_restore_killed_before_the_server_was_down_stops_it_when_run_again() {
    // Killed after the restore said it began, before the server was down:
    // the server still running is the original, not one a person started.
    let (f, config, c1, schema) = failing_migration_pending().await;
    let flags = flags(&config);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let point = "pgbackrest-restore-begun";
    let mut child = f.spawn_run(&f.state(), &args, &[("BACKSTOP_TEST_PAUSE_AT", point)]);
    wait_for_line(&mut child, &format!("test pause at {point}")).await;
    kill9(child).await;
    assert!(
        f.server.data_dir().join("postmaster.pid").exists(),
        "the original still runs"
    );
    let out = f.run(&args).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    assert_restored(&f, &c1, &schema).await;
    assert_eq!(f.revert_commits("main"), 1);
}

#[tokio::test]
async fn a_missing_stanza_is_refused_before_anything_is_touched() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    let out = f
        .run(&["--checkpoint", "pgbackrest", "--pgbackrest-stanza", "nope"])
        .await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("pgbackrest stanza nope"), "{said}");
    assert_eq!(f.gate(), f.base, "the gate did not move");
    assert_eq!(
        f.count("SELECT count(*) FROM pg_tables WHERE tablename = 'orders'")
            .await,
        0
    );
}
