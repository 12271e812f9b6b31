//! Datastore move between two real PostgreSQL servers: lock, export, import,
//! verify, unlock, rollback, and the refusals that keep data safe.

mod common;

use std::process::Output;

use backstop::pgserver::PgServer;
use common::text;

const SCHEMA: &str = "
CREATE TYPE status AS ENUM ('new', 'paid');
CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers (id), status status NOT NULL DEFAULT 'new', total numeric(10,2));
CREATE TABLE events (at timestamptz NOT NULL DEFAULT now(), body jsonb);
CREATE VIEW paid AS SELECT * FROM orders WHERE status = 'paid';
CREATE FUNCTION order_count() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM orders $$;
INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 50) g;
INSERT INTO orders (customer_id, status, total) SELECT 1 + g % 50, CASE WHEN g % 3 = 0 THEN 'paid'::status ELSE 'new' END, g * 1.5 FROM generate_series(1, 25000) g;
INSERT INTO events (body) SELECT jsonb_build_object('n', g) FROM generate_series(1, 100) g;
CREATE ROLE app LOGIN;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
";

struct Move {
    source: PgServer,
    target: PgServer,
    dir: tempfile::TempDir,
}

impl Move {
    async fn new() -> Self {
        let source = PgServer::start().await.unwrap();
        let target = PgServer::start().await.unwrap();
        source.create_database("shop").await.unwrap();
        target.create_database("shop").await.unwrap();
        source
            .database("shop")
            .unwrap()
            .connect()
            .await
            .unwrap()
            .batch_execute(SCHEMA)
            .await
            .unwrap();
        // Roles are per server and not part of a database dump: they exist on the target.
        target
            .database("shop")
            .unwrap()
            .connect()
            .await
            .unwrap()
            .batch_execute("CREATE ROLE app LOGIN")
            .await
            .unwrap();
        Self {
            source,
            target,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn dump(&self) -> String {
        self.dir.path().join("shop.dump").display().to_string()
    }

    async fn ds(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .arg("datastore")
            .args(args)
            .output()
            .await
            .unwrap()
    }

    async fn step(&self, args: &[&str]) -> String {
        let out = self.ds(args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        text(&out)
    }

    async fn lock_export_import(&self) {
        let (s, t, f) = (self.source.url("shop"), self.target.url("shop"), self.dump());
        self.step(&["lock", "--source", &s]).await;
        self.step(&["export", "--source", &s, "-o", &f]).await;
        self.step(&["import", "--target", &t, "-f", &f]).await;
    }

    async fn verify(&self) -> Output {
        self.ds(&[
            "verify",
            "--source",
            &self.source.url("shop"),
            "--target",
            &self.target.url("shop"),
        ])
        .await
    }

    async fn source_sql(&self, sql: &str) {
        let c = self.source.database("shop").unwrap().connect().await.unwrap();
        c.batch_execute(sql).await.unwrap();
    }

    async fn target_sql(&self, sql: &str) {
        let c = self.target.database("shop").unwrap().connect().await.unwrap();
        c.batch_execute(&format!("BEGIN; SET TRANSACTION READ WRITE; {sql}; COMMIT;"))
            .await
            .unwrap();
    }
}

fn app_url(server: &PgServer) -> String {
    format!("postgresql://app@127.0.0.1:{}/shop", server.port())
}

#[tokio::test]
async fn full_move_passes_verify_and_the_unlocked_target_takes_writes() {
    let m = Move::new().await;
    m.lock_export_import().await;
    let out = m.verify().await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("public.orders"), "{report}");
    assert!(report.contains("25000        25000  ok"), "{report}");
    assert!(report.contains("3 table(s), 0 differ"), "{report}");
    // The target stays locked until unlock; then the app writes there.
    assert!(tokio_postgres::connect(&app_url(&m.target), tokio_postgres::NoTls)
        .await
        .is_err());
    let unlocked = m.step(&["unlock", "--url", &m.target.url("shop")]).await;
    assert!(unlocked.contains("unlocked"), "{unlocked}");
    let (app, conn) = tokio_postgres::connect(&app_url(&m.target), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    app.batch_execute("INSERT INTO customers (name) VALUES ('new on target')")
        .await
        .unwrap();
    let n: i64 = app.query_one("SELECT order_count()", &[]).await.unwrap().get(0);
    assert_eq!(n, 25000, "functions moved too");
}

#[tokio::test]
async fn writes_are_refused_on_a_locked_source_and_lock_is_rerunnable() {
    let m = Move::new().await;
    let s = m.source.url("shop");
    let first = m.step(&["lock", "--source", &s, "--reason", "move to cnpg"]).await;
    assert!(first.contains("CONNECT revoked from PUBLIC"), "{first}");
    let err = tokio_postgres::connect(&app_url(&m.source), tokio_postgres::NoTls)
        .await
        .err()
        .expect("app refused");
    assert!(
        err.to_string().contains("permission denied") || format!("{err:?}").contains("permission denied"),
        "{err:?}"
    );
    let admin = m.source.database("shop").unwrap().connect().await.unwrap();
    let write = admin
        .batch_execute("INSERT INTO customers (name) VALUES ('late')")
        .await
        .unwrap_err();
    assert!(format!("{write:?}").contains("read-only transaction"), "{write:?}");
    let again = m.step(&["lock", "--source", &s]).await;
    assert!(again.contains("is already locked (as source)"), "{again}");
    assert!(again.contains("move to cnpg"), "{again}");
}

#[tokio::test]
async fn verify_reports_a_changed_row_a_missing_row_and_a_missing_table() {
    let m = Move::new().await;
    m.lock_export_import().await;
    // `customers` is hashed by record (portable types), `orders` by text (an enum).
    m.target_sql("UPDATE orders SET total = 0 WHERE id = 42; DELETE FROM orders WHERE id = 20001; DROP TABLE events; UPDATE customers SET name = 'renamed' WHERE id = 7")
        .await;
    let out = m.verify().await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("42: changed"), "{report}");
    assert!(
        report.contains(
            "public.customers                                   50           50  rows differ\n    7: changed"
        ),
        "{report}"
    );
    assert!(
        report.contains("public.events") && report.contains("missing in target"),
        "{report}"
    );
    assert!(report.contains("25000        24999  rows differ"), "{report}");
    let json = m
        .ds(&[
            "verify",
            "--format",
            "json",
            "--source",
            &m.source.url("shop"),
            "--target",
            &m.target.url("shop"),
        ])
        .await;
    let diffs: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let orders = diffs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["table"] == "public.orders")
        .unwrap();
    assert_eq!(orders["status"], "rows differ");
    // A deletion further on is found too once the earlier chunk matches again.
    m.target_sql("UPDATE orders SET total = 42 * 1.5 WHERE id = 42").await;
    let report = text(&m.verify().await);
    assert!(report.contains("20001: missing in target"), "{report}");
}

#[tokio::test]
async fn rollback_returns_the_source_to_service_and_empties_the_target() {
    let m = Move::new().await;
    m.lock_export_import().await;
    let out = m
        .step(&[
            "rollback",
            "--source",
            &m.source.url("shop"),
            "--target",
            &m.target.url("shop"),
        ])
        .await;
    assert!(out.contains("rolled back"), "{out}");
    let (app, conn) = tokio_postgres::connect(&app_url(&m.source), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    app.batch_execute("INSERT INTO customers (name) VALUES ('back in service')")
        .await
        .unwrap();
    let t = m.target.database("shop").unwrap().connect().await.unwrap();
    let left: i64 = t
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "everything import created is gone");
    let again = m
        .ds(&[
            "rollback",
            "--source",
            &m.source.url("shop"),
            "--target",
            &m.target.url("shop"),
        ])
        .await;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("was unlocked at"), "{}", text(&again));
}

