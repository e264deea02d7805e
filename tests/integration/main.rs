//! Integration tests: every scenario on SQLite and on PostgreSQL, through real servers.

#[path = "../support/mod.rs"]
mod support;

mod agent_api;
mod audit_trail;
mod cli;
mod concurrency;
mod decisions;
mod lifecycle;
mod openapi;
mod operations;
mod properties;
mod replicas;
mod slack;
mod store;
mod trust;
mod webhooks;
