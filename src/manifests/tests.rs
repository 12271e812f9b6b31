//! Unit tests of carrier parsing.

use super::*;

fn snap(files: &[(&str, &str)]) -> Snapshot {
    files
        .iter()
        .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
        .collect()
}

const CARRIER: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: m1
  namespace: shop
  annotations:
    backstop.dev/migration: "0001-init"
    backstop.dev/database: cnpg:app-db
    backstop.dev/verify: check
data:
  001.sql: |
    CREATE TABLE t (id int);
  check: SELECT true
"#;

#[test]
fn defaults_apply_and_namespace_completes_the_cluster() {
    let s = snap(&[("a/m.yaml", CARRIER)]);
    let c = parse_file(&s, "a/m.yaml", CARRIER.as_bytes()).unwrap().remove(0);
    assert_eq!(c.id, "0001-init");
    assert_eq!(
        c.database,
        DatabaseRef::Cnpg {
            namespace: "shop".into(),
            cluster: "app-db".into()
        }
    );
    assert_eq!(c.phase, Phase::Expand);
    assert_eq!(c.order, Order::BeforeApply);
    assert_eq!(c.checkpoint, CheckpointKind::Backup);
    assert_eq!(c.revert, RevertMode::PullRequest);
    assert_eq!(c.timeout, Duration::from_secs(600));
    assert_eq!(c.statements.len(), 1);
    assert_eq!(c.statements[0].line, 12);
    assert_eq!(c.verify.as_deref(), Some("SELECT true"));
}

#[test]
fn unknown_phase_names_file_line_and_key() {
    let text = CARRIER.replace(
        "    backstop.dev/verify: check\n",
        "    backstop.dev/verify: check\n    backstop.dev/phase: expnd\n",
    );
    let text = format!("kind: Namespace\nmetadata: {{name: x}}\n---\n{text}");
    let s = snap(&[("a/m.yaml", &text)]);
    let errs = parse_file(&s, "a/m.yaml", text.as_bytes()).unwrap_err();
    assert_eq!(errs[0].line, 13);
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/phase"));
    assert!(
        errs[0]
            .to_string()
            .starts_with("a/m.yaml:13: backstop.dev/phase: unknown value \"expnd\""),
        "{}",
        errs[0]
    );
}

#[test]
fn replay_is_manual_unless_a_carrier_says_auto_and_other_values_are_named() {
    let parse = |extra: &str| {
        let text = CARRIER.replace(
            "    backstop.dev/verify: check\n",
            &format!("    backstop.dev/verify: check\n{extra}"),
        );
        let s = snap(&[("a/m.yaml", &text)]);
        parse_file(&s, "a/m.yaml", text.as_bytes())
    };
    assert_eq!(parse("").unwrap()[0].replay, ReplayMode::Manual);
    assert_eq!(
        parse("    backstop.dev/replay: auto\n").unwrap()[0].replay,
        ReplayMode::Auto
    );
    let errs = parse("    backstop.dev/replay: always\n").unwrap_err();
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/replay"));
    assert!(
        errs[0]
            .to_string()
            .contains("backstop.dev/replay: unknown value \"always\" (expected one of: manual, auto)"),
        "{}",
        errs[0]
    );
}

#[test]
fn broken_yaml_reports_its_line() {
    let text = "kind: ConfigMap\nmetadata:\n  name: [unclosed\n";
    let errs = parse_file(&Snapshot::new(), "x.yaml", text.as_bytes()).unwrap_err();
    assert_eq!(errs[0].file, "x.yaml");
    assert!(errs[0].message.contains("YAML does not parse"), "{}", errs[0]);
}

#[test]
fn sql_files_are_resolved_relative_to_the_carrier() {
    let text = "kind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/sql: ../sql/a.sql, b.sql\n";
    let s = snap(&[
        ("apps/x/j.yaml", text),
        ("apps/sql/a.sql", "SELECT 1;"),
        ("apps/x/b.sql", "SELECT 2;"),
    ]);
    let c = parse_file(&s, "apps/x/j.yaml", text.as_bytes()).unwrap().remove(0);
    assert_eq!(c.sql_files, vec!["apps/sql/a.sql", "apps/x/b.sql"]);
    let s = snap(&[("apps/x/j.yaml", text)]);
    let errs = parse_file(&s, "apps/x/j.yaml", text.as_bytes()).unwrap_err();
    assert_eq!(errs[0].line, 7);
    assert!(errs[0].message.contains("apps/sql/a.sql is not in the repository"));
}

