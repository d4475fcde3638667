//! What each connection may reveal while it logs in: the authentication
//! policy, enforced the same way on the replication connection (which
//! authenticates by hand) and on the metadata connection (whose
//! tokio-postgres client is watched by [`super::guard`]).
//!
//! The server chooses the method, so a server (or whoever answers in its
//! place) can ask for whatever gives it the most. libpq's answer is
//! `require_auth` (libpq 16) and `channel_binding`; walrelay honours both as
//! libpq does, and adds its own defaults on top:
//!
//! - **A password is told only to a verified server.** A cleartext
//!   (`password`) or MD5 request is answered only over TLS whose server
//!   certificate was verified against a trusted root, unless the user opted
//!   in with both `--allow-password-to-unverified-server` (the network is
//!   trusted) and `require_auth` naming the method (the one expected, so a
//!   server cannot talk a SCRAM user down to it). Without TLS anyone on the path
//!   reads a cleartext password, and with an unverified certificate anyone
//!   can present one; an MD5 answer is a replayable proof for the
//!   challenge it got, which a man in the middle relays to the real server.
//! - **SCRAM is bound to TLS whenever TLS is in use.** Over TLS walrelay
//!   never sends the "client does not support channel binding" flag (`n`)
//!   unless `channel_binding=disable`. When the server offers
//!   SCRAM-SHA-256-PLUS the exchange binds to the certificate (or fails
//!   saying why it cannot); when it does not, walrelay sends `y` over a
//!   verified connection (a server that did support binding then refuses,
//!   which unmasks a man in the middle that stripped -PLUS) and refuses to
//!   log in over an unverified one, where nothing else would tie the
//!   exchange to this TLS session: PostgreSQL 11 and later offer -PLUS on
//!   every TLS connection, so its absence means something in between
//!   removed it.
//!
//! Each check happens before the answer is written: [`AuthExchange`] judges
//! every authentication request as it arrives and every authentication
//! message the client then writes, so a refused method gets nothing, not
//! even the user's MD5 hash.
use std::fmt;

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::backend;

use super::tls::ChannelBindingError;

/// The kinds of authentication request `require_auth` can allow, as bits.
const PASSWORD: u16 = 1 << 0;
const MD5: u16 = 1 << 1;
const GSS: u16 = 1 << 2;
const GSS_CONTINUE: u16 = 1 << 3;
const SSPI: u16 = 1 << 4;
const SASL: u16 = 1 << 5;
const SASL_CONTINUE: u16 = 1 << 6;
const SASL_FINAL: u16 = 1 << 7;
const EVERY_REQUEST: u16 = u16::MAX;

/// The methods `require_auth` accepts, for error messages.
const METHODS: &str = "password, md5, gss, sspi, scram-sha-256 or none";

/// libpq's `require_auth`: the authentication methods the server may use.
///
/// A comma-separated list of `password`, `md5`, `gss`, `sspi`,
/// `scram-sha-256` and `none`, of which the server must use exactly one;
/// or the same names each negated with `!`, which the server must not use.
/// `none` allows (`!none` forbids) a server that asks for nothing (trust).
/// Negated and plain names do not mix, and a name given twice is an error,
/// as in libpq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequireAuth {
    /// The setting as given; `None` when unset (anything goes).
    text: Option<String>,
    /// Whether the server must authenticate the client at all.
    auth_required: bool,
    /// The request kinds allowed.
    allowed: u16,
    /// The request kinds named without `!`: the user's explicit choice.
    named: u16,
}

impl Default for RequireAuth {
    fn default() -> Self {
        RequireAuth {
            text: None,
            auth_required: false,
            allowed: EVERY_REQUEST,
            named: 0,
        }
    }
}

/// A `require_auth` or `channel_binding` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthParamError {
    /// A name that is not a method.
    #[error(
        "invalid require_auth value: {0:?}; expected a comma-separated list of {METHODS}, each optionally negated with !"
    )]
    Method(String),
    /// `!name` after a plain name.
    #[error("negative require_auth method {0:?} cannot be mixed with non-negative methods")]
    NegatedAfterPlain(String),
    /// A plain name after `!name`.
    #[error("require_auth method {0:?} cannot be mixed with negative methods")]
    PlainAfterNegated(String),
    /// A name given twice: in a setting where a typo is this risky, libpq
    /// refuses rather than guesses.
    #[error("require_auth method {0:?} is specified more than once")]
    Duplicate(String),
}

impl RequireAuth {
    /// Parses the setting as libpq does (no trimming around the commas); an
    /// empty value is the same as none.
    pub fn parse(text: &str) -> Result<Self, AuthParamError> {
        if text.is_empty() {
            return Ok(RequireAuth::default());
        }
        let mut this = RequireAuth {
            text: Some(text.to_owned()),
            auth_required: true,
            allowed: 0,
            named: 0,
        };
        let mut negated = false;
        for (i, part) in text.split(',').enumerate() {
            let method = match part.strip_prefix('!') {
                Some(method) => {
                    if i == 0 {
                        // Start from everything and take away.
                        this.auth_required = false;
                        this.allowed = EVERY_REQUEST;
                    } else if !negated {
                        return Err(AuthParamError::NegatedAfterPlain(part.to_owned()));
                    }
                    negated = true;
                    method
                }
                None if negated => {
                    return Err(AuthParamError::PlainAfterNegated(part.to_owned()));
                }
                None => part,
            };
            let bits = match method {
                "password" => PASSWORD,
                "md5" => MD5,
                "gss" => GSS | GSS_CONTINUE,
                "sspi" => SSPI | GSS_CONTINUE,
                "scram-sha-256" => SASL | SASL_CONTINUE | SASL_FINAL,
                "none" => {
                    // Whether the server may skip authentication.
                    if this.auth_required == negated {
                        return Err(AuthParamError::Duplicate(part.to_owned()));
                    }
                    this.auth_required = negated;
                    continue;
                }
                _ => return Err(AuthParamError::Method(method.to_owned())),
            };
            if negated {
                if this.allowed & bits == 0 {
                    return Err(AuthParamError::Duplicate(part.to_owned()));
                }
                this.allowed &= !bits;
            } else {
                if this.allowed & bits == bits {
                    return Err(AuthParamError::Duplicate(part.to_owned()));
                }
                this.allowed |= bits;
                this.named |= bits;
            }
        }
        Ok(this)
    }

