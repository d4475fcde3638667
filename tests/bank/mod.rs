//! The bank example (`examples/bank`), run as its README says: the built
//! binary against a real PostgreSQL, librdkafka's mock Kafka cluster and the
//! `walrelay` binary. Its pure parts' unit tests run here too (an example's
//! own tests would need `test = true`, which keeps Cargo from building the
//! binary these tests run).
#[path = "../../examples/bank/account.rs"]
#[allow(dead_code)]
mod account;
mod commands;
mod consumer;
mod faults;
#[path = "../../examples/bank/projection.rs"]
#[allow(dead_code)]
mod projection;
