//! TLS on the replication socket: the SSLRequest before start-up, libpq's
//! sslmode, and the server certificate's hash for SCRAM channel binding;
//! TCP keepalives and the user timeout.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::pg::tls::SslMode;

/// SSLRequest, then the TLS handshake if the server agrees; plain TCP for
/// `disable`, and for `prefer` when the server declines.
///
/// Also returns the TLS connection's channel-binding data
/// (`tls-server-end-point`, RFC 5929: a hash of the server's certificate),
/// when there is a TLS connection and the certificate allows it.
pub(super) async fn negotiate_tls(
    mut s: tokio::net::TcpStream,
    host: &str,
    params: &ConnectParams,
    target: &str,
) -> Result<(BoxStream, Option<Vec<u8>>), ReplicationError> {
    let mode = params.tls.mode;
    if mode == SslMode::Disable {
        return Ok((Box::new(s), None));
    }
    // Built (files read) before anything is sent, so a bad file is a
    // configuration error, not a half-open connection.
    let config = params
        .tls
        .client_config()
        .map_err(|e| ReplicationError::Config(e.0))?;
    let name = params
        .tls
        .server_name(host)
        .map_err(|e| ReplicationError::Config(e.0))?;
    let io_err = |source| ReplicationError::Connect {
        target: target.to_string(),
        source,
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    s.write_all(&req).await.map_err(io_err)?;
    // Exactly one byte: nothing after it may be read before the handshake.
    let answer = s.read_u8().await.map_err(io_err)?;
    match answer {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok((Box::new(s), None)),
        b'N' => {
            return Err(ReplicationError::Config(format!(
                "the server at {target} does not accept TLS connections but sslmode is {mode}: enable ssl on the server, or use sslmode=prefer or disable"
            )))
        }
        other => {
            return Err(ReplicationError::Protocol(format!(
                "unexpected answer {:?} to SSLRequest",
                char::from(other)
            )))
        }
    }
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, s)
        .await
        .map_err(
            |e| match crate::pg::tls::describe_handshake_error(&e, mode) {
                // A certificate that does not verify will not start to on a
                // retry: not retryable, like a failed password.
                Some(why) => ReplicationError::Auth(why),
                None => io_err(e),
            },
        )?;
    let binding = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| tls_server_end_point(cert.as_ref()));
    Ok((Box::new(tls), binding))
}

/// RFC 5929's `tls-server-end-point`: the server certificate hashed with its
/// signature's hash function, SHA-256 for MD5 and SHA-1 (and when the
/// algorithm is not recognised). None for a certificate signed without a
/// separate hash (Ed25519): such a server cannot be bound, as in libpq.
pub(super) fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use ring::digest;
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    let oid = signature_algorithm(der)?;
    let algorithm = if SHA384.contains(&oid) {
        &digest::SHA384
    } else if SHA512.contains(&oid) {
        &digest::SHA512
    } else if oid == ED25519 {
        return None;
    } else {
        &digest::SHA256
    };
    Some(digest::digest(algorithm, der).as_ref().to_vec())
}

/// The OID of a DER certificate's `signatureAlgorithm`: Certificate ::=
/// SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, … }, … }.
pub(super) fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    /// One DER element at the start of `b`: (tag, contents, rest).
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        let (len, b) = if first < 0x80 {
            (first as usize, b)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n]
                .iter()
                .fold(0usize, |acc, &x| (acc << 8) | x as usize);
            (len, &b[n..])
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = element(der)? else {
        return None;
    };
    let (0x30, _tbs, rest) = element(cert)? else {
        return None;
    };
    let (0x30, alg, _) = element(rest)? else {
        return None;
    };
    let (0x06, oid, _) = element(alg)? else {
        return None;
    };
    Some(oid)
}

/// TCP keepalive, so a peer that vanished is noticed on an idle connection,
/// and TCP_USER_TIMEOUT, so one that stops acknowledging what the relay
/// writes (status updates) is noticed within `user_timeout`.
pub(super) fn keep_alive(
    s: &tokio::net::TcpStream,
    user_timeout: Option<Duration>,
) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3),
    )?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(user_timeout)?;
    #[cfg(not(target_os = "linux"))]
    let _ = user_timeout;
    Ok(())
}
