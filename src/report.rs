//! The evidence report (go/no-go package) of a run: one structure, written as
//! JSON and rendered as Markdown with the same content. It is the body of a
//! revert pull request and what `backstop report` prints.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointRecord, RecoveryPoint, RestoreRecord};
use crate::run::{Outcome, RevertRecord, RunRecord, Step};

/// One migration as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationEvidence {
    pub id: String,
    pub file: String,
    pub line: usize,
    pub database: String,
    pub phase: String,
    pub order: String,
    pub checksum: String,
    pub statements: usize,
    pub transactional: bool,
    pub verify: Option<String>,
    pub timeout_seconds: u64,
}

/// The statement a migration failed at, and the error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedStatement {
    pub migration: String,
    /// `file#data-key` (or `file`) and the 1-based line the statement starts at.
    pub origin: String,
    pub line: usize,
    pub sql: String,
    pub error: String,
    /// Statements that completed before it, of all.
    pub done: usize,
    pub total: usize,
    /// They ran in one transaction, which PostgreSQL rolled back.
    #[serde(default)]
    pub rolled_back: bool,
}

impl FailedStatement {
    /// The statement the failed migration outcome points at, if any.
    fn of(run: &RunRecord) -> Option<Self> {
        run.migrate_results.iter().find_map(|(id, o)| {
            let error = o.error.clone()?;
            let m = run.migrations.iter().find(|m| &m.id == id)?;
            // Only a statement the runner saw fail: not an interrupted run
            // (unknown how far it got) nor a checksum refusal.
            let st = m.statements.get(o.failed_at?)?;
            Some(FailedStatement {
                migration: id.clone(),
                origin: st.origin.clone(),
                line: st.line,
                sql: st.sql.trim().to_string(),
                error,
                done: o.statements_done,
                total: o.statements_total,
                rolled_back: o.transactional,
            })
        })
    }
}

/// The report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run: String,
    /// What a person must do now (finished runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_steps: Option<String>,
    /// `Succeeded`, `RolledBack`, `Failed`, or the phase of an unfinished run.
    pub outcome: String,
    pub commit: String,
    pub subject: String,
    pub author: String,
    pub upstream_branch: String,
    pub gate_branch: String,
    pub gate_before: String,
    pub plan_hash: String,
    pub migrations: Vec<MigrationEvidence>,
    pub already_applied: Vec<String>,
    /// Findings of the safety analysis.
    pub findings: Vec<crate::lint::Finding>,
    /// Catalog facts that removed a finding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<String>,
    pub approvals: Vec<String>,
    /// The soak of each contract's expand when the run was planned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soak: Vec<crate::policy::SoakEvidence>,
    pub checkpoint: Option<CheckpointRecord>,
    pub recovery_point: Option<RecoveryPoint>,
    pub steps: Vec<Step>,
    pub verify: Vec<(String, bool, String)>,
    pub health: Vec<String>,
    pub failure: Option<String>,
    /// The statement a migration failed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_statement: Option<FailedStatement>,
    pub remediation: Option<String>,
    pub restore: Option<RestoreRecord>,
    /// The run's own replay of the lost writes (`backstop.dev/replay: auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_writes_replay: Option<crate::capture::replay::AutoReplay>,
    pub revert: Option<RevertRecord>,
    pub remediation_errors: Vec<String>,
    /// A person took the failed run over (`backstop ack`).
    pub acknowledged: Option<crate::run::Acknowledged>,
    /// A person had the data the restore set aside deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside_deleted: Option<crate::run::Acknowledged>,
    /// From the state the database went back to, until the restore started.
    pub data_loss_window: Option<DataLossWindow>,
    pub rollback_conditions: Vec<String>,
}

/// Writes between `from` and `to` are lost by the restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataLossWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub seconds: f64,
    /// The application's transactions and rows committed in it, when the
    /// run captured them ([`crate::capture`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
}

