//! A throwaway PostgreSQL server in a temporary folder, with WAL archiving on:
//! what `backstop demo`, the tests and the benchmarks run against. As root it
//! runs as the `postgres` system user, who owns the folder.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use crate::db::{Database, DbError};
use crate::manifests::DatabaseRef;
use crate::pgbin::{self, PgBinError};

/// Failures to set up or stop the server.
#[derive(Debug, thiserror::Error)]
pub enum PgServerError {
    #[error(transparent)]
    Bin(#[from] PgBinError),
    #[error("failed to prepare the server folder {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("running as root, but there is no `postgres` system user to run the server as")]
    NoUser,
    #[error("failed to create database {name}")]
    CreateDb {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A running server; stopped (immediately) when dropped.
pub struct PgServer {
    root: tempfile::TempDir,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    port: u16,
    stopped: bool,
}

impl PgServer {
    /// initdb + start on a free loopback port, `archive_mode = on` archiving to [`archive`](Self::archive).
    ///
    /// `max_wal_size` is 64 MB, not the 1 GB default: the checkpoint's
    /// preflight asks for `max_wal_size` free in the archive, and a throwaway
    /// server (the tests, `backstop demo`) must run on a machine whose temp
    /// directory has less than a gigabyte free.
    pub async fn start() -> Result<Self, PgServerError> {
        Self::start_with("").await
    }

    /// [`start`](Self::start) with `settings` (postgresql.conf lines, e.g.
    /// `wal_level = logical`) after the defaults.
    pub async fn start_with(settings: &str) -> Result<Self, PgServerError> {
        Self::start_with_segments(settings, 16).await
    }

    /// [`start_with`](Self::start_with) on WAL segments of `mib` MiB (a power
    /// of two, 1 to 1024; PostgreSQL's default is 16). Every checkpoint
    /// switches a segment, and the archive keeps each whole: test servers
    /// that checkpoint dozens of times use 1 MiB segments so that the suite
    /// fits in a temp directory of under a gigabyte. `min_wal_size` is two
    /// segments, the least PostgreSQL allows.
    pub async fn start_with_segments(settings: &str, mib: u32) -> Result<Self, PgServerError> {
        let bindir = pgbin::bindir()?;
        let root = tempfile::Builder::new()
            .prefix("backstop-pg-")
            .tempdir()
            .map_err(|source| PgServerError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let io = |source| PgServerError::Io {
            path: root.path().into(),
            source,
        };
        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(PgServerError::NoUser)?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        std::fs::create_dir(root.path().join("archive")).map_err(io)?;
        if let Some(o) = owner {
            pgbin::chown_tree(root.path(), o).await?;
        }
        let data = root.path().join("data");
        let mut initdb = pgbin::command(&bindir, "initdb", owner);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]);
        initdb.arg(format!("--wal-segsize={mib}"));
        pgbin::run(initdb, "initdb").await?;
        let port = free_port().map_err(io)?;
        let archive = root.path().join("archive");
        let conf = format!(
            "\n# backstop test server\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n\
             wal_level = replica\narchive_mode = on\narchive_command = 'test ! -f {arch}/%f && cp %p {arch}/%f'\n\
             max_wal_senders = 4\nmax_wal_size = 64MB\nmin_wal_size = {min_wal}MB\nfsync = off\nsynchronous_commit = off\nfull_page_writes = on\nlog_min_messages = warning\n",
            sock = root.path().display(),
            arch = archive.display(),
            // PostgreSQL's floor (two segments): pg_wal keeps no more recycled
            // segments than it must.
            min_wal = 2 * mib,
        ) + settings
            + "\n";
        append(&data.join("postgresql.conf"), &conf).map_err(io)?;
        let mut server = Self {
            root,
            bindir,
            owner,
            port,
            stopped: true,
        };
        // The port was free when picked but may be taken before the server
        // binds it (other servers, outgoing connections): on a failed start,
        // try again on a fresh port (a later `port =` line wins).
        let mut attempt = 0;
        loop {
            match server.pg_ctl_start().await {
                Ok(()) => break,
                Err(_) if attempt < 3 => {
                    attempt += 1;
                    server.port = free_port().map_err(|source| PgServerError::Io {
                        path: server.root.path().into(),
                        source,
                    })?;
                    append(
                        &server.data_dir().join("postgresql.conf"),
                        &format!("port = {}\n", server.port),
                    )
                    .map_err(|source| PgServerError::Io {
                        path: server.data_dir(),
                        source,
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
        server.stopped = false;
        Ok(server)
    }

    async fn pg_ctl_start(&self) -> Result<(), PgServerError> {
        let mut cmd = pgbin::command(&self.bindir, "pg_ctl", self.owner);
        cmd.arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-l"])
            .arg(self.log_path());
        pgbin::run(cmd, "pg_ctl start").await?;
        Ok(())
    }

    /// The server's log (`pg_ctl -l`).
    pub fn log_path(&self) -> std::path::PathBuf {
        self.root.path().join("server.log")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The WAL archive folder.
    pub fn archive(&self) -> PathBuf {
        self.root.path().join("archive")
    }

    /// The folder everything lives in.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Leaves the server's folder (data directory, WAL archive, anything
    /// set aside beside them) on disk when dropped; the server still stops.
    pub fn keep_files(&mut self) {
        self.root.disable_cleanup(true);
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PostgreSQL programs folder in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Owner the server runs as (None: ourselves).
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.owner
    }

    /// libpq URL of database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connectable target for database `db`.
    pub fn database(&self, db: &str) -> Result<Database, DbError> {
        Database::from_url(DatabaseRef::Url { var: "TEST".into() }, &self.url(db), None)
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> Result<(), PgServerError> {
        let wrap = |e: Box<dyn std::error::Error + Send + Sync>| PgServerError::CreateDb {
            name: name.into(),
            source: e,
        };
        let client = self
            .database("postgres")
            .map_err(|e| wrap(e.into()))?
            .connect()
            .await
            .map_err(|e| wrap(e.into()))?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", crate::db::ident(name)))
            .await
            .map_err(|e| wrap(e.into()))
    }

    /// Starts a stopped server again on the same data directory and port.
    pub async fn restart(&mut self) -> Result<(), PgServerError> {
        if !self.stopped {
            return Ok(());
        }
        self.pg_ctl_start().await?;
        self.stopped = false;
        Ok(())
    }

    /// Stops the server (fast shutdown).
    pub async fn stop(&mut self) -> Result<(), PgServerError> {
        if self.stopped {
            return Ok(());
        }
        let mut cmd = pgbin::command(&self.bindir, "pg_ctl", self.owner);
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w"]);
        pgbin::run(cmd, "pg_ctl stop").await?;
        self.stopped = true;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let mut cmd = std::process::Command::new(self.bindir.join("pg_ctl"));
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())
}
