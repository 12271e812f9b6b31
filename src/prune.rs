//! `backstop prune`: checkpoint retention on demand, and the deletion of the
//! data a restore set aside, which only a person may ask for.
//!
//! What goes is what a pass's retention lets go ([`crate::run::retention`]):
//! the checkpoints (`<state>/checkpoints/<run>/`) of ended runs older than
//! the newest `--keep-checkpoints`, then the base backups no remaining run
//! relies on (never the newest). Never: an open run's checkpoint, a failed
//! run's before `backstop ack`. The data directory a local restore set aside
//! (`<pgdata>.backstop-<run>`) holds the only copy of the writes made after
//! the recovery point; it goes only when named with `--set-aside RUN`, and
//! only when it is what the run's record says and no server runs on it.
//! `--dry-run` lists the same and deletes nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::{remove_tree, tree_size};
use crate::journal::{Journal, Lookup};
use crate::run::retention::{self, Verdict};
use crate::run::{Acknowledged, RunRecord, RunStore, StoreError};

/// What `prune` was asked to do.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub state: PathBuf,
    /// Checkpoints of the newest this many ended runs are kept (0: all);
    /// None: no checkpoint retention (only `set_aside`).
    pub keep: Option<usize>,
    /// List, delete nothing.
    pub dry_run: bool,
    /// Runs (id, id prefix or commit prefix) whose set-aside data a person
    /// has decided to delete.
    pub set_aside: Vec<String>,
    /// Who asks (recorded in the run and its report).
    pub by: String,
}

/// One thing `prune` deleted (or would), or kept and why.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub what: What,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub path: String,
    pub bytes: u64,
    pub why: String,
}

/// The kinds of things retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum What {
    Checkpoint,
    BaseBackup,
    SetAside,
}

impl What {
    fn as_str(self) -> &'static str {
        match self {
            What::Checkpoint => "checkpoint",
            What::BaseBackup => "base backup",
            What::SetAside => "set-aside data",
        }
    }
}

