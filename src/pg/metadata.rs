//! The ordinary SQL connection, beside the replication connection: setup
//! checks and, later, slot state and lag.
//!
//! It is a tokio-postgres client with the same parameters, the same TLS
//! verification and the same authentication policy as the replication
//! connection: walrelay opens the socket itself ([`super::transport`]) and
//! tokio-postgres talks through an [`AuthGuard`] that holds it to the policy
//! ([`super::guard`]). The client is wrapped in [`Client`] so that every
//! request is bounded by `--request-timeout` (see [`super::request`]): a
//! request that times out cuts the connection, whose late answer must not
//! be read and whose backend may be stuck, and the caller connects again.
use std::future::Future;
use std::time::Duration;

use tokio_postgres::config::{ChannelBinding, SslMode as PgSslMode, SslNegotiation};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, IsolationLevel, Row};
use tokio_util::sync::CancellationToken;

use super::auth::{AuthExchange, AuthMethod, Channel, ChannelBindingMode};
use super::conn::ServerError;
use super::guard::{AuthGuard, Established, Refusal};
use super::lsn::Lsn;
use super::params::ConnectParams;
use super::request::{RequestLimit, TimedOut};
use super::tls::{TlsError, TlsSetup};
use super::transport::{self, TransportError};
use crate::event::TableName;

/// The server cannot stream the events table as configured.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The metadata connection failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The server cannot do logical decoding.
    #[error(
        "wal_level is {0:?}, but logical replication needs wal_level=logical: \
         run ALTER SYSTEM SET wal_level = logical and restart PostgreSQL"
    )]
    WalLevel(String),
    /// The publication is missing or does not cover the table.
    #[error("publication {publication:?} {problem}; apply sql/003_publication.sql")]
    Publication {
        /// The publication.
        publication: String,
        /// What is wrong.
        problem: String,
    },
}

/// Checks that the server decodes logically and that `publication`
/// publishes the inserts of `table` with the columns in `needed`.
pub async fn verify_source(
    client: &Client,
    publication: &str,
    table: &TableName,
    needed: &[&str],
) -> Result<(), SetupError> {
    let level = wal_level(client).await?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    let problem = match publication_state(client, publication, table, needed).await? {
        PublicationState::Ok => return Ok(()),
        PublicationState::Missing => "does not exist".to_owned(),
        PublicationState::TableNotIncluded => format!("does not include {table}"),
        PublicationState::InsertsNotPublished => "does not publish inserts".to_owned(),
        PublicationState::Restricted(restriction) => restriction.describe(table),
    };
    Err(SetupError::Publication {
        publication: publication.to_owned(),
        problem,
    })
}

/// The metadata connection failed or a query on it did.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TCP, or TLS before the login, failed.
    #[error("metadata connection: {0}")]
    Transport(#[from] TransportError),
    /// walrelay's authentication policy, or a message size cap, stopped the
    /// connection.
    #[error("metadata connection: {0}")]
    Refused(#[from] Refusal),
    /// Connecting or querying failed.
    #[error("PostgreSQL (metadata connection): {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// Connecting or a request got no answer in time (transient).
    #[error("metadata connection: {0}")]
    Timeout(#[from] TimedOut),
}

impl MetadataError {
    /// The SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            MetadataError::Postgres(e) => e.code().map(tokio_postgres::error::SqlState::code),
            _ => None,
        }
    }

    /// Whether trying again may succeed without anyone changing anything:
    /// the network or a server restarting, not a setting or the policy.
    pub fn is_transient(&self) -> bool {
        match self {
            MetadataError::Postgres(e) => {
                // Class 57 (operator intervention: a restart, a shutdown), 08
                // (connection exception), 53 (insufficient resources: too many
                // connections, out of memory or disk).
                e.as_db_error().is_none()
                    || e.code().is_some_and(|c| {
                        let c = c.code();
                        c.starts_with("57") || c.starts_with("08") || c.starts_with("53")
                    })
            }
            MetadataError::Transport(e) => e.is_transient(),
            MetadataError::Timeout(_) => true,
            MetadataError::Tls(_) | MetadataError::Refused(_) => false,
        }
    }
}

