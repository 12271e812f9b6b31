//! The clap definitions: every flag also reads `BACKSTOP_<FLAG>`, and the
//! `--help` text is the documentation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::local::BackupBackend;
use crate::manifests::RevertMode;

/// Makes database migrations in a GitOps repo reversible: checkpoint, migrate,
/// verify, promote; or roll back code and data together.
#[derive(Debug, Parser)]
#[command(name = "backstop", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole story on a throwaway PostgreSQL server and git repo: one
    /// migration succeeds, one fails and is rolled back (code and data).
    Demo {
        /// Keep the demo folder (remote, state, reports) instead of deleting it.
        #[arg(long, env = "BACKSTOP_KEEP")]
        keep: bool,
    },
    /// Local mode: guard the migrations pushed to the upstream branch of a git
    /// remote, moving the gate branch only past migrations that succeeded.
    Run(Box<RunArgs>),
    /// List runs with their phase and outcome.
    Status {
        /// State directory holding the journal.
        #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
        state: PathBuf,
        /// `text` for people, or `json`: {"gates": [...], "runs": [{id,
        /// commit, phase, outcome, migrations, report, ...}]}.
        #[arg(
            short = 'o',
            long = "output",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        output: Format,
        /// The same as `-o json` (kept for scripts written before -o).
        #[arg(long, env = "BACKSTOP_JSON", hide = true)]
        json: bool,
    },
    /// Take over a run whose remediation did not complete (exit 3, "a person
    /// must act"). Until a person does, backstop holds the gate of its path:
    /// the database is in a state nobody has checked. Run this after you have
    /// looked at the database (see `backstop report RUN`) and put it right;
    /// later passes then go on. Refuses runs that did not fail that way.
    Ack {
        /// Run id, id prefix or commit prefix.
        run: String,
        /// State directory holding the journal.
        #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
        state: PathBuf,
        /// Who takes it over (recorded in the run and its report).
        #[arg(long, env = "BACKSTOP_ACK_BY", default_value_t = whoami())]
        by: String,
        /// What was done about it.
        #[arg(long, env = "BACKSTOP_ACK_NOTE", default_value = "")]
        note: String,
    },
    /// Print the safety findings of SQL files or migration carriers (YAML):
    /// file:line:column, rule, why, and how to do it safely. A statement that
    /// does not parse (or a psql meta-command) is a BS001 finding at its line
    /// and the rest is still linted; a file that cannot be read is named and
    /// the others are still linted. Exit 0 when no finding is at error level,
    /// 1 otherwise, 2 when any file could not be read or holds text that is
    /// not SQL.
    Lint {
        /// `.sql` files (one migration each), YAML carriers, or `-` for SQL
        /// on standard input.
        #[arg(required = true)]
        files: Vec<String>,
        /// Output for people or for programs.
        #[arg(
            short = 'o',
            long = "output",
            alias = "format",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        format: Format,
        /// Target PostgreSQL major version (rules where behaviour changed).
        #[arg(long, env = "BACKSTOP_PG_VERSION", default_value_t = 15)]
        pg_version: u32,
    },
    /// Show what a commit range would run: carriers, statements, findings, the
    /// plan hash to approve, and whether the phase rules and approvals allow
    /// it. Exit 0 allowed; 2 refused or bad input, as `run` exits when it
    /// stops in plan for the same reason.
    Plan {
        /// `TO` (the commit alone, against its parent) or `FROM..TO`.
        range: String,
        /// The repository (a work tree or a bare repository).
        #[arg(long, env = "BACKSTOP_REPO", default_value = ".")]
        repo: PathBuf,
        /// Folder to consider (a Kustomization's spec.path); default: all.
        #[arg(long, env = "BACKSTOP_PATH", default_value = "")]
        path: String,
        /// Output for people or for programs.
        #[arg(
            short = 'o',
            long = "output",
            alias = "format",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        format: Format,
        /// Target PostgreSQL major version (read from the server instead
        /// with --database-url).
        #[arg(long, env = "BACKSTOP_PG_VERSION", default_value_t = 15)]
        pg_version: u32,
        /// Judge the statements against this database's live schema (libpq
        /// URL; prefer the variable for URLs with passwords): `IF NOT EXISTS`
        /// resolved, type changes against the real old type, a blocking
        /// statement on a small table a warning and on a large one an error
        /// with its size and lock time. Default: a static analysis. The plan
        /// hash is the same either way.
        #[arg(long, env = "BACKSTOP_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
    /// Move a PostgreSQL database to another server (the calicoctl
    /// `datastore migrate` runbook): lock, export, import, verify, unlock, or
    /// roll back while the source still exists. Prefer the BACKSTOP_SOURCE /
    /// BACKSTOP_TARGET / BACKSTOP_URL variables for URLs that carry passwords.
    Datastore {
        #[command(subcommand)]
        step: DatastoreStep,
    },
    /// Print the CRDs generated from the Rust types (what flux/crds/ holds).
    Crd,
    /// The Kubernetes controller: guards every Kustomization annotated
    /// `backstop.dev/guard: enabled`, recording runs as MigrationRuns.
    Controller {
        /// kubeconfig to use (default: in-cluster, $KUBECONFIG, ~/.kube/config).
        #[arg(long, env = "BACKSTOP_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// State directory: git mirrors, checkpoints, reports.
        #[arg(long, env = "BACKSTOP_STATE", default_value = "/var/lib/backstop")]
        state: PathBuf,
        /// Seconds between passes of each guarded Kustomization (a change of
        /// it, of its GitRepository or of one of its MigrationRuns wakes it sooner).
        #[arg(long, env = "BACKSTOP_INTERVAL", default_value_t = 30)]
        interval: u64,
        /// Seconds the pause handshake and the post-promotion health gate may take.
        #[arg(long, env = "BACKSTOP_TIMEOUT", default_value_t = 300)]
        timeout: u64,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "BACKSTOP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: String,
        /// Namespace of the leader-election Lease (the controller's own).
        #[arg(long, env = "BACKSTOP_LEASE_NAMESPACE", default_value = "backstop-system")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, env = "BACKSTOP_LEASE_NAME", default_value = "backstop-controller")]
        lease_name: String,
        /// Seconds the Lease is valid without renewal. It is renewed every
        /// third of this; the first failed renewal stops every reconcile, and
        /// a follower takes over once it expired.
        #[arg(long, env = "BACKSTOP_LEASE_SECONDS", default_value_t = 15)]
        lease_seconds: u64,
        /// Kustomizations reconciled at once (at least 1). Each holds a git
        /// task and up to two database connections while it runs, and a
        /// running migration holds its slot until it ends: size it above the
        /// number of migrations expected to run at the same time.
        #[arg(long, env = "BACKSTOP_CONCURRENCY", default_value_t = 8)]
        concurrency: u16,
        /// Dump checkpoints of the newest this many ended runs per
        /// Kustomization are kept (see `run --keep-checkpoints`; 0: all).
        #[arg(long, env = "BACKSTOP_KEEP_CHECKPOINTS", default_value_t = 5)]
        keep_checkpoints: usize,
        #[command(flatten)]
        base_backup: BasePolicyArgs,
        /// Say that --state is on a durable volume every replica mounts (a
        /// ReadWriteMany PersistentVolumeClaim, flux/state-pvc.yaml). Without
        /// it `backstop.dev/checkpoint: dump` is refused before anything is
        /// touched: a dump on an emptyDir is lost with the pod.
        #[arg(long, env = "BACKSTOP_DURABLE_STATE")]
        durable_state: bool,
        /// This replica's identity in the Lease (the pod name).
        #[arg(long, env = "HOSTNAME", default_value = "backstop")]
        identity: String,
        /// Forge that revert pull requests are opened on (`none`: push the branch only).
        #[arg(long, env = "BACKSTOP_FORGE", value_enum, default_value = "none")]
        forge: crate::forge::ForgeKind,
        /// Forge API base URL (default api.github.com, gitlab.com; required for Gitea/Forgejo).
        #[arg(long, env = "BACKSTOP_FORGE_URL")]
        forge_url: Option<String>,
        /// NAMESPACE/NAME of the Secret whose `token` key holds the forge token.
        #[arg(
            long,
            env = "BACKSTOP_FORGE_TOKEN_SECRET",
            default_value = "backstop-system/backstop-forge"
        )]
        forge_token_secret: String,
        /// Attempts per forge request on 5xx answers and network errors.
        #[arg(long, env = "BACKSTOP_FORGE_RETRIES", default_value_t = 5)]
        forge_retries: u32,
        /// First delay between forge retries, in milliseconds (doubling each time).
        #[arg(long, env = "BACKSTOP_FORGE_RETRY_DELAY_MS", default_value_t = 1000)]
        forge_retry_delay_ms: u64,
    },
    /// Take the verified pause of a Flux Kustomization: suspend it with a fresh
    /// reconcile request and wait until kustomize-controller confirms; prints
    /// the live revision. A Kustomization a person suspended is left as it is.
    Lock(PauseArgs),
    /// Resume a Kustomization that backstop (this owner) suspended; one a
    /// person suspended stays suspended.
    Unlock(PauseArgs),
    /// Delete the checkpoints retention lets go now, or list them with
    /// --dry-run. The checkpoints (dumps, base-backup claims) of ended runs
    /// older than the newest --keep-checkpoints go, then base backups no kept
    /// run relies on (never the newest). Never deleted: an open run's
    /// checkpoint, a failed run's before `backstop ack`, and the data
    /// directory a restore set aside (the only copy of the writes made after
    /// the recovery point) unless you name its run with --set-aside. Refused
    /// (exit 4) while a `backstop run` holds the state: its passes apply the
    /// same retention.
    Prune {
        /// State directory holding the journal and checkpoints.
        #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
        state: PathBuf,
        /// Checkpoints of the newest this many ended runs are kept (0: all).
        /// Default 5, as `run`; with --set-aside and no --keep-checkpoints,
        /// only the named set-aside data is deleted.
        #[arg(long, env = "BACKSTOP_KEEP_CHECKPOINTS")]
        keep_checkpoints: Option<usize>,
        /// List what would be deleted and what is kept, and why; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete the data directory this run's restore set aside (run
        /// id, id prefix or commit prefix; repeat for several). Refused for a
        /// run that is open or waits for `backstop ack`, and while a server
        /// runs on that directory.
        #[arg(long = "set-aside", value_name = "RUN")]
        set_aside: Vec<String>,
        /// Who asks (recorded in the run and its report).
        #[arg(long, env = "BACKSTOP_ACK_BY", default_value_t = whoami())]
        by: String,
        /// `text` for people, or `json`: {dry_run, keep, deleted: [...],
        /// kept: [...], freed_bytes}; each item {what, run, path, bytes, why}.
        #[arg(
            short = 'o',
            long = "output",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        output: Format,
    },
    /// Put back the writes a run's restore discarded (kept in its run folder
    /// as lost-writes.sql/json when the server decodes WAL: wal_level =
    /// logical). One source transaction at a time, in commit order; those
    /// that touch a table the migration changed are left for a person; it
    /// stops at the first conflict (a row no longer as it was), naming it.
    /// Applied transactions are recorded (backstop.replayed): running it
    /// again goes on where it stopped. Exit 0 when all were applied or left,
    /// 3 when it stopped at a conflict, 2 when it cannot start.
    Replay {
        /// Run id, id prefix or commit prefix.
        run: String,
        /// State directory holding the journal.
        #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
        state: PathBuf,
        /// The database (libpq URL); default: the run's carrier's
        /// url:VAR read from the environment, as `run` does.
        #[arg(long, env = "BACKSTOP_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Apply everything in one transaction and roll it back: says what
        /// would apply and where it would stop, changes nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only transactions whose every change is on these tables
        /// (comma separated, as `schema.table` or `table`).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Transactions (xids, comma separated) a person has handled after
        /// replay stopped at them: kept the row as it is now, or applied
        /// the change by hand. Recorded as done; replay goes on past them.
        #[arg(long, value_delimiter = ',', value_name = "XID")]
        skip: Vec<u32>,
        /// For lost writes kept by an older backstop (no transaction-id
        /// horizon in lost-writes.json): match UPDATEs and DELETEs that
        /// carry only their key by that key alone, overwriting a row the
        /// application may have changed since the restore. Without it those
        /// stop replay for a person to check.
        #[arg(long)]
        match_by_key: bool,
        /// Replay this lost-writes.json instead of finding RUN in the
        /// journal under --state: a controller's run, whose file is on the
        /// controller's --state volume (<ns>/<kustomization>/runs/RUN/).
        /// Needs --database-url; the file must be RUN's.
        #[arg(long, value_name = "PATH", requires = "database_url")]
        file: Option<PathBuf>,
        /// `text` or `json`: {dry_run, applied: [xid], already: [xid], skipped: [xid],
        /// left: [[xid, why]], stopped: [xid, why] | null}.
        #[arg(
            short = 'o',
            long = "output",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        output: Format,
    },
    /// Print one run's evidence report (by id, id prefix or commit prefix).
    Report {
        /// Run id.
        run: String,
        /// State directory holding the journal.
        #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
        state: PathBuf,
        /// `text` (the Markdown report) or `json`.
        #[arg(
            short = 'o',
            long = "output",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        output: Format,
        /// The same as `-o json` (kept for scripts written before -o).
        #[arg(long, env = "BACKSTOP_JSON", hide = true)]
        json: bool,
    },
}

