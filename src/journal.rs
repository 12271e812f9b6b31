//! The local-mode run store: one JSON file per run under `<state>/journal/`,
//! replaced atomically (write, fsync, rename) on every change, and the
//! evidence reports under `<state>/runs/<run-id>/report.{md,json}`, and the
//! gate status of each guarded path under `<state>/gate/<path>.json`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::gate::GateStatus;
use crate::report::{self, Report};
use crate::run::{RunRecord, RunStore, StoreError};

/// Journal rooted at a state directory.
#[derive(Clone)]
pub struct Journal {
    state: PathBuf,
    /// Records already parsed, by file, with what identified the file then:
    /// every write replaces a file (a new inode), so an unchanged identity
    /// is an unchanged record, and a pass that lists the runs several times
    /// parses each only once (the journal keeps every run ever made).
    parsed: std::sync::Arc<std::sync::Mutex<HashMap<PathBuf, (FileId, RunRecord)>>>,
}

/// A file's inode, length and modification time.
type FileId = (u64, u64, Option<std::time::SystemTime>);

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("state", &self.state).finish()
    }
}

/// What a run id or prefix names.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<RunRecord>),
    Missing,
    /// Several runs match: their records, oldest first.
    Ambiguous(Vec<RunRecord>),
}

impl Journal {
    /// A journal in `state` (created on first write).
    pub fn new(state: &Path) -> Self {
        Self {
            state: state.to_path_buf(),
            parsed: Default::default(),
        }
    }

    fn journal_dir(&self) -> PathBuf {
        self.state.join("journal")
    }

    /// The databases the next pass logs in to first ([`RunStore::warm_hint`]).
    fn warm_file(&self) -> PathBuf {
        self.state.join("warm.json")
    }

    /// Removes what interrupted atomic writes left (`.tmp*` files beside the
    /// journal and gate status). Only for the holder of the state lock: no
    /// other writer can be mid-write then.
    pub fn sweep(&self) {
        for dir in [self.journal_dir(), self.state.join("gate")] {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Folder of one run's reports.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.state.join("runs").join(id)
    }

    /// Reads one run by id (or unique id prefix).
    pub fn find(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        Ok(match self.lookup(id)? {
            Lookup::Found(run) => Some(*run),
            Lookup::Missing | Lookup::Ambiguous(_) => None,
        })
    }

    /// Looks a run up by id, id prefix or commit prefix, telling a prefix
    /// that matches several runs from one that matches none.
    pub fn lookup(&self, id: &str) -> Result<Lookup, StoreError> {
        let runs = self.read_all()?;
        if let Some(r) = runs.iter().find(|r| r.id == id) {
            return Ok(Lookup::Found(Box::new(r.clone())));
        }
        let mut matching: Vec<RunRecord> = runs
            .into_iter()
            .filter(|r| !id.is_empty() && (r.id.starts_with(id) || r.commit.sha.starts_with(id)))
            .collect();
        Ok(match matching.len() {
            0 => Lookup::Missing,
            1 => Lookup::Found(Box::new(matching.remove(0))),
            _ => Lookup::Ambiguous(matching),
        })
    }

    fn ack_file(&self, id: &str) -> PathBuf {
        self.state.join("acks").join(format!("{id}.json"))
    }

    fn set_aside_file(&self, id: &str) -> PathBuf {
        self.state.join("set-aside-deleted").join(format!("{id}.json"))
    }

    /// Records that a person took over run `id` (`backstop ack`). Needs no
    /// state lock: the next pass of a running backstop reads it.
    pub fn acknowledge(&self, id: &str, ack: &crate::run::Acknowledged) -> Result<(), StoreError> {
        write_side(&self.ack_file(id), id, ack, "the acknowledgement")
    }

    /// Records that a person had the data a restore of run `id` set aside
    /// deleted (`backstop prune --set-aside`). Needs no state lock either.
    pub fn set_aside_deleted(&self, id: &str, by: &crate::run::Acknowledged) -> Result<(), StoreError> {
        write_side(&self.set_aside_file(id), id, by, "the deletion of the set-aside data")
    }

    fn gate_file(&self, path: &str) -> PathBuf {
        let name: String = path
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.state
            .join("gate")
            .join(format!("{}.json", if name.is_empty() { "_root" } else { &name }))
    }

    /// Every recorded gate status (one per guarded path).
    pub fn gates(&self) -> Result<Vec<GateStatus>, StoreError> {
        let err = |action, source: Box<dyn std::error::Error + Send + Sync>| StoreError {
            action,
            run: "*".into(),
            source,
        };
        let entries = match std::fs::read_dir(self.state.join("gate")) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err("read the gate status", e.into())),
        };
        let mut out = Vec::new();
        // Only the statuses (`<path>.json`): not a leftover `.tmp*` file.
        for entry in entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        {
            let bytes = std::fs::read(entry.path()).map_err(|e| err("read the gate status", e.into()))?;
            out.push(serde_json::from_slice(&bytes).map_err(|e| err("parse the gate status", e.into()))?);
        }
        out.sort_by(|a: &GateStatus, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn read_all(&self) -> Result<Vec<RunRecord>, StoreError> {
        let dir = self.journal_dir();
        let err = |action, source: Box<dyn std::error::Error + Send + Sync>| StoreError {
            action,
            run: "*".into(),
            source,
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err("read the journal", e.into())),
        };
        let mut runs = Vec::new();
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::HashSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| err("read the journal", e.into()))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let meta = entry.metadata().map_err(|e| err("read a journal entry", e.into()))?;
            let id: FileId = (
                std::os::unix::fs::MetadataExt::ino(&meta),
                meta.len(),
                meta.modified().ok(),
            );
            seen.insert(path.clone());
            if let Some((was, run)) = parsed.get(&path) {
                if *was == id {
                    runs.push(run.clone());
                    continue;
                }
            }
            let text = std::fs::read(&path).map_err(|e| err("read a journal entry", e.into()))?;
            let run: RunRecord = serde_json::from_slice(&text).map_err(|e| StoreError {
                action: "parse the journal entry",
                run: path.display().to_string(),
                source: e.into(),
            })?;
            parsed.insert(path, (id, run.clone()));
            runs.push(run);
        }
        parsed.retain(|path, _| seen.contains(path));
        drop(parsed);
        // `backstop ack` writes beside the journal (a running `backstop run`
        // holds the state lock): merged here.
        // So does `backstop prune --set-aside`. Each folder is listed once,
        // and only the files there are read.
        let (acks, deletions) = (
            side_files(&self.state.join("acks")),
            side_files(&self.state.join("set-aside-deleted")),
        );
        for run in runs.iter_mut() {
            if run.acknowledged.is_none() && acks.contains(&run.id) {
                run.acknowledged = read_side(&self.ack_file(&run.id));
            }
            if run.set_aside_deleted.is_none() && deletions.contains(&run.id) {
                run.set_aside_deleted = read_side(&self.set_aside_file(&run.id));
            }
        }
        runs.sort_by(RunRecord::oldest_first);
        Ok(runs)
    }
}

