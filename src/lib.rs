//! walrelay: publishes the rows appended to a PostgreSQL events table, read from
//! a logical replication slot, and confirms the slot only after they are
//! delivered.
pub mod check;
pub mod checkpoint;
pub mod cloudevents;
pub mod config;
pub mod confirm;
pub mod demo;
pub mod event;
pub mod failover;
pub mod healthcheck;
pub mod kafka_properties;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod pg;
pub mod pipeline;
pub mod service;
pub mod shutdown;
pub mod sink;
pub mod slot;
pub mod snapshot;
pub mod source;
pub mod tail;
pub mod trace_context;
