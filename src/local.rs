//! Local mode wiring (`backstop run`): the engine over a git remote given as a
//! path or URL, databases from `url:VAR`, the `local` or `dump` checkpoint
//! backend, and the journal in `--state`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::{dump::DumpBackend, local::LocalBackend, pgbackrest::PgBackRestBackend, Checkpoint};
use crate::cluster::LocalCluster;
use crate::forge::{Forge, ForgeError, ForgeKind, NoForge, RestForge, Retry};
use crate::git::{GitAuth, GitError, GitRepo};
use crate::journal::Journal;
use crate::manifests::{CheckpointKind, RevertMode};
use crate::pgbin::{self, PgBinError};
use crate::run::{CheckpointSet, Engine, Settings};
use crate::runner::SqlRunner;

/// What `backstop.dev/checkpoint: backup` means in local mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupBackend {
    /// Physical base backup + WAL archive, restored by real PITR.
    Local,
    /// Logical pg_dump / pg_restore.
    Dump,
    /// A recovery point in a pgBackRest stanza's archive, restored by
    /// `pgbackrest restore --delta --type=lsn` (needs --pgbackrest-stanza and --pgdata).
    Pgbackrest,
}

/// Everything local mode needs.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub repo: String,
    pub upstream: String,
    pub gate: String,
    pub path: String,
    pub checkpoint: BackupBackend,
    pub pgdata: Option<PathBuf>,
    pub wal_archive: Option<PathBuf>,
    pub revert: Option<RevertMode>,
    /// Puts the lost writes back after every restore (as `backstop.dev/replay: auto` on each carrier).
    pub replay_lost_writes: bool,
    pub state: PathBuf,
    /// `url:VAR` values that take precedence over the environment.
    pub env: HashMap<String, String>,
    /// Credentials for fetch and push.
    pub git_auth: GitAuth,
    /// Where revert pull requests are opened (None: push the branch only).
    pub forge: Option<ForgeConfig>,
    /// Waits after transient faults.
    pub backoff: crate::run::machine::Backoff,
    /// Checkpoints of the newest this many ended runs are kept (0: all).
    pub keep_checkpoints: usize,
    /// When a checkpoint takes a new base backup (local, pgbackrest).
    pub base_policy: crate::checkpoint::base::BasePolicy,
    /// The pgBackRest stanza (`--checkpoint pgbackrest`).
    pub pgbackrest_stanza: Option<String>,
    /// pgBackRest's configuration file (default: its own default).
    pub pgbackrest_config: Option<PathBuf>,
}

/// A forge to open revert pull requests on.
#[derive(Debug, Clone)]
pub struct ForgeConfig {
    pub kind: ForgeKind,
    /// API base URL (default: api.github.com / gitlab.com; required for Gitea).
    pub url: Option<String>,
    /// `owner/name` (GitHub, Gitea) or the project path (GitLab).
    pub repo: String,
    /// The token (read from the variable the command line names).
    pub token: String,
    pub retry: Retry,
}

impl ForgeConfig {
    /// The forge client.
    pub fn build(&self) -> Result<Arc<dyn Forge>, ForgeError> {
        let base = match (&self.url, self.kind) {
            (Some(u), _) => u.clone(),
            (None, ForgeKind::Github) => "https://api.github.com".into(),
            (None, ForgeKind::Gitlab) => "https://gitlab.com".into(),
            (None, ForgeKind::None) => return Ok(Arc::new(NoForge)),
            (None, ForgeKind::Gitea) => return Err(ForgeError::Config("Gitea/Forgejo needs --forge-url".into())),
        };
        Ok(Arc::new(RestForge::new(
            self.kind,
            &base,
            &self.repo,
            &self.token,
            self.retry,
        )?))
    }
}

/// Failures to set local mode up.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("failed to create the state directory {path}")]
    State { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Bin(#[from] PgBinError),
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error(transparent)]
    Owner(#[from] crate::owner::OwnerError),
    #[error(
        "--repo {repo}: no such directory, and not a URL git can fetch (https://, ssh://, file://, or user@host:path)"
    )]
    NoRepo { repo: String },
}

