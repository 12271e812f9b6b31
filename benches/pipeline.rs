//! Benchmark of a no-op pass (`cargo bench --bench pipeline`): the whole
//! `backstop run --once --checkpoint dump` process for a pushed migration of
//! `SELECT 1` on a tiny database, against the anchor `psql -c 'select 1'`
//! measured in the same loop (alternating which runs first), over
//! `BACKSTOP_BENCH_PASSES` (default 10) passes. The checkpoint's own time
//! (the `checkpoint` step of the run's report: a `pg_dump` of the database)
//! is shown apart: the goal is pass − checkpoint ≤ 2× psql.
//! Checkpoints and restores: `benches/checkpoint.rs`.
//!
//! `BACKSTOP_BENCH_LOG=debug` prints each pass's log. Figures are printed;
//! nothing is asserted.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use backstop::pgserver::PgServer;
use backstop::sandbox::{BareRemote, Change};
use common::Res;

mod common;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let passes = env_num("BACKSTOP_BENCH_PASSES", 10);
    let server = PgServer::start().await?;
    server.create_database("shop").await?;
    let dir = tempfile::tempdir()?;
    let remote = BareRemote::init(&dir.path().join("sre.git"))?;
    let base = remote.commit(
        "main",
        &[Change::Write(
            "apps/shop/app.yaml",
            "kind: ConfigMap\nmetadata: {name: app}\n",
        )],
        "base",
    )?;
    remote.set_branch("backstop/gate", &base)?;
    let state = dir.path().join("state");
    let psql = server.bindir().join("psql");
    let url = server.url("shop");
    let pass = || -> Res<f64> {
        let t = Instant::now();
        common::run_once(remote.path(), &state, &url)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let anchor = || -> Res<f64> {
        let t = Instant::now();
        let ok = Command::new(&psql)
            .args(["-qAt", "-c", "select 1", &url])
            .stdout(std::process::Stdio::null())
            .status()?
            .success();
        if !ok {
            return Err("psql failed".into());
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // One pass with nothing pending first: the mirror is cloned once.
    pass()?;
    let (mut totals, mut checkpoints, mut overheads, mut psqls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..passes {
        let yaml = format!(
            "kind: ConfigMap\nmetadata:\n  name: m{i}\n  annotations:\n    backstop.dev/migration: noop-{i}\n    backstop.dev/database: url:DB\ndata:\n  a.sql: SELECT 1;\n"
        );
        let path = format!("apps/shop/m{i}.yaml");
        remote.commit("main", &[Change::Write(&path, &yaml)], &format!("noop {i}"))?;
        let before = runs(&state);
        let (total, p) = if i % 2 == 0 {
            let total = pass()?;
            (total, anchor()?)
        } else {
            let p = anchor()?;
            (pass()?, p)
        };
        let new: Vec<String> = runs(&state).difference(&before).cloned().collect();
        let [run] = new.as_slice() else {
            return Err(format!("expected one new run, found {new:?}").into());
        };
        let checkpoint = step_secs(&state.join("runs").join(run).join("report.json"), "checkpoint")?;
        totals.push(total);
        checkpoints.push(checkpoint);
        overheads.push(total - checkpoint);
        psqls.push(p);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2] * 1000.0
    };
    let (t, c, o, p) = (
        median(&mut totals),
        median(&mut checkpoints),
        median(&mut overheads),
        median(&mut psqls),
    );
    println!(
        "no-op pass ({passes} passes, medians): backstop run --once {t:.1} ms, of which checkpoint (pg_dump) {c:.1} ms; pass − checkpoint {o:.1} ms; psql -c 'select 1' {p:.1} ms; ratio {:.2}",
        o / p
    );
    Ok(())
}

fn runs(state: &Path) -> BTreeSet<String> {
    std::fs::read_dir(state.join("runs"))
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds spent in the report's steps named `name` (or `name …`).
fn step_secs(report: &Path, name: &str) -> Res<f64> {
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let mut secs = 0.0;
    for step in report["steps"].as_array().ok_or("report without steps")? {
        let n = step["name"].as_str().unwrap_or("");
        if n != name && !n.starts_with(&format!("{name} ")) {
            continue;
        }
        let at = |k: &str| -> Res<chrono::DateTime<chrono::Utc>> {
            Ok(step[k].as_str().ok_or("step without times")?.parse()?)
        };
        secs += (at("finished_at")? - at("started_at")?).num_microseconds().unwrap_or(0) as f64 / 1e6;
    }
    Ok(secs)
}
