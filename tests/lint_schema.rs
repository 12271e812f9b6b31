//! The schema-aware analysis against a real PostgreSQL: catalog facts turn a
//! blocking statement on a small table into a warning and on a large one
//! into an error with its size; `IF NOT EXISTS`, type widening and dropped
//! constraints are judged against the live schema; `backstop plan
//! --database-url` shows the facts and keeps the static plan hash; a run's
//! plan phase uses them too.

mod common;

use backstop::lint::{self, Catalog, LintOptions, Severity};
use common::*;

/// `big` (well over the small-table limit), `tiny` (empty), `users` with a
/// varchar column, a unique and a check constraint, a NOT NULL column with a
/// default, a unique index, and two functions of known volatility.
async fn schema(f: &Fixture) {
    f.client()
        .await
        .batch_execute(
            "CREATE TABLE big (id bigint, payload text);
             INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 120000) g;
             CREATE TABLE tiny (id int, code text);
             CREATE TABLE parted (id bigint, payload text) PARTITION BY RANGE (id);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (1000000);
             INSERT INTO parted SELECT g, repeat('x', 100) FROM generate_series(1, 120000) g;
             CREATE TABLE users (id int, name varchar(50), email text, age int, status text NOT NULL DEFAULT 'new',
                                 CONSTRAINT users_email_key UNIQUE (email), CONSTRAINT users_age_check CHECK (age > 0));
             CREATE UNIQUE INDEX users_id_idx ON users (id);
             CREATE FUNCTION make_token() RETURNS text LANGUAGE sql VOLATILE AS 'SELECT md5(random()::text)';
             CREATE FUNCTION tenant_default() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
             ANALYZE;",
        )
        .await
        .unwrap();
}

async fn catalog(f: &Fixture) -> Catalog {
    catalog_of(f, None).await
}

/// The catalog read for `names` only (every relation when None).
async fn catalog_of(f: &Fixture, names: Option<&[String]>) -> Catalog {
    let db = f.server.database("shop").unwrap();
    let session = db.session().await.unwrap();
    let cat = Catalog::load(&session, names).await.unwrap();
    session.release().await;
    cat
}

fn analyse(sql: &str, catalog: Option<&Catalog>) -> lint::Analysis {
    let statements = backstop::sql::split("m.sql", sql, 1).unwrap();
    lint::analyse(&statements, LintOptions::default(), catalog)
}

fn rules(a: &lint::Analysis) -> Vec<(String, Severity)> {
    a.findings.iter().map(|f| (f.rule.clone(), f.severity)).collect()
}

#[tokio::test]
async fn table_size_turns_a_blocking_statement_into_a_warning_or_an_error_with_its_size() {
    let f = Fixture::new().await;
    schema(&f).await;
    let cat = catalog(&f).await;
    let big = cat.table("public.big").expect("big is in the catalog");
    assert!(big.bytes > 8 << 20 && big.rows.unwrap() > 100_000.0, "{big:?}");

    let on_tiny = analyse(
        "SET lock_timeout = '5s';\nCREATE INDEX tiny_code ON tiny (code);",
        Some(&cat),
    );
    assert_eq!(rules(&on_tiny), vec![("BS301".to_string(), Severity::Warning)]);
    let facts = on_tiny.findings[0].facts.as_deref().unwrap();
    assert!(
        facts.starts_with("public.tiny: ~0 rows") && facts.contains("small"),
        "{facts}"
    );
    assert_eq!(lint::errors(&on_tiny.findings), 0);

    let on_big = analyse(
        "SET lock_timeout = '5s';\nCREATE INDEX big_payload ON big (payload);",
        Some(&cat),
    );
    assert_eq!(rules(&on_big), vec![("BS301".to_string(), Severity::Error)]);
    let facts = on_big.findings[0].facts.as_deref().unwrap();
    assert!(facts.starts_with("public.big: ~120,000 rows, "), "{facts}");
    assert!(facts.contains("MB: expect the lock to be held"), "{facts}");

    // A partitioned table stores nothing itself: its partitions' size counts.
    let on_parted = analyse(
        "SET lock_timeout = '5s';\nCREATE INDEX parted_payload ON parted (payload);",
        Some(&cat),
    );
    assert_eq!(rules(&on_parted), vec![("BS301".to_string(), Severity::Error)]);

    // Without the catalog the same statement is an error either way.
    let blind = analyse("SET lock_timeout = '5s';\nCREATE INDEX tiny_code ON tiny (code);", None);
    assert_eq!(rules(&blind), vec![("BS301".to_string(), Severity::Error)]);
    assert!(blind.findings[0].facts.is_none());
}