impl Report {
    /// Builds the report of `run` as it stands.
    pub fn from_run(run: &RunRecord) -> Self {
        let data_loss_window = run.restore.as_ref().map(|r| {
            // A dump holds the state when it was taken; PITR goes to the recovery point.
            let from = match (&run.checkpoint, &run.recovery_point) {
                (Some(c), _) if c.backend == "dump" => c.started_at,
                (_, Some(p)) => p.time,
                (Some(c), None) => c.completed_at,
                (None, None) => r.started_at,
            };
            // It ends when the old server stopped taking writes (when the
            // backend knows it), not when the restore began.
            let to = r.writes_stopped_at.unwrap_or(r.started_at);
            let kept = match &r.lost_writes {
                Some(crate::capture::Captured::Kept(w)) => Some(w),
                _ => None,
            };
            DataLossWindow {
                from,
                to,
                seconds: (to - from).num_milliseconds() as f64 / 1000.0,
                transactions: kept.map(|w| w.transactions),
                rows: kept.map(|w| w.rows.values().flat_map(|ops| ops.values()).sum()),
            }
        });
        let timeout = run.migrations.first().map(|m| m.timeout.as_secs()).unwrap_or(0);
        let mut rollback_conditions = vec![
            format!("any migration statement fails, or migrate + verify exceed {timeout}s"),
            "a verify query returns no row whose first column is true".to_string(),
            "the gate cannot be moved to the commit".to_string(),
            "the target is not healthy at the new revision after promotion".to_string(),
        ];
        rollback_conditions.push(match &run.checkpoint {
            Some(c) => format!(
                "data is restored from the {} checkpoint when anything was committed",
                c.backend
            ),
            None => "no checkpoint: committed changes cannot be restored automatically".to_string(),
        });
        Report {
            run: run.id.clone(),
            next_steps: run
                .outcome()
                .map(|o| crate::run::summary::next_step(run, o, "this report")),
            outcome: match run.outcome() {
                Some(Outcome::Succeeded) => "Succeeded".into(),
                Some(Outcome::RolledBack) => "RolledBack".into(),
                Some(Outcome::Failed) => "Failed".into(),
                Some(Outcome::Deferred) => "Deferred".into(),
                None => run.phase.to_string(),
            },
            commit: run.commit.sha.clone(),
            subject: run.commit.subject.clone(),
            author: run.commit.author.clone(),
            upstream_branch: run.upstream_branch.clone(),
            gate_branch: run.gate_branch.clone(),
            gate_before: run.gate_before.clone(),
            plan_hash: run.plan_hash.clone(),
            migrations: run
                .migrations
                .iter()
                .map(|m| MigrationEvidence {
                    id: m.id.clone(),
                    file: m.file.clone(),
                    line: m.line,
                    database: m.database.to_string(),
                    phase: m.phase.to_string(),
                    order: m.order.to_string(),
                    checksum: m.checksum.clone(),
                    statements: m.statements.len(),
                    transactional: m.statements.iter().all(|s| s.transactional),
                    verify: m.verify.clone(),
                    timeout_seconds: m.timeout.as_secs(),
                })
                .collect(),
            already_applied: run.already_applied.clone(),
            findings: run.findings.clone(),
            facts: run.facts.clone(),
            approvals: run.approvals.clone(),
            soak: run.soak.clone(),
            checkpoint: run.checkpoint.clone(),
            recovery_point: run.recovery_point.clone(),
            steps: run.steps.clone(),
            verify: run
                .verify_results
                .iter()
                .map(|(id, v)| (id.clone(), v.passed, v.detail.clone()))
                .collect(),
            health: run
                .steps
                .iter()
                .filter(|s| s.name == "health")
                .map(|s| s.detail.clone())
                .collect(),
            failure: run.failure.as_ref().map(|f| format!("{} in {}", f.message, f.phase)),
            failed_statement: FailedStatement::of(run),
            remediation: run.restore_decision.clone(),
            restore: run.restore.clone(),
            lost_writes_replay: run.lost_writes_replay.clone(),
            revert: run.revert.clone(),
            remediation_errors: run.remediation_errors.clone(),
            acknowledged: run.acknowledged.clone(),
            set_aside_deleted: run.set_aside_deleted.clone(),
            data_loss_window,
            rollback_conditions,
        }
    }
}

