//! The replication connection: startup, TLS, authentication, replication
//! commands and the CopyBoth stream.
//!
//! tokio-postgres cannot enter CopyBoth mode, so this connection is framed by
//! hand on postgres-protocol's message encoders. The sequence is:
//!
//! 1. TCP connect; with TLS, an SSLRequest answered `S` (then the handshake)
//!    or `N` (acceptable only for `sslmode=prefer`): [`super::transport`].
//! 2. StartupMessage with `replication=database`, which makes the backend a
//!    walsender that also accepts simple-query SQL. The session is pinned to
//!    UTF-8, ISO dates and UTC, so the text pgoutput sends for each column is
//!    the same whatever the server's defaults.
//! 3. Authentication: trust, cleartext, md5 or SCRAM-SHA-256 (with
//!    `tls-server-end-point` channel binding over TLS when the server offers
//!    SCRAM-SHA-256-PLUS), each request judged by the authentication policy
//!    ([`super::auth`]) before it is answered, and each answer before it is
//!    sent.
//! 4. Replication commands as simple queries (`IDENTIFY_SYSTEM`,
//!    `CREATE_REPLICATION_SLOT`, `SHOW`), then `START_REPLICATION`, answered
//!    by CopyBothResponse. Each is bounded by `--request-timeout`
//!    ([`super::request`]); one that times out leaves the connection
//!    unusable, since its answer may still arrive.
//!
//! Once streaming, reading and writing are split: the caller reads
//! [`ReplicationMessage`]s from [`ReplicationStream::next`], while a task of
//! its own sends standby status updates on a timer and at once when a
//! keepalive asks for one. Status updates therefore keep flowing while the
//! reader is blocked on a full producer queue, and the walsender does not
//! time the connection out.
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::{AuthError, AuthExchange, Channel, SaslChoice};
use super::lsn::Lsn;
use super::params::ConnectParams;
use super::protocol::{
    BackendCodec, BackendMessage, FrameError, ReplicationMessage, ReplicationMessageError,
    StandbyStatus, put_standby_status_update,
};
use super::request::{RequestLimit, TimedOut};
use super::tls::{TlsError, TlsSetup};
use super::transport::{self, Socket, TransportError};

/// The default and largest interval between standby status updates.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// What a streaming read adds to the server's `wal_sender_timeout` before it
/// declares the connection stalled (see [`silence_limit`]).
pub const SILENCE_MARGIN: Duration = Duration::from_secs(10);

/// The `wal_sender_timeout` the silence limit assumes when the server's is
/// disabled (0) or unreadable: PostgreSQL's default.
pub const ASSUMED_WAL_SENDER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `CREATE_REPLICATION_SLOT ... LOGICAL` may take when
/// `--request-timeout` is shorter: the server answers only once every
/// transaction running when it started has ended (the slot's consistent
/// point), which a long batch job can delay for minutes. Abandoning it early
/// would help nothing: the next attempt waits for the same transactions.
pub const SLOT_CREATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The shortest gap between two status updates sent because the confirmed
/// position moved: the slot follows within a fraction of a second, at a few
/// small messages a second however many transactions are confirmed.
pub const PROGRESS_REPORT_GAP: Duration = Duration::from_millis(200);

/// An error or fatal message the server sent, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The SQLSTATE, such as `28P01`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    pub detail: Option<String>,
    /// The optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    /// The fields of an ErrorResponse or NoticeResponse.
    pub(crate) fn from_fields(mut fields: backend::ErrorFields<'_>) -> io::Result<Self> {
        let mut e = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                // 'V' is the untranslated severity; prefer it over 'S'.
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        Ok(e)
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// TCP, or TLS before the login, failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Connecting, TLS and authentication took longer than `connect_timeout`.
    #[error("connecting to PostgreSQL at {target} timed out after {after:?}")]
    Timeout {
        /// `host:port`.
        target: String,
        /// The limit.
        after: Duration,
    },
    /// TLS could not be configured.
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The authentication policy stopped the login.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The server asked for a password and none was given.
    #[error(
        "PostgreSQL asks for a password, but none was given: put it in the URL, \
         PGPASSWORD or --postgres-password-file"
    )]
    NoPassword,
    /// The SCRAM exchange failed on our side (a server signature that does not match, say).
    #[error("SCRAM-SHA-256 authentication failed: {0}")]
    Scram(#[source] io::Error),
    /// The server reported an error.
    #[error("PostgreSQL: {0}")]
    Server(#[from] ServerError),
    /// Reading or writing the socket failed.
    #[error("the connection to PostgreSQL failed: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection.
    #[error("PostgreSQL closed the connection")]
    Closed,
    /// A request got no answer in time; the connection is abandoned.
    #[error(transparent)]
    RequestTimeout(#[from] TimedOut),
    /// Nothing arrived although keepalives were asked for: the network stalls.
    #[error(
        "no message from PostgreSQL for {0:?} although keepalives were requested: the connection stalls"
    )]
    Stalled(Duration),
    /// The server ended the replication stream (CopyDone), as it does when it shuts down.
    #[error("PostgreSQL ended the replication stream (is it shutting down?)")]
    StreamEnded,
    /// The server sent a message that makes no sense here.
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    /// A CopyData body that is not a replication message.
    #[error("malformed replication message: {0}")]
    Replication(#[from] ReplicationMessageError),
    /// A message length beyond its kind's cap, or a message that does not parse.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl ConnError {
    /// The SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ConnError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed without anyone changing anything:
    /// network trouble, a server restarting or out of connections, a slot
    /// another process holds. Wrong credentials, missing objects and bad
    /// settings are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnError::Transport(e) => e.is_transient(),
            ConnError::Timeout { .. }
            | ConnError::Io(_)
            | ConnError::Closed
            | ConnError::RequestTimeout(_)
            | ConnError::Stalled(_)
            | ConnError::StreamEnded => true,
            ConnError::Server(e) => {
                e.code.starts_with("08")
                    || e.code.starts_with("53")
                    || matches!(
                        e.code.as_str(),
                        "57P01" | "57P02" | "57P03" | "55006" | "40001"
                    )
            }
            ConnError::TlsSetup(_)
            | ConnError::Auth(_)
            | ConnError::NoPassword
            | ConnError::Scram(_)
            | ConnError::Protocol(_)
            | ConnError::Replication(_)
            | ConnError::Frame(_) => false,
        }
    }
}

