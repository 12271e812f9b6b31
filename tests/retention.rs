//! Checkpoint retention (`--keep-checkpoints`): base backups are deleted
//! once newer ended runs replace them; the data directory a restore set
//! aside (the only copy of the data-loss window's writes) is never deleted.

mod common;

use common::*;

#[tokio::test]
async fn checkpoints_beyond_the_newest_kept_are_deleted_but_not_the_data_a_restore_set_aside() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&["--keep-checkpoints", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.checkpoints(), 1);

    // A failed migration restores: its base backup and the set-aside data
    // directory exist; the older run's checkpoint is let go.
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--keep-checkpoints", "1", "--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back\n{}", text(&out));
    assert_eq!(f.checkpoints(), 1, "only the newest ended run keeps its checkpoint");
    assert_eq!(f.kept_data_dirs(), 1, "the restore set the old data directory aside");
    let failed_run = f.reports().last().unwrap()["run"].as_str().unwrap().to_string();
    assert!(f.state().join("checkpoints").join(&failed_run).exists());

    // The next good run replaces it: the failed run's checkpoint goes (its
    // record says so); the set-aside data directory stays for a person.
    let note = carrier("0003-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&note, "add note");
    let out = f.run(&["--keep-checkpoints", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.checkpoints(), 1);
    assert!(!f.state().join("checkpoints").join(&failed_run).exists());
    assert_eq!(f.kept_data_dirs(), 1, "the set-aside data directory is kept");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.state().join("journal").join(format!("{failed_run}.json"))).unwrap())
            .unwrap();
    assert_eq!(record["checkpoint_pruned"], true, "{record}");
}

#[tokio::test]
async fn keep_zero_keeps_every_checkpoint() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    let note = carrier("0002-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&note, "add note");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    assert_eq!(f.checkpoints(), 2);
}
