//! TLS to PostgreSQL honours `sslmode` and `sslrootcert` as libpq does,
//! against a real server with `ssl = on` and a CA this test makes with
//! openssl: `verify-full` connects (and a whole run works over it, libpq
//! tools included), a wrong CA or a host the certificate does not name is
//! refused (a run waits, nothing is touched), `require` encrypts without checking, `disable` does not encrypt.

mod common;

use backstop::db::Database;
use backstop::manifests::DatabaseRef;
use common::tls::{make_certs, tls_on};
use common::*;

fn db(url: &str) -> Database {
    Database::from_url(DatabaseRef::Url { var: "TLS_TEST".into() }, url, None).unwrap()
}

async fn encrypted(url: &str) -> Result<bool, String> {
    let client = db(url).connect().await.map_err(|e| backstop::run::chain(&e))?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_and_sslrootcert_are_honoured_against_a_real_tls_server() {
    let mut f = Fixture::new().await;
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    tls_on(&mut f, certs.path()).await;
    let port = f.server.port();
    let ca = certs.path().join("ca.crt").display().to_string();
    let other = certs.path().join("other-ca.crt").display().to_string();
    let url = |host: &str, query: &str| format!("postgresql://postgres@{host}:{port}/shop?{query}");

    assert_eq!(
        encrypted(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await,
        Ok(true)
    );
    let wrong_ca = encrypted(&url("localhost", &format!("sslmode=verify-full&sslrootcert={other}"))).await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from another CA is refused: {wrong_ca:?}"
    );
    let wrong_host = encrypted(&url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(
        wrong_host.is_err(),
        "a host the certificate does not name is refused: {wrong_host:?}"
    );
    assert_eq!(
        encrypted(&url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(true),
        "verify-ca checks the chain, not the name"
    );
    // The CA file is read at the handshake: one that is missing fails the
    // connection, it does not fall back to no verification.
    let missing = encrypted(&url("localhost", "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")).await;
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("failed to connect to database")),
        "{missing:?}"
    );
    assert_eq!(encrypted(&url("127.0.0.1", "sslmode=require")).await, Ok(true));
    assert_eq!(encrypted(&url("127.0.0.1", "sslmode=disable")).await, Ok(false));
    // The keyword form too.
    assert_eq!(
        encrypted(&format!(
            "host=localhost port={port} user=postgres dbname=shop sslmode=verify-full sslrootcert='{ca}'"
        ))
        .await,
        Ok(true)
    );

    // A whole run over verify-full: the runner, the history and pg_basebackup
    // (PGSSLMODE, PGSSLROOTCERT) all connect with it.
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let tls_url = url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let out = f.run_env(&[], &[(DB_VAR, &tls_url)]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.gate(), c1);
    // With the wrong CA nothing is touched: the database cannot be reached,
    // which is waited out as a transient fault (never a revert), named.
    let m2 = carrier("0002-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&m2, "add note");
    let bad_url = url("localhost", &format!("sslmode=verify-full&sslrootcert={other}"));
    let out = f.run_env(&[], &[(DB_VAR, &bad_url)]).await;
    let waiting = f.status()["gates"][0]["waiting"].clone();
    assert_eq!(waiting["kind"], "retrying", "{}", text(&out));
    assert!(
        waiting["cause"]
            .as_str()
            .unwrap_or("")
            .contains("certificate verify failed"),
        "{waiting}"
    );
    assert_eq!(f.gate(), c1, "nothing moved");
    f.assert_nothing_reverted();
    assert_eq!(
        f.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'")
            .await,
        0
    );
}