/// Reads whole backend messages; cancel-safe, since bytes read stay in `buf`.
/// The buffer grows with the bytes that arrive, a chunk at a time, never
/// with the length a message claims; the codec refuses a length beyond its
/// kind's cap before any of the body is read.
#[derive(Debug)]
struct Reader<R> {
    io: R,
    buf: BytesMut,
    codec: BackendCodec,
}

/// How much the read buffer grows by when it fills up.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            codec: BackendCodec::default(),
        }
    }

    async fn next(&mut self) -> Result<BackendMessage, ConnError> {
        loop {
            if let Some(message) = self.codec.decode(&mut self.buf)? {
                return Ok(message);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
    }
}

/// One row of a simple-query result, every value in text form.
pub type Row = Vec<Option<String>>;

/// A slot made by `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub name: String,
    /// The first position it decodes from: transactions committing after it.
    pub consistent_point: Lsn,
    /// The snapshot exported for reading the rows that existed before, if asked for.
    pub snapshot_name: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with the snapshot taken at the consistent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`) until the next command.
    Export,
    /// Do not keep it.
    Discard,
}

/// The server's `IDENTIFY_SYSTEM` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's unique system identifier.
    pub system_id: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
    /// The database connected to.
    pub dbname: Option<String>,
}

/// Where a timeline ended, from a timeline history file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSwitch {
    /// The timeline that ended.
    pub timeline: u32,
    /// The first position that is not part of it on the way to the newer
    /// one: WAL before it is shared, WAL from it on differs.
    pub switchpoint: Lsn,
}

/// Reads a timeline history file: `parent-tli <tab> switchpoint <tab>
/// reason` per line; comments and blank lines are skipped.
pub fn parse_timeline_history(content: &str) -> Vec<TimelineSwitch> {
    content
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let timeline = fields.next()?.parse().ok()?;
            let switchpoint = fields.next()?.parse().ok()?;
            Some(TimelineSwitch {
                timeline,
                switchpoint,
            })
        })
        .collect()
}

/// The major version of a `server_version` text: `17` for `17.4 (Debian
/// 17.4-1)`, `14` for `14.11`; 0 when it does not parse.
pub fn major_version(server_version: &str) -> u32 {
    server_version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0)
}

/// A replication connection, before streaming.
#[derive(Debug)]
pub struct ReplicationConnection {
    reader: Reader<ReadHalf<Socket>>,
    writer: WriteHalf<Socket>,
    out: BytesMut,
    backend_pid: i32,
    server_version: String,
    /// How long each request may wait for its answer.
    requests: RequestLimit,
    /// The request that timed out, after which the connection is not used:
    /// its answer may still arrive and would be taken for the next one's.
    abandoned: Option<TimedOut>,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS and authenticates, within `connect_timeout`.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ConnError> {
        let tls = TlsSetup::new(params)?;
        let target = format!("{}:{}", params.host, params.port);
        tokio::time::timeout(
            params.connect_timeout,
            Self::connect_inner(params, tls, &target),
        )
        .await
        .map_err(|_| ConnError::Timeout {
            target,
            after: params.connect_timeout,
        })?
    }

    async fn connect_inner(
        params: &ConnectParams,
        tls: Option<TlsSetup>,
        target: &str,
    ) -> Result<Self, ConnError> {
        let (socket, channel) = transport::open(params, tls, target).await?;
        let (read, writer) = tokio::io::split(socket);
        let mut conn = ReplicationConnection {
            reader: Reader::new(read),
            writer,
            out: BytesMut::with_capacity(1024),
            backend_pid: 0,
            server_version: String::new(),
            requests: params.requests.clone(),
            abandoned: None,
        };
        conn.startup(params, channel, target).await?;
        Ok(conn)
    }

    /// Says goodbye (Terminate) and closes the connection.
    pub async fn close(mut self) -> Result<(), ConnError> {
        frontend::terminate(&mut self.out);
        self.send().await?;
        // The server closes after Terminate; a failing TLS close_notify is harmless.
        let _ = self.writer.shutdown().await;
        Ok(())
    }

