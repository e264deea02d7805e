//! Integration tests: every scenario on SQLite and on PostgreSQL, through real servers.

#[path = "../support/mod.rs"]
mod support;

mod agent_api;
mod audit_trail;
mod callbacks;
mod channels;
mod cli;
mod concurrency;
mod decisions;
mod grants;
mod lifecycle;
mod mcp;
mod openapi;
mod operations;
mod outbox_fairness;
mod policy_decision;
mod policy_intake;
mod postgres_roles;
mod properties;
mod quotas;
mod replicas;
mod slack;
mod store;
mod teams;
mod trust;
mod webhooks;
