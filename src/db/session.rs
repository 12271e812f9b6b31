//! Reused connections for backstop's own bookkeeping (the owner claim, the
//! history, the catalog, the recovery point): a pass asks for a session many
//! times, and a new PostgreSQL backend costs a fork and a login each time.
//!
//! A session goes back for reuse only when its holder hands it back with
//! [`Session::release`], and only after `DISCARD ALL` succeeded on it.
//! PostgreSQL refuses `DISCARD ALL` inside a transaction block (open or
//! aborted), so a session that was left in a transaction is closed instead
//! of being lent to someone else; and it resets everything a holder may
//! have set (settings, role, temporary tables, advisory locks, prepared
//! statements). A session dropped without `release` (an early return, an
//! error, a cancelled future) is closed, as a plain connection would be.
//!
//! Idle sessions are kept for [`IDLE_FOR`] at most, [`IDLE_PER_TARGET`] per
//! target, so a long-running controller does not hold connections to
//! databases it is not working on. A session whose server went away
//! (restarted by a restore, or its runtime gone) is never lent: its
//! connection task has ended and [`Client::is_closed`] says so.
//!
//! Why not deadpool-postgres: its recycling runs the reset statements
//! without proving that no transaction is open, and a pool per target
//! would still need this registry of targets.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// How long an idle session is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// How many idle sessions are kept per target.
pub const IDLE_PER_TARGET: usize = 2;

type Idle = HashMap<String, Vec<(Client, Instant)>>;

fn idle() -> &'static Mutex<Idle> {
    static IDLE: OnceLock<Mutex<Idle>> = OnceLock::new();
    IDLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops idle sessions kept too long (their connection tasks end with them).
fn prune(idle: &mut Idle, now: Instant) {
    idle.retain(|_, v| {
        v.retain(|(c, at)| !c.is_closed() && now.duration_since(*at) < IDLE_FOR);
        !v.is_empty()
    });
}

/// An idle session to `key`, if one is kept and still open.
pub(super) fn take(key: &str) -> Option<Client> {
    let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
    prune(&mut idle, Instant::now());
    let client = idle.get_mut(key)?.pop().map(|(c, _)| c);
    client
}

fn put(key: String, client: Client) {
    let now = Instant::now();
    let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
    prune(&mut idle, now);
    let kept = idle.entry(key).or_default();
    if kept.len() < IDLE_PER_TARGET {
        kept.push((client, now));
    }
}

/// Closes every idle session (the end of a pass, or of the process).
pub fn close_idle() {
    idle().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// How many idle sessions are kept (for tests).
pub fn idle_count() -> usize {
    let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
    prune(&mut idle, Instant::now());
    idle.values().map(Vec::len).sum()
}

/// A connection lent for a while; derefs to the client.
pub struct Session {
    client: Client,
    key: String,
}

impl Session {
    pub(super) fn new(client: Client, key: String) -> Self {
        Self { client, key }
    }

    /// Hands the session back for reuse: reset with `DISCARD ALL`, or closed
    /// when that fails (a transaction was left open, or the server is gone).
    pub async fn release(self) {
        let Self { client, key } = self;
        if client.is_closed() || client.batch_execute("DISCARD ALL").await.is_err() {
            return;
        }
        // DISCARD ALL deallocated the statements the client cached for
        // looking types up.
        client.clear_type_cache();
        put(key, client);
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}
