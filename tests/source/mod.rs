//! The source side: the replication connection (TLS, every authentication
//! method, server errors) and `walrelay tail` against a real server.
mod connection;
mod hostile;
mod status;
mod tail;
