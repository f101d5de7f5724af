//! The logical replication connection: the relay's source.
//!
//! No published tokio-postgres speaks the streaming replication (CopyBoth)
//! sub-protocol, so this module writes it on top of `postgres-protocol`'s
//! message codecs and authentication: startup with `replication=database`,
//! trust / cleartext / md5 / SCRAM-SHA-256 authentication, simple queries
//! (`IDENTIFY_SYSTEM`, `SHOW`), `START_REPLICATION … LOGICAL`, and then the
//! CopyBoth stream of XLogData and primary keepalive messages, answered with
//! standby status updates.
//!
//! TLS (libpq's sslmode semantics, see `tls`) is negotiated with an
//! SSLRequest before the startup message, as libpq does.
//!
//! This is the only module that touches the replication socket.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_postgres::config::Host;

use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pg::tls::{AuthMethod, DatabaseSource, SslMode, TlsSettings};
use crate::pipeline::decode::pgoutput::PG_EPOCH_OFFSET_SECS;

/// Typed errors of the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to Postgres at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on the replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the replication connection")]
    Closed,
    #[error("{0}")]
    Server(ServerError),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    #[error("invalid database configuration: {0}")]
    Config(String),
}

impl ReplicationError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// An ErrorResponse from the server, with the fields operators need.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

