//! Migration runners: the trait the run state machine drives, and the `sql`
//! runner on tokio-postgres (one transaction unless a statement cannot run in
//! one, a session advisory lock per database, the history table
//! `backstop.migration_history`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;

use crate::checkpoint::RecoveryPoint;
use crate::db::{Database, DbError};
use crate::manifests::Carrier;
use crate::owner::{Claim, Owner, OwnerError};

/// How recently the session a migration runs on may have logged in (see
/// [`crate::db::Database::fresh_session`]).
const FRESH_WITHIN: Duration = Duration::from_secs(2);

/// Failures to talk to the database (not failures of the migration itself,
/// which are reported in [`MigrateOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("another session held backstop's migration lock on {database} for longer than the migration's timeout ({seconds}s)")]
    LockBusy { database: String, seconds: u64 },
    #[error("{sessions} session(s) of an interrupted attempt on {database} did not end within a minute of pg_terminate_backend")]
    SessionsLinger { database: String, sessions: i64 },
    #[error("reading the catalog of {database} for the plan failed")]
    Catalog {
        database: String,
        source: crate::lint::catalog::CatalogError,
    },
    #[error("{step} failed")]
    Cluster {
        step: String,
        #[source]
        source: kube::Error,
    },
    #[error("query on {database} failed while {step}")]
    Query {
        database: String,
        step: &'static str,
        source: tokio_postgres::Error,
    },
}

/// A row of `backstop.migration_history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub id: String,
    pub checksum: String,
    pub phase: String,
    pub commit: String,
    pub run_id: String,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What happened when a migration ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOutcome {
    /// All statements ran in one transaction.
    pub transactional: bool,
    /// Statements that completed.
    pub statements_done: usize,
    pub statements_total: usize,
    /// The error, if the migration failed.
    pub error: Option<String>,
    /// Whether the database may hold changes from this migration. False only
    /// when a single transaction failed (PostgreSQL rolled it back).
    pub committed: bool,
    pub duration_ms: u64,
    /// Transaction ids (32-bit, as WAL decoding shows them) of what the
    /// migration committed: its writes are not lost writes of a restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub own_xids: Vec<u32>,
    /// Index of the statement that failed or was cut off (None: the failure
    /// was not a statement's, or nothing is known of which one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<usize>,
    /// What may still be running the migration after it failed: a Job that
    /// did not stop when told to (see `k8s::job`). Nothing is restored
    /// under it: the run holds the database for a person instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub still_running: Option<String>,
}

/// What a verify query returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOutcome {
    pub passed: bool,
    pub detail: String,
}

/// Identity of the run a migration belongs to (written into history).
#[derive(Debug, Clone)]
pub struct RunIdentity<'a> {
    pub run_id: &'a str,
    pub commit: &'a str,
    /// An attempt of this run began before (backstop stopped while it
    /// ran): what the runner started then is found again, never started
    /// twice (a Job is not created again).
    pub resumed: bool,
}

