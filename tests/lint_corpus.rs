//! The safety analysis against a corpus of SQL cases (tests/lint/corpus.sql):
//! each case lists exactly the rules it must trigger; the safe rewrite of every
//! unsafe statement is a case that triggers none. Every rule is exercised.

use std::collections::BTreeSet;

use backstop::lint::{self, LintOptions, RULES};

struct Case {
    name: String,
    expect: BTreeSet<String>,
    pg_version: u32,
    sql: String,
}

fn corpus() -> Vec<Case> {
    let text = include_str!("lint/corpus.sql");
    let mut cases = Vec::new();
    for block in text.split("-- case: ").skip(1) {
        let (name, rest) = block.split_once('\n').unwrap();
        let (expect_line, sql) = rest.split_once('\n').unwrap();
        let expect = expect_line
            .strip_prefix("-- expect: ")
            .unwrap_or_else(|| panic!("case {name}: no expect line"));
        let expect = if expect.trim() == "none" {
            BTreeSet::new()
        } else {
            expect.split(',').map(|s| s.trim().to_string()).collect()
        };
        let pg_version = sql
            .lines()
            .find_map(|l| l.strip_prefix("-- pg: "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(15);
        cases.push(Case {
            name: name.to_string(),
            expect,
            pg_version,
            sql: sql.to_string(),
        });
    }
    cases
}

#[test]
fn every_corpus_case_triggers_exactly_its_rules() {
    let cases = corpus();
    assert!(cases.len() >= 60, "corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let statements =
            backstop::sql::split(&case.name, &case.sql, 1).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let findings = lint::lint(
            &statements,
            LintOptions {
                pg_version: case.pg_version,
            },
        );
        let got: BTreeSet<String> = findings.iter().map(|f| f.rule.clone()).collect();
        if got != case.expect {
            failures.push(format!("{}: expected {:?}, got {:?}", case.name, case.expect, got));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_rule_has_a_positive_case_and_the_corpus_has_safe_cases() {
    let cases = corpus();
    let covered: BTreeSet<&str> = cases.iter().flat_map(|c| c.expect.iter().map(String::as_str)).collect();
    let missing: Vec<&str> = RULES.iter().map(|r| r.id).filter(|id| !covered.contains(id)).collect();
    assert!(missing.is_empty(), "rules without a case: {missing:?}");
    assert!(cases.iter().filter(|c| c.expect.is_empty()).count() >= 20);
}

#[test]
fn findings_carry_location_why_and_fix() {
    let sql = "SET lock_timeout = '1s';\n  ALTER TABLE orders DROP COLUMN note;\n";
    let statements = backstop::sql::split("m.sql", sql, 1).unwrap();
    let findings = lint::lint(&statements, LintOptions::default());
    assert_eq!(findings.len(), 1);
    let f = &findings[0];
    assert_eq!(
        (f.rule.as_str(), f.origin.as_str(), f.line, f.column),
        ("BS102", "m.sql", 2, 3)
    );
    assert_eq!(f.excerpt, "ALTER TABLE orders DROP COLUMN note");
    assert!(!f.why.is_empty() && !f.fix.is_empty());
}

fn lint_cli(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("lint")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_statement_that_does_not_parse_is_a_finding_at_its_line_and_hides_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.sql");
    std::fs::write(
        &broken,
        "CREATE TABLE a (id int);\nSELEC broken;\n\\set ON_ERROR_STOP 1\nDROP TABLE a;\n",
    )
    .unwrap();
    let other = dir.path().join("other.sql");
    std::fs::write(&other, "CREATE INDEX i ON t (x);\n").unwrap();
    let missing = dir.path().join("missing.sql");
    let (b, o, m) = (
        broken.display().to_string(),
        other.display().to_string(),
        missing.display().to_string(),
    );
    let (code, out, err) = lint_cli(&[&m, &b, &o], None);
    assert_eq!(code, Some(2), "text that is not SQL is bad input: {out}{err}");
    assert!(out.contains(&format!("{b}:2:1: error BS001 not-sql")), "{out}");
    assert!(out.contains("syntax error at or near \"SELEC\""), "{out}");
    assert!(out.contains(&format!("{b}:3:1: error BS001 not-sql")), "{out}");
    assert!(out.contains("psql meta-command"), "{out}");
    // The statements around them are linted, and so is the next file.
    assert!(out.contains(&format!("{b}:4:1: error BS101 drop-table")), "{out}");
    assert!(out.contains(&format!("{o}:1:1: error BS301")), "{out}");
    assert!(err.contains(&format!("failed to read {m}")), "{err}");
    assert!(out.contains(&format!("{m}: not linted")), "{out}");
}

#[test]
fn lint_dash_reads_standard_input() {
    let (code, out, _) = lint_cli(&["-"], Some("ALTER TABLE orders DROP COLUMN note;\n"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("-:1:1: error BS102 drop-column"), "{out}");
    let (code, out, _) = lint_cli(&["-", "--format", "json"], Some("SELECT 1;\n"));
    assert_eq!(code, Some(0), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json[0]["file"], "-");
    assert_eq!(json[0]["statements"], 1);
}

#[test]
fn a_migration_gets_one_lock_timeout_finding_however_many_statements_wait_for_locks() {
    let statements = backstop::sql::split(
        "m.sql",
        "CREATE INDEX a ON orders (a);\nCREATE INDEX b ON orders (b);\nALTER TABLE orders DROP COLUMN c;\n",
        1,
    )
    .unwrap();
    let findings = lint::lint(&statements, LintOptions::default());
    let timeouts: Vec<usize> = findings.iter().filter(|f| f.rule == "BS313").map(|f| f.line).collect();
    assert_eq!(
        timeouts,
        vec![1],
        "one, at the first statement that waits: {findings:?}"
    );
    assert_eq!(findings.iter().filter(|f| f.rule == "BS301").count(), 2);
}

#[test]
fn a_suppression_with_a_reason_marks_the_finding_ignored_and_it_no_longer_counts_as_an_error() {
    let sql = "SET lock_timeout = '5s';\n-- backstop:ignore BS301 the table holds 40 rows\nCREATE INDEX a ON countries (code);\nCREATE INDEX b ON countries (name); -- backstop:ignore create-index-not-concurrently nightly job only\nCREATE INDEX c ON countries (region);\n";
    let statements = backstop::sql::split("m.sql", sql, 1).unwrap();
    let findings = lint::lint(&statements, LintOptions::default());
    let got: Vec<(usize, Option<&str>)> = findings.iter().map(|f| (f.line, f.ignored.as_deref())).collect();
    assert_eq!(
        got,
        vec![
            (3, Some("the table holds 40 rows")),
            (4, Some("nightly job only")),
            (5, None),
        ],
        "a comment above the statement or after it on its line applies to it, not to the next"
    );
    assert_eq!(lint::errors(&findings), 1, "only the unsuppressed index counts");
}

#[test]
fn a_suppression_after_a_later_statement_on_the_line_is_not_the_earlier_ones() {
    let sql =
        "SET lock_timeout = '5s';\nDROP TABLE customers; DROP TABLE tmp_import; -- backstop:ignore BS101 scratch\n";
    let statements = backstop::sql::split("m.sql", sql, 1).unwrap();
    let findings = lint::lint(&statements, LintOptions::default());
    let got: Vec<(&str, Option<&str>)> = findings
        .iter()
        .map(|f| (f.excerpt.as_str(), f.ignored.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("DROP TABLE customers", None),
            ("DROP TABLE tmp_import", Some("scratch"))
        ]
    );
}

#[test]
fn a_suppression_cannot_waive_the_approval_of_a_destructive_statement() {
    let sql = "SET lock_timeout = '5s';\n-- backstop:ignore BS101 nobody reads it\nDROP TABLE old_orders;\n";
    let statements = backstop::sql::split("m.sql", sql, 1).unwrap();
    let findings = lint::lint(&statements, LintOptions::default());
    assert_eq!(findings[0].ignored.as_deref(), Some("nobody reads it"));
    assert_eq!(lint::errors(&findings), 0);
    assert!(
        lint::has_destructive_or_incompatible(&findings),
        "destructive statements still need an approval and a contract phase"
    );
}

#[test]
fn an_ignored_error_still_counts_in_the_plan_hash_with_its_reason() {
    use backstop::manifests::Snapshot;
    let plan = |comment: &str| {
        let yaml = format!(
            "kind: ConfigMap\nmetadata:\n  name: m\n  annotations:\n    backstop.dev/migration: m1\n    backstop.dev/database: url:DB\ndata:\n  001.sql: |\n    {comment}\n    CREATE INDEX a ON t (x);\n"
        );
        let mut snapshot = Snapshot::new();
        snapshot.insert("m.yaml".into(), yaml.clone().into_bytes());
        let carriers = backstop::manifests::parse_file(&snapshot, "m.yaml", yaml.as_bytes()).unwrap();
        let analysed = backstop::policy::analyse(&carriers, LintOptions::default(), None);
        let hash = backstop::policy::plan_hash(&carriers, &analysed);
        (carriers, analysed, hash)
    };
    let hash = |comment: &str| plan(comment).2;
    let plain = hash("-- a comment");
    let ignored = hash("-- backstop:ignore BS301 small table");
    let other_reason = hash("-- backstop:ignore BS301 another reason");
    assert_ne!(plain, ignored, "suppressing changes what is approved");
    assert_ne!(ignored, other_reason, "the reason is part of it");
    assert_eq!(plain, hash("-- another comment"), "plain comments do not count");

    // The ignored error still needs the approval an error needs.
    let (carriers, analysed, hash) = plan("-- backstop:ignore BS301 small table");
    let verdict = backstop::policy::evaluate(&backstop::policy::GateInput {
        carrier: &carriers[0],
        findings: &analysed[0].findings,
        plan_hash: &hash,
        approvals: &[],
        soak: backstop::policy::Soak::Unknown,
        now: chrono::Utc::now(),
    });
    assert!(verdict.needs_approval && !verdict.allowed, "{verdict:?}");
    assert!(verdict.reasons[0].contains("m1 needs an approval"), "{verdict:?}");
}

/// Every `.sql` file under `tests/lint/real` (see its SOURCES.md).
fn real_migrations() -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/lint/real"
    ))];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "sql") {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn real_migrations_of_nine_projects_are_all_linted_and_only_templates_fail_to_parse() {
    let files = real_migrations();
    assert!(files.len() >= 400, "{} files", files.len());
    let found = lint::lint_files(&files, LintOptions::default());
    assert_eq!(found.len(), files.len());
    let mut not_sql = 0;
    for f in &found {
        assert!(f.unreadable.is_none(), "{}: {:?}", f.file, f.unreadable);
        if f.not_sql > 0 {
            not_sql += 1;
            // supabase/auth's migrations are Go templates (`{{ index .Options "Namespace" }}`).
            let text = std::fs::read_to_string(&f.file).unwrap();
            assert!(
                f.file.contains("/supabase-auth/") && text.contains("{{"),
                "{} does not parse: {:?}",
                f.file,
                f.findings.iter().find(|x| x.rule == "BS001")
            );
        }
    }
    assert!(not_sql > 0, "the templates are reported, not skipped");
    // Temporal adds stored generated columns to a live table: each rewrites it.
    let generated = found
        .iter()
        .filter(|f| f.file.contains("/temporal/"))
        .flat_map(|f| &f.findings)
        .filter(|x| x.rule == "BS314")
        .count();
    assert!(generated >= 50, "{generated}");
}
