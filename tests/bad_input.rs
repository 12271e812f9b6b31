//! Bad input stops a pass in plan, before anything is touched: exit 2, a
//! message naming file, line and key, and the gate, the remote, the database
//! and the journal exactly as they were.

mod common;

use common::*;

/// Commits `files`, runs a pass, and checks that nothing was touched.
async fn refused(files: &[(&str, &str)], env: &[(&str, &str)]) -> String {
    let f = Fixture::new().await;
    let head = f.commit_files(files, "bad input");
    let schema = f.schema().await;
    let out = f.run_env(&["--revert", "commit"], env).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(f.gate(), f.base, "gate did not move");
    assert_eq!(f.main(), head, "upstream untouched");
    assert_eq!(
        git(f.remote.path(), &["branch", "--list"]).lines().count(),
        2,
        "no revert branch"
    );
    assert_eq!(f.schema().await, schema, "database untouched");
    assert_eq!(f.journal_len(), 0, "no run started");
    assert_eq!(f.checkpoints(), 0, "no checkpoint taken");
    text
}

#[tokio::test]
async fn broken_yaml_is_refused_with_file_and_line() {
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  annotations: [unclosed\n";
    let text = refused(&[("apps/shop/migrations/0002.yaml", yaml)], &[]).await;
    assert!(text.contains("apps/shop/migrations/0002.yaml:"), "{text}");
    assert!(text.contains("YAML does not parse"), "{text}");
}

#[tokio::test]
async fn unknown_phase_is_refused_with_file_line_and_key() {
    let c = carrier("0002-x")
        .phase("expnad")
        .sql("001.sql", "CREATE TABLE x (id int);");
    let text = refused(&[(&c.path(), &c.yaml())], &[]).await;
    // The phase annotation is on line 8 of the builder's YAML.
    assert!(
        text.contains("apps/shop/migrations/0002-x.yaml:8: backstop.dev/phase: unknown value \"expnad\""),
        "{text}"
    );
}

#[tokio::test]
async fn unset_database_variable_is_refused_naming_the_variable_and_key() {
    let c = carrier("0002-x")
        .database("url:SHOP_UNSET_URL")
        .sql("001.sql", "CREATE TABLE x (id int);");
    let text = refused(&[(&c.path(), &c.yaml())], &[]).await;
    assert!(
        text.contains("apps/shop/migrations/0002-x.yaml:7: backstop.dev/database"),
        "{text}"
    );
    assert!(text.contains("SHOP_UNSET_URL"), "{text}");
    assert!(text.contains("is not set"), "{text}");
}

#[tokio::test]
async fn sql_that_does_not_parse_is_refused_with_its_line() {
    let c = carrier("0002-x").sql("001.sql", "CREATE TABLE x (id int);\nALTR TABLE x ADD COLUMN y int;");
    let text = refused(&[(&c.path(), &c.yaml())], &[]).await;
    // `001.sql: |` is line 9, its first statement line 10, the bad one line 11.
    assert!(
        text.contains("apps/shop/migrations/0002-x.yaml:11: 001.sql: SQL does not parse"),
        "{text}"
    );
    assert!(text.contains("ALTR"), "{text}");
}

#[tokio::test]
async fn carrier_naming_a_missing_file_is_refused() {
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  annotations:\n    backstop.dev/migration: 0002-files\n    backstop.dev/database: url:SHOP_DATABASE_URL\n    backstop.dev/sql: sql/0002.sql\n";
    let text = refused(&[("apps/shop/migrations/0002.yaml", yaml)], &[]).await;
    assert!(
        text.contains("apps/shop/migrations/0002.yaml:8: backstop.dev/sql"),
        "{text}"
    );
    assert!(
        text.contains("apps/shop/migrations/sql/0002.sql is not in the repository"),
        "{text}"
    );
}

#[tokio::test]
async fn local_checkpoint_of_a_server_without_wal_archiving_is_refused() {
    let f = Fixture::new().await;
    let client = f.client().await;
    client
        .batch_execute("ALTER SYSTEM SET archive_command = ''")
        .await
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    drop(client);
    // pg_reload_conf is asynchronous: wait until the setting is seen.
    for _ in 0..50 {
        let cmd: String = f
            .client()
            .await
            .query_one("SHOW archive_command", &[])
            .await
            .unwrap()
            .get(0);
        if cmd.is_empty() || cmd == "(disabled)" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("is not archiving WAL"), "{text}");
    assert_eq!(f.gate(), f.base);
    assert_eq!(
        f.count("SELECT count(*) FROM pg_tables WHERE tablename = 'orders'")
            .await,
        0
    );
}

#[tokio::test]
async fn checksum_drift_on_an_applied_migration_is_refused() {
    let (f, c1) = with_orders().await;
    let changed = orders_table().sql("002.sql", "ALTER TABLE orders ADD COLUMN sneaky int;");
    let head = f.commit_carrier(&changed, "edit an applied migration");
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("apps/shop/migrations/0001-orders.yaml:6: backstop.dev/migration: migration 0001-orders is already applied with checksum"), "{text}");
    assert_eq!(f.gate(), c1);
    assert_eq!(f.main(), head);
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'sneaky'")
            .await,
        0
    );
}

#[tokio::test]
async fn diverged_gate_is_refused() {
    let f = Fixture::new().await;
    let side = f
        .remote
        .commit("side", &[backstop::sandbox::Change::Write("x.yaml", "a: 1\n")], "side")
        .unwrap();
    f.remote.set_branch(GATE, &side).unwrap();
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("is not an ancestor of upstream"), "{text}");
}