    /// The process ID of the walsender serving this connection.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// The server's `server_version`, such as `15.18 (Debian 15.18-0+deb12u1)`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    async fn send(&mut self) -> Result<(), ConnError> {
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        self.out.clear();
        Ok(())
    }

    async fn startup(
        &mut self,
        params: &ConnectParams,
        channel: Channel,
        target: &str,
    ) -> Result<(), ConnError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.out)?;
        self.send().await?;
        let exchange = AuthExchange::new(params.auth.clone(), channel, target.to_owned());
        self.authenticate(params, exchange).await?;
        loop {
            match self.reader.next().await? {
                BackendMessage::Other(backend::Message::ReadyForQuery(_)) => return Ok(()),
                BackendMessage::Other(backend::Message::BackendKeyData(body)) => {
                    self.backend_pid = body.process_id();
                }
                BackendMessage::Other(backend::Message::ParameterStatus(body)) => {
                    self.parameter(&body)?;
                }
                other => Self::unexpected(other, "waiting for ReadyForQuery after login")?,
            }
        }
    }

    /// Takes note of a parameter the server reports.
    fn parameter(&mut self, body: &backend::ParameterStatusBody) -> io::Result<()> {
        if body.name()? == "server_version" {
            body.value()?.clone_into(&mut self.server_version);
        }
        Ok(())
    }

    /// The next message of the authentication exchange. A notice or a
    /// parameter status answers no step, so it is noted and the next message
    /// read: taken for the answer, it would end the exchange early (before
    /// the server proved it knows the password, in SCRAM's case).
    async fn next_auth_message(&mut self) -> Result<backend::Message, ConnError> {
        loop {
            match self.reader.next().await? {
                BackendMessage::Other(backend::Message::NoticeResponse(body)) => {
                    Self::log_notice(&ServerError::from_fields(body.fields())?);
                }
                BackendMessage::Other(backend::Message::ParameterStatus(body)) => {
                    self.parameter(&body)?;
                }
                BackendMessage::Other(message) => return Ok(message),
                BackendMessage::CopyBothResponse => {
                    return Err(ConnError::Protocol(
                        "CopyBothResponse while authenticating".into(),
                    ));
                }
                BackendMessage::CopyData(_) => {
                    return Err(ConnError::Protocol("CopyData while authenticating".into()));
                }
            }
        }
    }

    /// Logs in. Every authentication request goes through `exchange`
    /// before it is answered, and every answer before it is sent: a method
    /// the policy refuses gets nothing.
    async fn authenticate(
        &mut self,
        params: &ConnectParams,
        mut exchange: AuthExchange,
    ) -> Result<(), ConnError> {
        let password = || params.password().ok_or(ConnError::NoPassword);
        let request = self.next_auth_message().await?;
        exchange.on_request(&request)?;
        match request {
            backend::Message::AuthenticationOk => return Ok(()),
            backend::Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?.as_bytes(), &mut self.out)?;
            }
            backend::Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(params.user.as_bytes(), password()?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.out)?;
            }
            backend::Message::AuthenticationSasl(_) => {
                let choice = exchange.sasl().cloned().ok_or_else(|| {
                    ConnError::Protocol("AuthenticationSASL without a choice".into())
                })?;
                return self.scram(&mut exchange, password()?, &choice).await;
            }
            other => return Err(Self::refusal(other, "authenticating")?),
        }
        self.send_auth(&mut exchange).await?;
        self.expect_auth_ok(&mut exchange).await
    }

    /// Sends what is buffered, once `exchange` allows every message of it.
    async fn send_auth(&mut self, exchange: &mut AuthExchange) -> Result<(), ConnError> {
        if let Err(refused) = exchange.on_client_bytes(&self.out) {
            self.out.clear();
            return Err(refused.into());
        }
        self.send().await
    }

    /// The next authentication message, judged by `exchange`.
    async fn next_auth_request(
        &mut self,
        exchange: &mut AuthExchange,
    ) -> Result<backend::Message, ConnError> {
        let message = self.next_auth_message().await?;
        exchange.on_request(&message)?;
        Ok(message)
    }

    async fn scram(
        &mut self,
        exchange: &mut AuthExchange,
        password: &str,
        choice: &SaslChoice,
    ) -> Result<(), ConnError> {
        let mut scram = sasl::ScramSha256::new(password.as_bytes(), choice.channel_binding());
        frontend::sasl_initial_response(choice.mechanism, scram.message(), &mut self.out)?;
        self.send_auth(exchange).await?;
        match self.next_auth_request(exchange).await? {
            backend::Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(ConnError::Scram)?;
            }
            other => return Err(Self::refusal(other, "waiting for SASL continue")?),
        }
        frontend::sasl_response(scram.message(), &mut self.out)?;
        self.send_auth(exchange).await?;
        match self.next_auth_request(exchange).await? {
            backend::Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map_err(ConnError::Scram)?;
            }
            other => return Err(Self::refusal(other, "waiting for SASL final")?),
        }
        self.expect_auth_ok(exchange).await
    }

    async fn expect_auth_ok(&mut self, exchange: &mut AuthExchange) -> Result<(), ConnError> {
        match self.next_auth_request(exchange).await? {
            backend::Message::AuthenticationOk => Ok(()),
            other => Err(Self::refusal(other, "waiting for AuthenticationOk")?),
        }
    }

    /// The error for a message that does not answer the step: the server's
    /// own error for an ErrorResponse, else a protocol error. (`Err` when the
    /// ErrorResponse itself does not parse.)
    fn refusal(message: backend::Message, during: &str) -> Result<ConnError, ConnError> {
        match message {
            backend::Message::ErrorResponse(body) => {
                Ok(ServerError::from_fields(body.fields())?.into())
            }
            other => Ok(ConnError::Protocol(format!(
                "{} while {during}",
                message_name(&other)
            ))),
        }
    }

    fn log_notice(notice: &ServerError) {
        tracing::info!(severity = %notice.severity, code = %notice.code, "postgres: {}", notice.message);
    }

    /// Turns a message that should not have come into an error; an
    /// ErrorResponse becomes the server's error, a notice is only logged.
    fn unexpected(message: BackendMessage, during: &str) -> Result<(), ConnError> {
        match message {
            BackendMessage::Other(backend::Message::NoticeResponse(body)) => {
                Self::log_notice(&ServerError::from_fields(body.fields())?);
                Ok(())
            }
            // Parameter changes mid-session (a reload) are of no interest.
            BackendMessage::Other(backend::Message::ParameterStatus(_)) => Ok(()),
            BackendMessage::Other(other) => Err(Self::refusal(other, during)?),
            other => Err(ConnError::Protocol(format!("{other:?} while {during}"))),
        }
    }

    /// Runs one simple query (a replication command or SQL) and returns its
    /// rows, within `--request-timeout`.
    pub async fn simple_query(&mut self, query: &str) -> Result<Vec<Row>, ConnError> {
        self.simple_query_within(self.requests.timeout, query).await
    }

    /// [`Self::simple_query`] within `timeout`.
    async fn simple_query_within(
        &mut self,
        timeout: Duration,
        query: &str,
    ) -> Result<Vec<Row>, ConnError> {
        if let Some(timed_out) = &self.abandoned {
            return Err(timed_out.clone().into());
        }
        let limit = self.requests.clone();
        let result = limit
            .run_within(timeout, query, self.unbounded_query(query))
            .await;
        result.unwrap_or_else(|timed_out| {
            self.abandoned = Some(timed_out.clone());
            Err(timed_out.into())
        })
    }

    async fn unbounded_query(&mut self, query: &str) -> Result<Vec<Row>, ConnError> {
        frontend::query(query, &mut self.out)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.reader.next().await? {
                BackendMessage::Other(backend::Message::ReadyForQuery(_)) => {
                    return error.map_or(Ok(rows), Err);
                }
                BackendMessage::Other(backend::Message::DataRow(body)) => {
                    let buffer = body.buffer();
                    let row = body
                        .ranges()
                        .map(|range| {
                            Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()))
                        })
                        .collect()?;
                    rows.push(row);
                }
                BackendMessage::Other(
                    backend::Message::RowDescription(_)
                    | backend::Message::CommandComplete(_)
                    | backend::Message::EmptyQueryResponse,
                ) => {}
                BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                    // The server still sends ReadyForQuery; wait for it so the
                    // connection stays usable.
                    error = Some(ServerError::from_fields(body.fields())?.into());
                }
                other => Self::unexpected(other, "running a query")?,
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemId, ConnError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ConnError::Protocol("IDENTIFY_SYSTEM returned no row".to_owned()))?;
        let text = |i: usize| row.get(i).cloned().flatten();
        let bad =
            |what: &str| ConnError::Protocol(format!("IDENTIFY_SYSTEM returned a bad {what}"));
        Ok(SystemId {
            system_id: text(0).ok_or_else(|| bad("systemid"))?,
            timeline: text(1)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlog_pos: text(2)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: text(3),
        })
    }

    /// `SHOW name`, as the walsender answers it.
    pub async fn show(&mut self, name: &str) -> Result<String, ConnError> {
        let rows = self
            .simple_query(&format!("SHOW {}", quote_ident(name)))
            .await?;
        rows.into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
            .ok_or_else(|| ConnError::Protocol(format!("SHOW {name} returned nothing")))
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput ...`.
    ///
    /// The form used is the one PostgreSQL 14 understands and later versions
    /// still accept.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ConnError> {
        let query = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {}",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            match snapshot {
                SnapshotAction::Export => "EXPORT_SNAPSHOT",
                SnapshotAction::Discard => "NOEXPORT_SNAPSHOT",
            }
        );
        self.create_slot(name, &query).await
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput (SNAPSHOT ..., FAILOVER true)`
    /// (PostgreSQL 17+): a slot that standbys with `sync_replication_slots`
    /// keep a copy of, so that it survives their promotion. The snapshot is
    /// exported by the same command, so the slot's consistent point and the
    /// snapshot are one moment, as with [`Self::create_logical_slot`].
    pub async fn create_failover_slot(
        &mut self,
        name: &str,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ConnError> {
        let query = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT {}, FAILOVER true)",
            quote_ident(name),
            match snapshot {
                SnapshotAction::Export => "'export'",
                SnapshotAction::Discard => "'nothing'",
            }
        );
        self.create_slot(name, &query).await
    }

    /// Runs a `CREATE_REPLICATION_SLOT` and reads its answer.
    async fn create_slot(&mut self, name: &str, query: &str) -> Result<CreatedSlot, ConnError> {
        let rows = self
            .simple_query_within(self.requests.timeout.max(SLOT_CREATION_TIMEOUT), query)
            .await?;
        let row = rows.into_iter().next().ok_or_else(|| {
            ConnError::Protocol("CREATE_REPLICATION_SLOT returned no row".to_owned())
        })?;
        let mut cols = row.into_iter();
        let name = cols.next().flatten().unwrap_or_else(|| name.to_owned());
        let consistent_point = cols
            .next()
            .flatten()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| {
                ConnError::Protocol("CREATE_REPLICATION_SLOT: bad consistent_point".into())
            })?;
        Ok(CreatedSlot {
            name,
            consistent_point,
            snapshot_name: cols.next().flatten(),
        })
    }

    /// `ALTER_REPLICATION_SLOT name (FAILOVER true)` (PostgreSQL 17+). The
    /// slot must not be in use by another process (SQLSTATE 55006).
    pub async fn enable_failover(&mut self, name: &str) -> Result<(), ConnError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(name)
        ))
        .await?;
        Ok(())
    }

    /// `TIMELINE_HISTORY tli`: where each timeline before `tli` ended on the
    /// way to it (the server's `N.history` file), oldest first.
    pub async fn timeline_history(&mut self, tli: u32) -> Result<Vec<TimelineSwitch>, ConnError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await?;
        let content = rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().nth(1).flatten())
            .ok_or_else(|| ConnError::Protocol("TIMELINE_HISTORY returned no file".into()))?;
        Ok(parse_timeline_history(&content))
    }

    /// The server's major version (17 for `17.4 (Debian ...)`), 0 if unknown.
    pub fn server_major(&self) -> u32 {
        major_version(&self.server_version)
    }

    /// `START_REPLICATION SLOT s LOGICAL start (options)`: from here on the
    /// connection streams. Pass [`Lsn::ZERO`] to resume where the slot was
    /// confirmed. No status update goes out until
    /// [`StartedReplication::report`] says what to report: the slot is held
    /// from here on, so this is the moment to read its confirmed position.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, impl AsRef<str>)],
    ) -> Result<StartedReplication, ConnError> {
        let options = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v.as_ref())))
            .collect::<Vec<_>>()
            .join(", ");
        let query = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            quote_ident(slot)
        );
        if let Some(timed_out) = self.abandoned.take() {
            return Err(timed_out.into());
        }
        let limit = self.requests.clone();
        limit.run(&query, self.start_streaming(&query)).await??;
        Ok(StartedReplication {
            reader: self.reader,
            writer: self.writer,
        })
    }

    /// Sends `START_REPLICATION ...` and reads up to CopyBothResponse.
    async fn start_streaming(&mut self, query: &str) -> Result<(), ConnError> {
        frontend::query(query, &mut self.out)?;
        self.send().await?;
        let mut error = None;
        loop {
            match self.reader.next().await? {
                BackendMessage::CopyBothResponse => return Ok(()),
                BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                    error = Some(ServerError::from_fields(body.fields())?);
                }
                BackendMessage::Other(backend::Message::ReadyForQuery(_)) => {
                    return Err(error.map_or_else(
                        || ConnError::Protocol("START_REPLICATION ended without streaming".into()),
                        ConnError::Server,
                    ));
                }
                other => Self::unexpected(other, "starting replication")?,
            }
        }
    }
}

