//! The local pipeline end to end against a real PostgreSQL server and a real
//! git remote: success, failures with and without restore, both revert modes,
//! both checkpoint backends, and commits without migrations.

mod common;

use common::*;

#[tokio::test]
async fn success_writes_history_moves_gate_and_reports_succeeded() {
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1, "gate fast-forwarded to the migration's commit");
    // The pass ends with a summary a person can act on.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("(") && said.contains("\"create orders\"): succeeded"),
        "{said}"
    );
    assert!(said.contains("  migrations: 0001-orders"), "{said}");
    assert!(said.contains(&format!(" -> {}", &c1[..7])), "{said}");
    assert!(
        said.contains(&format!(
            "  next: nothing: Flux deploys {} from backstop/gate",
            &c1[..7]
        )),
        "{said}"
    );
    let rows = f
        .count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-orders' AND success AND commit = (SELECT commit FROM backstop.migration_history LIMIT 1)")
        .await;
    assert_eq!(rows, 1);
    let commit: String = f
        .client()
        .await
        .query_one(
            "SELECT commit FROM backstop.migration_history WHERE id = '0001-orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(commit, c1);
    let reports = f.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["outcome"], "Succeeded");
    assert_eq!(reports[0]["commit"], c1.as_str());
    assert!(reports[0]["checkpoint"]["backend"] == "local");
    assert_eq!(f.checkpoints(), 1);
    // A second pass finds nothing to do.
    let again = f.run(&[]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(f.journal_len(), 1);
}

#[tokio::test]
async fn commits_without_carriers_fast_forward_the_gate_with_no_run() {
    let f = Fixture::new().await;
    f.commit_files(
        &[(
            "apps/shop/base/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n  labels: {v: '2'}\n",
        )],
        "bump",
    );
    let head = f.commit_files(
        &[("clusters/develop/other.yaml", "kind: ConfigMap\nmetadata: {name: x}\n")],
        "other",
    );
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), head);
    assert_eq!(f.journal_len(), 0);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["status", "--json", "--state"])
        .arg(f.state())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["runs"], serde_json::json!([]));
    assert_eq!(status["gates"][0]["gate"], head.as_str(), "{status}");
    assert!(status["gates"][0]["waiting"].is_null(), "{status}");
}

/// A migration that fails inside its single transaction.
fn failing_in_transaction() -> CarrierBuilder {
    carrier("0002-broken")
        .phase("expand")
        .sql(
            "001.sql",
            "ALTER TABLE orders ADD COLUMN note text;\nINSERT INTO orders (customer, qty) VALUES ('eve', 9);",
        )
        .sql("002.sql", "INSERT INTO no_such_table VALUES (1);")
}