#[tokio::test]
async fn the_catalog_read_for_what_a_migration_names_judges_it_as_the_whole_catalog_does() {
    let f = Fixture::new().await;
    schema(&f).await;
    f.client()
        .await
        .batch_execute(
            r#"CREATE TABLE "Odd""Name" (id int);
               CREATE TABLE a_table_whose_name_is_longer_than_the_sixty_three_bytes_postgres_keeps (id int);
               CREATE TABLE data (id int, v text);
               CREATE TABLE Ärger (id int, status text NOT NULL DEFAULT 'x');"#,
        )
        .await
        .unwrap();
    let full = catalog(&f).await;
    let cases = [
        "SET lock_timeout = '5s';\nCREATE INDEX tiny_code ON tiny (code);",
        "SET lock_timeout = '5s';\nCREATE INDEX big_payload ON big (payload);",
        "SET lock_timeout = '5s';\nALTER TABLE parted ADD COLUMN c int NOT NULL DEFAULT 0;",
        "SET lock_timeout = '5s';\nCREATE TABLE IF NOT EXISTS big (id int);\nCREATE INDEX big_id ON big (id);",
        "SET lock_timeout = '5s';\nALTER TABLE users ALTER COLUMN name TYPE varchar(10);",
        "SET lock_timeout = '5s';\nALTER TABLE users DROP CONSTRAINT users_email_key;",
        "SET lock_timeout = '5s';\nALTER TABLE users ALTER COLUMN status DROP DEFAULT;",
        "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN t text DEFAULT make_token();",
        "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN tenant int DEFAULT tenant_default();",
        "SET lock_timeout = '5s';\nALTER TABLE users ADD PRIMARY KEY (id);",
        // An index named, not its table.
        "SET lock_timeout = '5s';\nDROP INDEX users_id_idx;\nCREATE INDEX users_id_idx ON users (id);",
        // A doubled quote inside a quoted name, a name PostgreSQL cuts to 63
        // bytes, and one spelled with Unicode escapes.
        "SET lock_timeout = '5s';\nALTER TABLE \"Odd\"\"Name\" ADD COLUMN c int NOT NULL DEFAULT 0;",
        "SET lock_timeout = '5s';\nALTER TABLE a_table_whose_name_is_longer_than_the_sixty_three_bytes_postgres_keeps_indeed ALTER COLUMN id TYPE bigint;",
        "SET lock_timeout = '5s';\nALTER TABLE U&\"d\\0061ta\" ALTER COLUMN v TYPE int USING v::int;",
        // PostgreSQL folds only ASCII letters, and a stray quote in a
        // comment opens no quoted name.
        "SET lock_timeout = '5s';\n-- the 27\" screens\nALTER TABLE Ärger ALTER COLUMN status DROP DEFAULT;",
        "SELECT 1;",
    ];
    for sql in cases {
        let names = lint::catalog::names([sql]);
        let narrowed = catalog_of(&f, names.as_deref()).await;
        assert!(
            narrowed.tables.len() < full.tables.len() || names.is_none(),
            "{sql}: read whole"
        );
        let (a, b) = (analyse(sql, Some(&full)), analyse(sql, Some(&narrowed)));
        assert_eq!(format!("{:?}", a.findings), format!("{:?}", b.findings), "{sql}");
        assert_eq!(a.facts, b.facts, "{sql}");
    }
    // What the analysis found in the whole catalog is there in the narrowed one.
    let sql = "SET lock_timeout = '5s';\nALTER TABLE \"Odd\"\"Name\" ALTER COLUMN id TYPE bigint;";
    let narrowed = catalog_of(&f, lint::catalog::names([sql]).as_deref()).await;
    assert!(
        narrowed.table("public.Odd\"Name").is_some(),
        "{:?}",
        narrowed.tables.keys()
    );
    assert!(narrowed.table("public.big").is_none());
    assert!(lint::catalog::names(["ALTER TABLE u&\"x\" ADD c int"]).is_none());
}