fn server_error(mut fields: ErrorFields<'_>) -> ReplicationError {
    let mut e = ServerError::default();
    loop {
        match fields.next() {
            Ok(Some(field)) => {
                let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                match field.type_() {
                    b'V' => e.severity = value,
                    b'S' if e.severity.is_empty() => e.severity = value,
                    b'C' => e.code = value,
                    b'M' => e.message = value,
                    b'D' => e.detail = Some(value),
                    b'H' => e.hint = Some(value),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(err) => {
                return ReplicationError::Protocol(format!("malformed ErrorResponse: {err}"))
            }
        }
    }
    ReplicationError::Server(e)
}

/// What the relay needs to open a replication connection, taken from a
/// libpq-style URL or keyword string (parsed by tokio-postgres) and the TLS
/// settings.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: HostAddr,
    pub port: u16,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// How long written data may stay unacknowledged by the peer before the
    /// kernel gives up on the connection (TCP_USER_TIMEOUT); None leaves the
    /// kernel's retry time (about 15 minutes).
    pub tcp_user_timeout: Option<Duration>,
    /// libpq's `channel_binding` (from the URL): SCRAM-SHA-256-PLUS, which
    /// binds the password exchange to this TLS connection, is used when the
    /// server offers it over TLS (`prefer`), required (`require`) or never
    /// used (`disable`).
    pub channel_binding: tokio_postgres::config::ChannelBinding,
    pub tls: TlsSettings,
}

impl std::fmt::Debug for ConnectParams {
    // Hand-written so that a password can never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub enum HostAddr {
    Tcp(String),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl ConnectParams {
    /// From a [`crate::pg::tls::DatabaseConfig`] (TLS settings included) or a
    /// bare `tokio_postgres::Config` (its sslmode, no certificate files).
    pub fn from_config<D: DatabaseSource + ?Sized>(db: &D) -> Result<Self, ReplicationError> {
        let cfg = db.pg_config();
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => HostAddr::Tcp(h.clone()),
            #[cfg(unix)]
            Some(Host::Unix(p)) => HostAddr::Unix(p.clone()),
            None => HostAddr::Tcp("localhost".to_string()),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .map(str::to_string)
            .ok_or_else(|| ReplicationError::Config("the database URL names no user".into()))?;
        let dbname = cfg
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        Ok(ConnectParams {
            host,
            port,
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            dbname,
            application_name: cfg
                .get_application_name()
                .unwrap_or("outbox-relay")
                .to_string(),
            connect_timeout: cfg
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            tcp_user_timeout: None,
            channel_binding: cfg.get_channel_binding(),
            tls: db.tls_settings(),
        })
    }

    fn target(&self) -> String {
        match &self.host {
            HostAddr::Tcp(h) => format!("{h}:{}", self.port),
            #[cfg(unix)]
            HostAddr::Unix(p) => format!("{}/.s.PGSQL.{}", p.display(), self.port),
        }
    }
}

/// SSLRequest, then the TLS handshake if the server agrees; plain TCP for
/// `disable`, and for `prefer` when the server declines.
///
/// Also returns the TLS connection's channel-binding data
/// (`tls-server-end-point`, RFC 5929: a hash of the server's certificate),
/// when there is a TLS connection and the certificate allows it.
async fn negotiate_tls(
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
fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
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
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
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
fn keep_alive(s: &tokio::net::TcpStream, user_timeout: Option<Duration>) -> std::io::Result<()> {
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

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// One row of a simple-query result, text format.
pub type Row = Vec<Option<String>>;

/// A replication connection before START_REPLICATION.
pub struct ReplicationConnection {
    stream: BoxStream,
    buf: BytesMut,
    out: BytesMut,
}

enum Frame {
    CopyBothResponse,
    CopyData(Bytes),
    Other(Message),
}

const READ_CHUNK: usize = 64 * 1024;

async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReplicationError> {
    loop {
        if let Some(frame) = parse_frame(buf)? {
            return Ok(frame);
        }
        buf.reserve(READ_CHUNK);
        // read_buf is cancellation safe: dropping this future loses nothing.
        if r.read_buf(buf).await? == 0 {
            return Err(ReplicationError::Closed);
        }
    }
}

fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ReplicationError::Protocol(format!(
            "message length {len} < 4"
        )));
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    match tag {
        // postgres-protocol's backend parser does not know CopyBothResponse,
        // and CopyData is the hot path: take both apart here.
        b'W' => {
            buf.advance(len + 1);
            Ok(Some(Frame::CopyBothResponse))
        }
        b'd' => {
            buf.advance(5);
            Ok(Some(Frame::CopyData(buf.split_to(len - 4).freeze())))
        }
        _ => match Message::parse(buf)? {
            Some(m) => Ok(Some(Frame::Other(m))),
            None => Ok(None),
        },
    }
}

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let target = params.target();
        let io_err = |source| ReplicationError::Connect {
            target: target.clone(),
            source,
        };
        let connect = async {
            let (s, binding): (BoxStream, _) = match &params.host {
                HostAddr::Tcp(h) => {
                    let s = tokio::net::TcpStream::connect((h.as_str(), params.port))
                        .await
                        .map_err(io_err)?;
                    s.set_nodelay(true).map_err(io_err)?;
                    keep_alive(&s, params.tcp_user_timeout).map_err(io_err)?;
                    negotiate_tls(s, h, params, &target).await?
                }
                // No TLS over Unix-domain sockets, as in libpq.
                #[cfg(unix)]
                HostAddr::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{}", params.port));
                    (
                        Box::new(
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map_err(io_err)?,
                        ),
                        None,
                    )
                }
            };
            let mut conn = ReplicationConnection {
                stream: s,
                buf: BytesMut::with_capacity(READ_CHUNK),
                out: BytesMut::new(),
            };
            conn.startup(params, binding).await?;
            Ok::<_, ReplicationError>(conn)
        };
        // Authentication too: a server that accepts the connection and then
        // says nothing must not hold the relay (libpq's connect_timeout
        // covers the whole start-up as well).
        match tokio::time::timeout(params.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Connect {
                target,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no complete start-up within the connect timeout ({:.1}s; connect_timeout in the database URL)",
                        params.connect_timeout.as_secs_f64()
                    ),
                ),
            }),
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        self.out.clear();
        Ok(())
    }

    async fn next_message(&mut self) -> Result<Message, ReplicationError> {
        match read_frame(&mut self.stream, &mut self.buf).await? {
            Frame::Other(m) => Ok(m),
            Frame::CopyBothResponse => Err(ReplicationError::Protocol(
                "unexpected CopyBothResponse".into(),
            )),
            Frame::CopyData(_) => Err(ReplicationError::Protocol("unexpected CopyData".into())),
        }
    }

    /// Start-up and authentication. `binding` is the TLS connection's
    /// channel-binding data, if any. The server's choice of method is held
    /// to `require_auth`, and a SCRAM exchange must end with the server's
    /// signature: a server (or a man in the middle) that skips it has not
    /// proved it knows the password.
    async fn startup(
        &mut self,
        p: &ConnectParams,
        binding: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        use tokio_postgres::config::ChannelBinding as Cb;
        let params = [
            ("user", p.user.as_str()),
            ("database", p.dbname.as_str()),
            ("replication", "database"),
            ("application_name", p.application_name.as_str()),
            // The walsender renders bytea with this session's setting; a
            // database or role default of 'escape' would change the bytes
            // the router decodes. Startup options outrank those defaults.
            ("options", "-c bytea_output=hex"),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.out)?;
        self.flush().await?;

        let password = || {
            p.password.clone().ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server requires a password for user {:?} but none was given (in the database URL, --database-password-file, OUTBOX_RELAY_DATABASE_PASSWORD or PGPASSWORD)",
                    p.user
                ))
            })
        };
        let require = &p.tls.require_auth;
        let allow = |m: AuthMethod| {
            if require.allows(m) {
                Ok(())
            } else {
                Err(ReplicationError::Auth(format!(
                    "the server asked for {} authentication, which require_auth={} does not allow: no password was sent. Check the server's pg_hba.conf, or whether something between the relay and the server is asking instead",
                    m.as_str(),
                    require.describe()
                )))
            }
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut scram_finished = false;
        let mut asked = false;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => {
                    if scram.is_some() && !scram_finished {
                        return Err(ReplicationError::Auth(
                            "the server ended SCRAM authentication without its final message, so it did not prove that it knows the password: refusing the connection".into(),
                        ));
                    }
                    if !asked {
                        allow(AuthMethod::None)?;
                    }
                    break;
                }
                Message::AuthenticationCleartextPassword => {
                    allow(AuthMethod::Password)?;
                    asked = true;
                    frontend::password_message(&password()?, &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    allow(AuthMethod::Md5)?;
                    asked = true;
                    let hash = md5_hash(p.user.as_bytes(), &password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    allow(AuthMethod::ScramSha256)?;
                    asked = true;
                    let (mut plain, mut plus) = (false, false);
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?
                    {
                        plain |= m == sasl::SCRAM_SHA_256;
                        plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    let (mechanism, channel) = match (&binding, p.channel_binding) {
                        (Some(b), Cb::Prefer | Cb::Require) if plus => (
                            sasl::SCRAM_SHA_256_PLUS,
                            sasl::ChannelBinding::tls_server_end_point(b.clone()),
                        ),
                        (_, Cb::Require) => {
                            return Err(ReplicationError::Auth(format!(
                                "channel_binding=require, but {}: use TLS (sslmode=require or stronger) with a server that offers SCRAM-SHA-256-PLUS (PostgreSQL 11+ with scram-sha-256 in pg_hba.conf)",
                                if binding.is_none() {
                                    "the connection has no TLS to bind to"
                                } else {
                                    "the server does not offer SCRAM-SHA-256-PLUS"
                                }
                            )))
                        }
                        // Over TLS, say the client could bind: a server that
                        // offers PLUS and sees this knows the offer was cut.
                        (Some(_), Cb::Prefer) if plain => {
                            (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                        }
                        _ if plain => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                        _ => {
                            return Err(ReplicationError::Auth(
                                "the server offers no SASL mechanism this relay supports (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)".into(),
                            ))
                        }
                    };
                    let s = sasl::ScramSha256::new(&password()?, channel);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM server signature: {e}")))?;
                    scram_finished = true;
                }
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(ReplicationError::Auth(
                        "the server asked for an authentication method this relay does not support (supported: trust, password, md5, SCRAM-SHA-256, SCRAM-SHA-256-PLUS)".into(),
                    ))
                }
            }
        }
        // ParameterStatus and BackendKeyData follow; wait for ReadyForQuery.
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => {}
            }
        }
    }

    /// Runs one simple query and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(body) => {
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges
                        .next()
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?
                    {
                        row.push(
                            range.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                        );
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 3)
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let timeline = field(1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?;
        let xlogpos = field(2)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?;
        Ok(SystemInfo {
            system_id: field(0).unwrap_or_default(),
            timeline,
            xlogpos,
            dbname: field(3),
        })
    }

    /// Reads a server setting (replication connections accept SHOW).
    pub async fn show(&mut self, setting: &str) -> Result<String, ReplicationError> {
        let rows = self.simple_query(&format!("SHOW {setting}")).await?;
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .ok_or_else(|| ReplicationError::Protocol(format!("SHOW {setting} returned nothing")))
    }

    /// Starts logical replication from `slot`. With `start` = 0/0 the server
    /// resumes from the slot's `confirmed_flush_lsn`.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("\"{}\" {}", k, quote_literal(v)))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            opts.join(", ")
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        loop {
            match read_frame(&mut self.stream, &mut self.buf).await? {
                Frame::CopyBothResponse => break,
                Frame::Other(Message::ErrorResponse(body)) => {
                    let err = server_error(body.fields());
                    return Err(err);
                }
                Frame::Other(Message::NoticeResponse(_)) => {}
                Frame::Other(_) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected reply to START_REPLICATION".into(),
                    ))
                }
                Frame::CopyData(_) => {
                    return Err(ReplicationError::Protocol(
                        "CopyData before CopyBothResponse".into(),
                    ))
                }
            }
        }
        let (r, w) = tokio::io::split(self.stream);
        Ok(ReplicationStream {
            reader: ReplicationReader { r, buf: self.buf },
            writer: ReplicationWriter {
                w,
                out: BytesMut::with_capacity(64),
            },
        })
    }
}

