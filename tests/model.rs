//! Model-based test of the gate invariant. A seeded generator pushes random
//! sequences of commits to a real bare remote (good carriers, carriers
//! rewritten over several commits, migrations failing inside their
//! transaction, failing after commit (real PITR), lint-refused ones, broken
//! YAML, unapproved contracts, deploy-only changes, merges of revert branches,
//! a person's revert, carriers removed), runs `backstop run --once` after
//! every step, and checks against real git and the real database:
//!
//! - the invariant: every carrier in the gate's guarded tree is applied with
//!   success at exactly that checksum, and the gate holds no broken file;
//! - the gate only moves forward;
//! - no migration is applied twice;
//! - every revert backstop made names a run it recorded;
//! - the exit code matches the pass (runs' outcomes and what the gate waits for).
//!
//! At the end everything broken is removed and the gate must catch up with
//! upstream (the invariant alone would allow a gate that never moves).
//!
//! `BACKSTOP_MODEL_SEEDS` (comma-separated, default `1,2`) and
//! `BACKSTOP_MODEL_STEPS` (default 40) make longer runs; a failing seed is
//! printed and re-runs with `BACKSTOP_MODEL_SEEDS=<seed>`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

type Rng = SplitMix;

const DIR: &str = "apps/shop/migrations";

/// A developer's clone of the remote, driven with git itself.
struct Dev {
    clone: PathBuf,
}

impl Dev {
    fn new(remote: &Path, root: &Path) -> Self {
        let clone = root.join("dev");
        let out = std::process::Command::new("git")
            .args(["clone", "-q"])
            .arg(remote)
            .arg(&clone)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Self { clone }
    }