#[tokio::test]
async fn if_not_exists_type_widening_and_dropped_constraints_are_judged_against_the_live_schema() {
    let f = Fixture::new().await;
    schema(&f).await;
    let cat = catalog(&f).await;

    // IF NOT EXISTS: a missing table is created (new, so its index is
    // free); an existing one is not.
    let missing = analyse(
        "SET lock_timeout = '5s';\nCREATE TABLE IF NOT EXISTS fresh (id int);\nCREATE INDEX fresh_id ON fresh (id);",
        Some(&cat),
    );
    assert!(missing.findings.is_empty(), "{:?}", missing.findings);
    assert!(
        missing.facts[0].contains("public.fresh does not exist yet"),
        "{:?}",
        missing.facts
    );
    let existing = analyse(
        "SET lock_timeout = '5s';\nCREATE TABLE IF NOT EXISTS big (id int);\nCREATE INDEX big_id ON big (id);",
        Some(&cat),
    );
    assert_eq!(rules(&existing), vec![("BS301".to_string(), Severity::Error)]);

    // varchar(50) widened: no rewrite, no destructive change; narrowed: both.
    let widen = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users ALTER COLUMN name TYPE varchar(100);\nALTER TABLE users ALTER COLUMN name TYPE text;",
        Some(&cat),
    );
    assert!(widen.findings.is_empty(), "{:?}", widen.findings);
    assert!(
        widen.facts[0].contains("public.users.name is character varying(50): widening varchar rewrites nothing"),
        "{:?}",
        widen.facts
    );
    let narrow = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users ALTER COLUMN name TYPE varchar(10);",
        Some(&cat),
    );
    assert_eq!(
        rules(&narrow),
        vec![("BS111".into(), Severity::Error), ("BS310".into(), Severity::Warning)],
        "users is small: the rewrite is a warning, the type change still destructive"
    );

    // A unique constraint the app's ON CONFLICT may need is an error; a
    // check only loosens.
    let unique = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users DROP CONSTRAINT users_email_key;",
        Some(&cat),
    );
    assert_eq!(rules(&unique), vec![("BS205".to_string(), Severity::Error)]);
    assert!(unique.findings[0]
        .facts
        .as_deref()
        .unwrap()
        .contains("Unique constraint"));
    let check = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users DROP CONSTRAINT users_age_check;",
        Some(&cat),
    );
    assert!(check.findings.is_empty(), "{:?}", check.findings);
    assert!(check.facts[0].contains("users_age_check on public.users is a Check constraint"));

    // DROP DEFAULT on a NOT NULL column breaks the running app's inserts.
    let default = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users ALTER COLUMN status DROP DEFAULT;",
        Some(&cat),
    );
    assert_eq!(rules(&default), vec![("BS204".to_string(), Severity::Error)]);

    // Defaults: the catalog knows the functions' volatility.
    let volatile = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN t text DEFAULT make_token();",
        Some(&cat),
    );
    assert_eq!(rules(&volatile), vec![("BS308".to_string(), Severity::Error)]);
    let stable = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN tenant int DEFAULT tenant_default();",
        Some(&cat),
    );
    assert!(stable.findings.is_empty(), "{:?}", stable.findings);
    assert_eq!(
        rules(&analyse(
            "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN tenant int DEFAULT tenant_default();",
            None
        )),
        vec![("BS308".to_string(), Severity::Error)],
        "without the catalog an unknown function may be volatile"
    );

    // ADD PRIMARY KEY where a usable unique index exists says which.
    let pk = analyse(
        "SET lock_timeout = '5s';\nALTER TABLE users ADD PRIMARY KEY (id);",
        Some(&cat),
    );
    assert!(pk.facts[0].contains("USING INDEX users_id_idx"), "{:?}", pk.facts);
}

