//! The command line: clap definitions (every flag also reads `BACKSTOP_<FLAG>`),
//! dispatch to the library, and the exit codes of DESIGN section 9:
//! 0 success or nothing to do; 1 a run failed and was rolled back as designed;
//! 2 bad input or configuration (nothing was touched); 3 remediation itself
//! failed and a person must act.
//!
//! [`args`] holds the clap definitions, [`commands`] what each subcommand
//! does; this file dispatches and maps outcomes to exit codes.

mod args;
mod commands;

pub use args::*;

use std::time::Duration;

use anyhow::Context;

use crate::run::Outcome;
use commands::*;

/// Exit code: success or nothing to do.
pub const EXIT_OK: u8 = 0;
/// Exit code: a run failed and was rolled back as designed.
pub const EXIT_ROLLED_BACK: u8 = 1;
/// Exit code: bad input or configuration; nothing was touched.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: remediation failed; a person must act.
pub const EXIT_NEEDS_PERSON: u8 = 3;
/// Exit code: another backstop instance owns the state directory or the
/// database; nothing was done.
pub const EXIT_BUSY: u8 = 4;
/// The async runtime a command runs on. The controller reconciles many
/// Kustomizations at once and gets a worker per core; every other command
/// (a pass, a datastore move, a report) is one sequence of steps and runs on
/// the calling thread, which spares a cross-thread wake-up for every
/// database message (a one-migration pass made ~780 context switches on the
/// multi-threaded runtime). git2, files and child processes go to tokio's
/// blocking pool either way.
pub fn runtime_for(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    match cli.command {
        Command::Controller { .. } => tokio::runtime::Runtime::new(),
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    }
}

/// Runs the command; returns the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    crate::git::bound_network_waits();
    match cli.command {
        Command::Demo { keep } => {
            crate::demo::run(keep).await.context("backstop demo failed")?;
            Ok(EXIT_OK)
        }
        Command::Run(args) => run_local(*args).await,
        Command::Status { state, output, json } => status(&state, json || output == Format::Json).await,
        Command::Report {
            run,
            state,
            output,
            json,
        } => print_report(&state, &run, json || output == Format::Json),
        Command::Ack { run, state, by, note } => ack(&state, &run, by, note).await,
        Command::Replay {
            run,
            state,
            database_url,
            dry_run,
            tables,
            skip,
            match_by_key,
            file,
            output,
        } => {
            use crate::capture::replay;
            let opts = replay::ReplayOptions {
                state,
                run,
                database_url,
                dry_run,
                tables,
                skip,
                match_by_key,
                file,
            };
            match replay::replay_run(&opts).await {
                Ok(done) => {
                    match output {
                        Format::Json => println!("{}", serde_json::to_string_pretty(&done)?),
                        Format::Text => print!("{}", replay::text(&done)),
                    }
                    Ok(if done.stopped.is_some() {
                        EXIT_NEEDS_PERSON
                    } else {
                        EXIT_OK
                    })
                }
                Err(e @ replay::ReplayError::Refused(_)) => {
                    eprintln!("backstop: {e}");
                    Ok(EXIT_BAD_INPUT)
                }
                Err(e) => {
                    eprintln!("backstop: {}", crate::run::chain(&e));
                    Ok(EXIT_BAD_INPUT)
                }
            }
        }
        Command::Prune {
            state,
            keep_checkpoints,
            dry_run,
            set_aside,
            by,
            output,
        } => {
            let keep = match (keep_checkpoints, set_aside.is_empty()) {
                (Some(k), _) => Some(k),
                (None, true) => Some(5),
                (None, false) => None,
            };
            let opts = crate::prune::PruneOptions {
                state,
                keep,
                dry_run,
                set_aside,
                by,
            };
            prune(&opts, output).await
        }
        Command::Lint {
            files,
            format,
            pg_version,
        } => lint(&files, format, pg_version),
        Command::Datastore { step } => datastore(step).await,
        Command::Controller {
            kubeconfig,
            state,
            interval,
            timeout,
            metrics_addr,
            lease_namespace,
            lease_name,
            lease_seconds,
            concurrency,
            keep_checkpoints,
            base_backup,
            durable_state,
            identity,
            forge,
            forge_url,
            forge_token_secret,
            forge_retries,
            forge_retry_delay_ms,
        } => {
            let opts = crate::k8s::controller::ControllerOptions {
                kubeconfig,
                state,
                interval: Duration::from_secs(interval),
                timeout: Duration::from_secs(timeout),
                metrics_addr,
                lease: (lease_namespace, lease_name),
                lease_duration: Duration::from_secs(lease_seconds.max(3)),
                concurrency: concurrency.max(1),
                keep_checkpoints,
                base_policy: base_backup.policy(),
                durable_state,
                identity,
                forge: (forge != crate::forge::ForgeKind::None).then(|| crate::k8s::controller::ControllerForge {
                    kind: forge,
                    url: forge_url,
                    token_secret: forge_token_secret,
                    retry: crate::forge::Retry {
                        attempts: forge_retries,
                        delay: Duration::from_millis(forge_retry_delay_ms),
                    },
                }),
            };
            match crate::k8s::controller::run(opts).await {
                Ok(()) => Ok(EXIT_OK),
                Err(e) => {
                    eprintln!("backstop: {}", crate::run::chain(&e));
                    Ok(EXIT_BAD_INPUT)
                }
            }
        }
        Command::Crd => {
            print!("{}", crate::k8s::crd::crds_yaml()?);
            Ok(EXIT_OK)
        }
        Command::Lock(args) => pause(args, true).await,
        Command::Unlock(args) => pause(args, false).await,
        Command::Plan {
            range,
            repo,
            path,
            format,
            pg_version,
            database_url,
        } => plan(&range, &repo, &path, format, pg_version, database_url.as_deref()).await,
    }
}

/// The exit code of a pass:
/// 0 nothing failed (also while a transient fault is retried), 1 a run was
/// rolled back, 2 a commit is refused (bad input, plan, lint, approval),
/// 3 a person must act (remediation failed, or a transient fault stalled),
/// 4 another instance owns the database (nothing was done).
pub fn pass_exit_code(report: &crate::run::PassReport) -> u8 {
    let mut code = EXIT_OK;
    for (_, outcome, _) in &report.runs {
        code = code.max(match outcome {
            Outcome::Succeeded | Outcome::Deferred => EXIT_OK,
            Outcome::RolledBack => EXIT_ROLLED_BACK,
            Outcome::Failed => EXIT_NEEDS_PERSON,
        });
    }
    if let Some(w) = &report.waiting {
        code = code.max(match w {
            _ if w.needs_person() => EXIT_NEEDS_PERSON,
            crate::gate::Wait::Refused { .. } => EXIT_BAD_INPUT,
            crate::gate::Wait::Busy { .. } => EXIT_BUSY,
            _ => EXIT_OK,
        });
    }
    code
}
