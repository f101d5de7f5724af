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

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::lsn::Lsn;
use crate::pg::quote_ident;

mod auth;
mod codec;
mod params;
mod stream;
pub mod table_rows;
#[cfg(test)]
mod tests;
mod tls;

pub use codec::ReplicationMessage;
use codec::*;
pub use params::{ConnectParams, HostAddr};
pub use stream::{pg_now, ReplicationReader, ReplicationStream, ReplicationWriter};
use tls::*;

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

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready: to the
    /// first host of the URL that accepts and has the `target_session_attrs`
    /// asked for, trying them in order as libpq does (after a failover the
    /// old primary may still answer, read-only, or not at all).
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        use tokio_postgres::config::TargetSessionAttrs as Attrs;
        let attrs = params.target_session_attrs;
        if params.hosts.len() <= 1 && attrs == Attrs::Any {
            return Self::connect_one(params).await;
        }
        let mut tried = Vec::new();
        for (host, port) in &params.hosts {
            let p = params.for_host(host, *port);
            let mut conn = match Self::connect_one(&p).await {
                Ok(c) => c,
                Err(e) => {
                    tried.push(format!("{}: {e}", p.target()));
                    continue;
                }
            };
            if attrs == Attrs::Any {
                return Ok(conn);
            }
            let read_only = match conn.show("transaction_read_only").await {
                Ok(v) => v.trim() == "on",
                Err(e) => {
                    tried.push(format!("{}: {e}", p.target()));
                    continue;
                }
            };
            match (attrs, read_only) {
                (Attrs::ReadWrite, false) | (Attrs::ReadOnly, true) => return Ok(conn),
                (Attrs::ReadWrite, true) => tried.push(format!(
                    "{}: read-only (a standby, or default_transaction_read_only), and target_session_attrs=read-write",
                    p.target()
                )),
                _ => tried.push(format!(
                    "{}: read-write, and target_session_attrs=read-only",
                    p.target()
                )),
            }
        }
        Err(ReplicationError::Connect {
            target: params
                .hosts
                .iter()
                .map(|(h, port)| params.for_host(h, *port).target())
                .collect::<Vec<_>>()
                .join(","),
            source: std::io::Error::other(format!(
                "no host of the database URL would do: {}",
                tried.join("; ")
            )),
        })
    }

    async fn connect_one(params: &ConnectParams) -> Result<Self, ReplicationError> {
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

    /// Creates the logical slot `slot` (pgoutput) and exports a snapshot
    /// that sees exactly the transactions committed before the slot's
    /// consistent point, where its stream begins. The snapshot lives while
    /// this connection stays open and runs nothing else. Returns the
    /// consistent point and the snapshot's name. A slot that exists already
    /// fails with SQLSTATE 42710.
    pub async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
    ) -> Result<(Lsn, String), ReplicationError> {
        // The pre-15 spelling: accepted by PostgreSQL 14 to 18.
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                crate::pg::quote_ident(slot)
            ))
            .await?;
        let row = rows.into_iter().next().unwrap_or_default();
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = field(1).parse().map_err(|e| {
            ReplicationError::Protocol(format!("unexpected answer to CREATE_REPLICATION_SLOT: {e}"))
        })?;
        Ok((consistent_point, field(2)))
    }

    /// The history file of timeline `tli` (TIMELINE_HISTORY): each ancestor
    /// timeline and where it ended. Timeline 1 has none.
    pub async fn timeline_history(&mut self, tli: u32) -> Result<String, ReplicationError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await?;
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().nth(1).flatten())
            .ok_or_else(|| {
                ReplicationError::Protocol(format!("TIMELINE_HISTORY {tli} returned no file"))
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

/// Single-quotes a literal for replication command options. Not
/// `pg::quote_literal`: the replication grammar takes no E'' strings.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