/// tokio-postgres displays a server error as just "db error"; spell it out as
/// the replication connection does, with SQLSTATE, detail and hint.
fn describe(error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = error.as_db_error() {
        return ServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
        .to_string();
    }
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// A connection or transaction whose every request is bounded by
/// `--request-timeout`: the methods of tokio-postgres, with [`MetadataError`].
#[derive(Debug)]
pub struct Bounded<C> {
    inner: C,
    guard: Guard,
}

/// The metadata connection.
pub type Client = Bounded<tokio_postgres::Client>;

/// A transaction on the metadata connection. Dropped without
/// [`Transaction::commit`], it rolls back.
pub type Transaction<'a> = Bounded<tokio_postgres::Transaction<'a>>;

/// What bounds the requests of one connection, and cuts it when one times out.
#[derive(Debug, Clone)]
struct Guard {
    requests: RequestLimit,
    /// Ends the task that drives the connection, closing its socket.
    cut: CancellationToken,
    /// How the server authenticated the connection.
    auth_method: Option<AuthMethod>,
}

impl Guard {
    async fn run<T>(
        &self,
        sql: &str,
        request: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, MetadataError> {
        match self.requests.run(sql, request).await {
            Ok(answer) => Ok(answer?),
            Err(timed_out) => {
                self.cut.cancel();
                Err(timed_out.into())
            }
        }
    }
}

impl<C: GenericClient + Sync> Bounded<C> {
    /// Runs `sql` and returns its rows.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, MetadataError> {
        self.guard.run(sql, self.inner.query(sql, params)).await
    }

    /// Runs `sql` like [`query`](Self::query), waiting up to `timeout` (at
    /// least the usual request timeout) for its answer: for a request known
    /// to take long, such as the first fetch of a sorted cursor.
    pub async fn query_within(
        &self,
        timeout: Duration,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, MetadataError> {
        let timeout = timeout.max(self.guard.requests.timeout);
        match self
            .guard
            .requests
            .run_within(timeout, sql, self.inner.query(sql, params))
            .await
        {
            Ok(answer) => Ok(answer?),
            Err(timed_out) => {
                self.guard.cut.cancel();
                Err(timed_out.into())
            }
        }
    }

    /// Runs `sql`, which returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, MetadataError> {
        self.guard.run(sql, self.inner.query_one(sql, params)).await
    }

    /// Runs `sql`, which returns at most one row.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, MetadataError> {
        self.guard.run(sql, self.inner.query_opt(sql, params)).await
    }

    /// Runs `sql` and returns the number of rows it touched.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, MetadataError> {
        self.guard.run(sql, self.inner.execute(sql, params)).await
    }

    /// Runs statements separated by semicolons, without parameters.
    pub async fn batch_execute(&self, sql: &str) -> Result<(), MetadataError> {
        self.guard.run(sql, self.inner.batch_execute(sql)).await
    }
}

impl Client {
    /// How the server authenticated this connection (what pg_hba.conf asks
    /// of the role), if it asked.
    pub fn auth_method(&self) -> Option<AuthMethod> {
        self.guard.auth_method
    }

    /// Whether the connection is gone, cut after a timeout included.
    pub fn is_closed(&self) -> bool {
        self.guard.cut.is_cancelled() || self.inner.is_closed()
    }

    /// Starts a read-only `REPEATABLE READ` transaction (for the snapshot).
    pub async fn read_only_transaction(&mut self) -> Result<Transaction<'_>, MetadataError> {
        let guard = self.guard.clone();
        let start = self
            .inner
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start();
        let inner = guard
            .run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", start)
            .await?;
        Ok(Bounded { inner, guard })
    }
}

impl Transaction<'_> {
    /// Commits.
    pub async fn commit(self) -> Result<(), MetadataError> {
        let Bounded { inner, guard } = self;
        guard.run("COMMIT", inner.commit()).await
    }
}

/// Opens the metadata connection, within `connect_timeout`, and drives it on
/// a task of its own.
pub async fn connect(params: &ConnectParams) -> Result<Client, MetadataError> {
    let cut = CancellationToken::new();
    let tls = TlsSetup::new(params)?;
    let (inner, auth_method) =
        tokio::time::timeout(params.connect_timeout, connect_raw(params, tls, &cut))
            .await
            .map_err(|_| TimedOut {
                request: "connecting (TCP, TLS and authentication)".to_owned(),
                after: params.connect_timeout,
            })??;
    Ok(Bounded {
        inner,
        guard: Guard {
            requests: params.requests.clone(),
            cut,
            auth_method,
        },
    })
}

async fn connect_raw(
    params: &ConnectParams,
    tls: Option<TlsSetup>,
    cut: &CancellationToken,
) -> Result<(tokio_postgres::Client, Option<AuthMethod>), MetadataError> {
    let target = format!("{}:{}", params.host, params.port);
    // The same socket as the replication connection's: TCP with its
    // keepalives (this connection may wait idle for a long time, between
    // snapshot fetches or while the broker is away, and must be neither
    // dropped by a NAT nor held open for hours by a dead peer), then TLS.
    let (socket, channel) = transport::open(params, tls, &target).await?;
    let tls = matches!(channel, Channel::Tls { .. });
    let exchange = AuthExchange::new(params.auth.clone(), channel.clone(), target);
    let (guarded, verdict) = AuthGuard::new(socket, exchange, &channel);
    let mut config = tokio_postgres::Config::new();
    config
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        // TLS is up already: tokio-postgres takes the stream as it is (no
        // SSLRequest of its own), and reads the channel binding from it.
        .ssl_mode(if tls {
            PgSslMode::Require
        } else {
            PgSslMode::Disable
        })
        .ssl_negotiation(SslNegotiation::Direct)
        .channel_binding(match params.auth.channel_binding {
            ChannelBindingMode::Disable => ChannelBinding::Disable,
            ChannelBindingMode::Prefer => ChannelBinding::Prefer,
            ChannelBindingMode::Require => ChannelBinding::Require,
        })
        // The same text forms as the replication connection's, so snapshot
        // rows read the same as streamed ones.
        .options(
            "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3",
        );
    if let Some(password) = params.password() {
        config.password(password);
    }
    let connected = config.connect_raw(guarded, Established).await;
    let mut verdict = verdict
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The guard's reason, when it refused, rather than the I/O error
    // tokio-postgres saw.
    if let Some(refusal) = verdict.refusal.take() {
        return Err(refusal.into());
    }
    let (client, connection) = connected?;
    tokio::spawn(drive(connection, cut.clone()));
    Ok((client, verdict.method))
}