#[tokio::test]
async fn rollback_is_refused_when_the_source_is_gone() {
    let mut m = Move::new().await;
    m.lock_export_import().await;
    let source_url = m.source.url("shop");
    m.source.stop().await.unwrap();
    let out = m
        .ds(&["rollback", "--source", &source_url, "--target", &m.target.url("shop")])
        .await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert!(
        report.contains("rollback needs the source, which cannot be reached"),
        "{report}"
    );
    // Nothing was dropped in the target.
    let t = m.target.database("shop").unwrap().connect().await.unwrap();
    let n: i64 = t.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 25000);
}

#[tokio::test]
async fn import_into_a_non_empty_target_is_refused_and_export_needs_a_lock() {
    let m = Move::new().await;
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    let out = m.ds(&["export", "--source", &s, "-o", &f]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is not locked"), "{}", text(&out));
    m.step(&["lock", "--source", &s]).await;
    m.step(&["export", "--source", &s, "-o", &f]).await;
    m.target_sql("CREATE TABLE already_here (id int)").await;
    let out = m.ds(&["import", "--target", &t, "-f", &f]).await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert!(
        report.contains("is not empty (1 table(s), e.g. public.already_here)"),
        "{report}"
    );
    let c = m.target.database("shop").unwrap().connect().await.unwrap();
    let tables: i64 = c
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "nothing imported");
    // A dump is never overwritten.
    let out = m.ds(&["export", "--source", &s, "-o", &f]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    let forced = m.step(&["import", "--target", &t, "-f", &f, "--allow-non-empty"]).await;
    assert!(forced.contains("imported"), "{forced}");
    let again = m.step(&["import", "--target", &t, "-f", &f, "--allow-non-empty"]).await;
    assert!(again.contains("already holds this import"), "{again}");
}

#[tokio::test]
async fn a_killed_import_takes_its_pg_restore_with_it_and_rollback_cleans_up() {
    let m = Move::new().await;
    // Enough data that pg_restore runs for a while.
    m.source_sql(
        "CREATE TABLE bulk AS SELECT g AS id, md5(g::text) || md5((g + 1)::text) AS body FROM generate_series(1, 1500000) g",
    )
    .await;
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    m.step(&["lock", "--source", &s]).await;
    m.step(&["export", "--source", &s, "-o", &f]).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["datastore", "import", "--target", &t, "-f", &f])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target = m.target.database("shop").unwrap().connect().await.unwrap();
    let restoring = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_restore' AND datname = 'shop'";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n: i64 = target.query_one(restoring, &[]).await.unwrap().get(0);
        if n > 0 {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().await.unwrap();
            panic!("import ended before pg_restore was seen: {}", text(&out));
        }
        assert!(tokio::time::Instant::now() < deadline, "pg_restore never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    // pg_restore dies with backstop: its session ends and its transaction is rolled back.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = target.query_one(restoring, &[]).await.unwrap().get(0);
        if n == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "pg_restore outlived backstop");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The parallel import commits table by table: the intent was recorded
    // first, so a new import is refused until rollback, which drops it all.
    let again = m.ds(&["import", "--target", &t, "-f", &f]).await;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("did not finish"), "{}", text(&again));
    let out = m.step(&["rollback", "--source", &s, "--target", &t]).await;
    assert!(out.contains("rolled back"), "{out}");
    let left =
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'";
    let n: i64 = target.query_one(left, &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "rollback left objects of the killed import");
    // The source is back in service, and the move can start over.
    let (app, conn) = tokio_postgres::connect(&app_url(&m.source), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    app.batch_execute("INSERT INTO customers (name) VALUES ('back in service')")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_parallel_import_drops_what_it_created_and_keeps_what_was_there() {
    let m = Move::new().await;
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    m.step(&["lock", "--source", &s]).await;
    m.step(&["export", "--source", &s, "-o", &f]).await;
    // The target already has an `orders`: the import creates `customers` and
    // `events` (tables come in name order), then fails on `orders`.
    m.target_sql("CREATE TABLE orders (kept int); INSERT INTO orders VALUES (7)")
        .await;
    let out = m
        .ds(&["import", "--target", &t, "-f", &f, "--allow-non-empty", "--jobs", "2"])
        .await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(report.contains("pg_restore into"), "{report}");
    assert!(report.contains("dropped the"), "{report}");
    let c = m.target.database("shop").unwrap().connect().await.unwrap();
    let left: Vec<String> = c
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["orders".to_string()], "only what was there before is left");
    let kept: i32 = c.query_one("SELECT kept FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(kept, 7);
    // Nothing is pending: once the target is cleared, the import goes through.
    m.target_sql("DROP TABLE orders").await;
    m.step(&["import", "--target", &t, "-f", &f]).await;
    let out = m.verify().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test]
async fn verify_finds_a_missing_duplicate_in_a_table_without_a_primary_key_or_a_hashable_type() {
    // `json` has no hash function: the table is checksummed by its rows' text.
    let m = Move::new().await;
    m.source_sql("CREATE TABLE notes (v text, meta json); INSERT INTO notes SELECT 'n' || g, '{}' FROM generate_series(1, 5000) g; INSERT INTO notes VALUES ('dup', '{}'), ('dup', '{}')")
        .await;
    m.lock_export_import().await;
    let out = m.verify().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    m.target_sql("DELETE FROM notes WHERE ctid = (SELECT ctid FROM notes WHERE v = 'dup' LIMIT 1)")
        .await;
    let out = m.verify().await;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("5002         5001  rows differ"), "{report}");
    assert!(report.contains("(dup,{}) (copy 2): missing in target"), "{report}");
}