/// Executes migrations and answers questions about the database.
///
/// `migrate` returns `Err` only when nothing of the migration ran (no
/// connection, no lock, no history table): the engine treats that as a
/// transient fault. Anything that happened once statements started is an
/// [`MigrateOutcome`].
#[async_trait::async_trait]
pub trait Runner: Send + Sync {
    /// Whether this runner can execute migrations of `kind`.
    fn supports(&self, kind: crate::manifests::RunKind) -> bool {
        kind == crate::manifests::RunKind::Sql
    }
    /// The successful history row of migration `id`, if any.
    async fn applied(&self, db: &Database, id: &str) -> Result<Option<HistoryRow>, RunnerError>;
    /// Every successful history row (the newest per id), for the gate invariant.
    async fn history(&self, db: &Database) -> Result<Vec<HistoryRow>, RunnerError>;
    /// The most recent successful migration of `phase`, if any.
    async fn latest_applied(&self, db: &Database, phase: &str) -> Result<Option<HistoryRow>, RunnerError>;
    /// The server's major version (e.g. 15).
    async fn server_version(&self, db: &Database) -> Result<u32, RunnerError>;
    /// The catalog facts the analysis judges statements against, with the
    /// server's major version, over one connection; `None` where the runner
    /// does not read them (the analysis is then static). Only the relations
    /// and functions named in `names` (the migrations' words), when given,
    /// are looked up.
    async fn catalog(
        &self,
        db: &Database,
        names: Option<&[String]>,
    ) -> Result<Option<(u32, crate::lint::Catalog)>, RunnerError> {
        let _ = (db, names);
        Ok(None)
    }
    /// The recovery point: now, as the server sees it.
    async fn recovery_point(&self, db: &Database) -> Result<RecoveryPoint, RunnerError>;
    /// Runs the migration; a failing statement is an outcome, not an error.
    async fn migrate(&self, db: &Database, m: &Carrier, who: RunIdentity<'_>) -> Result<MigrateOutcome, RunnerError>;
    /// Runs the verify query.
    async fn verify(&self, db: &Database, sql: &str, timeout: Duration) -> Result<VerifyOutcome, RunnerError>;
    /// Ends what an interrupted attempt of `run_id` left running on the server
    /// (its sessions keep going when backstop is killed) and waits until they
    /// are gone, so that history then tells for certain whether it committed.
    /// Returns how many sessions were ended.
    async fn settle(&self, db: &Database, run_id: &str) -> Result<usize, RunnerError> {
        end_sessions(db, run_id).await
    }
    /// Claims the database for this instance ([`crate::owner`]).
    async fn claim(&self, db: &Database, me: &Owner) -> Result<Claim, OwnerError> {
        crate::owner::claim(db, me).await
    }
    /// Who owns the database now.
    async fn owner(&self, db: &Database) -> Result<Option<Owner>, OwnerError> {
        crate::owner::current(db).await
    }
    /// [`owner`](Self::owner), and [`history`](Self::history) when the
    /// owner could be read, as the gate's check asks them: the history
    /// counts only when no other instance owns the database.
    async fn owner_and_history(&self, db: &Database) -> Result<OwnerAndHistory, OwnerError> {
        let owner = self.owner(db).await?;
        Ok((owner, self.history(db).await))
    }
    /// Releases this instance's claim.
    async fn release(&self, db: &Database, state: &str) -> Result<(), OwnerError> {
        crate::owner::release(db, state).await
    }
}

/// Who owns a database, and its history as it could be read
/// ([`Runner::owner_and_history`]).
pub type OwnerAndHistory = (Option<Owner>, Result<Vec<HistoryRow>, RunnerError>);

/// The `application_name` of the sessions a run's migrations use.
pub fn session_name(run_id: &str) -> String {
    let mut name = format!("backstop run {run_id}");
    name.truncate(63);
    name
}

/// Terminates the sessions named for `run_id` and waits (up to a minute) until
/// the server has ended them. A session in the middle of `COMMIT` finishes
/// its commit first: PostgreSQL holds off the termination in that section.
pub async fn end_sessions(db: &Database, run_id: &str) -> Result<usize, RunnerError> {
    let client = db.connect().await?;
    let name = session_name(run_id);
    let ended: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .map_err(query_err(db, "ending the sessions of an interrupted attempt"))?
        .get(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await
            .map_err(query_err(
                db,
                "waiting for the sessions of an interrupted attempt to end",
            ))?
            .get(0);
        if left == 0 {
            return Ok(ended as usize);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(RunnerError::SessionsLinger {
                database: db.describe(),
                sessions: left,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Advisory lock key serializing backstop migrations on one database ("backstop" in ASCII).
const LOCK_KEY: i64 = 0x6261_636b_7374_6f70;

const INSERT_HISTORY: &str = "INSERT INTO backstop.migration_history (id, checksum, phase, commit, run_id, started_at, finished_at, success) VALUES ($1, $2, $3, $4, $5, $6, now(), $7)";

const SERVER_VERSION: &str = "SHOW server_version_num";
const HISTORY_TABLE: &str = "SELECT to_regclass('backstop.migration_history') IS NOT NULL";
const HISTORY_BY_ID: &str = "SELECT id, checksum, phase, commit, run_id, finished_at FROM backstop.migration_history WHERE id = $1 AND success ORDER BY seq DESC LIMIT 1";
const HISTORY_BY_PHASE: &str = "SELECT id, checksum, phase, commit, run_id, finished_at FROM backstop.migration_history WHERE phase = $1 AND success ORDER BY seq DESC LIMIT 1";
const HISTORY: &str = "SELECT DISTINCT ON (id) id, checksum, phase, commit, run_id, finished_at FROM backstop.migration_history WHERE success ORDER BY id, seq DESC";
const RECOVERY_POINT: &str = "SELECT clock_timestamp(), pg_current_wal_insert_lsn()::text";
const NAME_SESSION: &str = "SELECT set_config('application_name', $1, false)";
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
const CURRENT_XID: &str = "SELECT (txid_current() % 4294967296)::bigint";

/// What a pass asks a database before its checkpoint (release, claim,
/// history, server version, the catalog's settings) and after its
/// migration (owner, history, recovery point): prepared while the pass's
/// bookkeeping session logs in ([`Database::prewarm_session`]).
pub const BOOKKEEPING_AHEAD: &[&str] = &[
    crate::owner::RELEASE,
    crate::owner::SCHEMA_READY,
    crate::owner::CLAIM,
    crate::owner::OWNER,
    HISTORY_TABLE,
    HISTORY_BY_ID,
    HISTORY,
    SERVER_VERSION,
    crate::lint::catalog::SETTINGS,
    RECOVERY_POINT,
];

/// What a migration asks before its SQL runs: prepared while its session
/// logs in during the checkpoint. After the SQL, whose statements may
/// deallocate prepared ones (`DEALLOCATE ALL`, `DISCARD ALL`), backstop
/// sends only unnamed statements on that session (`query_typed`: one
/// round trip each, nothing kept on the server to lose).
pub const MIGRATION_AHEAD: &[&str] = &[NAME_SESSION, crate::owner::SCHEMA_READY, TRY_LOCK, HISTORY_BY_ID];

/// The `sql` runner.
#[derive(Debug, Default, Clone)]
pub struct SqlRunner;

fn query_err<'a>(db: &'a Database, step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RunnerError + 'a {
    move |source| RunnerError::Query {
        database: db.describe(),
        step,
        source,
    }
}

/// Database error text with PostgreSQL's detail, for outcomes and reports.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            m
        }
        None => e.to_string(),
    }
}

/// Records a finished migration in the history table (created if needed):
/// for runners whose work happens outside this connection (a Job).
pub async fn record_history(
    db: &Database,
    m: &Carrier,
    who: RunIdentity<'_>,
    started_at: DateTime<Utc>,
    success: bool,
) -> Result<(), RunnerError> {
    let client = db.session().await?;
    crate::owner::ensure_schema(&client)
        .await
        .map_err(query_err(db, "creating the history table"))?;
    client
        .execute(
            INSERT_HISTORY,
            &[
                &m.id,
                &m.checksum,
                &m.phase.as_str(),
                &who.commit,
                &who.run_id,
                &started_at,
                &success,
            ],
        )
        .await
        .map_err(query_err(db, "recording migration history"))?;
    client.release().await;
    Ok(())
}

/// The server's major version (e.g. 15).
async fn major_version(db: &Database, client: &crate::db::Session) -> Result<u32, RunnerError> {
    let v: String = client
        .query_one(SERVER_VERSION, &[])
        .await
        .map_err(query_err(db, "reading the server version"))?
        .get(0);
    Ok(v.parse::<u32>().unwrap_or(150000) / 10000)
}

/// The newest successful history row that `sql` selects with `$1` = `value`
/// ([`HISTORY_BY_ID`], [`HISTORY_BY_PHASE`]).
async fn history_row(db: &Database, sql: &str, value: &str) -> Result<Option<HistoryRow>, RunnerError> {
    let client = db.session().await?;
    // A claim on this session found the table already (it comes first).
    let exists: bool = client.schema_seen()
        || client
            .query_one(HISTORY_TABLE, &[])
            .await
            .map_err(query_err(db, "looking for the history table"))?
            .get::<_, bool>(0);
    if !exists {
        client.release().await;
        return Ok(None);
    }
    let row = client
        .query_opt(sql, &[&value])
        .await
        .map_err(query_err(db, "reading migration history"))?;
    client.release().await;
    Ok(row.as_ref().map(history_of))
}

/// Every successful history row (the newest per id), asked on `client`, a
/// session to `db`.
async fn history_on(db: &Database, client: &crate::db::Session) -> Result<Vec<HistoryRow>, RunnerError> {
    history_from(db, client.query(HISTORY, &[]).await)
}

/// The rows [`HISTORY`]'s answer holds (none when the table is not there).
fn history_from(
    db: &Database,
    rows: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<Vec<HistoryRow>, RunnerError> {
    match rows {
        Ok(rows) => Ok(rows.iter().map(history_of).collect()),
        // No history table yet: nothing applied.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(Vec::new()),
        Err(e) => Err(query_err(db, "reading migration history")(e)),
    }
}

/// A history row from `SELECT id, checksum, phase, commit, run_id, finished_at`.
fn history_of(r: &tokio_postgres::Row) -> HistoryRow {
    HistoryRow {
        id: r.get(0),
        checksum: r.get(1),
        phase: r.get(2),
        commit: r.get(3),
        run_id: r.get(4),
        finished_at: r.get(5),
    }
}

#[async_trait::async_trait]
impl Runner for SqlRunner {
    async fn applied(&self, db: &Database, id: &str) -> Result<Option<HistoryRow>, RunnerError> {
        history_row(db, HISTORY_BY_ID, id).await
    }

    async fn latest_applied(&self, db: &Database, phase: &str) -> Result<Option<HistoryRow>, RunnerError> {
        history_row(db, HISTORY_BY_PHASE, phase).await
    }

    async fn history(&self, db: &Database) -> Result<Vec<HistoryRow>, RunnerError> {
        let client = db.session().await?;
        let rows = history_on(db, &client).await;
        client.release().await;
        rows
    }

    /// Both from one snapshot of the database, in one round trip: a
    /// read-only repeatable-read transaction whose statements travel
    /// pipelined (unnamed, so nothing waits for a prepare; `biased`, so
    /// they are sent in this order). `SELECT 1` fixes the snapshot first;
    /// the owner's read runs under a savepoint, so that a database with no
    /// claim table yet (which fails it) still has its history read in the
    /// same snapshot. Read apart, another instance could claim, migrate
    /// and record a row between the two, and a row of a run that may yet
    /// be rolled back would count as applied under "nobody owns it".
    async fn owner_and_history(&self, db: &Database) -> Result<OwnerAndHistory, OwnerError> {
        let client = db.session().await?;
        let (begun, fixed, saved, owner, restored, history, ended) = tokio::join!(
            biased;
            client.query_once("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", &[]),
            client.query_once("SELECT 1", &[]),
            client.query_once("SAVEPOINT owner", &[]),
            client.query_once(crate::owner::OWNER, &[]),
            client.query_once("ROLLBACK TO SAVEPOINT owner", &[]),
            client.query_once(HISTORY, &[]),
            client.query_once("COMMIT", &[]),
        );
        let snapshot = begun.and(fixed).and(saved).and(restored).and(ended);
        client.release().await;
        match snapshot {
            Ok(_) => Ok((crate::owner::owner_from(db, owner)?, history_from(db, history))),
            Err(source) => Err(OwnerError::Query {
                database: db.describe(),
                step: "reading the owner and history in one snapshot",
                source,
            }),
        }
    }

    async fn server_version(&self, db: &Database) -> Result<u32, RunnerError> {
        let client = db.session().await?;
        let version = major_version(db, &client).await?;
        client.release().await;
        Ok(version)
    }

    async fn catalog(
        &self,
        db: &Database,
        names: Option<&[String]>,
    ) -> Result<Option<(u32, crate::lint::Catalog)>, RunnerError> {
        // The default schema as the next migration will see it.
        let client = db.current_session().await?;
        let (version, catalog) = tokio::join!(major_version(db, &client), crate::lint::Catalog::load(&client, names));
        let catalog = catalog.map_err(|e| RunnerError::Catalog {
            database: db.describe(),
            source: e,
        })?;
        let version = version?;
        client.release().await;
        Ok(Some((version, catalog)))
    }

    async fn recovery_point(&self, db: &Database) -> Result<RecoveryPoint, RunnerError> {
        let client = db.session().await?;
        let row = client
            .query_one(RECOVERY_POINT, &[])
            .await
            .map_err(query_err(db, "reading the recovery point"))?;
        client.release().await;
        Ok(RecoveryPoint {
            time: row.get(0),
            lsn: row.get(1),
            capture: None,
        })
    }

    async fn migrate(&self, db: &Database, m: &Carrier, who: RunIdentity<'_>) -> Result<MigrateOutcome, RunnerError> {
        let started = std::time::Instant::now();
        let started_at = Utc::now();
        // The session that logged in while the checkpoint was taken (or the
        // pass's idle one) when that was moments ago and after any earlier
        // migration ended, else a new connection; never given back: what
        // the migration leaves in its session (loaded modules, dblink
        // connections, prepared statements) goes with it. So it has the
        // defaults a new connection would have, up to what someone else
        // changed since its login.
        let client = db.fresh_session(FRESH_WITHIN).await?;
        // Named for the run, so that a restarted backstop can end what a
        // killed one left running before it decides what committed.
        client
            .query_one(NAME_SESSION, &[&session_name(who.run_id)])
            .await
            .map_err(query_err(db, "naming the session"))?;
        crate::owner::ensure_schema(&client)
            .await
            .map_err(query_err(db, "creating the history table"))?;
        // Serialize with any other backstop on this database, bounded by the timeout.
        let deadline = tokio::time::Instant::now() + m.timeout;
        loop {
            let got: bool = client
                .query_one(TRY_LOCK, &[&LOCK_KEY])
                .await
                .map_err(query_err(db, "taking the migration lock"))?
                .get(0);
            if got {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RunnerError::LockBusy {
                    database: db.describe(),
                    seconds: m.timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Under the lock: a migration another run (or an earlier attempt of
        // this one) already applied is not applied twice.
        let existing = client
            .query_opt(HISTORY_BY_ID, &[&m.id])
            .await
            .map_err(query_err(db, "reading migration history under the lock"));
        let existing = match existing {
            Ok(row) => row.as_ref().map(history_of).map(|h| (h.run_id, h.checksum)),
            Err(e) => {
                unlock(&client).await;
                return Err(e);
            }
        };
        if let Some((run_id, checksum)) = existing {
            unlock(&client).await;
            let same = checksum == m.checksum;
            return Ok(MigrateOutcome {
                transactional: m.statements.iter().all(|s| s.transactional),
                statements_done: 0,
                statements_total: m.statements.len(),
                error: (!same).then(|| {
                    format!(
                        "migration {} is already applied by run {run_id} with another checksum ({checksum})",
                        m.id
                    )
                }),
                committed: same,
                duration_ms: started.elapsed().as_millis() as u64,
                own_xids: Vec::new(),
                failed_at: None,
                still_running: None,
            });
        }
        // From here the migration's SQL may change the defaults: sessions
        // that logged in before its end (however it ends, a cancelled
        // future included) go on with the bookkeeping only.
        let _marked = crate::db::DefaultsChangedOnDrop;
        let timeout_ms = m.timeout.as_millis().to_string();
        client
            .batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
            .await
            .map_err(query_err(db, "setting statement_timeout"))?;

        let transactional = m.statements.iter().all(|s| s.transactional);
        let total = m.statements.len();
        let mut done = 0usize;
        let mut own_xids: Vec<u32> = Vec::new();
        let mut running: Option<usize> = None;
        let phase = m.phase.as_str();
        let history = |success: bool| {
            let client = &client;
            let (id, checksum) = (m.id.clone(), m.checksum.clone());
            let (commit, run_id) = (who.commit.to_string(), who.run_id.to_string());
            async move {
                client
                    .query_typed(
                        INSERT_HISTORY,
                        &[
                            (&id, Type::TEXT),
                            (&checksum, Type::TEXT),
                            (&phase, Type::TEXT),
                            (&commit, Type::TEXT),
                            (&run_id, Type::TEXT),
                            (&started_at, Type::TIMESTAMPTZ),
                            (&success, Type::BOOL),
                        ],
                    )
                    .await
            }
        };
        let work = async {
            if transactional {
                client.batch_execute("BEGIN").await?;
            }
            for s in &m.statements {
                let span = tracing::debug_span!("statement", origin = %s.origin, line = s.line);
                let _g = span.enter();
                running = Some(done);
                if !transactional && s.transactional {
                    // Its own transaction, as autocommit would run it, so that
                    // its xid is known (carriers hold no transaction control).
                    client.batch_execute("BEGIN").await?;
                    client.batch_execute(&s.sql).await?;
                    own_xids.push(current_xid(&client).await?);
                    client.batch_execute("COMMIT").await?;
                } else {
                    client.batch_execute(&s.sql).await?;
                }
                done += 1;
                running = None;
            }
            history(true).await?;
            if transactional {
                own_xids.push(current_xid(&client).await?);
                client.batch_execute("COMMIT").await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        let result = tokio::time::timeout(m.timeout, work).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(pg_message(&e)),
            Err(_) => {
                db.cancel(&client.cancel_token()).await;
                Some(format!("timed out after {}s", m.timeout.as_secs()))
            }
        };
        if error.is_some() && transactional {
            // A failed or cancelled transaction is rolled back by PostgreSQL; make
            // it explicit (or close the connection) and record the attempt.
            if client.batch_execute("ROLLBACK").await.is_ok() {
                let _ = history(false).await;
            }
        }
        unlock(&client).await;
        let failed_at = error.as_ref().and(running);
        Ok(MigrateOutcome {
            transactional,
            statements_done: done,
            statements_total: total,
            committed: error.is_none() || !transactional,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
            own_xids,
            failed_at,
            still_running: None,
        })
    }

    async fn verify(&self, db: &Database, sql: &str, timeout: Duration) -> Result<VerifyOutcome, RunnerError> {
        // Its own connection, as the migration's: the verify is the team's SQL.
        let client = db.connect().await?;
        client
            .batch_execute(&format!("SET statement_timeout = {}", timeout.as_millis()))
            .await
            .map_err(query_err(db, "setting statement_timeout"))?;
        // Read only: a verify that writes (a data-modifying CTE) fails instead of changing data.
        client
            .batch_execute("BEGIN TRANSACTION READ ONLY")
            .await
            .map_err(query_err(db, "starting the read-only verify transaction"))?;
        let result = client.simple_query(sql).await;
        let _ = client.batch_execute("ROLLBACK").await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                return Ok(VerifyOutcome {
                    passed: false,
                    detail: format!("verify query failed: {}", pg_message(&e)),
                })
            }
        };
        let firsts: Vec<Option<String>> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                _ => None,
            })
            .collect();
        let passed = firsts.iter().any(|v| v.as_deref() == Some("t"));
        let detail = if firsts.is_empty() {
            "verify returned no rows".to_string()
        } else {
            let shown: Vec<String> = firsts
                .iter()
                .take(5)
                .map(|v| v.clone().unwrap_or_else(|| "NULL".into()))
                .collect();
            format!(
                "verify returned {} row(s); first column: {}",
                firsts.len(),
                shown.join(", ")
            )
        };
        Ok(VerifyOutcome { passed, detail })
    }
}

/// The 32-bit id (as WAL decoding shows it) of the transaction open on
/// `client`. Unnamed: it runs after the migration's SQL.
async fn current_xid(client: &tokio_postgres::Client) -> Result<u32, tokio_postgres::Error> {
    let rows = client.query_typed(CURRENT_XID, &[]).await?;
    Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u32)
}

/// Lets go of the migration lock (best effort: the session ends soon
/// anyway). Unnamed: it runs after the migration's SQL.
async fn unlock(client: &tokio_postgres::Client) {
    let _ = client.query_typed(UNLOCK, &[(&LOCK_KEY, Type::INT8)]).await;
}
