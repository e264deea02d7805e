//! signoff: an approval gateway between AI agents and the systems they act on.
//!
//! The map (ARCHITECTURE.md has it with the life of a request and where to change what):
//!
//! - [`http`] — the agent API, health, metrics, OpenAPI, admin: thin axum handlers.
//! - [`mcp`] — the approval tools at `/mcp`, and the `mcp-proxy` gateway.
//! - [`channels`] — the chat boundary: `trait ChatChannel` and its registry; `slack/`.
//! - [`workers`] — delivery (outbox), sweeper (time), watcher (other processes'
//!   decisions), each with a step function tests call.
//! - [`engine`] — the use cases, one file each, every change through one compare-and-set.
//! - [`policy`] — the YAML policy: compile, evaluate, route; pure.
//! - [`store`] — all SQL, SQLite and PostgreSQL; [`audit`] — the hash chain.
//! - [`domain`] — requests, votes and the decision rules, principals, kinds; pure.
//! - [`quota`], [`callbacks`] — per-agent limits; where callback URLs may point.
//! - [`server`] assembles a process; [`commands`], [`client`] and [`config`] serve the CLI.
//!
//! Dependencies point one way: http/channels/mcp/workers -> engine -> policy/store/audit -> domain.
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
pub mod mcp;
pub mod policy;
pub mod quota;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod workers;