async fn target_count(m: &Move, sql: &str) -> i64 {
    let t = m.target.database("shop").unwrap().connect().await.unwrap();
    t.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn rollback_removes_everything_the_import_made_so_the_target_takes_the_import_again() {
    let m = Move::new().await;
    // The source is a database backstop runs migrations on: it has history.
    m.source_sql(
        "CREATE SCHEMA backstop; CREATE TABLE backstop.migration_history (seq bigserial PRIMARY KEY, id text NOT NULL);
         INSERT INTO backstop.migration_history (id) VALUES ('0001-orders')",
    )
    .await;
    m.lock_export_import().await;
    assert_eq!(
        target_count(&m, "SELECT count(*) FROM backstop.migration_history").await,
        1
    );
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    let out = m.step(&["rollback", "--source", &s, "--target", &t]).await;
    assert!(out.contains("dropped the backstop schema the import created"), "{out}");
    assert_eq!(
        target_count(&m, "SELECT count(*) FROM pg_namespace WHERE nspname = 'backstop'").await,
        0,
        "no history of the source is left for a later `backstop run` to trust"
    );
    // The same dump goes in again, history and all.
    m.step(&["lock", "--source", &s]).await;
    let out = m.step(&["import", "--target", &t, "-f", &f]).await;
    assert!(out.starts_with("imported"), "{out}");
    assert_eq!(
        target_count(&m, "SELECT count(*) FROM backstop.migration_history").await,
        1
    );
    assert_eq!(target_count(&m, "SELECT count(*) FROM orders").await, 25_000);
}

#[tokio::test]
async fn the_same_dump_imports_once_and_another_dump_into_an_imported_target_is_refused() {
    let m = Move::new().await;
    m.lock_export_import().await;
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    let out = m.step(&["import", "--target", &t, "-f", &f]).await;
    assert!(out.contains("already holds this import"), "{out}");
    // A later dump (its table of contents names another time).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let other = m.dir.path().join("later.dump").display().to_string();
    m.step(&["export", "--source", &s, "-o", &other]).await;
    let out = m.ds(&["import", "--target", &t, "-f", &other]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("already holds an import of another dump"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("Nothing was changed"), "{}", text(&out));
    assert_eq!(target_count(&m, "SELECT count(*) FROM orders").await, 25_000);
}

#[tokio::test]
async fn an_import_granting_to_roles_the_target_lacks_is_refused_before_anything_changes() {
    let m = Move::new().await;
    m.source_sql("CREATE ROLE reporting; GRANT SELECT ON orders TO reporting;")
        .await;
    let (s, t, f) = (m.source.url("shop"), m.target.url("shop"), m.dump());
    m.step(&["lock", "--source", &s]).await;
    m.step(&["export", "--source", &s, "-o", &f]).await;
    let out = m.ds(&["import", "--target", &t, "-f", &f]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("role(s) reporting"), "{said}");
    assert!(
        said.contains("CREATE ROLE reporting NOLOGIN") && said.contains("--no-privileges"),
        "{said}"
    );
    assert_eq!(
        target_count(
            &m,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'backstop')"
        )
        .await,
        0,
        "nothing was created"
    );
    let out = m.step(&["import", "--target", &t, "-f", &f, "--no-privileges"]).await;
    assert!(out.starts_with("imported"), "{out}");
}

#[tokio::test]
async fn unlocking_the_source_of_a_move_is_refused_without_force_once_it_was_exported() {
    let m = Move::new().await;
    m.lock_export_import().await;
    let (s, t) = (m.source.url("shop"), m.target.url("shop"));
    m.step(&["unlock", "--url", &t]).await;
    let out = m.ds(&["unlock", "--url", &s]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("both sides writable") && said.contains("rollback"),
        "{said}"
    );
    // The source still refuses the app's writes.
    let (app, conn) = tokio_postgres::connect(&app_url(&m.source), tokio_postgres::NoTls)
        .await
        .map(|(c, conn)| (Some(c), Some(conn)))
        .unwrap_or((None, None));
    if let (Some(app), Some(conn)) = (app, conn) {
        tokio::spawn(conn);
        assert!(app
            .batch_execute("INSERT INTO customers (name) VALUES ('split brain')")
            .await
            .is_err());
    }
    let out = m.step(&["unlock", "--url", &s, "--force"]).await;
    assert!(out.contains("unlocked"), "{out}");
}
