//! `backstop demo`, as the README runs it: both runs end as designed, the
//! output is the one the README shows, and `--keep` keeps every folder it
//! names.

use std::process::Output;

fn demo(args: &[&str]) -> (Output, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, stdout)
}

/// The temporary directory the demo's folders are made in (`TMPDIR` or
/// `/tmp`), without a trailing slash.
fn tmp() -> String {
    std::env::temp_dir()
        .display()
        .to_string()
        .trim_end_matches('/')
        .to_string()
}

/// The output with what changes from run to run (run ids, commit ids,
/// temporary folders, the window's length) replaced by placeholders.
fn normalise(text: &str) -> Vec<String> {
    let text = text.replace(&tmp(), "/tmp");
    let patterns = [
        (r"\d{8}-\d{9}-[0-9a-f]{7}", "RUN"),
        (r"/tmp/backstop-(demo|pg)-[A-Za-z0-9]+", "/tmp/backstop-$1-X"),
        (r"\b[0-9a-f]{7}\b", "SHA"),
        (r"\d+\.\d{3}s", "N.NNNs"),
    ];
    text.lines()
        .map(|l| {
            patterns.iter().fold(l.trim_end().to_string(), |l, (re, to)| {
                regex::Regex::new(re).unwrap().replace_all(&l, *to).into_owned()
            })
        })
        .collect()
}

#[test]
fn demo_promotes_one_migration_and_rolls_back_the_other_printing_what_the_readme_shows() {
    let (_, stdout) = demo(&[]);
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains("rolled back"), "{stdout}");
    assert!(
        stdout.contains("3 orders kept, column total_cents gone (schema restored)"),
        "{stdout}"
    );
    // Each migration's SQL and verify query, and a summary instead of raw reports.
    assert!(
        stdout.contains("UPDATE orders SET total_cents = quantity * unit_price_cents WHERE quantity > 1;"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verify: SELECT count(*) = 0 FROM orders WHERE total_cents IS NULL"),
        "{stdout}"
    );
    assert!(stdout.contains("data-loss window of the restore:"), "{stdout}");
    assert!(!stdout.contains("| step |"), "no raw report tables: {stdout}");
    assert!(stdout.lines().count() < 60, "a short summary: {stdout}");
    // Without --keep nothing is cited as kept.
    assert!(stdout.contains("deleted on exit"), "{stdout}");

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let shown = readme
        .split("<!-- demo-output -->")
        .nth(1)
        .expect("the README shows the demo's output between <!-- demo-output --> markers");
    let shown: String = shown
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("$ "))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        normalise(shown.trim()),
        normalise(stdout.trim()),
        "README's demo output differs from what demo prints"
    );
}

#[test]
fn demo_keep_cites_only_folders_that_still_exist() {
    let (_, stdout) = demo(&["--keep"]);
    let paths: Vec<String> = regex::Regex::new(&format!(
        r"{}/backstop-[A-Za-z0-9/._-]+[A-Za-z0-9]",
        regex::escape(&tmp())
    ))
    .unwrap()
    .find_iter(&stdout)
    .map(|m| m.as_str().to_string())
    .collect();
    assert!(paths.len() >= 4, "{stdout}");
    for p in &paths {
        assert!(
            std::path::Path::new(p).exists(),
            "demo --keep cites {p}, which is gone\n{stdout}"
        );
    }
    assert!(stdout.contains("kept: the remote, state and reports under"), "{stdout}");
    let roots: std::collections::BTreeSet<String> =
        regex::Regex::new(&format!(r"{}/backstop-(demo|pg)-[A-Za-z0-9]+", regex::escape(&tmp())))
            .unwrap()
            .find_iter(&stdout)
            .map(|m| m.as_str().to_string())
            .collect();
    assert_eq!(roots.len(), 2, "{stdout}");
    // The set-aside data directory is kept with the server's folder.
    let pg = roots.iter().find(|r| r.contains("backstop-pg-")).unwrap();
    assert!(
        std::fs::read_dir(pg)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("data.backstop-")),
        "{stdout}"
    );
    for r in roots {
        let _ = std::process::Command::new("rm").args(["-rf", &r]).status();
    }
}