/// A replication connection that streams, before its status updates start.
#[derive(Debug)]
pub struct StartedReplication {
    reader: Reader<ReadHalf<Socket>>,
    writer: WriteHalf<Socket>,
}

impl StartedReplication {
    /// Starts the status updates, which report `feedback`'s positions every
    /// status interval at least; a read that hears nothing from the server
    /// for the silence limit declares a stall (both from [`StreamTiming`]).
    /// Keep one [`Feedback`] across reconnects, raised to the slot's
    /// confirmed position before this call, so that no update ever reports
    /// less than the slot already has.
    pub fn report(self, feedback: Feedback, timing: StreamTiming) -> ReplicationStream {
        let cancel = CancellationToken::new();
        let heard = Arc::new(Heard::new());
        let writer = tokio::spawn(status_updates(
            self.writer,
            feedback.clone(),
            Arc::clone(&heard),
            timing.status_interval,
            cancel.clone(),
        ));
        ReplicationStream {
            reader: self.reader,
            feedback,
            heard,
            writer: Some(writer),
            cancel: cancel.drop_guard(),
            silence_limit: timing.silence_limit,
        }
    }
}

/// The name of a backend message, for errors.
fn message_name(message: &backend::Message) -> &'static str {
    use backend::Message as M;
    match message {
        M::AuthenticationOk => "AuthenticationOk",
        M::AuthenticationCleartextPassword => "AuthenticationCleartextPassword",
        M::AuthenticationMd5Password(_) => "AuthenticationMD5Password",
        M::AuthenticationSasl(_) => "AuthenticationSASL",
        M::AuthenticationSaslContinue(_) => "AuthenticationSASLContinue",
        M::AuthenticationSaslFinal(_) => "AuthenticationSASLFinal",
        M::BackendKeyData(_) => "BackendKeyData",
        M::CommandComplete(_) => "CommandComplete",
        M::CopyData(_) => "CopyData",
        M::CopyDone => "CopyDone",
        M::DataRow(_) => "DataRow",
        M::ErrorResponse(_) => "ErrorResponse",
        M::NoticeResponse(_) => "NoticeResponse",
        M::ParameterStatus(_) => "ParameterStatus",
        M::ReadyForQuery(_) => "ReadyForQuery",
        M::RowDescription(_) => "RowDescription",
        _ => "another message",
    }
}

