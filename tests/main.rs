//! Integration tests: real PostgreSQL clusters started per test, the built
//! `walrelay` binary run as a child process.
mod bank;
mod relay;
mod simulation;
mod source;
mod support;
