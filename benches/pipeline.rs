//! Benchmark of the local pipeline (`cargo bench --bench pipeline`): the
//! overhead of a no-op migration, a whole `run --once` pass minus its
//! checkpoint and SQL time, over `BACKSTOP_BENCH_PASSES` (default 10) passes.
//! Checkpoints and restores: `benches/checkpoint.rs`.
//!
//! Figures are printed; nothing is asserted.

use std::collections::HashMap;
use std::time::Instant;

use backstop::local::{self, BackupBackend, LocalOptions};
use backstop::pgserver::PgServer;
use backstop::sandbox::{BareRemote, Change};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let passes = env_num("BACKSTOP_BENCH_PASSES", 10);
    overhead(passes).await?;
    Ok(())
}

async fn overhead(passes: u64) -> Res<()> {
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
    let opts = LocalOptions {
        repo: remote.path().display().to_string(),
        upstream: "main".into(),
        gate: "backstop/gate".into(),
        path: "apps/shop".into(),
        checkpoint: BackupBackend::Local,
        pgdata: Some(server.data_dir()),
        wal_archive: Some(server.archive()),
        revert: None,
        state: dir.path().join("state"),
        env: HashMap::from([("DB".to_string(), server.url("shop"))]),
        git_auth: Default::default(),
        forge: None,
        backoff: Default::default(),
        keep_checkpoints: 0,
        base_policy: Default::default(),
        pgbackrest_stanza: None,
        pgbackrest_config: None,
    };
    let engine = local::engine(&opts).await?;
    let journal = backstop::journal::Journal::new(&opts.state);
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    for i in 0..passes {
        let yaml = format!(
            "kind: ConfigMap\nmetadata:\n  name: m{i}\n  annotations:\n    backstop.dev/migration: noop-{i}\n    backstop.dev/database: url:DB\ndata:\n  a.sql: SELECT 1;\n"
        );
        let path = format!("apps/shop/m{i}.yaml");
        remote.commit("main", &[Change::Write(&path, &yaml)], &format!("noop {i}"))?;
        let t = Instant::now();
        let report = engine.pass().await?;
        let total = t.elapsed().as_secs_f64();
        let (id, _, _) = report.runs.last().ok_or("no run")?;
        let run = journal.find(id)?.ok_or("run not journaled")?;
        let step_secs = |name: &str| -> f64 {
            run.steps
                .iter()
                .filter(|s| s.name == name || s.name.starts_with(&format!("{name} ")))
                .filter_map(|s| {
                    s.finished_at
                        .map(|f| (f - s.started_at).num_microseconds().unwrap_or(0) as f64 / 1e6)
                })
                .sum()
        };
        let excluded = step_secs("checkpoint") + step_secs("migrate");
        overheads.push(total - excluded);
        totals.push(total);
    }
    overheads.sort_by(|a, b| a.total_cmp(b));
    totals.sort_by(|a, b| a.total_cmp(b));
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "no-op migration pass ({passes} passes): total median {:.1} ms, overhead (total - checkpoint - SQL) median {:.1} ms, min {:.1} ms, max {:.1} ms",
        median(&totals) * 1000.0,
        median(&overheads) * 1000.0,
        overheads[0] * 1000.0,
        overheads[overheads.len() - 1] * 1000.0
    );
    Ok(())
}
