//! What the process benchmarks share.

use std::path::Path;
use std::process::Command;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The binary this build made.
pub const BACKSTOP: &str = env!("CARGO_BIN_EXE_backstop");

/// Runs `backstop run --once --checkpoint dump` guarding `apps/shop` of
/// `repo` (reverts as commits), with `DB` set to `url`. Logs at warn, or at
/// `BACKSTOP_BENCH_LOG` (then printed: where a pass spends its time).
/// `bin` is the `backstop` binary: [`BACKSTOP`], or another build to compare with.
pub fn run_once(bin: &Path, repo: &Path, state: &Path, url: &str) -> Res<()> {
    let log = std::env::var("BACKSTOP_BENCH_LOG").ok();
    let out = Command::new(bin)
        .args([
            "run",
            "--once",
            "--checkpoint",
            "dump",
            "--path",
            "apps/shop",
            "--revert",
            "commit",
        ])
        .arg("--repo")
        .arg(repo)
        .arg("--state")
        .arg(state)
        .env("DB", url)
        .env("BACKSTOP_LOG", log.as_deref().unwrap_or("warn"))
        .output()?;
    if log.is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    if !out.status.success() {
        return Err(format!(
            "backstop run failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}
