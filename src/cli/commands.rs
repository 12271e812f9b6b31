//! What each subcommand does, given its parsed arguments.

use std::time::Duration;

use anyhow::Context;

use crate::journal::Journal;
use crate::lint::LintOptions;
use crate::local::{self, LocalOptions};
use crate::report::{self, Report};
use crate::run::{EngineError, RunStore};

use super::*;

pub(super) async fn pause(args: PauseArgs, lock: bool) -> anyhow::Result<u8> {
    use crate::k8s::pause::{self, KustomizationRef, Paused, Resumed};
    let result: anyhow::Result<String> = async {
        let target: KustomizationRef = args.target.parse()?;
        let client = crate::k8s::client(args.kubeconfig.as_deref()).await?;
        Ok(if lock {
            match pause::lock(client, &target, &args.owner, Duration::from_secs(args.timeout)).await? {
                Paused::Taken { live_revision, .. } => format!(
                    "paused {target} (confirmed by kustomize-controller); live revision: {}",
                    live_revision.unwrap_or_else(|| "none".into())
                ),
                Paused::ByPerson { live_revision } => format!(
                    "{target} is already suspended by a person; backstop will not resume it; live revision: {}",
                    live_revision.unwrap_or_else(|| "none".into())
                ),
            }
        } else {
            match pause::unlock(client, &target, &args.owner).await? {
                Resumed::Resumed => format!("resumed {target}"),
                Resumed::LeftSuspended => format!("{target} was suspended by a person and stays suspended"),
                Resumed::NotSuspended => format!("{target} is not suspended: nothing to do"),
            }
        })
    }
    .await;
    match result {
        Ok(text) => {
            println!("{text}");
            Ok(EXIT_OK)
        }
        Err(e) => {
            eprintln!("backstop: {e:#}");
            Ok(EXIT_BAD_INPUT)
        }
    }
}

/// Owner of the pauses a datastore move takes.
const DATASTORE_OWNER: &str = "backstop-datastore";

async fn suspend_kustomizations(
    targets: &[String],
    kubeconfig: Option<&std::path::Path>,
) -> Result<Vec<String>, crate::datastore::DatastoreError> {
    use crate::k8s::pause::{self, Paused};
    let refused = |e: &dyn std::error::Error| crate::datastore::DatastoreError::Refused(crate::run::chain(e));
    let client = crate::k8s::client(kubeconfig).await.map_err(|e| refused(&e))?;
    let mut out = Vec::new();
    for t in targets {
        let target: pause::KustomizationRef = t.parse().map_err(|e: pause::PauseError| refused(&e))?;
        out.push(
            match pause::lock(client.clone(), &target, DATASTORE_OWNER, Duration::from_secs(120)).await {
                Ok(Paused::Taken { .. }) => format!("paused {target} (confirmed by kustomize-controller)"),
                Ok(Paused::ByPerson { .. }) => format!("{target} is already suspended by a person"),
                Err(e) => return Err(refused(&e)),
            },
        );
    }
    Ok(out)
}

async fn resume_kustomizations(
    targets: &[String],
    kubeconfig: Option<&std::path::Path>,
) -> Result<Vec<String>, crate::datastore::DatastoreError> {
    use crate::k8s::pause::{self, Resumed};
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let failed = |e: &dyn std::error::Error| crate::datastore::DatastoreError::Refused(crate::run::chain(e));
    let client = crate::k8s::client(kubeconfig).await.map_err(|e| failed(&e))?;
    let mut out = Vec::new();
    for t in targets {
        let target: pause::KustomizationRef = t.parse().map_err(|e: pause::PauseError| failed(&e))?;
        out.push(
            match pause::unlock(client.clone(), &target, DATASTORE_OWNER)
                .await
                .map_err(|e| failed(&e))?
            {
                Resumed::Resumed => format!("resumed {target}"),
                Resumed::LeftSuspended => format!("{target} stays suspended (a person suspended it)"),
                Resumed::NotSuspended => format!("{target} is not suspended"),
            },
        );
    }
    Ok(out)
}