/// Single-quotes a literal for replication command options.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What the server sends inside the CopyBoth stream.
#[derive(Debug, Clone)]
pub enum ReplicationMessage {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
    /// The server ended the copy (CopyDone).
    CopyDone,
}

/// The open CopyBoth stream, split so that status updates can be written
/// while a read is pending.
pub struct ReplicationStream {
    pub reader: ReplicationReader,
    pub writer: ReplicationWriter,
}

pub struct ReplicationReader {
    r: ReadHalf<BoxStream>,
    buf: BytesMut,
}

pub struct ReplicationWriter {
    w: WriteHalf<BoxStream>,
    out: BytesMut,
}

impl ReplicationReader {
    /// The next message of the stream. Cancellation safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let frame = read_frame(&mut self.r, &mut self.buf).await?;
            if let Some(m) = Self::message(frame)? {
                return Ok(m);
            }
        }
    }

    /// The next message if it is already buffered, without waiting for the
    /// socket: lets the pipeline handle a burst of messages in one turn.
    pub fn try_next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        while let Some(frame) = parse_frame(&mut self.buf)? {
            if let Some(m) = Self::message(frame)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// A frame's meaning inside the stream; None for frames to skip.
    fn message(frame: Frame) -> Result<Option<ReplicationMessage>, ReplicationError> {
        {
            match frame {
                Frame::CopyData(data) => return parse_copy_data(data).map(Some),
                Frame::Other(Message::CopyDone) => return Ok(Some(ReplicationMessage::CopyDone)),
                Frame::Other(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()))
                }
                Frame::Other(Message::NoticeResponse(_))
                | Frame::Other(Message::ParameterStatus(_)) => {}
                Frame::Other(Message::CommandComplete(_))
                | Frame::Other(Message::ReadyForQuery(_)) => {}
                Frame::Other(_) | Frame::CopyBothResponse => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message inside the replication stream".into(),
                    ))
                }
            }
        }
        Ok(None)
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let short = |what: &str| ReplicationError::Protocol(format!("truncated {what} message"));
    if !data.has_remaining() {
        return Err(short("CopyData"));
    }
    match data.get_u8() {
        b'w' => {
            if data.remaining() < 24 {
                return Err(short("XLogData"));
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            if data.remaining() < 17 {
                return Err(short("primary keepalive"));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(data.get_u64()),
                send_time: data.get_i64(),
                reply_requested: data.get_u8() == 1,
            })
        }
        tag => Err(ReplicationError::Protocol(format!(
            "unknown replication message {:?}",
            char::from(tag)
        ))),
    }
}

