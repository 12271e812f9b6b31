//! Reused connections for backstop's own bookkeeping (the owner claim, the
//! history, the catalog, the recovery point): a pass asks for a session many
//! times, and a new PostgreSQL backend costs a fork and a login each time.
//! Only backstop's own SQL runs on a session that goes back for reuse. A
//! migration takes one that logged in moments ago ([`Database::fresh_session`])
//! and never gives it back: what it leaves in it (loaded modules, dblink
//! connections, prepared statements) goes with it.
//!
//! [`Database::fresh_session`]: super::Database::fresh_session
//!
//! A migration may change the database's or its role's defaults (`ALTER
//! DATABASE … SET`), which only sessions that log in afterwards see. Its end
//! is marked ([`defaults_changed`]): the sessions that logged in before it
//! stay for bookkeeping, whose statements name everything they touch, but
//! are never lent where the defaults count, to a later migration or to the
//! catalog read that lints one ([`Database::current_session`]). So a pass
//! with one migration logs in twice, both off its critical path: the
//! bookkeeping session ([`Database::prewarm_session`] when the pass starts)
//! and the migration's own (prewarmed while the checkpoint is taken), and
//! the bookkeeping after the migration goes on on the first one, with the
//! statements it has prepared. A restore ends every session
//! ([`close_idle`]): none that logged in before it is lent again.
//!
//! [`Database::current_session`]: super::Database::current_session
//! [`Database::prewarm_session`]: super::Database::prewarm_session
//!
//! A session goes back for reuse only when its holder hands it back with
//! [`Session::release`], and only when it is outside any transaction block
//! (`transaction_timestamp() = statement_timestamp()` holds only for a
//! statement's own implicit transaction; in an aborted one the check fails)
//! and after its session state is reset (settings, role, cursors,
//! listeners, advisory locks, temporary tables, sequence caches). It is
//! not `DISCARD ALL`: that also deallocates the statements the client keeps
//! prepared for looking types up. A session dropped without `release` (an
//! early return, an error, a cancelled future) is closed, as a plain
//! connection would be.
//!
//! Idle sessions are kept for [`IDLE_FOR`] at most (a timer closes them),
//! [`IDLE_PER_TARGET`] per target, so a long-running controller does not
//! hold connections to databases it is not working on. A session whose
//! server went away (restarted by a restore, or its runtime gone) is never
//! lent: its connection task has ended and [`Client::is_closed`] says so.
//! A holder that finds no idle session waits for a login already under way
//! to the same target (a prewarm) rather than starting a second one.
//!
//! backstop's own statements go through [`Session::query`] and its
//! siblings, which keep each statement prepared on the connection (the
//! statements travel with it between holders): a pass asks the same few
//! questions several times, and preparing is a round trip of its own. The
//! reset runs only when a holder reached the client itself (anything but
//! those methods: a transaction, a batch, a setting); a statement run by
//! those methods ends in its own implicit transaction and changes no
//! session state. A cached statement that fails is prepared afresh next
//! time.
//!
//! Why not deadpool-postgres: its recycling runs the reset statements
//! without checking that no transaction is open, and a pool per target
//! would still need this registry of targets, logins under way and the
//! marks above.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

/// How long an idle session is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// How many idle sessions are kept per target.
pub const IDLE_PER_TARGET: usize = 2;

/// How long a holder waits for a login under way before it logs in itself.
pub const LOGIN_WAIT: Duration = Duration::from_secs(5);

/// How many prepared statements a connection keeps; past that they are
/// all let go (backstop's own number about two dozen).
const STATEMENTS_KEPT: usize = 64;

/// A connection with the statements prepared on it, by their SQL.
pub(super) struct Conn {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
    /// backstop's tables were found on this connection (see [`Session::schema_seen`]).
    schema_seen: std::sync::atomic::AtomicBool,
}

