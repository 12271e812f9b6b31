//! PostgreSQL's own programs (`pg_basebackup`, `pg_ctl`, `pg_dump`, ...): where
//! they are, and running them, as the data directory's owner when backstop is
//! root (PostgreSQL refuses to run its server as root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Failures to find or run a PostgreSQL program.
#[derive(Debug, thiserror::Error)]
pub enum PgBinError {
    #[error("PostgreSQL server programs not found (looked at $BACKSTOP_PG_BINDIR, /usr/lib/postgresql/*/bin, pg_ctl on the PATH, `pg_config --bindir`); install the PostgreSQL server package")]
    NotFound,
    #[error("failed to start {program}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("failed to inspect {path}")]
    Inspect { path: PathBuf, source: std::io::Error },
}

/// The folder holding `initdb`, `pg_ctl`, `pg_basebackup`, ...: in this
/// order, `$BACKSTOP_PG_BINDIR`; the newest `/usr/lib/postgresql/*/bin`
/// (Debian's layout, and what its `pg_config` answers); the folder of a
/// `pg_ctl` on the `PATH` (symbolic links followed); `pg_config --bindir`.
/// The first three spawn nothing: on Debian `pg_config` is a script that
/// runs three programs.
pub fn bindir() -> Result<PathBuf, PgBinError> {
    let has_server = |d: &Path| d.join("pg_ctl").is_file() && d.join("pg_basebackup").is_file();
    if let Ok(dir) = std::env::var("BACKSTOP_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    candidates.sort();
    if let Some((_, dir)) = candidates.pop() {
        return Ok(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| std::fs::canonicalize(d.join("pg_ctl")).ok())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .find(|d| has_server(d));
    if let Some(dir) = on_path {
        return Ok(dir);
    }
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    Err(PgBinError::NotFound)
}

/// Where the PostgreSQL programs are: a folder given, or found by
/// [`bindir`] on first use, so that a pass that spawns none of them never
/// looks (looking spawns `pg_config`). Clones share what was found.
#[derive(Debug, Clone, Default)]
pub struct Bindir(std::sync::Arc<std::sync::OnceLock<PathBuf>>);

impl Bindir {
    /// Found on first use.
    pub fn lazy() -> Self {
        Self::default()
    }

    /// The folder, found now if it was not yet.
    pub fn get(&self) -> Result<&Path, PgBinError> {
        if let Some(dir) = self.0.get() {
            return Ok(dir);
        }
        let found = bindir()?;
        Ok(self.0.get_or_init(|| found))
    }

    /// [`command`] for `program` of this folder.
    pub fn command(&self, program: &str, owner: Option<(u32, u32)>) -> Result<Command, PgBinError> {
        Ok(command(self.get()?, program, owner))
    }
}

impl From<PathBuf> for Bindir {
    fn from(dir: PathBuf) -> Self {
        let cell = std::sync::OnceLock::new();
        let _ = cell.set(dir);
        Self(std::sync::Arc::new(cell))
    }
}

/// Owner (uid, gid) of `path`.
pub fn owner_of(path: &Path) -> Result<(u32, u32), PgBinError> {
    let meta = std::fs::metadata(path).map_err(|source| PgBinError::Inspect {
        path: path.into(),
        source,
    })?;
    Ok((meta.uid(), meta.gid()))
}

/// A command for `program` in `bindir` that runs as `owner` when we are root.
pub fn command(bindir: &Path, program: &str, owner: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bindir.join(program));
    if let Some((uid, gid)) = owner {
        if nix::unistd::geteuid().is_root() && uid != 0 {
            cmd.uid(uid).gid(gid);
        }
    }
    cmd.stdin(Stdio::null());
    dies_with_us(&mut cmd);
    cmd
}

/// Makes `cmd` speak untranslated English: backstop reads the output of
/// `pg_controldata` and `pg_waldump`, whose labels and messages PostgreSQL
/// translates (`LANG=de_DE.UTF-8` turns "Database system identifier" into
/// "Datenbanksystemidentifikation"). Only for tools whose output is parsed:
/// a server started by backstop keeps the environment's locale.
pub fn untranslated(cmd: &mut Command) -> &mut Command {
    cmd.env("LC_ALL", "C").env_remove("LANGUAGE")
}

/// A command for a system tool found on `PATH` (`tar`, `chown`), that dies with backstop.
pub fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    dies_with_us(&mut cmd);
    cmd
}

/// Children die with backstop: killed when dropped, and sent `SIGKILL` by the
/// kernel when backstop itself dies (`PR_SET_PDEATHSIG`), `kill -9` included,
/// so no `pg_restore` or `pg_basebackup` keeps writing after it.
pub fn dies_with_us(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    cmd.kill_on_drop(true);
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated
    // (the error is a raw OS error).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The parent may have died before the line above: then die now.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying stderr's tail.
pub async fn run(mut cmd: Command, program: &str) -> Result<String, PgBinError> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| PgBinError::Spawn {
            program: program.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(PgBinError::Failed {
            program: program.into(),
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 20),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Gives `path` (recursively) to `owner` when we are root; no-op otherwise.
pub async fn chown_tree(path: &Path, owner: (u32, u32)) -> Result<(), PgBinError> {
    if !nix::unistd::geteuid().is_root() || owner.0 == 0 {
        return Ok(());
    }
    let mut cmd = tool("chown");
    cmd.arg("-R").arg(format!("{}:{}", owner.0, owner.1)).arg(path);
    run(cmd, "chown").await.map(|_| ())
}
