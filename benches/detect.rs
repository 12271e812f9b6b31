//! Detection (`cargo bench --bench detect`): what a pass costs to find the
//! migrations pending in `gate..main` of a large sre repository, against git
//! doing the same work by hand.
//!
//! For each size in `BACKSTOP_BENCH_DETECT_FILES` (default `5000,20000,80000`
//! files) and each range in `BACKSTOP_BENCH_DETECT_COMMITS` (default
//! `50,500,2000` pending commits, each changing one file outside the guarded
//! path; the middle one adds a migration under `apps/shop`):
//!
//! - **warm**: every object already fetched on both sides (the gate's
//!   pass ran, and the mirror has fetched main since): `backstop run
//!   --once` against the git pipeline `git fetch` + `git log --first-parent
//!   --name-only gate..main -- apps/shop` + `git show` | `grep` of each file
//!   named + `psql -c 'select 1'` + `git push` of the gate, on a mirror clone
//!   holding every object with main rewound to the gate: detection alone;
//! - **with fetch**: both sides hold the objects up to the gate only, so
//!   both fetch the pending commits (backstop's mirror after a pass at the
//!   gate, git's a mirror clone taken then);
//! - **first**: the same pass from an empty state against `git clone --mirror
//!   --no-local` (a fetch of everything).
//!
//! Each figure is the median of `BACKSTOP_BENCH_DETECT_REPS` (default 3)
//! alternating runs; between runs the gate is put back and the database's
//! `backstop` schema dropped. The migration is `SELECT 1` with
//! `checkpoint: none`: what is measured is finding it, not running it.
//! `BACKSTOP_BENCH_LOG=debug` prints each backstop pass's log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use backstop::pgserver::PgServer;
use common::Res;

mod common;

const GATE: &str = "backstop/gate";