fn plan_cmd(f: &Fixture, sha: &str, url: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["plan", "--format", "json", "--repo"])
        .arg(f.remote.path())
        .arg(sha);
    if let Some(url) = url {
        cmd.args(["--database-url", url]);
    }
    cmd.output().unwrap()
}

#[tokio::test]
async fn plan_with_a_database_url_shows_the_facts_and_keeps_the_plan_hash() {
    let f = Fixture::new().await;
    schema(&f).await;
    let c = carrier("0001-indexes").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nCREATE INDEX tiny_code ON tiny (code);\nCREATE INDEX big_payload ON big (payload);",
    );
    let sha = f.commit_carrier(&c, "indexes");
    let url = f.server.url("shop");

    let blind = plan_cmd(&f, &sha, None);
    let live = plan_cmd(&f, &sha, Some(&url));
    assert_eq!(
        live.status.code(),
        Some(2),
        "the big table's index needs an approval: {}",
        text(&live)
    );
    let blind: serde_json::Value = serde_json::from_slice(&blind.stdout).unwrap();
    let live: serde_json::Value = serde_json::from_slice(&live.stdout).unwrap();
    assert_eq!(blind["plan_hash"], live["plan_hash"], "facts never change the hash");
    // Said once in the plan: whether a restore would keep the lost writes.
    assert!(blind["lost_writes"].is_null());
    assert!(
        live["lost_writes"]
            .as_str()
            .unwrap()
            .contains("would not keep the writes it discards (wal_level is replica"),
        "{live}"
    );
    let findings = live["migrations"][0]["findings"].as_array().unwrap();
    let severities: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f["excerpt"].as_str().unwrap(), f["severity"].as_str().unwrap()))
        .collect();
    assert_eq!(
        severities,
        vec![
            ("CREATE INDEX tiny_code ON tiny ( code )", "warning"),
            ("CREATE INDEX big_payload ON big ( payload )", "error"),
        ]
    );
    assert!(findings[1]["facts"]
        .as_str()
        .unwrap()
        .contains("public.big: ~120,000 rows"));

    let bad = plan_cmd(&f, &sha, Some("postgresql://nobody@127.0.0.1:1/shop"));
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unreachable database is bad input: {}",
        text(&bad)
    );
    assert!(text(&bad).contains("--database-url"), "{}", text(&bad));
}

#[tokio::test]
async fn a_runs_plan_phase_judges_against_the_catalog_small_runs_large_needs_approval() {
    let f = Fixture::new().await;
    schema(&f).await;
    // On the small table the index is a warning: no approval, it runs.
    let small = carrier("0001-tiny-index").sql(
        "001.sql",
        "SET lock_timeout = '5s';\n-- backstop:ignore BS301 only the nightly import writes tiny\nCREATE INDEX tiny_code ON tiny (code);",
    );
    let c1 = f.commit_carrier(&small, "index on tiny");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1);
    let report = f.reports().pop().unwrap();
    let finding = &report["findings"][0];
    assert_eq!(finding["severity"], "warning");
    assert!(finding["facts"].as_str().unwrap().contains("public.tiny"), "{report}");
    // The suppression's reason is in the evidence report.
    assert_eq!(finding["ignored"], "only the nightly import writes tiny", "{report}");
    let md = f.report_md(report["run"].as_str().unwrap());
    assert!(
        md.contains("**ignored** by `backstop:ignore`: only the nightly import writes tiny"),
        "{md}"
    );

    // A default calling a function the catalog knows is stable rewrites
    // nothing, even on the large table (the plan reads the volatility of
    // the functions the migration names, and only those).
    let stable = carrier("0002-tenant").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE big ADD COLUMN tenant int DEFAULT tenant_default();",
    );
    let c2 = f.commit_carrier(&stable, "tenant column");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2);

    // On the large table it is an error: refused without an approval.
    let large = carrier("0002-big-index").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nCREATE INDEX big_payload ON big (payload);",
    );
    f.commit_carrier(&large, "index on big");
    let out = f.run(&[]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("0002-big-index needs an approval"), "{said}");
    assert_eq!(f.gate(), c2, "the gate stays");
}