/// The server's `wal_sender_timeout` as `SHOW` prints it (`60s`, `1min`,
/// `500ms`, `0`); `None` when it is disabled (0) or cannot be read.
fn wal_sender_timeout(show: &str) -> Option<Duration> {
    let text = show.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number.parse::<u64>().ok()?;
    let millis = match unit.trim() {
        "ms" => number,
        "" | "s" => number.saturating_mul(1000),
        "min" => number.saturating_mul(60_000),
        "h" => number.saturating_mul(3_600_000),
        "d" => number.saturating_mul(86_400_000),
        _ => return None,
    };
    (millis > 0).then(|| Duration::from_millis(millis))
}

/// How often to send status updates, given the server's `wal_sender_timeout`
/// as `SHOW` prints it (`60s`, `1min`, `500ms`, `0`): a third of the timeout,
/// and never less often than every [`DEFAULT_STATUS_INTERVAL`].
pub fn status_interval(wal_sender_timeout_shown: &str) -> Duration {
    wal_sender_timeout(wal_sender_timeout_shown).map_or(DEFAULT_STATUS_INTERVAL, |timeout| {
        (timeout / 3)
            .max(Duration::from_millis(100))
            .min(DEFAULT_STATUS_INTERVAL)
    })
}

/// How long a streaming read waits for any message from the server before
/// it declares the connection stalled: the server's `wal_sender_timeout`
/// plus [`SILENCE_MARGIN`] ([`ASSUMED_WAL_SENDER_TIMEOUT`] when it is 0 or
/// unreadable).
///
/// Less would take a busy server for a dead one. A walsender decoding a
/// large transaction reads the status updates, and so answers their requests
/// for a keepalive, only once half of its `wal_sender_timeout` has passed
/// since the last one it read; it may therefore be silent for that half plus
/// a status interval, and then some while it catches up. Giving up sooner
/// would reconnect, decode the same transaction again, and give up again:
/// a livelock. The server itself ends a connection it has not heard from for
/// `wal_sender_timeout`, so a live server is never silent much longer than
/// that, while a stalled network is still caught within about a minute.
pub fn silence_limit(wal_sender_timeout_shown: &str) -> Duration {
    wal_sender_timeout(wal_sender_timeout_shown)
        .unwrap_or(ASSUMED_WAL_SENDER_TIMEOUT)
        .saturating_add(SILENCE_MARGIN)
}

