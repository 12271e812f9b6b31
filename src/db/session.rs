//! Reused connections for backstop's own bookkeeping (the owner claim, the
//! history, the catalog, the recovery point): a pass asks for a session many
//! times, and a new PostgreSQL backend costs a fork and a login each time.
//! Only backstop's own SQL runs on a session that goes back for reuse. A
//! migration may take one that logged in moments ago ([`Database::fresh_session`])
//! and never gives it back: what it leaves in it goes with it. Every idle
//! session is closed after a migration (it may have changed the database's
//! defaults, which only new sessions see).
//!
//! [`Database::fresh_session`]: super::Database::fresh_session
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
//! would still need this registry of targets.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

/// How long an idle session is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// How many idle sessions are kept per target.
pub const IDLE_PER_TARGET: usize = 2;

/// How many prepared statements a connection keeps; past that they are
/// all let go (backstop's own number about two dozen).
const STATEMENTS_KEPT: usize = 64;

/// A connection with the statements prepared on it, by their SQL.
pub(super) struct Conn {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            statements: Mutex::default(),
        }
    }

    pub(super) fn forget_statements(&mut self) {
        self.statements.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// An idle session: since when it is idle, and when it logged in.
struct Kept {
    conn: Conn,
    idle_since: Instant,
    born: Instant,
}

type Idle = HashMap<String, Vec<Kept>>;

fn idle() -> &'static Mutex<Idle> {
    static IDLE: OnceLock<Mutex<Idle>> = OnceLock::new();
    IDLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops idle sessions kept too long (their connection tasks end with them).
fn prune(idle: &mut Idle, now: Instant) {
    idle.retain(|_, v| {
        v.retain(|k| !k.conn.client.is_closed() && now.duration_since(k.idle_since) < IDLE_FOR);
        !v.is_empty()
    });
}

/// An idle session to `key` (with its login time), if one is kept, still
/// open, and logged in after `born_after` when given.
pub(super) fn take(key: &str, born_after: Option<Instant>) -> Option<(Conn, Instant)> {
    let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
    prune(&mut idle, Instant::now());
    let kept = idle.get_mut(key)?;
    let i = kept
        .iter()
        .rposition(|k| born_after.is_none_or(|after| k.born > after))?;
    let k = kept.remove(i);
    Some((k.conn, k.born))
}

/// When [`close_idle`] last ran (after a migration).
fn closed_at() -> &'static Mutex<Option<Instant>> {
    static CLOSED: OnceLock<Mutex<Option<Instant>>> = OnceLock::new();
    CLOSED.get_or_init(|| Mutex::new(None))
}

pub(super) fn put(key: String, conn: Conn, born: Instant) {
    let now = Instant::now();
    {
        // The idle lock first, as in `close_idle`: the check and the insert
        // are one step against it.
        let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
        // One that began its login before the last migration ended was out
        // (lent) when that migration closed the idle ones: it may hold the
        // defaults the migration changed, and a later migration may take
        // what is kept here.
        if closed_at()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|closed| born <= closed)
        {
            return;
        }
        prune(&mut idle, now);
        let kept = idle.entry(key).or_default();
        if kept.len() >= IDLE_PER_TARGET {
            return;
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
            prune(&mut idle().lock().unwrap_or_else(|e| e.into_inner()), Instant::now());
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
/// (after a migration: they may hold the defaults it changed).
pub fn close_idle() {
    let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
    *closed_at().lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    idle.clear();
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
        if result.is_err() {
            self.conn
                .statements
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(sql);
        }
        result
    }

    /// [`Client::query`] of backstop's own `sql`, prepared once per connection.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        let result = self.conn.client.query(&st, params).await;
        self.forget_on_error(sql, result)
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
