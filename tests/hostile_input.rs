//! Hostile or malformed input is refused where it is read, by `backstop plan`,
//! `backstop lint` and a `backstop run --once` pass: exit 2, an error naming
//! the file, the line and the key, and nothing changed (gate, upstream,
//! history table, journal, checkpoints). A BOM is accepted, special files are
//! refused without blocking, and a token in the repository URL never reaches
//! the disk.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

const FILE: &str = "apps/shop/migrations/0002.yaml";

/// A ConfigMap carrier at [`FILE`]: the id on line 6, `extra` annotation
/// lines from line 8, then one statement.
fn carrier_yaml(id: &str, extra: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m-0002\n  annotations:\n    backstop.dev/migration: {id}\n    backstop.dev/database: url:{DB_VAR}\n"
    );
    for line in extra {
        y.push_str(&format!("    {line}\n"));
    }
    y.push_str("data:\n  001.sql: |\n    CREATE TABLE hostile (id int);\n");
    y
}

/// Rows of the history table (0 when backstop never created it).
async fn history_rows(f: &Fixture) -> i64 {
    let client = f.client().await;
    let exists: bool = client
        .query_one("SELECT to_regclass('backstop.migration_history') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return 0;
    }
    client
        .query_one("SELECT count(*) FROM backstop.migration_history", &[])
        .await
        .unwrap()
        .get(0)
}

/// `backstop plan --path apps/shop SHA` against the fixture's remote.
async fn plan(f: &Fixture, sha: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["plan", "--path", "apps/shop", "--repo"])
        .arg(f.remote.path())
        .arg(sha)
        .output()
        .await
        .expect("run backstop plan")
}

/// `backstop lint ARGS...`, killed if it takes more than 10 s.
async fn lint(args: &[&Path]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("lint")
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(10), child)
        .await
        .expect("backstop lint finished within 10 s")
        .expect("run backstop lint")
}

/// Commits `files` on main, then checks that `backstop plan` and a pass both
/// refuse it with exit 2, without touching anything, saying `expected`.
async fn refused(f: &Fixture, files: &[(&str, &str)], expected: &str) {
    let head = f.commit_files(files, "hostile input");
    let planned = plan(f, &head).await;
    let plan_text = text(&planned);
    assert_eq!(planned.status.code(), Some(2), "plan: {plan_text}");
    let schema = f.schema().await;
    let out = f.run(&["--revert", "commit"]).await;
    let run_text = text(&out);
    assert_eq!(out.status.code(), Some(2), "run: {run_text}");
    assert_eq!(f.gate(), f.base, "gate did not move");
    assert_eq!(f.main(), head, "upstream untouched");
    assert_eq!(history_rows(f).await, 0, "no history row");
    assert_eq!(f.schema().await, schema, "database untouched");
    assert_eq!(f.journal_len(), 0, "no run started");
    assert_eq!(f.checkpoints(), 0, "no checkpoint taken");
    assert!(plan_text.contains(expected), "plan: {expected}\n{plan_text}");
    assert!(run_text.contains(expected), "run: {expected}\n{run_text}");
    // Ids are named by code point, never echoed raw.
    for text in [plan_text, run_text] {
        assert!(
            !text.contains("0002-\u{1b}") && !text.contains('\0'),
            "raw control characters echoed: {text:?}"
        );
    }
}

