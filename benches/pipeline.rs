//! Benchmark of a no-op pass (`cargo bench --bench pipeline`): the whole
//! `backstop run --once --checkpoint dump` process for a pushed migration of
//! `SELECT 1` on a tiny database, against the anchor `psql -c 'select 1'`
//! measured in the same loop (alternating which runs first), over
//! `BACKSTOP_BENCH_PASSES` (default 10) passes. The checkpoint's own time
//! (the `checkpoint` step of the run's report: a `pg_dump` of the database)
//! is shown apart: the goal is pass − checkpoint ≤ 2× psql.
//! Checkpoints and restores: `benches/checkpoint.rs`.
//!
//! `BACKSTOP_BENCH_OTHER=/path/to/backstop` also runs another build (each
//! with a repository, a state and a database of its own, on the same
//! server) in the same loop, one pass of each per round: the pair shares
//! the machine's moment, which a run of the bench after another does not.
//!
//! With another build, the median of the rounds' differences is printed
//! too: steadier than the difference of the two medians when the machine's
//! speed drifts during the run. The two places are not equal: the same
//! binary in both measured "this" 1.7 ms slower (pass − checkpoint, 60
//! rounds). `BACKSTOP_BENCH_THIS=/path/to/backstop` puts another build in
//! the first place, so that a comparison can be run both ways round.
//!
//! `BACKSTOP_BENCH_LOG=debug` prints each pass's log. Figures are printed;
//! nothing is asserted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use backstop::pgserver::PgServer;
use backstop::sandbox::{BareRemote, Change};
use common::Res;

mod common;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One build under test, with what its passes work on.
struct Subject {
    name: String,
    bin: PathBuf,
    remote: BareRemote,
    state: PathBuf,
    url: String,
    totals: Vec<f64>,
    checkpoints: Vec<f64>,
    overheads: Vec<f64>,
}

impl Subject {
    async fn new(name: &str, bin: PathBuf, server: &PgServer, dir: &Path) -> Res<Self> {
        let db = format!("shop_{name}");
        server.create_database(&db).await?;
        let remote = BareRemote::init(&dir.join(format!("sre-{name}.git")))?;
        let base = remote.commit(
            "main",
            &[Change::Write(
                "apps/shop/app.yaml",
                "kind: ConfigMap\nmetadata: {name: app}\n",
            )],
            "base",
        )?;
        remote.set_branch("backstop/gate", &base)?;
        let subject = Self {
            name: name.to_string(),
            bin,
            remote,
            state: dir.join(format!("state-{name}")),
            url: server.url(&db),
            totals: Vec::new(),
            checkpoints: Vec::new(),
            overheads: Vec::new(),
        };
        // One pass with nothing pending first: the mirror is cloned once.
        subject.pass()?;
        Ok(subject)
    }

    fn pass(&self) -> Res<f64> {
        let t = Instant::now();
        common::run_once(&self.bin, self.remote.path(), &self.state, &self.url)?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Pushes migration `i` and runs the pass that applies it.
    fn round(&mut self, i: u64) -> Res<()> {
        let yaml = format!(
            "kind: ConfigMap\nmetadata:\n  name: m{i}\n  annotations:\n    backstop.dev/migration: noop-{i}\n    backstop.dev/database: url:DB\ndata:\n  a.sql: SELECT 1;\n"
        );
        let path = format!("apps/shop/m{i}.yaml");
        self.remote
            .commit("main", &[Change::Write(&path, &yaml)], &format!("noop {i}"))?;
        let before = runs(&self.state);
        let total = self.pass()?;
        let new: Vec<String> = runs(&self.state).difference(&before).cloned().collect();
        let [run] = new.as_slice() else {
            return Err(format!("{}: expected one new run, found {new:?}", self.name).into());
        };
        let checkpoint = step_secs(&self.state.join("runs").join(run).join("report.json"), "checkpoint")?;
        self.totals.push(total);
        self.checkpoints.push(checkpoint);
        self.overheads.push(total - checkpoint);
        Ok(())
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] * 1000.0
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
    let this = std::env::var_os("BACKSTOP_BENCH_THIS").map_or_else(|| common::BACKSTOP.into(), PathBuf::from);
    let mut subjects = vec![Subject::new("this", this, &server, dir.path()).await?];
    if let Some(other) = std::env::var_os("BACKSTOP_BENCH_OTHER") {
        subjects.push(Subject::new("other", other.into(), &server, dir.path()).await?);
    }
    let psql = server.bindir().join("psql");
    let url = server.url("shop");
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
    let mut psqls = Vec::new();
    for i in 0..passes {
        // Who goes first turns with each round, the anchor included.
        let n = subjects.len() + 1;
        for k in 0..n {
            let at = (k + i as usize) % n;
            match subjects.get_mut(at) {
                Some(s) => s.round(i)?,
                None => psqls.push(anchor()?),
            }
        }
    }
    let p = median(&psqls);
    for s in &subjects {
        let (t, c, o) = (median(&s.totals), median(&s.checkpoints), median(&s.overheads));
        println!(
            "no-op pass, {} build ({passes} passes, medians): backstop run --once {t:.1} ms, of which checkpoint (pg_dump) {c:.1} ms; pass − checkpoint {o:.1} ms; psql -c 'select 1' {p:.1} ms; ratio {:.2}",
            s.name,
            o / p
        );
    }
    if let [this, other] = subjects.as_slice() {
        // Round by round: the two passes of a round share the machine's moment.
        let paired = |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>());
        println!(
            "paired, this − other (median of the {passes} rounds' differences): pass {:+.1} ms, pass − checkpoint {:+.1} ms",
            paired(&this.totals, &other.totals),
            paired(&this.overheads, &other.overheads)
        );
    }
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
