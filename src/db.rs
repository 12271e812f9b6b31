//! Connection targets: a database reference resolved to something connectable,
//! with the password kept out of `Debug`, logs, command lines and reports.

mod session;
mod tls;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

pub use session::{close_idle, defaults_changed, DefaultsChangedOnDrop, Session, LOGIN_WAIT};
pub use tls::{SslMode, Tls};

use crate::manifests::DatabaseRef;

/// Failures to reach a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("environment variable {var} (named by database url:{var}) is not set")]
    MissingVar { var: String },
    #[error("environment variable {var} does not hold a valid libpq URL")]
    BadUrl { var: String, source: tokio_postgres::Error },
    #[error("the connection string of {var}: {message}")]
    BadTls { var: String, message: String },
    #[error("failed to connect to database {database}")]
    Connect {
        database: String,
        source: tokio_postgres::Error,
    },
}

/// A database backstop can connect to.
#[derive(Clone)]
pub struct Database {
    /// What the carrier named.
    pub reference: DatabaseRef,
    config: tokio_postgres::Config,
    tls: Tls,
    /// What messages call it instead of the reference (`source`, `target`
    /// for a datastore move, whose URLs come from flags, not a carrier).
    label: Option<&'static str>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({})", self.describe())
    }
}

impl Database {
    /// Builds a target from a libpq URL or key=value string.
    pub fn from_url(reference: DatabaseRef, url: &str, database_name: Option<&str>) -> Result<Self, DbError> {
        let var = match &reference {
            DatabaseRef::Url { var } => var.clone(),
            other => other.to_string(),
        };
        let (rest, tls) = tls::split(url).map_err(|message| DbError::BadTls {
            var: var.clone(),
            message,
        })?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|source| DbError::BadUrl { var, source })?;
        config.ssl_mode(tls.mode.negotiation());
        if let Some(name) = database_name {
            config.dbname(name);
        }
        Ok(Self {
            reference,
            config,
            tls,
            label: None,
        })
    }

    /// Resolves `url:VAR` from the environment. Other references need a cluster.
    pub fn from_env(reference: &DatabaseRef, database_name: Option<&str>) -> Result<Self, DbError> {
        let DatabaseRef::Url { var } = reference else {
            return Err(DbError::MissingVar {
                var: reference.to_string(),
            });
        };
        let url = std::env::var(var).map_err(|_| DbError::MissingVar { var: var.clone() })?;
        Self::from_url(reference.clone(), &url, database_name)
    }

    /// The same database, called `label` in messages.
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = Some(label);
        self
    }

    /// The database name inside the server.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    /// `user@host:port/db` without secrets, for messages.
    pub fn describe(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(host_text)
            .unwrap_or_else(|| "localhost".into());
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("");
        match self.label {
            Some(label) => format!("{label} ({user}@{host}:{port}/{})", self.dbname()),
            None => format!("{} ({user}@{host}:{port}/{})", self.reference, self.dbname()),
        }
    }

    /// Opens a connection; the connection task runs on the runtime.
    /// With `sslmode` other than `disable`, over TLS as libpq would.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let connect_err = |source| DbError::Connect {
            database: self.describe(),
            source,
        };
        let client = match tls::connector(&self.tls) {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(connect_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls).await.map_err(connect_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// A session for bookkeeping: an idle one to the same target when one
    /// is kept (or is logging in), else a new connection. Hand it back with
    /// [`Session::release`] when done; dropped, it is closed.
    pub async fn session(&self) -> Result<Session, DbError> {
        self.session_for(session::Want::default()).await
    }

    /// A bookkeeping session that has the database's and role's defaults
    /// as they are since the last migration ended: for reading what lints
    /// the next one (the default schema).
    pub async fn current_session(&self) -> Result<Session, DbError> {
        self.session_for(session::Want::CURRENT).await
    }

    /// A session that logged in at most `within` ago, and after the last
    /// migration ended (an idle one, else a new connection): it has the
    /// database's and role's defaults as a new connection would, up to what
    /// someone else changed in that time. For a migration, which never
    /// hands it back.
    pub async fn fresh_session(&self, within: std::time::Duration) -> Result<Session, DbError> {
        let now = std::time::Instant::now();
        self.session_for(session::Want {
            born_after: Some(now.checked_sub(within).unwrap_or(now)),
            current: true,
        })
        .await
    }

    /// Logs in in the background and keeps the session idle, so that a
    /// later [`session`](Self::session) (or [`fresh_session`](Self::fresh_session))
    /// need not wait for a login, unless `count` sessions with the current
    /// defaults are idle or logging in already: at the start of a pass, for
    /// the databases it releases and claims (1), and while a checkpoint is
    /// taken, for the migration after it (2: the migration keeps its own,
    /// the bookkeeping goes on on the other). The statements `ahead` are
    /// prepared on it before it is lent ([`crate::runner::BOOKKEEPING_AHEAD`],
    /// [`crate::runner::MIGRATION_AHEAD`]). Best effort: a login that fails
    /// is logged at debug and the next session connects as usual.
    /// The login's task is returned (None when none began): it ends when
    /// the session is kept idle, or the login failed.
    pub fn prewarm_session(&self, count: usize, ahead: &'static [&'static str]) -> Option<tokio::task::JoinHandle<()>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let key = self.target_key();
        if session::available(&key, session::Want::CURRENT) >= count {
            return None;
        }
        let started = std::time::Instant::now();
        let done = session::logging_in(&key, started);
        let db = self.clone();
        Some(runtime.spawn(async move {
            match db.connect().await {
                Ok(client) => {
                    let conn = session::Conn::new(client);
                    conn.prepare_ahead(ahead).await;
                    session::put(key, conn, started)
                }
                Err(e) => {
                    tracing::debug!(database = %db.describe(), error = %e, "could not open a bookkeeping session ahead")
                }
            }
            let _ = done.send(true);
        }))
    }

    async fn session_for(&self, want: session::Want) -> Result<Session, DbError> {
        let key = self.target_key();
        let (conn, born) = match session::take(&key, want) {
            Ok(kept) => kept,
            Err(Some(mut login)) => {
                // A login under way (a prewarm): its session, once it is idle,
                // unless another holder took it first or it takes longer than
                // a login of one's own would be worth waiting for.
                let _ = tokio::time::timeout(session::LOGIN_WAIT, login.wait_for(|done| *done)).await;
                match session::take(&key, want) {
                    Ok(kept) => kept,
                    Err(_) => self.login().await?,
                }
            }
            Err(None) => self.login().await?,
        };
        Ok(Session::new(conn, key, born))
    }

    /// A new connection, born when its login began: what it reads of the
    /// defaults is at least that recent.
    async fn login(&self) -> Result<(session::Conn, std::time::Instant), DbError> {
        let started = std::time::Instant::now();
        Ok((session::Conn::new(self.connect().await?), started))
    }

    /// What tells two targets apart for reusing sessions: every connection
    /// setting, the password and TLS included. Kept in memory only.
    fn target_key(&self) -> String {
        format!("{:?}|{:?}|{:?}", self.config, self.config.get_password(), self.tls)
    }

    /// Cancels the query running on the connection of `token`, over TLS
    /// when the connection uses it (best effort: the caller has timed out).
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let result = match tls::connector(&self.tls) {
            Some(tls) => token.cancel_query(tls).await,
            None => token.cancel_query(NoTls).await,
        };
        if let Err(e) = result {
            tracing::warn!(database = %self.describe(), error = %e, "could not cancel the timed-out statement");
        }
    }

    /// The TLS settings (`sslmode`, `sslrootcert`).
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// A connection to another database of the same server (e.g. `postgres`).
    pub fn sibling(&self, dbname: &str) -> Self {
        let mut config = self.config.clone();
        config.dbname(dbname);
        Self {
            reference: self.reference.clone(),
            config,
            tls: self.tls.clone(),
            label: self.label,
        }
    }

    /// The same credentials and database at another server address.
    pub fn at(&self, host: &str, port: u16) -> Self {
        let mut config = tokio_postgres::Config::new();
        if let Some(u) = self.config.get_user() {
            config.user(u);
        }
        if let Some(p) = self.config.get_password() {
            config.password(p);
        }
        config.dbname(self.dbname()).host(host).port(port);
        // Another server (a drill copy on loopback): its own certificate, if any.
        config.ssl_mode(tokio_postgres::config::SslMode::Prefer);
        Self {
            reference: self.reference.clone(),
            config,
            tls: Tls::default(),
            label: self.label,
        }
    }

    /// Arguments and environment for libpq tools (`pg_dump`, `pg_basebackup`):
    /// the password travels in `PGPASSWORD`, never on the command line.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(h) = self.config.get_hosts().first() {
            env.push(("PGHOST", host_text(h)));
        }
        if let Some(p) = self.config.get_ports().first() {
            env.push(("PGPORT", p.to_string()));
        }
        if let Some(u) = self.config.get_user() {
            env.push(("PGUSER", u.to_string()));
        }
        if let Some(pw) = self.config.get_password() {
            env.push(("PGPASSWORD", String::from_utf8_lossy(pw).into_owned()));
        }
        env.push(("PGDATABASE", self.dbname().to_string()));
        env.push(("PGSSLMODE", self.tls.mode.as_str().to_string()));
        if let Some(root) = &self.tls.root_cert {
            env.push(("PGSSLROOTCERT", root.display().to_string()));
        }
        env
    }
}