/// The Markdown rendering.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let verdict = match r.outcome.as_str() {
        "Succeeded" => "GO: migration applied and verified",
        "RolledBack" => "NO-GO: failed and rolled back (code and data)",
        "Failed" => "NO-GO: failed and remediation is incomplete; a person must act",
        _ => "in progress",
    };
    let _ = writeln!(s, "# backstop run {}\n", r.run);
    let _ = writeln!(s, "**Outcome: {}** ({verdict})\n", r.outcome);
    if let Some(next) = &r.next_steps {
        let _ = writeln!(s, "## Next steps\n\n{next}\n");
        let local = r.checkpoint.as_ref().is_some_and(|c| c.backend == "local");
        match (&r.restore, &r.set_aside_deleted) {
            (Some(restore), None) if !local => {
                let _ = writeln!(
                    s,
                    "What the restore replaced is kept: {}. backstop never deletes it; remove it yourself once nobody needs those writes.\n",
                    restore.kept
                );
            }
            (Some(restore), None) => {
                let _ = writeln!(
                    s,
                    "The state from before the restore is kept at `{}`: it is the only copy of the writes made after the checkpoint (start a server on a copy of it to read them). Retention never deletes it; once nobody needs those writes, `backstop prune --set-aside {}` does.\n",
                    restore.kept, r.run
                );
            }
            (Some(restore), Some(by)) => {
                let _ = writeln!(
                    s,
                    "The state from before the restore, kept at `{}`, was deleted by {} at {} (`backstop prune --set-aside`).\n",
                    restore.kept,
                    by.by,
                    by.at.to_rfc3339()
                );
            }
            _ => {}
        }
    }
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| commit | `{}` {} |", r.commit, r.subject.replace('|', "\\|"));
    let _ = writeln!(s, "| author | {} |", r.author);
    let _ = writeln!(
        s,
        "| branches | upstream `{}`, gate `{}` (was `{}`) |",
        r.upstream_branch,
        r.gate_branch,
        short(&r.gate_before)
    );
    let _ = writeln!(s, "| plan hash | `{}` |", r.plan_hash);
    let approvals = if r.approvals.is_empty() {
        "none".to_string()
    } else {
        r.approvals.join(", ")
    };
    let _ = writeln!(s, "| approvals | {approvals} |\n");

    let _ = writeln!(s, "## Migrations\n");
    let _ = writeln!(
        s,
        "| id | file | database | phase | order | statements | transaction | checksum |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for m in &r.migrations {
        let _ = writeln!(
            s,
            "| {} | {}:{} | {} | {} | {} | {} | {} | `{}` |",
            m.id,
            m.file,
            m.line,
            m.database,
            m.phase,
            m.order,
            m.statements,
            if m.transactional {
                "one"
            } else {
                "none (non-transactional)"
            },
            short(&m.checksum)
        );
    }
    for k in &r.soak {
        let _ = writeln!(
            s,
            "\nSoak: contract {} waited for expand {}, applied {}: it had soaked {} when this run was planned (needs {}).",
            k.migration,
            k.expand,
            k.applied_at.to_rfc3339(),
            crate::status::span(k.soaked_seconds as f64),
            crate::status::span(k.required_seconds as f64)
        );
    }
    if !r.already_applied.is_empty() {
        let _ = writeln!(s, "\nAlready applied (skipped): {}", r.already_applied.join(", "));
    }
    if r.findings.is_empty() {
        let _ = writeln!(s, "\nLint findings: none\n");
    } else {
        let _ = writeln!(s, "\n### Lint findings\n");
        for f in &r.findings {
            let _ = writeln!(
                s,
                "- `{}:{}:{}` {} {} ({:?}): {}; fix: {}",
                f.origin, f.line, f.column, f.rule, f.name, f.severity, f.why, f.fix
            );
            if let Some(facts) = &f.facts {
                let _ = writeln!(s, "  - database facts: {facts}");
            }
            if let Some(reason) = &f.ignored {
                let _ = writeln!(s, "  - **ignored** by `backstop:ignore`: {reason}");
            }
        }
        let _ = writeln!(s);
    }
    if !r.facts.is_empty() {
        let _ = writeln!(s, "Database facts that cleared a finding a static linter reports:\n");
        for f in &r.facts {
            let _ = writeln!(s, "- {f}");
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "## Checkpoint\n");
    match &r.checkpoint {
        Some(c) => {
            let _ = writeln!(
                s,
                "- backend: {}\n- location: `{}`\n- database: {}",
                c.backend, c.location, c.database
            );
            let _ = writeln!(
                s,
                "- taken: {} to {} ({} bytes)",
                c.started_at.to_rfc3339(),
                c.completed_at.to_rfc3339(),
                c.size_bytes
            );
            if let Some(base) = &c.base {
                let _ = writeln!(s, "- a restore starts from: {}", base.describe());
            }
            let _ = writeln!(s, "- restore drill: {}", c.restore_drill);
        }
        None => {
            let _ = writeln!(s, "- none taken");
        }
    }
    if let Some(p) = &r.recovery_point {
        let _ = writeln!(s, "- recovery point: {} (LSN {})", p.time.to_rfc3339(), p.lsn);
        match &p.capture {
            Some(crate::capture::Capture::Slot { name, start_lsn, .. }) => {
                let _ = writeln!(
                    s,
                    "- writes after it are captured: logical slot `{name}` from LSN {start_lsn} (dropped when the run ends)"
                );
            }
            Some(crate::capture::Capture::Unavailable { why, .. }) => {
                let _ = writeln!(s, "- writes after it are not captured: {why}");
            }
            None => {}
        }
    }

    if let Some(chart) = timeline(r) {
        let _ = writeln!(s, "\n## Timeline\n\n{chart}");
    }
    let _ = writeln!(
        s,
        "\n## Steps\n\n| step | phase | started | finished | result | detail |\n|---|---|---|---|---|---|"
    );
    for st in &r.steps {
        let result = match st.ok {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "interrupted",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {result} | {} |",
            st.name,
            st.phase,
            st.started_at.format("%H:%M:%S%.3f"),
            st.finished_at
                .map(|t| t.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default(),
            st.detail.replace('|', "\\|").replace('\n', " ")
        );
    }
    if !r.verify.is_empty() {
        let _ = writeln!(s, "\n## Verify\n");
        for (id, passed, detail) in &r.verify {
            let _ = writeln!(s, "- {id}: {} ({detail})", if *passed { "passed" } else { "FAILED" });
            if let Some(q) = r
                .migrations
                .iter()
                .find(|m| &m.id == id)
                .and_then(|m| m.verify.as_ref())
            {
                let _ = writeln!(s, "\n  ```sql\n{}\n  ```", indent(q.trim(), "  "));
            }
        }
    }
    if !r.health.is_empty() {
        let _ = writeln!(s, "\n## Health\n");
        for h in &r.health {
            let _ = writeln!(s, "- {h}");
        }
    }
    if let Some(f) = &r.failed_statement {
        let _ = writeln!(
            s,
            "\n## Failed statement\n\n{} failed at `{}:{}` (statement {} of {}; {}):\n\n```sql\n{}\n```\n\n```text\n{}\n```",
            f.migration,
            f.origin,
            f.line,
            f.done + 1,
            f.total,
            if f.rolled_back {
                format!("the {} before it ran in the same transaction, which PostgreSQL rolled back", f.done)
            } else {
                format!("the {} before it were committed", f.done)
            },
            f.sql,
            f.error
        );
    }
    if r.failure.is_some() || r.remediation.is_some() || r.revert.is_some() {
        let _ = writeln!(s, "\n## Remediation\n");
        if let Some(f) = &r.failure {
            let _ = writeln!(s, "- failure: {f}");
        }
        if let Some(d) = &r.remediation {
            let _ = writeln!(s, "- decision: {d}");
        }
        if let Some(rs) = &r.restore {
            let _ = writeln!(
                s,
                "- restore: to {}, {} to {}; previous state kept at `{}`",
                rs.target,
                rs.started_at.to_rfc3339(),
                rs.finished_at.to_rfc3339(),
                rs.kept
            );
        }
        match &r.data_loss_window {
            Some(w) => {
                let _ = writeln!(
                    s,
                    "- data-loss window: writes from {} to {} ({:.3}s) are not in the restored database{}",
                    w.from.to_rfc3339(),
                    w.to.to_rfc3339(),
                    w.seconds,
                    match (w.transactions, w.rows) {
                        (Some(t), Some(n)) =>
                            format!(": {t} transactions of the application, {n} rows (kept, see below)"),
                        _ => String::new(),
                    }
                );
                if let Some(rs) = &r.restore {
                    scope(&mut s, rs, r.checkpoint.as_ref().map(|c| c.backend.as_str()), &r.run);
                    replayed(&mut s, r.lost_writes_replay.as_ref(), &r.run);
                }
            }
            None => {
                let _ = writeln!(s, "- data-loss window: none (no restore)");
            }
        }
        if let Some(v) = &r.revert {
            let pr = v
                .pull_request
                .as_ref()
                .map(|u| format!(", pull request {u}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "- revert ({}): commit `{}` on `{}`{pr} ({})",
                v.mode, v.commit, v.branch, v.note
            );
        }
        for e in &r.remediation_errors {
            let _ = writeln!(s, "- **needs a person**: {e}");
        }
        if let Some(a) = &r.acknowledged {
            let _ = writeln!(s, "- taken over by {} at {}: {}", a.by, a.at.to_rfc3339(), a.note);
        }
    }
    let _ = writeln!(s, "\n## Rollback conditions in force\n");
    for c in &r.rollback_conditions {
        let _ = writeln!(s, "- {c}");
    }
    s
}

/// What the run's own replay of the lost writes did.
fn replayed(s: &mut String, replay: Option<&crate::capture::replay::AutoReplay>, run: &str) {
    use crate::capture::replay::AutoReplay;
    use std::fmt::Write;
    match replay {
        Some(AutoReplay::Replayed(r)) => {
            let _ = writeln!(
                s,
                "- writes put back by the run (`backstop.dev/replay: auto`): {} transactions applied ({} by an earlier attempt), {} left for a person",
                r.applied.len(),
                r.already.len(),
                r.left.len()
            );
            for (name, why) in &r.sequences_not_moved {
                let _ = writeln!(s, "  - sequence {name} not moved past the lost ids: {why}");
            }
            for (xid, why) in &r.left {
                let _ = writeln!(s, "  - left: xid {xid}: {why}");
            }
            if let Some((xid, why)) = &r.stopped {
                let _ = writeln!(
                    s,
                    "  - stopped at xid {xid}: {why}. Keep the row as it is or apply that transaction by hand from lost-writes.sql, then `backstop replay {run} --skip {xid}` records it and goes on"
                );
            }
        }
        Some(AutoReplay::NotReplayed { why }) => {
            let _ = writeln!(
                s,
                "- writes not put back by the run ({why}): `backstop replay {run}` can"
            );
        }
        None => {}
    }
}

/// What the restore took back, and how to read what it discarded.
fn scope(s: &mut String, rs: &RestoreRecord, backend: Option<&str>, run: &str) {
    use std::fmt::Write;
    let whole = matches!(backend, Some("local" | "pgbackrest" | "cnpg"));
    match (whole, rs.databases.as_slice()) {
        (true, []) => {
            let _ = writeln!(
                s,
                "- scope: the whole server went back (every database on it), not only this run's"
            );
        }
        (true, dbs) => {
            let _ = writeln!(
                s,
                "- scope: the whole server went back, all {} of its databases: {}",
                dbs.len(),
                dbs.join(", ")
            );
        }
        (false, dbs) if !dbs.is_empty() => {
            let _ = writeln!(s, "- scope: only database {} went back", dbs.join(", "));
        }
        _ => {}
    }
    if let Some(stopped) = rs.writes_stopped_at {
        let _ = writeln!(
            s,
            "- the old server took writes until {} (stopped {:.3}s after the restore began)",
            stopped.to_rfc3339(),
            (stopped - rs.started_at).num_milliseconds() as f64 / 1000.0
        );
    }
    match &rs.lost_writes {
        Some(crate::capture::Captured::Kept(w)) => {
            let rows: Vec<String> = w
                .rows
                .iter()
                .flat_map(|(t, ops)| ops.iter().map(move |(op, n)| format!("{t} {op} {n}")))
                .collect();
            let _ = writeln!(
                s,
                "- writes kept: {} transactions of the application ({}), committed {} to {}; the migration's own {} left out. {}`backstop replay {}` puts back those that touch no migrated table, stopping at the first conflict",
                w.transactions,
                if rows.is_empty() { "no rows".to_string() } else { rows.join(", ") },
                w.first_commit.as_deref().unwrap_or("-"),
                w.last_commit.as_deref().unwrap_or("-"),
                w.own_left_out,
                w.file.as_deref().map(|f| format!("They are in `{f}`; ")).unwrap_or_default(),
                run
            );
            if let Some(n) = w.sequences_advanced {
                let _ = writeln!(
                    s,
                    "- sequences: {n} moved forward after the restore, past the ids the lost writes had used (the application does not hand them out again)"
                );
            }
            for (name, why) in &w.sequences_not_moved {
                let _ = writeln!(
                    s,
                    "- sequence {name} NOT moved past the ids the lost writes used ({why}): the application may hand them out again, and replay stops at such a row; `backstop replay {run}` tries again"
                );
            }
        }
        Some(crate::capture::Captured::NotKept { why }) => {
            let _ = writeln!(s, "- writes not kept: {why}");
        }
        None => {}
    }
    if let Some(why) = rs.lost_commits.as_ref().and_then(|l| l.not_counted.as_ref()) {
        let _ = writeln!(s, "- transactions lost: not counted ({why})");
    } else if let Some(l) = &rs.lost_commits {
        let _ = writeln!(
            s,
            "- transactions lost: {} committed after the recovery point (WAL {} to {}, timeline {}; the migration's own are among them). List them with `{}`, or start a server on a copy of `{}` and read the rows",
            l.count, l.from_lsn, l.to_lsn, l.timeline, l.command, rs.kept
        );
    }
}

/// `text` with `prefix` before each line.
fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// The run's phases as a Mermaid `gantt` chart (GitHub, GitLab and Gitea
/// render it; as text it still reads as a list of times): each step, the
/// recovery point, the failure and the data-loss window marked critical.
pub fn timeline(r: &Report) -> Option<String> {
    use std::fmt::Write;
    if r.steps.is_empty() {
        return None;
    }
    let at = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    // Task names may not hold the chart's own punctuation.
    let name = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_alphanumeric() || " -_./()".contains(c) {
                    c
                } else {
                    ' '
                }
            })
            .collect::<String>()
            .trim()
            .to_string()
    };
    let mut s = String::from("```mermaid\ngantt\n");
    let _ = writeln!(s, "    title run {}", name(&r.run));
    let _ = writeln!(s, "    dateFormat YYYY-MM-DD HH:mm:ss.SSS");
    let _ = writeln!(s, "    axisFormat %H:%M:%S");
    let _ = writeln!(s, "    section run");
    for (i, st) in r.steps.iter().enumerate() {
        let tag = match st.ok {
            Some(false) => "crit, ",
            Some(true) => "done, ",
            None => "active, ",
        };
        let end = st.finished_at.unwrap_or(st.started_at);
        let _ = writeln!(
            s,
            "    {} :{tag}s{i}, {}, {}",
            name(&st.name),
            at(&st.started_at),
            at(&end)
        );
    }
    let _ = writeln!(s, "    section data");
    if let Some(p) = &r.recovery_point {
        let _ = writeln!(
            s,
            "    recovery point {} :milestone, rp, {}, 0d",
            name(&p.lsn),
            at(&p.time)
        );
    }
    if let Some(failed) = r.steps.iter().find(|st| st.ok == Some(false)) {
        let when = failed.finished_at.unwrap_or(failed.started_at);
        let _ = writeln!(s, "    failure :crit, milestone, fail, {}, 0d", at(&when));
    }
    if let Some(w) = &r.data_loss_window {
        let _ = writeln!(s, "    data-loss window :crit, loss, {}, {}", at(&w.from), at(&w.to));
    }
    s.push_str("```\n");
    Some(s)
}
