//! Seeded random kills: a real `backstop run` is sent SIGKILL after a random
//! delay (a passing or a failing migration, chosen by the seed), then rerun
//! until it finishes. Whatever the moment, the end state is the designed one:
//! a passing migration applied exactly once and promoted with no revert and
//! no restore; a failing one rolled back with the data as before, one restore
//! and one revert. The seed also picks the checkpoint: the server's own
//! PITR (`local`) or a `pg_dump` (`dump`), whose restores differ;
//! `BACKSTOP_KILL_MODE` (`local`, `dump`, `pgbackrest`) sets it.
//!
//! `BACKSTOP_KILL_SEEDS` (default `1,2,4,17`: failing and passing, local
//! and dump) picks the seeds; each seed is one
//! fresh server and repository. A failing seed prints the command that
//! reproduces it.

mod common;

use std::time::Duration;

use common::*;

fn passing() -> CarrierBuilder {
    carrier("0002-note")
        .sql(
            "001.sql",
            "ALTER TABLE orders ADD COLUMN note text;\nSELECT pg_sleep(0.3);",
        )
        .verify("SELECT count(*) = 1 FROM information_schema.columns WHERE column_name = 'note'")
}

/// The second run's journal entry (None until it is recorded: only the
/// fixture's first run is there).
fn second_run(f: &Fixture) -> Option<serde_json::Value> {
    if f.journal_len() < 2 {
        return None;
    }
    let newest = std::fs::read_dir(f.state().join("journal"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .max()?;
    Some(serde_json::from_slice(&std::fs::read(newest).unwrap()).unwrap())
}

/// The phase and last step of the newest run in the journal.
fn journal_point(f: &Fixture) -> String {
    let Some(run) = second_run(f) else {
        // Killed before this run was recorded.
        return "before the run was recorded (fetch, plan, claim)".into();
    };
    let step = run["steps"]
        .as_array()
        .and_then(|s| s.last())
        .cloned()
        .unwrap_or_default();
    format!(
        "{}/{}{}",
        run["phase"].as_str().unwrap_or("?"),
        step["name"].as_str().unwrap_or("-"),
        if step["finished_at"].is_null() { " (open)" } else { "" }
    )
}

/// Whether the second run has ended and written its report (a run that
/// waits for a retry, or was never recorded, has not).
fn ended(f: &Fixture) -> bool {
    let Some(run) = second_run(f) else { return false };
    let terminal = matches!(
        run["phase"].as_str(),
        Some("Succeeded" | "RolledBack" | "Failed" | "Deferred")
    );
    terminal && run["report_written"] == true
}

/// Databases a dump restore set aside (`shop_backstop_<run>`).
async fn set_aside_databases(f: &Fixture) -> i64 {
    f.count("SELECT count(*) FROM pg_database WHERE datname LIKE 'shop\\_backstop\\_%'")
        .await
}

/// The lock files under `dir`, at any depth.
fn locks_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(locks_under(&path));
        } else if path.extension().is_some_and(|x| x == "lock") {
            found.push(path);
        }
    }
    found
}

/// Where the run's checkpoint goes: the server's own data directory and
/// WAL archive (PITR), or a `pg_dump` (restored with `pg_restore`).
/// `BACKSTOP_KILL_MODE=pgbackrest` puts every seed on a pgBackRest stanza
/// (recovery points in its archive, restores with `--delta`): slower, so
/// never drawn.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Local,
    Dump,
    PgBackRest(std::path::PathBuf),
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Dump => "dump",
            Mode::PgBackRest(_) => "pgbackrest",
        }
    }

    fn command(&self, f: &Fixture, extra: &[&str]) -> tokio::process::Command {
        match self {
            Mode::Local => {
                let mut cmd = f.command(&f.state(), &f.server.data_dir(), &f.server.archive(), extra, &[]);
                cmd.kill_on_drop(true);
                cmd
            }
            Mode::PgBackRest(config) => {
                let mut all = common::backrest::checkpoint_flags(config);
                all.extend(extra.iter().map(|e| e.to_string()));
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                let mut cmd = f.command(&f.state(), &f.server.data_dir(), &f.server.archive(), &all, &[]);
                cmd.kill_on_drop(true);
                cmd
            }
            Mode::Dump => {
                let mut cmd = f.url_command(f.remote.path().to_str().unwrap(), extra, &[]);
                cmd.env("BACKSTOP_LOG", "info")
                    .env_remove("BACKSTOP_TEST_CRASH_AT")
                    .env_remove("BACKSTOP_TEST_PAUSE_AT")
                    .kill_on_drop(true);
                cmd
            }
        }
    }
}

