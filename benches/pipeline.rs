//! Benchmarks of the local pipeline (`cargo bench --bench pipeline`):
//!
//! 1. backstop's local checkpoint + PITR restore of a database of
//!    `BACKSTOP_BENCH_MB` (default 1024) MB, against raw `pg_basebackup` plus a
//!    hand-written recovery of the same data: the ratio.
//! 2. Pipeline overhead of a no-op migration: a whole `run --once` pass minus
//!    its checkpoint and SQL time, over `BACKSTOP_BENCH_PASSES` (default 10) passes.
//!
//! Figures are printed; nothing is asserted.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use backstop::checkpoint::local::LocalBackend;
use backstop::checkpoint::Checkpoint;
use backstop::local::{self, BackupBackend, LocalOptions};
use backstop::pgserver::PgServer;
use backstop::runner::{Runner, SqlRunner};
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
    let mb = env_num("BACKSTOP_BENCH_MB", 1024);
    let passes = env_num("BACKSTOP_BENCH_PASSES", 10);
    checkpoint_restore(mb).await?;
    overhead(passes).await?;
    Ok(())
}

fn run_as(server: &PgServer, program: &str, args: &[&str]) -> Res<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(server.bindir().join(program));
    if let Some((uid, gid)) = server.owner() {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.args(args).output()?;
    if !out.status.success() {
        return Err(format!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

async fn checkpoint_restore(mb: u64) -> Res<()> {
    let server = PgServer::start().await?;
    server.create_database("bench").await?;
    let db = server.database("bench")?;
    let client = db.connect().await?;
    let rows = mb * 1024 * 1024 / 1000;
    let t = Instant::now();
    client
        .batch_execute(&format!(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 900) AS pad FROM generate_series(1, {rows}) g; CHECKPOINT"
        ))
        .await?;
    let size: i64 = client.query_one("SELECT pg_database_size('bench')", &[]).await?.get(0);
    println!(
        "data: {:.0} MB in {:.1}s",
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let state = tempfile::tempdir()?;
    let backend = LocalBackend {
        bindir: server.bindir().to_path_buf(),
        pgdata: server.data_dir(),
        wal_archive: server.archive(),
        store: state.path().join("checkpoints"),
        recovery_timeout: Duration::from_secs(1800),
        policy: Default::default(),
    };
    let runner = SqlRunner;

    // raw: pg_basebackup + a hand-written recovery of the same data
    let raw_dir = server.root().join("raw");
    std::fs::create_dir(&raw_dir)?;
    let t = Instant::now();
    let out = std::process::Command::new(server.bindir().join("pg_basebackup"))
        .args([
            "-D",
            &raw_dir.to_string_lossy(),
            "-Ft",
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            &server.url("bench"),
        ])
        .output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string().into());
    }
    let raw_create = t.elapsed();
    let client = db.connect().await?;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    client.batch_execute("DELETE FROM big WHERE id % 2 = 0").await?;
    client.query_one("SELECT pg_switch_wal()", &[]).await?;
    drop(client);
    let t = Instant::now();
    let data = server.data_dir();
    let data_s = data.to_string_lossy().into_owned();
    run_as(&server, "pg_ctl", &["stop", "-D", &data_s, "-m", "fast", "-w"])?;
    std::fs::rename(&data, server.root().join("data.raw-old"))?;
    std::fs::create_dir(&data)?;
    untar(&raw_dir.join("base.tar"), &data)?;
    untar(&raw_dir.join("pg_wal.tar"), &data.join("pg_wal"))?;
    let conf = format!(
        "restore_command = 'cp {}/%f %p'\nrecovery_target_lsn = '{lsn}'\nrecovery_target_inclusive = off\nrecovery_target_timeline = 'current'\nrecovery_target_action = 'promote'\n",
        server.archive().display()
    );
    let auto = data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto)?;
    text.push_str(&conf);
    std::fs::write(&auto, text)?;
    std::fs::write(data.join("recovery.signal"), "")?;
    chmod_chown(&data, server.owner())?;
    run_as(
        &server,
        "pg_ctl",
        &[
            "start",
            "-D",
            &data_s,
            "-w",
            "-t",
            "1800",
            "-l",
            &data.join("raw.log").to_string_lossy(),
        ],
    )?;
    loop {
        if let Ok(c) = db.connect().await {
            if let Ok(r) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !r.get::<_, bool>(0) {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let raw_restore = t.elapsed();
    let n: i64 = db
        .connect()
        .await?
        .query_one("SELECT count(*) FROM big", &[])
        .await?
        .get(0);
    assert_eq!(n as u64, rows, "raw restore lost rows");

    // backstop
    let t = Instant::now();
    let record = backend.create(&db, "bench-1").await?;
    let create = t.elapsed();
    let point = runner.recovery_point(&db).await?;
    db.connect()
        .await?
        .batch_execute("DELETE FROM big WHERE id % 2 = 0")
        .await?;
    let t = Instant::now();
    backend.restore(&db, &record, &point, "bench-1").await?;
    let restore = t.elapsed();
    let n: i64 = db
        .connect()
        .await?
        .query_one("SELECT count(*) FROM big", &[])
        .await?
        .get(0);
    assert_eq!(n as u64, rows, "restore lost rows");

    println!(
        "checkpoint: backstop {:.2}s, raw pg_basebackup {:.2}s, ratio {:.2}",
        create.as_secs_f64(),
        raw_create.as_secs_f64(),
        create.as_secs_f64() / raw_create.as_secs_f64()
    );
    println!(
        "restore:    backstop {:.2}s, hand-written recovery {:.2}s, ratio {:.2}",
        restore.as_secs_f64(),
        raw_restore.as_secs_f64(),
        restore.as_secs_f64() / raw_restore.as_secs_f64()
    );
    let ours = create + restore;
    let raw = raw_create + raw_restore;
    println!(
        "checkpoint+restore: backstop {:.2}s, raw {:.2}s, ratio {:.2}",
        ours.as_secs_f64(),
        raw.as_secs_f64(),
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}

fn untar(archive: &Path, into: &Path) -> Res<()> {
    std::fs::create_dir_all(into)?;
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()?;
    if !st.success() {
        return Err("tar failed".into());
    }
    Ok(())
}

fn chmod_chown(dir: &Path, owner: Option<(u32, u32)>) -> Res<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = owner {
        let st = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(dir)
            .status()?;
        if !st.success() {
            return Err("chown failed".into());
        }
    }
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
