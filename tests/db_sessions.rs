//! Bookkeeping sessions are reused within a pass, and never lent dirty: a
//! released session comes back reset (settings, temporary tables, advisory
//! locks gone), a session left in a transaction or dropped without release
//! is closed, a session whose backend was terminated is not lent again, and
//! the statements the client keeps for looking types up survive the reset.
//! Against a real PostgreSQL.

use backstop::pgserver::PgServer;

/// The idle sessions are one per process, and one test closes them all (as
/// a migration does): the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn pid(client: &tokio_postgres::Client) -> i32 {
    client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_released_session_is_lent_again_with_everything_its_holder_set_reset() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let first = pid(&s).await;
    s.batch_execute(
        "SET statement_timeout = 1234; SET application_name = 'dirty';
         CREATE TEMP TABLE scratch (x int); SELECT pg_advisory_lock(42);",
    )
    .await
    .unwrap();
    s.release().await;

    let s = db.session().await.unwrap();
    assert_eq!(pid(&s).await, first, "the released session is reused");
    let row = s
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('application_name'),
                    to_regclass('pg_temp.scratch') IS NULL,
                    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "0");
    assert_eq!(row.get::<_, String>(1), "");
    assert!(row.get::<_, bool>(2), "the temporary table is gone");
    assert_eq!(row.get::<_, i64>(3), 0, "the advisory lock is released");
    s.release().await;
}

#[tokio::test]
async fn a_session_left_in_a_transaction_or_dropped_is_closed_not_lent() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let first = pid(&s).await;
    s.batch_execute("BEGIN; CREATE TABLE half_done (x int)").await.unwrap();
    s.release().await;
    let s = db.session().await.unwrap();
    let second = pid(&s).await;
    assert_ne!(second, first, "a session inside a transaction is never lent");
    // The open transaction died with its session: nothing half-done stays.
    let exists: bool = s
        .query_one("SELECT to_regclass('half_done') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);

    s.batch_execute("BEGIN; SELECT 1/0").await.unwrap_err();
    s.release().await;
    let s = db.session().await.unwrap();
    let third = pid(&s).await;
    assert_ne!(third, second, "a session in an aborted transaction is never lent");

    drop(s);
    let s = db.session().await.unwrap();
    assert_ne!(pid(&s).await, third, "a session dropped without release is closed");
}

#[tokio::test]
async fn a_session_whose_backend_was_terminated_is_not_lent_again() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let first = pid(&s).await;
    s.release().await;
    let other = server.database("postgres").unwrap().connect().await.unwrap();
    other
        .query_one("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    // The connection task sees the server hang up.
    for _ in 0..100 {
        let gone: bool = other
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&first],
            )
            .await
            .unwrap()
            .get(0);
        if gone {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let s = db.session().await.unwrap();
    assert_ne!(pid(&s).await, first);
    s.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn sessions_to_another_database_or_role_are_not_shared() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    server.create_database("shop").await.unwrap();
    let a = server.database("postgres").unwrap();
    let b = server.database("shop").unwrap();
    let s = a.session().await.unwrap();
    let first = pid(&s).await;
    s.release().await;
    let s = b.session().await.unwrap();
    assert_ne!(pid(&s).await, first);
    let name: String = s
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "shop");
}

/// tokio-postgres prepares statements of its own to look types up, once per
/// client: a reset that deallocated them would break the next session's
/// first query returning a type of the database's own.
#[tokio::test]
async fn a_reused_session_still_looks_up_the_databases_own_types() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    s.batch_execute("CREATE TYPE mood1 AS ENUM ('a'); CREATE TYPE mood2 AS ENUM ('b')")
        .await
        .unwrap();
    let first = pid(&s).await;
    s.prepare("SELECT 'a'::mood1").await.unwrap();
    s.release().await;
    let s = db.session().await.unwrap();
    assert_eq!(pid(&s).await, first);
    s.prepare("SELECT 'b'::mood2").await.unwrap();
    s.release().await;
}

#[tokio::test]
async fn a_fresh_session_is_one_that_logged_in_within_the_bound_with_the_current_defaults() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let old = pid(&s).await;
    s.release().await;
    let admin = db.connect().await.unwrap();
    admin
        .batch_execute("ALTER DATABASE postgres SET lock_timeout = '7s'")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Logged in 300 ms ago: too old for a 100 ms bound, so a new login that
    // has the new default.
    let m = db.fresh_session(std::time::Duration::from_millis(100)).await.unwrap();
    assert_ne!(pid(&m).await, old, "the older session is not taken");
    let timeout: String = m
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "7s");
    drop(m);
    // Within the bound, the idle session is taken.
    let m = db.fresh_session(std::time::Duration::from_secs(60)).await.unwrap();
    assert_eq!(pid(&m).await, old, "a young enough idle session is reused");
}

#[tokio::test]
async fn a_session_lent_while_a_migration_closed_the_idle_ones_is_not_kept_when_released() {
    let _turn = SERIAL.lock().await;
    // Another task (a controller's other reconcile) holds a session while a
    // migration changes the database's defaults and closes the idle ones:
    // given back later, it is closed, not lent to the next migration.
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let held = db.session().await.unwrap();
    let old = pid(&held).await;
    let admin = db.connect().await.unwrap();
    admin
        .batch_execute("ALTER DATABASE postgres SET lock_timeout = '9s'")
        .await
        .unwrap();
    backstop::db::close_idle();
    held.release().await;
    let m = db.fresh_session(std::time::Duration::from_secs(60)).await.unwrap();
    assert_ne!(pid(&m).await, old, "the session from before the migration is not lent");
    let timeout: String = m
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "9s");
}

