//! Checkpoints and restores (`cargo bench --bench checkpoint`), for each size
//! in `BACKSTOP_BENCH_SIZES_MB` (default `1024,3072`):
//!
//! 1. **Checkpoint**: the first one (it takes the base backup) and the median
//!    of the next five (recovery points on that base backup, with ~64 MB of
//!    the app's writes between them), beside the anchor: `pg_basebackup` of
//!    the same data, what a copy per migration costs.
//! 2. **Restore**: backstop's PITR from the checkpoint's base backup to the
//!    recovery point, beside a hand-written recovery from the same base
//!    backup to the same LSN (untar, `restore_command`, target, promote).
//! 3. **pgBackRest** (the first size; `BACKSTOP_BENCH_PGBACKREST=0` skips it):
//!    the `pgbackrest` backend's checkpoints and restore of the same data,
//!    beside the `local` backend's restore measured above.
//!
//! Figures are printed; nothing is asserted but that rows survive.

use std::path::Path;
use std::time::{Duration, Instant};

use backstop::checkpoint::local::LocalBackend;
use backstop::checkpoint::pgbackrest::PgBackRestBackend;
use backstop::checkpoint::server::Server;
use backstop::checkpoint::{Checkpoint, CheckpointRecord};
use backstop::db::Database;
use backstop::pgserver::PgServer;
use backstop::runner::{Runner, SqlRunner};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if let Ok(filter) = std::env::var("BACKSTOP_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let sizes: Vec<u64> = std::env::var("BACKSTOP_BENCH_SIZES_MB")
        .unwrap_or_else(|_| "1024,3072".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let pgbackrest = std::env::var("BACKSTOP_BENCH_PGBACKREST").as_deref() != Ok("0");
    for (i, mb) in sizes.iter().enumerate() {
        let local_restore = local(*mb).await?;
        if i == 0 && pgbackrest {
            with_pgbackrest(*mb, local_restore).await?;
        }
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A server with database `bench` of about `mb` MB; returns it and the row count.
async fn loaded(mb: u64) -> Res<(PgServer, Database, i64)> {
    let server = PgServer::start().await?;
    server.create_database("bench").await?;
    let db = server.database("bench")?;
    let rows = mb * 1024 * 1024 / 1000;
    let t = Instant::now();
    db.connect()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 900) AS pad FROM generate_series(1, {rows}) g; CHECKPOINT"
        ))
        .await?;
    let size: i64 = db
        .connect()
        .await?
        .query_one("SELECT pg_database_size('bench')", &[])
        .await?
        .get(0);
    println!(
        "\n== {:.0} MB database (loaded in {:.1} s)",
        size as f64 / 1048576.0,
        secs(t.elapsed())
    );
    Ok((server, db, rows as i64))
}

/// ~64 MB of the app's writes: WAL a restore replays.
async fn app_writes(db: &Database, from: i64) -> Res<i64> {
    let n = 64 * 1024;
    db.connect()
        .await?
        .batch_execute(&format!(
            "INSERT INTO big SELECT g, md5(g::text) || repeat('y', 900) FROM generate_series({}, {}) g",
            from + 1,
            from + n
        ))
        .await?;
    Ok(from + n)
}

async fn count(db: &Database) -> Res<i64> {
    Ok(db
        .connect()
        .await?
        .query_one("SELECT count(*) FROM big", &[])
        .await?
        .get(0))
}

/// Takes the first checkpoint, then five more with the app writing between
/// them; returns the first's time, the median of the others, the last record
/// and the row count.
async fn checkpoints(
    backend: &dyn Checkpoint,
    db: &Database,
    rows: i64,
) -> Res<(Duration, Duration, CheckpointRecord, i64)> {
    let t = Instant::now();
    let mut record = backend.create(db, "first").await?;
    let first = t.elapsed();
    let mut rows = rows;
    let mut next = Vec::new();
    for i in 0..5 {
        rows = app_writes(db, rows).await?;
        let t = Instant::now();
        record = backend.create(db, &format!("next-{i}")).await?;
        next.push(t.elapsed());
    }
    if let Some(base) = &record.base {
        println!("   the last checkpoint relies on {}", base.describe());
    }
    Ok((first, median(next), record, rows))
}

/// The failed migration: half the rows deleted.
async fn damage(db: &Database) -> Res<()> {
    db.connect()
        .await?
        .batch_execute("DELETE FROM big WHERE id % 2 = 0")
        .await?;
    Ok(())
}

