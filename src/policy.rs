//! Phase rules and approval gates (DESIGN section 5): which findings each
//! expand/contract phase allows, and what a contract (or otherwise destructive)
//! migration needs before it may run: an approval bound to the plan hash, a
//! checkpoint with a restore drill, and the soak time since its expand.
//!
//! The plan hash is defined in [`plan_hash`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lint::{self, Finding, LintOptions};
use crate::manifests::{Carrier, CheckpointKind, Phase};

/// Default soak between an expand and its contract.
pub const DEFAULT_SOAK: Duration = Duration::from_secs(24 * 3600);

/// An approval: who approved which plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub approver: String,
    /// The approved plan hash (full, or a prefix of at least 12 hex digits).
    pub plan_hash: String,
    /// Where it came from (annotation or commit trailer).
    pub source: String,
}

/// Parses `<approver> [sha256:]<plan-hash>` (the form of both the
/// `backstop.dev/approved-by` annotation and the `Backstop-Approved-By:` trailer).
pub fn parse_approval(text: &str, source: &str) -> Result<Approval, String> {
    let mut parts: Vec<&str> = text.split_whitespace().collect();
    let hash = parts
        .pop()
        .map(|h| h.trim_start_matches("sha256:").to_ascii_lowercase());
    let approver = parts.join(" ");
    match hash {
        Some(h) if !approver.is_empty() && h.len() >= 12 && h.len() <= 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(Approval { approver, plan_hash: h, source: source.to_string() })
        }
        _ => Err(format!(
            "approval {text:?} must read `<approver> sha256:<plan hash>` (at least 12 hex digits of the hash `backstop plan` prints)"
        )),
    }
}

impl Approval {
    /// Whether this approval is for `plan_hash`.
    pub fn matches(&self, plan_hash: &str) -> bool {
        plan_hash.starts_with(&self.plan_hash)
    }
}

/// One migration with its findings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Analysed {
    pub id: String,
    pub phase: Phase,
    /// Findings, judged with the catalog's facts when it was read.
    pub findings: Vec<Finding>,
    /// Catalog facts that dropped a finding (shown in the plan and the report).
    #[serde(default)]
    pub facts: Vec<String>,
    /// What the plan hash covers: the static analysis's rule ids and the
    /// suppressions with their reasons (see [`plan_hash`]).
    #[serde(default)]
    pub hashed: Vec<String>,
}

/// Lints every migration; with `catalog`, against the live database's facts.
pub fn analyse(migrations: &[Carrier], opts: LintOptions, catalog: Option<&lint::Catalog>) -> Vec<Analysed> {
    migrations
        .iter()
        .map(|m| {
            let judged = lint::analyse(&m.statements, opts, catalog);
            let static_findings = match catalog {
                Some(c) => lint::analyse_in(&m.statements, opts, &c.default_schema).findings,
                None => judged.findings.clone(),
            };
            let mut hashed: Vec<String> = static_findings.iter().map(|f| f.rule.clone()).collect();
            hashed.sort_unstable();
            hashed.dedup();
            for f in static_findings.iter().filter(|f| f.ignored.is_some()) {
                hashed.push(format!(
                    "ignored {} at {}:{} {}",
                    f.rule,
                    f.origin,
                    f.line,
                    f.ignored.as_deref().unwrap_or_default()
                ));
            }
            Analysed {
                id: m.id.clone(),
                phase: m.phase,
                findings: judged.findings,
                facts: judged.facts,
                hashed,
            }
        })
        .collect()
}