#[tokio::test]
async fn migration_ids_outside_the_safe_character_set_are_refused_at_plan_time() {
    let f = Fixture::new().await;
    let cases = [
        (
            r#""0002-\x1b[31mred""#,
            "migration id contains the control character U+001B at character 6; only ASCII letters, digits, '.', '_' and '-' are allowed",
        ),
        (r#""0002-\0nul""#, "migration id contains the control character U+0000 at character 6"),
        ("0002-ünïcode", "migration id contains the non-ASCII character 'ü' (U+00FC) at character 6"),
        ("_0002", "migration id must start with an ASCII letter or digit, not the character '_'"),
        (&"a".repeat(129), "migration id is 129 characters long; the limit is 128"),
    ];
    for (id, message) in cases {
        let expected = format!("{FILE}:6: backstop.dev/migration: {message}");
        refused(&f, &[(FILE, &carrier_yaml(id, &[]))], &expected).await;
    }
}

#[tokio::test]
async fn timeout_beyond_a_day_or_zero_is_refused_naming_the_key_and_the_limit() {
    let f = Fixture::new().await;
    for (timeout, message) in [
        (
            "25h",
            "backstop.dev/timeout: \"25h\" is longer than the limit of 24h (86400 seconds)",
        ),
        (
            "30000d",
            "backstop.dev/timeout: \"30000d\" is longer than the limit of 24h (86400 seconds)",
        ),
        ("0s", "backstop.dev/timeout: duration \"0s\" must be greater than 0"),
    ] {
        let yaml = carrier_yaml("0002-slow", &[&format!("backstop.dev/timeout: {timeout}")]);
        refused(&f, &[(FILE, &yaml)], &format!("{FILE}:8: {message}")).await;
    }
}

#[tokio::test]
async fn malformed_metadata_of_a_would_be_carrier_is_refused_not_skipped() {
    let f = Fixture::new().await;
    let list_metadata = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  - backstop.dev/migration: 0002-x\n  - backstop.dev/database: url:SHOP_DATABASE_URL\ndata:\n  001.sql: CREATE TABLE hostile (id int);\n";
    let list_annotations = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m\n  annotations:\n    - backstop.dev/migration: 0002-x\ndata:\n  001.sql: CREATE TABLE hostile (id int);\n";
    let scalar_annotations =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m\n  annotations: \"backstop.dev/migration=0002-x\"\n";
    let mapping_value = carrier_yaml("0002-x", &["backstop.dev/verify:", "  query: SELECT true"]);
    let cases = [
        (
            list_metadata,
            "3: metadata: metadata must be a mapping, not a list: this document mentions backstop.dev/ annotations, which would be ignored",
        ),
        (
            list_annotations,
            "5: metadata.annotations: metadata.annotations must be a mapping, not a list",
        ),
        (
            scalar_annotations,
            "5: metadata.annotations: metadata.annotations must be a mapping, not a string",
        ),
        (
            &mapping_value,
            "8: backstop.dev/verify: annotation values must be strings, not a mapping",
        ),
    ];
    for (yaml, message) in cases {
        // A Namespace first: the error's line counts across documents.
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{yaml}");
        let (line, rest) = message.split_once(": ").unwrap();
        let expected = format!("{FILE}:{}: {rest}", line.parse::<usize>().unwrap() + 5);
        refused(&f, &[(FILE, &yaml)], &expected).await;
    }
}

#[tokio::test]
async fn deep_nesting_and_oversized_files_fail_fast_naming_the_limit() {
    let f = Fixture::new().await;
    let bomb = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\ndata: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let expected =
        "apps/shop/bomb.yaml:5: YAML is nested deeper than the nesting limit of 64 levels; refusing to parse it";
    refused(&f, &[("apps/shop/bomb.yaml", &bomb)], expected).await;
    // Loosely bounded: the YAML parser alone used to take ~21 s on this file.
    let started = std::time::Instant::now();
    let planned = plan(&f, &f.main()).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(planned.status.code(), Some(2), "{}", text(&planned));

    let big = format!(
        "{}# {}\n",
        carrier_yaml("0002-big", &[]),
        "x".repeat(backstop::manifests::MAX_FILE_BYTES)
    );
    let expected = format!("{FILE}:1: file is larger than the size limit of 4 MiB (4194304 bytes) for YAML input");
    refused(&f, &[("apps/shop/bomb.yaml", "a: 1\n"), (FILE, &big)], &expected).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.yaml");
    std::fs::write(&path, &bomb).unwrap();
    let out = lint(&[&path]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{}:5: YAML is nested deeper than the nesting limit",
            path.display()
        )),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn byte_order_marks_are_accepted_in_yaml_and_sql_files() {
    let f = Fixture::new().await;
    let yaml = "\u{feff}apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m-0002\n  annotations:\n    backstop.dev/migration: 0002-bom\n    backstop.dev/database: url:SHOP_DATABASE_URL\n    backstop.dev/sql: 0002.sql\n";
    let sql = "\u{feff}CREATE TABLE bom (id int);\n";
    let head = f.commit_files(&[(FILE, yaml), ("apps/shop/migrations/0002.sql", sql)], "bom");
    let planned = plan(&f, &head).await;
    assert_eq!(planned.status.code(), Some(0), "{}", text(&planned));
    assert!(text(&planned).contains("0002-bom"), "{}", text(&planned));
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), head, "the migration ran and the gate moved");
    assert_eq!(
        f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-bom' AND success")
            .await,
        1
    );

    let dir = tempfile::tempdir().unwrap();
    let (yaml_path, sql_path) = (dir.path().join("m.yaml"), dir.path().join("0002.sql"));
    std::fs::write(&yaml_path, yaml).unwrap();
    std::fs::write(&sql_path, "\u{feff}DROP TABLE orders;\n").unwrap();
    let out = lint(&[&yaml_path, &sql_path]).await;
    // Both parse: the DROP is an error-level finding (exit 1), at line 1, column 1.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("(0002-bom) (1 statements)"), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{}:1:1: error BS101", sql_path.display())),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn lint_refuses_fifos_and_other_special_files_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("0002.sql");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let out = lint(&[&fifo]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{} is a FIFO (named pipe), not a regular file; refusing to read it",
            fifo.display()
        )),
        "{}",
        text(&out)
    );

    let out = lint(&[dir.path()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{} is a directory, not a regular file", dir.path().display())),
        "{}",
        text(&out)
    );

    let out = lint(&[Path::new("/dev/zero")]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/dev/zero is a character device"), "{}", text(&out));

    // A carrier naming the FIFO as its SQL file, and a symlink to the FIFO.
    let carrier = dir.path().join("m.yaml");
    std::fs::write(
        &carrier,
        "kind: Job\nmetadata:\n  name: j\n  annotations:\n    backstop.dev/migration: m\n    backstop.dev/database: url:DB\n    backstop.dev/sql: 0002.sql\n",
    )
    .unwrap();
    let out = lint(&[&carrier]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "{}:7: backstop.dev/sql: names \"0002.sql\", but {} is a FIFO (named pipe), not a regular file; refusing to read it",
            carrier.display(),
            fifo.display()
        )),
        "{}",
        text(&out)
    );
    let link = dir.path().join("link.yaml");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let out = lint(&[&link]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is a FIFO (named pipe)"), "{}", text(&out));
}

