//! `walrelay run` end to end: a real PostgreSQL, librdkafka's mock cluster
//! over TCP, the built binary in its own process.
mod check;
mod cloudevents;
mod config;
mod confirm;
mod crash;
mod dashboard;
mod delivery;
mod demo;
mod endpoint;
mod event_table;
mod failover;
mod faults;
mod history;
mod metrics;
mod oracle;
mod poison;
mod progress;
mod recovery;
mod replay;
mod secrets;
mod slot_loss;
mod snapshot;
mod versions;