/// The plan hash: sha256 over this canonical text, migrations in the order
/// given (id order within a run), nothing else (approvals are not part of it):
///
/// ```text
/// migration <id> phase <phase>\n
/// statement <kind> <normalized statement>\n      (each statement, in order)
/// classes <rule ids of its findings, sorted, comma-separated>\n
/// ignored <rule id> at <file>:<line> <reason>\n   (each suppressed finding)
/// ```
///
/// The normalized statement is its tokens joined by single spaces (comments and
/// layout removed), so reformatting a migration keeps its approval; changing
/// what runs, or what the analysis says about it, does not. A suppression is
/// a comment, so its line puts it (and its reason) in the hash: an ignored
/// error still counts.
///
/// The findings hashed are the static analysis's, without catalog facts:
/// facts only ever lower what a plan needs (a warning instead of an error on
/// a small table, a false alarm dropped), never raise it, so the approval of
/// the plan `backstop plan` printed without a database still holds when the
/// run judges the same migration against the live catalog.
pub fn plan_hash(migrations: &[Carrier], analysed: &[Analysed]) -> String {
    let mut hasher = Sha256::new();
    for m in migrations {
        hasher.update(format!("migration {} phase {}\n", m.id, m.phase));
        for s in &m.statements {
            hasher.update(format!("statement {} {}\n", s.kind, s.normalized));
        }
        let hashed: Vec<&str> = analysed
            .iter()
            .filter(|a| a.id == m.id)
            .flat_map(|a| a.hashed.iter().map(String::as_str))
            .collect();
        let (ignored, classes): (Vec<&str>, Vec<&str>) = hashed.into_iter().partition(|h| h.starts_with("ignored "));
        hasher.update(format!("classes {}\n", classes.join(",")));
        for line in ignored {
            hasher.update(format!("{line}\n"));
        }
    }
    hex::encode(hasher.finalize())
}

/// What is known about the soak of a contract's expand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Soak {
    /// Not checked (no database at hand, e.g. `backstop plan`).
    Unknown,
    /// The expand `id` finished at `at`.
    ExpandAppliedAt { id: String, at: DateTime<Utc> },
    /// No applied expand migration was found.
    NoExpand,
    /// Not a contract: no soak applies.
    NotApplicable,
}

/// What the soak of a contract's expand was when the contract was planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoakEvidence {
    /// The contract migration.
    pub migration: String,
    /// The expand it waited for, and when that finished.
    pub expand: String,
    pub applied_at: DateTime<Utc>,
    /// How long the expand had been applied when the contract was planned.
    pub soaked_seconds: u64,
    pub required_seconds: u64,
}

/// The verdict on one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub id: String,
    pub allowed: bool,
    /// Needs an approval (contract phase or destructive statements).
    pub needs_approval: bool,
    /// Why it is refused (empty when allowed).
    pub reasons: Vec<String>,
    /// What allows it, or what is still checked at run time.
    pub notes: Vec<String>,
    /// A contract's soak, as history showed it.
    #[serde(default)]
    pub soak: Option<SoakEvidence>,
    /// The approval that lets it run, in words (also among `notes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
}

/// Inputs of the gate for one migration.
pub struct GateInput<'a> {
    pub carrier: &'a Carrier,
    pub findings: &'a [Finding],
    pub plan_hash: &'a str,
    pub approvals: &'a [Approval],
    pub soak: Soak,
    pub now: DateTime<Utc>,
}

