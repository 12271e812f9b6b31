//! backstop: a Flux companion that makes database migrations in a GitOps
//! repository reversible.
//!
//! A run takes one pending commit of the upstream branch through
//! lock → plan → checkpoint → migrate → verify → promote → unlock, and on any
//! failure through remediation (restore the data if anything committed, revert
//! the code) instead. The pieces:
//!
//! - [`git`]: the `sre` repository (fetch, pending commits, gate pushes, reverts)
//! - [`manifests`]: migration carriers and the annotation contract
//! - [`sql`]: statements parsed with the real PostgreSQL grammar
//! - [`lint`], [`policy`]: safety analysis, phase rules and approval gates
//! - [`plan`]: what runs, in which commit, and whether it may
//! - [`gate`]: the gate invariant and the one place that moves the gate branch
//! - [`run`]: runs: typed records, the pure state machine ([`run::machine`]), the
//!   executor driving the traits below ([`run::exec`]), durable through a [`run::RunStore`]
//! - [`checkpoint`]: backends that checkpoint and restore ([`checkpoint::local`] PITR,
//!   [`checkpoint::dump`], [`checkpoint::cnpg`] Backups and Cluster recovery)
//! - [`capture`]: the writes a restore discards, read from a logical slot, and `replay`
//! - [`runner`]: migration runners and the history table
//! - [`cluster`]: lock / health / database resolution ([`cluster::LocalCluster`] in local mode)
//! - [`forge`]: revert pull requests
//! - [`datastore`]: moving a database between servers (lock, export, import, verify, unlock, rollback)
//! - [`journal`], [`report`]: the local run store and the evidence report
//! - [`status`]: gates, what they wait for, runs with age and duration
//! - [`prune`]: retention on demand, and deleting what a restore set aside when a person says so
//! - [`k8s`]: the controller: `MigrationRun` store, verified pause of Flux Kustomizations,
//!   cluster side of a run, Job migrations, leader election, metrics and events
//! - [`local`], [`demo`], [`cli`]: wiring for the command line
//! - [`progress`]: bars and spinners for long work, on a terminal only
//! - [`db`], [`pgbin`], [`pgserver`], [`sandbox`]: connections, PostgreSQL programs,
//!   throwaway servers and git remotes (demo, tests, benchmarks)

pub mod capture;
pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod datastore;
pub mod db;
pub mod demo;
pub mod forge;
pub mod gate;
pub mod git;
pub mod journal;
pub mod k8s;
pub mod lint;
pub mod local;
pub mod manifests;
pub mod owner;
pub mod pgbin;
pub mod pgserver;
pub mod plan;
pub mod policy;
pub mod progress;
pub mod prune;
pub mod report;
pub mod run;
pub mod runner;
pub mod sandbox;
pub mod sql;
pub mod status;