/// What `prune` did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub keep: Option<usize>,
    pub deleted: Vec<Item>,
    pub kept: Vec<Item>,
    pub freed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("reading the journal")]
    Journal(#[source] StoreError),
    #[error("{0}")]
    Refused(String),
    #[error("delete {what} {path}")]
    Delete {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading which base backups runs rely on in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recording what was deleted for run {run}")]
    Record {
        run: String,
        #[source]
        source: StoreError,
    },
}

/// Applies retention now (or lists it, with `dry_run`). The caller holds the
/// state lock unless it is a dry run.
pub async fn prune(opts: &PruneOptions) -> Result<PruneReport, PruneError> {
    let journal = Journal::new(&opts.state);
    let runs = journal.list().await.map_err(PruneError::Journal)?;
    // Every named run is checked before anything is deleted.
    let mut asked = Vec::new();
    for name in &opts.set_aside {
        asked.push(set_aside_of(&journal, name)?);
    }
    let store = opts.state.join("checkpoints");
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        keep: opts.keep,
        deleted: Vec::new(),
        kept: Vec::new(),
        freed_bytes: 0,
    };
    let mut going = HashSet::new();
    for (run, verdict) in opts.keep.map(|k| retention::verdicts(&runs, k)).unwrap_or_default() {
        let keep = opts.keep.unwrap_or_default();
        let dir = store.join(&run.id);
        // A backend that keeps nothing here (a CNPG Backup) is not ours to
        // prune, and an id that is not one backstop gives names no folder.
        if verdict == Verdict::AlreadyDeleted || !crate::checkpoint::is_run_id(&run.id) || !dir.is_dir() {
            continue;
        }
        let item = Item {
            what: What::Checkpoint,
            run: Some(run.id.clone()),
            path: dir.display().to_string(),
            bytes: tree_size(&dir),
            why: verdict.why(keep),
        };
        if verdict == Verdict::Delete {
            going.insert(run.id.clone());
            report.deleted.push(item);
        } else {
            report.kept.push(item);
        }
    }
    // Base backups only with retention on; a base the journal says a kept
    // run's checkpoint relies on stays even if its marker file is gone.
    if opts.keep.is_some_and(|k| k > 0) {
        let also_used: HashSet<String> = runs
            .iter()
            .filter(|r| !going.contains(&r.id) && !r.checkpoint_pruned)
            .filter_map(|r| r.checkpoint.as_ref()?.base.as_ref().map(|b| b.base.label.clone()))
            .collect();
        let unused =
            crate::checkpoint::local::unused_bases(&store, &going, &also_used).map_err(|source| PruneError::Read {
                path: store.clone(),
                source,
            })?;
        for (dir, label) in unused {
            report.deleted.push(Item {
                what: What::BaseBackup,
                run: None,
                bytes: tree_size(&dir),
                path: dir.display().to_string(),
                why: format!("{label}: not the newest, and no kept run relies on it"),
            });
        }
    }
    for run in &runs {
        let Some(path) = set_aside_dir(run) else { continue };
        if run.set_aside_deleted.is_some() || !path.exists() {
            continue;
        }
        let mut item = Item {
            what: What::SetAside,
            run: Some(run.id.clone()),
            path: path.display().to_string(),
            bytes: tree_size(&path),
            why: "the only copy of the writes made after the recovery point".into(),
        };
        if asked.iter().any(|(r, _)| r.id == run.id) {
            item.why = format!("{} asked for it", opts.by);
            report.deleted.push(item);
        } else {
            if !run.phase.is_terminal() {
                item.why.push_str("; the run is not over");
            } else if run.awaits_person() {
                item.why.push_str("; the run waits for `backstop ack` first");
            } else {
                item.why
                    .push_str(&format!("; `backstop prune --set-aside {}` deletes it", run.id));
            }
            report.kept.push(item);
        }
    }
    report.freed_bytes = report.deleted.iter().map(|i| i.bytes).sum();
    if opts.dry_run {
        return Ok(report);
    }
    delete(opts, &journal, &runs, &report).await?;
    Ok(report)
}

/// Deletes what `report` lists, recording it in the runs.
async fn delete(
    opts: &PruneOptions,
    journal: &Journal,
    runs: &[RunRecord],
    report: &PruneReport,
) -> Result<(), PruneError> {
    // Checkpoints first: a base backup goes only once no run names it.
    let order = [What::Checkpoint, What::BaseBackup, What::SetAside];
    for what in order {
        for item in report.deleted.iter().filter(|i| i.what == what) {
            let path = PathBuf::from(&item.path);
            // Checked again right before: a person may have started a server
            // on it to read the lost writes since the listing.
            if what == What::SetAside {
                if let Some(pid) = live_postmaster(&path) {
                    return Err(PruneError::Refused(format!(
                        "a server (pid {pid}) now runs on {}: stop it first",
                        path.display()
                    )));
                }
            }
            remove_tree(path.clone()).await.map_err(|source| PruneError::Delete {
                what: what.as_str(),
                path,
                source,
            })?;
            tracing::info!(what = what.as_str(), path = %item.path, bytes = item.bytes, "prune deleted");
            let Some(run) = item.run.as_ref().and_then(|id| runs.iter().find(|r| &r.id == id)) else {
                continue;
            };
            let record = |source| PruneError::Record {
                run: run.id.clone(),
                source,
            };
            let mut run = run.clone();
            match what {
                What::Checkpoint => {
                    run.checkpoint_pruned = true;
                    journal.save(&run).await.map_err(record)?;
                }
                What::SetAside => {
                    let by = Acknowledged {
                        by: opts.by.clone(),
                        at: chrono::Utc::now(),
                        note: format!("deleted {}", item.path),
                    };
                    journal.set_aside_deleted(&run.id, &by).map_err(record)?;
                    run.set_aside_deleted = Some(by);
                    let report = crate::report::Report::from_run(&run);
                    journal.write_report(&run, &report).await.map_err(record)?;
                }
                What::BaseBackup => {}
            }
        }
    }
    Ok(())
}

