//! walrelay: publishes the rows appended to a PostgreSQL events table, read from
//! a logical replication slot, and confirms the slot only after they are
//! delivered.
pub mod config;
pub mod event;
pub mod pg;
pub mod shutdown;
pub mod source;
pub mod tail;
