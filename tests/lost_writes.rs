//! The writes a restore discards are kept and given back (`wal_level =
//! logical`): an application writes continuously while a migration commits
//! and then fails its verify; the restore takes the server back; the report
//! counts exactly the application's lost transactions, `lost-writes.sql`
//! holds them and none of the migration's own, `backstop replay` puts them
//! back (stopping at a conflict, going on after it), and the run's slot is
//! gone whatever happened, a crash included.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::*;

const LOGICAL: &str = "wal_level = logical\nmax_replication_slots = 10";

/// The app's own table, which no migration touches.
async fn events_table(f: &Fixture) {
    f.client()
        .await
        .batch_execute("CREATE TABLE events (id bigint PRIMARY KEY, note text NOT NULL)")
        .await
        .unwrap();
}

/// Writes one row per transaction into `events` until its connection is
/// ended; returns the ids whose COMMIT the server acknowledged.
fn writer(url: String) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<i64>>>) {
    let committed = Arc::new(Mutex::new(Vec::new()));
    let out = committed.clone();
    let task = tokio::spawn(async move {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        for id in 1_000i64.. {
            let note = format!("written by the app, it's row {id}");
            match client
                .execute("INSERT INTO events (id, note) VALUES ($1, $2)", &[&id, &note])
                .await
            {
                Ok(_) => out.lock().unwrap().push(id),
                Err(_) => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    (task, committed)
}

/// [`writer`] on the fixture's `shop`, once it has committed 20 rows.
async fn app_writing(f: &Fixture) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<i64>>>) {
    let (task, committed) = writer(f.server.url("shop"));
    wait_until("the app writes", || {
        let n = committed.lock().unwrap().len();
        async move { n >= 20 }
    })
    .await;
    (task, committed)
}

async fn event_ids(f: &Fixture) -> BTreeSet<i64> {
    f.client()
        .await
        .query("SELECT id FROM events WHERE id >= 1000", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn backstop_slots(f: &Fixture) -> i64 {
    f.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'backstop_%'")
        .await
}

fn replay(f: &Fixture, run: &str, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out = std::process::Command::new(bin())
        .args(["replay", run, "--state"])
        .arg(f.state())
        .args(args)
        .env(DB_VAR, f.server.url("shop"))
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

#[tokio::test]
async fn a_restore_keeps_the_apps_lost_writes_and_replay_gives_them_back() {
    let f = logical_with_orders().await;
    events_table(&f).await;

    // The app is writing before the run starts and goes on until the
    // restore ends its session.
    let (task, committed) = app_writing(&f).await;
    let out = rolled_back(&f, slow_failing_backfill()).await;
    task.await.unwrap();
    let written: BTreeSet<i64> = committed.lock().unwrap().iter().copied().collect();
    let survived = event_ids(&f).await;
    let lost: BTreeSet<i64> = written.difference(&survived).copied().collect();
    assert!(survived.is_subset(&written));
    assert!(!lost.is_empty(), "the app wrote during the window: {}", text(&out));

    // The report counts exactly the app's lost transactions.
    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    let kept = &report["restore"]["lost_writes"]["kept"];
    assert_eq!(kept["transactions"].as_u64(), Some(lost.len() as u64), "{report:#}");
    assert_eq!(
        kept["rows"]["public.events"]["INSERT"].as_u64(),
        Some(lost.len() as u64),
        "{report:#}"
    );
    assert!(
        kept["own_left_out"].as_u64().unwrap() >= 1,
        "the migration's own: {report:#}"
    );
    assert_eq!(
        report["data_loss_window"]["transactions"].as_u64(),
        Some(lost.len() as u64)
    );
    let md = f.report_md(&run);
    assert!(
        md.contains(&format!(
            "- writes kept: {} transactions of the application",
            lost.len()
        )),
        "{md}"
    );

    // lost-writes.sql holds them, and nothing of the migration's own.
    let sql = std::fs::read_to_string(f.state().join("runs").join(&run).join("lost-writes.sql")).unwrap();
    for id in &lost {
        assert!(sql.contains(&format!("VALUES ('{id}', ")), "{id} in lost-writes.sql");
    }
    assert_eq!(
        sql.matches("BEGIN;").count(),
        lost.len(),
        "one transaction per source transaction"
    );
    assert!(
        !sql.contains("orders"),
        "the migration's own writes are left out:\n{sql}"
    );
    assert!(!sql.contains("backstop."), "backstop's own tables are left out");

    // The slot is gone: read before the restore, dropped when the run ended.
    assert_eq!(backstop_slots(&f).await, 0);

    // A row written since the restore conflicts with the first lost insert:
    // replay stops there, applies nothing of it, says which row.
    let first = *lost.iter().next().unwrap();
    f.client()
        .await
        .execute(
            "INSERT INTO events (id, note) VALUES ($1, 'written after the restore')",
            &[&first],
        )
        .await
        .unwrap();
    let (out, done) = replay(&f, &run, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(done["applied"].as_array().unwrap().len(), 0, "{done:#}");
    let why = done["stopped"][1].as_str().unwrap();
    assert!(
        why.contains("INSERT on public.events") && why.contains("duplicate key"),
        "{why}"
    );
    assert_eq!(event_ids(&f).await, survived.iter().copied().chain([first]).collect());

    // A dry run after the conflict is removed says all would apply, and
    // changes nothing.
    f.client()
        .await
        .execute("DELETE FROM events WHERE id = $1", &[&first])
        .await
        .unwrap();
    let (out, dry) = replay(&f, &run, &["--dry-run", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(dry["applied"].as_array().unwrap().len(), lost.len());
    assert_eq!(event_ids(&f).await, survived);

    // Replay puts them back: the rows equal what the app wrote.
    let (out, _) = replay(&f, &run, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("applied {} transactions", lost.len())),
        "{}",
        text(&out)
    );
    assert_eq!(event_ids(&f).await, written);
    let notes = f
        .count("SELECT count(*) FROM events WHERE id >= 1000 AND note = 'written by the app, it''s row ' || id")
        .await;
    assert_eq!(notes as usize, written.len(), "values as written, quotes included");
    // Again: nothing twice.
    let (out, again) = replay(&f, &run, &["-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(again["already"].as_array().unwrap().len(), lost.len());
    assert_eq!(event_ids(&f).await, written);
}

#[tokio::test]
async fn a_crash_between_the_slots_creation_and_its_drop_leaves_no_slot_after_resume() {
    let f = Fixture::with_settings(LOGICAL).await;
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run_env(&[], &[("BACKSTOP_TEST_CRASH_AT", "Verifying")]).await;
    assert_eq!(out.status.code(), Some(86), "crashed:\n{}", text(&out));
    assert_eq!(backstop_slots(&f).await, 1, "the slot was created before the crash");
    let out = f.run(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(backstop_slots(&f).await, 0, "dropped when the resumed run ended");
    let report = f.reports().pop().unwrap();
    let step = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "release-capture")
        .cloned()
        .unwrap_or_default();
    assert!(
        step["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("dropped logical slot backstop_"),
        "{report:#}"
    );
}

#[tokio::test]
async fn without_logical_decoding_the_run_says_so_and_restores_as_before() {
    let (f, _) = with_orders().await;
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = f.reports().pop().unwrap();
    let why = report["restore"]["lost_writes"]["not-kept"]["why"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("wal_level is replica"), "{report:#}");
    let run = report["run"].as_str().unwrap();
    let md = f.report_md(run);
    assert!(
        md.contains("- writes after it are not captured: wal_level is replica"),
        "{md}"
    );
    let (out, _) = replay(&f, run, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("kept no lost writes"), "{}", text(&out));
}

#[tokio::test]
async fn a_restore_resumed_after_a_kill_never_closes_the_restored_database() {
    let f = logical_with_orders().await;
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let mut child = f.spawn_run(
        &f.state(),
        &["--revert", "commit"],
        &[("BACKSTOP_TEST_PAUSE_AT", "restored-server-promoted")],
    );
    wait_for_line(&mut child, "test pause at restored-server-promoted").await;
    // The application writes to the restored, promoted server; then backstop dies.
    f.client()
        .await
        .batch_execute("INSERT INTO orders (customer, qty) VALUES ('after-restore', 9)")
        .await
        .unwrap();
    kill9(child).await;

    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    // The resumed restore found no slot in the live database and left it open.
    let open = f
        .count("SELECT count(*) FROM pg_database WHERE datname = 'shop' AND datallowconn")
        .await;
    assert_eq!(open, 1, "the restored database takes connections: {}", text(&out));
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'after-restore'")
            .await,
        1
    );
    assert_eq!(backstop_slots(&f).await, 0);
    // The first attempt's files are there, and the report still says so.
    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    assert!(f.state().join("runs").join(&run).join("lost-writes.sql").exists());
    assert!(
        report["restore"]["lost_writes"]["kept"]["transactions"].is_u64(),
        "{report:#}"
    );
}

/// Like [`writer`], with updates and deletes: each transaction inserts a
/// row, and every third also updates the row before it, every fifth deletes
/// the one two before. Returns the table as the acknowledged commits left it.
fn mixed_writer(
    url: String,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Mutex<std::collections::BTreeMap<i64, String>>>,
) {
    let model = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let out = model.clone();
    let task = tokio::spawn(async move {
        let Ok((mut client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        for id in 1_000i64.. {
            let Ok(tx) = client.transaction().await else { return };
            let note = format!("row {id}");
            let mut ops: Vec<(i64, Option<String>)> = vec![(id, Some(note.clone()))];
            if tx
                .execute("INSERT INTO events (id, note) VALUES ($1, $2)", &[&id, &note])
                .await
                .is_err()
            {
                return;
            }
            if id % 3 == 0 {
                let prev = id - 1;
                let new = format!("row {prev} updated by {id}");
                if tx
                    .execute("UPDATE events SET note = $2 WHERE id = $1", &[&prev, &new])
                    .await
                    .is_err()
                {
                    return;
                }
                ops.push((prev, Some(new)));
            }
            if id % 5 == 0 {
                let gone = id - 2;
                if tx.execute("DELETE FROM events WHERE id = $1", &[&gone]).await.is_err() {
                    return;
                }
                ops.push((gone, None));
            }
            if tx.commit().await.is_err() {
                return;
            }
            {
                let mut m = out.lock().unwrap();
                for (k, v) in ops {
                    match v {
                        Some(v) => {
                            m.insert(k, v);
                        }
                        None => {
                            m.remove(&k);
                        }
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    (task, model)
}

#[tokio::test]
async fn replay_of_inserts_updates_and_deletes_leaves_the_table_as_the_app_left_it() {
    let f = logical_with_orders().await;
    events_table(&f).await;
    let (task, model) = mixed_writer(f.server.url("shop"));
    wait_until("the app writes", || {
        let n = model.lock().unwrap().len();
        async move { n >= 20 }
    })
    .await;
    rolled_back(&f, slow_failing_backfill()).await;
    task.await.unwrap();
    let expected = model.lock().unwrap().clone();
    let table = || rows_of::<i64, String>(&f, "SELECT id, note FROM events WHERE id >= 1000 ORDER BY id");
    assert_ne!(table().await, expected, "the restore took writes away");
    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    let kept = &report["restore"]["lost_writes"]["kept"];
    assert!(kept["transactions"].as_u64().unwrap() >= 1, "{report:#}");
    // A file kept by an older backstop has no transaction-id horizon: a
    // key-only UPDATE or DELETE then stops replay, unless a person accepts
    // matching by key alone.
    let json_path = f.state().join("runs").join(&run).join("lost-writes.json");
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(file["xid_horizon"].is_u64(), "kept with the recovery point's horizon");
    let (out, _) = replay(&f, &run, &["--dry-run"]);
    assert!(out.status.success(), "with the horizon, all apply: {}", text(&out));
    file.as_object_mut().unwrap().remove("xid_horizon");
    std::fs::write(&json_path, serde_json::to_vec(&file).unwrap()).unwrap();
    let (out, done) = replay(&f, &run, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let why = done["stopped"][1].as_str().unwrap();
    assert!(
        why.contains("no transaction-id horizon") && why.contains("--match-by-key"),
        "{why}"
    );
    let (out, _) = replay(&f, &run, &["--match-by-key"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(table().await, expected, "after replay: {}", text(&out));
}

/// Inserts ten rows per transaction into `tickets` (a `bigserial` key the
/// server hands out) until its connection is ended; returns the rows whose
/// COMMIT the server acknowledged, by id.
fn serial_writer(
    url: String,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Mutex<std::collections::BTreeMap<i64, String>>>,
) {
    let rows = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let out = rows.clone();
    let task = tokio::spawn(async move {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        for n in 0.. {
            let note = format!("ticket {n}");
            // Ten ids a transaction: more than the 32 a sequence logs ahead
            // are handed out in the window, so the restored sequence is
            // behind the lost rows' ids.
            match client
                .query(
                    "INSERT INTO tickets (note) SELECT $1 || '.' || g FROM generate_series(1, 10) g RETURNING id, note",
                    &[&note],
                )
                .await
            {
                Ok(rows) => {
                    let mut m = out.lock().unwrap();
                    for row in rows {
                        m.insert(row.get::<_, i64>(0), row.get::<_, String>(1));
                    }
                }
                Err(_) => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    (task, rows)
}

/// Pushes `carrier` (a migration that commits and then fails its verify)
/// and runs it: it is rolled back, restore included.
async fn rolled_back(f: &Fixture, carrier: CarrierBuilder) -> std::process::Output {
    f.commit_carrier(&carrier, "backfill totals");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back:\n{}", text(&out));
    out
}

/// [`failing_backfill`] whose verify takes 0.3 s (and still fails): the
/// application's writes in the window are many, whatever the machine's speed.
fn slow_failing_backfill() -> CarrierBuilder {
    failing_backfill("").verify("SELECT count(*) = 0 FROM orders, pg_sleep(0.3) WHERE total IS NULL")
}

/// A server with `wal_level = logical` and `orders` applied and written.
async fn logical_with_orders() -> Fixture {
    let f = Fixture::with_settings(LOGICAL).await;
    f.commit_carrier(&orders_table(), "create orders");
    assert!(f.run(&[]).await.status.success());
    insert_orders(&f).await;
    f
}

/// `tickets` created and [`serial_writer`] writing into it; once it has
/// `rows`, a failing migration that replays its lost writes itself is pushed.
async fn tickets_while_a_replaying_run_is_pushed(
    f: &Fixture,
    rows: usize,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Mutex<std::collections::BTreeMap<i64, String>>>,
) {
    f.client()
        .await
        .batch_execute("CREATE TABLE tickets (id bigserial PRIMARY KEY, note text NOT NULL)")
        .await
        .unwrap();
    let (task, model) = serial_writer(f.server.url("shop"));
    wait_until("the app writes", || {
        let n = model.lock().unwrap().len();
        async move { n >= rows }
    })
    .await;
    f.commit_carrier(&slow_failing_backfill().annotation("replay", "auto"), "backfill totals");
    (task, model)
}

async fn tickets(f: &Fixture) -> std::collections::BTreeMap<i64, String> {
    rows_of(f, "SELECT id, note FROM tickets ORDER BY id").await
}

/// The two columns of `sql`'s rows, as a map from the first to the second.
async fn rows_of<K, V>(f: &Fixture, sql: &str) -> std::collections::BTreeMap<K, V>
where
    K: for<'a> tokio_postgres::types::FromSql<'a> + Ord,
    V: for<'a> tokio_postgres::types::FromSql<'a>,
{
    f.client()
        .await
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, K>(0), r.get::<_, V>(1)))
        .collect()
}

#[tokio::test]
async fn a_run_asked_to_replay_puts_the_lost_rows_back_itself_and_their_ids_are_never_handed_out_again() {
    let f = logical_with_orders().await;
    // Asked on the carrier: the run replays what its restore discarded.
    let (task, model) = tickets_while_a_replaying_run_is_pushed(&f, 20).await;
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back:\n{}", text(&out));
    task.await.unwrap();
    let written = model.lock().unwrap().clone();
    let table = tickets(&f).await;
    assert_eq!(
        table,
        written,
        "every acknowledged row is back, as written:\n{}",
        text(&out)
    );

    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    let kept = &report["restore"]["lost_writes"]["kept"];
    let lost = kept["transactions"].as_u64().unwrap();
    assert!(lost >= 1, "the app wrote during the window: {report:#}");
    assert!(kept["sequences_advanced"].as_u64().unwrap() >= 1, "{report:#}");
    let replayed = &report["lost_writes_replay"]["replayed"];
    assert_eq!(replayed["applied"].as_array().unwrap().len() as u64, lost, "{report:#}");
    assert!(replayed["stopped"].is_null(), "{report:#}");
    let md = f.report_md(&run);
    assert!(
        md.contains(&format!(
            "- writes put back by the run (`backstop.dev/replay: auto`): {lost} transactions applied (0 by an earlier attempt), 0 left"
        )),
        "{md}"
    );
    assert!(md.contains("- sequences: "), "{md}");

    // The sequence went past the lost rows' ids at the restore: the
    // application's next row takes a fresh one.
    let next: i64 = f
        .client()
        .await
        .query_one("INSERT INTO tickets (note) VALUES ('after') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let highest = *written.keys().last().unwrap();
    assert!(next > highest, "new id {next} after the lost ones (up to {highest})");

    // A person's replay afterwards finds nothing left to do.
    let (out, again) = replay(&f, &run, &["-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(again["already"].as_array().unwrap().len() as u64, lost);
    assert!(again["applied"].as_array().unwrap().is_empty());
    assert_eq!(backstop_slots(&f).await, 0);
}

/// Adds 1 to one of five accounts per transaction (rows that were there
/// before the run, default replica identity: their changes carry only the
/// key) until its connection is ended; returns the balances as the
/// acknowledged commits left them.
fn account_writer(
    url: String,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Mutex<std::collections::BTreeMap<i32, i64>>>,
) {
    let balances = Arc::new(Mutex::new(
        (1..=5)
            .map(|id| (id, 0i64))
            .collect::<std::collections::BTreeMap<i32, i64>>(),
    ));
    let out = balances.clone();
    let task = tokio::spawn(async move {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        for n in 0i32.. {
            let id = n % 5 + 1;
            match client
                .query_one(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1 RETURNING balance",
                    &[&id],
                )
                .await
            {
                Ok(row) => {
                    out.lock().unwrap().insert(id, row.get(0));
                }
                Err(_) => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    (task, balances)
}

#[tokio::test]
async fn replay_never_overwrites_a_row_the_app_changed_since_the_restore_and_skip_goes_on_past_it() {
    let f = logical_with_orders().await;
    f.client()
        .await
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    let (task, model) = account_writer(f.server.url("shop"));
    wait_until("the app writes", || {
        let n: i64 = model.lock().unwrap().values().sum();
        async move { n >= 20 }
    })
    .await;
    rolled_back(&f, slow_failing_backfill()).await;
    task.await.unwrap();
    let expected = model.lock().unwrap().clone();
    let balances = || rows_of::<i32, i64>(&f, "SELECT id, balance FROM accounts ORDER BY id");
    let restored = balances().await;
    assert_ne!(restored, expected, "the restore took updates away");
    let report = f.reports().pop().unwrap();
    let run = report["run"].as_str().unwrap().to_string();
    let kept = report["restore"]["lost_writes"]["kept"]["rows"]["public.accounts"]["UPDATE"]
        .as_u64()
        .unwrap_or(0);
    assert!(kept >= 5, "lost updates on every account: {report:#}");

    // The application writes account 3 again after the restore.
    f.client()
        .await
        .execute("UPDATE accounts SET balance = 1000 WHERE id = 3", &[])
        .await
        .unwrap();
    // Replay applies the lost updates of the other accounts (rows as the
    // restore brought them back, then as replay itself left them), and
    // stops at the first on account 3 without touching it.
    let (out, done) = replay(&f, &run, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let why = done["stopped"][1].as_str().unwrap();
    assert!(
        why.contains("UPDATE on public.accounts where id = '3'") && why.contains("written after the recovery point"),
        "{why}"
    );
    assert_eq!(balances().await[&3], 1000, "never overwritten");
    // A person keeps the app's value: each lost update of account 3 is
    // skipped as it comes; the others go on.
    let mut skipped = 0;
    let mut stopped = done["stopped"][0].as_u64();
    while let Some(xid) = stopped {
        skipped += 1;
        assert!(skipped < 1_000, "replay must go on past skipped transactions");
        let (out, done) = replay(&f, &run, &["--skip", &xid.to_string(), "-o", "json"]);
        assert!(matches!(out.status.code(), Some(0 | 3)), "{}", text(&out));
        assert_eq!(done["skipped"][0].as_u64(), Some(xid), "{done:#}");
        stopped = done["stopped"][0].as_u64();
    }
    let after = balances().await;
    for id in [1, 2, 4, 5] {
        assert_eq!(after[&id], expected[&id], "account {id}: {after:?} vs {expected:?}");
    }
    assert_eq!(after[&3], 1000);
    // An xid that is not in the file is refused before anything runs.
    let (out, _) = replay(&f, &run, &["--skip", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--skip 1: no such transaction"), "{}", text(&out));
}

#[tokio::test]
async fn a_run_killed_during_its_own_replay_resumes_it_and_puts_each_write_back_once() {
    let f = logical_with_orders().await;
    let (task, model) = tickets_while_a_replaying_run_is_pushed(&f, 100).await;
    // Killed right after replay committed its first transaction.
    let mut child = f.spawn_run(
        &f.state(),
        &["--revert", "commit"],
        &[("BACKSTOP_TEST_PAUSE_AT", "lost-write-replayed")],
    );
    wait_for_line(&mut child, "test pause at lost-write-replayed").await;
    kill9(child).await;
    task.await.unwrap();
    let written = model.lock().unwrap().clone();

    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    let table = tickets(&f).await;
    assert_eq!(table, written, "each acknowledged row back, once:\n{}", text(&out));
    let report = f.reports().pop().unwrap();
    let lost = report["restore"]["lost_writes"]["kept"]["transactions"]
        .as_u64()
        .unwrap();
    let replayed = &report["lost_writes_replay"]["replayed"];
    let applied = replayed["applied"].as_array().unwrap().len() as u64;
    let already = replayed["already"].as_array().unwrap().len() as u64;
    assert_eq!(already, 1, "the killed attempt's transaction: {report:#}");
    assert_eq!(applied + already, lost, "{report:#}");
    assert!(replayed["stopped"].is_null(), "{report:#}");
    assert_eq!(backstop_slots(&f).await, 0);
}

#[tokio::test]
async fn killed_after_closing_the_database_the_resumed_restore_still_keeps_every_lost_write() {
    let f = logical_with_orders().await;
    events_table(&f).await;
    let (task, committed) = app_writing(&f).await;
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    // Killed with the database closed to the application and nothing kept yet.
    let mut child = f.spawn_run(
        &f.state(),
        &["--revert", "commit"],
        &[("BACKSTOP_TEST_PAUSE_AT", "lost-writes-database-closed")],
    );
    wait_for_line(&mut child, "test pause at lost-writes-database-closed").await;
    kill9(child).await;
    task.await.unwrap();
    assert!(!allows_connections(&f).await, "left closed by the killed attempt");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back: {}", text(&out));
    let written: BTreeSet<i64> = committed.lock().unwrap().iter().copied().collect();
    let lost = written.difference(&event_ids(&f).await).count() as u64;
    let report = f.reports().pop().unwrap();
    assert_eq!(
        report["restore"]["lost_writes"]["kept"]["transactions"].as_u64(),
        Some(lost),
        "{report:#}"
    );
    assert!(allows_connections(&f).await, "open again");
    assert_eq!(backstop_slots(&f).await, 0);
}

/// Whether `shop` takes connections (asked from the `postgres` database).
async fn allows_connections(f: &Fixture) -> bool {
    let (client, conn) = tokio_postgres::connect(&f.server.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one("SELECT datallowconn FROM pg_database WHERE datname = 'shop'", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_role_without_replication_is_told_what_it_needs_to_keep_lost_writes() {
    let f = Fixture::with_settings(LOGICAL).await;
    f.client()
        .await
        .batch_execute("CREATE ROLE app LOGIN; GRANT ALL ON DATABASE shop TO app")
        .await
        .unwrap();
    let url = f.server.url("shop").replace("postgres@", "app@");
    let db = backstop::db::Database::from_url(backstop::manifests::DatabaseRef::Url { var: "APP".into() }, &url, None)
        .unwrap();
    match backstop::capture::start(&db, "20261207-000000000-abc1234").await {
        backstop::capture::Capture::Unavailable { why, .. } => {
            assert!(why.contains("the role needs REPLICATION"), "{why}")
        }
        other => panic!("no slot without REPLICATION: {other:?}"),
    }
    assert_eq!(backstop_slots(&f).await, 0);
}