/// Paths of the files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn a_token_in_the_repo_url_authenticates_but_never_reaches_the_disk() {
    const SECRET: &str = "s3cret";
    let f = Fixture::new().await;
    let server = common::http::git_server(f.dir.path().to_path_buf(), "user", SECRET).await;
    let port = server.port;
    let url = format!("http://user:{SECRET}@127.0.0.1:{port}/sre.git");
    // A mirror written by an older version, with the token in its config and FETCH_HEAD.
    let mirror = f.state().join("git").join("mirror.git");
    std::fs::create_dir_all(&mirror).unwrap();
    git(&mirror, &["init", "--bare", "--quiet"]);
    git(&mirror, &["remote", "add", "origin", &url]);
    std::fs::write(
        mirror.join("FETCH_HEAD"),
        format!("{}\t\tbranch 'main' of {url}\n", f.base),
    )
    .unwrap();
    assert!(!files_containing(&f.state(), SECRET).is_empty());

    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run_url(&url, &[], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1, "fetched and pushed with the URL's credentials");
    assert!(!text(&out).contains(SECRET), "{}", text(&out));
    assert_eq!(files_containing(&f.state(), SECRET), Vec::<String>::new());
    let config = std::fs::read_to_string(mirror.join("config")).unwrap();
    assert!(
        config.contains(&format!("url = http://127.0.0.1:{port}/sre.git")),
        "{config}"
    );

    // A wrong token in the URL is refused, and not written either.
    let wrong = format!("http://user:n0pe-{SECRET}@127.0.0.1:{port}/sre.git");
    let out = f.run_url(&wrong, &[], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("authentication failed"), "{}", text(&out));
    assert!(!text(&out).contains(SECRET), "{}", text(&out));
    assert_eq!(files_containing(&f.state(), SECRET), Vec::<String>::new());

    // An unreachable https remote: refused by the connection, nothing stored.
    let state = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args([
            "run",
            "--once",
            "--repo",
            &format!("https://user:{SECRET}@127.0.0.1:1/x.git"),
        ])
        .arg("--state")
        .arg(state.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("failed to fetch from https://127.0.0.1:1/x.git"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(SECRET), "{}", text(&out));
    assert!(state.path().join("git/mirror.git/config").exists());
    assert_eq!(files_containing(state.path(), SECRET), Vec::<String>::new());
}
