//! Datastore move benchmark (`cargo bench --bench datastore`): export, import
//! and verify of a database of `BACKSTOP_BENCH_MB` (default 1024) MB between
//! two servers, against raw `pg_dump -Fc | pg_restore` of the same data.
//! Prints the figures; asserts only that the move verified.

use std::time::Instant;

use backstop::datastore::{self, ImportOptions};
use backstop::pgserver::PgServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let mb: u64 = std::env::var("BACKSTOP_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let source = PgServer::start().await?;
    let raw_target = PgServer::start().await?;
    let target = PgServer::start().await?;
    for s in [&source, &raw_target, &target] {
        s.create_database("bench").await?;
    }
    let rows = mb * 1024 * 1024 / 1000;
    let t = Instant::now();
    source
        .database("bench")?
        .connect()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, pad text); INSERT INTO big SELECT g, md5(g::text) || repeat('x', 900) FROM generate_series(1, {rows}) g; CHECKPOINT"
        ))
        .await?;
    println!("data: {rows} rows (~{mb} MB) in {:.1}s", t.elapsed().as_secs_f64());
    let dir = tempfile::tempdir()?;
    let bindir = source.bindir().to_path_buf();

    // Raw: pg_dump -Fc | pg_restore.
    let t = Instant::now();
    let pipeline = format!(
        "{}/pg_dump -Fc '{}' | {}/pg_restore --no-owner -d '{}'",
        bindir.display(),
        source.url("bench"),
        bindir.display(),
        raw_target.url("bench")
    );
    let st = std::process::Command::new("sh").arg("-c").arg(&pipeline).status()?;
    if !st.success() {
        return Err("raw pg_dump | pg_restore failed".into());
    }
    let raw = t.elapsed().as_secs_f64();

    // backstop: lock, export, import, verify.
    let (s, d) = (source.database("bench")?, target.database("bench")?);
    let file = dir.path().join("bench.dump");
    let t = Instant::now();
    datastore::lock(&s, "source", "bench", "bench", &[]).await?;
    let lock = t.elapsed().as_secs_f64();
    let t = Instant::now();
    datastore::export(&s, &file, &bindir, |_| {}).await?;
    let export = t.elapsed().as_secs_f64();
    let t = Instant::now();
    datastore::import(&d, &file, &bindir, ImportOptions::default(), "bench").await?;
    let import = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let diffs = datastore::verify(&s, &d).await?;
    let verify = t.elapsed().as_secs_f64();
    assert!(diffs.iter().all(|x| x.status == "ok"), "move did not verify: {diffs:?}");
    let ours = lock + export + import + verify;
    println!("raw pg_dump | pg_restore: {raw:.2}s");
    println!(
        "backstop: lock {lock:.2}s, export {export:.2}s, import {import:.2}s, verify {verify:.2}s, total {ours:.2}s"
    );
    println!(
        "ratio (backstop total / raw): {:.2}; without verify: {:.2}",
        ours / raw,
        (ours - verify) / raw
    );
    Ok(())
}