impl Conn {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            statements: Mutex::default(),
            schema_seen: Default::default(),
        }
    }

    /// Prepares `sqls` in one flight (concurrent requests travel pipelined
    /// on the connection) and keeps those that prepared: a session logged in
    /// ahead asks its first questions in one round trip each, not two. One
    /// that fails (a table not there yet) is prepared at its first use, as
    /// any other statement is.
    ///
    /// Whether backstop's tables are there ([`crate::owner::SCHEMA_READY`],
    /// the first thing a holder asks) is asked in the same flight rather
    /// than prepared: when they are, the holder does not ask again
    /// ([`Session::schema_seen`]).
    pub(super) async fn prepare_ahead(&self, sqls: &[&str]) {
        let probe = sqls.contains(&crate::owner::SCHEMA_READY);
        let sqls: Vec<&str> = sqls
            .iter()
            .copied()
            .filter(|sql| *sql != crate::owner::SCHEMA_READY)
            .collect();
        let (prepared, ready) = tokio::join!(
            futures::future::join_all(sqls.iter().map(|sql| self.client.prepare(sql))),
            async {
                match probe {
                    true => self.client.query_typed(crate::owner::SCHEMA_READY, &[]).await.ok(),
                    false => None,
                }
            }
        );
        if ready.is_some_and(|rows| rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()) == Some(true)) {
            self.schema_seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut kept = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        for (sql, st) in sqls.iter().zip(prepared) {
            match st {
                Ok(st) => {
                    kept.insert(sql.to_string(), st);
                }
                Err(e) => tracing::debug!(error = %e, sql, "statement not prepared ahead"),
            }
        }
    }
}

/// An idle session: since when it is idle, and when it logged in.
struct Kept {
    conn: Conn,
    idle_since: Instant,
    born: Instant,
}

/// Every session this process keeps, and what decides which may be lent.
#[derive(Default)]
struct Registry {
    idle: HashMap<String, Vec<Kept>>,
    /// Logins under way for [`Registry::idle`], by target: when each began,
    /// and what says it ended.
    logging_in: HashMap<String, Vec<(Instant, watch::Receiver<bool>)>>,
    /// When [`close_idle`] last ran (a restore): nothing that logged in
    /// before is kept.
    closed_at: Option<Instant>,
    /// When [`defaults_changed`] last ran (a migration ended).
    defaults_at: Option<Instant>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Drops idle sessions kept too long (their connection tasks end with them).
    fn prune(&mut self, now: Instant) {
        self.idle.retain(|_, v| {
            v.retain(|k| !k.conn.client.is_closed() && now.duration_since(k.idle_since) < IDLE_FOR);
            !v.is_empty()
        });
        // Ended, or its task gone without saying (the runtime shut down).
        self.logging_in.retain(|_, v| {
            v.retain(|(_, done)| !*done.borrow() && done.has_changed().is_ok());
            !v.is_empty()
        });
    }
}

/// Which sessions a holder may take: any, or only those that logged in
/// after the instant given, and after the last change of defaults when
/// `current` is set.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Want {
    pub born_after: Option<Instant>,
    pub current: bool,
}

impl Want {
    /// Any session with the current defaults.
    pub const CURRENT: Want = Want {
        born_after: None,
        current: true,
    };

    fn admits(&self, born: Instant, reg: &Registry) -> bool {
        self.born_after.is_none_or(|after| born > after)
            && reg.closed_at.is_none_or(|closed| born > closed)
            && (!self.current || reg.defaults_at.is_none_or(|changed| born > changed))
    }

    /// Whether any session serves: the bookkeeping's, which takes the
    /// oldest (the one whose statements are prepared, and not the one
    /// logged in for a migration).
    fn any(&self) -> bool {
        self.born_after.is_none() && !self.current
    }
}