    /// The setting as given, if any.
    pub fn as_str(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    /// Never bind SCRAM to TLS: over TLS the client says it cannot (`n`).
    Disable,
    /// Bind when the server offers SCRAM-SHA-256-PLUS (and, walrelay's own
    /// rule, refuse SCRAM without it over TLS whose certificate was not
    /// verified).
    #[default]
    Prefer,
    /// Authenticate with SCRAM-SHA-256-PLUS or not at all.
    Require,
}

impl ChannelBindingMode {
    /// Parses `disable`, `prefer` or `require`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "disable" => Some(ChannelBindingMode::Disable),
            "prefer" => Some(ChannelBindingMode::Prefer),
            "require" => Some(ChannelBindingMode::Require),
            _ => None,
        }
    }
}

/// Everything that decides what a connection may reveal while it logs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    /// libpq's `require_auth`.
    pub require_auth: RequireAuth,
    /// libpq's `channel_binding`.
    pub channel_binding: ChannelBindingMode,
    /// `--allow-password-to-unverified-server`: answer a cleartext or MD5
    /// request over plain TCP or unverified TLS, if `require_auth` names
    /// the method too.
    pub allow_unverified_password: bool,
}

/// What the connection runs over, as far as authentication cares.
#[derive(Clone, Debug)]
pub enum Channel {
    /// Plain TCP.
    Plain,
    /// TLS.
    Tls {
        /// Whether the server's certificate was verified against a trusted root.
        verified: bool,
        /// The `tls-server-end-point` binding of its certificate, or why
        /// there is none.
        binding: Result<Vec<u8>, ChannelBindingError>,
    },
}

impl Channel {
    fn verified(&self) -> bool {
        matches!(self, Channel::Tls { verified: true, .. })
    }

    fn describe(&self) -> &'static str {
        match self {
            Channel::Plain => {
                "plain TCP (sslmode=disable, or sslmode=prefer and the server, or whoever \
                 answered, declined TLS)"
            }
            Channel::Tls {
                verified: false, ..
            } => {
                "TLS whose server certificate was not verified (sslmode=prefer, or require \
                 without a root certificate)"
            }
            Channel::Tls { verified: true, .. } => "TLS with a verified server certificate",
        }
    }
}

/// How the server authenticated walrelay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// It asked for nothing (`trust` in pg_hba.conf, or a client certificate).
    None,
    /// A cleartext password (`password`).
    Password,
    /// An MD5-hashed password (`md5`).
    Md5,
    /// SCRAM-SHA-256 without channel binding.
    ScramSha256,
    /// SCRAM-SHA-256-PLUS: bound to the TLS session.
    ScramSha256Plus,
}

impl AuthMethod {
    /// Whether the method reveals more than SCRAM does: the password itself,
    /// or a hash that stands for it.
    pub fn weaker_than_scram(self) -> bool {
        matches!(self, AuthMethod::Password | AuthMethod::Md5)
    }

    /// The `require_auth` name of a password method.
    fn param_name(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 | AuthMethod::ScramSha256Plus => "scram-sha-256",
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::None => "none (trust)",
            AuthMethod::Password => "password (cleartext)",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "SCRAM-SHA-256",
            AuthMethod::ScramSha256Plus => "SCRAM-SHA-256-PLUS (bound to TLS)",
        })
    }
}