pub(super) async fn datastore(step: DatastoreStep) -> anyhow::Result<u8> {
    use crate::datastore::{self as ds, DatastoreError};
    let result: Result<u8, DatastoreError> = async {
        let by = ds::whoami();
        match step {
            DatastoreStep::Lock {
                source,
                reason,
                suspend,
                kubeconfig,
            } => {
                let db = ds::database(&source, "source")?;
                // Clients first: their Kustomizations stop redeploying before the database locks.
                if !suspend.is_empty() {
                    for line in suspend_kustomizations(&suspend, kubeconfig.as_deref()).await? {
                        println!("{line}");
                    }
                }
                println!("{}", ds::lock(&db, "source", &by, &reason, &suspend).await?);
            }
            DatastoreStep::Export { source, file, jobs } => {
                let bindir = crate::pgbin::bindir().map_err(|e| DatastoreError::Tool {
                    step: "finding pg_dump".into(),
                    source: e,
                })?;
                let done = ds::export(&ds::database(&source, "source")?, &file, &bindir, jobs).await?;
                println!("{done}");
            }
            DatastoreStep::Import {
                target,
                file,
                allow_non_empty,
                no_privileges,
                jobs,
            } => {
                let bindir = crate::pgbin::bindir().map_err(|e| DatastoreError::Tool {
                    step: "finding pg_restore".into(),
                    source: e,
                })?;
                println!(
                    "{}",
                    ds::import(
                        &ds::database(&target, "target")?,
                        &file,
                        &bindir,
                        ds::ImportOptions {
                            allow_non_empty,
                            no_privileges,
                            jobs,
                        },
                        &by
                    )
                    .await?
                );
            }
            DatastoreStep::Verify { source, target, format } => {
                let diffs = ds::verify(&ds::database(&source, "source")?, &ds::database(&target, "target")?).await?;
                match format {
                    Format::Text => print!("{}", ds::render_diffs(&diffs)),
                    Format::Json => println!("{}", serde_json::to_string_pretty(&diffs).unwrap_or_default()),
                }
                if diffs.iter().any(|d| d.status != "ok") {
                    return Ok(EXIT_ROLLED_BACK);
                }
            }
            DatastoreStep::Unlock { url, force, kubeconfig } => {
                let db = ds::database(&url, "url")?;
                let suspended = ds::suspended(&db).await?;
                println!("{}", ds::unlock(&db, force).await?);
                for line in resume_kustomizations(&suspended, kubeconfig.as_deref()).await? {
                    println!("{line}");
                }
            }
            DatastoreStep::Rollback {
                source,
                target,
                force,
                kubeconfig,
            } => {
                let (s, t) = (ds::database(&source, "source")?, ds::database(&target, "target")?);
                let suspended = ds::suspended(&s).await.unwrap_or_default();
                println!("{}", ds::rollback(&s, &t, force).await?);
                for line in resume_kustomizations(&suspended, kubeconfig.as_deref()).await? {
                    println!("{line}");
                }
            }
        }
        Ok(EXIT_OK)
    }
    .await;
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("backstop: {}", crate::run::chain(&e));
            Ok(match e {
                DatastoreError::Refused(_) | DatastoreError::Url { .. } | DatastoreError::Db(_) => EXIT_BAD_INPUT,
                _ => EXIT_NEEDS_PERSON,
            })
        }
    }
}

pub(super) fn lint(files: &[String], format: Format, pg_version: u32) -> anyhow::Result<u8> {
    let results = crate::lint::lint_files(files, LintOptions { pg_version });
    for f in &results {
        if let Some(e) = &f.unreadable {
            eprintln!("backstop: {e}");
        }
    }
    match format {
        Format::Text => print!("{}", crate::lint::render_text(&results)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&results)?),
    }
    // A file that could not be read, or text that is not SQL, is bad input
    // (2) even beside findings; findings at error level alone are 1.
    if results.iter().any(|f| f.unreadable.is_some() || f.not_sql > 0) {
        return Ok(EXIT_BAD_INPUT);
    }
    let errors: usize = results.iter().map(|f| crate::lint::errors(&f.findings)).sum();
    Ok(if errors > 0 { EXIT_ROLLED_BACK } else { EXIT_OK })
}