async fn local(mb: u64) -> Res<Duration> {
    let (server, db, rows) = loaded(mb).await?;
    let state = tempfile::tempdir()?;
    let backend = LocalBackend {
        bindir: server.bindir().to_path_buf().into(),
        pgdata: server.data_dir(),
        wal_archive: server.archive(),
        store: state.path().join("checkpoints"),
        recovery_timeout: Duration::from_secs(3600),
        policy: Default::default(),
    };
    // Anchor: a copy of the data (what a base backup per migration costs).
    let copy = server.root().join("anchor-copy");
    let t = Instant::now();
    run(
        &server,
        "pg_basebackup",
        &[
            "-D",
            &copy.to_string_lossy(),
            "-Ft",
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            &server.url("bench"),
        ],
    )?;
    let anchor = t.elapsed();
    std::fs::remove_dir_all(&copy)?;

    let (first, next, record, rows) = checkpoints(&backend, &db, rows).await?;
    println!(
        "   checkpoint: first (takes the base backup) {:.2} s; next (recovery point) median {:.3} s | anchor pg_basebackup {:.2} s | next/anchor {:.3}",
        secs(first),
        secs(next),
        secs(anchor),
        secs(next) / secs(anchor)
    );

    // Alternating (raw, backstop, backstop, raw) so that neither always goes
    // first with a cold cache; each after the same damage.
    let point = SqlRunner.recovery_point(&db).await?;
    let (mut raws, mut ourss) = (Vec::new(), Vec::new());
    for raw_turn in [true, false, false, true] {
        damage(&db).await?;
        if raw_turn {
            raws.push(raw_recovery(&server, &db, Path::new(&record.location), &point.lsn).await?);
        } else {
            let t = Instant::now();
            backend
                .restore(&db, &record, &point, &format!("bench-{}", ourss.len()))
                .await?;
            ourss.push(t.elapsed());
        }
        assert_eq!(count(&db).await?, rows, "a restore lost rows");
        remove_set_aside(&server)?;
    }
    let raw = (raws[0] + raws[1]) / 2;
    let ours = (ourss[0] + ourss[1]) / 2;
    let replay = record.base.as_ref().map_or(0, |b| b.replay_bytes);
    println!(
        "   restore from the same base backup ({:.0} MB of WAL to replay; mean of 2 each, alternating): backstop {:.2} s | hand-written recovery {:.2} s | ratio {:.3}",
        replay as f64 / 1048576.0,
        secs(ours),
        secs(raw),
        secs(ours) / secs(raw)
    );
    Ok(ours)
}

/// Set-aside data directories: not needed here, and they fill the disk.
fn remove_set_aside(server: &PgServer) -> Res<()> {
    for entry in std::fs::read_dir(server.root())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("data.") {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Untar the base backup, recover to `lsn` from the archive, promote.
async fn raw_recovery(server: &PgServer, db: &Database, base: &Path, lsn: &str) -> Res<Duration> {
    let data = server.data_dir();
    let data_s = data.to_string_lossy().into_owned();
    let t = Instant::now();
    run(server, "pg_ctl", &["stop", "-D", &data_s, "-m", "fast", "-w"])?;
    std::fs::rename(&data, server.root().join("data.raw-old"))?;
    std::fs::create_dir(&data)?;
    untar(&base.join("base.tar"), &data)?;
    untar(&base.join("pg_wal.tar"), &data.join("pg_wal"))?;
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
    let log = data.join("raw.log");
    run(
        server,
        "pg_ctl",
        &["start", "-D", &data_s, "-w", "-t", "3600", "-l", &log.to_string_lossy()],
    )?;
    await_promoted(db).await;
    let took = t.elapsed();
    // The recovery settings must not steer the next restore.
    let client = db.connect().await?;
    for s in [
        "restore_command",
        "recovery_target_lsn",
        "recovery_target_inclusive",
        "recovery_target_timeline",
        "recovery_target_action",
    ] {
        client.batch_execute(&format!("ALTER SYSTEM RESET {s}")).await?;
    }
    Ok(took)
}

async fn await_promoted(db: &Database) {
    loop {
        if let Ok(c) = db.connect().await {
            if let Ok(r) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !r.get::<_, bool>(0) {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn with_pgbackrest(mb: u64, local_restore: Duration) -> Res<()> {
    let (server, db, rows) = loaded(mb).await?;
    println!("   (pgbackrest backend, same data)");
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pgbackrest");
    for d in ["repo", "log", "lock", "spool"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let config = root.join("pgbackrest.conf");
    std::fs::write(
        &config,
        format!(
            "[global]\nrepo1-path={r}/repo\nlog-path={r}/log\nlock-path={r}/lock\nspool-path={r}/spool\nrepo1-retention-full=2\nlog-level-console=warn\n\n[bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\npg1-user=postgres\n",
            r = root.display(),
            data = server.data_dir().display(),
            port = server.port(),
            sock = server.root().display(),
        ),
    )?;
    chmod_chown(dir.path(), server.owner())?;
    let client = db.connect().await?;
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET archive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
            config.display()
        ))
        .await?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    let backend = PgBackRestBackend {
        program: "pgbackrest".into(),
        stanza: "bench".into(),
        config: Some(config.clone()),
        server: Server {
            bindir: server.bindir().to_path_buf().into(),
            pgdata: server.data_dir(),
            recovery_timeout: Duration::from_secs(3600),
        },
        store: dir.path().join("checkpoints"),
        policy: Default::default(),
    };
    let mut create = std::process::Command::new("pgbackrest");
    if let Some((uid, gid)) = server.owner() {
        use std::os::unix::process::CommandExt;
        create.uid(uid).gid(gid);
    }
    let out = create
        .arg(format!("--config={}", config.display()))
        .args(["--stanza=bench", "stanza-create"])
        .output()?;
    if !out.status.success() {
        return Err(format!("stanza-create: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let (first, next, record, rows) = checkpoints(&backend, &db, rows).await?;
    println!(
        "   pgbackrest checkpoint: first (full backup) {:.2} s; next (recovery point) median {:.3} s",
        secs(first),
        secs(next)
    );
    let point = SqlRunner.recovery_point(&db).await?;
    damage(&db).await?;
    let t = Instant::now();
    backend.restore(&db, &record, &point, "bench").await?;
    let took = t.elapsed();
    assert_eq!(count(&db).await?, rows, "pgbackrest restore lost rows");
    println!(
        "   pgbackrest restore (--delta) {:.2} s | local backend restore of the same size {:.2} s | ratio {:.3}",
        secs(took),
        secs(local_restore),
        secs(took) / secs(local_restore)
    );
    Ok(())
}

fn run(server: &PgServer, program: &str, args: &[&str]) -> Res<()> {
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
