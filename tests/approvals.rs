//! Phase rules and approval gates: `backstop plan` on the sample sre repo, and
//! contract migrations run through `backstop run` against a real database:
//! an approval for another plan does not count, a missing soak or checkpoint
//! blocks, a valid approval passes (with a restore drill).

mod common;

use common::*;

fn example(path: &str) -> String {
    std::fs::read_to_string(format!("{}/examples/sre-repo/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn plan(repo: &std::path::Path, range: &str, json: bool) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
    cmd.arg("plan").arg("--repo").arg(repo).arg(range);
    if json {
        cmd.args(["--format", "json"]);
    }
    cmd.output().await.unwrap()
}

#[tokio::test]
async fn plan_on_the_sample_repo_says_what_would_run_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let remote = backstop::sandbox::BareRemote::init(&dir.path().join("sre.git")).unwrap();
    let files = [
        "clusters/develop/shop.yaml",
        "apps/shop/kustomization.yaml",
        "apps/shop/base/deployment.yaml",
    ];
    let contents: Vec<(String, String)> = files.iter().map(|f| (f.to_string(), example(f))).collect();
    let changes: Vec<backstop::sandbox::Change> = contents
        .iter()
        .map(|(p, c)| backstop::sandbox::Change::Write(p, c))
        .collect();
    remote.commit("main", &changes, "base").unwrap();
    let m1 = "apps/shop/migrations/0001-create-orders.yaml";
    let c1 = remote
        .commit(
            "main",
            &[backstop::sandbox::Change::Write(m1, &example(m1))],
            "create orders",
        )
        .unwrap();
    let m3 = "apps/shop/migrations/0003-drop-order-notes.yaml";
    let c3 = remote
        .commit(
            "main",
            &[backstop::sandbox::Change::Write(m3, &example(m3))],
            "drop notes",
        )
        .unwrap();

    let out = plan(remote.path(), &c1, false).await;
    let first = text(&out);
    assert_eq!(out.status.code(), Some(0), "{first}");
    let text = first;
    assert!(
        text.contains("migration 0001-create-orders (apps/shop/migrations/0001-create-orders.yaml:9)"),
        "{text}"
    );
    assert!(text.contains("CREATE TABLE orders"), "{text}");
    assert!(text.contains("plan hash: sha256:"), "{text}");
    assert!(text.contains("ALLOWED"), "{text}");

    let out = plan(remote.path(), &c3, false).await;
    let text = common::text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the code `run` gives for the same refusal: {text}"
    );
    assert!(text.contains("BS102 drop-column"), "{text}");
    assert!(
        text.contains("the approval for plan 000000000000 does not match this plan"),
        "{text}"
    );
    assert!(text.contains("REFUSED"), "{text}");

    // Both commits as a range: both migrations, one plan hash.
    let out = plan(remote.path(), &format!("{c1}~1..{c3}"), true).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["migrations"].as_array().unwrap().len(), 2);
    assert_eq!(json["plan_hash"].as_str().unwrap().len(), 64);
}

fn contract() -> CarrierBuilder {
    carrier("0002-drop-qty")
        .phase("contract")
        .sql(
            "001.sql",
            "SET lock_timeout = '5s';\nALTER TABLE orders DROP COLUMN qty;",
        )
        .annotation("expand-migration", "0001-orders")
        .annotation("soak", "1s")
}

/// The plan hash `backstop plan` prints for `sha`.
async fn plan_hash(f: &Fixture, sha: &str) -> String {
    let out = plan(f.remote.path(), sha, true).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    json["plan_hash"].as_str().unwrap().to_string()
}

/// Commits the contract without approval to learn its plan hash, then again
/// with `approval(hash)` as its approved-by annotation.
async fn commit_contract(f: &Fixture, c: CarrierBuilder, approval: impl Fn(&str) -> String) -> String {
    let unapproved = f.commit_carrier(&c, "contract without approval");
    let hash = plan_hash(f, &unapproved).await;
    f.commit_carrier(
        &c.annotation("approved-by", &format!("\"{}\"", approval(&hash))),
        "approve contract",
    )
}

async fn qty_column(f: &Fixture) -> i64 {
    f.count("SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'qty'")
        .await
}

#[tokio::test]
async fn approval_for_another_plan_hash_does_not_count() {
    let (f, c1) = with_orders().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    commit_contract(&f, contract(), |_| "alice sha256:0123456789abcdef0123".into()).await;
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("does not match this plan"), "{text}");
    assert_eq!(f.gate(), c1);
    assert_eq!(qty_column(&f).await, 1, "column untouched");
}

#[tokio::test]
async fn contract_without_soak_is_blocked() {
    let (f, c1) = with_orders().await;
    // No soak annotation: the default 24h applies, and the expand is seconds old.
    let c = carrier("0002-drop-qty")
        .phase("contract")
        .sql(
            "001.sql",
            "SET lock_timeout = '5s';\nALTER TABLE orders DROP COLUMN qty;",
        )
        .annotation("expand-migration", "0001-orders");
    commit_contract(&f, c, |h| format!("alice sha256:{h}")).await;
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("the contract waits until it soaked 24h"), "{text}");
    assert_eq!(f.gate(), c1);
    assert_eq!(qty_column(&f).await, 1);
}

#[tokio::test]
async fn contract_without_checkpoint_is_blocked() {
    let (f, c1) = with_orders().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    commit_contract(&f, contract().annotation("checkpoint", "none"), |h| {
        format!("alice sha256:{h}")
    })
    .await;
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("checkpoint: none is refused"), "{text}");
    assert_eq!(f.gate(), c1);
}