/// Applies the phase rules and the approval gate.
pub fn evaluate(input: &GateInput<'_>) -> Verdict {
    let c = input.carrier;
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    let mut approved = None;
    let mut soak_evidence = None;
    let destructive = lint::has_destructive_or_incompatible(input.findings);
    if matches!(c.phase, Phase::Expand | Phase::Migrate) {
        for f in input
            .findings
            .iter()
            .filter(|f| f.family == lint::Family::Destructive || f.incompatible)
        {
            reasons.push(format!(
                "{}:{}:{}: {} ({}) is not allowed in phase {}: move it to a contract migration",
                f.origin, f.line, f.column, f.rule, f.name, c.phase
            ));
        }
    }
    // Contract migrations, destructive statements and any other error-level
    // finding (e.g. a blocking CREATE INDEX) run only with an approval. A
    // `backstop:ignore` does not lift that: the approver sees its reason, and
    // the reason is in the plan hash they approve.
    let errors = input
        .findings
        .iter()
        .filter(|f| f.severity == lint::Severity::Error)
        .count();
    let needs_approval = c.phase == Phase::Contract || destructive || errors > 0;
    if needs_approval && reasons.is_empty() {
        match input.approvals.iter().find(|a| a.matches(input.plan_hash)) {
            Some(a) => {
                let said = format!("approved by {} for plan {} ({})", a.approver, short(input.plan_hash), a.source);
                notes.push(said.clone());
                approved = Some(said);
            }
            None if input.approvals.is_empty() => reasons.push(format!(
                "{} needs an approval: backstop.dev/approved-by or a Backstop-Approved-By: trailer reading `<approver> sha256:{}`",
                c.id,
                short(input.plan_hash)
            )),
            None => reasons.push(format!(
                "the approval{} for plan {} do{} not match this plan ({}); approve the plan that will run",
                if input.approvals.len() > 1 { "s" } else { "" },
                input.approvals.iter().map(|a| short(&a.plan_hash)).collect::<Vec<_>>().join(", "),
                if input.approvals.len() > 1 { "" } else { "es" },
                short(input.plan_hash)
            )),
        }
        if c.checkpoint == CheckpointKind::None {
            reasons.push(format!(
                "{} needs a checkpoint with a restore drill; checkpoint: none is refused",
                c.id
            ));
        } else {
            notes.push("a checkpoint with a passed restore drill is required before it runs".into());
        }
        let soak = c.soak.unwrap_or(DEFAULT_SOAK);
        let soak_status = if c.phase == Phase::Contract {
            input.soak.clone()
        } else {
            Soak::NotApplicable
        };
        match &soak_status {
            Soak::NotApplicable => {}
            Soak::Unknown => notes.push(format!(
                "the expand must have soaked {}; checked against history at run time",
                human(soak)
            )),
            Soak::NoExpand => reasons.push(format!(
                "{} has no applied expand migration to soak (name it with backstop.dev/expand-migration)",
                c.id
            )),
            Soak::ExpandAppliedAt { id, at } => {
                let soaked = (input.now - *at).to_std().unwrap_or_default();
                soak_evidence = Some(SoakEvidence {
                    migration: c.id.clone(),
                    expand: id.clone(),
                    applied_at: *at,
                    soaked_seconds: soaked.as_secs(),
                    required_seconds: soak.as_secs(),
                });
                if soaked < soak {
                    reasons.push(format!(
                        "expand {id} was applied {} ago; the contract waits until it soaked {}",
                        human(soaked),
                        human(soak)
                    ));
                } else {
                    notes.push(format!("expand {id} soaked {} (needs {})", human(soaked), human(soak)));
                }
            }
        }
    }
    Verdict {
        id: c.id.clone(),
        allowed: reasons.is_empty(),
        needs_approval,
        reasons,
        notes,
        soak: soak_evidence,
        approved,
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// A duration as people write `backstop.dev/soak`, to the second (`24h`,
/// `1h30m`, `45s`).
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_durations_read_as_people_write_them() {
        assert_eq!(human(DEFAULT_SOAK), "24h");
        assert_eq!(human(Duration::from_secs(5400)), "1h30m");
        assert_eq!(human(Duration::from_secs(90061)), "25h1m1s");
        assert_eq!(human(Duration::from_millis(1500)), "1s");
        assert_eq!(human(Duration::ZERO), "0s");
    }

    #[test]
    fn approvals_parse_with_or_without_prefix() {
        let a = parse_approval("Alice Smith <alice@example.com> sha256:0123456789abcdef", "annotation").unwrap();
        assert_eq!(a.approver, "Alice Smith <alice@example.com>");
        assert!(a.matches("0123456789abcdef00"));
        assert!(!a.matches("1123456789abcdef00"));
        assert!(parse_approval("alice", "x").is_err());
        assert!(parse_approval("alice abc", "x").is_err());
    }
}