pub(super) async fn plan(
    range: &str,
    repo: &std::path::Path,
    path: &str,
    format: Format,
    pg_version: u32,
    database_url: Option<&str>,
) -> anyhow::Result<u8> {
    let result: anyhow::Result<_> = async {
        let live = match database_url {
            Some(url) => {
                let reference = crate::manifests::DatabaseRef::Url {
                    var: "--database-url".into(),
                };
                let db = crate::db::Database::from_url(reference, url, None)?;
                crate::runner::Runner::catalog(&crate::runner::SqlRunner, &db, None).await?
            }
            None => None,
        };
        let git = crate::git::GitRepo::existing(repo).await?;
        let (from, to) = match range.split_once("..") {
            Some((f, t)) => (Some(git.resolve(f).await?), git.resolve(t).await?),
            None => (None, git.resolve(range).await?),
        };
        let pg_version = live.as_ref().map_or(pg_version, |(v, _)| *v);
        let catalog = live.as_ref().map(|(_, c)| c);
        Ok(crate::plan::plan_range(&git, from.as_deref(), &to, path, LintOptions { pg_version }, catalog).await?)
    }
    .await;
    let plan = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("backstop: {e:#}");
            return Ok(EXIT_BAD_INPUT);
        }
    };
    match format {
        Format::Text => print!("{}", crate::plan::render_plan(&plan)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    // The exit code `run` gives when it stops in plan for the same reason.
    Ok(if plan.refused() { EXIT_BAD_INPUT } else { EXIT_OK })
}

pub(super) async fn run_local(args: RunArgs) -> anyhow::Result<u8> {
    let (git_auth, forge) = match credentials(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("backstop: {e}");
            return Ok(EXIT_BAD_INPUT);
        }
    };
    let opts = LocalOptions {
        git_auth,
        forge,
        repo: args.repo.clone(),
        upstream: args.upstream,
        gate: args.gate,
        path: args.path,
        checkpoint: args.checkpoint,
        pgdata: args.pgdata,
        wal_archive: args.wal_archive,
        revert: args.revert,
        replay_lost_writes: args.replay_lost_writes,
        state: args.state.clone(),
        env: Default::default(),
        keep_checkpoints: args.keep_checkpoints,
        base_policy: args.base_backup.policy(),
        pgbackrest_stanza: args.pgbackrest_stanza,
        pgbackrest_config: args.pgbackrest_config,
        backoff: crate::run::machine::Backoff {
            base: Duration::from_secs(args.retry_backoff),
            max: Duration::from_secs(args.retry_max.max(args.retry_backoff)),
        },
    };
    if let Err(e) = local::check_repo(&opts.repo) {
        eprintln!("backstop: {e}");
        return Ok(EXIT_BAD_INPUT);
    }
    // One process per state directory, for its whole life.
    let _state_lock = match crate::owner::StateLock::acquire(&opts.state) {
        Ok(lock) => lock,
        Err(e @ crate::owner::OwnerError::StateBusy { .. }) => {
            eprintln!("backstop: {e}");
            return Ok(EXIT_BUSY);
        }
        Err(e) => {
            eprintln!("backstop: {}", crate::run::chain(&e));
            return Ok(EXIT_BAD_INPUT);
        }
    };
    let engine = match local::engine(&opts).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("backstop: {}", crate::run::chain(&e));
            return Ok(EXIT_BAD_INPUT);
        }
    };
    // Watching: what lasts from pass to pass (an error, the gate's wait) is
    // said once with its time, then summarised when it changes or ends.
    let mut repeats = crate::run::summary::Repeats::default();
    loop {
        let (code, lasting) = match engine.pass().await {
            Ok(report) => {
                let summary = crate::run::summary::PassSummary::of(&report);
                match (args.output, args.once) {
                    (Format::Json, _) => println!("{}", serde_json::to_string(&summary)?),
                    (Format::Text, true) => print!("{}", summary.text()),
                    (Format::Text, false) => print!("{}", summary.runs_text()),
                }
                let waiting = report
                    .waiting
                    .as_ref()
                    .map(|w| (crate::run::wait_subject(w), format!("backstop: waiting: {w}")));
                (pass_exit_code(&report), waiting)
            }
            Err(e) => {
                let code = match e {
                    EngineError::Git(_) => EXIT_BAD_INPUT,
                    EngineError::Gate(_) | EngineError::Store(_) => EXIT_NEEDS_PERSON,
                };
                let text = format!("backstop: {}", crate::run::chain(&e));
                (code, Some((text.clone(), text)))
            }
        };
        if args.once {
            if let Some((_, line)) = lasting {
                eprintln!("{line}");
            }
            // The process ends with this pass, its files synced where they
            // must be: what the engine holds (git's repositories and their
            // maps, the records it parsed) is the kernel's to free at exit,
            // not ours to walk first.
            std::mem::forget(engine);
            return Ok(code);
        }
        let seen = lasting.as_ref().map(|(k, t)| (k.as_str(), t.as_str()));
        for line in repeats.see_keyed(seen, chrono::Utc::now()) {
            eprintln!("{line}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(code),
        }
    }
}

