//! Lint throughput (`cargo bench --bench lint`): a generated corpus of
//! `BACKSTOP_BENCH_LINT_MB` (default 12) MB of migration SQL, split into
//! migrations of about 64 KiB, parsed and classified. Prints MB/s.

use std::time::Instant;

use backstop::lint::{self, LintOptions};

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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mb: usize = std::env::var("BACKSTOP_BENCH_LINT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let target = mb * 1024 * 1024;
    let mut migrations = Vec::new();
    let mut current = String::new();
    let mut total = 0usize;
    let mut n = 0usize;
    while total < target {
        let stmt = TEMPLATES[n % TEMPLATES.len()].replace("{n}", &n.to_string());
        current.push_str(&stmt);
        current.push('\n');
        total += stmt.len() + 1;
        n += 1;
        if current.len() >= 64 * 1024 {
            migrations.push(std::mem::take(&mut current));
        }
    }
    migrations.push(current);
    let start = Instant::now();
    let mut findings = 0usize;
    let mut statements = 0usize;
    for (i, m) in migrations.iter().enumerate() {
        let parsed = backstop::sql::split(&format!("m{i}.sql"), m, 1).expect("generated SQL parses");
        statements += parsed.len();
        findings += lint::lint(&parsed, LintOptions::default()).len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "lint: {:.1} MB in {} migrations, {statements} statements, {findings} findings, {secs:.2}s: {:.2} MB/s, {:.0} statements/s",
        total as f64 / 1048576.0,
        migrations.len(),
        total as f64 / 1048576.0 / secs,
        statements as f64 / secs
    );
}
