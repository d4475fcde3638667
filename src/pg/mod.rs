//! Everything that talks to PostgreSQL.
pub mod conn;
pub mod lsn;
pub mod metadata;
pub mod params;
pub mod pgoutput;
pub mod primary;
pub mod protocol;
pub mod request;
pub mod tls;