/// The data directory a local restore of `run` set aside, when its record
/// names one: an absolute path whose name is `<pgdata>.backstop-<run id>`
/// (anything else in a record is never deleted).
fn set_aside_dir(run: &RunRecord) -> Option<PathBuf> {
    if run.checkpoint.as_ref()?.backend != "local" || !crate::checkpoint::is_run_id(&run.id) {
        return None;
    }
    let path = PathBuf::from(&run.restore.as_ref()?.kept);
    let name = path.file_name()?.to_string_lossy().into_owned();
    (path.is_absolute() && name.ends_with(&format!(".backstop-{}", run.id)) && name.len() > run.id.len() + 10)
        .then_some(path)
}

/// The run `name` designates and its set-aside data directory, or why it
/// may not be deleted.
fn set_aside_of(journal: &Journal, name: &str) -> Result<(RunRecord, PathBuf), PruneError> {
    let refuse = |why: String| Err(PruneError::Refused(format!("--set-aside {name}: {why}")));
    let run = match journal.lookup(name).map_err(PruneError::Journal)? {
        Lookup::Found(run) => *run,
        Lookup::Missing => return refuse("no such run (see `backstop status`)".into()),
        Lookup::Ambiguous(runs) => {
            let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
            return refuse(format!("ambiguous, it matches {}", ids.join(", ")));
        }
    };
    if run.restore.is_none() {
        return refuse(format!("run {} did not restore: it set nothing aside", run.id));
    }
    if !run.phase.is_terminal() {
        return refuse(format!("run {} is not over ({})", run.id, run.phase));
    }
    if run.awaits_person() {
        return refuse(format!(
            "run {} failed and waits for a person: look at its report, then `backstop ack` it first",
            run.id
        ));
    }
    let Some(path) = set_aside_dir(&run) else {
        return refuse(format!(
            "run {}'s restore kept {:?}, which is not a data directory backstop set aside here; delete it yourself",
            run.id,
            run.restore.as_ref().map(|r| r.kept.as_str()).unwrap_or_default()
        ));
    };
    if run.set_aside_deleted.is_some() || !path.exists() {
        return refuse(format!("{} is already gone", path.display()));
    }
    if let Some(pid) = live_postmaster(&path) {
        return refuse(format!(
            "a server (pid {pid}) runs on {}: stop it first",
            path.display()
        ));
    }
    if std::fs::symlink_metadata(&path).map(|m| !m.is_dir()).unwrap_or(true) {
        return refuse(format!("{} is not a directory", path.display()));
    }
    Ok((run, path))
}

/// The pid of a running server whose data directory is `dir` (a process
/// with the pid its `postmaster.pid` names is alive: `kill(pid, 0)`).
fn live_postmaster(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let alive = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    };
    (pid > 0 && alive).then_some(pid)
}

/// The text rendering.
pub fn text(r: &PruneReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let line = |s: &mut String, i: &Item| {
        let run = i.run.as_deref().map(|r| format!(" of run {r}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {}{run}  {}  {}\n    {}",
            i.what.as_str(),
            bytesize::ByteSize::b(i.bytes),
            i.path,
            i.why
        );
    };
    if r.deleted.is_empty() {
        let _ = writeln!(s, "nothing to delete");
    } else {
        let _ = writeln!(s, "{verb}:");
        for i in &r.deleted {
            line(&mut s, i);
        }
    }
    if !r.kept.is_empty() {
        let _ = writeln!(s, "kept:");
        for i in &r.kept {
            line(&mut s, i);
        }
    }
    let _ = writeln!(s, "{verb} {} in all", bytesize::ByteSize::b(r.freed_bytes));
    if r.dry_run {
        let _ = writeln!(s, "(dry run: nothing was deleted)");
    }
    s
}
