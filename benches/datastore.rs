//! Datastore move benchmark (`cargo bench --bench datastore`): a whole move
//! (lock, export, import, verify, unlock) of a database of
//! `BACKSTOP_BENCH_MB` (default 1024) MB between two servers, against raw
//! `pg_dump -j2 -Fd` + `pg_restore -j2` of the same data (and, for scale,
//! `pg_dump -Fc | pg_restore`). `BACKSTOP_BENCH_REPS` (default 2) runs each,
//! alternating which goes first; medians. Asserts only that the move verified.

use std::path::Path;
use std::time::Instant;

use backstop::datastore::{self, ImportOptions};
use backstop::pgserver::PgServer;

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
    let reps = env_num("BACKSTOP_BENCH_REPS", 2).max(1);
    let source = PgServer::start().await?;
    let target = PgServer::start().await?;
    source.create_database("bench").await?;
    // Three tables: the move has parallel work to share out.
    let rows = mb * 1024 * 1024 / 1000 / 3;
    let t = Instant::now();
    let client = source.database("bench")?.connect().await?;
    for name in ["big_a", "big_b", "big_c"] {
        client
            .batch_execute(&format!(
                "CREATE TABLE {name} (id bigint PRIMARY KEY, pad text); INSERT INTO {name} SELECT g, md5(g::text) || repeat('x', 900) FROM generate_series(1, {rows}) g; ANALYZE {name}"
            ))
            .await?;
    }
    client.batch_execute("CHECKPOINT").await?;
    let size: i64 = client.query_one("SELECT pg_database_size('bench')", &[]).await?.get(0);
    println!(
        "data: 3 tables of {rows} rows, database {:.0} MB, made in {:.1}s",
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let bindir = source.bindir().to_path_buf();
    let (mut raw_fd, mut raw_fc, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps = Vec::new();
    for rep in 0..reps {
        let order: [u8; 3] = if rep % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            fresh(&target, "bench").await?;
            let out = dir.path().join(format!("dump-{rep}-{which}"));
            let t = Instant::now();
            match which {
                0 => {
                    let bin = bindir.display();
                    shell(&format!(
                        "{bin}/pg_dump -j2 -Fd -f '{}' '{}' && {bin}/pg_restore -j2 --no-owner -d '{}' '{}'",
                        out.display(),
                        source.url("bench"),
                        target.url("bench"),
                        out.display()
                    ))?;
                    raw_fd.push(t.elapsed().as_secs_f64());
                }
                1 => {
                    let bin = bindir.display();
                    shell(&format!(
                        "{bin}/pg_dump -Fc '{}' | {bin}/pg_restore --no-owner -d '{}'",
                        source.url("bench"),
                        target.url("bench")
                    ))?;
                    raw_fc.push(t.elapsed().as_secs_f64());
                }
                _ => {
                    let (s, d) = (source.database("bench")?, target.database("bench")?);
                    let mut mark = Instant::now();
                    let mut lap = || {
                        let secs = mark.elapsed().as_secs_f64();
                        mark = Instant::now();
                        secs
                    };
                    datastore::lock(&s, "source", "bench", "bench", &[]).await?;
                    let lock = lap();
                    datastore::export(&s, &out, &bindir, 2).await?;
                    let export = lap();
                    let opts = ImportOptions {
                        jobs: 2,
                        ..Default::default()
                    };
                    datastore::import(&d, &out, &bindir, opts, "bench").await?;
                    let import = lap();
                    let diffs = datastore::verify(&s, &d).await?;
                    let verify = lap();
                    assert!(diffs.iter().all(|x| x.status == "ok"), "move did not verify: {diffs:?}");
                    datastore::unlock(&d, false).await?;
                    datastore::unlock(&s, true).await?;
                    let unlock = lap();
                    ours.push(t.elapsed().as_secs_f64());
                    steps.push((lock, export, import, verify, unlock));
                }
            }
            remove(&out)?;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (fd, fc, us) = (median(&mut raw_fd), median(&mut raw_fc), median(&mut ours));
    println!("raw pg_dump -j2 -Fd + pg_restore -j2: {fd:.2}s (median of {reps})");
    println!("raw pg_dump -Fc | pg_restore: {fc:.2}s");
    for (lock, export, import, verify, unlock) in &steps {
        println!(
            "backstop: lock {lock:.2}s, export {export:.2}s, import {import:.2}s, verify {verify:.2}s, unlock {unlock:.2}s, total {:.2}s",
            lock + export + import + verify + unlock
        );
    }
    println!(
        "backstop move incl. verify: {us:.2}s; ratio to pg_dump -j2 -Fd + pg_restore -j2: {:.3}; to pg_dump -Fc | pg_restore: {:.3}",
        us / fd,
        us / fc
    );
    Ok(())
}

/// Drops and recreates database `name` on `server` (psql: each `-c` on its own,
/// outside a transaction block).
async fn fresh(server: &PgServer, name: &str) -> Res<()> {
    let ok = std::process::Command::new(server.bindir().join("psql"))
        .args(["-qAt", "-c"])
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .arg("-c")
        .arg(format!("CREATE DATABASE {name}"))
        .arg(server.url("postgres"))
        .status()?
        .success();
    if !ok {
        return Err(format!("recreating database {name} failed").into());
    }
    Ok(())
}

fn shell(script: &str) -> Res<()> {
    if !std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()?
        .success()
    {
        return Err(format!("failed: {script}").into());
    }
    Ok(())
}

fn remove(path: &Path) -> Res<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)?;
    }
    Ok(())
}
