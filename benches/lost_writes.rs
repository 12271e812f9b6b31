//! Overhead of capturing lost writes (`cargo bench --bench lost_writes`):
//! a logical slot (`test_decoding`) held open while a migration runs and an
//! application writes, against the same work with no slot, in the same run
//! (alternating which goes first), on one server with `wal_level =
//! logical`.
//!
//! - migration: `UPDATE` of every row of a table of `BACKSTOP_BENCH_ROWS`
//!   rows (default 200,000) in one transaction, timed;
//! - writer: single-row INSERT transactions for `BACKSTOP_BENCH_SECONDS`
//!   (default 3), counted, while the migration runs;
//! - the read before a restore: `pg_logical_slot_peek_changes` of what the
//!   slot holds then, and its decoding by backstop, timed.
//!
//! `BACKSTOP_BENCH_REPS` (default 3) pairs; medians printed; nothing asserted.

use std::time::{Duration, Instant};

use backstop::pgserver::PgServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn client(url: &str) -> Res<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// One trial: (migration seconds, writer transactions per second, read seconds).
async fn trial(url: &str, rows: u64, seconds: u64, slot: bool) -> Res<(f64, f64, f64)> {
    let admin = client(url).await?;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS big, events;
             CREATE TABLE big AS SELECT g AS id, g AS v FROM generate_series(1, {rows}) g;
             ALTER TABLE big ADD PRIMARY KEY (id);
             CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now());
             CHECKPOINT;"
        ))
        .await?;
    if slot {
        admin
            .batch_execute("SELECT pg_create_logical_replication_slot('backstop_bench', 'test_decoding')")
            .await?;
    }
    let writer_url = url.to_string();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let writer = tokio::spawn(async move {
        let c = client(&writer_url).await.ok()?;
        let mut n = 0u64;
        while Instant::now() < stop {
            c.execute("INSERT INTO events DEFAULT VALUES", &[]).await.ok()?;
            n += 1;
        }
        Some(n)
    });
    let t = Instant::now();
    admin.batch_execute("UPDATE big SET v = v + 1").await?;
    let migration = t.elapsed().as_secs_f64();
    let written = writer.await?.unwrap_or(0) as f64 / seconds as f64;
    let mut read = 0.0;
    if slot {
        let t = Instant::now();
        let rows = admin
            .query(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_changes('backstop_bench', NULL, NULL,
                    'include-xids', '1', 'include-timestamp', '1', 'skip-empty-xacts', '1')",
                &[],
            )
            .await?;
        let pairs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let txns = backstop::capture::decode::transactions(pairs.iter().map(|(l, d)| (l.as_str(), d.as_str())))?;
        read = t.elapsed().as_secs_f64();
        eprintln!("  read {} changes in {} transactions", pairs.len(), txns.len());
        admin
            .batch_execute("SELECT pg_drop_replication_slot('backstop_bench')")
            .await?;
    }
    Ok((migration, written, read))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rows = env_num("BACKSTOP_BENCH_ROWS", 200_000);
    let seconds = env_num("BACKSTOP_BENCH_SECONDS", 3).max(1);
    let reps = env_num("BACKSTOP_BENCH_REPS", 3).max(1);
    let server = PgServer::start_with("wal_level = logical\nmax_replication_slots = 4").await?;
    server.create_database("bench").await?;
    let url = server.url("bench");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // Alternate which goes first.
        for slot in if rep % 2 == 0 { [true, false] } else { [false, true] } {
            let r = trial(&url, rows, seconds, slot).await?;
            eprintln!(
                "rep {rep} slot={slot}: migration {:.3} s, writer {:.0} tx/s, read {:.3} s",
                r.0, r.1, r.2
            );
            if slot {
                with.push(r)
            } else {
                without.push(r)
            }
        }
    }
    let m = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (mw, mo) = (m(&with, |r| r.0), m(&without, |r| r.0));
    let (ww, wo) = (m(&with, |r| r.1), m(&without, |r| r.1));
    println!("lost-write capture, {rows} rows updated, writer for {seconds} s, median of {reps}:");
    println!(
        "  migration run time: with slot {mw:.3} s, without {mo:.3} s: ratio {:.3}",
        mw / mo
    );
    println!(
        "  writer throughput: with slot {ww:.0} tx/s, without {wo:.0} tx/s: ratio {:.3}",
        ww / wo
    );
    println!(
        "  reading the slot before a restore (peek + decode): {:.3} s",
        m(&with, |r| r.2)
    );
    Ok(())
}