fn host_text(h: &Host) -> String {
    match h {
        Host::Tcp(s) => s.clone(),
        Host::Unix(p) => p.display().to_string(),
    }
}

/// Ends every other client session on database `dbname` (not `keep_pid`)
/// and waits, up to ten seconds, until the server has: `pg_terminate_backend`
/// only signals. One at a time: a role may end only its own role's sessions
/// (or with pg_signal_backend), and one refusal must not leave the rest
/// running. backstop's own idle sessions are closed first, without being
/// signalled. `client` is connected to another database of the server.
/// Returns how many were ended and the roles of those still there.
pub async fn end_sessions_on(
    client: &Client,
    dbname: &str,
    keep_pid: i32,
) -> Result<(u64, Vec<String>), tokio_postgres::Error> {
    close_idle();
    const SESSIONS: &str = "SELECT pid, coalesce(usename::text, '?') FROM pg_stat_activity
          WHERE datname = $1 AND pid <> $2 AND backend_type = 'client backend'";
    let mut ended = 0;
    for row in client.query(SESSIONS, &[&dbname, &keep_pid]).await? {
        let pid: i32 = row.get(0);
        if let Ok(r) = client.query_one("SELECT pg_terminate_backend($1)", &[&pid]).await {
            ended += u64::from(r.get::<_, bool>(0));
        }
    }
    let mut left = Vec::new();
    for _ in 0..200 {
        left = client
            .query(SESSIONS, &[&dbname, &keep_pid])
            .await?
            .iter()
            .map(|r| r.get::<_, String>(1))
            .collect::<Vec<_>>();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    left.sort();
    left.dedup();
    Ok((ended, left))
}

/// Quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_describe_hide_the_password() {
        let db = Database::from_url(
            DatabaseRef::Url { var: "X".into() },
            "postgresql://app:s3cret@127.0.0.1:5433/shop",
            None,
        )
        .unwrap();
        assert!(!format!("{db:?}").contains("s3cret"));
        assert_eq!(db.describe(), "url:X (app@127.0.0.1:5433/shop)");
        assert!(db.libpq_env().contains(&("PGPASSWORD", "s3cret".to_string())));
    }

    #[test]
    fn unset_variable_is_named() {
        let err = Database::from_env(
            &DatabaseRef::Url {
                var: "BACKSTOP_TEST_UNSET_VAR".into(),
            },
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable BACKSTOP_TEST_UNSET_VAR (named by database url:BACKSTOP_TEST_UNSET_VAR) is not set"
        );
    }
}