fn list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let files = list("BACKSTOP_BENCH_DETECT_FILES", &[5000, 20000, 80000]);
    let commits = list("BACKSTOP_BENCH_DETECT_COMMITS", &[50, 500, 2000]);
    let reps = list("BACKSTOP_BENCH_DETECT_REPS", &[3])[0].max(1);
    let server = PgServer::start().await?;
    server.create_database("shop").await?;
    let url = server.url("shop");
    let psql = server.bindir().join("psql");
    println!(
        "files\tcommits\twarm backstop\twarm git pipeline\tratio\twith fetch backstop\twith fetch git pipeline\tratio\tfirst pass\tgit clone --mirror\tratio"
    );
    for &n in &files {
        for &m in &commits {
            let dir = tempfile::tempdir()?;
            let remote = build(dir.path(), n, m)?;
            let base = rev(&remote, &format!("refs/heads/{GATE}"))?;
            let head = rev(&remote, "refs/heads/main")?;
            // Both sides up to the gate only: a pass with the gate at main's
            // first commit, and a mirror clone of that moment.
            let at_gate = dir.path().join("at-gate");
            let clone_at_gate = dir.path().join("clone-at-gate");
            git(&remote, &["update-ref", "refs/heads/main", &base])?;
            common::run_once(Path::new(common::BACKSTOP), &remote, &at_gate, &url)?;
            clone_mirror(&remote, &clone_at_gate, None)?;
            git(&clone_at_gate, &["config", "--unset", "remote.origin.mirror"])?;
            git(&remote, &["update-ref", "refs/heads/main", &head])?;
            // Both sides with every object already fetched (warm): backstop's
            // mirror fetched, git's clone with main rewound to the gate.
            let fetched = dir.path().join("fetched");
            let clone_fetched = dir.path().join("clone-fetched");
            copy_dir(&at_gate, &fetched)?;
            git(
                &fetched.join("git").join("mirror.git"),
                &[
                    "fetch",
                    "-q",
                    "--prune",
                    "origin",
                    "+refs/heads/*:refs/remotes/origin/*",
                ],
            )?;
            clone_mirror(&remote, &clone_fetched, Some(&base))?;
            let (mut warm, mut fetching, mut first) = (
                (Vec::new(), Vec::new()),
                (Vec::new(), Vec::new()),
                (Vec::new(), Vec::new()),
            );
            let reset = |remote: &Path| -> Res<()> {
                git(remote, &["update-ref", &format!("refs/heads/{GATE}"), &base])?;
                psql_run(&psql, &url, "DROP SCHEMA IF EXISTS backstop CASCADE")?;
                Ok(())
            };
            // One measured pair: backstop from a copy of `state` (None: an
            // empty state), git from a copy of `clone` (None: a clone).
            let pair =
                |rep: usize, state: Option<&Path>, clone: Option<&Path>, out: &mut (Vec<f64>, Vec<f64>)| -> Res<()> {
                    for side in if rep.is_multiple_of(2) { [0, 1] } else { [1, 0] } {
                        reset(&remote)?;
                        let work = dir.path().join(format!("work-{rep}-{side}"));
                        if side == 0 {
                            if let Some(state) = state {
                                copy_dir(state, &work)?;
                            }
                            let t = Instant::now();
                            common::run_once(Path::new(common::BACKSTOP), &remote, &work, &url)?;
                            out.0.push(t.elapsed().as_secs_f64());
                            moved(&remote, &base)?;
                        } else {
                            let t = match clone {
                                Some(clone) => {
                                    copy_dir(clone, &work)?;
                                    let t = Instant::now();
                                    git_pipeline(&work, &psql, &url)?;
                                    moved(&remote, &base)?;
                                    t
                                }
                                None => {
                                    let t = Instant::now();
                                    clone_mirror(&remote, &work, None)?;
                                    t
                                }
                            };
                            out.1.push(t.elapsed().as_secs_f64());
                        }
                        std::fs::remove_dir_all(&work)?;
                    }
                    Ok(())
                };
            for rep in 0..reps {
                pair(rep, Some(&fetched), Some(&clone_fetched), &mut warm)?;
                pair(rep, Some(&at_gate), Some(&clone_at_gate), &mut fetching)?;
                pair(rep, None, None, &mut first)?;
            }
            let mut row = format!("{n}\t{m}");
            for (b, g) in [&mut warm, &mut fetching, &mut first] {
                let (b, g) = (median(b), median(g));
                row.push_str(&format!("\t{b:.3} s\t{g:.3} s\t{:.2}", b / g));
            }
            println!("{row}");
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A bare repository: `files` files in folders of 100 outside the guarded
/// path plus one app file under it, then `commits` commits each changing one
/// of those files, the middle one adding a migration under `apps/shop`. The
/// gate is at the first commit. Written with `git fast-import`.
fn build(dir: &Path, files: usize, commits: usize) -> Res<PathBuf> {
    let remote = dir.join("sre.git");
    git(
        dir,
        &["init", "-q", "--bare", "-b", "main", remote.to_str().ok_or("path")?],
    )?;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(&remote)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut w = std::io::BufWriter::new(child.stdin.take().ok_or("stdin")?);
        let blob = |w: &mut dyn Write, path: &str, data: &str| -> std::io::Result<()> {
            writeln!(w, "M 100644 inline {path}\ndata {}\n{data}", data.len())
        };
        let mut mark = 0u64;
        let mut commit = |w: &mut dyn Write, message: &str| -> std::io::Result<()> {
            mark += 1;
            writeln!(
                w,
                "commit refs/heads/main\nmark :{mark}\ncommitter bench <bench@example.com> {} +0000\ndata {}\n{message}",
                1_700_000_000 + mark,
                message.len()
            )
        };
        commit(&mut w, "base")?;
        for i in 0..files {
            blob(
                &mut w,
                &format!("apps/team{}/f{i}.yaml", i / 100),
                &format!("kind: ConfigMap\nmetadata: {{name: f{i}}}\ndata: {{v: \"0\"}}\n"),
            )?;
        }
        blob(&mut w, "apps/shop/app.yaml", "kind: ConfigMap\nmetadata: {name: app}\n")?;
        writeln!(w)?;
        writeln!(w, "reset refs/heads/{GATE}\nfrom :1\n")?;
        for c in 0..commits {
            commit(&mut w, &format!("change {c}"))?;
            let i = (c * 7919) % files.max(1);
            blob(
                &mut w,
                &format!("apps/team{}/f{i}.yaml", i / 100),
                &format!(
                    "kind: ConfigMap\nmetadata: {{name: f{i}}}\ndata: {{v: \"{}\"}}\n",
                    c + 1
                ),
            )?;
            if c == commits / 2 {
                blob(
                    &mut w,
                    "apps/shop/m1.yaml",
                    "kind: ConfigMap\nmetadata:\n  name: m1\n  annotations:\n    backstop.dev/migration: noop-1\n    backstop.dev/database: url:DB\n    backstop.dev/checkpoint: none\ndata:\n  a.sql: SELECT 1;\n",
                )?;
            }
            writeln!(w)?;
        }
        w.flush()?;
    }
    if !child.wait()?.success() {
        return Err("git fast-import failed".into());
    }
    Ok(remote)
}

/// What git alone would do for the same pass, in one shell: fetch, list the
/// files the first-parent range changed under the path, grep each for the
/// annotation, one psql, push the gate.
fn git_pipeline(clone: &Path, psql: &Path, url: &str) -> Res<()> {
    let script = format!(
        r#"set -e
cd "$1"
git fetch -q origin '+refs/heads/*:refs/heads/*'
for f in $(git log --first-parent --name-only --format= {GATE}..main -- apps/shop | sort -u); do
  git show "main:$f" 2>/dev/null | grep -q 'backstop.dev/migration' && echo "$f" || true
done > found
test -s found
"$2" -qAt -c 'select 1' "$3" > /dev/null
git push -q origin main:{GATE}
"#
    );
    let status = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(clone)
        .arg(psql)
        .arg(url)
        .status()?;
    if !status.success() {
        return Err("git pipeline failed".into());
    }
    Ok(())
}

/// `git clone --mirror` of the remote; `at`: then rewinds its branches to
/// that commit (a mirror fetched up to the gate).
fn clone_mirror(remote: &Path, clone: &Path, at: Option<&str>) -> Res<()> {
    let status = Command::new("git")
        // --no-local: a real fetch of packs, not hard links to the remote's.
        .args(["clone", "-q", "--mirror", "--no-local"])
        .arg(remote)
        .arg(clone)
        .status()?;
    if !status.success() {
        return Err("git clone failed".into());
    }
    if let Some(sha) = at {
        git(clone, &["update-ref", "refs/heads/main", sha])?;
        git(clone, &["config", "--unset", "remote.origin.mirror"])?;
    }
    Ok(())
}

fn moved(remote: &Path, base: &str) -> Res<()> {
    if rev(remote, &format!("refs/heads/{GATE}"))? == base {
        return Err("the pass did not move the gate".into());
    }
    Ok(())
}

fn rev(repo: &Path, name: &str) -> Res<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", name])
        .output()?;
    if !out.status.success() {
        return Err(format!("git rev-parse {name} failed").into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn git(dir: &Path, args: &[&str]) -> Res<()> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output()?;
    if !out.status.success() {
        return Err(format!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn psql_run(psql: &Path, url: &str, sql: &str) -> Res<()> {
    let status = Command::new(psql)
        .args(["-qAt", "-c", sql, url])
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("psql {sql} failed").into());
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Res<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !status.success() {
        return Err("cp -a failed".into());
    }
    Ok(())
}