/// An idle session to `key` (with its login time) that `want` admits, if
/// one is kept and still open; else what ends a login under way that it
/// would admit.
pub(super) fn take(key: &str, want: Want) -> Result<(Conn, Instant), Option<watch::Receiver<bool>>> {
    let mut reg = registry();
    reg.prune(Instant::now());
    // By login time (the list is in the order sessions came back).
    let pick = reg.idle.get(key).and_then(|kept| {
        let admitted = kept.iter().enumerate().filter(|(_, k)| want.admits(k.born, &reg));
        match want.any() {
            true => admitted.min_by_key(|(_, k)| k.born),
            false => admitted.max_by_key(|(_, k)| k.born),
        }
        .map(|(i, _)| i)
    });
    if let (Some(i), Some(kept)) = (pick, reg.idle.get_mut(key)) {
        let k = kept.remove(i);
        return Ok((k.conn, k.born));
    }
    Err(reg
        .logging_in
        .get(key)
        .and_then(|v| v.iter().rev().find(|(born, _)| want.admits(*born, &reg)))
        .map(|(_, done)| done.clone()))
}

/// How many sessions to `key` that `want` admits are idle or logging in.
pub(super) fn available(key: &str, want: Want) -> usize {
    let mut reg = registry();
    reg.prune(Instant::now());
    let reg = &*reg;
    let idle = reg
        .idle
        .get(key)
        .map_or(0, |v| v.iter().filter(|k| want.admits(k.born, reg)).count());
    let coming = reg
        .logging_in
        .get(key)
        .map_or(0, |v| v.iter().filter(|(born, _)| want.admits(*born, reg)).count());
    idle + coming
}

/// Records a login to `key` that began at `born`; the sender says when it
/// ended (kept idle, or failed).
pub(super) fn logging_in(key: &str, born: Instant) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    registry()
        .logging_in
        .entry(key.to_string())
        .or_default()
        .push((born, rx));
    tx
}

pub(super) fn put(key: String, conn: Conn, born: Instant) {
    let now = Instant::now();
    {
        let mut reg = registry();
        // One that logged in before the last restore was out (lent) when the
        // restore ended the sessions: its server may be another now.
        if reg.closed_at.is_some_and(|closed| born <= closed) {
            return;
        }
        reg.prune(now);
        let defaults_at = reg.defaults_at;
        let kept = reg.idle.entry(key).or_default();
        if kept.len() >= IDLE_PER_TARGET {
            // A session with the current defaults takes the place of one
            // from before the last migration (which serves less).
            let stale = |k: &Kept| defaults_at.is_some_and(|changed| k.born <= changed);
            match kept.iter().position(stale) {
                Some(i) if defaults_at.is_none_or(|changed| born > changed) => {
                    kept.remove(i);
                }
                _ => return,
            }
        }
        kept.push(Kept {
            conn,
            idle_since: now,
            born,
        });
    }
    // Closed when nobody took it in time, even if nobody asks again.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async {
            tokio::time::sleep(IDLE_FOR + Duration::from_millis(10)).await;
            registry().prune(Instant::now());
        });
    }
}

/// Ends what a holder may have set in its session, after checking that it
/// is outside any transaction block: true when the session may be lent.
const RESET: &str = "SELECT transaction_timestamp() = statement_timestamp();
    RESET ALL; SET SESSION AUTHORIZATION DEFAULT; CLOSE ALL; UNLISTEN *;
    SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// How long the reset may take before the session is closed instead.
const RESET_WITHIN: Duration = Duration::from_secs(2);

async fn reset(client: &Client) -> bool {
    let Ok(Ok(messages)) = tokio::time::timeout(RESET_WITHIN, client.simple_query(RESET)).await else {
        return false;
    };
    // The first row is the transaction check.
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0) == Some("t")),
        _ => None,
    }) == Some(true)
}

/// Closes every idle session, and every one lent now when it comes back
/// (a restore ended them, or is about to).
pub fn close_idle() {
    let mut reg = registry();
    let now = Instant::now();
    reg.closed_at = Some(now);
    reg.defaults_at = Some(now);
    reg.idle.clear();
    // A login under way ends refused (it began before this): nobody waits for it.
    reg.logging_in.clear();
}

/// Calls [`defaults_changed`] when dropped: held while a migration's SQL
/// runs, so that its end is marked however it ends (a failure, a timeout,
/// a future dropped when a controller loses its lease).
pub struct DefaultsChangedOnDrop;