/// Microseconds since the Postgres epoch, for status updates.
pub fn pg_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_OFFSET_SECS * 1_000_000
}

impl ReplicationWriter {
    /// Sends a standby status update reporting `confirmed` as written,
    /// flushed and applied: the server moves the slot's `confirmed_flush_lsn`
    /// to it and will never send anything at or before it again.
    pub async fn send_status(
        &mut self,
        confirmed: Lsn,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        self.out.clear();
        self.out.put_u8(b'd');
        self.out.put_u32(4 + 34);
        self.out.put_u8(b'r');
        self.out.put_u64(confirmed.0);
        self.out.put_u64(confirmed.0);
        self.out.put_u64(confirmed.0);
        self.out.put_i64(pg_now());
        self.out.put_u8(u8::from(reply));
        self.w.write_all(&self.out).await?;
        self.w.flush().await?;
        Ok(())
    }

    /// Ends the copy from our side (CopyDone) so the server can finish cleanly.
    pub async fn send_copy_done(&mut self) -> Result<(), ReplicationError> {
        self.out.clear();
        frontend::copy_done(&mut self.out);
        self.w.write_all(&self.out).await?;
        self.w.flush().await?;
        Ok(())
    }

    pub async fn send_terminate(&mut self) -> Result<(), ReplicationError> {
        self.out.clear();
        frontend::terminate(&mut self.out);
        self.w.write_all(&self.out).await?;
        self.w.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
}