#[tokio::test]
async fn failure_inside_one_transaction_reverts_on_upstream_without_restore() {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    let c2 = f.commit_carrier(&failing_in_transaction(), "add note column");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(f.gate(), c1, "gate unchanged");
    let log = f.git_log("main");
    assert_eq!(log[0], "Revert \"add note column\"", "{log:?}");
    let message = git(f.remote.path(), &["log", "-1", "--format=%B", "main"]);
    assert!(message.contains(&format!("This reverts commit {c2}.")), "{message}");
    assert!(message.contains("Backstop-Run: "), "{message}");
    assert!(message.contains("0002-broken"), "{message}");
    // The revert removes the carrier again.
    assert_eq!(
        git(
            f.remote.path(),
            &["ls-tree", "-r", "--name-only", "main", "apps/shop/migrations/"]
        )
        .trim(),
        "apps/shop/migrations/0001-orders.yaml"
    );
    assert_eq!(f.schema().await, schema, "schema unchanged");
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(f.kept_data_dirs(), 0, "no restore");
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack");
    assert!(report["restore"].is_null());
    assert!(
        report["remediation"].as_str().unwrap().contains("zero data loss"),
        "{report}"
    );
    // The failing statement, where it is written, and its error.
    let failed = &report["failed_statement"];
    assert_eq!(
        failed["origin"], "apps/shop/migrations/0002-broken.yaml#002.sql",
        "{report}"
    );
    assert_eq!(failed["sql"], "INSERT INTO no_such_table VALUES (1)", "{report}");
    assert_eq!(
        (failed["done"].as_u64(), failed["total"].as_u64()),
        (Some(2), Some(3)),
        "{report}"
    );
    assert!(failed["error"].as_str().unwrap().contains("no_such_table"), "{report}");
    let md = f.report_md(report["run"].as_str().unwrap());
    let line = failed["line"].as_u64().unwrap();
    assert!(
        md.contains(&format!(
            "0002-broken failed at `apps/shop/migrations/0002-broken.yaml#002.sql:{line}` (statement 3 of 3"
        )),
        "{md}"
    );
    // `status` says what the gate waits for and since when, and each run's
    // age and duration.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["status", "--state"])
        .arg(f.state())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&status.stdout);
    let waiting = said
        .lines()
        .find(|l| l.trim_start().starts_with("waiting for "))
        .unwrap_or_default();
    assert!(waiting.contains("(since ") && waiting.contains("0002-broken"), "{said}");
    assert!(said.contains("STARTED") && said.contains("TOOK"), "{said}");
    let row = said.lines().find(|l| l.contains("RolledBack")).unwrap_or_default();
    assert!(row.contains(" ago ") && row.contains("0002-broken"), "{said}");
    let json = f.status();
    let run = &json["runs"].as_array().unwrap().last().unwrap().clone();
    assert!(run["finished_at"].is_string(), "{json}");
    let took = run["duration_seconds"].as_f64().unwrap();
    assert!(took > 0.0 && took < 600.0, "{json}");
    // The next pass fast-forwards the gate through the commit and its revert.
    let next = f.run(&["--revert", "commit"]).await;
    assert_eq!(next.status.code(), Some(0), "{}", text(&next));
    assert_eq!(f.gate(), f.main());
}