pub(super) async fn status(state: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    let journal = Journal::new(state);
    let runs = journal.list().await.context("reading the journal")?;
    let gates = journal.gates().context("reading the gate status")?;
    let now = chrono::Utc::now();
    let status = crate::status::Status {
        gates,
        runs: runs
            .iter()
            .map(|r| {
                let report = journal.run_dir(&r.id).join("report.md").display().to_string();
                crate::status::RunLine::of(r, report, now)
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", crate::status::text(&status, now, state));
    }
    Ok(EXIT_OK)
}

/// The run `id` (id, id prefix or commit prefix) names, or the message that
/// says why none: missing, or ambiguous with the runs it matches.
pub(super) fn one_run(state: &std::path::Path, id: &str) -> anyhow::Result<Result<crate::run::RunRecord, String>> {
    use crate::journal::Lookup;
    Ok(match Journal::new(state).lookup(id).context("reading the journal")? {
        Lookup::Found(run) => Ok(*run),
        Lookup::Missing => Err(format!("no run {id:?} in {} (see `backstop status`)", state.display())),
        Lookup::Ambiguous(runs) => {
            let mut msg = format!(
                "{id:?} is ambiguous: it matches {} runs in {}; give more of the run id:",
                runs.len(),
                state.display()
            );
            for r in &runs {
                msg.push_str(&format!(
                    "\n  {}  commit {}  {}",
                    r.id,
                    r.commit.short(),
                    r.phase.as_str()
                ));
            }
            Err(msg)
        }
    })
}

pub(super) fn print_report(state: &std::path::Path, id: &str, json: bool) -> anyhow::Result<u8> {
    let run = match one_run(state, id)? {
        Ok(run) => run,
        Err(why) => {
            eprintln!("backstop: {why}");
            return Ok(EXIT_BAD_INPUT);
        }
    };
    let report = Report::from_run(&run);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::markdown(&report));
    }
    Ok(EXIT_OK)
}

pub(super) async fn prune(opts: &crate::prune::PruneOptions, output: Format) -> anyhow::Result<u8> {
    // A dry run reads, and so does deleting only what a person named (no
    // pass touches set-aside data; the record of it needs no lock):
    // deleting checkpoints needs the state to itself.
    let _lock = if opts.dry_run || opts.keep.is_none() {
        None
    } else {
        match crate::owner::StateLock::acquire(&opts.state) {
            Ok(lock) => Some(lock),
            Err(e @ crate::owner::OwnerError::StateBusy { .. }) => {
                eprintln!("backstop: {e}; its passes apply checkpoint retention themselves (see `backstop prune --dry-run`; `--set-aside RUN` alone needs no lock)");
                return Ok(EXIT_BUSY);
            }
            Err(e) => {
                eprintln!("backstop: {}", crate::run::chain(&e));
                return Ok(EXIT_BAD_INPUT);
            }
        }
    };
    match crate::prune::prune(opts).await {
        Ok(report) => {
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Text => print!("{}", crate::prune::text(&report)),
            }
            Ok(EXIT_OK)
        }
        Err(e @ crate::prune::PruneError::Refused(_)) => {
            eprintln!("backstop: {e}; nothing was deleted");
            Ok(EXIT_BAD_INPUT)
        }
        Err(e) => {
            eprintln!("backstop: {}", crate::run::chain(&e));
            Ok(EXIT_NEEDS_PERSON)
        }
    }
}

pub(super) async fn ack(state: &std::path::Path, id: &str, by: String, note: String) -> anyhow::Result<u8> {
    let journal = Journal::new(state);
    let mut run = match one_run(state, id)? {
        Ok(run) => run,
        Err(why) => {
            eprintln!("backstop: {why}");
            return Ok(EXIT_BAD_INPUT);
        }
    };
    if run.phase != crate::run::Phase::Failed {
        eprintln!(
            "backstop: run {} is {}, not a failed remediation; nothing to take over",
            run.id, run.phase
        );
        return Ok(EXIT_BAD_INPUT);
    }
    if let Some(a) = &run.acknowledged {
        println!(
            "run {} was already taken over by {} at {}",
            run.id,
            a.by,
            a.at.to_rfc3339()
        );
        return Ok(EXIT_OK);
    }
    // No state lock: a running `backstop run` holds it; its next pass reads this.
    let ack = crate::run::Acknowledged {
        by,
        at: chrono::Utc::now(),
        note,
    };
    journal
        .acknowledge(&run.id, &ack)
        .context("recording the acknowledgement")?;
    run.acknowledged = Some(ack);
    let report = Report::from_run(&run);
    journal
        .write_report(&run, &report)
        .await
        .context("rewriting the report")?;
    println!("run {} taken over; later passes move the gate again", run.id);
    Ok(EXIT_OK)
}