/// Flags of `lock` and `unlock`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// NAMESPACE/NAME of the Kustomization.
    pub target: String,
    /// kubeconfig to use (default: in-cluster, $KUBECONFIG, ~/.kube/config).
    #[arg(long, env = "BACKSTOP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Who holds the pause (recorded in backstop.dev/suspended-by).
    #[arg(long, env = "BACKSTOP_OWNER", default_value = "cli")]
    pub owner: String,
    /// Seconds to wait for kustomize-controller to confirm: for `lock`, that
    /// it saw the suspension (no apply is in flight); for `unlock`, that it
    /// reconciled the resumed Kustomization.
    #[arg(long, env = "BACKSTOP_TIMEOUT", default_value_t = 60)]
    pub timeout: u64,
}

/// Steps of a datastore move.
#[derive(Debug, Subcommand)]
pub enum DatastoreStep {
    /// Stop writers to the source: revoke CONNECT from application roles, make
    /// new sessions read-only, end running sessions, and record the lock in the
    /// source database itself.
    Lock {
        /// The source database: a libpq URL (`postgresql://user@host:port/db`,
        /// with `sslmode=...` as libpq reads it). Prefer the variable when it
        /// carries a password: --help never shows its value.
        #[arg(long, env = "BACKSTOP_SOURCE", hide_env_values = true)]
        source: String,
        /// Why, for the lock record.
        #[arg(long, env = "BACKSTOP_REASON", default_value = "datastore move")]
        reason: String,
        /// Also take the verified pause of these Kustomizations (NAMESPACE/NAME,
        /// repeatable): the ones that deploy the source's clients. Unlock and
        /// rollback resume them.
        #[arg(long = "suspend", env = "BACKSTOP_SUSPEND", value_delimiter = ',')]
        suspend: Vec<String>,
        /// kubeconfig for --suspend (default: in-cluster, $KUBECONFIG, ~/.kube/config).
        #[arg(long, env = "BACKSTOP_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Export schema and data of the locked source (`pg_dump -Fd --jobs`,
    /// uncompressed).
    Export {
        /// The source database: a libpq URL (`postgresql://user@host:port/db`,
        /// with `sslmode=...` as libpq reads it). Prefer the variable when it
        /// carries a password: --help never shows its value.
        #[arg(long, env = "BACKSTOP_SOURCE", hide_env_values = true)]
        source: String,
        /// Dump directory to write (pg_dump's directory format); it must not
        /// exist. Written as `<output>.partial` and renamed when complete.
        #[arg(short = 'o', long = "output", env = "BACKSTOP_FILE")]
        file: PathBuf,
        /// Tables dumped at once (each a connection to the source).
        #[arg(short = 'j', long, env = "BACKSTOP_JOBS", default_value_t = 2)]
        jobs: u32,
    },
    /// Import a dump into the target (all or nothing); the target stays locked
    /// until `unlock`. Refuses a target that already has tables.
    Import {
        /// The target database: a libpq URL, as for --source (prefer the
        /// variable when it carries a password).
        #[arg(long, env = "BACKSTOP_TARGET", hide_env_values = true)]
        target: String,
        /// Dump to read: the directory `export` wrote (or a `pg_dump -Fc` file).
        #[arg(short = 'f', long = "file", env = "BACKSTOP_FILE")]
        file: PathBuf,
        /// Tables restored at once (each a connection to the target). Each
        /// commits on its own: a failed import drops what it created, and a
        /// killed one is undone by `rollback`.
        #[arg(short = 'j', long, env = "BACKSTOP_JOBS", default_value_t = 2)]
        jobs: u32,
        /// Import even though the target already has tables.
        #[arg(long, env = "BACKSTOP_ALLOW_NON_EMPTY")]
        allow_non_empty: bool,
        /// Leave out GRANTs (when the source's roles do not exist on the target).
        #[arg(long, env = "BACKSTOP_NO_PRIVILEGES")]
        no_privileges: bool,
    },
    /// Compare every table: its row count and the sum of a 64-bit hash of
    /// every row, computed in each database at once; only a table whose sums
    /// differ is read in key-hash buckets to name the rows. Exit 1 when any
    /// table differs.
    Verify {
        /// The source database: a libpq URL (`postgresql://user@host:port/db`,
        /// with `sslmode=...` as libpq reads it). Prefer the variable when it
        /// carries a password: --help never shows its value.
        #[arg(long, env = "BACKSTOP_SOURCE", hide_env_values = true)]
        source: String,
        /// The target database: a libpq URL, as for --source (prefer the
        /// variable when it carries a password).
        #[arg(long, env = "BACKSTOP_TARGET", hide_env_values = true)]
        target: String,
        /// Output for people (text) or for programs (json).
        #[arg(
            short = 'o',
            long = "output",
            alias = "format",
            env = "BACKSTOP_OUTPUT",
            value_enum,
            default_value = "text"
        )]
        format: Format,
    },
    /// Release the lock on the side that is now live (and resume the
    /// Kustomizations the lock suspended). The source of a move that was
    /// exported is refused without --force: with the target live, both
    /// sides would take writes (use `rollback` to go back to the source).
    Unlock {
        /// The database to unlock (libpq URL).
        #[arg(long, env = "BACKSTOP_URL", hide_env_values = true)]
        url: String,
        /// Unlock an exported source anyway (the target never went live).
        #[arg(long)]
        force: bool,
        /// kubeconfig for resuming suspended Kustomizations.
        #[arg(long, env = "BACKSTOP_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// While the source exists and holds its lock: drop what import created in
    /// the target and unlock the source. Refuses otherwise.
    Rollback {
        /// The source database: a libpq URL (`postgresql://user@host:port/db`,
        /// with `sslmode=...` as libpq reads it). Prefer the variable when it
        /// carries a password: --help never shows its value.
        #[arg(long, env = "BACKSTOP_SOURCE", hide_env_values = true)]
        source: String,
        /// The target database: a libpq URL, as for --source (prefer the
        /// variable when it carries a password).
        #[arg(long, env = "BACKSTOP_TARGET", hide_env_values = true)]
        target: String,
        /// Roll back even though the target was unlocked (its new writes are lost).
        #[arg(long, env = "BACKSTOP_FORCE")]
        force: bool,
        /// kubeconfig for resuming suspended Kustomizations.
        #[arg(long, env = "BACKSTOP_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Flags of `backstop run`.
/// When a checkpoint takes a new base backup (`run` and `controller`).
#[derive(Debug, Clone, clap::Args)]
pub struct BasePolicyArgs {
    /// A checkpoint is a recovery point on the newest base backup (local:
    /// pg_basebackup; pgbackrest: a backup in the stanza; controller: a
    /// completed CNPG Backup while the Cluster archives WAL); it takes a new
    /// one when the newest is older than this. `0`: a new one for every
    /// checkpoint.
    #[arg(long, env = "BACKSTOP_BASE_BACKUP_MAX_AGE", default_value = "24h", value_parser = crate::checkpoint::base::parse_age)]
    pub base_backup_max_age: Duration,
    /// ... or when a restore from the newest would replay more WAL than this
    /// (bounds the restore's replay time; e.g. 4GiB, 512MiB).
    #[arg(long, env = "BACKSTOP_BASE_BACKUP_MAX_WAL", default_value = "4GiB", value_parser = crate::checkpoint::base::parse_size)]
    pub base_backup_max_wal: u64,
}

impl BasePolicyArgs {
    pub(super) fn policy(&self) -> crate::checkpoint::base::BasePolicy {
        crate::checkpoint::base::BasePolicy {
            max_age: self.base_backup_max_age,
            max_wal: self.base_backup_max_wal,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The sre repository: a path or URL git can fetch from and push to.
    #[arg(long, env = "BACKSTOP_REPO")]
    pub repo: String,
    /// Branch people commit to.
    #[arg(long, env = "BACKSTOP_UPSTREAM", default_value = "main")]
    pub upstream: String,
    /// Branch Flux follows; only backstop moves it, only forward.
    #[arg(long, env = "BACKSTOP_GATE", default_value = "backstop/gate")]
    pub gate: String,
    /// Folder of the repo to guard, relative to its root (a Kustomization's
    /// spec.path, e.g. `apps/shop`); carriers and manifests outside it do not
    /// hold its gate. Default: the whole repository.
    #[arg(long, env = "BACKSTOP_PATH", default_value = "")]
    pub path: String,
    /// What `backstop.dev/checkpoint: backup` means: `local` (base backup + WAL
    /// archive, real PITR; needs --pgdata and --wal-archive), `pgbackrest` (a
    /// recovery point in a pgBackRest stanza; needs --pgbackrest-stanza and
    /// --pgdata) or `dump`.
    #[arg(long, env = "BACKSTOP_CHECKPOINT", value_enum, default_value = "local")]
    pub checkpoint: BackupBackend,
    /// Data directory of the PostgreSQL server (local and pgbackrest checkpoints).
    #[arg(long, env = "BACKSTOP_PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Folder the server's archive_command writes WAL segments to (local checkpoints).
    #[arg(long, env = "BACKSTOP_WAL_ARCHIVE")]
    pub wal_archive: Option<PathBuf>,
    /// The pgBackRest stanza of the server (pgbackrest checkpoints).
    #[arg(long, env = "BACKSTOP_PGBACKREST_STANZA")]
    pub pgbackrest_stanza: Option<String>,
    /// pgBackRest's configuration file (default: pgBackRest's own default).
    #[arg(long, env = "BACKSTOP_PGBACKREST_CONFIG")]
    pub pgbackrest_config: Option<PathBuf>,
    #[command(flatten)]
    pub base_backup: BasePolicyArgs,
    /// How to revert code on failure, for every carrier (overrides their
    /// backstop.dev/revert): `commit` pushes a revert commit to the upstream
    /// branch; `pull-request` pushes a revert branch and opens a pull request
    /// on --forge (with --forge none, the branch only, for a person to open).
    /// Default: each carrier's annotation, `pull-request` when it has none.
    #[arg(long, env = "BACKSTOP_REVERT", value_parser = parse_revert, value_name = "commit|pull-request")]
    pub revert: Option<RevertMode>,
    /// After a restore, put back at once the writes it discarded that touch
    /// no table the migration changed (as `backstop.dev/replay: auto` on
    /// every carrier), stopping at the first conflict; the rest stay in the
    /// run's lost-writes.sql for `backstop replay`. Off by default: the
    /// writes are kept, and a person decides.
    #[arg(long, env = "BACKSTOP_REPLAY_LOST_WRITES")]
    pub replay_lost_writes: bool,
    /// State directory: journal, checkpoints, runs/<id>/report.{md,json}.
    #[arg(long, env = "BACKSTOP_STATE", default_value = ".backstop")]
    pub state: PathBuf,
    /// Process what is pending, then exit (default: keep watching).
    #[arg(long, env = "BACKSTOP_ONCE")]
    pub once: bool,
    /// How each pass ends: `text`, a short summary per run (what ran, the
    /// outcome, gate from -> to, the revert, the next step for a person), or
    /// `json`, the same as one JSON object per pass on standard output.
    #[arg(
        short = 'o',
        long = "output",
        env = "BACKSTOP_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: Format,
    /// Seconds between passes when watching.
    #[arg(long, env = "BACKSTOP_INTERVAL", default_value_t = 30)]
    pub interval: u64,
    /// Seconds to wait before retrying after a transient fault (a lock held too
    /// long, a database or remote that cannot be reached); doubles per attempt
    /// up to --retry-max. Transient faults never revert a commit; one that
    /// outlasts the migration's timeout is shown as stalled by `status`.
    /// A lower value also shortens waits an earlier process scheduled: after
    /// fixing the cause, `--retry-backoff 0` retries at once.
    #[arg(long, env = "BACKSTOP_RETRY_BACKOFF", default_value_t = 30)]
    pub retry_backoff: u64,
    /// Longest wait between retries, in seconds.
    #[arg(long, env = "BACKSTOP_RETRY_MAX", default_value_t = 600)]
    pub retry_max: u64,
    /// Checkpoints (dumps, and base backups no kept run relies on) of the
    /// newest this many ended runs are kept; older ones are deleted after
    /// each pass. Never deleted: an open run's, a failed run's until
    /// `backstop ack`, and the data directory a restore set aside (only
    /// `backstop prune --set-aside RUN` deletes it). 0 keeps everything.
    #[arg(long, env = "BACKSTOP_KEEP_CHECKPOINTS", default_value_t = 5)]
    pub keep_checkpoints: usize,
    /// Forge that revert pull requests are opened on (`none`: push the branch only).
    #[arg(long, env = "BACKSTOP_FORGE", value_enum, default_value = "none")]
    pub forge: crate::forge::ForgeKind,
    /// Forge API base URL (default api.github.com, gitlab.com; required for Gitea/Forgejo).
    #[arg(long, env = "BACKSTOP_FORGE_URL")]
    pub forge_url: Option<String>,
    /// Repository on the forge: owner/name (GitHub, Gitea) or the project path (GitLab).
    #[arg(long, env = "BACKSTOP_FORGE_REPO")]
    pub forge_repo: Option<String>,
    /// Name of the environment variable holding the forge token.
    #[arg(long, env = "BACKSTOP_FORGE_TOKEN_ENV", default_value = "BACKSTOP_FORGE_TOKEN")]
    pub forge_token_env: String,
    /// Attempts per forge request on 5xx answers and network errors.
    #[arg(long, env = "BACKSTOP_FORGE_RETRIES", default_value_t = 5)]
    pub forge_retries: u32,
    /// First delay between forge retries, in milliseconds (doubling each time).
    #[arg(long, env = "BACKSTOP_FORGE_RETRY_DELAY_MS", default_value_t = 1000)]
    pub forge_retry_delay_ms: u64,
    /// Name of the environment variable holding an HTTPS git token (basic auth password).
    #[arg(long, env = "BACKSTOP_GIT_TOKEN_ENV")]
    pub git_token_env: Option<String>,
    /// User name for HTTPS token auth (x-access-token for GitHub, oauth2 for GitLab).
    #[arg(long, env = "BACKSTOP_GIT_USERNAME", default_value = "x-access-token")]
    pub git_username: String,
    /// SSH deploy key for git over SSH (needs --known-hosts).
    #[arg(long, env = "BACKSTOP_SSH_KEY", requires = "known_hosts")]
    pub ssh_key: Option<PathBuf>,
    /// known_hosts file the SSH server's host key must be in.
    #[arg(long, env = "BACKSTOP_KNOWN_HOSTS")]
    pub known_hosts: Option<PathBuf>,
}

/// Credentials and forge from the flags; secrets come from the variables they name.
pub(super) fn credentials(args: &RunArgs) -> Result<(crate::git::GitAuth, Option<crate::local::ForgeConfig>), String> {
    let git_auth = match (&args.git_token_env, &args.ssh_key, &args.known_hosts) {
        (Some(var), _, _) => crate::git::GitAuth::Token {
            username: args.git_username.clone(),
            token: std::env::var(var).map_err(|_| format!("--git-token-env names {var}, which is not set"))?,
        },
        (None, Some(key), Some(known_hosts)) => crate::git::GitAuth::Ssh {
            username: "git".into(),
            key: key.clone(),
            known_hosts: known_hosts.clone(),
        },
        _ => crate::git::GitAuth::None,
    };
    let forge = match args.forge {
        crate::forge::ForgeKind::None => None,
        kind => Some(crate::local::ForgeConfig {
            kind,
            url: args.forge_url.clone(),
            repo: args.forge_repo.clone().ok_or("--forge needs --forge-repo")?,
            token: std::env::var(&args.forge_token_env)
                .map_err(|_| format!("the forge token variable {} is not set", args.forge_token_env))?,
            retry: crate::forge::Retry {
                attempts: args.forge_retries,
                delay: Duration::from_millis(args.forge_retry_delay_ms),
            },
        }),
    };
    Ok((git_auth, forge))
}

pub(super) fn parse_revert(s: &str) -> Result<RevertMode, String> {
    match s {
        "commit" => Ok(RevertMode::Commit),
        "pull-request" => Ok(RevertMode::PullRequest),
        other => Err(format!(
            "unknown revert mode {other:?} (expected commit or pull-request)"
        )),
    }
}

/// Who takes a failed run over by default: `$USER`, else `$LOGNAME`.
pub(super) fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