/// Drives the connection until it ends or is cut (dropping it closes the
/// socket, and the client then reports itself closed).
async fn drive<F>(connection: F, cut: CancellationToken)
where
    F: Future<Output = Result<(), tokio_postgres::Error>>,
{
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::warn!(error = %error, "metadata connection to PostgreSQL ended");
            }
        }
        () = cut.cancelled() => {
            tracing::debug!("metadata connection cut after a request timed out");
        }
    }
}

/// The end of the server's WAL: what it has flushed, or on a standby what
/// it has replayed (IDENTIFY_SYSTEM's xlogpos, on an ordinary connection).
pub async fn wal_end(client: &Client) -> Result<Lsn, MetadataError> {
    let text: Option<String> = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_flush_lsn() END)::text",
            &[],
        )
        .await?
        .get(0);
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO))
}

/// The server's `wal_level`.
pub async fn wal_level(client: &Client) -> Result<String, MetadataError> {
    Ok(client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0))
}

/// How a publication relates to the events table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationState {
    /// No publication of that name.
    Missing,
    /// It exists but does not include the table.
    TableNotIncluded,
    /// It includes the table but does not publish inserts.
    InsertsNotPublished,
    /// It publishes the table's inserts, but not all of them or not whole
    /// (PostgreSQL 15+).
    Restricted(Restriction),
    /// It publishes every insert of the table with the columns walrelay needs.
    Ok,
}

/// What a PostgreSQL 15+ publication holds back of the table's inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// The row filter (`WHERE ...` of the publication), if any: rows it
    /// rejects are never decoded, so never published.
    pub row_filter: Option<String>,
    /// Columns walrelay needs that the publication's column list leaves out.
    pub left_out: Vec<String>,
}

impl Restriction {
    /// What is wrong, as a phrase after the publication's name.
    pub fn describe(&self, table: &TableName) -> String {
        let mut problems = Vec::new();
        if let Some(filter) = &self.row_filter {
            problems.push(format!(
                "filters the rows of {table} (WHERE {filter}): the rows it rejects are never published"
            ));
        }
        if !self.left_out.is_empty() {
            problems.push(format!(
                "has a column list for {table} that leaves out {:?}, which walrelay needs",
                self.left_out
            ));
        }
        problems.join(", and ")
    }

    /// The statements that remove the filter and the column list, in one
    /// transaction so that no insert goes unpublished meanwhile.
    pub fn fix(publication: &str, table: &TableName) -> String {
        let (publication, table) = (
            super::conn::quote_ident(publication),
            format!(
                "{}.{}",
                super::conn::quote_ident(&table.schema),
                super::conn::quote_ident(&table.name)
            ),
        );
        format!(
            "BEGIN; ALTER PUBLICATION {publication} DROP TABLE {table}; \
             ALTER PUBLICATION {publication} ADD TABLE {table}; COMMIT;"
        )
    }
}

/// Whether `publication` publishes every insert of `table` with the columns
/// in `needed`.
pub async fn publication_state(
    client: &Client,
    publication: &str,
    table: &TableName,
    needed: &[&str],
) -> Result<PublicationState, MetadataError> {
    let Some(row) = client
        .query_opt(
            "SELECT pubinsert FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
    else {
        return Ok(PublicationState::Missing);
    };
    let inserts: bool = row.get(0);
    // pg_publication_tables resolves FOR ALL TABLES and FOR TABLES IN SCHEMA
    // too. Its rowfilter and attnames columns exist from PostgreSQL 15 on;
    // read through to_jsonb, they are NULL before. attnames lists every
    // column when the publication has no column list.
    let Some(row) = client
        .query_opt(
            "SELECT to_jsonb(pt) ->> 'rowfilter',
                    CASE WHEN to_jsonb(pt) -> 'attnames' IS NOT NULL
                         THEN ARRAY(SELECT jsonb_array_elements_text(to_jsonb(pt) -> 'attnames'))
                    END
               FROM pg_publication_tables pt
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await?
    else {
        return Ok(PublicationState::TableNotIncluded);
    };
    if !inserts {
        return Ok(PublicationState::InsertsNotPublished);
    }
    let row_filter: Option<String> = row.get(0);
    let columns: Option<Vec<String>> = row.get(1);
    let left_out: Vec<String> = columns
        .map(|published| {
            needed
                .iter()
                .filter(|c| !published.iter().any(|p| p == *c))
                .map(|c| (*c).to_owned())
                .collect()
        })
        .unwrap_or_default();
    Ok(if row_filter.is_none() && left_out.is_empty() {
        PublicationState::Ok
    } else {
        PublicationState::Restricted(Restriction {
            row_filter,
            left_out,
        })
    })
}
