//! Detection (`cargo bench --bench detect`): what a pass costs to find the
//! migrations pending in `gate..main` of a large sre repository, against git
//! doing the same work by hand.
//!
//! For each size in `BACKSTOP_BENCH_DETECT_FILES` (default `5000,20000,80000`
//! files) and each range in `BACKSTOP_BENCH_DETECT_COMMITS` (default
//! `50,500,2000` pending commits, each changing one file outside the guarded
//! path; the middle one adds a migration under `apps/shop`):
//!
//! - **warm**: `backstop run --once` with its mirror already fetched up to
//!   the gate, against the git pipeline `git fetch` + `git log --first-parent
//!   --name-only gate..main -- apps/shop` + `git show` | `grep` of each file
//!   named + `psql -c 'select 1'` + `git push` of the gate;
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
    println!("files\tcommits\twarm backstop\twarm git pipeline\tratio\tfirst pass\tgit clone --mirror\tratio");
    for &n in &files {
        for &m in &commits {
            let dir = tempfile::tempdir()?;
            let remote = build(dir.path(), n, m)?;
            let base = rev(&remote, &format!("refs/heads/{GATE}"))?;
            let mut warm = (Vec::new(), Vec::new());
            let mut first = (Vec::new(), Vec::new());
            // The warm state: a pass with the gate at main's first commit
            // fetches everything once; kept and copied for each rep.
            let pristine = dir.path().join("pristine");
            let head = rev(&remote, "refs/heads/main")?;
            git(&remote, &["update-ref", "refs/heads/main", &base])?;
            common::run_once(&remote, &pristine, &url)?;
            git(&remote, &["update-ref", "refs/heads/main", &head])?;
            for rep in 0..reps {
                let reset = |remote: &Path| -> Res<()> {
                    git(remote, &["update-ref", &format!("refs/heads/{GATE}"), &base])?;
                    psql_run(&psql, &url, "DROP SCHEMA IF EXISTS backstop CASCADE")?;
                    Ok(())
                };
                // Alternate which side goes first.
                for side in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
                    reset(&remote)?;
                    if side == 0 {
                        let state = dir.path().join(format!("state-{rep}"));
                        copy_dir(&pristine, &state)?;
                        let t = Instant::now();
                        common::run_once(&remote, &state, &url)?;
                        warm.0.push(t.elapsed().as_secs_f64());
                        moved(&remote, &base)?;
                        std::fs::remove_dir_all(&state)?;
                    } else {
                        let clone = dir.path().join(format!("clone-{rep}"));
                        clone_mirror(&remote, &clone, Some(&base))?;
                        let t = Instant::now();
                        git_pipeline(&clone, &psql, &url)?;
                        warm.1.push(t.elapsed().as_secs_f64());
                        moved(&remote, &base)?;
                        std::fs::remove_dir_all(&clone)?;
                    }
                }
                for side in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
                    reset(&remote)?;
                    if side == 0 {
                        let state = dir.path().join(format!("cold-{rep}"));
                        let t = Instant::now();
                        common::run_once(&remote, &state, &url)?;
                        first.0.push(t.elapsed().as_secs_f64());
                        moved(&remote, &base)?;
                        std::fs::remove_dir_all(&state)?;
                    } else {
                        let clone = dir.path().join(format!("mirror-{rep}"));
                        let t = Instant::now();
                        clone_mirror(&remote, &clone, None)?;
                        first.1.push(t.elapsed().as_secs_f64());
                        std::fs::remove_dir_all(&clone)?;
                    }
                }
            }
            let (w, wg, f, fg) = (
                median(&mut warm.0),
                median(&mut warm.1),
                median(&mut first.0),
                median(&mut first.1),
            );
            println!(
                "{n}\t{m}\t{:.3} s\t{:.3} s\t{:.2}\t{:.3} s\t{:.3} s\t{:.2}",
                w,
                wg,
                w / wg,
                f,
                fg,
                f / fg
            );
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
