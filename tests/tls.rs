//! TLS to Postgres (libpq's sslmode, sslrootcert, sslcert/sslkey) for both
//! the replication connection and the SQL connections (`outbox-relay
//! setup`), against a throwaway cluster that only accepts TLS; and the
//! password sources (URL, file, OUTBOX_RELAY_DATABASE_PASSWORD, PGPASSWORD),
//! with no password ever in the output.

use crate::support;

use std::process::Command;
use std::time::Duration;

use outbox_relay::pg::config::{DatabaseConfig, Overrides};
use outbox_relay::pipeline::source::{ConnectParams, ReplicationConnection};
use support::certs::Pki;
use support::*;

/// The settings of a server with the test CA's server certificate, then
/// `extra`.
fn ssl_settings(pki: &Pki, extra: &[&str]) -> Vec<String> {
    let mut all = vec![
        "ssl=on".to_string(),
        format!("ssl_cert_file={}", pki.path("server.crt")),
        format!("ssl_key_file={}", pki.path("server.key")),
    ];
    all.extend(strings(extra));
    all
}

/// A cluster that rejects every connection without TLS.
fn tls_cluster(pki: &Pki) -> TempCluster {
    let ca = format!("ssl_ca_file={}", pki.path("ca.crt"));
    let settings = ssl_settings(pki, &["listen_addresses=127.0.0.1,127.0.0.2", &ca]);
    TempCluster::start(
        &[
            "hostnossl all,replication all 127.0.0.0/8 reject",
            "hostssl all,replication relay_cert 127.0.0.0/8 cert",
            "hostssl all,replication all 127.0.0.0/8 trust",
        ],
        &settings.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// A superuser client over the cluster's Unix socket (TCP needs TLS).
async fn admin(cluster: &TempCluster) -> tokio_postgres::Client {
    sql_client(&format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.socket_dir().display(),
        cluster.port
    ))
    .await
}

/// Opens a replication connection and runs IDENTIFY_SYSTEM.
async fn replication(url: &str, o: Overrides) -> Result<(), String> {
    let db = DatabaseConfig::resolve(url, o).map_err(|(opt, why)| format!("{opt}: {why}"))?;
    let params = ConnectParams::from_config(&db).map_err(|e| e.to_string())?;
    let mut conn = ReplicationConnection::connect(&params)
        .await
        .map_err(|e| e.to_string())?;
    conn.identify_system().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// `outbox-relay setup`: Ok(stdout) or Err(exit code and stderr).
fn setup(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(relay_bin())
        .arg("setup")
        .args(args)
        .env_remove("OUTBOX_RELAY_DATABASE_URL")
        .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
        .env_remove("PGPASSWORD")
        .envs(env.iter().copied())
        .output()
        .expect("run outbox-relay setup");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn url(host: &str, port: u16, user: &str, params: &str) -> String {
    format!("postgres://{user}@{host}:{port}/postgres?{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_root_certificates_and_client_certificates() {
    let pki = Pki::new();
    let cluster = tls_cluster(&pki);
    admin(&cluster)
        .await
        .batch_execute(&format!(
            "CREATE ROLE relay_cert LOGIN SUPERUSER;
             {}",
            CLASSIC_TABLE
        ))
        .await
        .unwrap();
    let port = cluster.port;
    let ca = pki.path("ca.crt");
    let other_ca = pki.path("other_ca.crt");
    let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));

    // (what, url, expected: Ok or an error substring)
    let cases: Vec<(&str, String, Result<(), &str>)> = vec![
        (
            "disable",
            url("127.0.0.1", port, "postgres", "sslmode=disable"),
            Err("no encryption"),
        ),
        ("prefer", url("127.0.0.1", port, "postgres", ""), Ok(())),
        (
            "require",
            url("127.0.0.1", port, "postgres", "sslmode=require"),
            Ok(()),
        ),
        (
            "require with the wrong CA verifies the chain, as libpq",
            url(
                "127.0.0.1",
                port,
                "postgres",
                &format!("sslmode=require&sslrootcert={other_ca}"),
            ),
            Err("certificate"),
        ),
        (
            "verify-ca",
            url(
                "127.0.0.1",
                port,
                "postgres",
                &format!("sslmode=verify-ca&sslrootcert={ca}"),
            ),
            Ok(()),
        ),
        (
            "verify-full",
            url(
                "127.0.0.1",
                port,
                "postgres",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Ok(()),
        ),
        (
            "verify-full by DNS name",
            url(
                "localhost",
                port,
                "postgres",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Ok(()),
        ),
        (
            "verify-full with the wrong CA",
            url(
                "127.0.0.1",
                port,
                "postgres",
                &format!("sslmode=verify-full&sslrootcert={other_ca}"),
            ),
            Err("certificate"),
        ),
        (
            "verify-full to an address the certificate does not name",
            url(
                "127.0.0.2",
                port,
                "postgres",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Err("not valid for name"),
        ),
        (
            "verify-ca to an address the certificate does not name",
            url(
                "127.0.0.2",
                port,
                "postgres",
                &format!("sslmode=verify-ca&sslrootcert={ca}"),
            ),
            Ok(()),
        ),
        (
            "verify-full without sslrootcert",
            url("127.0.0.1", port, "postgres", "sslmode=verify-full"),
            Err("sslrootcert"),
        ),
        (
            "client certificate",
            url(
                "127.0.0.1",
                port,
                "relay_cert",
                &format!("sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}"),
            ),
            Ok(()),
        ),
        (
            "no client certificate",
            url(
                "127.0.0.1",
                port,
                "relay_cert",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Err("certificate"),
        ),
        (
            "a client key that does not exist",
            url(
                "127.0.0.1",
                port,
                "relay_cert",
                &format!("sslmode=require&sslcert={cert}&sslkey=/nonexistent.key"),
            ),
            Err("/nonexistent.key"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, url, expected) in &cases {
        let repl = replication(url, Overrides::default()).await;
        let sql = setup(&["--database-url", url], &[]).map(|_| ());
        for (conn, got) in [("replication", repl), ("setup", sql)] {
            let ok = match (&got, expected) {
                (Ok(()), Ok(())) => true,
                (Err(e), Err(want)) => e.contains(want),
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{what} ({conn}): expected {expected:?}, got {got:?}"
                ));
            }
        }
    }

    // sslrootcert=system: the system's CAs, found as OpenSSL finds them
    // (SSL_CERT_FILE first). With the test CA as the "system" bundle the
    // server verifies, with verify-full implied; with another bundle it does
    // not; a weaker sslmode beside it is refused, as by libpq.
    let system = url("127.0.0.1", port, "postgres", "sslrootcert=system");
    if let Err(e) = setup(&["--database-url", &system], &[("SSL_CERT_FILE", &ca)]) {
        failures.push(format!(
            "sslrootcert=system, the test CA as the system bundle: {e}"
        ));
    }
    let by_ip = url("127.0.0.2", port, "postgres", "sslrootcert=system");
    match setup(&["--database-url", &by_ip], &[("SSL_CERT_FILE", &ca)]) {
        Err(e) if e.contains("not valid for name") => {}
        other => failures.push(format!(
            "sslrootcert=system must check the host name (verify-full): {other:?}"
        )),
    }
    match setup(
        &["--database-url", &system],
        &[("SSL_CERT_FILE", &other_ca)],
    ) {
        Err(e) if e.contains("certificate") => {}
        other => failures.push(format!(
            "sslrootcert=system with a bundle that lacks the CA: {other:?}"
        )),
    }
    let weak = url(
        "127.0.0.1",
        port,
        "postgres",
        "sslmode=require&sslrootcert=system",
    );
    match setup(&["--database-url", &weak], &[("SSL_CERT_FILE", &ca)]) {
        Err(e) if e.contains("verify-full") => {}
        other => failures.push(format!(
            "sslmode=require with sslrootcert=system must be refused: {other:?}"
        )),
    }

    // The options override the URL's parameters.
    let plain = url("127.0.0.1", port, "relay_cert", "sslmode=disable");
    let opts = Overrides {
        ssl_mode: Some(outbox_relay::pg::tls::SslMode::VerifyFull),
        ssl_root_cert: Some(ca.clone().into()),
        ssl_cert: Some(cert.clone().into()),
        ssl_key: Some(key.clone().into()),
        ..Overrides::default()
    };
    if let Err(e) = replication(&plain, opts).await {
        failures.push(format!("options (replication): {e}"));
    }
    if let Err(e) = setup(
        &[
            "--database-url",
            &plain,
            "--ssl-mode",
            "verify-full",
            "--ssl-root-cert",
            &ca,
        ],
        &[
            ("OUTBOX_RELAY_SSL_CERT", &cert),
            ("OUTBOX_RELAY_SSL_KEY", &key),
        ],
    ) {
        failures.push(format!("options (setup): {e}"));
    }
    // A keyword string carries them too.
    let kw = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{ca}'"
    );
    if let Err(e) = replication(&kw, Overrides::default()).await {
        failures.push(format!("keyword string (replication): {e}"));
    }
    if let Err(e) = setup(&["--database-url", &kw], &[]) {
        failures.push(format!("keyword string (setup): {e}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A cluster that wants SCRAM passwords over plain TCP.
async fn password_cluster() -> TempCluster {
    let cluster = TempCluster::start(
        &["host all,replication relay_pw 127.0.0.1/32 scram-sha-256"],
        &[],
    );
    sql_client(&cluster.url("postgres", None))
        .await
        .batch_execute(&format!(
            "CREATE ROLE relay_pw LOGIN SUPERUSER PASSWORD 'pw from the file';
             {CLASSIC_TABLE}"
        ))
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_a_file_and_the_environment() {
    let cluster = password_cluster().await;
    let dir = std::env::temp_dir().join(unique("pwfile"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, "pw from the file\n").unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "Wr0ngPassw0rd-in-file\n").unwrap();
    let good = good.display().to_string();
    let bad = bad.display().to_string();
    let no_pw = cluster.url("relay_pw", None);
    let wrong_in_url = cluster.url("relay_pw", Some("Wr0ngPassw0rd-in-url"));

    // Replication connection.
    let with = |o: Overrides| replication(&no_pw, o);
    with(Overrides {
        password_file: Some(good.clone().into()),
        ..Overrides::default()
    })
    .await
    .unwrap();
    with(Overrides {
        password: Some("pw from the file".into()),
        ..Overrides::default()
    })
    .await
    .unwrap();
    with(Overrides {
        pgpassword: Some("pw from the file".into()),
        ..Overrides::default()
    })
    .await
    .unwrap();
    let e = with(Overrides::default()).await.unwrap_err();
    assert_contains(&e, "requires a password");

    // SQL connection, through the binary's options and environment.
    let ok = |args: &[&str], env: &[(&str, &str)]| {
        setup(args, env).unwrap_or_else(|e| panic!("{args:?} {env:?}: {e}"));
    };
    ok(
        &["--database-url", &no_pw, "--database-password-file", &good],
        &[],
    );
    ok(
        &["--database-url", &no_pw],
        &[("OUTBOX_RELAY_DATABASE_PASSWORD_FILE", &good)],
    );
    ok(
        &["--database-url", &no_pw],
        &[("OUTBOX_RELAY_DATABASE_PASSWORD", "pw from the file")],
    );
    ok(
        &["--database-url", &no_pw],
        &[("PGPASSWORD", "pw from the file")],
    );
    // The file wins over the URL's password; PGPASSWORD does not.
    ok(
        &[
            "--database-url",
            &wrong_in_url,
            "--database-password-file",
            &good,
        ],
        &[],
    );
    let e = setup(
        &["--database-url", &wrong_in_url],
        &[("PGPASSWORD", "pw from the file")],
    )
    .unwrap_err();
    assert_contains(&e, "password authentication failed");
    assert!(!e.contains("Wr0ngPassw0rd"), "{e}");

    let e = setup(
        &["--database-url", &no_pw, "--database-password-file", &bad],
        &[],
    )
    .unwrap_err();
    assert_contains(&e, "password authentication failed");
    assert!(!e.contains("Wr0ngPassw0rd"), "{e}");

    let missing = dir.join("missing").display().to_string();
    let e = setup(
        &[
            "--database-url",
            &no_pw,
            "--database-password-file",
            &missing,
        ],
        &[],
    )
    .unwrap_err();
    assert!(
        e.starts_with("exit Some(2)")
            && e.contains("database_password_file")
            && e.contains(&missing),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// (name, arguments, environment)
type Way<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);

/// Every command, with the password in each place it can come from, and a
/// host that does not exist or a port nobody listens on: the password is
/// never in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_output() {
    const SECRET: &str = "S3cretPassw0rdNeverLogged";
    let dir = std::env::temp_dir().join(unique("pwleak"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pw");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let file = file.display().to_string();
    let dead_port = free_port();
    for host in ["no-such-host.invalid", "127.0.0.1"] {
        let with_pw = format!("postgres://relay:{SECRET}@{host}:{dead_port}/db?connect_timeout=2");
        let without = format!("postgres://relay@{host}:{dead_port}/db?connect_timeout=2");
        let ways: [Way; 4] = [
            ("url", vec!["--database-url", &with_pw], vec![]),
            (
                "file",
                vec![
                    "--database-url",
                    &without,
                    "--database-password-file",
                    &file,
                ],
                vec![],
            ),
            (
                "env",
                vec!["--database-url", &without],
                vec![("OUTBOX_RELAY_DATABASE_PASSWORD", SECRET)],
            ),
            (
                "PGPASSWORD",
                vec!["--database-url", &without],
                vec![("PGPASSWORD", SECRET)],
            ),
        ];
        for (way, args, env) in &ways {
            for cmd in ["setup", "check", "status", "verify"] {
                let out = Command::new(relay_bin())
                    .arg(cmd)
                    .args(args)
                    .args(["--kafka-brokers", "127.0.0.1:1"])
                    .envs(env.iter().copied())
                    .env("OUTBOX_RELAY_LOG", "debug")
                    .output()
                    .unwrap();
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(!out.status.success(), "{cmd} {way} {host}: {text}");
                assert!(!text.contains(SECRET), "{cmd} {way} {host}: {text}");
            }
            // `run` retries a lost connection: read its log for a while.
            let mut run_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            run_args.extend(["--kafka-brokers".into(), "127.0.0.1:1".into()]);
            let log_path = dir.join(format!("run-{way}-{host}.log"));
            let mut child = Command::new(relay_bin())
                .arg("run")
                .args(&run_args)
                .envs(env.iter().copied())
                .env("OUTBOX_RELAY_LOG", "debug")
                .env("OUTBOX_RELAY_HTTP_ADDRESS", "off")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap();
            // Until the relay got past the code that could leak: it gave up
            // on a session (and says it retries) or stopped.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                if log.contains("replication session ended")
                    || log.contains("retry_in")
                    || child.try_wait().unwrap().is_some()
                {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "run {way} {host}: no session attempt in 30 s: {log}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap();
            assert!(!log.is_empty(), "run {way} {host}: empty log");
            assert!(!log.contains(SECRET), "run {way} {host}: {log}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// M5 of the December 2026 review: SCRAM over TLS binds the exchange to the
/// TLS connection (SCRAM-SHA-256-PLUS, tls-server-end-point), so a man in
/// the middle who terminates TLS cannot relay the authentication.
/// `channel_binding=require` proves it was used: it fails wherever the
/// binding cannot be made. And `require_auth` holds the server to SCRAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_uses_channel_binding_and_require_auth_holds() {
    let pki = Pki::new();
    let settings = ssl_settings(&pki, &[]);
    let cluster = TempCluster::start(
        &[
            "hostssl all,replication scram_user 127.0.0.0/8 scram-sha-256",
            "hostnossl all,replication scram_user 127.0.0.0/8 scram-sha-256",
            "host all,replication md5_user 127.0.0.0/8 md5",
        ],
        &settings.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    admin(&cluster)
        .await
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret';",
        )
        .await
        .unwrap();
    let port = cluster.port;
    let scram = |params: &str| url("127.0.0.1", port, "scram_user:scram-secret", params);
    let md5 = |params: &str| url("127.0.0.1", port, "md5_user:md5-secret", params);
    let cases: Vec<(&str, String, Result<(), &str>)> = vec![
        ("bound over TLS", scram("sslmode=require&channel_binding=require"), Ok(())),
        ("preferred over TLS", scram("sslmode=require"), Ok(())),
        (
            "required without TLS",
            scram("sslmode=disable&channel_binding=require"),
            Err("the connection has no TLS to bind to"),
        ),
        ("plain SCRAM without TLS", scram("sslmode=disable"), Ok(())),
        (
            "require_auth=scram-sha-256 against md5",
            md5("sslmode=disable&require_auth=scram-sha-256"),
            Err("the server asked for md5 authentication, which require_auth=scram-sha-256 does not allow"),
        ),
        ("md5 when allowed", md5("sslmode=disable&require_auth=md5,scram-sha-256"), Ok(())),
    ];
    for (what, u, expected) in cases {
        let got = replication(&u, Overrides::default()).await;
        match (&got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(part)) if e.contains(part) => {
                assert!(!e.contains("secret"), "{what}: {e}");
            }
            _ => panic!("{what}: expected {expected:?}, got {got:?}"),
        }
    }
}