impl Drop for DefaultsChangedOnDrop {
    fn drop(&mut self) {
        defaults_changed();
    }
}

/// Marks the end of a migration: the sessions that logged in before it
/// may miss the defaults it set, and are no longer lent where those count
/// (a migration, the catalog read that lints one). They stay for the rest
/// of the bookkeeping.
pub fn defaults_changed() {
    registry().defaults_at = Some(Instant::now());
}

/// A connection lent for a while. backstop's own statements go through
/// its methods; it derefs to the client for anything else, and then it is
/// reset when given back.
pub struct Session {
    conn: Conn,
    /// The holder reached the client itself (see the module's doc).
    touched: std::sync::atomic::AtomicBool,
    key: String,
    born: Instant,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Session {
    pub(super) fn new(conn: Conn, key: String, born: Instant) -> Self {
        Self {
            conn,
            touched: std::sync::atomic::AtomicBool::new(false),
            key,
            born,
        }
    }

    /// `sql` prepared on this connection: kept from an earlier use, else
    /// prepared now and kept.
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(st) = self.conn.statements.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return Ok(st.clone());
        }
        let st = self.conn.client.prepare(sql).await?;
        let mut kept = self.conn.statements.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= STATEMENTS_KEPT {
            kept.clear();
        }
        kept.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    /// What a failed statement leaves: it is prepared afresh next time
    /// (a changed table can make a kept plan fail).
    fn forget_on_error<T>(
        &self,
        sql: &str,
        result: Result<T, tokio_postgres::Error>,
    ) -> Result<T, tokio_postgres::Error> {
        if let Err(e) = &result {
            // A table or schema gone (a migration dropped backstop's):
            // the next holder looks for them again.
            use tokio_postgres::error::SqlState;
            if matches!(e.code(), Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME) {
                self.conn.schema_seen.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            self.conn
                .statements
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(sql);
        }
        result
    }

    /// Whether backstop's tables were found (or made) on this connection
    /// before: a claim need not look again. A restore ends the connection
    /// (no session from before it is lent again), and a migration that
    /// dropped them makes the next statement on them fail, as any missing
    /// table does.
    pub fn schema_seen(&self) -> bool {
        self.conn.schema_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that backstop's tables are there ([`schema_seen`](Self::schema_seen)).
    pub fn see_schema(&self) {
        self.conn.schema_seen.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Client::query`] of backstop's own `sql`, prepared once per connection.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        let result = self.conn.client.query(&st, params).await;
        self.forget_on_error(sql, result)
    }

    /// [`Client::query_typed`]: `sql` asked once, unnamed, in one round
    /// trip (nothing is prepared or kept on the connection, and the
    /// session is not marked as reached into, so it is lent again without
    /// a reset). For a question a pass asks once, such as the catalog's.
    pub async fn query_once(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), tokio_postgres::types::Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.conn.client.query_typed(sql, params).await
    }

    /// [`Client::query_one`] of backstop's own `sql`, prepared once per connection.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        let result = self.conn.client.query_one(&st, params).await;
        self.forget_on_error(sql, result)
    }

    /// [`Client::query_opt`] of backstop's own `sql`, prepared once per connection.
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        let result = self.conn.client.query_opt(&st, params).await;
        self.forget_on_error(sql, result)
    }

    /// [`Client::execute`] of backstop's own `sql`, prepared once per connection.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        let result = self.conn.client.execute(&st, params).await;
        self.forget_on_error(sql, result)
    }

    /// Hands the session back for reuse; closed instead when the server is
    /// gone, or, when the holder reached the client itself, when it is
    /// inside a transaction block (open or aborted) or the reset fails or
    /// takes too long.
    pub async fn release(self) {
        let Self {
            conn,
            touched,
            key,
            born,
        } = self;
        if conn.client.is_closed() || (touched.into_inner() && !reset(&conn.client).await) {
            return;
        }
        put(key, conn, born);
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.touched.store(true, std::sync::atomic::Ordering::Relaxed);
        &self.conn.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        *self.touched.get_mut() = true;
        &mut self.conn.client
    }
}