#[tokio::test]
async fn backstops_own_statements_stay_prepared_on_the_connection_between_holders() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let first: i32 = s.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    s.release().await;
    let s = db.session().await.unwrap();
    let again: i32 = s.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(again, first, "the released session is reused");
    let prepared: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT pg_backend_pid()'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        prepared, 1,
        "prepared once, by the first holder, and used by the second"
    );
    s.release().await;
}

#[tokio::test]
async fn a_kept_statement_that_fails_is_prepared_afresh_next_time() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let other = db.connect().await.unwrap();
    other
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let s = db.session().await.unwrap();
    assert_eq!(s.query("SELECT * FROM t", &[]).await.unwrap()[0].len(), 1);
    // The table changes shape under the kept plan.
    other
        .batch_execute("DROP TABLE t; CREATE TABLE t (x text, y int); INSERT INTO t VALUES ('a', 2)")
        .await
        .unwrap();
    assert!(
        s.query("SELECT * FROM t", &[]).await.is_err(),
        "the kept plan no longer fits"
    );
    let rows = s.query("SELECT * FROM t", &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
    assert_eq!(rows[0].get::<_, String>(0), "a");
    s.release().await;
}

#[tokio::test]
async fn after_a_migration_the_sessions_from_before_serve_the_bookkeeping_but_not_a_migration_or_the_catalog() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    let db = server.database("postgres").unwrap();
    let s = db.session().await.unwrap();
    let before = pid(&s).await;
    s.release().await;
    // A migration changes the database's defaults and ends.
    let admin = db.connect().await.unwrap();
    admin
        .batch_execute("ALTER DATABASE postgres SET lock_timeout = '8s'")
        .await
        .unwrap();
    backstop::db::defaults_changed();
    let s = db.session().await.unwrap();
    assert_eq!(pid(&s).await, before, "the bookkeeping goes on on the session it has");
    s.release().await;
    for session in [
        db.current_session().await.unwrap(),
        db.fresh_session(std::time::Duration::from_secs(60)).await.unwrap(),
    ] {
        assert_ne!(pid(&session).await, before, "the session from before is not lent here");
        let timeout: String = session
            .query_one("SELECT current_setting('lock_timeout')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "8s");
    }
}

/// The client backends on database `db` other than `me`.
async fn backends(admin: &tokio_postgres::Client, db: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_holder_waits_for_the_login_a_prewarm_began_instead_of_logging_in_again() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    server.create_database("shop").await.unwrap();
    let admin = server.database("postgres").unwrap().connect().await.unwrap();
    let db = server.database("shop").unwrap();
    db.prewarm_session(1, &[]);
    // Asked while that login is under way: it is the one lent.
    let s = db.session().await.unwrap();
    assert_eq!(backends(&admin, "shop").await, 1, "one login, not two");
    s.release().await;
    // One is idle: a prewarm of one starts nothing; of two, one more.
    db.prewarm_session(1, &[]);
    db.prewarm_session(2, &[]);
    db.prewarm_session(2, &[]);
    let (a, b) = (db.session().await.unwrap(), db.session().await.unwrap());
    assert_ne!(pid(&a).await, pid(&b).await);
    assert_eq!(backends(&admin, "shop").await, 2);
    a.release().await;
    b.release().await;
}

#[tokio::test]
async fn a_prewarmed_session_is_lent_with_the_statements_asked_ahead_prepared_and_one_that_fails_skipped() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    server.create_database("shop").await.unwrap();
    let db = server.database("shop").unwrap();
    db.prewarm_session(1, &["SELECT 41", "SELECT * FROM no_such_table", "SELECT 42"]);
    let s = db.session().await.unwrap();
    let prepared = prepared_on(&s).await;
    assert!(
        prepared.iter().any(|p| p == "SELECT 41") && prepared.iter().any(|p| p == "SELECT 42"),
        "prepared while it logged in: {prepared:?}"
    );
    assert!(!prepared.iter().any(|p| p.contains("no_such_table")), "{prepared:?}");
    // Asked again, the statement prepared ahead is the one run: none is added.
    let n = prepared.len();
    let v: i32 = s.query_one("SELECT 42", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
    assert_eq!(prepared_on(&s).await.len(), n, "no statement prepared twice");
    s.release().await;
}

/// The statements prepared on the session's connection, oldest first (the
/// listing's own included).
async fn prepared_on(s: &backstop::db::Session) -> Vec<String> {
    s.query(
        "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn a_connection_that_found_backstops_tables_does_not_look_again_and_one_after_a_restore_does() {
    let _turn = SERIAL.lock().await;
    let server = PgServer::start().await.unwrap();
    server.create_database("shop").await.unwrap();
    let db = server.database("shop").unwrap();
    let s = db.session().await.unwrap();
    assert!(!s.schema_seen());
    backstop::owner::ensure_schema(&s).await.unwrap();
    assert!(s.schema_seen());
    s.release().await;
    let s = db.session().await.unwrap();
    assert!(s.schema_seen(), "the same connection, lent again");
    s.release().await;
    // A restore ends the sessions: the next connection looks for itself.
    backstop::db::close_idle();
    let s = db.session().await.unwrap();
    assert!(!s.schema_seen());
    backstop::owner::ensure_schema(&s).await.unwrap();
    assert!(s.schema_seen(), "made or found, it is seen");
    s.release().await;
}
