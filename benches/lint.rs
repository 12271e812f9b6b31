//! Lint (`cargo bench --bench lint`): `backstop lint` and squawk (the
//! anchor, when `squawk` is on the PATH: `pip install squawk-cli`) on the same
//! generated corpus of `BACKSTOP_BENCH_LINT_MB` (default 50) MB of migration
//! SQL, as one file and as migrations of about 64 KiB. Each run is a child
//! process: wall time and its peak RSS (`wait4`). Linear growth shows in the
//! MB/s of the one file against the small ones. Then both on the real
//! migrations under `tests/lint/real/` (median of `BACKSTOP_BENCH_LINT_REPS`,
//! default 5, alternating). With pyenv, point
//! `BACKSTOP_BENCH_SQUAWK=$(pyenv which squawk)` at the binary itself.

use std::path::{Path, PathBuf};
use std::time::Instant;

const TEMPLATES: &[&str] = &[
    "CREATE TABLE t{n} (id bigserial PRIMARY KEY, customer text NOT NULL, qty integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now());",
    "ALTER TABLE t{n} ADD COLUMN note_{n} text;",
    "CREATE INDEX CONCURRENTLY t{n}_customer ON t{n} (customer);",
    "UPDATE t{n} SET qty = qty + 1 WHERE id BETWEEN {n} AND {n} + 1000;",
    "ALTER TABLE t{n} ADD CONSTRAINT t{n}_qty CHECK (qty >= 0) NOT VALID;",
    "INSERT INTO t{n} (customer, qty) SELECT 'c' || g, g FROM generate_series(1, 100) g;",
    "ALTER TABLE t{n} DROP COLUMN legacy_{n};",
    "CREATE VIEW v{n} AS SELECT customer, sum(qty) AS total FROM t{n} GROUP BY customer;",
    "-- a comment about migration {n}\nDELETE FROM t{n} WHERE created_at < now() - interval '1 year';",
    "ALTER TABLE t{n} ALTER COLUMN customer SET NOT NULL;",
];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let mb: usize = std::env::var("BACKSTOP_BENCH_LINT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir()?;
    let (one, many, statements) = corpus(dir.path(), mb << 20)?;
    let size = std::fs::metadata(&one)?.len() as f64 / 1048576.0;
    println!(
        "corpus: {size:.1} MB, {statements} statements; as one file and as {} files of ~64 KiB",
        many.len()
    );
    let backstop = PathBuf::from(env!("CARGO_BIN_EXE_backstop"));
    // `BACKSTOP_BENCH_SQUAWK` names the binary itself (a pyenv shim on the
    // PATH would add its own start-up to every squawk figure).
    let squawk = std::env::var_os("BACKSTOP_BENCH_SQUAWK")
        .map(PathBuf::from)
        .or_else(|| which("squawk"));
    // squawk is stopped after this long (its one-file run grows faster than
    // linearly); the figure is then a lower bound.
    let cap: f64 = std::env::var("BACKSTOP_BENCH_LINT_CAP_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300.0);
    for (label, files) in [("64 KiB files", many.clone()), ("one file", vec![one.clone()])] {
        let (secs, rss, _) = measure(&backstop, &["lint"], &files, f64::INFINITY)?;
        print!(
            "lint, {label}: backstop {secs:.2} s ({:.1} MB/s), peak RSS {:.0} MiB",
            size / secs,
            rss as f64 / 1024.0
        );
        match &squawk {
            Some(program) => {
                let (s, r, finished) = measure(program, &[], &files, cap)?;
                let over = if finished { "" } else { "> " };
                println!(
                    " | squawk {over}{s:.2} s ({:.1} MB/s), peak RSS {:.0} MiB | throughput backstop/squawk {over}{:.2}",
                    size / s,
                    r as f64 / 1024.0,
                    s / secs
                );
            }
            None => println!(" | squawk not on the PATH (pip install squawk-cli)"),
        }
    }
    real(&backstop, squawk.as_deref())
}

/// Both linters on the real migrations (tests/lint/real), alternating.
fn real(backstop: &Path, squawk: Option<&Path>) -> Res<()> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lint/real"))];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "sql") {
                files.push(p);
            }
        }
    }
    files.sort();
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let size = bytes as f64 / 1048576.0;
    let reps: usize = std::env::var("BACKSTOP_BENCH_LINT_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        ours.push(measure(backstop, &["lint"], &files, f64::INFINITY)?.0);
        if let Some(program) = squawk {
            theirs.push(measure(program, &[], &files, f64::INFINITY)?.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let b = median(&mut ours);
    print!(
        "lint, real migrations ({} files, {size:.1} MB): backstop {b:.3} s ({:.1} MB/s)",
        files.len(),
        size / b
    );
    if theirs.is_empty() {
        println!(" | squawk not on the PATH");
    } else {
        let s = median(&mut theirs);
        println!(
            " | squawk {s:.3} s ({:.1} MB/s) | throughput backstop/squawk {:.2}",
            size / s,
            s / b
        );
    }
    Ok(())
}

/// Writes the corpus as one file and as ~64 KiB files.
fn corpus(dir: &Path, target: usize) -> Res<(PathBuf, Vec<PathBuf>, usize)> {
    let one = dir.join("all.sql");
    let mut all = String::with_capacity(target + 1024);
    let mut many = Vec::new();
    let mut current = String::new();
    let mut n = 0usize;
    while all.len() < target {
        let stmt = TEMPLATES[n % TEMPLATES.len()].replace("{n}", &n.to_string());
        all.push_str(&stmt);
        all.push('\n');
        current.push_str(&stmt);
        current.push('\n');
        n += 1;
        if current.len() >= 64 * 1024 {
            let path = dir.join(format!("m{:05}.sql", many.len()));
            std::fs::write(&path, std::mem::take(&mut current))?;
            many.push(path);
        }
    }
    if !current.is_empty() {
        let path = dir.join(format!("m{:05}.sql", many.len()));
        std::fs::write(&path, current)?;
        many.push(path);
    }
    std::fs::write(&one, all)?;
    Ok((one, many, n))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Runs `program args files` to its end or for `cap` seconds (then killed):
/// wall seconds, peak RSS (KiB) and whether it finished. Findings make
/// linters exit non-zero: only a signal we did not send is a failure.
fn measure(program: &Path, args: &[&str], files: &[PathBuf], cap: f64) -> Res<(f64, i64, bool)> {
    let start = Instant::now();
    let mut child = std::process::Command::new(program)
        .args(args)
        .args(files)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut status = 0;
    // SAFETY: wait4 on our own child, with valid pointers to locals.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        let pid = unsafe { nix::libc::wait4(child.id() as i32, &mut status, nix::libc::WNOHANG, &mut usage) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if pid > 0 {
            break;
        }
        if !killed && start.elapsed().as_secs_f64() > cap {
            child.kill()?;
            killed = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let secs = start.elapsed().as_secs_f64();
    if !killed && nix::libc::WIFSIGNALED(status) {
        return Err(format!("{} died of signal {}", program.display(), nix::libc::WTERMSIG(status)).into());
    }
    Ok((secs.min(if killed { cap } else { secs }), usage.ru_maxrss, !killed))
}
