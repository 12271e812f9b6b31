//! What a restore discards, as the report states it: the whole server goes
//! back (every database named), the data-loss window ends when the old server
//! stopped taking writes, and the transactions committed after the recovery
//! point are counted in the WAL.

mod common;

use common::*;

/// A non-transactional migration (CREATE INDEX CONCURRENTLY) whose `inserts`
/// statements each commit on their own, then a verify that fails.
fn committing(inserts: usize, id: &str) -> CarrierBuilder {
    let mut sql = String::from("CREATE INDEX CONCURRENTLY orders_customer ON orders (customer);\n");
    for i in 0..inserts {
        sql.push_str(&format!("INSERT INTO orders (customer, qty) VALUES ('app-{i}', 1);\n"));
    }
    carrier(id).phase("migrate").sql("001.sql", &sql).verify("SELECT false")
}

/// Runs `c` on a fresh fixture to its restore; the report.
async fn restored_report(inserts: usize) -> (Fixture, serde_json::Value, String) {
    let (f, _) = with_orders().await;
    f.server.create_database("billing").await.unwrap();
    f.commit_carrier(&committing(inserts, "0002-index"), "index and inserts");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    let md = f.report_md(&run);
    (f, report, md)
}

#[tokio::test]
async fn the_report_names_every_database_rewound_and_counts_the_commits_lost_in_the_wal() {
    let (_f1, one, md) = restored_report(1).await;
    let (_f5, five, _) = restored_report(5).await;

    // Every database on the server went back, not only the run's.
    let dbs = one["restore"]["databases"].as_array().unwrap();
    for db in ["billing", "postgres", "shop"] {
        assert!(dbs.iter().any(|d| d == db), "{db} in {dbs:?}");
    }
    assert!(md.contains("- scope: the whole server went back, all "), "{md}");
    assert!(md.contains("billing"), "{md}");

    // The window ends when the old server stopped taking writes, after the
    // restore began.
    let began: chrono::DateTime<chrono::Utc> = one["restore"]["started_at"].as_str().unwrap().parse().unwrap();
    let stopped: chrono::DateTime<chrono::Utc> = one["restore"]["writes_stopped_at"].as_str().unwrap().parse().unwrap();
    assert!(stopped >= began, "{one}");
    assert_eq!(
        one["data_loss_window"]["to"], one["restore"]["writes_stopped_at"],
        "{one}"
    );
    assert!(md.contains("- the old server took writes until "), "{md}");

    // Each extra statement committed on its own: four more COMMIT records in
    // the WAL after the recovery point, and nothing else differs.
    let count = |r: &serde_json::Value| r["restore"]["lost_commits"]["count"].as_u64().unwrap();
    assert!(count(&one) >= 2, "the index build and the insert at least: {one}");
    assert_eq!(count(&five) - count(&one), 4, "one: {one}\nfive: {five}");
    assert!(md.contains("- transactions lost: "), "{md}");
    assert!(md.contains("pg_waldump --path "), "{md}");
}