#[tokio::test]
async fn destructive_statement_in_expand_is_refused_naming_statement_and_rule() {
    let (f, c1) = with_orders().await;
    let c = carrier("0002-sneaky-drop").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders DROP COLUMN qty;",
    );
    f.commit_carrier(&c, "sneaky drop");
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("apps/shop/migrations/0002-sneaky-drop.yaml#001.sql:11:1: BS102 (drop-column) is not allowed in phase expand"),
        "{text}"
    );
    assert_eq!(f.gate(), c1);
    assert_eq!(qty_column(&f).await, 1);
}

#[tokio::test]
async fn valid_approval_runs_the_contract_after_a_restore_drill() {
    let (f, _) = with_orders().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let approved = commit_contract(&f, contract(), |h| {
        format!("Alice <alice@example.com> sha256:{}", &h[..16])
    })
    .await;
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(f.gate(), approved, "{text}");
    assert_eq!(qty_column(&f).await, 0, "column dropped");
    let report = f.reports().pop().unwrap();
    assert_eq!(report["outcome"], "Succeeded");
    // The soak the contract relied on is evidence in the report.
    let soak = &report["soak"][0];
    assert_eq!(soak["migration"], "0002-drop-qty", "{report}");
    assert_eq!(soak["expand"], "0001-orders", "{report}");
    assert_eq!(soak["required_seconds"], 1, "{report}");
    assert!(soak["soaked_seconds"].as_u64().unwrap() >= 1, "{report}");
    let run = report["run"].as_str().unwrap();
    let md = f.report_md(run);
    assert!(
        md.contains("Soak: contract 0002-drop-qty waited for expand 0001-orders, applied "),
        "{md}"
    );
    let drill = report["checkpoint"]["restore_drill"].as_str().unwrap();
    assert!(
        drill.starts_with("passed: a copy restored from the checkpoint started and answered")
            && drill.contains("it replayed the WAL to the recovery point"),
        "{drill}"
    );
    assert!(
        report["approvals"][0]
            .as_str()
            .unwrap()
            .starts_with("approved by Alice <alice@example.com>"),
        "{report}"
    );
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["rule"] == "BS102"),
        "{report}"
    );
}

#[tokio::test]
async fn approval_by_commit_trailer_counts_and_survives_reformatting() {
    let (f, _) = with_orders().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let unapproved = f.commit_carrier(&contract(), "contract");
    let hash = plan_hash(&f, &unapproved).await;
    // Same statements laid out differently: the plan hash does not change.
    let relaid = carrier("0002-drop-qty")
        .phase("contract")
        .sql(
            "001.sql",
            "SET lock_timeout = '5s';\n\nALTER TABLE orders\n  DROP COLUMN qty; -- no longer read",
        )
        .annotation("expand-migration", "0001-orders")
        .annotation("soak", "1s");
    let msg = format!("drop qty\n\nBackstop-Approved-By: Bob <bob@example.com> sha256:{hash}\n");
    let approved = f.commit_files(&[(&relaid.path(), &relaid.yaml())], &msg);
    let out = f.run(&[]).await;
    let text = text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(f.gate(), approved, "{text}");
    assert_eq!(qty_column(&f).await, 0);
}

#[tokio::test]
async fn report_with_a_prefix_of_several_runs_says_it_is_ambiguous_and_lists_them() {
    let (f, _) = with_orders().await;
    // A second run: another migration on top.
    f.commit_carrier(
        &carrier("0002-note").sql(
            "001.sql",
            "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
        ),
        "note",
    );
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The stderr of a pass is a pipe here, not a terminal: no colour codes.
    let logged = text(&out);
    assert!(
        logged.contains("run succeeded") && !logged.contains('\u{1b}'),
        "{logged}"
    );
    let runs: Vec<String> = f.status()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 2);
    // Run ids start with the date: the common prefix matches both.
    let common: String = runs[0]
        .chars()
        .zip(runs[1].chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let out = std::process::Command::new(bin())
        .args(["report", "--state"])
        .arg(f.state())
        .arg(&common)
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("is ambiguous: it matches 2 runs"), "{said}");
    for id in &runs {
        assert!(said.contains(id.as_str()), "{said}");
    }
}

#[tokio::test]
async fn the_restore_drill_passes_on_a_data_directory_with_a_long_path() {
    // The drill copy lives next to the data directory, named after the base
    // backup: with a socket there, a path ~45 bytes long already passed
    // PostgreSQL's 107-byte limit for socket paths and the drill failed.
    let f = Fixture::new().await;
    let deep = f
        .server
        .root()
        .join("a-data-directory-somewhere-deep-in-a-volume-mount-0123456789");
    std::fs::create_dir(&deep).unwrap();
    if let Some((uid, gid)) = f.server.owner() {
        nix::unistd::chown(&deep, Some(uid.into()), Some(gid.into())).unwrap();
    }
    let pgdata = deep.join("data");
    std::os::unix::fs::symlink(f.server.data_dir(), &pgdata).unwrap();
    assert!(pgdata.as_os_str().len() > 60, "{}", pgdata.display());

    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run_with(&pgdata, &f.server.archive(), &[], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let approved = commit_contract(&f, contract(), |h| format!("alice sha256:{h}")).await;
    let out = f.run_with(&pgdata, &f.server.archive(), &[], &[]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(f.gate(), approved, "{said}");
    assert_eq!(qty_column(&f).await, 0, "column dropped");
    let report = f.reports().pop().unwrap();
    let drill = report["checkpoint"]["restore_drill"].as_str().unwrap();
    assert!(drill.starts_with("passed:"), "{drill}");
}
