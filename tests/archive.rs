//! The WAL archive and the role, as the local backend depends on them
//! (issue 10, case 6 and the REPLICATION preflight): a failing ("full")
//! archive is refused before any checkpoint; a truncated segment a full
//! archive left behind does not break the restore, which takes the complete
//! copy from the old `pg_wal`; a role that may not take base backups is
//! refused before anything is touched.

mod common;

use std::path::Path;

use common::*;

/// Replaces the server's archive_command by one that behaves like a full
/// disk while `flag` exists: it writes a truncated copy and fails.
async fn archive_fills_up_when(f: &Fixture, flag: &Path) {
    let arch = f.server.archive();
    let script = f.server.root().join("archive.sh");
    let ran = f.server.root().join("archive.sh.ran");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# $1 = %p, $2 = %f\ntouch {ran}\nif [ -e {flag} ]; then head -c 65536 \"$1\" > {arch}/$2; exit 1; fi\ntest ! -f {arch}/$2 && cp \"$1\" {arch}/$2\n",
            flag = flag.display(),
            arch = arch.display(),
            ran = ran.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = f.client().await;
    c.batch_execute(&format!(
        "ALTER SYSTEM SET archive_command = '{} %p %f'",
        script.display()
    ))
    .await
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // The archiver takes the new command at its own pace: until it has run
    // it once, a segment may still go out through the old one.
    for tries in 0.. {
        assert!(tries < 200, "the archiver never ran the new archive_command");
        c.batch_execute("SELECT pg_logical_emit_message(false, 'backstop-test', 'x'); SELECT pg_switch_wal()")
            .await
            .unwrap();
        if ran.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn note_column() -> CarrierBuilder {
    carrier("0002-note")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;")
        .verify("SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'note'")
}

#[tokio::test]
async fn a_failing_archive_is_refused_before_any_checkpoint() {
    let (f, c1) = with_orders().await;
    let flag = f.dir.path().join("archive-full");
    std::fs::write(&flag, "").unwrap();
    archive_fills_up_when(&f, &flag).await;
    // The archiver tries (and fails) on the next segment.
    let c = f.client().await;
    c.batch_execute("SELECT pg_switch_wal(); SELECT pg_switch_wal()")
        .await
        .unwrap();
    for _ in 0..100 {
        let failed: i64 = c
            .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0);
        if failed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    f.commit_carrier(&note_column(), "add note");
    let out = f.run(&[]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("WAL archiving of"), "{all}");
    assert!(all.contains("pg_stat_archiver"), "{all}");
    assert_eq!(f.gate(), c1);
    assert_eq!(f.checkpoints(), 1, "no checkpoint taken for the refused commit");
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'")
            .await,
        0
    );
}

#[tokio::test]
async fn a_truncated_segment_in_a_full_archive_does_not_break_the_restore() {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    // Where the server's OS user may write.
    let flag = f.server.archive().join("FULL");
    archive_fills_up_when(&f, &flag).await;
    // The archive fills up during the migration (COPY TO PROGRAM runs on the
    // server as its OS user); verify fails, so the data must be restored.
    let failing = carrier("0002-backfill")
        .phase("migrate")
        .sql(
            "001.sql",
            &format!(
                "COPY (SELECT 1) TO PROGRAM 'touch {}';\nALTER TABLE orders ADD COLUMN total int;\nINSERT INTO orders (customer, qty) SELECT 'mallory', g FROM generate_series(1, 20000) g;",
                flag.display()
            ),
        )
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL");
    f.commit_carrier(&failing, "backfill that fails verify");
    let out = f.run(&["--revert", "commit"]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "rolled back, restore included: {all}");
    assert!(
        all.contains("the archive holds a truncated copy of this segment"),
        "the restore met a truncated segment: {all}"
    );
    assert_eq!(f.schema().await, schema, "the data is back");
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(f.gate(), c1);
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack", "{report}");
}

#[tokio::test]
async fn a_role_without_replication_is_refused_before_anything_is_touched() {
    let (f, c1) = with_orders().await;
    f.client()
        .await
        .batch_execute("CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE shop TO app; GRANT ALL ON SCHEMA public, backstop TO app; GRANT ALL ON ALL TABLES IN SCHEMA public, backstop TO app; GRANT ALL ON ALL SEQUENCES IN SCHEMA backstop TO app")
        .await
        .unwrap();
    f.commit_carrier(&note_column(), "add note");
    let url = format!("postgresql://app@127.0.0.1:{}/shop", f.server.port());
    let out = f.run_env(&[], &[(DB_VAR, &url)]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("role app of"), "{all}");
    assert!(all.contains("REPLICATION"), "{all}");
    assert_eq!(f.gate(), c1);
    assert_eq!(f.checkpoints(), 1, "no checkpoint for the refused commit");
    // A role that may not even create backstop's tables is refused too, not retried.
    f.client()
        .await
        .batch_execute("REVOKE ALL ON SCHEMA backstop FROM app")
        .await
        .unwrap();
    let out = f.run_env(&[], &[(DB_VAR, &url)]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("permission denied"), "{all}");
}

#[tokio::test]
async fn a_segment_the_archiver_cannot_push_is_reported_not_waited_for_forever() {
    // What the CNPG restore checks before it deletes the old Cluster (and
    // pgBackRest after its switch): the segment is archived, or an error
    // says what pg_stat_archiver saw.
    let (f, _) = with_orders().await;
    let c = f.client().await;
    let segment: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    backstop::checkpoint::base::await_archived(&c, &segment, std::time::Duration::from_secs(30))
        .await
        .expect("a working archive takes the segment");
    let flag = f.dir.path().join("archive-full");
    std::fs::write(&flag, "").unwrap();
    archive_fills_up_when(&f, &flag).await;
    c.batch_execute("CREATE TABLE after_the_archive_filled (x int)")
        .await
        .unwrap();
    let segment: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    let why = backstop::checkpoint::base::await_archived(&c, &segment, std::time::Duration::from_secs(2))
        .await
        .unwrap_err();
    let backstop::checkpoint::base::NotArchived::Waited(why) = why else {
        panic!("waited, not unreadable: {why:?}")
    };
    assert!(why.starts_with("pg_stat_archiver: last archived"), "{why}");
}
