//! The `backstop` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // glibc gives each thread that contends for malloc an arena of its own
    // (up to 8 per core) and rarely returns their memory: the controller's
    // blocking git tasks would each grow one. Two are plenty here.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
    // Also before any other thread: it sets environment variables. libgit2
    // starts on a thread of its own meanwhile, until `finish` below.
    let git = backstop::git::start_deferring_ca_bundle();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKSTOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal (and never with NO_COLOR):
        // escape codes in a file or a CI log are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .init();
    // Parsed before libgit2 has surely started, and said after: an exit
    // (`--help`, a bad argument) never meets OpenSSL halfway through its start.
    let cli = backstop::cli::Cli::try_parse();
    // Before any other thread is made (the runtime's).
    git.finish();
    let cli = cli.unwrap_or_else(|e| e.exit());
    let runtime = match backstop::cli::runtime_for(&cli) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backstop: failed to start the async runtime: {e}");
            return ExitCode::from(backstop::cli::EXIT_NEEDS_PERSON);
        }
    };
    let code = match runtime.block_on(backstop::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("backstop: {e:#}");
            backstop::cli::EXIT_NEEDS_PERSON
        }
    };
    // The command is done (its files synced where they must be, its
    // children waited for): the process ends without taking the runtime
    // apart. What is still spawned (idle database sessions and their
    // timers) is not waited for, and the memory is the kernel's to free,
    // not ours to walk page by page.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(i32::from(code))
}