/// Why a login was stopped before walrelay answered (or, for the last
/// variants, before the client's answer left).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The server asked for a method `require_auth` does not allow, or
    /// skipped authentication that it requires.
    #[error(
        "authentication method requirement {requirement:?} failed: {reason} (PostgreSQL at \
         {target}); walrelay answered nothing. Fix require_auth in --postgres-url, or the \
         server's pg_hba.conf"
    )]
    RequireAuth {
        /// The `require_auth` setting.
        requirement: String,
        /// What the server did, in libpq's words.
        reason: &'static str,
        /// `host:port`.
        target: String,
    },
    /// A cleartext or MD5 request over a channel whose server nobody verified.
    #[error(
        "PostgreSQL at {target} asks for {method} authentication, but walrelay tells a password \
         only to a server whose TLS certificate it verified, and this connection is {channel}: \
         whoever answered could be a man in the middle collecting it. Nothing was sent. Fix, best \
         first: sslmode=verify-full with sslrootcert=<the CA certificate> in --postgres-url; or \
         scram-sha-256 for this role in pg_hba.conf (SCRAM never reveals the password); or, on a \
         network you trust, opt in with both require_auth={param} in --postgres-url and \
         --allow-password-to-unverified-server",
        param = .method.param_name()
    )]
    PasswordToUnverifiedServer {
        /// What the server asked for.
        method: AuthMethod,
        /// What the connection runs over.
        channel: &'static str,
        /// `host:port`.
        target: String,
    },
    /// `channel_binding=require` and the server does not bind.
    #[error(
        "{reason} (PostgreSQL at {target}, channel_binding=require); walrelay answered nothing. \
         Channel binding needs TLS (sslmode=require or stricter) and SCRAM-SHA-256 in pg_hba.conf"
    )]
    ChannelBindingRequired {
        /// What is missing, in libpq's words.
        reason: &'static str,
        /// `host:port`.
        target: String,
    },
    /// The server offers SCRAM-SHA-256-PLUS and the binding cannot be computed.
    #[error("SCRAM-SHA-256-PLUS authentication cannot bind to the TLS session: {0}")]
    CannotBind(#[source] ChannelBindingError),
    /// SCRAM without -PLUS offered over TLS whose certificate was not verified.
    #[error(
        "PostgreSQL at {target} offers SCRAM-SHA-256 without channel binding over TLS whose \
         certificate walrelay did not verify: nothing would tie the login to this TLS session, so \
         a man in the middle could relay it and hold an authenticated session. PostgreSQL 11 and \
         later offer SCRAM-SHA-256-PLUS on every TLS connection, so something in between (a proxy, \
         a pooler, or an attacker) removed it. Fix: sslmode=verify-full with sslrootcert=<the CA \
         certificate> in --postgres-url, or connect to PostgreSQL itself; channel_binding=disable \
         logs in anyway"
    )]
    UnboundOverUnverifiedTls {
        /// `host:port`.
        target: String,
    },
    /// SCRAM-SHA-256-PLUS offered without TLS: something stripped TLS.
    #[error(
        "PostgreSQL at {target} offered SCRAM-SHA-256-PLUS authentication over a connection without \
         TLS: PostgreSQL offers it only over TLS, so something in between stripped TLS. Walrelay \
         answered nothing; use sslmode=verify-full"
    )]
    PlusWithoutTls {
        /// `host:port`.
        target: String,
    },
    /// No SASL mechanism walrelay knows.
    #[error(
        "none of the server's SASL authentication mechanisms ({0}) are supported; use \
         scram-sha-256 in pg_hba.conf"
    )]
    NoMechanism(String),
    /// A method walrelay does not implement.
    #[error(
        "PostgreSQL asks for {0} authentication, which walrelay does not support; use \
         scram-sha-256 (or, on a verified TLS connection, md5 or password) in pg_hba.conf"
    )]
    Unsupported(&'static str),
    /// An authentication message out of order.
    #[error("invalid authentication exchange with PostgreSQL at {target}: {what}")]
    Sequence {
        /// What came when.
        what: &'static str,
        /// `host:port`.
        target: String,
    },
    /// The metadata connection's client wrote something the policy forbids
    /// (it was not sent).
    #[error(
        "the metadata connection's PostgreSQL client was about to send {sent} where walrelay's \
         authentication policy allows {allowed}; it was not sent"
    )]
    ClientAnswer {
        /// What the client wrote.
        sent: String,
        /// What the policy allows at that point.
        allowed: String,
    },
}

/// The SASL mechanism and channel-binding flag the policy chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaslChoice {
    /// `SCRAM-SHA-256` or `SCRAM-SHA-256-PLUS`.
    pub mechanism: &'static str,
    binding: Gs2,
}

/// The GS2 channel-binding flag of the client's first SCRAM message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Gs2 {
    /// `p=tls-server-end-point`, with the binding data.
    Bound(Vec<u8>),
    /// `y`: the client could bind, and the server did not offer it.
    Unrequested,
    /// `n`: the client does not bind (no TLS, or channel_binding=disable).
    Unbound,
}

impl SaslChoice {
    /// The binding for postgres-protocol's SCRAM client.
    pub fn channel_binding(&self) -> sasl::ChannelBinding {
        match &self.binding {
            Gs2::Bound(data) => sasl::ChannelBinding::tls_server_end_point(data.clone()),
            Gs2::Unrequested => sasl::ChannelBinding::unrequested(),
            Gs2::Unbound => sasl::ChannelBinding::unsupported(),
        }
    }

    /// How the client's first message (its GS2 header) must begin.
    fn gs2_header(&self) -> &'static str {
        match self.binding {
            Gs2::Bound(_) => "p=tls-server-end-point,",
            Gs2::Unrequested => "y,",
            Gs2::Unbound => "n,",
        }
    }
}

/// Which client message may come next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// None: it is the server's turn.
    Nothing,
    /// A PasswordMessage with the cleartext or MD5 answer.
    Password,
    /// SASLInitialResponse.
    SaslInitial,
    /// SASLResponse (the client's proof).
    SaslResponse,
}

/// How far a SCRAM exchange got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scram {
    NotStarted,
    Offered,
    InitialSent,
    Continued,
    ProofSent,
    Final,
}

/// One login, judged message by message: [`AuthExchange::on_request`] for
/// each authentication request of the server, before it is answered;
/// [`AuthExchange::on_client_message`] for each message of the client,
/// before it is sent.
#[derive(Debug)]
pub struct AuthExchange {
    policy: AuthPolicy,
    channel: Channel,
    target: String,
    due: Due,
    scram: Scram,
    sasl: Option<SaslChoice>,
    method: Option<AuthMethod>,
    /// The client finished its side (libpq's `client_finished_auth`).
    finished: bool,
    done: bool,
}

impl AuthExchange {
    /// A login to `target` (`host:port`, for messages) over `channel`.
    pub fn new(policy: AuthPolicy, channel: Channel, target: String) -> Self {
        AuthExchange {
            policy,
            channel,
            target,
            due: Due::Nothing,
            scram: Scram::NotStarted,
            sasl: None,
            method: None,
            finished: false,
            done: false,
        }
    }