#[tokio::test]
async fn failure_inside_one_transaction_in_pull_request_mode_pushes_a_revert_branch() {
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&failing_in_transaction(), "add note column");
    let out = f.run(&["-o", "json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(f.gate(), c1);
    assert_eq!(f.main(), c2, "upstream untouched in pull-request mode");
    let branch = format!("backstop/revert-{}", &c2[..7]);
    // Log lines say the reason, not a Rust Option around it.
    let logged = String::from_utf8_lossy(&out.stderr);
    assert!(
        logged.contains("run failed and was rolled back") && !logged.contains("Some(\""),
        "{logged}"
    );
    // `-o json`: the pass's summary as one object.
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let run = &summary["runs"][0];
    assert_eq!(run["outcome"], "RolledBack", "{summary}");
    assert_eq!(run["commit"], c2.as_str());
    assert_eq!(
        (run["gate_from"].as_str(), run["gate_to"].as_str()),
        (Some(c1.as_str()), Some(c1.as_str()))
    );
    assert_eq!(run["revert_branch"], branch.as_str());
    let next = run["next"].as_str().unwrap();
    assert!(
        next.starts_with(&format!("open a pull request from {branch} into main")),
        "no forge is configured here: {next}"
    );
    let log = f.git_log(&branch);
    assert_eq!(log[0], "Revert \"add note column\"");
    assert_eq!(
        git(f.remote.path(), &["rev-parse", &format!("{branch}^")]).trim(),
        c2,
        "revert sits on the upstream head"
    );
    // The failed (migration, checksum) is not retried: the gate waits.
    let again = f.run(&[]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(text(&again).contains("waiting"), "{}", text(&again));
    assert_eq!(f.journal_len(), 2, "no new run: the orders run and the failed one");
    assert_eq!(f.gate(), c1);
}

async fn assert_restored(f: &Fixture, c1: &str, schema: &str) {
    assert_eq!(f.gate(), c1, "gate unchanged");
    assert_eq!(f.schema().await, schema, "schema back to before the migration");
    assert_eq!(
        f.count("SELECT count(*) FROM orders").await,
        3,
        "rows written before the checkpoint are present"
    );
    assert_eq!(
        f.count("SELECT count(*) FROM orders WHERE customer = 'mallory'").await,
        0,
        "rows the migration wrote are gone"
    );
    assert!(f.git_log("main")[0].starts_with("Revert \""));
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "RolledBack");
    assert!(!report["restore"].is_null(), "{report}");
    let window = &report["data_loss_window"];
    assert!(window["seconds"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(window["from"].is_string() && window["to"].is_string());
    // Next steps for the person reading it, and where the lost writes are.
    let next = report["next_steps"].as_str().unwrap();
    assert!(next.contains("is on main: fix the migration in a new commit"), "{next}");
    let run = report["run"].as_str().unwrap();
    let md = f.report_md(run);
    assert!(md.contains("## Next steps\n\nthe revert commit "), "{md}");
    assert!(
        md.contains("The state from before the restore is kept at `")
            || md.contains("What the restore replaced is kept: database "),
        "{md}"
    );
    assert_timeline(&md);
}

/// The report's Mermaid gantt block: fenced, declared, every task line of
/// the form `name :tags, id, start, end` with times in its dateFormat, and
/// the recovery point, the failure and the data-loss window marked.
fn assert_timeline(md: &str) {
    let start = md.find("```mermaid\ngantt\n").expect("a mermaid gantt block");
    let block = &md[start + "```mermaid\n".len()..];
    let block = &block[..block.find("```").expect("the block is closed")];
    let lines: Vec<&str> = block.lines().collect();
    assert_eq!(lines[0], "gantt");
    assert!(lines.contains(&"    dateFormat YYYY-MM-DD HH:mm:ss.SSS"), "{block}");
    let time = |t: &str| chrono::NaiveDateTime::parse_from_str(t.trim(), "%Y-%m-%d %H:%M:%S%.3f").is_ok();
    let mut tasks = 0;
    for line in lines.iter().skip(1).map(|l| l.trim()) {
        if line.starts_with("title ")
            || line.starts_with("dateFormat ")
            || line.starts_with("axisFormat ")
            || line.starts_with("section ")
        {
            continue;
        }
        let (name, spec) = line.split_once(" :").unwrap_or_else(|| panic!("task line {line:?}"));
        assert!(!name.contains(':') && !name.contains('#'), "{line}");
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        let n = parts.len();
        assert!(n >= 3, "{line}");
        assert!(time(parts[n - 2]), "start of {line}");
        assert!(time(parts[n - 1]) || parts[n - 1] == "0d", "end of {line}");
        tasks += 1;
    }
    assert!(tasks >= 4, "{block}");
    for marked in ["recovery point ", "failure :crit, milestone", "data-loss window :crit"] {
        assert!(block.contains(marked), "{marked} in {block}");
    }
}

fn committed_then_verify_fails() -> CarrierBuilder {
    carrier("0002-backfill")
        .phase("migrate")
        .sql("001.sql", "ALTER TABLE orders ADD COLUMN total int;\nUPDATE orders SET total = qty * 10 WHERE qty > 1;\nINSERT INTO orders (customer, qty) VALUES ('mallory', 1);")
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL")
}

#[tokio::test]
async fn failed_verify_after_commit_restores_by_pitr_and_reverts() {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    f.commit_carrier(&committed_then_verify_fails(), "backfill totals");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_restored(&f, &c1, &schema).await;
    assert_eq!(f.kept_data_dirs(), 1, "the previous data directory is kept");
    let report = f.reports().pop().unwrap();
    assert!(
        report["restore"]["target"].as_str().unwrap().starts_with("lsn "),
        "{report}"
    );
    let md = f.report_md(report["run"].as_str().unwrap());
    // The verify query and what it returned.
    assert!(
        md.contains("FAILED (verify returned 1 row(s); first column: f)\n\n  ```sql\n  SELECT count(*) = 0 FROM orders WHERE total IS NULL\n  ```"),
        "{md}"
    );
}

#[tokio::test]
async fn failure_after_create_index_concurrently_restores_by_pitr() {
    let (f, c1) = with_orders().await;
    let schema = f.schema().await;
    let m = carrier("0002-index")
        .sql(
            "001.sql",
            "CREATE INDEX CONCURRENTLY orders_customer ON orders (customer);",
        )
        .sql(
            "002.sql",
            "INSERT INTO orders (customer, qty) VALUES ('mallory', 1);\nALTER TABLE no_such_table ADD COLUMN x int;",
        );
    f.commit_carrier(&m, "index customers");
    let out = f.run(&["--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_restored(&f, &c1, &schema).await;
    let report = f.reports().pop().unwrap();
    assert_eq!(report["migrations"][0]["transactional"], false);
}

#[tokio::test]
async fn failed_verify_with_dump_checkpoint_restores_from_the_dump() {
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&["--checkpoint", "dump"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    insert_orders(&f).await;
    let schema = f.schema().await;
    f.commit_carrier(&committed_then_verify_fails(), "backfill totals");
    let out = f.run(&["--checkpoint", "dump", "--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_restored(&f, &c1, &schema).await;
    let report = f.reports().pop().unwrap();
    assert_eq!(report["checkpoint"]["backend"], "dump");
    // Said once: a dump restores to when it was taken, so the writes after
    // the recovery point are not what it discards, and are not kept.
    let md = f.report_md(report["run"].as_str().unwrap());
    assert!(
        md.contains("- writes after it are not captured: the dump backend restores to when its dump was taken"),
        "{md}"
    );
    let kept = f
        .count("SELECT count(*) FROM pg_database WHERE datname LIKE 'shop_backstop_%'")
        .await;
    assert_eq!(kept, 1, "the damaged database is kept under another name");
}

#[tokio::test]
async fn remote_given_as_a_file_url_works_like_a_path() {
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let url = format!("file://{}", f.remote.path().display());
    let out = f.run_url(&url, &[], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1);
}

#[tokio::test]
async fn watching_says_a_lasting_wait_once_with_its_time_not_every_pass() {
    let (f, _) = with_orders().await;
    let refused = carrier("0002-drop")
        .phase("expand")
        .sql("001.sql", "DROP TABLE orders;");
    f.commit_carrier(&refused, "drop orders in an expand");
    let mut child = tokio::process::Command::new(bin())
        .args(["run", "--path", "apps/shop", "--interval", "1", "--repo"])
        .arg(f.remote.path())
        .arg("--state")
        .arg(f.state())
        .arg("--pgdata")
        .arg(f.server.data_dir())
        .arg("--wal-archive")
        .arg(f.server.archive())
        .env(DB_VAR, f.server.url("shop"))
        .env("BACKSTOP_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Four passes at least: each records when it checked the gate.
    let mut seen = std::collections::BTreeSet::new();
    wait_until("four passes", || {
        let checked = f.status()["gates"][0]["updated_at"].to_string();
        seen.insert(checked);
        let passes = seen.len();
        async move { passes > 4 }
    })
    .await;
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let waits: Vec<&str> = err.lines().filter(|l| l.contains("backstop: waiting:")).collect();
    assert_eq!(waits.len(), 1, "said once:\n{err}");
    assert!(err.contains("0002-drop.yaml"), "{err}");
    let stamp = waits[0].split(' ').next().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
        "begins with its time: {err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("waits:"),
        "the wait is not repeated on stdout either: {stdout}"
    );
}

#[tokio::test]
async fn a_migration_sees_the_database_defaults_an_earlier_migration_of_the_same_run_set() {
    // The second migration runs on a session that logged in after the first
    // committed (idle sessions are closed after every migration): a session
    // from before would still have the old lock_timeout.
    let f = Fixture::new().await;
    let set = carrier("0001-defaults").sql("001.sql", "ALTER DATABASE shop SET lock_timeout = '7s';");
    let check = carrier("0002-check").sql(
        "001.sql",
        "DO $$ BEGIN IF current_setting('lock_timeout') <> '7s' THEN RAISE EXCEPTION 'stale session defaults: lock_timeout %', current_setting('lock_timeout'); END IF; END $$;",
    );
    f.commit_files(
        &[(&set.path(), &set.yaml()), (&check.path(), &check.yaml())],
        "set a default and rely on it",
    );
    let out = f.run(&["--checkpoint", "dump"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reports = f.reports();
    assert_eq!(reports[0]["outcome"], "Succeeded", "{}", text(&out));
}

#[tokio::test]
async fn a_rollback_works_and_measures_its_window_when_the_tools_speak_german() {
    // PostgreSQL's tools translate their output; backstop reads
    // pg_controldata's (the same-server preflight, the window) and
    // pg_waldump's. LANGUAGE translates even under the C.UTF-8 locale.
    let german = [("LC_ALL", "C.UTF-8"), ("LANGUAGE", "de")];
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run_env(&[], &german).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    insert_orders(&f).await;
    let schema = f.schema().await;
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run_env(&["--revert", "commit"], &german).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(f.gate(), c1);
    assert_eq!(f.schema().await, schema);
    let report = f.reports().pop().unwrap();
    let lost = &report["restore"]["lost_commits"];
    assert!(lost["not_counted"].is_null(), "{lost}");
    assert!(
        lost["count"].as_u64().unwrap() >= 1,
        "the migration's own commits: {lost}"
    );
}

/// The gate's move reads the remote gate from the pass's own fetch when the
/// migration was quick. Someone moving the gate meanwhile (here a person,
/// past the run's commit, while the migration runs) makes the move wait or
/// find it there, never fail: nothing is reverted, and by the next pass the
/// run has succeeded with the gate where the person put it.
#[tokio::test]
async fn a_gate_moved_by_someone_else_while_the_migration_runs_is_found_not_reverted() {
    let f = Fixture::new().await;
    let c = f.commit_carrier(
        &carrier("slow").sql("a.sql", "SELECT pg_sleep(1); CREATE TABLE slow (id int);"),
        "slow migration",
    );
    let child = f.spawn_run(&f.state(), &["--revert", "commit", "--retry-backoff", "0"], &[]);
    wait_until("the migration runs", || async {
        f.count("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1)%'")
            .await
            > 0
    })
    .await;
    let d = f.commit_files(&[("docs/readme.md", "later")], "a later commit");
    f.remote.set_branch(GATE, &d).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(matches!(out.status.code(), Some(0) | Some(4)), "{}", text(&out));
    let out = f.run(&["--revert", "commit", "--retry-backoff", "0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), d);
    assert!(
        git(f.remote.path(), &["log", "--format=%H", GATE]).contains(&c),
        "{c} on the gate"
    );
    f.assert_nothing_reverted();
    assert_eq!(
        f.count("SELECT count(*) FROM pg_tables WHERE tablename = 'slow'").await,
        1
    );
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "Succeeded", "{report}");
}

#[tokio::test]
async fn a_pass_with_one_migration_logs_in_once_for_its_bookkeeping_before_and_after_the_migration_and_once_for_the_migration(
) {
    let f = Fixture::with_settings("log_connections = on\nlog_statement = 'all'\nlog_line_prefix = '%p|'\n").await;
    // A pass that ran a migration before: its successor starts the
    // bookkeeping login while it fetches.
    f.commit_carrier(&orders_table(), "create orders");
    let url = f.remote.path().display().to_string();
    let out = f.run_url(&url, &[], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let c2 = f.commit_carrier(
        &carrier("0002-more").sql("a.sql", "ALTER TABLE orders ADD COLUMN note text;"),
        "more",
    );
    let seen = std::fs::read(f.server.log_path()).unwrap().len();
    let out = f.run_url(&url, &[], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c2);
    let log = String::from_utf8_lossy(&std::fs::read(f.server.log_path()).unwrap()[seen..]).into_owned();
    let pid_of = |what: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| l.split('|').next().map(str::to_string))
            .collect()
    };
    let logins = pid_of("connection authorized: user=postgres database=shop");
    assert_eq!(
        logins.len(),
        3,
        "backstop's bookkeeping session, the migration's own, and pg_dump's:\n{log}"
    );
    let (claim, release, migration) = (
        pid_of("INSERT INTO backstop.run_owner"),
        pid_of("DELETE FROM backstop.run_owner"),
        pid_of("ADD COLUMN note"),
    );
    assert_eq!(migration.len(), 1, "{log}");
    assert!(!claim.is_empty() && !release.is_empty(), "{log}");
    assert!(
        claim.iter().chain(&release).all(|p| *p == claim[0]),
        "the claim, the gate's check after the migration and the release go over one session:\n{log}"
    );
    assert_ne!(migration[0], claim[0], "the migration runs on a session of its own");
}

#[tokio::test]
async fn a_migration_that_deallocates_every_prepared_statement_still_records_its_history_and_promotes() {
    let f = Fixture::new().await;
    // Its session logged in while the checkpoint was taken, with backstop's
    // statements for before the SQL prepared on it: the SQL drops them all.
    let c1 = f.commit_carrier(
        &carrier("0001-deallocate").sql("a.sql", "DEALLOCATE ALL;\nCREATE TABLE orders (id int);"),
        "deallocate",
    );
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1);
    let rows = f
        .count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-deallocate' AND success")
        .await;
    assert_eq!(rows, 1);
    assert_eq!(f.count("SELECT count(*) FROM orders").await, 0);
}

#[tokio::test]
async fn a_pass_keeps_the_databases_its_successor_logs_in_to_first_and_a_torn_or_stale_hint_changes_nothing_else() {
    let f = Fixture::new().await;
    let hint = f.state().join("warm.json");
    let hinted = || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&hint).unwrap()).unwrap() };
    let named = serde_json::json!([[{"kind": "url", "var": DB_VAR}, null]]);
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The run's database, by reference: no URL, no password.
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(hinted(), named);
    // Torn, naming a variable that is not set, and ten thousand databases
    // of the server that do not exist (a pass looks at as many as it could
    // owe, 50): the passes go on, and the hint is written anew.
    let many = serde_json::to_string(
        &(0..10_000)
            .map(|i| serde_json::json!([{"kind": "url", "var": DB_VAR}, format!("nodb_{i}")]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for (i, bad) in [
        "[[{\"kind\": \"u",
        r#"[[{"kind":"url","var":"NO_SUCH_VAR"},null]]"#,
        many.as_str(),
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(&hint, bad).unwrap();
        let seen = std::fs::read(f.server.log_path()).unwrap().len();
        let c = f.commit_carrier(
            &carrier(&format!("000{}-more", i + 2)).sql("a.sql", &format!("ALTER TABLE orders ADD COLUMN c{i} int;")),
            "more",
        );
        let out = f.run(&[]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(f.gate(), c);
        assert_eq!(hinted(), named, "after bad hint {i}");
        let log = String::from_utf8_lossy(&std::fs::read(f.server.log_path()).unwrap()[seen..]).into_owned();
        let tried = log.matches("database \"nodb_").count();
        assert!(tried <= 50, "logins tried on the hint: {tried}");
    }
}
