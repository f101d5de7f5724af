use std::path::PathBuf;

use super::*;
use crate::pg::config::*;

#[test]
fn url_parameters_are_taken_out() {
    let (rest, p) = split_ssl_params(
        "postgres://u:p%3Fw@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
    )
    .unwrap();
    assert_eq!(rest, "postgres://u:p%3Fw@h:5/db?application_name=x");
    assert_eq!(p.mode, Some(SslMode::VerifyFull));
    assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
    assert_eq!(p.cert, Some(PathBuf::from("/c.pem")));
    assert_eq!(p.key, Some(PathBuf::from("/k.pem")));
    let (rest, p) = split_ssl_params("postgres://u@h/db?sslmode=require").unwrap();
    assert_eq!(rest, "postgres://u@h/db");
    assert_eq!(p.mode, Some(SslMode::Require));
    let (rest, p) = split_ssl_params("postgresql://u@h/db").unwrap();
    assert_eq!(rest, "postgresql://u@h/db");
    assert_eq!(p, SslParams::default());
    assert!(split_ssl_params("postgres://u@h/db?sslmode=bogus").is_err());
}

#[test]
fn keyword_parameters_are_taken_out() {
    let (rest, p) = split_ssl_params(
        "host=h user = u password='it\\'s a secret' sslmode=verify-ca sslrootcert='/my dir/ca.pem' dbname=d",
    )
    .unwrap();
    assert_eq!(p.mode, Some(SslMode::VerifyCa));
    assert_eq!(p.root_cert, Some(PathBuf::from("/my dir/ca.pem")));
    let cfg: tokio_postgres::Config = rest.parse().unwrap();
    assert_eq!(cfg.get_password(), Some(&b"it's a secret"[..]));
    assert_eq!(cfg.get_user(), Some("u"));
    assert_eq!(cfg.get_dbname(), Some("d"));
}

#[test]
fn passwords_come_from_the_options_the_url_or_pgpassword() {
    let resolve = |url: &str, o: Overrides| DatabaseConfig::resolve(url, o).unwrap();
    let pw = |d: DatabaseConfig| {
        d.get_password()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
    };
    let url = "postgres://u:fromurl@h/db?sslmode=disable";
    assert_eq!(
        pw(resolve(url, Overrides::default())).as_deref(),
        Some("fromurl")
    );
    let o = || Overrides {
        pgpassword: Some("pg".into()),
        ..Overrides::default()
    };
    assert_eq!(pw(resolve(url, o())).as_deref(), Some("fromurl"));
    assert_eq!(pw(resolve("postgres://u@h/db", o())).as_deref(), Some("pg"));
    let o = Overrides {
        password: Some("opt".into()),
        ..o()
    };
    assert_eq!(pw(resolve(url, o)).as_deref(), Some("opt"));

    let dir = std::env::temp_dir().join(format!("outbox-relay-pw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pw");
    std::fs::write(&file, "from file\r\n").unwrap();
    let o = Overrides {
        password_file: Some(file.clone()),
        ..Overrides::default()
    };
    assert_eq!(pw(resolve(url, o)).as_deref(), Some("from file"));
    let (option, reason) = DatabaseConfig::resolve(
        url,
        Overrides {
            password_file: Some(dir.join("missing")),
            ..Overrides::default()
        },
    )
    .unwrap_err();
    assert_eq!(option, "database_password_file");
    assert!(
        reason.contains("cannot read") && reason.contains("missing"),
        "{reason}"
    );
    assert!(DatabaseConfig::resolve(
        url,
        Overrides {
            password_file: Some(file),
            password: Some("x".into()),
            ..Overrides::default()
        },
    )
    .is_err());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tls_settings_come_from_the_url_and_the_options_win() {
    let d =
        DatabaseConfig::resolve("postgres://u@h/db?sslmode=require", Overrides::default()).unwrap();
    assert_eq!(d.tls.mode, SslMode::Require);
    let d = DatabaseConfig::resolve("postgres://u@h/db", Overrides::default()).unwrap();
    assert_eq!(d.tls.mode, SslMode::Prefer);
    let d = DatabaseConfig::resolve(
        "postgres://u@h/db?sslmode=require",
        Overrides {
            ssl_mode: Some(SslMode::Disable),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(d.tls.mode, SslMode::Disable);
    // verify-* without a root certificate is a configuration error.
    let (option, reason) = DatabaseConfig::resolve(
        "postgres://u:secret@h/db?sslmode=verify-full",
        Overrides::default(),
    )
    .unwrap_err();
    assert_eq!(option, "database_url");
    assert!(
        reason.contains("sslrootcert") && !reason.contains("secret"),
        "{reason}"
    );
    let (_, reason) = DatabaseConfig::resolve(
        "postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
        Overrides::default(),
    )
    .unwrap_err();
    assert!(reason.contains("/nonexistent/ca.pem"), "{reason}");
    let (_, reason) =
        DatabaseConfig::resolve("postgres://u@h/db?sslcert=/c.pem", Overrides::default())
            .unwrap_err();
    assert!(reason.contains("sslkey"), "{reason}");
}
