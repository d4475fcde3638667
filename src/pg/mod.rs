//! Everything that talks to PostgreSQL.
pub mod auth;
pub mod conn;
pub mod guard;
pub mod hostcheck;
pub mod lsn;
pub mod metadata;
pub mod params;
pub mod pgoutput;
pub mod primary;
pub mod protocol;
pub mod request;
pub mod tls;
pub mod transport;