#[test]
fn misspelt_annotation_is_refused() {
    let text = CARRIER.replace("backstop.dev/verify:", "backstop.dev/verfy:");
    let errs = parse_file(&snap(&[]), "m.yaml", text.as_bytes()).unwrap_err();
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/verfy"));
}

#[test]
fn job_carriers_must_be_kept_from_flux() {
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/run: job\nspec: {template: {spec: {containers: []}}}\n";
    let errs = parse_file(&snap(&[]), "j.yaml", job.as_bytes()).unwrap_err();
    assert!(
        errs[0]
            .message
            .contains("kustomize.toolkit.fluxcd.io/reconcile: disabled"),
        "{}",
        errs[0]
    );
    let ok = job.replace(
        "    backstop.dev/run: job\n",
        "    backstop.dev/run: job\n    kustomize.toolkit.fluxcd.io/reconcile: disabled\n",
    );
    let c = parse_file(&snap(&[]), "j.yaml", ok.as_bytes()).unwrap().remove(0);
    assert!(c.job.is_some());
    assert_eq!(c.checksum.len(), 64);
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("x").is_err());
}

fn errors_of(text: &str) -> Vec<ManifestError> {
    parse_file(&snap(&[]), "m.yaml", text.as_bytes()).unwrap_err()
}

#[test]
fn unsafe_migration_ids_are_refused_at_parse_time() {
    for (id, expected) in [
        ("\"0002-\\0nul\"", "the control character U+0000"),
        ("\"0002-\\x1b[31m\"", "the control character U+001B"),
        ("0002-ünïcode", "the non-ASCII character 'ü'"),
        ("-0002", "must start with an ASCII letter or digit"),
        (&"a".repeat(129), "the limit is 128"),
    ] {
        let text = CARRIER.replace("\"0001-init\"", id);
        let errs = errors_of(&text);
        assert_eq!(errs[0].line, 7, "{id}");
        assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/migration"));
        assert!(errs[0].message.contains(expected), "{id}: {}", errs[0]);
    }
    let text = CARRIER.replace(
        "    backstop.dev/verify: check\n",
        "    backstop.dev/verify: check\n    backstop.dev/phase: contract\n    backstop.dev/expand-migration: \"a/b\"\n",
    );
    let errs = errors_of(&text);
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/expand-migration"));
    assert_eq!(errs[0].line, 11);
}

#[test]
fn timeout_is_bounded() {
    let with = |t: &str| {
        CARRIER.replace(
            "    backstop.dev/verify: check\n",
            &format!("    backstop.dev/verify: check\n    backstop.dev/timeout: {t}\n"),
        )
    };
    let ok = with("24h");
    assert_eq!(
        parse_file(&snap(&[]), "m.yaml", ok.as_bytes()).unwrap()[0].timeout,
        Duration::from_secs(86400)
    );
    let errs = errors_of(&with("25h"));
    assert_eq!(
        errs[0].to_string(),
        "m.yaml:10: backstop.dev/timeout: \"25h\" is longer than the limit of 24h (86400 seconds)"
    );
    let errs = errors_of(&with("99999999999999d"));
    assert!(errs[0].message.contains("longer than the limit of 24h"), "{}", errs[0]);
    let errs = errors_of(&with("99999999999999999999d"));
    assert!(errs[0].message.contains("invalid duration"), "{}", errs[0]);
    let errs = errors_of(&with("0s"));
    assert_eq!(errs[0].message, "duration \"0s\" must be greater than 0");
}

