//! `backstop demo`: the whole story on a throwaway PostgreSQL server and git
//! remote built from the embedded `examples/sre-repo`: one migration that
//! succeeds, one that fails after committing and is rolled back (PITR restore
//! of the data, revert commit of the code). It shows each migration's SQL
//! and verify query and each pass's summary; `--keep` keeps the remote, the
//! state with both evidence reports, and the stopped server.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::local::{self, BackupBackend, LocalOptions};
use crate::pgserver::PgServer;
use crate::run::{Engine, Outcome, PassReport};
use crate::sandbox::{BareRemote, Change};

macro_rules! example {
    ($path:literal) => {
        (
            $path,
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sre-repo/", $path)),
        )
    };
}

/// The sample repo without its migrations.
const BASE: &[(&str, &str)] = &[
    example!("README.md"),
    example!("clusters/develop/shop.yaml"),
    example!("clusters/staging/shop.yaml"),
    example!("clusters/production/shop.yaml"),
    example!("infrastructure/databases/develop/app-db.yaml"),
    example!("infrastructure/databases/staging/app-db.yaml"),
    example!("infrastructure/databases/production/app-db.yaml"),
    example!("apps/shop/kustomization.yaml"),
    example!("apps/shop/base/deployment.yaml"),
    example!("apps/shop/migrations/kustomization.yaml"),
];
const GOOD: (&str, &str) = example!("apps/shop/migrations/0001-create-orders.yaml");
const BAD: (&str, &str) = example!("apps/shop/migrations/0002-backfill-order-totals.yaml");

