use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use super::*;

#[test]
fn frames_copy_data_and_copy_both() {
    let mut buf = BytesMut::new();
    buf.put_u8(b'W');
    buf.put_u32(7);
    buf.put_slice(&[0, 0, 0]);
    buf.put_u8(b'd');
    buf.put_u32(4 + 18);
    buf.put_u8(b'k');
    buf.put_u64(0x1_0000_0010);
    buf.put_i64(5);
    buf.put_u8(1);
    assert!(matches!(
        parse_frame(&mut buf).unwrap(),
        Some(Frame::CopyBothResponse)
    ));
    match parse_frame(&mut buf).unwrap() {
        Some(Frame::CopyData(d)) => match parse_copy_data(d).unwrap() {
            ReplicationMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            } => {
                assert_eq!(wal_end, Lsn(0x1_0000_0010));
                assert_eq!(send_time, 5);
                assert!(reply_requested);
            }
            other => panic!("{other:?}"),
        },
        _ => panic!("expected CopyData"),
    }
    assert!(buf.is_empty());
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut buf = BytesMut::from(&b"d\0\0\0\x10kab"[..]);
    assert!(parse_frame(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), 8);
}

#[test]
fn truncated_replication_messages_are_errors() {
    assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"k")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"?")).is_err());
}

/// A fake server on the other end of an in-memory pipe: reads the
/// start-up packet, then plays `script` (raw backend messages) and hands
/// back everything the client wrote after start-up.
async fn against(
    script: Vec<Vec<u8>>,
    require_auth: &str,
) -> (Result<(), ReplicationError>, Vec<u8>) {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let len = server.read_u32().await.unwrap() as usize;
        let mut startup = vec![0; len - 4];
        server.read_exact(&mut startup).await.unwrap();
        for m in script {
            server.write_all(&m).await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
        rest
    });
    let cfg: tokio_postgres::Config = "host=h user=u password=secret dbname=d".parse().unwrap();
    let mut params = ConnectParams::from_config(&cfg).unwrap();
    params.tls.require_auth = crate::pg::tls::RequireAuth::parse(require_auth).unwrap();
    let mut conn = ReplicationConnection {
        stream: Box::new(client),
        buf: BytesMut::new(),
        out: BytesMut::new(),
    };
    let result = conn.startup(&params, None).await;
    drop(conn);
    (result, server_task.await.unwrap())
}

fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(extra);
    m
}

/// M5 of the December 2026 review: AuthenticationOk right after the
/// client's first SCRAM message is refused (the server never proved
/// it knows the password).
#[tokio::test]
async fn scram_must_end_with_the_servers_signature() {
    let (result, _) = against(vec![auth(10, b"SCRAM-SHA-256\0\0"), auth(0, b"")], "").await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("without its final message"), "{err}");
}

/// M5: require_auth holds the server to the methods allowed; a
/// cleartext request gets no password.
#[tokio::test]
async fn require_auth_refuses_a_weaker_method_before_sending_anything() {
    for (ask, rule) in [(3, "scram-sha-256"), (5, "scram-sha-256"), (3, "!password")] {
        let extra: &[u8] = if ask == 5 { b"salt" } else { b"" };
        let (result, sent) = against(vec![auth(ask, extra)], rule).await;
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains(&format!("require_auth={rule} does not allow")),
            "{err}"
        );
        assert!(
            !sent.windows(6).any(|w| w == b"secret") && !sent.contains(&b'p'),
            "something was sent: {sent:?}"
        );
    }
    // trust, when require_auth wants a password method.
    let (result, _) = against(vec![auth(0, b"")], "md5,scram-sha-256").await;
    assert!(result
        .unwrap_err()
        .to_string()
        .contains("none authentication"));
    // Without require_auth, libpq's default: any method is answered.
    let (result, sent) = against(
        vec![auth(3, b""), auth(0, b""), b"Z\0\0\0\x05I".to_vec()],
        "",
    )
    .await;
    result.unwrap();
    assert!(sent.windows(6).any(|w| w == b"secret"));
}

#[test]
fn end_point_hash_follows_the_signature_algorithm() {
    // A minimal certificate shape: SEQUENCE { SEQUENCE {}, SEQUENCE { OID } }.
    let cert = |oid: &[u8]| {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut inner = vec![0x30, 0x00, 0x30, alg.len() as u8];
        inner.extend_from_slice(&alg);
        let mut der = vec![0x30, inner.len() as u8];
        der.extend_from_slice(&inner);
        der
    };
    let sha256_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    let sha384_ecdsa = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    assert_eq!(tls_server_end_point(&cert(&sha256_rsa)).unwrap().len(), 32);
    assert_eq!(
        tls_server_end_point(&cert(&sha384_ecdsa)).unwrap().len(),
        48
    );
    assert_eq!(tls_server_end_point(&cert(&[0x2b, 0x65, 0x70])), None);
    assert_eq!(tls_server_end_point(b"\x30\x05junk"), None);
}

#[test]
fn quoting() {
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(quote_literal("it's"), "'it''s'");
}

/// libpq's multi-host form: one port for all hosts or one per host, in order,
/// with target_session_attrs; a count of ports that fits neither is refused.
#[test]
fn several_hosts_with_their_ports_and_session_attrs() {
    use tokio_postgres::config::TargetSessionAttrs;
    let hosts = |s: &str| -> Result<ConnectParams, ReplicationError> {
        let cfg: tokio_postgres::Config = s.parse().unwrap();
        ConnectParams::from_config(&cfg)
    };
    let tcp = |p: &ConnectParams| -> Vec<String> {
        p.hosts
            .iter()
            .map(|(h, port)| match h {
                HostAddr::Tcp(h) => format!("{h}:{port}"),
                #[cfg(unix)]
                HostAddr::Unix(d) => format!("{}:{port}", d.display()),
            })
            .collect()
    };
    let p = hosts("host=a,b port=5432,5433 user=u target_session_attrs=read-write").unwrap();
    assert_eq!(tcp(&p), ["a:5432", "b:5433"]);
    assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert_eq!(
        p.target(),
        "a:5432",
        "the first host until connect tries the others"
    );
    let p = hosts("postgres://u@a:6000,b:6001/db?options=-c%20wal_sender_timeout%3D5s").unwrap();
    assert_eq!(tcp(&p), ["a:6000", "b:6001"]);
    assert_eq!(p.options.as_deref(), Some("-c wal_sender_timeout=5s"));
    assert_eq!(p.target_session_attrs, TargetSessionAttrs::Any);
    let p = hosts("host=a,b,c port=7000 user=u").unwrap();
    assert_eq!(tcp(&p), ["a:7000", "b:7000", "c:7000"]);
    match hosts("host=a,b,c port=1,2 user=u") {
        Err(ReplicationError::Config(m)) => assert!(m.contains("3 hosts but 2 ports"), "{m}"),
        other => panic!("{:?}", other.map(|p| p.hosts.len())),
    }
}