/// Refuses a `--repo` that is neither a URL nor an existing path: a
/// mistyped path is said as such (git would call it an unsupported URL
/// protocol), before anything is created.
pub fn check_repo(repo: &str) -> Result<(), LocalError> {
    if !is_url(repo) && !std::path::Path::new(repo).exists() {
        return Err(LocalError::NoRepo { repo: repo.to_string() });
    }
    Ok(())
}

/// Whether `repo` is written as a URL (`scheme://`, or scp-like
/// `[user@]host:path`) rather than a path on this machine.
fn is_url(repo: &str) -> bool {
    repo.contains("://")
        || repo
            .split_once(':')
            .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
}

/// Builds the engine for local mode. The caller holds the state
/// directory's lock ([`crate::owner::StateLock`]): nothing else uses its mirror.
pub async fn engine(opts: &LocalOptions) -> Result<Engine, LocalError> {
    check_repo(&opts.repo)?;
    std::fs::create_dir_all(&opts.state).map_err(|source| LocalError::State {
        path: opts.state.clone(),
        source,
    })?;
    let repo = if std::path::Path::new(&opts.repo).exists() {
        std::fs::canonicalize(&opts.repo)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| opts.repo.clone())
    } else {
        opts.repo.clone()
    };
    let mirror = opts.state.join("git").join("mirror.git");
    // The caller holds the state directory's lock (one process): a lock file
    // in the mirror is a killed predecessor's.
    GitRepo::clear_stale_locks(&mirror).await;
    let git = GitRepo::open(&mirror, &repo)
        .await?
        .with_auth(opts.git_auth.clone())
        .protect(&opts.gate);
    let forge: Arc<dyn Forge> = match &opts.forge {
        Some(f) => f.build()?,
        None => Arc::new(NoForge),
    };
    // Found when a checkpoint first spawns a PostgreSQL program.
    let bindir = pgbin::Bindir::lazy();
    let store = opts.state.join("checkpoints");
    let dump: Arc<dyn Checkpoint> = Arc::new(DumpBackend {
        bindir: bindir.clone(),
        store: store.clone(),
    });
    let backup: Arc<dyn Checkpoint> = match opts.checkpoint {
        BackupBackend::Dump => dump.clone(),
        BackupBackend::Local => Arc::new(LocalBackend {
            bindir,
            pgdata: opts.pgdata.clone().unwrap_or_default(),
            wal_archive: opts.wal_archive.clone().unwrap_or_default(),
            store,
            recovery_timeout: Duration::from_secs(600),
            policy: opts.base_policy,
        }),
        BackupBackend::Pgbackrest => Arc::new(PgBackRestBackend {
            program: PathBuf::from("pgbackrest"),
            stanza: opts.pgbackrest_stanza.clone().unwrap_or_default(),
            config: opts.pgbackrest_config.clone(),
            server: crate::checkpoint::server::Server {
                bindir,
                pgdata: opts.pgdata.clone().unwrap_or_default(),
                recovery_timeout: Duration::from_secs(600),
            },
            store,
            policy: opts.base_policy,
        }),
    };
    let mut checkpoints = CheckpointSet::new();
    checkpoints.insert(CheckpointKind::Backup, backup);
    checkpoints.insert(CheckpointKind::Dump, dump);
    Ok(Engine {
        last_gate_tree: Default::default(),
        git,
        cluster: Arc::new(LocalCluster {
            overrides: opts.env.clone(),
        }),
        runner: Arc::new(SqlRunner),
        checkpoints,
        forge,
        store: Arc::new({
            // The caller holds the state lock (`owner::StateLock`).
            let journal = Journal::new(&opts.state);
            journal.sweep();
            journal
        }),
        settings: Settings {
            upstream: opts.upstream.clone(),
            gate: opts.gate.clone(),
            path: opts.path.clone(),
            also_guarded: Vec::new(),
            steward: true,
            revert: opts.revert,
            replay_lost_writes: opts.replay_lost_writes,
            backoff: opts.backoff,
            owner: crate::owner::state_id(&opts.state)?,
            keep_checkpoints: opts.keep_checkpoints,
        },
    })
}