/// The run ids of the `<id>.json` files in `dir` (none when it is missing).
fn side_files(dir: &Path) -> std::collections::HashSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
        .collect()
}

/// Writes a person's record about run `id` beside the journal.
fn write_side(path: &Path, id: &str, what: &crate::run::Acknowledged, name: &'static str) -> Result<(), StoreError> {
    let err = |action, source: Box<dyn std::error::Error + Send + Sync>| StoreError {
        action,
        run: id.to_string(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(what).map_err(|e| err("encode a person's record", e.into()))?;
    write_atomic(path, &bytes).map_err(|e| err(name, e.into()))
}

/// A person's record beside the journal, if there is a readable one.
fn read_side(path: &Path) -> Option<crate::run::Acknowledged> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// File `name` of run `run` in its folder `dir`; None when there is none.
/// (Both stores keep a run's files in a folder of their own.)
pub(crate) fn read_run_file(dir: &Path, run: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(dir.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError {
            action: "read a file of the run",
            run: run.to_string(),
            source: e.into(),
        }),
    }
}

/// Writes file `name` of run `run` into its folder `dir`, atomically; its path.
pub(crate) fn write_run_file(dir: &Path, run: &str, name: &str, bytes: &[u8]) -> Result<Option<String>, StoreError> {
    let path = dir.join(name);
    write_atomic(&path, bytes).map_err(|e| StoreError {
        action: "write a file of the run",
        run: run.to_string(),
        source: e.into(),
    })?;
    Ok(Some(path.display().to_string()))
}

/// Writes `bytes` to `path` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(Path::new).unwrap_or(path);
    write_atomic_all(dir, &[(name, bytes)])
}

/// Writes each file `(name, bytes)` into `dir` atomically: each is whole
/// on disk before any takes its name, and the folder is synced once.
fn write_atomic_all<P: AsRef<Path>>(dir: &Path, files: &[(P, &[u8])]) -> std::io::Result<()> {
    // Folders made here (a run's report folder, the journal's) are names
    // in their parents, synced too once the files are in: from the first
    // that existed down.
    let mut made = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        made.push(d.to_path_buf());
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        written.push((tmp, dir.join(name)));
    }
    for (tmp, path) in written {
        tmp.persist(path).map_err(|e| e.error)?;
    }
    sync_dir(dir)?;
    for folder in made {
        match folder.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => sync_dir(parent)?,
            None => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Makes the names just given in `dir` durable. A filesystem that cannot
/// sync a folder at all says so with `EINVAL` (as for a special file):
/// there the renames are as durable as it makes them. Any other failure is
/// the write's: a record whose name may not survive a crash is not written.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir)?.sync_all() {
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(()),
        done => done,
    }
}

