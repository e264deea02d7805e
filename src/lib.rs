//! signoff: an approval gateway between AI agents and the systems they act on.
#![forbid(unsafe_code)]

pub mod audit;
pub mod callbacks;
pub mod channels;
pub mod client;
pub mod commands;
pub mod config;
pub mod domain;
pub mod engine;
pub mod http;
pub mod policy;
pub mod quota;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod workers;