#[tokio::test]
async fn unreachable_remote_is_a_configuration_error_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "--once", "--repo", "http://127.0.0.1:9/sre.git", "--state"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("failed to fetch from http://127.0.0.1:9/sre.git"),
        "{text}"
    );
}

#[tokio::test]
async fn a_mistyped_repository_path_is_named_as_a_missing_directory_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let missing = dir.path().join("no-such-sre.git");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "--once", "--repo"])
        .arg(&missing)
        .arg("--state")
        .arg(&state)
        .output()
        .await
        .unwrap();
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("--repo {}: no such directory", missing.display())),
        "{text}"
    );
    assert!(!text.contains("unsupported URL protocol"), "{text}");
    assert!(!state.exists(), "nothing created for a refused repository");
}

#[tokio::test]
async fn pgdata_of_another_server_than_the_url_is_refused_before_any_checkpoint() {
    let f = Fixture::new().await;
    let other = backstop::pgserver::PgServer::start().await.expect("second server");
    other.create_database("shop").await.unwrap();
    let c = carrier("0002-x").sql("001.sql", "CREATE TABLE x (id int);");
    f.commit_carrier(&c, "x");
    // The URL names `other`; --pgdata names the fixture's server.
    let url = other.url("shop");
    let out = f.run_env(&["--revert", "commit"], &[(DB_VAR, url.as_str())]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("belongs to another server"), "{text}");
    assert!(text.contains("system identifier"), "{text}");
    assert_eq!(f.gate(), f.base, "gate did not move");
    assert_eq!(f.journal_len(), 0, "no run started");
    assert_eq!(f.checkpoints(), 0, "no checkpoint taken");
    assert_eq!(f.kept_data_dirs(), 0, "no data directory touched");
    let table: i64 = other
        .database("shop")
        .unwrap()
        .connect()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'x'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(table, 0, "the migration did not run");
}

#[tokio::test]
async fn wal_archive_that_the_server_does_not_write_to_is_refused() {
    let f = Fixture::new().await;
    let c = carrier("0002-x").sql("001.sql", "CREATE TABLE x (id int);");
    f.commit_carrier(&c, "x");
    let elsewhere = f.dir.path().join("not-the-archive");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = f
        .run_with(&f.server.data_dir(), &elsewhere, &["--revert", "commit"], &[])
        .await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("does not reach --wal-archive"), "{text}");
    assert!(text.contains("pg_stat_archiver"), "{text}");
    assert_eq!(f.gate(), f.base, "gate did not move");
    assert_eq!(f.journal_len(), 0, "no run started");
    assert_eq!(f.checkpoints(), 0, "no checkpoint taken");
}

#[tokio::test]
async fn a_verify_that_writes_through_a_function_changes_nothing() {
    let (f, c1) = with_orders().await;
    let sneaky = carrier("0002-note")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN note text;")
        .verify("SELECT setval('orders_id_seq', 1000) > 0");
    f.commit_carrier(&sneaky, "add note, verify writes");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "the verify failed: {}", text(&out));
    let report = f.reports().pop().unwrap();
    assert!(
        report.to_string().contains("read-only transaction"),
        "the verify ran read-only: {report}"
    );
    let last: i64 = f
        .client()
        .await
        .query_one("SELECT last_value FROM orders_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(last, 1000, "the verify did not write");
    assert_eq!(f.gate(), c1);
}

#[test]
fn help_describes_every_flag_and_never_shows_a_password_from_the_environment() {
    let commands: &[&[&str]] = &[
        &["run"],
        &["lint"],
        &["plan"],
        &["status"],
        &["report"],
        &["controller"],
        &["datastore", "lock"],
        &["datastore", "export"],
        &["datastore", "import"],
        &["datastore", "verify"],
        &["datastore", "unlock"],
        &["datastore", "rollback"],
    ];
    let secret = "postgresql://app:s3cret-pw@db.example:5432/shop";
    for args in commands {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(*args)
            .arg("--help")
            .env("BACKSTOP_SOURCE", secret)
            .env("BACKSTOP_TARGET", secret)
            .env("BACKSTOP_URL", secret)
            .env("BACKSTOP_DATABASE_URL", secret)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {help}");
        assert!(!help.contains("s3cret-pw"), "{args:?} --help shows a password:\n{help}");
        // A flag whose line starts with its env or default has no description.
        for line in help.lines() {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("--").or_else(|| {
                t.get(4..)
                    .filter(|_| t.starts_with('-'))
                    .and_then(|r| r.strip_prefix("--"))
            }) {
                let after = rest.split_once("  ").map(|(_, d)| d.trim_start()).unwrap_or("");
                assert!(
                    !after.starts_with("[env") && !after.starts_with("[default") && !after.starts_with("[possible"),
                    "{args:?}: --{rest} has no description"
                );
            }
        }
    }
}

#[test]
fn every_command_takes_dash_o_json_and_the_old_flags_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    for args in [
        vec!["status", "--state", &state, "-o", "json"],
        vec!["status", "--state", &state, "--json"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(&args)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(json["runs"].is_array(), "{args:?}: {json}");
    }
    for flag in [["-o", "json"], ["--format", "json"]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(["lint", "-", flag[0], flag[1]])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"SELECT 1;\n").unwrap();
        let out = child.wait_with_output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json[0]["statements"], 1, "{flag:?}");
    }
}
