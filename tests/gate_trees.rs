//! The gate's tree states of pending commits are built incrementally (one
//! snapshot, then each commit's path-limited diff, re-parsing only what the
//! change can affect). These tests prove the incremental states equal a full
//! parse of every commit's tree, over seeded random commit sequences with
//! carriers, SQL files they name, broken YAML, deletions, changes outside the
//! path and merge commits (the gate on either side of a merge).
//!
//! `BACKSTOP_TREES_SEEDS` (comma-separated, default `1,2,3,4`) runs more seeds.

mod common;

use std::path::Path;

use backstop::gate::{self, TreeState};
use backstop::git::GitRepo;
use common::*;

const PATH: &str = "apps/shop";
/// A second guarded path on the same gate (another Kustomization's).
const OTHER: &str = "apps/other";

struct Work<'a> {
    dir: &'a Path,
    rng: SplitMix,
    shas: Vec<String>,
}

impl Work<'_> {
    fn write(&self, path: &str, content: &str) {
        let full = self.dir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }

    fn remove(&self, path: &str) {
        let _ = std::fs::remove_file(self.dir.join(path));
    }

    fn commit(&mut self, message: &str) {
        git(self.dir, &["add", "-A"]);
        git(self.dir, &["commit", "-q", "--allow-empty", "-m", message]);
        self.shas.push(git(self.dir, &["rev-parse", "HEAD"]).trim().to_string());
    }

    fn sql_file(&mut self) -> String {
        format!("{PATH}/migrations/s{}.sql", self.rng.below(4))
    }

    /// One random change to the work tree.
    fn change(&mut self) -> String {
        let n = self.rng.below(6);
        let id = format!("{:04}", self.rng.below(8));
        let salt = self.rng.next() % 1000;
        match self.rng.below(10) {
            0..=2 => {
                let c = carrier(&id).sql("up.sql", &format!("CREATE TABLE t{id}_{salt} (id int);"));
                self.write(&c.path(), &c.yaml());
                format!("inline carrier {id}")
            }
            3 => {
                let sql = self.sql_file();
                let rel = sql.rsplit('/').next().unwrap().to_string();
                let c = carrier(&id).annotation("sql", &rel);
                self.write(&c.path(), &c.yaml());
                format!("carrier {id} naming {rel}")
            }
            4 => {
                let sql = self.sql_file();
                let text = if self.rng.chance(15) {
                    "CREATE TABLE (((;".to_string()
                } else {
                    format!("CREATE TABLE f{salt} (id int);")
                };
                self.write(&sql, &text);
                format!("write {sql}")
            }
            5 => {
                let sql = self.sql_file();
                self.remove(&sql);
                format!("remove {sql}")
            }
            6 => {
                self.write(&format!("{PATH}/migrations/broken{n}.yaml"), "metadata: [unclosed\n");
                format!("broken yaml {n}")
            }
            7 => {
                let victim = if self.rng.chance(50) {
                    format!("{PATH}/migrations/{id}.yaml")
                } else {
                    format!("{PATH}/migrations/broken{n}.yaml")
                };
                self.remove(&victim);
                format!("remove {victim}")
            }
            8 => {
                self.write(&format!("{PATH}/notes{n}.txt"), &salt.to_string());
                format!("non-yaml {n}")
            }
            _ if self.rng.chance(33) => {
                self.write(&format!("apps/elsewhere/f{n}.yaml"), &format!("x: {salt}\n"));
                format!("outside the guarded paths {n}")
            }
            _ if self.rng.chance(50) => {
                self.write(&format!("apps/other/f{n}.yaml"), &format!("x: {salt}\n"));
                format!("the other guarded path {n}")
            }
            _ => {
                let c = carrier(&format!("9{id}")).sql("up.sql", &format!("CREATE TABLE o{salt} (id int);"));
                self.write(&c.path().replace(PATH, OTHER), &c.yaml());
                format!("carrier 9{id} on the other guarded path")
            }
        }
    }

    /// Commits on a side branch from a random earlier commit and merges it
    /// with a merge commit (first parent: the main line).
    fn merge(&mut self) {
        let back = self.rng.below(self.shas.len().min(4));
        let base = self.shas[self.shas.len() - 1 - back].clone();
        git(self.dir, &["checkout", "-q", "-b", "side", &base]);
        for _ in 0..=self.rng.below(2) {
            let what = self.change();
            git(self.dir, &["add", "-A"]);
            git(
                self.dir,
                &["commit", "-q", "--allow-empty", "-m", &format!("side: {what}")],
            );
        }
        git(self.dir, &["checkout", "-q", "main"]);
        let merged = std::process::Command::new("git")
            .arg("-C")
            .arg(self.dir)
            .args(["merge", "-q", "--no-ff", "-m", "merge side", "side"])
            .output()
            .unwrap();
        if !merged.status.success() {
            // A conflict: take the side's version of everything.
            git(self.dir, &["checkout", "--theirs", "."]);
            git(self.dir, &["add", "-A"]);
            git(self.dir, &["commit", "-q", "--no-edit"]);
        }
        git(self.dir, &["branch", "-q", "-D", "side"]);
        self.shas.push(git(self.dir, &["rev-parse", "HEAD"]).trim().to_string());
    }
}

/// A full parse of both guarded paths, each read on its own.
async fn full(repo: &GitRepo, sha: &str) -> TreeState {
    let mut snap = repo.snapshot(sha, PATH).await.unwrap();
    snap.extend(repo.snapshot(sha, OTHER).await.unwrap());
    TreeState::parse(sha, &snap)
}

async fn check_seed(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["config", "user.email", "dev@example.com"]);
    git(dir.path(), &["config", "user.name", "dev"]);
    let mut work = Work {
        dir: dir.path(),
        rng: SplitMix(seed),
        shas: Vec::new(),
    };
    work.write(&format!("{PATH}/kustomization.yaml"), "resources: []\n");
    work.commit("root");
    let mut log = Vec::new();
    for _ in 0..60 {
        if work.rng.chance(12) {
            work.merge();
            log.push("merge".to_string());
        } else {
            for _ in 0..=work.rng.below(2) {
                let what = work.change();
                log.push(what);
            }
            work.commit("change");
        }
    }
    let repo = GitRepo::existing(dir.path()).await.unwrap();
    let head = work.shas.last().unwrap().clone();
    // Gates: every commit of history, including side-branch commits.
    let all = git(dir.path(), &["rev-list", &head]);
    let gates: Vec<&str> = all.lines().collect();
    for gate_sha in gates.iter().step_by(3) {
        let pending = repo.pending(gate_sha, &head, ("gate", "main")).await.unwrap();
        let gate_state = full(&repo, gate_sha).await;
        let states = gate::trees(&repo, &[PATH, OTHER], &gate_state, &pending).await.unwrap();
        assert_eq!(states.len(), pending.len());
        for (state, commit) in states.iter().zip(&pending) {
            let want = full(&repo, &commit.sha).await;
            assert_eq!(state.sha, commit.sha);
            assert_eq!(
                (&state.carriers, &state.broken),
                (&want.carriers, &want.broken),
                "seed {seed}: the incremental state of {} (gate {gate_sha}) differs from a full parse; changes: {log:?}",
                commit.sha
            );
        }
    }
}

#[tokio::test]
async fn incremental_tree_states_equal_a_full_parse_of_every_pending_commit() {
    let seeds: Vec<u64> = std::env::var("BACKSTOP_TREES_SEEDS")
        .unwrap_or_else(|_| "1,2,3,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for seed in seeds {
        check_seed(seed).await;
    }
}
