//! O(1) checkpoints (local backend): a checkpoint is a recovery point on the
//! newest base backup, and a restore replays the archived WAL from it. A new
//! base backup is taken only on a new timeline, under the policy
//! (`--base-backup-max-age`, `--base-backup-max-wal`), or after a gap in the
//! archive. Real servers, real PITR.

mod common;

use common::*;

fn checkpoint_of(report: &serde_json::Value) -> &serde_json::Value {
    &report["checkpoint"]
}

fn base_label(report: &serde_json::Value) -> String {
    checkpoint_of(report)["base"]["base"]["label"]
        .as_str()
        .unwrap_or_else(|| panic!("no base backup in {report}"))
        .to_string()
}

fn taken_because(report: &serde_json::Value) -> Option<String> {
    checkpoint_of(report)["base"]["taken_because"]
        .as_str()
        .map(str::to_string)
}

/// Rows the app wrote between two checkpoints: WAL a restore must replay.
async fn app_writes(f: &Fixture, rows: i64) {
    f.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO orders (customer, qty) SELECT 'bulk', g FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_checkpoint_reuses_the_base_backup_and_the_restore_replays_the_wal_since() {
    let (f, c1) = with_orders().await;
    let first = f.reports().pop().unwrap();
    assert_eq!(f.base_backups(), 1);
    assert!(
        taken_because(&first).unwrap().contains("no base backup on timeline 1"),
        "{first}"
    );
    // WAL after the base backup that the restore has to replay to keep these rows.
    app_writes(&f, 20_000).await;
    let schema = f.schema().await;

    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let second = f.reports().pop().unwrap();
    assert_eq!(second["outcome"], "RolledBack", "{second}");
    assert_eq!(f.base_backups(), 1, "no second base backup");
    assert_eq!(base_label(&second), base_label(&first), "the same base backup");
    assert_eq!(taken_because(&second), None, "reused: {second}");
    assert_eq!(checkpoint_of(&second)["size_bytes"], 0, "the checkpoint copied nothing");
    let replay = checkpoint_of(&second)["base"]["replay_bytes"].as_u64().unwrap();
    assert!(replay > 500_000, "the app's rows are WAL to replay: {replay}");

    // Restored by PITR from the first base backup: rows written before the
    // checkpoint are there, the migration's are gone, the schema is as before.
    assert_eq!(f.gate(), c1);
    assert_eq!(f.schema().await, schema, "schema back to before the migration");
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 20_003);
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'mallory'").await,
        0
    );

    // The restore started timeline 2: the old base backup cannot reach it.
    let note = carrier("0003-note")
        .phase("expand")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;");
    f.commit_carrier(&note, "orders: note");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let third = f.reports().pop().unwrap();
    assert_eq!(f.base_backups(), 2);
    assert!(
        taken_because(&third).unwrap().contains("no base backup on timeline 2"),
        "{third}"
    );
    let md = f.report_md(third["run"].as_str().unwrap());
    assert!(md.contains("a restore starts from: base backup"), "{md}");
}