/// The pace of a streaming connection, from the server's `wal_sender_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTiming {
    /// How often a status update goes out at least ([`status_interval`]).
    pub status_interval: Duration,
    /// How long the server may be silent before the connection counts as
    /// stalled ([`silence_limit`]).
    pub silence_limit: Duration,
}

impl StreamTiming {
    /// The timing for a server whose `SHOW wal_sender_timeout` printed `shown`.
    pub fn from_wal_sender_timeout(shown: &str) -> Self {
        StreamTiming {
            status_interval: status_interval(shown),
            silence_limit: silence_limit(shown),
        }
    }
}

/// Quotes an identifier for a replication command or SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal (standard_conforming_strings is always on since 9.1).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[derive(Debug)]
struct FeedbackState {
    write: AtomicU64,
    flush: AtomicU64,
    wake: Notify,
    progress: Notify,
}

/// A handle on the positions the status updates report.
///
/// `confirm` moves the flush position, which is what lets the server recycle
/// WAL; it never moves backwards, whatever order calls come in.
#[derive(Debug, Clone)]
pub struct Feedback(Arc<FeedbackState>);

impl Feedback {
    /// Positions starting at `confirmed`, the slot's `confirmed_flush_lsn`.
    pub fn new(confirmed: Lsn) -> Self {
        Feedback(Arc::new(FeedbackState {
            write: AtomicU64::new(confirmed.0),
            flush: AtomicU64::new(confirmed.0),
            wake: Notify::new(),
            progress: Notify::new(),
        }))
    }

    /// Everything up to `lsn` is durably handled: the slot may move there.
    pub fn confirm(&self, lsn: Lsn) {
        let before = self.0.flush.fetch_max(lsn.0, Ordering::AcqRel);
        self.0.write.fetch_max(lsn.0, Ordering::AcqRel);
        if lsn.0 > before {
            self.0.progress.notify_one();
        }
    }

    /// Everything up to `lsn` has been received (informational for the server).
    pub fn received(&self, lsn: Lsn) {
        self.0.write.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.0.flush.load(Ordering::Acquire))
    }

    /// Sends a status update now rather than at the next tick.
    pub fn send_now(&self) {
        self.0.wake.notify_one();
    }

    fn status(&self) -> StandbyStatus {
        let flush = Lsn(self.0.flush.load(Ordering::Acquire));
        let write = Lsn(self.0.write.load(Ordering::Acquire)).max(flush);
        StandbyStatus {
            write,
            flush,
            apply: flush,
        }
    }
}

/// When the server was last heard from on a streaming connection: the reader
/// marks every message, the status-update task reads it.
#[derive(Debug)]
struct Heard {
    origin: tokio::time::Instant,
    /// Milliseconds from `origin` to the last message.
    at_ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard {
            origin: tokio::time::Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.fetch_max(ms, Ordering::AcqRel);
    }

