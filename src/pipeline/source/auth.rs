//! Start-up and authentication: trust, cleartext, md5 and SCRAM-SHA-256
//! (with channel binding over TLS), held to `require_auth`.

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;

use super::*;
use crate::pg::tls::AuthMethod;

impl ReplicationConnection {
    /// Start-up and authentication. `binding` is the TLS connection's
    /// channel-binding data, if any. The server's choice of method is held
    /// to `require_auth`, and a SCRAM exchange must end with the server's
    /// signature: a server (or a man in the middle) that skips it has not
    /// proved it knows the password.
    pub(super) async fn startup(
        &mut self,
        p: &ConnectParams,
        binding: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        self.send_startup(p).await?;
        self.authenticate(p, binding).await?;
        self.ready_for_query().await
    }

    async fn send_startup(&mut self, p: &ConnectParams) -> Result<(), ReplicationError> {
        // The walsender renders bytea with this session's setting; a
        // database or role default of 'escape' would change the bytes the
        // router decodes. Startup options outrank those defaults, and the
        // last of them wins, so the URL's own options come first.
        let options = match &p.options {
            Some(o) if !o.trim().is_empty() => format!("{o} -c bytea_output=hex"),
            _ => "-c bytea_output=hex".to_string(),
        };
        let params = [
            ("user", p.user.as_str()),
            ("database", p.dbname.as_str()),
            ("replication", "database"),
            ("application_name", p.application_name.as_str()),
            ("options", options.as_str()),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.out)?;
        self.flush().await
    }

    /// The server's authentication requests until AuthenticationOk.
    async fn authenticate(
        &mut self,
        p: &ConnectParams,
        binding: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let password = || password(p);
        let allow = |m: AuthMethod| allow(p, m);
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
                    return Ok(());
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
                    let (mechanism, channel) =
                        sasl_mechanism(&body, binding.as_deref(), p.channel_binding)?;
                    let s = sasl::ScramSha256::new(&password()?, channel);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram_started(&mut scram, "continue")?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram_started(&mut scram, "final")?;
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
    }

    /// ParameterStatus and BackendKeyData follow authentication; waits for
    /// ReadyForQuery.
    async fn ready_for_query(&mut self) -> Result<(), ReplicationError> {
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => {}
            }
        }
    }
}

/// The SASL mechanism to answer the server's offer with, and the channel
/// binding to claim: SCRAM-SHA-256-PLUS over TLS when offered and allowed,
/// else SCRAM-SHA-256 (saying, over TLS, that the client could have bound).
fn sasl_mechanism(
    offer: &backend::AuthenticationSaslBody,
    binding: Option<&[u8]>,
    channel_binding: tokio_postgres::config::ChannelBinding,
) -> Result<(&'static str, sasl::ChannelBinding), ReplicationError> {
    use tokio_postgres::config::ChannelBinding as Cb;
    let (mut plain, mut plus) = (false, false);
    let mut mechanisms = offer.mechanisms();
    while let Some(m) = mechanisms
        .next()
        .map_err(|e| ReplicationError::Protocol(e.to_string()))?
    {
        plain |= m == sasl::SCRAM_SHA_256;
        plus |= m == sasl::SCRAM_SHA_256_PLUS;
    }
    match (binding, channel_binding) {
        (Some(b), Cb::Prefer | Cb::Require) if plus => Ok((
            sasl::SCRAM_SHA_256_PLUS,
            sasl::ChannelBinding::tls_server_end_point(b.to_vec()),
        )),
        (_, Cb::Require) => Err(ReplicationError::Auth(format!(
            "channel_binding=require, but {}: use TLS (sslmode=require or stronger) with a server that offers SCRAM-SHA-256-PLUS (PostgreSQL 11+ with scram-sha-256 in pg_hba.conf)",
            if binding.is_none() {
                "the connection has no TLS to bind to"
            } else {
                "the server does not offer SCRAM-SHA-256-PLUS"
            }
        ))),
        // Over TLS, say the client could bind: a server that offers PLUS and
        // sees this knows the offer was cut.
        (Some(_), Cb::Prefer) if plain => {
            Ok((sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()))
        }
        _ if plain => Ok((sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported())),
        _ => Err(ReplicationError::Auth(
            "the server offers no SASL mechanism this relay supports (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)".into(),
        )),
    }
}

/// The password, when the server asks for one.
fn password(p: &ConnectParams) -> Result<Vec<u8>, ReplicationError> {
    p.password.clone().ok_or_else(|| {
        ReplicationError::Auth(format!(
            "the server requires a password for user {:?} but none was given (in the database URL, --database-password-file, OUTBOX_RELAY_DATABASE_PASSWORD or PGPASSWORD)",
            p.user
        ))
    })
}

/// `require_auth`: refuses a method before any secret is sent for it.
fn allow(p: &ConnectParams, m: AuthMethod) -> Result<(), ReplicationError> {
    let require = &p.tls.require_auth;
    if require.allows(m) {
        Ok(())
    } else {
        Err(ReplicationError::Auth(format!(
            "the server asked for {} authentication, which require_auth={} does not allow: no password was sent. Check the server's pg_hba.conf, or whether something between the relay and the server is asking instead",
            m.as_str(),
            require.describe()
        )))
    }
}

/// The SCRAM exchange a later SASL message (`step`) belongs to: a protocol
/// error when the server sends one before SASL started.
fn scram_started<'s>(
    scram: &'s mut Option<sasl::ScramSha256>,
    step: &str,
) -> Result<&'s mut sasl::ScramSha256, ReplicationError> {
    scram
        .as_mut()
        .ok_or_else(|| ReplicationError::Protocol(format!("SASL {step} before SASL start")))
}
