//! Fixtures shared by the integration tests: a real PostgreSQL server, a bare
//! git remote holding a small sre repo, the `backstop` binary run against
//! them, and small builders for migration carriers.
#![allow(dead_code)]

pub mod backrest;
pub mod envtest;
pub mod flux;
pub mod http;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

use backstop::pgserver::PgServer;
use backstop::sandbox::{BareRemote, Change};

pub const GATE: &str = "backstop/gate";
pub const DB_VAR: &str = "SHOP_DATABASE_URL";

/// A carrier (ConfigMap) under `apps/shop/migrations/`.
pub struct CarrierBuilder {
    id: String,
    phase: Option<String>,
    database: String,
    sql: Vec<(String, String)>,
    verify: Option<String>,
    revert: Option<String>,
    extra: Vec<(String, String)>,
}

pub fn carrier(id: &str) -> CarrierBuilder {
    CarrierBuilder {
        id: id.into(),
        phase: None,
        database: format!("url:{DB_VAR}"),
        sql: Vec::new(),
        verify: None,
        revert: None,
        extra: Vec::new(),
    }
}

impl CarrierBuilder {
    pub fn sql(mut self, key: &str, text: &str) -> Self {
        self.sql.push((key.into(), text.into()));
        self
    }
    pub fn verify(mut self, q: &str) -> Self {
        self.verify = Some(q.into());
        self
    }
    pub fn phase(mut self, p: &str) -> Self {
        self.phase = Some(p.into());
        self
    }
    pub fn database(mut self, d: &str) -> Self {
        self.database = d.into();
        self
    }
    pub fn revert(mut self, r: &str) -> Self {
        self.revert = Some(r.into());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.extra.push((k.into(), v.into()));
        self
    }
    pub fn path(&self) -> String {
        format!("apps/shop/migrations/{}.yaml", self.id)
    }
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m-{}\n  annotations:\n    backstop.dev/migration: \"{}\"\n    backstop.dev/database: {}\n",
            self.id, self.id, self.database
        );
        if let Some(p) = &self.phase {
            y.push_str(&format!("    backstop.dev/phase: {p}\n"));
        }
        if let Some(r) = &self.revert {
            y.push_str(&format!("    backstop.dev/revert: {r}\n"));
        }
        if self.verify.is_some() {
            y.push_str("    backstop.dev/verify: verify\n");
        }
        for (k, v) in &self.extra {
            y.push_str(&format!("    backstop.dev/{k}: {v}\n"));
        }
        y.push_str("data:\n");
        for (k, text) in &self.sql {
            y.push_str(&format!("  {k}: |\n"));
            for line in text.lines() {
                y.push_str(&format!("    {line}\n"));
            }
        }
        if let Some(v) = &self.verify {
            y.push_str(&format!("  verify: |\n    {v}\n"));
        }
        y
    }
}

/// The `backstop` binary under test: `BACKSTOP_TEST_BIN` when set (a copy,
/// so that a long run is not disturbed by rebuilds), else cargo's.
pub fn bin() -> std::path::PathBuf {
    std::env::var_os("BACKSTOP_TEST_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_backstop").into())
}

/// `backstop status --json --state <state>`.
pub fn status_output(state: &Path) -> Output {
    std::process::Command::new(bin())
        .args(["status", "--json", "--state"])
        .arg(state)
        .output()
        .expect("run backstop status")
}

/// The status JSON of `state` (Null when it cannot be read).
pub fn status_json(state: &Path) -> serde_json::Value {
    serde_json::from_slice(&status_output(state).stdout).unwrap_or(serde_json::Value::Null)
}

/// Polls `check` until it holds (panics naming `what` after 90 s).
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The fixture's WAL segment size: 1 MiB, not the default 16, so that the
/// archives of the suite's many checkpoints fit a small temp directory (and
/// every path that names or counts segments runs on a size not the default).
pub const WAL_SEGMENT_MIB: u32 = 1;

/// A server, a remote and a state directory.
pub struct Fixture {
    pub server: PgServer,
    pub remote: BareRemote,
    pub dir: tempfile::TempDir,
    pub base: String,
}

impl Fixture {
    /// Server with database `shop`, remote with a base commit on main and the gate there.
    pub async fn new() -> Self {
        Self::with_settings("").await
    }

