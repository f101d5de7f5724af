//! The replication connection authenticates with trust, md5 and
//! SCRAM-SHA-256 against a real server, and a bad password is a clear error
//! that never shows the password.

mod support;

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
        assert!(
            err.contains("requires a password") && err.contains(user),
            "{err}"
        );
    }
}