    fn silence(&self) -> Duration {
        let at = self.origin + Duration::from_millis(self.at_ms.load(Ordering::Acquire));
        tokio::time::Instant::now().saturating_duration_since(at)
    }
}

/// Sends status updates until cancelled, then a last one and Terminate.
///
/// Any update asks the server for a reply (a keepalive) when nothing was
/// heard from it for an `interval`, whatever sent it: progress updates every
/// 200 ms reset the timer, so a rule tied to the timer alone would leave an
/// idle server silent while acknowledgements trickle in, and the reader would
/// take the silence for a stall.
async fn status_updates<W: AsyncWrite + Unpin>(
    mut writer: W,
    feedback: Feedback,
    heard: Arc<Heard>,
    interval: Duration,
    cancel: CancellationToken,
) -> Result<(), ConnError> {
    let mut buf = BytesMut::with_capacity(64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let progress_reported = async {
            feedback.0.progress.notified().await;
            tokio::time::sleep_until(last_sent + PROGRESS_REPORT_GAP).await;
        };
        let timed = tokio::select! {
            biased;
            // Shutdown: report the final position, then leave cleanly.
            () = cancel.cancelled() => break,
            // A keepalive asked for a reply, or the caller wants one out now.
            () = feedback.0.wake.notified() => false,
            // The regular update that keeps wal_sender_timeout from firing.
            _ = ticker.tick() => true,
            // The confirmed position moved: let the slot follow, throttled.
            () = progress_reported => false,
        };
        // The timed update always asks for a keepalive back, any other when
        // the server has been silent for an interval: the reader then hears
        // from a live server at least every other interval even when nothing
        // is written, and can tell a stalled network from a quiet database.
        let ping = timed || heard.silence() >= interval;
        put_standby_status_update(feedback.status(), SystemTime::now(), ping, &mut buf);
        writer.write_all(&buf).await?;
        writer.flush().await?;
        buf.clear();
        last_sent = tokio::time::Instant::now();
        ticker.reset();
    }
    put_standby_status_update(feedback.status(), SystemTime::now(), false, &mut buf);
    frontend::terminate(&mut buf);
    writer.write_all(&buf).await?;
    writer.flush().await?;
    // The server closes after Terminate; a failing TLS close_notify is harmless.
    let _ = writer.shutdown().await;
    Ok(())
}

/// A streaming replication connection.
#[derive(Debug)]
pub struct ReplicationStream {
    reader: Reader<ReadHalf<Socket>>,
    feedback: Feedback,
    heard: Arc<Heard>,
    writer: Option<JoinHandle<Result<(), ConnError>>>,
    cancel: tokio_util::sync::DropGuard,
    /// How long a read may wait for the server before the connection counts as stalled.
    silence_limit: Duration,
}