async fn one_seed(seed: u64) {
    let mut rng = SplitMix(seed);
    let fails = rng.next() % 2 == 1;
    let kills = 1 + rng.next() % 2;
    // Drawn apart, so that a seed's other choices stay what they were;
    // `BACKSTOP_KILL_MODE` (local, dump) sets it for every seed.
    let forced = std::env::var("BACKSTOP_KILL_MODE").ok();
    let (mode, f, c1) = match forced.as_deref() {
        Some("pgbackrest") => {
            let (f, config) = common::backrest::with_stanza().await;
            let mode = Mode::PgBackRest(config);
            let c1 = f.commit_carrier(&orders_table(), "create orders");
            let out = mode.command(&f, &[]).output().await.unwrap();
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            insert_orders(&f).await;
            (mode, f, c1)
        }
        other => {
            let mode = match other {
                Some("local") => Mode::Local,
                Some("dump") => Mode::Dump,
                _ if SplitMix(seed ^ 0x6475_6d70).next().is_multiple_of(2) => Mode::Local,
                _ => Mode::Dump,
            };
            let (f, c1) = with_orders().await;
            (mode, f, c1)
        }
    };
    let schema = f.schema().await;
    let migration = if fails {
        failing_backfill("SELECT pg_sleep(0.3);")
    } else {
        passing()
    };
    let c2 = f.commit_carrier(&migration, "second migration");
    let mut log = Vec::new();
    for _ in 0..kills {
        let delay = Duration::from_millis(30 + rng.next() % 1200);
        let mut child = mode
            .command(&f, &["--revert", "commit"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn backstop");
        let ended = tokio::time::timeout(delay, child.wait()).await;
        match ended {
            Ok(status) => log.push(format!("ended on its own after <{delay:?}: {:?}", status.unwrap())),
            Err(_) => {
                child.start_kill().unwrap();
                child.wait().await.unwrap();
                log.push(format!("killed after {delay:?} in {}", journal_point(&f)));
            }
        }
    }
    // A kill while libgit2 updated a ref of the remote (a bare repository
    // on this disk) leaves `<ref>.lock` there. The remote is not backstop's:
    // the run waits naming the file, nothing reverted (`tests/crash.rs`),
    // and a person removes it, as here.
    for lock in locks_under(&f.remote.path().join("refs")) {
        std::fs::remove_file(&lock).unwrap();
        log.push(format!("a person removed {}", lock.display()));
    }
    let repro = format!(
        "BACKSTOP_KILL_MODE={} BACKSTOP_KILL_SEEDS={seed} cargo test --test kill_soak -- --nocapture ({log:?})",
        mode.name()
    );
    // Rerun until the run has ended (a rerun may meet a transient fault,
    // such as the server still restarting, and wait for the next pass; a
    // killed process may have scheduled a retry with the default 30 s
    // backoff, which `--retry-backoff 0` shortens).
    let rerun = ["--revert", "commit", "--retry-backoff", "0"];
    let rerun_once = || async { mode.command(&f, &rerun).output().await.expect("run backstop") };
    let mut out = rerun_once().await;
    let mut reruns = vec![format!("rerun 1 -> {}\n{}", journal_point(&f), text(&out))];
    for n in 2..=4 {
        if ended(&f) {
            break;
        }
        out = rerun_once().await;
        reruns.push(format!("rerun {n} -> {}\n{}", journal_point(&f), text(&out)));
    }
    let all = reruns.join("\n");
    let report = f.reports().pop().unwrap();
    assert_eq!(
        report["commit"],
        c2.as_str(),
        "the report is the second run's: {repro}\n{all}"
    );
    if fails {
        // 1 from the process that finished the rollback, 0 from a later pass
        // that found nothing left to do.
        assert!(matches!(out.status.code(), Some(0 | 1)), "{repro}\n{all}");
        assert_eq!(report["outcome"], "RolledBack", "{repro}\n{report}");
        assert_eq!(f.schema().await, schema, "{repro}");
        assert_eq!(f.count("SELECT count(*) FROM orders").await, 3, "{repro}");
        // At c1, or (after a later pass) at the revert, whose tree is c1's.
        let tree = |sha: &str| git(f.remote.path(), &["rev-parse", &format!("{sha}:apps/shop")]);
        assert_eq!(tree(&f.gate()), tree(&c1), "{repro}");
        assert_eq!(f.revert_commits("main"), 1, "{repro}");
        match mode {
            Mode::Local => assert!(f.kept_data_dirs() <= 1, "{repro}"),
            // Restored in place (`--delta`): the lost writes stay in the archive.
            Mode::PgBackRest(_) => assert_eq!(f.kept_data_dirs(), 0, "{repro}"),
            // The database as it was at the restore, kept renamed.
            Mode::Dump => {
                assert_eq!(f.kept_data_dirs(), 0, "{repro}");
                assert_eq!(set_aside_databases(&f).await, 1, "{repro}");
            }
        }
    } else {
        assert_eq!(out.status.code(), Some(0), "{repro}\n{all}");
        assert_eq!(report["outcome"], "Succeeded", "{repro}\n{report}");
        assert_eq!(f.gate(), c2, "{repro}");
        assert_eq!(
            f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0002-note' AND success")
                .await,
            1,
            "{repro}"
        );
        assert_eq!(f.revert_commits("main"), 0, "{repro}");
        assert_eq!(f.kept_data_dirs(), 0, "{repro}");
        assert_eq!(set_aside_databases(&f).await, 0, "{repro}");
    }
    assert_eq!(report["checkpoint"]["backend"], mode.name(), "{repro}");
    assert_eq!(f.journal_len(), 2, "one run for the migration: {repro}");
    assert_eq!(f.count("SELECT count(*) FROM backstop.run_owner").await, 0, "{repro}");
    println!(
        "kill_soak: seed {seed}: {} {} {log:?} -> {}",
        if fails { "failing" } else { "passing" },
        mode.name(),
        report["outcome"]
    );
}

#[tokio::test]
async fn random_kills_end_in_the_designed_state() {
    let seeds = std::env::var("BACKSTOP_KILL_SEEDS").unwrap_or_else(|_| "1,2,4,17".into());
    for seed in seeds.split(',').filter_map(|s| s.trim().parse().ok()) {
        one_seed(seed).await;
    }
}