#[test]
fn malformed_metadata_of_a_would_be_carrier_is_an_error() {
    let cases = [
        (
            "kind: ConfigMap\nmetadata:\n  - backstop.dev/migration: x\n",
            2,
            "metadata",
            "metadata must be a mapping, not a list",
        ),
        (
            "kind: ConfigMap\nmetadata: \"backstop.dev/migration=x\"\n",
            2,
            "metadata",
            "not a string",
        ),
        (
            "kind: ConfigMap\nmetadata:\n  name: x\n  annotations:\n    - backstop.dev/migration: x\n",
            4,
            "metadata.annotations",
            "metadata.annotations must be a mapping, not a list",
        ),
        (
            "kind: ConfigMap\nmetadata:\n  name: x\n  annotations: backstop.dev/migration\n",
            4,
            "metadata.annotations",
            "not a string",
        ),
        (
            "- kind: ConfigMap\n  metadata: {annotations: {backstop.dev/migration: x}}\n",
            1,
            "",
            "the document must be a mapping, not a list",
        ),
    ];
    for (text, line, key, message) in cases {
        let text = format!("kind: Namespace\nmetadata: {{name: n}}\n---\n{text}");
        let errs = errors_of(&text);
        assert_eq!(errs[0].line, line + 3, "{text}");
        assert_eq!(errs[0].key.as_deref().unwrap_or(""), key, "{text}");
        assert!(errs[0].message.contains(message), "{}", errs[0]);
        assert!(errs[0].message.contains("would be ignored"), "{}", errs[0]);
    }
    // Without any backstop.dev/ text such documents are not carriers: no error.
    let other = "kind: Thing\nmetadata: [a, b]\n---\nkind: X\nmetadata:\n  annotations: []\n# backstop.dev/migration: commented out\n";
    assert_eq!(parse_file(&snap(&[]), "o.yaml", other.as_bytes()), Ok(vec![]));
}

#[test]
fn annotation_values_must_be_strings_of_printable_text() {
    let text = CARRIER.replace("backstop.dev/verify: check", "backstop.dev/verify: {query: check}");
    let errs = errors_of(&text);
    assert_eq!(
        errs[0].to_string(),
        "m.yaml:9: backstop.dev/verify: annotation values must be strings, not a mapping"
    );
    let text = CARRIER.replace("backstop.dev/verify: check", "backstop.dev/verify: [check]");
    assert!(errors_of(&text)[0].message.ends_with("not a list"));
    let text = CARRIER.replace(
        "    backstop.dev/verify: check\n",
        "    backstop.dev/verify: check\n    backstop.dev/database-name: \"app\\0\"\n",
    );
    let errs = errors_of(&text);
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/database-name"));
    assert!(errs[0].message.contains("U+0000"), "{}", errs[0]);
}

#[test]
fn size_and_nesting_are_bounded_before_the_parser_runs() {
    let started = std::time::Instant::now();
    let bomb = format!(
        "{CARRIER}---\nkind: X\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let errs = errors_of(&bomb);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 16);
    assert!(errs[0].message.contains("nesting limit of 64 levels"), "{}", errs[0]);
    let big = format!("{CARRIER}# {}\n", "x".repeat(MAX_FILE_BYTES));
    let errs = errors_of(&big);
    assert_eq!(errs[0].line, 1);
    assert!(errs[0].message.contains("size limit of 4 MiB"), "{}", errs[0]);
}

#[test]
fn byte_order_marks_are_stripped_from_yaml_and_sql_files() {
    let text = "\u{feff}---\nkind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/sql: a.sql\n";
    let s = snap(&[("x/j.yaml", text), ("x/a.sql", "\u{feff}CREATE TABLE t (id int);\n")]);
    let c = parse_file(&s, "x/j.yaml", text.as_bytes()).unwrap().remove(0);
    assert_eq!(c.line, 6);
    assert_eq!(c.statements[0].sql.trim_end_matches(';'), "CREATE TABLE t (id int)");
    let patched = patch_manifest(&s, "Job", "default", "j", &serde_json::json!({"spec": {"x": 1}})).unwrap();
    assert!(patched.content.starts_with("\u{feff}---\n"), "{}", patched.content);
}

#[test]
fn a_verify_that_writes_is_refused_naming_the_table() {
    let text = CARRIER.replace(
        "check: SELECT true",
        "check: WITH d AS (DELETE FROM t RETURNING 1) SELECT true",
    );
    let s = snap(&[("a/m.yaml", &text)]);
    let errs = parse_file(&s, "a/m.yaml", text.as_bytes()).unwrap_err();
    assert_eq!(errs[0].key.as_deref(), Some("backstop.dev/verify"), "{}", errs[0]);
    assert!(
        errs[0].message.contains("must only read, but it modifies t"),
        "{}",
        errs[0]
    );
}