    /// [`Fixture::new`] on a server with extra postgresql.conf `settings`.
    pub async fn with_settings(settings: &str) -> Self {
        let server = PgServer::start_with_segments(settings, WAL_SEGMENT_MIB)
            .await
            .expect("start PostgreSQL");
        server.create_database("shop").await.expect("create database");
        let dir = tempfile::tempdir().expect("tempdir");
        let remote = BareRemote::init(&dir.path().join("sre.git")).expect("init remote");
        let base = remote
            .commit(
                "main",
                &[
                    Change::Write(
                        "apps/shop/base/deployment.yaml",
                        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n",
                    ),
                    Change::Write(
                        "clusters/develop/shop.yaml",
                        "apiVersion: kustomize.toolkit.fluxcd.io/v1\nkind: Kustomization\nmetadata:\n  name: shop\n",
                    ),
                ],
                "base",
            )
            .expect("base commit");
        remote.set_branch(GATE, &base).expect("gate");
        Self {
            server,
            remote,
            dir,
            base,
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `backstop status --json` of the fixture's state (which must succeed).
    pub fn status(&self) -> serde_json::Value {
        let out = status_output(&self.state());
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// No revert on main, no revert branch, no restore.
    pub fn assert_nothing_reverted(&self) {
        assert_eq!(self.revert_commits("main"), 0, "no revert on main");
        assert_eq!(
            git(self.remote.path(), &["branch", "--list", "backstop/revert-*"]).trim(),
            "",
            "no revert branch"
        );
        assert_eq!(self.kept_data_dirs(), 0, "no restore");
    }

    /// Commits a carrier on main.
    pub fn commit_carrier(&self, c: &CarrierBuilder, message: &str) -> String {
        self.remote
            .commit("main", &[Change::Write(&c.path(), &c.yaml())], message)
            .expect("commit")
    }

    pub fn commit_files(&self, files: &[(&str, &str)], message: &str) -> String {
        let changes: Vec<Change> = files.iter().map(|(p, c)| Change::Write(p, c)).collect();
        self.remote.commit("main", &changes, message).expect("commit")
    }

    /// `backstop run --once` with local checkpoints (extra args appended).
    pub async fn run(&self, extra: &[&str]) -> Output {
        self.run_env(extra, &[]).await
    }

    pub async fn run_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        self.run_with(&self.server.data_dir(), &self.server.archive(), extra, env)
            .await
    }

    /// `backstop run --once` with the given `--pgdata` and `--wal-archive`.
    pub async fn run_with(&self, pgdata: &Path, archive: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(&self.state(), pgdata, archive, extra, env)
            .output()
            .await
            .expect("run backstop")
    }

    /// The `backstop run --once` command on `state` (to spawn, watch and kill).
    pub fn command(
        &self,
        state: &Path,
        pgdata: &Path,
        archive: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin());
        cmd.arg("run")
            .arg("--repo")
            .arg(self.remote.path())
            .arg("--path")
            .arg("apps/shop")
            .arg("--state")
            .arg(state)
            .arg("--pgdata")
            .arg(pgdata)
            .arg("--wal-archive")
            .arg(archive)
            .arg("--once")
            .args(extra)
            .env(DB_VAR, self.server.url("shop"))
            .env("BACKSTOP_LOG", "info")
            .env_remove("BACKSTOP_TEST_CRASH_AT")
            .env_remove("BACKSTOP_TEST_PAUSE_AT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The default `backstop run --once` command (local checkpoints) on `state`.
    pub fn spawn_run(&self, state: &Path, extra: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
        self.command(state, &self.server.data_dir(), &self.server.archive(), extra, env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn backstop")
    }

    /// `backstop run --once` against the remote at `url` with dump checkpoints
    /// (no server paths), extra args and environment.
    pub async fn run_url(&self, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        self.url_command(url, extra, env).output().await.expect("run backstop")
    }

    /// The `backstop run --once` command of [`Fixture::run_url`].
    pub fn url_command(&self, url: &str, extra: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin());
        cmd.args([
            "run",
            "--once",
            "--checkpoint",
            "dump",
            "--path",
            "apps/shop",
            "--repo",
            url,
            "--state",
        ])
        .arg(self.state())
        .args(extra)
        .env(DB_VAR, self.server.url("shop"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn gate(&self) -> String {
        self.remote.head(GATE).expect("gate").expect("gate exists")
    }

    pub fn main(&self) -> String {
        self.remote.head("main").expect("main").expect("main exists")
    }

    /// The fixture's `shop` database as backstop names it (`url:APP`).
    pub fn database(&self) -> backstop::db::Database {
        backstop::db::Database::from_url(
            backstop::manifests::DatabaseRef::Url { var: "APP".into() },
            &self.server.url("shop"),
            None,
        )
        .unwrap()
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.server.database("shop").unwrap().connect().await.expect("connect")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// `pg_dump --schema-only` of the shop database.
    pub async fn schema(&self) -> String {
        let out = tokio::process::Command::new(self.server.bindir().join("pg_dump"))
            .args(["--schema-only", "--no-owner"])
            .arg(self.server.url("shop"))
            .output()
            .await
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // pg_dump 15.14+ writes a random \restrict token per dump.
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Parsed `report.json` files, one per run.
    pub fn reports(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.state().join("runs")) else {
            return out;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("report.json")).collect();
        paths.sort();
        for p in paths {
            out.push(serde_json::from_slice::<serde_json::Value>(&std::fs::read(&p).expect("report")).expect("json"));
        }
        // Oldest run first (ids of runs in the same second sort by sha).
        out.sort_by_key(|r| r["steps"][0]["started_at"].as_str().unwrap_or("").to_string());
        out
    }

    /// Journal entries.
    /// The Markdown evidence report of run `run`.
    pub fn report_md(&self, run: &str) -> String {
        std::fs::read_to_string(self.state().join("runs").join(run).join("report.md")).expect("read report.md")
    }

    /// Runs in the journal (not the leftovers of an interrupted atomic write).
    pub fn journal_len(&self) -> usize {
        std::fs::read_dir(self.state().join("journal"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Runs that took a checkpoint (their folders in the checkpoint store).
    pub fn checkpoints(&self) -> usize {
        std::fs::read_dir(self.state().join("checkpoints"))
            .map(|d| d.flatten().filter(|e| e.file_name() != "base").count())
            .unwrap_or(0)
    }

    /// Complete base backups in the local checkpoint store.
    pub fn base_backups(&self) -> usize {
        std::fs::read_dir(self.state().join("checkpoints").join("base"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Data directories kept by restores.
    pub fn kept_data_dirs(&self) -> usize {
        kept_in(self.server.root())
    }

    /// `git log --format=%s` of a branch, via git itself.
    pub fn git_log(&self, branch: &str) -> Vec<String> {
        git(self.remote.path(), &["log", "--format=%s", branch])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Number of commits on main carrying the `Backstop-Run:` trailer.
    pub fn revert_commits(&self, branch: &str) -> usize {
        git(self.remote.path(), &["log", "--format=%B%x00", branch])
            .split('\0')
            .filter(|m| m.contains("Backstop-Run: "))
            .count()
    }
}

fn kept_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("data.backstop-"))
                .count()
        })
        .unwrap_or(0)
}

/// Runs git itself in `dir`.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The first migration of most tests: table `orders`.
pub fn orders_table() -> CarrierBuilder {
    carrier("0001-orders")
        .sql(
            "001.sql",
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, qty int NOT NULL);",
        )
        .verify("SELECT count(*) = 1 FROM information_schema.tables WHERE table_name = 'orders'")
}

/// Fixture with `orders` applied through backstop and three rows written by "the app".
pub async fn with_orders() -> (Fixture, String) {
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    insert_orders(&f).await;
    (f, c1)
}

/// Three rows written by "the app".
pub async fn insert_orders(f: &Fixture) {
    f.client()
        .await
        .batch_execute("INSERT INTO orders (customer, qty) VALUES ('ada', 2), ('grace', 1), ('linus', 3)")
        .await
        .unwrap();
}

/// A migration that commits (a column and a row without it) and then fails
/// its verify: remediation must restore the data. `extra` is appended SQL.
pub fn failing_backfill(extra: &str) -> CarrierBuilder {
    carrier("0002-backfill")
        .phase("migrate")
        .sql(
            "001.sql",
            &format!("ALTER TABLE orders ADD COLUMN total int;\nINSERT INTO orders (customer, qty) VALUES ('mallory', 1);\n{extra}"),
        )
        .verify("SELECT count(*) = 0 FROM orders WHERE total IS NULL")
}

/// splitmix64: a small seeded generator for reproducible random tests.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Kills `child` with SIGKILL and checks it died of it.
pub async fn kill9(mut child: Child) {
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL, not ended on its own: {status:?}"
    );
}

/// Reads `child`'s stderr until a line contains `marker` (bounded); returns what it read.
pub async fn wait_for_line(child: &mut Child, marker: &str) -> String {
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(marker) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "never printed {marker:?}:\n{seen}");
    seen
}
