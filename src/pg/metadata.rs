//! The ordinary SQL connection, beside the replication connection: setup
//! checks and, later, slot state and lag.
//!
//! It is a plain tokio-postgres client with the same parameters and the same
//! TLS verification as the replication connection.
use tokio_postgres::config::{ChannelBinding, SslMode as PgSslMode};

use super::conn::ServerError;
use super::params::{ConnectParams, SslMode};
use super::tls::{MakeRustlsConnect, TlsError, TlsSetup};
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
/// publishes the inserts of `table`.
pub async fn verify_source(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
) -> Result<(), SetupError> {
    let level = wal_level(client).await?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    let problem = match publication_state(client, publication, table).await? {
        PublicationState::Ok => return Ok(()),
        PublicationState::Missing => "does not exist".to_owned(),
        PublicationState::TableNotIncluded => format!("does not include {table}"),
        PublicationState::InsertsNotPublished => "does not publish inserts".to_owned(),
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
    /// Connecting or querying failed.
    #[error("PostgreSQL (metadata connection): {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

impl MetadataError {
    /// The SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            MetadataError::Postgres(e) => e.code().map(tokio_postgres::error::SqlState::code),
            MetadataError::Tls(_) => None,
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

/// Opens the metadata connection and drives it on a task of its own.
pub async fn connect(params: &ConnectParams) -> Result<tokio_postgres::Client, MetadataError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .connect_timeout(params.connect_timeout)
        .channel_binding(ChannelBinding::Prefer)
        .ssl_mode(match params.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        })
        // The same text forms as the replication connection's, so snapshot
        // rows read the same as streamed ones.
        .options(
            "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3",
        );
    if let Some(password) = params.password() {
        config.password(password);
    }
    // The same keepalives as the replication connection: this connection
    // may wait idle for a long time (between snapshot fetches, while the
    // broker is away) and must be neither dropped by a NAT nor held open
    // for hours by a dead peer.
    match params.keepalives {
        Some(k) => config
            .keepalives(true)
            .keepalives_idle(k.idle)
            .keepalives_interval(k.interval)
            .keepalives_retries(k.count),
        None => config.keepalives(false),
    };
    // The two arms differ in the connection's stream type, so each spawns its own.
    if let Some(tls) = TlsSetup::new(params)? {
        let (client, connection) = config.connect(MakeRustlsConnect(tls)).await?;
        tokio::spawn(drive(connection));
        Ok(client)
    } else {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(drive(connection));
        Ok(client)
    }
}

async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(error) = connection.await {
        tracing::warn!(error = %error, "metadata connection to PostgreSQL ended");
    }
}

/// The server's `wal_level`.
pub async fn wal_level(client: &tokio_postgres::Client) -> Result<String, MetadataError> {
    Ok(client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0))
}

/// How a publication relates to the events table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationState {
    /// No publication of that name.
    Missing,
    /// It exists but does not include the table.
    TableNotIncluded,
    /// It includes the table but does not publish inserts.
    InsertsNotPublished,
    /// It publishes the table's inserts.
    Ok,
}

/// Whether `publication` publishes the inserts of `table`.
pub async fn publication_state(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
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
    let included = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await?
        .is_some();
    Ok(match (included, inserts) {
        (false, _) => PublicationState::TableNotIncluded,
        (true, false) => PublicationState::InsertsNotPublished,
        (true, true) => PublicationState::Ok,
    })
}
