//! Connections to PostgreSQL and the read model's schema.
//!
//! The example connects with tokio-postgres and no TLS, to stay small: the
//! URL is tokio-postgres's (`postgres://user:password@host:port/db`, with
//! `sslmode=disable` or `prefer`). A service of your own would add a TLS
//! connector (tokio-postgres-rustls, postgres-native-tls).
use tokio_postgres::{Client, NoTls};

/// The read model's tables (see the file).
pub const SCHEMA: &str = include_str!("schema.sql");

/// Opens a connection, driven on a task of its own, named `bank` in
/// `pg_stat_activity`.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name("bank");
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "connection to PostgreSQL ended");
        }
    });
    Ok(client)
}

/// Creates the read model's tables where they are missing.
pub async fn setup(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA).await
}

/// Whether PostgreSQL refused the statement for its data (an integrity or
/// data exception, SQLSTATE classes 23 and 22): trying again gives the
/// same answer, unlike a lost connection or a deadlock.
pub fn is_refusal(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| code.code().starts_with("23") || code.code().starts_with("22"))
}