    fn git(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("git")
            .args(["-c", "user.name=dev", "-c", "user.email=dev@example.com", "-C"])
            .arg(&self.clone)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.git(args);
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Resets the clone to the remote's main.
    fn sync(&self) {
        self.ok(&["fetch", "-q", "--prune", "origin"]);
        self.ok(&["checkout", "-q", "-B", "main", "origin/main"]);
        self.ok(&["reset", "-q", "--hard", "origin/main"]);
    }

    fn write(&self, path: &str, content: &str) {
        let p = self.clone.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn remove(&self, path: &str) {
        let _ = std::fs::remove_file(self.clone.join(path));
    }

    fn commit_push(&self, message: &str) -> bool {
        self.ok(&["add", "-A"]);
        if self.git(&["commit", "-q", "-m", message]).status.success() {
            self.ok(&["push", "-q", "origin", "main"]);
            true
        } else {
            false
        }
    }

    fn carriers(&self) -> Vec<String> {
        let dir = self.clone.join(DIR);
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| format!("{DIR}/{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// One generated step.
#[derive(Debug, Clone, Copy)]
enum Step {
    Good,
    Rewrite,
    FailInTransaction,
    FailAfterCommit,
    LintRefused,
    BrokenYaml,
    UnapprovedContract,
    DeployOnly,
    MergeRevert,
    PersonRevert,
    RemoveCarrier,
    /// A developer fixes what blocks: removes a broken file, or rewrites a
    /// never-run carrier into a good one.
    Fix,
}

fn pick(rng: &mut Rng) -> Step {
    const TABLE: &[(Step, usize)] = &[
        (Step::Good, 22),
        (Step::Rewrite, 10),
        (Step::FailInTransaction, 7),
        (Step::FailAfterCommit, 4),
        (Step::LintRefused, 4),
        (Step::BrokenYaml, 3),
        (Step::UnapprovedContract, 3),
        (Step::DeployOnly, 16),
        (Step::MergeRevert, 8),
        (Step::PersonRevert, 4),
        (Step::RemoveCarrier, 5),
        (Step::Fix, 20),
    ];
    let total: usize = TABLE.iter().map(|(_, w)| w).sum();
    let mut n = rng.below(total);
    for (s, w) in TABLE {
        if n < *w {
            return *s;
        }
        n -= w;
    }
    Step::Good
}

fn carrier_yaml(id: &str, revert: &str, phase: &str, sql: &str, verify: &str) -> String {
    let c = carrier(id)
        .phase(phase)
        .revert(revert)
        .sql("001.sql", sql)
        .verify(verify);
    c.yaml()
}

/// SQL variants a carrier can hold (id-specific table names keep them independent).
fn body(rng: &mut Rng, id: &str, kind: Step) -> (String, String, String) {
    let table = format!("t_{}", id.replace('-', "_"));
    let v = rng.below(1000);
    match kind {
        Step::FailInTransaction => (
            "expand".into(),
            format!("CREATE TABLE {table} (id int, v{v} int);\nINSERT INTO no_such_table VALUES (1);"),
            "SELECT true".into(),
        ),
        Step::FailAfterCommit => (
            "migrate".into(),
            format!("CREATE TABLE {table} (id int, v{v} int);"),
            "SELECT false".into(),
        ),
        Step::LintRefused => (
            "expand".into(),
            format!("CREATE TABLE {table} (id int, v{v} int);\nCREATE INDEX ON {table} (id);"),
            "SELECT true".into(),
        ),
        Step::UnapprovedContract => (
            "contract".into(),
            format!("DROP TABLE IF EXISTS {table}_old{v};"),
            "SELECT true".into(),
        ),
        _ => (
            "expand".into(),
            format!("CREATE TABLE {table} (id int, v{v} int);"),
            format!("SELECT count(*) = 1 FROM information_schema.tables WHERE table_name = '{table}'"),
        ),
    }
}

struct Model {
    f: Fixture,
    dev: Dev,
    rng: Rng,
    next_id: usize,
    gate: String,
    log: Vec<String>,
    /// What the passes did, for the coverage line at the end.
    seen: BTreeMap<String, usize>,
}

impl Model {
    fn new_carrier(&mut self, kind: Step) -> String {
        self.next_id += 1;
        let id = format!("{:04}-m", self.next_id);
        let revert = if self.rng.chance(50) { "commit" } else { "pull-request" };
        let (phase, sql, verify) = body(&mut self.rng, &id, kind);
        self.dev.write(
            &format!("{DIR}/{id}.yaml"),
            &carrier_yaml(&id, revert, &phase, &sql, &verify),
        );
        id
    }

    async fn apply(&mut self, step: Step) -> String {
        self.dev.sync();
        let files = self.dev.carriers();
        match step {
            Step::Good
            | Step::FailInTransaction
            | Step::FailAfterCommit
            | Step::LintRefused
            | Step::UnapprovedContract => {
                let id = self.new_carrier(step);
                if self.rng.chance(40) {
                    self.deploy_change();
                }
                self.dev.commit_push(&format!("{step:?} {id}"));
                format!("{step:?} {id}")
            }
            Step::Rewrite => {
                // Rewrite a carrier: an earlier, never-run version stays in
                // history; sometimes into a refused or failing one.
                let yamls: Vec<&String> = files.iter().filter(|f| f.ends_with("-m.yaml")).collect();
                if yamls.is_empty() {
                    return Box::pin(self.apply(Step::Good)).await;
                }
                let file = yamls[self.rng.below(yamls.len())].clone();
                let id = file
                    .trim_start_matches(&format!("{DIR}/"))
                    .trim_end_matches(".yaml")
                    .to_string();
                let kind = [Step::Good, Step::Good, Step::LintRefused, Step::FailInTransaction][self.rng.below(4)];
                let (phase, sql, verify) = body(&mut self.rng, &id, kind);
                let revert = if self.rng.chance(50) { "commit" } else { "pull-request" };
                self.dev.write(&file, &carrier_yaml(&id, revert, &phase, &sql, &verify));
                self.dev.commit_push(&format!("Rewrite {id} as {kind:?}"));
                format!("Rewrite {id} as {kind:?}")
            }
            Step::BrokenYaml => {
                self.next_id += 1;
                let file = format!("{DIR}/{:04}-broken.yaml", self.next_id);
                self.dev.write(
                    &file,
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  annotations: [unclosed\n",
                );
                self.dev.commit_push(&format!("broken {file}"));
                format!("BrokenYaml {file}")
            }
            Step::DeployOnly => {
                self.deploy_change();
                self.dev.commit_push("deploy");
                "DeployOnly".into()
            }
            Step::MergeRevert => {
                let branches = self.dev.ok(&["branch", "-r", "--list", "origin/backstop/revert-*"]);
                let branches: Vec<&str> = branches.split_whitespace().collect();
                if branches.is_empty() {
                    return Box::pin(self.apply(Step::DeployOnly)).await;
                }
                let b = branches[self.rng.below(branches.len())].to_string();
                if self.dev.git(&["merge", "-q", "--no-edit", &b]).status.success() {
                    self.dev.ok(&["push", "-q", "origin", "main"]);
                    format!("MergeRevert {b}")
                } else {
                    self.dev.git(&["merge", "--abort"]);
                    format!("MergeRevert {b} (conflict, skipped)")
                }
            }
            Step::PersonRevert => {
                if self.dev.git(&["revert", "--no-edit", "HEAD"]).status.success() {
                    self.dev.ok(&["push", "-q", "origin", "main"]);
                    "PersonRevert HEAD".into()
                } else {
                    self.dev.git(&["revert", "--abort"]);
                    "PersonRevert (conflict, skipped)".into()
                }
            }
            Step::Fix => {
                let head = self.dev.ok(&["rev-parse", "HEAD"]).trim().to_string();
                let applied = applied(&self.f).await;
                let blocking: Vec<Result<(String, String, String), String>> =
                    gate_carriers(self.f.remote.path(), &head)
                        .into_iter()
                        .filter(|c| match c {
                            Ok((id, checksum, _)) => applied.get(id) != Some(checksum),
                            Err(_) => true,
                        })
                        .collect();
                if blocking.is_empty() {
                    return Box::pin(self.apply(Step::DeployOnly)).await;
                }
                // A file the plan cannot read blocks everything after it: a
                // developer fixes that first.
                // Then what the gate says it waits for.
                let waiting = status_json(&self.f.state())["gates"][0]["waiting"].to_string();
                let pick = blocking
                    .iter()
                    .position(|b| b.is_err())
                    .or_else(|| {
                        blocking
                            .iter()
                            .position(|b| b.as_ref().is_ok_and(|(id, _, _)| waiting.contains(id.as_str())))
                    })
                    .unwrap_or_else(|| self.rng.below(blocking.len()));
                match &blocking[pick] {
                    Err(file) => {
                        self.dev.remove(file);
                        self.dev.commit_push(&format!("fix: remove {file}"));
                        format!("Fix remove {file}")
                    }
                    Ok((id, _, file)) if applied.contains_key(id) || self.rng.chance(30) => {
                        self.dev.remove(file);
                        self.dev.commit_push(&format!("fix: remove {file}"));
                        format!("Fix remove {file}")
                    }
                    Ok((id, _, file)) => {
                        let (phase, sql, verify) = body(&mut self.rng, id, Step::Good);
                        self.dev.write(file, &carrier_yaml(id, "commit", &phase, &sql, &verify));
                        self.dev.commit_push(&format!("fix: rewrite {id}"));
                        format!("Fix rewrite {id}")
                    }
                }
            }
            Step::RemoveCarrier => {
                if files.is_empty() {
                    return Box::pin(self.apply(Step::DeployOnly)).await;
                }
                let file = files[self.rng.below(files.len())].clone();
                self.dev.remove(&file);
                self.dev.commit_push(&format!("remove {file}"));
                format!("RemoveCarrier {file}")
            }
        }
    }

    fn deploy_change(&mut self) {
        let v = self.rng.next() % 100_000;
        self.dev.write(
            "apps/shop/base/deployment.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n  labels: {{v: '{v}'}}\n"),
        );
    }

    async fn pass(&mut self) -> std::process::Output {
        self.f.run(&["--retry-backoff", "0"]).await
    }

    /// Every check against real git and the real database.
    async fn check(&mut self, out: &std::process::Output, context: &str) {
        let all = text(out);
        let gate = self.f.gate();
        // The gate only moves forward.
        let forward = std::process::Command::new("git")
            .arg("-C")
            .arg(self.f.remote.path())
            .args(["merge-base", "--is-ancestor", &self.gate, &gate])
            .status()
            .unwrap()
            .success();
        assert!(
            forward,
            "{context}: the gate moved backwards from {} to {gate}\n{all}",
            self.gate
        );
        self.gate = gate.clone();

        // The invariant, from git and the database.
        let carriers = gate_carriers(self.f.remote.path(), &gate);
        let client = self.f.client().await;
        let applied: BTreeMap<String, String> = match client
            .query("SELECT id, checksum FROM backstop.migration_history WHERE success", &[])
            .await
        {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(_) => BTreeMap::new(),
        };
        for c in &carriers {
            match c {
                Ok((id, checksum, file)) => assert_eq!(
                    applied.get(id),
                    Some(checksum),
                    "{context}: INVARIANT BROKEN: the gate {gate} holds {file} ({id} at {checksum}) which is not applied at that checksum\n{all}"
                ),
                Err(file) => panic!("{context}: INVARIANT BROKEN: the gate {gate} holds broken file {file}\n{all}"),
            }
        }
        // No migration applied twice.
        if let Ok(rows) = client
            .query(
                "SELECT id FROM backstop.migration_history WHERE success GROUP BY id HAVING count(*) > 1",
                &[],
            )
            .await
        {
            assert!(rows.is_empty(), "{context}: a migration was applied twice\n{all}");
        }
        // Every revert backstop made names a run it recorded.
        let runs = journal_ids(&self.f.state());
        let log = git(
            self.f.remote.path(),
            &["log", "--all", "--author=backstop", "--format=%H%x00%B%x01"],
        );
        for entry in log.split('\x01').filter(|e| !e.trim().is_empty()) {
            let (sha, message) = entry.trim().split_once('\0').unwrap_or(("", entry));
            let run = message
                .lines()
                .find_map(|l| l.strip_prefix("Backstop-Run: "))
                .unwrap_or_else(|| panic!("{context}: revert {sha} names no run:\n{message}"));
            assert!(
                runs.contains(&run.trim().to_string()),
                "{context}: revert {sha} names unknown run {run}"
            );
        }
        // The exit code matches the pass.
        let code = out.status.code().unwrap_or(-1);
        let mut expected = 0;
        // The pass's summary: `run <id> (<sha> "<subject>"): <outcome>`.
        let outcomes: Vec<&str> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("run "))
            .filter_map(|l| match l.rsplit_once("): ").map(|(_, o)| o) {
                Some("succeeded") => Some("Succeeded"),
                Some("rolled back") => Some("RolledBack"),
                Some("FAILED") => Some("Failed"),
                Some("deferred") => Some("Deferred"),
                _ => None,
            })
            .collect();
        for o in &outcomes {
            expected = expected.max(match *o {
                "RolledBack" => 1,
                "Failed" => 3,
                _ => 0,
            });
        }
        let status = status_json(&self.f.state());
        let waiting = &status["gates"][0]["waiting"];
        for o in &outcomes {
            *self.seen.entry(format!("run {o}")).or_default() += 1;
        }
        if let Some(kind) = waiting["kind"].as_str() {
            *self.seen.entry(format!("wait {kind}")).or_default() += 1;
        }
        if gate != self.f.main() && waiting.is_null() {
            *self.seen.entry("gate behind, not waiting".into()).or_default() += 1;
        }
        expected = expected.max(match waiting["kind"].as_str() {
            Some("refused") => 2,
            Some("run_failed") if waiting["needs_person"] == true => 3,
            Some("retrying") if waiting["stalled"] == true => 3,
            _ => 0,
        });
        assert_eq!(
            code, expected,
            "{context}: exit code does not match the pass\n{all}\n{status}"
        );
        if code == 3 && self.person_resolves(waiting).await {
            return;
        }
        assert_ne!(code, 3, "{context}: a person would have to act\n{all}\n{status}");
    }

    /// The one case where a person is expected: the revert of a failed
    /// migration's commit conflicts with later commits (the data was already
    /// put right). The person takes the failed carrier out by hand and says
    /// so with `backstop ack`; the model goes on.
    async fn person_resolves(&mut self, waiting: &serde_json::Value) -> bool {
        let Some(run) = waiting["run"].as_str() else {
            return false;
        };
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.f.state().join("runs").join(run).join("report.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        let conflict = report["remediation_errors"]
            .as_array()
            .is_some_and(|e| e.iter().all(|m| m.as_str().is_some_and(|m| m.contains("conflicts in"))));
        if !conflict {
            return false;
        }
        self.dev.sync();
        let head = self.dev.ok(&["rev-parse", "HEAD"]).trim().to_string();
        let failed: Vec<&str> = waiting["migrations"]
            .as_array()
            .map(|m| m.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for c in gate_carriers(self.f.remote.path(), &head).into_iter().flatten() {
            if failed.contains(&c.0.as_str()) {
                self.dev.remove(&c.2);
            }
        }
        self.dev.commit_push("person: take the failed migration out by hand");
        let ack = std::process::Command::new(bin())
            .args(["ack", run, "--by", "model", "--note", "revert conflicted", "--state"])
            .arg(self.f.state())
            .output()
            .unwrap();
        assert!(ack.status.success(), "{}", text(&ack));
        *self.seen.entry("person resolved a revert conflict".into()).or_default() += 1;
        true
    }

    /// Removes everything that blocks (never-run, refused, failed carriers,
    /// broken files) and checks that the gate then catches up with upstream.
    async fn settle(&mut self) {
        self.dev.sync();
        let client = self.f.client().await;
        let applied: BTreeMap<String, String> = client
            .query("SELECT id, checksum FROM backstop.migration_history WHERE success", &[])
            .await
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            .unwrap_or_default();
        let head = self.dev.ok(&["rev-parse", "HEAD"]).trim().to_string();
        for c in gate_carriers(self.f.remote.path(), &head) {
            match c {
                Ok((id, checksum, file)) if applied.get(&id) != Some(&checksum) => self.dev.remove(&file),
                Ok(_) => {}
                Err(file) => self.dev.remove(&file),
            }
        }
        self.dev.commit_push("settle: remove what never ran");
        for _ in 0..2 {
            let out = self.pass().await;
            self.check(&out, "settle").await;
        }
        assert_eq!(
            self.f.gate(),
            self.f.main(),
            "the gate did not catch up with upstream once nothing blocked it\n{}",
            status_json(&self.f.state())
        );
    }
}

/// Carriers of `sha` under apps/shop, read with git and parsed with
/// backstop's annotation parser: Ok((id, checksum, file)) or Err(broken file).
fn gate_carriers(remote: &Path, sha: &str) -> Vec<Result<(String, String, String), String>> {
    // One `ls-tree` and one `cat-file --batch` (not a process per file):
    // long runs hold hundreds of files.
    let names = git(remote, &["ls-tree", "-r", "--name-only", sha, "apps/shop"]);
    let names: Vec<&str> = names.lines().collect();
    let mut child = std::process::Command::new("git")
        .arg("-C")
        .arg(remote)
        .args(["cat-file", "--batch"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("git cat-file");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for name in &names {
            writeln!(stdin, "{sha}:{name}").unwrap();
        }
    }
    let out = child.wait_with_output().expect("git cat-file").stdout;
    let mut snapshot = backstop::manifests::Snapshot::new();
    let mut at = 0;
    for name in &names {
        let header_end = at + out[at..].iter().position(|b| *b == b'\n').expect("cat-file header");
        let header = String::from_utf8_lossy(&out[at..header_end]).to_string();
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("cat-file size");
        let body = out[header_end + 1..header_end + 1 + size].to_vec();
        at = header_end + 1 + size + 1;
        snapshot.insert(name.to_string(), body);
    }
    let mut out = Vec::new();
    for (file, bytes) in snapshot.iter().filter(|(f, _)| backstop::manifests::is_yaml(f)) {
        match backstop::manifests::parse_file(&snapshot, file, bytes) {
            Ok(cs) => out.extend(cs.into_iter().map(|c| Ok((c.id, c.checksum, c.file)))),
            Err(_) => out.push(Err(file.clone())),
        }
    }
    out
}

/// Applied checksum per migration id, from the real history table.
async fn applied(f: &Fixture) -> BTreeMap<String, String> {
    f.client()
        .await
        .query("SELECT id, checksum FROM backstop.migration_history WHERE success", &[])
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default()
}

fn journal_ids(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("journal"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_suffix(".json")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn run_seed(seed: u64, steps: usize) {
    let f = Fixture::new().await;
    let dev = Dev::new(f.remote.path(), f.dir.path());
    let gate = f.gate();
    let mut m = Model {
        f,
        dev,
        rng: SplitMix(seed),
        next_id: 0,
        gate,
        log: Vec::new(),
        seen: BTreeMap::new(),
    };
    for i in 0..steps {
        let step = pick(&mut m.rng);
        let what = m.apply(step).await;
        m.log.push(what.clone());
        let out = m.pass().await;
        let context = format!(
            "seed {seed} step {i} ({what}); re-run with BACKSTOP_MODEL_SEEDS={seed} BACKSTOP_MODEL_STEPS={steps}; steps so far: {:?}",
            m.log
        );
        m.check(&out, &context).await;
    }
    m.settle().await;
    eprintln!("model: seed {seed}: {:?}", m.seen);
}

#[tokio::test]
async fn gate_invariant_holds_over_random_commit_sequences() {
    let seeds: Vec<u64> = std::env::var("BACKSTOP_MODEL_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let steps: usize = std::env::var("BACKSTOP_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in seeds {
        eprintln!("model: seed {seed}, {steps} steps");
        run_seed(seed, steps).await;
    }
}