#[tokio::test]
async fn the_policy_takes_a_new_base_backup_when_too_much_wal_or_time_has_passed() {
    let (f, _) = with_orders().await;
    assert_eq!(f.base_backups(), 1);
    app_writes(&f, 50_000).await;
    f.commit_carrier(
        &carrier("0002-a")
            .phase("expand")
            .sql("001.sql", "ALTER TABLE orders ADD COLUMN a int;"),
        "a",
    );
    let out = f.run(&["--base-backup-max-wal", "1MiB"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.base_backups(), 2);
    let report = f.reports().pop().unwrap();
    assert!(
        taken_because(&report)
            .unwrap()
            .contains("--base-backup-max-wal 1.0 MiB"),
        "{report}"
    );

    f.commit_carrier(
        &carrier("0003-b")
            .phase("expand")
            .sql("001.sql", "ALTER TABLE orders ADD COLUMN b int;"),
        "b",
    );
    let out = f.run(&["--base-backup-max-age", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.base_backups(), 3);
    let report = f.reports().pop().unwrap();
    assert!(
        taken_because(&report).unwrap().contains("--base-backup-max-age"),
        "{report}"
    );

    // Bad policy values are refused before anything runs.
    let out = f.run(&["--base-backup-max-wal", "lots"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("\"lots\" is not a size"), "{}", text(&out));
}

#[tokio::test]
async fn a_gap_in_the_archive_after_the_base_backup_makes_the_checkpoint_take_a_new_one() {
    let (f, c1) = with_orders().await;
    let first = f.reports().pop().unwrap();
    // A segment after the base backup goes missing from the archive (a
    // person cleaned it up, a disk lost it): a restore from the first base
    // backup could not get past it.
    let mark = checkpoint_of(&first)["base"]["checkpoint_lsn"].as_str().unwrap();
    let (hi, lo) = mark.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let size = u64::from(WAL_SEGMENT_MIB) << 20;
    let per_id = 0x1_0000_0000 / size;
    let segno = lsn / size;
    let segment = format!("00000001{:08X}{:08X}", segno / per_id, segno % per_id);
    std::fs::remove_file(f.server.archive().join(&segment)).unwrap();
    app_writes(&f, 1_000).await;
    let schema = f.schema().await;

    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let second = f.reports().pop().unwrap();
    assert_eq!(second["outcome"], "RolledBack", "{second}");
    assert_eq!(f.base_backups(), 2, "a new base backup after the gap");
    let why = taken_because(&second).unwrap();
    assert!(why.contains(&segment) && why.contains("missing"), "{why}");
    assert_eq!(f.gate(), c1);
    assert_eq!(f.schema().await, schema);
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 1_003);
}

#[tokio::test]
async fn retention_deletes_base_backups_no_kept_run_relies_on_but_never_the_newest() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    let every = ["--base-backup-max-age", "0", "--keep-checkpoints", "1"];
    let out = f.run(&every).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (i, column) in ["a", "b", "c"].iter().enumerate() {
        let m = carrier(&format!("000{}-{column}", i + 2))
            .phase("expand")
            .sql("001.sql", &format!("ALTER TABLE orders ADD COLUMN {column} int;"));
        f.commit_carrier(&m, column);
        let out = f.run(&every).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(f.base_backups(), 1, "only the base backup the kept run relies on");
        assert_eq!(f.checkpoints(), 1);
    }
    // Keeping two runs that rely on the same base backup keeps one.
    for (i, column) in ["d", "e"].iter().enumerate() {
        let m = carrier(&format!("000{}-{column}", i + 5))
            .phase("expand")
            .sql("001.sql", &format!("ALTER TABLE orders ADD COLUMN {column} int;"));
        f.commit_carrier(&m, column);
        let out = f.run(&["--keep-checkpoints", "2"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    assert_eq!(f.base_backups(), 1, "both kept runs rely on the newest");
    assert_eq!(f.checkpoints(), 2);
}

#[tokio::test]
async fn a_wal_archive_without_room_for_max_wal_size_stops_before_the_checkpoint_naming_the_archive() {
    // More WAL may be written before the next checkpoint than any disk here
    // holds: the preflight must refuse, name the archive and the setting,
    // and leave nothing taken, run or moved.
    let f = Fixture::with_settings("max_wal_size = 1000TB").await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    let archive = f.server.archive().display().to_string();
    assert!(said.contains("the WAL archive") && said.contains(&archive), "{said}");
    assert!(
        said.contains("max_wal_size") && said.contains("MiB are needed"),
        "{said}"
    );
    assert_eq!(f.gate(), f.base, "the gate stays before {c1}");
    assert_eq!(f.checkpoints(), 0, "no checkpoint taken");
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'orders'")
            .await,
        0,
        "the migration did not run"
    );
    f.assert_nothing_reverted();
}
