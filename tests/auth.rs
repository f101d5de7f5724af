//! The replication connection authenticates with trust, md5 and
//! SCRAM-SHA-256 against a real server, and a bad password is a clear error
//! that never shows the password.

use crate::support;

use outbox_relay::pipeline::source::{ConnectParams, ReplicationConnection};
use support::*;

async fn connect(
    url: &str,
) -> Result<ReplicationConnection, outbox_relay::pipeline::source::ReplicationError> {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    ReplicationConnection::connect(&ConnectParams::from_config(&cfg).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_md5_and_scram_authenticate_replication_connections() {
    let cluster = TempCluster::start(
        &[
            "host all,replication relay_md5 127.0.0.1/32 md5",
            "host all,replication relay_scram 127.0.0.1/32 scram-sha-256",
            "host all,replication relay_pw 127.0.0.1/32 password",
        ],
        &[],
    );
    let admin = sql_client(&cluster.url("postgres", None)).await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5';
             CREATE ROLE relay_md5 LOGIN REPLICATION PASSWORD 'md5 secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE relay_scram LOGIN REPLICATION PASSWORD 'scram secret';
             CREATE ROLE relay_pw LOGIN REPLICATION PASSWORD 'plain secret';",
        )
        .await
        .unwrap();

    for (user, password) in [
        ("postgres", None),
        ("relay_md5", Some("md5 secret")),
        ("relay_scram", Some("scram secret")),
        ("relay_pw", Some("plain secret")),
    ] {
        let url = cluster.url(user, password.map(|p| p.replace(' ', "%20")).as_deref());
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let sys = conn.identify_system().await.unwrap();
        assert!(sys.timeline >= 1, "{user}: {sys:?}");
        assert_eq!(sys.dbname.as_deref(), Some("postgres"));
    }

    for user in ["relay_md5", "relay_scram"] {
        let err = match connect(&cluster.url(user, Some("wrong-password-xyz"))).await {
            Ok(_) => panic!("{user}: a wrong password was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("password authentication failed") && err.contains("28P01"),
            "{user}: {err}"
        );
        assert!(!err.contains("wrong-password-xyz"), "{err}");
        let err = match connect(&cluster.url(user, None)).await {
            Ok(_) => panic!("{user}: no password was accepted"),
            Err(e) => e.to_string(),
        };
        assert_contains(&err, "requires a password");
        assert_contains(&err, user);
    }
}

/// Review N11: sql/04_relay_role.sql takes the password from PGOPTIONS and
/// never puts it into a statement's text. With log_statement = all the
/// server log holds no trace of it, neither when the role is created (and
/// the password works) nor when the script fails for a role that may not
/// create roles; a password given as a psql variable is refused before it
/// reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_script_never_logs_the_password() {
    const SECRET: &str = "S3cret-n11-9f4c";
    let cluster = TempCluster::start(
        &["host all outbox_relay 127.0.0.1/32 scram-sha-256"],
        &["log_statement=all"],
    );
    let (_, admin) = cluster.with_outbox().await;
    admin
        .batch_execute("CREATE ROLE limited LOGIN; GRANT CREATE ON DATABASE postgres TO limited")
        .await
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/04_relay_role.sql");
    let bin = std::path::PathBuf::from(std::env::var("PG_BIN_DIR").unwrap());
    let psql = |user: &str, extra: &[&str], pgoptions: &str| {
        let mut cmd = std::process::Command::new(bin.join("psql"));
        // The wheels' psql with its own libpq, as tests/support does for the server.
        if let Some(lib) = bin.parent().map(|p| p.join("lib")) {
            if lib.join("libpq.so.5").exists() {
                cmd.env("LD_LIBRARY_PATH", lib);
            }
        }
        let out = cmd
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &cluster.url(user, None),
                "-f",
                script,
            ])
            .args(extra)
            .env("PGOPTIONS", pgoptions)
            .output()
            .expect("psql");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let with_secret = format!("-c outbox_relay.password={SECRET}");

    let (code, out) = psql("postgres", &[], &with_secret);
    assert_eq!(code, Some(0), "{out}");
    let relay = format!(
        "postgres://outbox_relay:{SECRET}@127.0.0.1:{}/postgres",
        cluster.port
    );
    let (_client, _connection) = tokio_postgres::connect(&relay, tokio_postgres::NoTls)
        .await
        .expect("the role logs in with the password from PGOPTIONS");

    let (code, out) = psql("limited", &["-v", "relay_role=another_relay"], &with_secret);
    assert_ne!(
        code,
        Some(0),
        "a role without CREATEROLE created one: {out}"
    );
    assert!(!out.contains(SECRET), "psql showed the password: {out}");

    let (code, out) = psql("postgres", &["-v", &format!("relay_password={SECRET}")], "");
    assert_ne!(
        code,
        Some(0),
        "a password in a psql variable was taken: {out}"
    );
    assert_contains(&out, "PGOPTIONS");

    let log = cluster.log_text();
    assert!(
        log.contains("CREATE ROLE") || log.contains("DO $$"),
        "statements are logged: {log}"
    );
    assert!(
        !log.contains(SECRET),
        "the server log holds the password:\n{log}"
    );
}