/// Test switch (debug builds only): `BACKSTOP_TEST_FAIL_SAVE=<step>` fails
/// the save of a record whose newest step is `<step>`, still open (its
/// intent), as a full or failing disk would.
fn fail_save_for_test(run: &RunRecord) -> Result<(), StoreError> {
    #[cfg(debug_assertions)]
    if let Ok(step) = std::env::var("BACKSTOP_TEST_FAIL_SAVE") {
        if run
            .steps
            .last()
            .is_some_and(|s| s.name == step && s.finished_at.is_none())
        {
            return Err(StoreError {
                action: "write the journal",
                run: run.id.clone(),
                source: format!("test switch BACKSTOP_TEST_FAIL_SAVE={step}").into(),
            });
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = run;
    Ok(())
}

/// Encodes `value` and writes it to `path` atomically, off the async threads.
async fn write_json(
    path: PathBuf,
    value: &impl serde::Serialize,
    (encode, write): (&'static str, &'static str),
    run: &str,
) -> Result<(), StoreError> {
    let err = |action, source: Box<dyn std::error::Error + Send + Sync>| StoreError {
        action,
        run: run.to_string(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err(encode, e.into()))?;
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
        .await
        .map_err(|e| err(write, e.into()))?
        .map_err(|e| err(write, e.into()))
}

#[async_trait::async_trait]
impl RunStore for Journal {
    async fn save(&self, run: &RunRecord) -> Result<(), StoreError> {
        fail_save_for_test(run)?;
        let path = self.journal_dir().join(format!("{}.json", run.id));
        // Forgotten before the write: the next listing reads the file again,
        // whatever its identity (the clock that stamps files is coarse, and
        // a freed inode can come back).
        self.parsed.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
        write_json(path, run, ("encode the run", "write the journal"), &run.id).await
    }

    async fn list(&self) -> Result<Vec<RunRecord>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_all())
            .await
            .map_err(|e| StoreError {
                action: "read the journal",
                run: "*".into(),
                source: e.into(),
            })?
    }

    async fn save_gate(&self, status: &GateStatus) -> Result<(), StoreError> {
        let path = self.gate_file(&status.path);
        write_json(path, status, ("encode the gate status", "write the gate status"), "*").await
    }

    async fn load_gate(&self, path: &str) -> Result<Option<GateStatus>, StoreError> {
        let file = self.gate_file(path);
        match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError {
                action: "parse the gate status",
                run: "*".into(),
                source: e.into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError {
                action: "read the gate status",
                run: "*".into(),
                source: e.into(),
            }),
        }
    }

    fn keeps_files(&self) -> bool {
        true
    }

    async fn warm_hint(&self) -> Vec<crate::run::WarmTarget> {
        match tokio::fs::read(self.warm_file()).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    async fn save_warm_hint(&self, targets: &[crate::run::WarmTarget]) {
        let Ok(bytes) = serde_json::to_vec(targets) else {
            return;
        };
        if let Err(e) = tokio::fs::write(self.warm_file(), bytes).await {
            tracing::debug!(error = %e, "could not keep the databases to warm up next pass");
        }
    }

    async fn read_file(&self, run: &RunRecord, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        read_run_file(&self.run_dir(&run.id), &run.id, name)
    }

    async fn write_file(&self, run: &RunRecord, name: &str, bytes: &[u8]) -> Result<Option<String>, StoreError> {
        write_run_file(&self.run_dir(&run.id), &run.id, name, bytes)
    }

    async fn write_report(&self, run: &RunRecord, report: &Report) -> Result<String, StoreError> {
        let dir = self.run_dir(&run.id);
        let err = |e: std::io::Error| StoreError {
            action: "write the report",
            run: run.id.clone(),
            source: e.into(),
        };
        let json = serde_json::to_vec_pretty(report).map_err(|e| StoreError {
            action: "encode the report",
            run: run.id.clone(),
            source: e.into(),
        })?;
        let md = report::markdown(report);
        write_atomic_all(&dir, &[("report.json", &json), ("report.md", md.as_bytes())]).map_err(err)?;
        Ok(dir.join("report.md").display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_lists_the_gate_statuses_and_not_a_write_a_killed_process_left() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let status = GateStatus {
            path: "apps/shop".into(),
            gate_branch: "backstop/gate".into(),
            upstream_branch: "main".into(),
            gate: "a1".into(),
            upstream: "b2".into(),
            waiting: None,
            since: None,
            updated_at: chrono::Utc::now(),
        };
        journal.save_gate(&status).await.unwrap();
        // Half a status: what a process killed mid-write leaves until the
        // next `backstop run` sweeps it.
        std::fs::write(dir.path().join("gate").join(".tmpAbC123"), "{\"path\": \"apps/sh").unwrap();
        let gates = journal.gates().unwrap();
        assert_eq!(gates, vec![status]);
    }
}
