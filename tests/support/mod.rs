//! Test support shared by the modules of the integration test binary.

// Each test uses a different part of the harness, and rustc judges dead code
// per binary: without this, a helper no test calls yet fails `-D warnings`.
#![allow(dead_code)]

pub mod kafka;
pub mod oracle;
pub mod pg_versions;
pub mod postgres;
pub mod walrelay;
pub mod workload;