/// Failures of the demo's own setup (not of the runs it shows).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("failed to start the throwaway PostgreSQL server")]
    Server(#[from] crate::pgserver::PgServerError),
    #[error("failed to build the throwaway git remote")]
    Git(#[from] git2::Error),
    #[error("failed to set up local mode")]
    Local(#[from] local::LocalError),
    #[error("a backstop pass failed")]
    Engine(#[source] Box<crate::run::EngineError>),
    #[error("demo database query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("demo database connection failed")]
    Db(#[from] crate::db::DbError),
    #[error("failed to create the demo folder")]
    Io(#[from] std::io::Error),
    #[error("the demo did not go as designed: {0}")]
    Unexpected(String),
}

/// Runs the demo; `keep` leaves the folder (repo, state, reports) behind.
pub async fn run(keep: bool) -> Result<(), DemoError> {
    say("starting a throwaway PostgreSQL server (WAL archiving on)");
    let mut server = PgServer::start().await?;
    server.create_database("shop").await?;
    let work = tempfile::Builder::new().prefix("backstop-demo-").tempdir()?;
    let root: PathBuf = if keep { work.keep() } else { work.path().to_path_buf() };
    let remote = BareRemote::init(&root.join("sre.git"))?;
    let files: Vec<Change> = BASE.iter().map(|(p, c)| Change::Write(p, c)).collect();
    let base = remote.commit("main", &files, "Initial sre repo: shop app, Flux wiring, CNPG clusters")?;
    remote.set_branch("backstop/gate", &base)?;
    say(&format!(
        "sre remote {} with main and gate at {}",
        remote.path().display(),
        &base[..7]
    ));

    let opts = LocalOptions {
        keep_checkpoints: 0,
        repo: remote.path().display().to_string(),
        upstream: "main".into(),
        gate: "backstop/gate".into(),
        path: "apps/shop".into(),
        checkpoint: BackupBackend::Local,
        pgdata: Some(server.data_dir()),
        wal_archive: Some(server.archive()),
        revert: None,
        replay_lost_writes: false,
        state: root.join("state"),
        env: HashMap::from([("SHOP_DATABASE_URL".to_string(), server.url("shop"))]),
        git_auth: Default::default(),
        forge: None,
        backoff: Default::default(),
        base_policy: Default::default(),
        pgbackrest_stanza: None,
        pgbackrest_config: None,
    };
    let engine = local::engine(&opts).await?;

    say("commit 1: migration 0001-create-orders (expand)");
    show_migration(GOOD);
    let c1 = remote.commit("main", &[Change::Write(GOOD.0, GOOD.1)], "shop: create orders table")?;
    let first = pass(&engine).await?;
    expect(&first, Outcome::Succeeded)?;
    if remote.head("backstop/gate")?.as_deref() != Some(c1.as_str()) {
        return Err(DemoError::Unexpected("the gate did not move to commit 1".into()));
    }

    let client = server.database("shop")?.connect().await?;
    client
        .batch_execute(
            "INSERT INTO orders (customer, quantity, unit_price_cents) VALUES ('ada', 2, 1250), ('grace', 1, 990), ('linus', 3, 400)",
        )
        .await?;
    say("the app writes 3 orders");
    drop(client);

    say("commit 2: migration 0002-backfill-order-totals (migrate), whose backfill skips orders of quantity 1");
    show_migration(BAD);
    let c2 = remote.commit("main", &[Change::Write(BAD.0, BAD.1)], "shop: backfill order totals")?;
    let second = pass(&engine).await?;
    expect(&second, Outcome::RolledBack)?;

    let client = server.database("shop")?.connect().await?;
    let orders: i64 = client.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
    let column: i64 = client
        .query_one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'total_cents'", &[])
        .await?
        .get(0);
    let gate = remote.head("backstop/gate")?.unwrap_or_default();
    let log = remote.log("main")?;
    say(&format!(
        "after rollback: {orders} orders kept, column total_cents {}, gate still at {} (not {}), main: {}",
        if column == 0 {
            "gone (schema restored)"
        } else {
            "STILL THERE"
        },
        &gate[..7.min(gate.len())],
        &c2[..7],
        log.first().cloned().unwrap_or_default()
    ));
    if orders != 3 || column != 0 || gate != c1 || !log.first().is_some_and(|s| s.starts_with("Revert \"")) {
        return Err(DemoError::Unexpected("code and data were not both rolled back".into()));
    }
    let journal = crate::journal::Journal::new(&opts.state);
    if let Some(run) = second
        .runs
        .last()
        .and_then(|(id, _, _)| journal.find(id).ok().flatten())
    {
        if let Some(w) = crate::report::Report::from_run(&run).data_loss_window {
            say(&format!(
                "data-loss window of the restore: {:.3}s (writes committed between the checkpoint and the restore are not in the restored database; the report says where they are kept)",
                w.seconds
            ));
        }
    }
    if keep {
        server.keep_files();
        say("evidence reports (Markdown and JSON beside it; `backstop report RUN --state STATE` prints one):");
        for (id, outcome, location) in first.runs.iter().chain(second.runs.iter()) {
            println!("    {id}  {outcome:?}  {location}");
        }
        say(&format!(
            "kept: the remote, state and reports under {}; the stopped PostgreSQL server (and the data directory the restore set aside) under {}",
            root.display(),
            server.root().display()
        ));
    } else {
        say("the evidence reports, the remote and the server are deleted on exit; `backstop demo --keep` keeps them");
    }
    say("done: one migration promoted, one failure rolled back (code and data)");
    Ok(())
}

/// Prints a carrier's SQL and verify query as backstop reads them.
fn show_migration((file, yaml): (&str, &str)) {
    let snapshot = crate::manifests::Snapshot::from([(file.to_string(), yaml.as_bytes().to_vec())]);
    let Ok(carriers) = crate::manifests::parse_file(&snapshot, file, yaml.as_bytes()) else {
        return;
    };
    for c in carriers {
        for st in &c.statements {
            let sql = st.sql.trim().replace('\n', "\n        ");
            println!("    {}:{}\n        {sql};", st.origin, st.line);
        }
        if let Some(v) = &c.verify {
            println!("    verify: {}", v.trim());
        }
    }
}

async fn pass(engine: &Engine) -> Result<PassReport, DemoError> {
    say("backstop run --once");
    let report = engine.pass().await.map_err(|e| DemoError::Engine(Box::new(e)))?;
    let summary = crate::run::summary::PassSummary::of(&report);
    for line in summary.text().lines() {
        println!("    {line}");
    }
    Ok(report)
}

fn expect(report: &PassReport, outcome: Outcome) -> Result<(), DemoError> {
    match report.runs.last() {
        Some((_, got, _)) if *got == outcome => Ok(()),
        other => Err(DemoError::Unexpected(format!(
            "expected a run that {outcome:?}, got {other:?}"
        ))),
    }
}

fn say(text: &str) {
    println!("==> {text}");
}