    /// How the server authenticated walrelay, once it asked (or said OK).
    pub fn method(&self) -> Option<AuthMethod> {
        self.method
    }

    /// Whether the server accepted the login.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The SASL mechanism and binding to answer AuthenticationSASL with.
    pub fn sasl(&self) -> Option<&SaslChoice> {
        self.sasl.as_ref()
    }

    /// Judges an authentication request (an `R` message) before anything
    /// answers it. Other messages pass.
    pub fn on_request(&mut self, message: &backend::Message) -> Result<(), AuthError> {
        use backend::Message as M;
        match message {
            M::AuthenticationOk => {
                self.require(None)?;
                if self.policy.channel_binding == ChannelBindingMode::Require
                    && !(self.method == Some(AuthMethod::ScramSha256Plus) && self.finished)
                {
                    return Err(self.binding_required(
                        "channel binding required, but server authenticated client without \
                         channel binding",
                    ));
                }
                if self.scram != Scram::NotStarted && self.scram != Scram::Final {
                    return Err(self.sequence(
                        "AuthenticationOk before the SCRAM exchange completed: the server never \
                         proved that it knows the password",
                    ));
                }
                self.method.get_or_insert(AuthMethod::None);
                self.due = Due::Nothing;
                self.done = true;
            }
            M::AuthenticationCleartextPassword => self.on_password(AuthMethod::Password)?,
            M::AuthenticationMd5Password(_) => self.on_password(AuthMethod::Md5)?,
            M::AuthenticationSasl(body) => {
                self.require(Some(SASL))?;
                if self.scram != Scram::NotStarted {
                    return Err(self.sequence("duplicate SASL authentication request"));
                }
                let mut offered = Vec::new();
                let mut mechanisms = body.mechanisms();
                while let Ok(Some(m)) = mechanisms.next() {
                    offered.push(m.to_owned());
                }
                let choice = self.choose_sasl(&offered)?;
                self.method = Some(if choice.mechanism == sasl::SCRAM_SHA_256_PLUS {
                    AuthMethod::ScramSha256Plus
                } else {
                    AuthMethod::ScramSha256
                });
                self.sasl = Some(choice);
                self.scram = Scram::Offered;
                self.due = Due::SaslInitial;
            }
            M::AuthenticationSaslContinue(_) => {
                self.require(Some(SASL_CONTINUE))?;
                if self.scram != Scram::InitialSent {
                    return Err(self.sequence("AuthenticationSASLContinue out of turn"));
                }
                self.scram = Scram::Continued;
                self.due = Due::SaslResponse;
            }
            M::AuthenticationSaslFinal(_) => {
                self.require(Some(SASL_FINAL))?;
                if self.scram != Scram::ProofSent {
                    return Err(self.sequence("AuthenticationSASLFinal out of turn"));
                }
                // The client checks the server's signature in it, and stops
                // here if it is wrong.
                self.scram = Scram::Final;
                self.finished = true;
                self.due = Due::Nothing;
            }
            M::AuthenticationGss => return Err(self.unsupported(Some(GSS), "GSSAPI")),
            M::AuthenticationSspi => return Err(self.unsupported(Some(SSPI), "SSPI")),
            M::AuthenticationGssContinue(_) => {
                return Err(self.unsupported(Some(GSS_CONTINUE), "GSSAPI"));
            }
            M::AuthenticationKerberosV5 => return Err(self.unsupported(Some(0), "Kerberos V5")),
            M::AuthenticationScmCredential => {
                return Err(self.unsupported(Some(0), "SCM credential"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Judges every message in `bytes`, whole tagged frontend messages (as
    /// the replication connection writes them), before they are sent.
    pub fn on_client_bytes(&mut self, mut bytes: &[u8]) -> Result<(), AuthError> {
        while let [tag, a, b, c, d, rest @ ..] = bytes {
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            let body_len = len.saturating_sub(4).min(rest.len());
            self.on_client_message(*tag, &rest[..body_len])?;
            bytes = &rest[body_len..];
        }
        Ok(())
    }

    /// Judges a message the client is about to send while logging in
    /// (`tag`, then the body after the length), before it is sent.
    pub fn on_client_message(&mut self, tag: u8, body: &[u8]) -> Result<(), AuthError> {
        match (tag, self.due) {
            (b'p', Due::Password) => {
                self.finished = true;
            }
            (b'p', Due::SaslInitial) => {
                let choice = self
                    .sasl
                    .as_ref()
                    .expect("chosen when AuthenticationSASL came");
                let (mechanism, first) = split_initial_response(body).unwrap_or_default();
                if mechanism != choice.mechanism.as_bytes()
                    || !first.starts_with(choice.gs2_header().as_bytes())
                {
                    return Err(AuthError::ClientAnswer {
                        sent: format!(
                            "a SASL initial response for {} with GS2 header {:?}",
                            String::from_utf8_lossy(mechanism),
                            String::from_utf8_lossy(
                                first.split(|b| *b == b',').next().unwrap_or(b"")
                            ),
                        ),
                        allowed: format!(
                            "{} with GS2 header {:?}",
                            choice.mechanism,
                            choice.gs2_header().trim_end_matches(',')
                        ),
                    });
                }
                self.scram = Scram::InitialSent;
            }
            (b'p', Due::SaslResponse) => self.scram = Scram::ProofSent,
            (b'p', Due::Nothing) => {
                return Err(AuthError::ClientAnswer {
                    sent: "an authentication message (a password or SCRAM answer)".into(),
                    allowed: "none: the server asked for nothing the policy lets it have".into(),
                });
            }
            // Terminate ends the login without revealing anything.
            (b'X', _) => {}
            (other, _) => {
                return Err(AuthError::ClientAnswer {
                    sent: format!("a message {:?}", char::from(other)),
                    allowed: "only authentication messages before the login completes".into(),
                });
            }
        }
        self.due = Due::Nothing;
        Ok(())
    }

    fn on_password(&mut self, method: AuthMethod) -> Result<(), AuthError> {
        self.require(Some(if method == AuthMethod::Md5 {
            MD5
        } else {
            PASSWORD
        }))?;
        if self.policy.channel_binding == ChannelBindingMode::Require {
            return Err(self.binding_required(
                "channel binding required but not supported by server's authentication request",
            ));
        }
        if !self.channel.verified() {
            let bit = if method == AuthMethod::Md5 {
                MD5
            } else {
                PASSWORD
            };
            // Both halves of the opt-in: the flag says "this network is
            // trusted", require_auth says which method the user expects (so
            // a server cannot talk a SCRAM user into a weaker method).
            if self.policy.require_auth.named & bit == 0 || !self.policy.allow_unverified_password {
                return Err(AuthError::PasswordToUnverifiedServer {
                    method,
                    channel: self.channel.describe(),
                    target: self.target.clone(),
                });
            }
            tracing::warn!(
                target_server = %self.target,
                method = %method,
                "answering {method} authentication over {}, as require_auth and \
                 --allow-password-to-unverified-server allow: anyone on the network path can read \
                 or relay it",
                self.channel.describe()
            );
        }
        self.method = Some(method);
        self.due = Due::Password;
        Ok(())
    }

    /// The SASL mechanism and binding for what the server offered, or why
    /// there is none (libpq's choices, with walrelay's rule for unverified TLS).
    fn choose_sasl(&self, offered: &[String]) -> Result<SaslChoice, AuthError> {
        let has = |name: &str| offered.iter().any(|m| m == name);
        let (scram, plus) = (has(sasl::SCRAM_SHA_256), has(sasl::SCRAM_SHA_256_PLUS));
        let mode = self.policy.channel_binding;
        let plain_scram = |binding| {
            if scram {
                Ok(SaslChoice {
                    mechanism: sasl::SCRAM_SHA_256,
                    binding,
                })
            } else {
                Err(AuthError::NoMechanism(offered.join(", ")))
            }
        };
        match &self.channel {
            Channel::Plain => {
                if mode == ChannelBindingMode::Require {
                    return Err(
                        self.binding_required("channel binding required, but SSL not in use")
                    );
                }
                if plus {
                    return Err(AuthError::PlusWithoutTls {
                        target: self.target.clone(),
                    });
                }
                plain_scram(Gs2::Unbound)
            }
            Channel::Tls { verified, binding } => {
                if mode == ChannelBindingMode::Disable {
                    return plain_scram(Gs2::Unbound);
                }
                if plus {
                    return match binding {
                        Ok(data) => Ok(SaslChoice {
                            mechanism: sasl::SCRAM_SHA_256_PLUS,
                            binding: Gs2::Bound(data.clone()),
                        }),
                        Err(why) => Err(AuthError::CannotBind(why.clone())),
                    };
                }
                if mode == ChannelBindingMode::Require {
                    return Err(self.binding_required(
                        "channel binding is required, but server did not offer an authentication \
                         method that supports channel binding",
                    ));
                }
                if !verified {
                    return Err(AuthError::UnboundOverUnverifiedTls {
                        target: self.target.clone(),
                    });
                }
                plain_scram(Gs2::Unrequested)
            }
        }
    }

    /// libpq's `require_auth` check for a request of `kind` (`None`:
    /// AuthenticationOk; `Some(0)`: a kind `require_auth` cannot name).
    fn require(&self, kind: Option<u16>) -> Result<(), AuthError> {
        let policy = &self.policy.require_auth;
        let Some(requirement) = policy.as_str() else {
            return Ok(());
        };
        let reason = match kind {
            None if !policy.auth_required || self.finished => return Ok(()),
            None => "server did not complete authentication",
            Some(bits) if bits != 0 && policy.allowed & bits != 0 => return Ok(()),
            Some(PASSWORD) => "server requested a cleartext password",
            Some(MD5) => "server requested a hashed password",
            Some(GSS | GSS_CONTINUE) => "server requested GSSAPI authentication",
            Some(SSPI) => "server requested SSPI authentication",
            Some(SASL | SASL_CONTINUE | SASL_FINAL) => "server requested SASL authentication",
            Some(_) => "server requested an unknown authentication type",
        };
        Err(AuthError::RequireAuth {
            requirement: requirement.to_owned(),
            reason,
            target: self.target.clone(),
        })
    }

    fn unsupported(&self, kind: Option<u16>, name: &'static str) -> AuthError {
        self.require(kind)
            .err()
            .unwrap_or(AuthError::Unsupported(name))
    }

    fn binding_required(&self, reason: &'static str) -> AuthError {
        AuthError::ChannelBindingRequired {
            reason,
            target: self.target.clone(),
        }
    }

    fn sequence(&self, what: &'static str) -> AuthError {
        AuthError::Sequence {
            what,
            target: self.target.clone(),
        }
    }
}

/// The mechanism name and the client-first-message of a SASLInitialResponse body.
fn split_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    let (mechanism, rest) = (&body[..nul], &body[nul + 1..]);
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = rest.get(4..)?;
    // -1 means no initial response; SCRAM always sends one.
    let data = usize::try_from(len).ok().and_then(|l| data.get(..l))?;
    Some((mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// An authentication request of the server: code, then data.
    fn request(code: i32, data: &[u8]) -> backend::Message {
        let mut buf = BytesMut::new();
        buf.put_u8(b'R');
        buf.put_i32(i32::try_from(8 + data.len()).unwrap());
        buf.put_i32(code);
        buf.put_slice(data);
        backend::Message::parse(&mut buf).unwrap().unwrap()
    }

    fn ok() -> backend::Message {
        request(0, &[])
    }

    fn cleartext() -> backend::Message {
        request(3, &[])
    }

    fn md5() -> backend::Message {
        request(5, &[1, 2, 3, 4])
    }

    /// AuthenticationSASL offering `mechanisms`.
    fn sasl(mechanisms: &[&str]) -> backend::Message {
        let mut data = Vec::new();
        for m in mechanisms {
            data.extend_from_slice(m.as_bytes());
            data.push(0);
        }
        data.push(0);
        request(10, &data)
    }

    fn plain() -> Channel {
        Channel::Plain
    }

    fn tls(verified: bool) -> Channel {
        Channel::Tls {
            verified,
            binding: Ok(vec![7; 32]),
        }
    }

    fn unbindable_tls(verified: bool) -> Channel {
        Channel::Tls {
            verified,
            binding: Err(ChannelBindingError::NoHash("Ed25519")),
        }
    }

    fn policy(require_auth: &str, channel_binding: ChannelBindingMode) -> AuthPolicy {
        AuthPolicy {
            require_auth: RequireAuth::parse(require_auth).unwrap(),
            channel_binding,
            allow_unverified_password: false,
        }
    }

    fn exchange(policy: AuthPolicy, channel: Channel) -> AuthExchange {
        AuthExchange::new(policy, channel, "db:5432".into())
    }

    /// A SASLInitialResponse body for `mechanism` whose first message starts with `gs2`.
    fn initial_response(mechanism: &str, gs2: &str) -> Vec<u8> {
        let first = format!("{gs2},n=,r=nonce");
        let mut body = mechanism.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&i32::try_from(first.len()).unwrap().to_be_bytes());
        body.extend_from_slice(first.as_bytes());
        body
    }

    #[test]
    fn require_auth_parses_as_libpq_does() {
        let parse = |text: &str| RequireAuth::parse(text);
        let p = parse("password,md5").unwrap();
        assert!(p.auth_required);
        assert_eq!(p.allowed, PASSWORD | MD5);
        assert_eq!(p.named, PASSWORD | MD5);
        let p = parse("!password,!md5").unwrap();
        assert!(!p.auth_required);
        assert_eq!(p.allowed, EVERY_REQUEST & !(PASSWORD | MD5));
        assert_eq!(p.named, 0, "a negated list names nothing explicitly");
        let p = parse("none").unwrap();
        assert!(!p.auth_required);
        assert_eq!(p.allowed, 0);
        let p = parse("!none").unwrap();
        assert!(p.auth_required);
        assert_eq!(p.allowed, EVERY_REQUEST);
        // gss and sspi share the GSS continuation, and do not collide.
        assert!(parse("gss,sspi").is_ok());
        assert_eq!(parse("").unwrap(), RequireAuth::default());
        for (text, err) in [
            (
                "password,!md5",
                AuthParamError::NegatedAfterPlain("!md5".into()),
            ),
            (
                "!md5,password",
                AuthParamError::PlainAfterNegated("password".into()),
            ),
            ("md5,md5", AuthParamError::Duplicate("md5".into())),
            ("!md5,!md5", AuthParamError::Duplicate("!md5".into())),
            ("none,none", AuthParamError::Duplicate("none".into())),
            ("!none,!none", AuthParamError::Duplicate("!none".into())),
            ("scram", AuthParamError::Method("scram".into())),
            ("md5, password", AuthParamError::Method(" password".into())),
            ("md5,", AuthParamError::Method(String::new())),
        ] {
            assert_eq!(parse(text), Err(err), "{text}");
        }
    }

    #[test]
    fn a_password_goes_only_to_a_verified_server_unless_the_user_opts_in() {
        for request in [cleartext(), md5()] {
            for channel in [plain(), tls(false), unbindable_tls(false)] {
                let err = exchange(AuthPolicy::default(), channel.clone())
                    .on_request(&request)
                    .unwrap_err();
                assert!(
                    matches!(err, AuthError::PasswordToUnverifiedServer { .. }),
                    "{channel:?}: {err}"
                );
                let text = err.to_string();
                assert!(text.contains("Nothing was sent"), "{text}");
                assert!(text.contains("verify-full"), "{text}");
                assert!(
                    text.contains("--allow-password-to-unverified-server"),
                    "{text}"
                );
            }
            let mut verified = exchange(AuthPolicy::default(), tls(true));
            verified.on_request(&request).unwrap();
            verified.on_client_message(b'p', b"secret\0").unwrap();
            verified.on_request(&ok()).unwrap();
            assert!(verified.is_done());
        }
        // Opting in takes both the flag and require_auth naming the method.
        let opted_in = |require_auth: &str| AuthPolicy {
            allow_unverified_password: true,
            ..policy(require_auth, ChannelBindingMode::Prefer)
        };
        exchange(opted_in("password"), plain())
            .on_request(&cleartext())
            .unwrap();
        exchange(opted_in("md5,scram-sha-256"), tls(false))
            .on_request(&md5())
            .unwrap();
        let mut e = exchange(opted_in("md5"), plain());
        e.on_request(&md5()).unwrap();
        assert_eq!(e.method(), Some(AuthMethod::Md5));
        // Either alone is not enough.
        let flag_only = AuthPolicy {
            allow_unverified_password: true,
            ..AuthPolicy::default()
        };
        let named_only = policy("password", ChannelBindingMode::Prefer);
        for (policy, request) in [
            (flag_only.clone(), cleartext()),
            (flag_only, md5()),
            (named_only, cleartext()),
            (policy("md5", ChannelBindingMode::Prefer), md5()),
        ] {
            let err = exchange(policy.clone(), plain())
                .on_request(&request)
                .unwrap_err();
            assert!(
                matches!(err, AuthError::PasswordToUnverifiedServer { .. }),
                "{policy:?}: {err}"
            );
        }
        // Naming password does not allow md5 (require_auth refuses it).
        let err = exchange(opted_in("password"), plain())
            .on_request(&md5())
            .unwrap_err();
        assert!(matches!(err, AuthError::RequireAuth { .. }), "{err}");
        // A negated list allows a method without naming it: no opt-in.
        let err = exchange(opted_in("!md5"), plain())
            .on_request(&cleartext())
            .unwrap_err();
        assert!(
            matches!(err, AuthError::PasswordToUnverifiedServer { .. }),
            "{err}"
        );
    }

    #[test]
    fn require_auth_refuses_other_methods_and_an_incomplete_login() {
        let cases: [(&str, backend::Message, &str); 6] = [
            (
                "scram-sha-256",
                cleartext(),
                "server requested a cleartext password",
            ),
            ("scram-sha-256", md5(), "server requested a hashed password"),
            (
                "scram-sha-256",
                ok(),
                "server did not complete authentication",
            ),
            (
                "password",
                sasl(&["SCRAM-SHA-256"]),
                "server requested SASL authentication",
            ),
            (
                "none",
                sasl(&["SCRAM-SHA-256"]),
                "server requested SASL authentication",
            ),
            (
                "!scram-sha-256",
                sasl(&["SCRAM-SHA-256"]),
                "server requested SASL authentication",
            ),
        ];
        for (requirement, request, reason) in cases {
            let err = exchange(policy(requirement, ChannelBindingMode::Prefer), tls(true))
                .on_request(&request)
                .unwrap_err();
            assert!(
                matches!(&err, AuthError::RequireAuth { reason: r, .. } if *r == reason),
                "{requirement}: {err}"
            );
            assert!(err.to_string().contains(requirement), "{err}");
        }
        // !none: trust is refused; none: trust is fine.
        assert!(
            exchange(policy("!none", ChannelBindingMode::Prefer), plain())
                .on_request(&ok())
                .is_err()
        );
        let mut e = exchange(policy("none", ChannelBindingMode::Prefer), plain());
        e.on_request(&ok()).unwrap();
        assert_eq!(e.method(), Some(AuthMethod::None));
        // A completed exchange of an allowed method passes.
        let mut e = exchange(
            policy("scram-sha-256", ChannelBindingMode::Prefer),
            tls(false),
        );
        scram_login(&mut e, "SCRAM-SHA-256-PLUS", "p=tls-server-end-point").unwrap();
    }

    /// Runs a whole SCRAM login on `e`, the client answering with
    /// `mechanism` and GS2 header `gs2`.
    fn scram_login(e: &mut AuthExchange, mechanism: &str, gs2: &str) -> Result<(), AuthError> {
        e.on_request(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))?;
        e.on_client_message(b'p', &initial_response(mechanism, gs2))?;
        e.on_request(&request(11, b"r=nonce,s=c2FsdA==,i=4096"))?;
        e.on_client_message(b'p', b"c=...,r=nonce,p=proof")?;
        e.on_request(&request(12, b"v=signature"))?;
        e.on_request(&ok())
    }

    #[test]
    fn scram_binds_when_it_can_and_never_sends_n_over_tls() {
        use ChannelBindingMode::{Disable, Prefer, Require};
        let choose = |channel: Channel, mode: ChannelBindingMode, offered: &[&str]| {
            let mut e = exchange(policy("", mode), channel);
            e.on_request(&sasl(offered)).map(|()| {
                let choice = e.sasl().unwrap().clone();
                (choice.mechanism, choice.gs2_header())
            })
        };
        let both = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"];
        let scram = ["SCRAM-SHA-256"];
        // Over TLS, -PLUS when offered, verified or not.
        for verified in [true, false] {
            assert_eq!(
                choose(tls(verified), Prefer, &both).unwrap(),
                ("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,")
            );
            assert_eq!(
                choose(tls(verified), Require, &both).unwrap(),
                ("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,")
            );
            // Offered and cannot be computed: an error that says why.
            let err = choose(unbindable_tls(verified), Prefer, &both).unwrap_err();
            assert!(
                matches!(err, AuthError::CannotBind(ChannelBindingError::NoHash(_))),
                "{err}"
            );
        }
        // Not offered: y over a verified certificate, refused over an unverified one.
        assert_eq!(
            choose(tls(true), Prefer, &scram).unwrap(),
            ("SCRAM-SHA-256", "y,")
        );
        assert_eq!(
            choose(unbindable_tls(true), Prefer, &scram).unwrap(),
            ("SCRAM-SHA-256", "y,")
        );
        let err = choose(tls(false), Prefer, &scram).unwrap_err();
        assert!(
            matches!(err, AuthError::UnboundOverUnverifiedTls { .. }),
            "{err}"
        );
        let err = choose(tls(true), Require, &scram).unwrap_err();
        assert!(
            err.to_string()
                .contains("did not offer an authentication method that supports channel binding"),
            "{err}"
        );
        // channel_binding=disable: n, by the user's choice.
        assert_eq!(
            choose(tls(false), Disable, &both).unwrap(),
            ("SCRAM-SHA-256", "n,")
        );
        assert!(choose(tls(true), Disable, &["SCRAM-SHA-256-PLUS"]).is_err());
        // Plain TCP: n; -PLUS on offer means TLS was stripped.
        assert_eq!(
            choose(plain(), Prefer, &scram).unwrap(),
            ("SCRAM-SHA-256", "n,")
        );
        let err = choose(plain(), Prefer, &both).unwrap_err();
        assert!(matches!(err, AuthError::PlusWithoutTls { .. }), "{err}");
        let err = choose(plain(), Require, &scram).unwrap_err();
        assert!(err.to_string().contains("SSL not in use"), "{err}");
        assert!(matches!(
            choose(tls(true), Prefer, &["OAUTHBEARER"]),
            Err(AuthError::NoMechanism(_))
        ));
    }

    #[test]
    fn channel_binding_require_refuses_every_login_but_a_bound_scram_one() {
        let require = policy("", ChannelBindingMode::Require);
        for request in [ok(), cleartext(), md5()] {
            let err = exchange(require.clone(), tls(true))
                .on_request(&request)
                .unwrap_err();
            assert!(
                matches!(err, AuthError::ChannelBindingRequired { .. }),
                "{err}"
            );
        }
        let mut e = exchange(require, tls(false));
        scram_login(&mut e, "SCRAM-SHA-256-PLUS", "p=tls-server-end-point").unwrap();
        assert_eq!(e.method(), Some(AuthMethod::ScramSha256Plus));
    }

    #[test]
    fn the_clients_answer_must_be_the_one_the_policy_chose() {
        // Over TLS with -PLUS offered, a client that answers without binding
        // (n) or with plain SCRAM is stopped before its message leaves.
        for (mechanism, gs2) in [
            ("SCRAM-SHA-256", "n"),
            ("SCRAM-SHA-256", "y"),
            ("SCRAM-SHA-256-PLUS", "n"),
        ] {
            let mut e = exchange(AuthPolicy::default(), tls(false));
            let err = scram_login(&mut e, mechanism, gs2).unwrap_err();
            assert!(
                matches!(err, AuthError::ClientAnswer { .. }),
                "{mechanism} {gs2}: {err}"
            );
            assert!(err.to_string().contains("it was not sent"), "{err}");
        }
        // A password nobody asked for, or any other message, is stopped too.
        let mut e = exchange(AuthPolicy::default(), tls(true));
        assert!(e.on_client_message(b'p', b"secret\0").is_err());
        assert!(e.on_client_message(b'Q', b"SELECT 1\0").is_err());
        e.on_client_message(b'X', b"").unwrap();
        // One password per request.
        e.on_request(&cleartext()).unwrap();
        e.on_client_message(b'p', b"secret\0").unwrap();
        assert!(e.on_client_message(b'p', b"secret\0").is_err());
    }

    #[test]
    fn a_server_that_skips_the_scram_proof_or_repeats_a_step_is_refused() {
        let mut e = exchange(AuthPolicy::default(), tls(true));
        e.on_request(&sasl(&["SCRAM-SHA-256-PLUS"])).unwrap();
        e.on_client_message(
            b'p',
            &initial_response("SCRAM-SHA-256-PLUS", "p=tls-server-end-point"),
        )
        .unwrap();
        e.on_request(&request(11, b"r=nonce,s=c2FsdA==,i=4096"))
            .unwrap();
        e.on_client_message(b'p', b"c=...,p=proof").unwrap();
        // OK without SASLFinal: the server never proved it knows the password.
        let err = e.on_request(&ok()).unwrap_err();
        assert!(matches!(err, AuthError::Sequence { .. }), "{err}");
        let mut e = exchange(AuthPolicy::default(), tls(true));
        assert!(
            e.on_request(&request(11, b"r=x")).is_err(),
            "continue before SASL"
        );
        let mut e = exchange(AuthPolicy::default(), tls(true));
        e.on_request(&sasl(&["SCRAM-SHA-256-PLUS"])).unwrap();
        assert!(
            e.on_request(&sasl(&["SCRAM-SHA-256-PLUS"])).is_err(),
            "duplicate SASL"
        );
    }

    #[test]
    fn unsupported_methods_are_named() {
        let err = exchange(AuthPolicy::default(), plain())
            .on_request(&request(7, &[]))
            .unwrap_err();
        assert!(matches!(err, AuthError::Unsupported("GSSAPI")), "{err}");
        // With require_auth, libpq's reason comes first.
        let err = exchange(policy("scram-sha-256", ChannelBindingMode::Prefer), plain())
            .on_request(&request(7, &[]))
            .unwrap_err();
        assert!(matches!(err, AuthError::RequireAuth { .. }), "{err}");
    }

    #[test]
    fn client_bytes_are_judged_message_by_message() {
        let mut e = exchange(AuthPolicy::default(), tls(true));
        e.on_request(&cleartext()).unwrap();
        let mut bytes = vec![b'p', 0, 0, 0, 11];
        bytes.extend_from_slice(b"secret\0");
        // The password, then a second one in the same write: the second is stopped.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        assert!(e.on_client_bytes(&twice).is_err());
    }
}