impl ReplicationStream {
    /// The next XLogData or keepalive. A keepalive that asks for a reply
    /// triggers a status update before it is returned. Cancel-safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ConnError> {
        loop {
            // Every status update on the timer asks for a keepalive back, so a
            // live server is never silent this long.
            let message = tokio::time::timeout(self.silence_limit, self.reader.next())
                .await
                .map_err(|_| ConnError::Stalled(self.silence_limit))??;
            self.heard.mark();
            let body = match message {
                BackendMessage::CopyData(body) => body,
                // The walsender ends the stream this way when the server shuts
                // down: CopyDone, or the end of the command that streamed.
                BackendMessage::Other(
                    backend::Message::CopyDone
                    | backend::Message::CommandComplete(_)
                    | backend::Message::ReadyForQuery(_),
                ) => return Err(ConnError::StreamEnded),
                BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(ServerError::from_fields(body.fields())?.into());
                }
                BackendMessage::Other(backend::Message::NoticeResponse(body)) => {
                    let notice = ServerError::from_fields(body.fields())?;
                    tracing::info!(code = %notice.code, "postgres: {}", notice.message);
                    continue;
                }
                BackendMessage::Other(backend::Message::ParameterStatus(_)) => continue,
                other => {
                    return Err(ConnError::Protocol(format!("{other:?} while streaming")));
                }
            };
            let message = ReplicationMessage::parse(body)?;
            if let ReplicationMessage::PrimaryKeepalive {
                reply_requested: true,
                ..
            } = message
            {
                self.feedback.send_now();
            }
            return Ok(message);
        }
    }

    /// The handle on the positions reported to the server.
    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// Sends the final status update and closes the connection. An error
    /// here means the last confirmation may not have reached the server; the
    /// slot then stays at the one before, and the events after it are sent
    /// again next time.
    pub async fn close(mut self) -> Result<(), ConnError> {
        let writer = self.writer.take();
        drop(self.cancel);
        match writer {
            Some(handle) => handle
                .await
                .map_err(|e| ConnError::Io(io::Error::other(e)))?,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_histories_and_versions_parse() {
        let history = "1\t0/3000158\tno recovery target specified\n\n\
                       2\t1/A0000A0\tbefore 2026-01-01 00:00:00+00\n";
        assert_eq!(
            parse_timeline_history(history),
            [
                TimelineSwitch {
                    timeline: 1,
                    switchpoint: Lsn(0x0300_0158)
                },
                TimelineSwitch {
                    timeline: 2,
                    switchpoint: Lsn(0x1_0A00_00A0)
                },
            ]
        );
        assert_eq!(major_version("17.4 (Debian 17.4-1.pgdg120+2)"), 17);
        assert_eq!(major_version("15.14"), 15);
        assert_eq!(major_version("18beta1"), 18);
        assert_eq!(major_version(""), 0);
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("my\"slot"), "\"my\"\"slot\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn status_interval_is_a_third_of_the_timeout_at_most_ten_seconds() {
        assert_eq!(status_interval("60s"), Duration::from_secs(10));
        assert_eq!(status_interval("1min"), Duration::from_secs(10));
        assert_eq!(status_interval("9s"), Duration::from_secs(3));
        assert_eq!(status_interval("1500ms"), Duration::from_millis(500));
        assert_eq!(status_interval("0"), DEFAULT_STATUS_INTERVAL);
        assert_eq!(status_interval("nonsense"), DEFAULT_STATUS_INTERVAL);
    }

    #[test]
    fn the_silence_limit_outlasts_a_busy_walsender() {
        // A walsender decoding a large transaction answers only every half
        // wal_sender_timeout, plus a status interval: the limit must exceed
        // the whole timeout, whatever the status interval is capped at.
        for (shown, timeout) in [
            ("60s", 60_000),
            ("1min", 60_000),
            ("5min", 300_000),
            ("9s", 9_000),
            ("1500ms", 1_500),
        ] {
            let timing = StreamTiming::from_wal_sender_timeout(shown);
            let timeout = Duration::from_millis(timeout);
            assert_eq!(timing.silence_limit, timeout + SILENCE_MARGIN, "{shown}");
            assert!(
                timing.silence_limit > timeout / 2 + timing.status_interval * 2,
                "{shown}: {timing:?}"
            );
        }
        // Disabled or unreadable: PostgreSQL's default is assumed.
        for shown in ["0", "nonsense"] {
            assert_eq!(
                silence_limit(shown),
                ASSUMED_WAL_SENDER_TIMEOUT + SILENCE_MARGIN
            );
        }
    }

    #[test]
    fn feedback_never_moves_backwards() {
        let fb = Feedback::new(Lsn(100));
        fb.confirm(Lsn(50));
        assert_eq!(fb.confirmed(), Lsn(100));
        fb.confirm(Lsn(300));
        fb.received(Lsn(200));
        assert_eq!(
            fb.status(),
            StandbyStatus {
                write: Lsn(300),
                flush: Lsn(300),
                apply: Lsn(300)
            }
        );
        fb.received(Lsn(400));
        assert_eq!(fb.status().write, Lsn(400));
        assert_eq!(fb.status().flush, Lsn(300));
    }

    /// Runs the status-update task against an in-memory socket while the
    /// confirmed position moves every 300 ms and the server says nothing;
    /// returns when each update went out (from the start) and whether it
    /// asked for a reply.
    async fn updates_while_acks_trickle_in(interval: Duration, acks: u64) -> Vec<(Duration, bool)> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let feedback = Feedback::new(Lsn(100));
        let heard = Arc::new(Heard::new());
        let cancel = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let writer = tokio::spawn(status_updates(
            client,
            feedback.clone(),
            heard,
            interval,
            cancel.clone(),
        ));
        let reader = tokio::spawn(async move {
            let mut updates = Vec::new();
            // CopyData('r' ...): tag, length, then 34 bytes whose last says
            // whether a reply is requested.
            let mut frame = [0u8; 39];
            while server.read_exact(&mut frame).await.is_ok() && frame[0] == b'd' {
                updates.push((start.elapsed(), frame[38] == 1));
            }
            updates
        });
        for i in 1..=acks {
            tokio::time::sleep(Duration::from_millis(300)).await;
            feedback.confirm(Lsn(100 + i));
        }
        cancel.cancel();
        writer.await.unwrap().unwrap();
        reader.await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_is_asked_for_a_keepalive_while_progress_updates_flow() {
        let interval = Duration::from_secs(1);
        let updates = updates_while_acks_trickle_in(interval, 30).await;
        // Progress updates every 300 ms reset the timer, so the timed update
        // never comes; the updates themselves must ask for a reply, or the
        // reader hears nothing from an idle server and declares a stall
        // after its silence limit.
        let pings: Vec<Duration> = updates
            .iter()
            .filter(|(_, ping)| *ping)
            .map(|(at, _)| *at)
            .collect();
        assert!(updates.len() > 25, "{updates:?}");
        let mut last = Duration::ZERO;
        for at in pings.iter().copied().chain([updates.last().unwrap().0]) {
            assert!(
                at.saturating_sub(last) <= interval * 2,
                "no reply requested between {last:?} and {at:?}: {updates:?}"
            );
            last = at;
        }
    }

    #[test]
    fn classifies_server_errors() {
        let server = |code: &str| {
            ConnError::Server(ServerError {
                severity: "FATAL".into(),
                code: code.into(),
                message: String::new(),
                detail: None,
                hint: None,
            })
        };
        for transient in ["57P01", "53300", "08006", "55006"] {
            assert!(server(transient).is_transient(), "{transient}");
        }
        for definite in ["28P01", "3D000", "55000", "42704"] {
            assert!(!server(definite).is_transient(), "{definite}");
        }
    }
}
