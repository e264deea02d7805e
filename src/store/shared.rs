//! The SQL both backends share: both accept `$N` placeholders and the same column types
//! through sqlx, so one implementation is instantiated per backend by `implement_store!`.
//! Each backend supplies `begin_write` and `write_connection` (how writers serialise),
//! `serialize_audit_appends` and `notify_finalized`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{ChainLink, PreparedAuditEvent, GENESIS_HASH};
use crate::domain::{ApprovalRequest, Principal};

use super::StoreError;

/// How a request sits in the `body` column: the API object plus what the API does not show.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredRequest {
    #[serde(flatten)]
    pub request: ApprovalRequest,
    pub original_args: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_tiers: Vec<String>,
    /// Each vote's aliases, in the order of `votes` (the API object never shows them).
    /// Bodies written before this field kept them inside each vote, where they are read.
    #[serde(default)]
    pub vote_aliases: Vec<Vec<Principal>>,
}

/// `StoredRequest` for writing, borrowed: serialising needs no copy of the request.
#[derive(Serialize)]
pub(super) struct StoredRequestRef<'a> {
    #[serde(flatten)]
    pub request: &'a ApprovalRequest,
    pub original_args: &'a Value,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub previous_tiers: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vote_aliases: Vec<&'a [Principal]>,
}

impl StoredRequest {
    pub fn from_request(request: &ApprovalRequest) -> StoredRequestRef<'_> {
        let any_aliases = request.votes.iter().any(|vote| !vote.aliases.is_empty());
        StoredRequestRef {
            request,
            original_args: &request.original_args,
            previous_tiers: &request.previous_tiers,
            vote_aliases: if any_aliases {
                request
                    .votes
                    .iter()
                    .map(|vote| vote.aliases.as_slice())
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The request, with what lives in columns rather than in the body.
    pub fn into_request(self, columns: RequestColumns) -> ApprovalRequest {
        let mut request = self.request;
        request.original_args = self.original_args;
        request.previous_tiers = self.previous_tiers;
        for (vote, aliases) in request.votes.iter_mut().zip(self.vote_aliases) {
            if !aliases.is_empty() {
                vote.aliases = aliases;
            }
        }
        (request.version, request.remind_at, request.escalate_at) = columns;
        request
    }
}

/// `version, remind_at, escalate_at`, read beside `body`.
pub(super) type RequestColumns = (
    i64,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// The last audit event: the next one's predecessor.
/// (A macro as well, so SQLite can send it after `BEGIN IMMEDIATE` in one literal.)
macro_rules! audit_head_sql {
    () => {
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
    };
}
pub(super) use audit_head_sql;
pub(super) const AUDIT_HEAD: &str = audit_head_sql!();

/// The (destination, agent) queues of the pending outbox, one index probe each (a loose
/// index scan: neither backend skips through an index by itself), as the CTE
/// `queues(destination, agent)`, leaving out the destinations `$skip` names and those
/// whose host `$skip_hosts` names (a backend's set expressions over the JSON arrays `$4` and
/// `$5`; a destination's host is read from its first row). A macro so each backend's
/// candidate query can begin with it in one literal.
macro_rules! pending_queues_sql {
    ($skip:literal, $skip_hosts:literal) => {
        concat!(
            "WITH RECURSIVE destinations(name) AS (\
             SELECT MIN(destination) FROM outbox WHERE state = 'pending' \
             UNION ALL SELECT (SELECT MIN(destination) FROM outbox \
             WHERE state = 'pending' AND destination > name) \
             FROM destinations WHERE name IS NOT NULL), \
             queues(destination, agent) AS (\
             SELECT name, (SELECT MIN(agent) FROM outbox WHERE state = 'pending' AND destination = name) \
             FROM destinations WHERE name IS NOT NULL AND name NOT IN (",
            $skip,
            ") AND (SELECT host FROM outbox WHERE state = 'pending' AND destination = name LIMIT 1) \
             NOT IN (",
            $skip_hosts,
            ") UNION ALL SELECT destination, (SELECT MIN(agent) FROM outbox \
             WHERE state = 'pending' AND destination = queues.destination AND agent > queues.agent) \
             FROM queues WHERE agent IS NOT NULL) "
        )
    };
}
pub(super) use pending_queues_sql;

/// What a claim returns.
macro_rules! claimed_columns_sql {
    () => {
        " RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at"
    };
}
pub(super) use claimed_columns_sql;

/// Chains `events` onto `head` (or the genesis hash): sequence numbers and hashes.
pub(super) fn seal_events<'events>(
    head: Option<(i64, String)>,
    events: impl IntoIterator<Item = &'events PreparedAuditEvent>,
) -> Vec<(&'events PreparedAuditEvent, ChainLink)> {
    let (mut seq, mut previous) = head.unwrap_or((0, GENESIS_HASH.to_string()));
    events
        .into_iter()
        .map(|event| {
            seq += 1;
            let link = event.link(seq, std::mem::take(&mut previous));
            previous.clone_from(&link.hash);
            (event, link)
        })
        .collect()
}

/// Which due work to look for.
pub(super) fn due_query(kind: super::Due) -> &'static str {
    match kind {
        super::Due::Expiry => {
            "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
        }
        super::Due::Reminder => {
            "SELECT id FROM requests WHERE status = 'pending' AND remind_at <= $1 ORDER BY remind_at LIMIT $2"
        }
        super::Due::Escalation => {
            "SELECT id FROM requests WHERE status = 'pending' AND escalate_at <= $1 ORDER BY escalate_at LIMIT $2"
        }
    }
}

/// Unique-key violations become `Conflict`; everything else stays a database error.
pub(super) fn conflict_on_unique(error: sqlx::Error, what: &str) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => {
            StoreError::Conflict(what.to_string())
        }
        _ => StoreError::Database(error),
    }
}

/// What SQLite's `idempotency_fences` trigger raises when a request's Idempotency-Key no
/// longer holds the attempt's token.
pub(super) const TAKEN_OVER: &str = "idempotency key taken over";

/// Why the database refused new requests: a taken id, a revoked agent (the
/// `requests_from_active_agents` trigger of both backends raises this message), or an
/// Idempotency-Key taken over by a later attempt.
pub(super) fn refused_request_insert(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.message().contains("agent revoked") => {
            StoreError::AgentRevoked
        }
        sqlx::Error::Database(database) if database.message().contains(TAKEN_OVER) => {
            StoreError::IdempotencyKeyTakenOver
        }
        _ => conflict_on_unique(error, "request id already exists"),
    }
}

/// In-flight Idempotency-Key reservations older than this are taken over: their owner died.
pub(super) const ABANDONED_RESERVATION: chrono::Duration = chrono::Duration::seconds(60);

macro_rules! implement_store {
    ($store:ty, $database:ty) => {
        impl $store {
            /// Whether the database holds exactly this build's migrations, each applied
            /// successfully and unchanged. sqlx's migrator creates its table before it
            /// looks (DDL, even when nothing is to be done): skipping it then lets a role
            /// that may only read and write rows run the server. Anything else, including
            /// an unreadable `_sqlx_migrations`, leaves the decision to the migrator.
            #[tracing::instrument(skip_all)]
            async fn migrations_all_applied(&self) -> bool {
                let applied: Vec<(i64, Vec<u8>, bool)> = match sqlx::query_as(
                    "SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version",
                )
                .fetch_all(&self.pool)
                .await
                {
                    Ok(applied) => applied,
                    Err(_) => return false,
                };
                let expected: Vec<(i64, Vec<u8>, bool)> = Self::MIGRATOR
                    .iter()
                    .filter(|migration| !migration.migration_type.is_down_migration())
                    .map(|migration| (migration.version, migration.checksum.to_vec(), true))
                    .collect();
                applied == expected
            }

            async fn append_audit_events(
                connection: &mut <$database as sqlx::Database>::Connection,
                events: Vec<$crate::audit::NewAuditEvent>,
            ) -> $crate::store::StoreResult<()> {
                let prepared: Vec<_> = events
                    .into_iter()
                    .map($crate::audit::NewAuditEvent::prepare)
                    .collect();
                let prepared: Vec<_> = prepared.iter().collect();
                Self::append_prepared_audit_events(connection, &prepared).await
            }

            /// A delivery's finish and what goes with it (`DeliveryRecord`), in one transaction.
            async fn finish_delivered(
                &self,
                message: &$crate::store::OutboxMessage,
                record: $crate::store::DeliveryRecord,
            ) -> $crate::store::StoreResult<()> {
                let now = $crate::domain::now();
                let mut transaction = self.begin_write().await?;
                if let Some(reference) = &record.chat_message {
                    sqlx::query(
                        "INSERT INTO chat_messages (request_id, destination, message, created_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (request_id, destination) DO UPDATE SET message = excluded.message",
                    )
                    .bind(&message.request_id)
                    .bind(&message.destination)
                    .bind(sqlx::types::Json(reference))
                    .bind(now)
                    .execute(&mut *transaction)
                    .await?;
                }
                let finished = sqlx::query(
                    "UPDATE outbox SET state = 'delivered', finished_at = $2, lease_until = NULL \
                     WHERE id = $1 AND generation = $3",
                )
                .bind(message.id)
                .bind(now)
                .bind(message.generation)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                if finished == 0 {
                    // A newer change arrived meanwhile: run again now, with a clean
                    // slate, since this attempt succeeded.
                    sqlx::query("UPDATE outbox SET lease_until = NULL, attempts = 0 WHERE id = $1")
                        .bind(message.id)
                        .execute(&mut *transaction)
                        .await?;
                }
                // Last: the audit lock is held from here to the commit.
                Self::append_audit_events(&mut *transaction, record.audit.into_iter().collect())
                    .await?;
                transaction.commit().await?;
                Ok(())
            }

            async fn append_prepared_audit_events(
                connection: &mut <$database as sqlx::Database>::Connection,
                events: &[&$crate::audit::PreparedAuditEvent],
            ) -> $crate::store::StoreResult<()> {
                if events.is_empty() {
                    return Ok(());
                }
                Self::serialize_audit_appends(&mut *connection).await?;
                let head: Option<(i64, String)> = sqlx::query_as(super::shared::AUDIT_HEAD)
                    .fetch_optional(&mut *connection)
                    .await?;
                let sealed = super::shared::seal_events(head, events.iter().copied());
                // One statement for all of them: one round trip however many there are.
                let mut insert = sqlx::QueryBuilder::<$database>::new("");
                Self::push_audit_rows(&mut insert, &sealed);
                insert.build().execute(&mut *connection).await?;
                Ok(())
            }

            fn push_audit_rows<'rows>(
                sql: &mut sqlx::QueryBuilder<'rows, $database>,
                sealed: &'rows [(&'rows $crate::audit::PreparedAuditEvent, $crate::audit::ChainLink)],
            ) {
                sql.push("INSERT INTO audit_events (seq, at, request_id, kind, actor, payload, prev_hash, hash) ");
                sql.push_values(sealed, |mut row, (prepared, link)| {
                    let event = &prepared.event;
                    row.push_bind(link.seq)
                        .push_bind(event.at)
                        .push_bind(&event.request_id)
                        .push_bind(event.kind.as_str())
                        .push_bind(&event.actor)
                        .push_bind(sqlx::types::Json(&*prepared.payload_json))
                        .push_bind(&link.prev_hash)
                        .push_bind(&link.hash);
                });
            }

            async fn append_outbox(
                connection: &mut <$database as sqlx::Database>::Connection,
                messages: &[&$crate::store::NewOutboxMessage],
            ) -> $crate::store::StoreResult<()> {
                if messages.is_empty() {
                    return Ok(());
                }
                let mut insert = sqlx::QueryBuilder::<$database>::new("");
                Self::push_outbox_rows(&mut insert, messages);
                insert.build().execute(&mut *connection).await?;
                Ok(())
            }

            fn push_outbox_rows<'rows>(
                sql: &mut sqlx::QueryBuilder<'rows, $database>,
                messages: &'rows [&'rows $crate::store::NewOutboxMessage],
            ) {
                sql.push("INSERT INTO outbox (request_id, kind, destination, payload, available_at, created_at, host, agent) ");
                sql.push_values(messages, |mut row, message| {
                    row.push_bind(&message.request_id)
                        .push_bind(message.kind.as_str())
                        .push_bind(&message.destination)
                        .push_bind(sqlx::types::Json(&message.payload))
                        .push_bind(message.available_at)
                        .push_bind(message.available_at)
                        .push_bind(if message.kind == crate::domain::OutboxKind::Webhook {
                            $crate::store::receiver_host(&message.destination)
                        } else {
                            String::new()
                        })
                        // The request's agent (a primary-key probe; the request is written
                        // first in every transaction that writes both), for fair queues.
                        .push("COALESCE((SELECT agent FROM requests WHERE id = ")
                        .push_bind_unseparated(&message.request_id)
                        .push_unseparated("), '')");
                });
                // A pending card message for the same destination absorbs the new change.
                sql.push(
                    " ON CONFLICT (request_id, kind, destination) WHERE state = 'pending' AND kind = 'card' \
                     DO UPDATE SET generation = outbox.generation + 1",
                );
            }

            /// One multi-row insert of a group's new requests.
            fn push_request_rows<'rows>(
                sql: &mut sqlx::QueryBuilder<'rows, $database>,
                group: &'rows [super::group_commit::QueuedRequest],
            ) {
                sql.push("INSERT INTO requests (id, agent, action, status, revision, version, created_at, expires_at, updated_at, body, remind_at, escalate_at) ");
                sql.push_values(group, |mut row, queued| {
                    let request = &queued.request;
                    row.push_bind(&request.id)
                        .push_bind(&request.agent)
                        .push_bind(&request.action)
                        .push_bind(request.status.as_str())
                        .push_bind(i64::from(request.revision))
                        .push_bind(request.version)
                        .push_bind(request.created_at)
                        .push_bind(request.expires_at)
                        .push_bind(request.created_at)
                        .push_bind(sqlx::types::Json(&*queued.body))
                        .push_bind(request.remind_at)
                        .push_bind(request.escalate_at);
                });
            }

            /// Keeps the answer for a new request's Idempotency-Key, if the key still holds
            /// this attempt's reservation: it changes no row when a later attempt took the
            /// key over (or it was released meanwhile), and the caller must then refuse
            /// the whole write.
            fn push_idempotency_answer<'rows>(
                sql: &mut sqlx::QueryBuilder<'rows, $database>,
                request_id: &'rows str,
                key: &'rows $crate::store::IdempotencyKey,
                response: &'rows serde_json::Value,
            ) {
                sql.push("UPDATE idempotency_keys SET request_id = ")
                    .push_bind(request_id)
                    .push(", response = ")
                    .push_bind(sqlx::types::Json(response))
                    .push(" WHERE agent = ")
                    .push_bind(&key.agent)
                    .push(" AND idempotency_key = ")
                    .push_bind(&key.key)
                    .push(" AND token = ")
                    .push_bind(&key.token)
                    .push(" AND response IS NULL");
            }

            /// Starts the group-commit writer tasks, on a copy of this store without them.
            fn with_group_commit(self) -> Self {
                let group_commit = super::group_commit::GroupCommit::start(Self::GROUP_WRITERS, {
                    let store = self.clone();
                    move |group| {
                        let store = store.clone();
                        async move { store.commit_group(group).await }
                    }
                });
                Self {
                    group_commit: Some(group_commit),
                    ..self
                }
            }

            /// Commits a group of new requests in one transaction and answers each. If the
            /// group is refused (a duplicate id, say), each request is tried on its own, so
            /// one bad request never takes the others with it.
            async fn commit_group(&self, group: Vec<super::group_commit::QueuedRequest>) {
                let result = self.write_group(&group).await;
                match result {
                    Ok(()) => {
                        for queued in group {
                            let _ = queued.committed.send(Ok(()));
                        }
                    }
                    Err(error) if group.len() == 1 => {
                        if let Some(queued) = group.into_iter().next() {
                            let _ = queued.committed.send(Err(error));
                        }
                    }
                    Err(_) => {
                        for queued in group {
                            let result = self.write_group(std::slice::from_ref(&queued)).await;
                            let _ = queued.committed.send(result);
                        }
                    }
                }
            }

            #[allow(clippy::type_complexity)]
            fn outbox_from_row(
                row: (
                    i64,
                    String,
                    String,
                    String,
                    sqlx::types::Json<serde_json::Value>,
                    i32,
                    i32,
                    chrono::DateTime<chrono::Utc>,
                ),
            ) -> $crate::store::OutboxMessage {
                let (id, request_id, kind, destination, payload, attempts, generation, created_at) = row;
                $crate::store::OutboxMessage {
                    id,
                    request_id,
                    kind,
                    destination,
                    payload: payload.0,
                    attempts,
                    generation,
                    created_at,
                }
            }

            fn agent_from_row(
                row: (
                    String,
                    String,
                    String,
                    sqlx::types::Json<Vec<$crate::domain::Principal>>,
                    chrono::DateTime<chrono::Utc>,
                    Option<chrono::DateTime<chrono::Utc>>,
                ),
            ) -> $crate::store::AgentRecord {
                let (name, api_key_hash, webhook_secret, owners, created_at, revoked_at) = row;
                $crate::store::AgentRecord {
                    name,
                    api_key_hash,
                    webhook_secret,
                    owners: owners.0,
                    created_at,
                    revoked_at,
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            #[tracing::instrument(skip_all)]
            async fn migrate(&self) -> $crate::store::StoreResult<()> {
                if self.migrations_all_applied().await {
                    return Ok(());
                }
                Self::MIGRATOR.run(&self.pool).await?;
                Ok(())
            }

            async fn ping(&self) -> $crate::store::StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            #[tracing::instrument(skip_all, fields(agent = %agent.name))]
            async fn create_agent(
                &self,
                agent: &$crate::store::AgentRecord,
                audit: $crate::audit::NewAuditEvent,
            ) -> $crate::store::StoreResult<()> {
                let mut transaction = self.begin_write().await?;
                sqlx::query(
                    "INSERT INTO agents (name, api_key_hash, webhook_secret, owners, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&agent.name)
                .bind(&agent.api_key_hash)
                .bind(&agent.webhook_secret)
                .bind(sqlx::types::Json(&agent.owners))
                .bind(agent.created_at)
                .execute(&mut *transaction)
                .await
                .map_err(|error| {
                    super::shared::conflict_on_unique(
                        error,
                        &format!("an agent named {:?} already exists", agent.name),
                    )
                })?;
                Self::append_audit_events(&mut *transaction, vec![audit]).await?;
                transaction.commit().await?;
                Ok(())
            }

            async fn agent_by_key_hash(
                &self,
                api_key_hash: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::AgentRecord>> {
                let row = sqlx::query_as(
                    "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
                     FROM agents WHERE api_key_hash = $1 AND revoked_at IS NULL",
                )
                .bind(api_key_hash)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Self::agent_from_row))
            }

            async fn agent(
                &self,
                name: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::AgentRecord>> {
                let row = sqlx::query_as(
                    "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
                     FROM agents WHERE name = $1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Self::agent_from_row))
            }

            async fn list_agents(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::AgentRecord>> {
                let rows = sqlx::query_as(
                    "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
                     FROM agents ORDER BY name",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Self::agent_from_row).collect())
            }

            #[tracing::instrument(skip_all, fields(agent = %name))]
            async fn revoke_agent(
                &self,
                name: &str,
                audit: $crate::audit::NewAuditEvent,
            ) -> $crate::store::StoreResult<bool> {
                let mut transaction = self.begin_write().await?;
                let revoked = sqlx::query(
                    "UPDATE agents SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                )
                .bind(name)
                .bind(audit.at)
                .execute(&mut *transaction)
                .await?
                .rows_affected()
                    == 1;
                if revoked {
                    Self::append_audit_events(&mut *transaction, vec![audit]).await?;
                    transaction.commit().await?;
                }
                Ok(revoked)
            }

            #[tracing::instrument(skip_all, fields(request_id = %new.request.id))]
            async fn insert_request(
                &self,
                new: $crate::store::NewRequest<'_>,
            ) -> $crate::store::StoreResult<()> {
                let (queued, outcome) = super::group_commit::QueuedRequest::new(new)?;
                match &self.group_commit {
                    Some(group_commit) => group_commit.queue(queued)?,
                    None => self.commit_group(vec![queued]).await,
                }
                super::group_commit::committed(outcome).await
            }

            async fn request(
                &self,
                id: &str,
            ) -> $crate::store::StoreResult<Option<$crate::domain::ApprovalRequest>> {
                let row: Option<(sqlx::types::Json<super::shared::StoredRequest>, i64, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as("SELECT body, version, remind_at, escalate_at FROM requests WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(|(body, version, remind_at, escalate_at)| body.0.into_request((version, remind_at, escalate_at))))
            }

            #[tracing::instrument(skip_all, fields(request_id = %change.request.id))]
            async fn update_request(
                &self,
                change: $crate::store::RequestChange<'_>,
            ) -> $crate::store::StoreResult<()> {
                let request = change.request;
                let mut transaction = self.begin_write().await?;
                let updated = sqlx::query(
                    "UPDATE requests SET status = $1, revision = $2, version = $3, expires_at = $4, \
                     updated_at = $5, body = $6, remind_at = $11, escalate_at = $12 \
                     WHERE id = $7 AND status = $8 AND revision = $9 AND version = $10",
                )
                .bind(request.status.as_str())
                .bind(i64::from(request.revision))
                .bind(request.version)
                .bind(request.expires_at)
                .bind($crate::domain::now())
                .bind(sqlx::types::Json(super::shared::StoredRequest::from_request(request)))
                .bind(&request.id)
                .bind(change.expected_status.as_str())
                .bind(i64::from(change.expected_revision))
                .bind(change.expected_version)
                .bind(request.remind_at)
                .bind(request.escalate_at)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                if updated != 1 {
                    return Err($crate::store::StoreError::Conflict(format!(
                        "request {} changed concurrently",
                        request.id
                    )));
                }
                let finalized = change
                    .audit
                    .iter()
                    .any(|event| event.kind.is_final());
                // Outbox rows before the audit lock, as every transaction that touches both
                // does (a delivery's finish locks its outbox row first): the other order
                // deadlocks against it on PostgreSQL.
                let outbox: Vec<_> = change.outbox.iter().collect();
                Self::append_outbox(&mut *transaction, &outbox).await?;
                Self::append_audit_events(&mut *transaction, change.audit).await?;
                if finalized {
                    Self::notify_finalized(&mut *transaction, &request.id).await?;
                }
                transaction.commit().await?;
                Ok(())
            }

            async fn list_requests(
                &self,
                filter: &$crate::store::RequestFilter,
            ) -> $crate::store::StoreResult<Vec<$crate::domain::ApprovalRequest>> {
                let limit = if filter.limit > 0 { filter.limit } else { 1000 };
                #[allow(clippy::type_complexity)]
                let rows: Vec<(sqlx::types::Json<super::shared::StoredRequest>, i64, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>)> =
                    sqlx::query_as(
                        "SELECT body, version, remind_at, escalate_at FROM requests \
                         WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR agent = $2) \
                         ORDER BY created_at, id LIMIT $3",
                    )
                    .bind(filter.status.map(|status| status.as_str()))
                    .bind(filter.agent.as_deref())
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(body, version, remind_at, escalate_at)| body.0.into_request((version, remind_at, escalate_at)))
                    .collect())
            }

            async fn pending_count(&self) -> $crate::store::StoreResult<i64> {
                let (count,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM requests WHERE status = 'pending'")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(count)
            }

            #[tracing::instrument(skip_all, fields(agent = %agent))]
            async fn pending_count_of_agent(&self, agent: &str) -> $crate::store::StoreResult<i64> {
                let (count,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM requests WHERE agent = $1 AND status = 'pending'",
                )
                .bind(agent)
                .fetch_one(&self.pool)
                .await?;
                Ok(count)
            }

            async fn due_request_ids(
                &self,
                due: $crate::store::Due,
                now: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> $crate::store::StoreResult<Vec<String>> {
                let rows: Vec<(String,)> = sqlx::query_as(super::shared::due_query(due))
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            #[tracing::instrument(skip_all, fields(agent = %key.agent))]
            async fn reserve_idempotency_key(
                &self,
                key: &$crate::store::IdempotencyKey,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<$crate::store::Reservation> {
                let mut connection = self.write_connection().await?;
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (agent, idempotency_key, body_hash, created_at, token) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agent, idempotency_key) DO NOTHING",
                )
                .bind(&key.agent)
                .bind(&key.key)
                .bind(&key.body_hash)
                .bind(now)
                .bind(&key.token)
                .execute(&mut *connection)
                .await?
                .rows_affected();
                if inserted == 1 {
                    return Ok($crate::store::Reservation::Reserved);
                }
                let existing: Option<(
                    String,
                    Option<sqlx::types::Json<serde_json::Value>>,
                    chrono::DateTime<chrono::Utc>,
                    String,
                )> = sqlx::query_as(
                    "SELECT body_hash, response, created_at, token FROM idempotency_keys \
                     WHERE agent = $1 AND idempotency_key = $2",
                )
                .bind(&key.agent)
                .bind(&key.key)
                .fetch_optional(&mut *connection)
                .await?;
                let Some((body_hash, response, created_at, holder)) = existing else {
                    // Released between our insert and select: someone else may take it; so may we.
                    drop(connection);
                    return Box::pin(self.reserve_idempotency_key(key, now)).await;
                };
                if let Some(response) = response {
                    return Ok($crate::store::Reservation::Completed {
                        body_hash,
                        response: response.0,
                    });
                }
                if created_at + super::shared::ABANDONED_RESERVATION < now {
                    // A new token fences the presumed-dead holder off: should it be merely
                    // slow, its insert no longer finds its token and is refused.
                    let taken = sqlx::query(
                        "UPDATE idempotency_keys SET created_at = $3, body_hash = $4, token = $6 \
                         WHERE agent = $1 AND idempotency_key = $2 AND response IS NULL AND token = $5",
                    )
                    .bind(&key.agent)
                    .bind(&key.key)
                    .bind(now)
                    .bind(&key.body_hash)
                    .bind(&holder)
                    .bind(&key.token)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected();
                    if taken == 1 {
                        return Ok($crate::store::Reservation::Reserved);
                    }
                }
                Ok($crate::store::Reservation::InFlight)
            }

            #[tracing::instrument(skip_all, fields(agent = %key.agent))]
            async fn release_idempotency_key(
                &self,
                key: &$crate::store::IdempotencyKey,
            ) -> $crate::store::StoreResult<()> {
                let mut connection = self.write_connection().await?;
                // Only this attempt's own reservation: one taken over is no longer ours.
                sqlx::query(
                    "DELETE FROM idempotency_keys \
                     WHERE agent = $1 AND idempotency_key = $2 AND response IS NULL AND token = $3",
                )
                .bind(&key.agent)
                .bind(&key.key)
                .bind(&key.token)
                .execute(&mut *connection)
                .await?;
                Ok(())
            }

            async fn purge_idempotency_keys(
                &self,
                before: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<u64> {
                let mut connection = self.write_connection().await?;
                Ok(sqlx::query(
                    "DELETE FROM idempotency_keys WHERE created_at < $1",
                )
                .bind(before)
                .execute(&mut *connection)
                .await?
                .rows_affected())
            }

            async fn audit_events(
                &self,
                after: i64,
                limit: i64,
            ) -> $crate::store::StoreResult<Vec<$crate::audit::AuditEvent>> {
                let rows: Vec<(
                    i64,
                    chrono::DateTime<chrono::Utc>,
                    Option<String>,
                    String,
                    String,
                    sqlx::types::Json<serde_json::Value>,
                    String,
                    String,
                )> = sqlx::query_as(
                    "SELECT seq, at, request_id, kind, actor, payload, prev_hash, hash \
                     FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(
                        |(seq, at, request_id, kind, actor, payload, prev_hash, hash)| {
                            $crate::audit::AuditEvent {
                                seq,
                                at,
                                request_id,
                                kind,
                                actor,
                                payload: payload.0,
                                prev_hash,
                                hash,
                            }
                        },
                    )
                    .collect())
            }

            async fn decided_among(
                &self,
                request_ids: &[String],
            ) -> $crate::store::StoreResult<Vec<String>> {
                if request_ids.is_empty() {
                    return Ok(Vec::new());
                }
                let ids = serde_json::to_string(request_ids)
                    .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
                Ok(sqlx::query_scalar(Self::DECIDED_AMONG)
                    .bind(ids)
                    .fetch_all(&self.pool)
                    .await?)
            }

            #[tracing::instrument(skip_all)]
            async fn audit_head(&self) -> $crate::store::StoreResult<Option<(i64, String)>> {
                Ok(sqlx::query_as(super::shared::AUDIT_HEAD)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn latest_audit_seq(&self) -> $crate::store::StoreResult<i64> {
                let (seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM audit_events")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(seq.unwrap_or(0))
            }

            async fn append_audit(
                &self,
                events: Vec<$crate::audit::NewAuditEvent>,
            ) -> $crate::store::StoreResult<()> {
                let mut transaction = self.begin_write().await?;
                Self::append_audit_events(&mut *transaction, events).await?;
                transaction.commit().await?;
                Ok(())
            }

            async fn finalized_notifications(
                &self,
            ) -> $crate::store::StoreResult<Option<$crate::store::Notifications>> {
                self.notifications().await
            }

            async fn pending_outbox(
                &self,
                limit: i64,
            ) -> $crate::store::StoreResult<Vec<$crate::store::OutboxMessage>> {
                let rows = sqlx::query_as(
                    "SELECT id, request_id, kind, destination, payload, attempts, generation, created_at FROM outbox \
                     WHERE state = 'pending' ORDER BY id LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Self::outbox_from_row).collect())
            }

            #[tracing::instrument(skip_all)]
            async fn outbox_candidates(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                query: &$crate::store::CandidateQuery<'_>,
            ) -> $crate::store::StoreResult<Vec<$crate::store::OutboxCandidate>> {
                let rows: Vec<(i64, String, String, String, chrono::DateTime<chrono::Utc>)> =
                    sqlx::query_as(Self::OUTBOX_CANDIDATES)
                        .bind(now)
                        .bind(query.per_queue)
                        .bind(query.limit)
                        .bind(serde_json::Value::from(query.skip.to_vec()).to_string())
                        .bind(serde_json::Value::from(query.skip_hosts.to_vec()).to_string())
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows
                    .into_iter()
                    .map(|(id, kind, destination, agent, available_at)| $crate::store::OutboxCandidate {
                        id,
                        kind,
                        destination,
                        agent,
                        available_at,
                    })
                    .collect())
            }

            #[tracing::instrument(skip_all, fields(count = ids.len()))]
            async fn claim_outbox(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                lease_until: chrono::DateTime<chrono::Utc>,
                ids: &[i64],
            ) -> $crate::store::StoreResult<Vec<$crate::store::OutboxMessage>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut connection = self.write_connection().await?;
                let rows = sqlx::query_as(Self::CLAIM_OUTBOX)
                    .bind(now)
                    .bind(lease_until)
                    .bind(serde_json::Value::from(ids.to_vec()).to_string())
                    .fetch_all(&mut *connection)
                    .await?;
                Ok(rows.into_iter().map(Self::outbox_from_row).collect())
            }

            #[tracing::instrument(skip_all, fields(count = ids.len()))]
            async fn renew_outbox_leases(
                &self,
                ids: &[i64],
                lease_until: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<u64> {
                if ids.is_empty() {
                    return Ok(0);
                }
                let mut connection = self.write_connection().await?;
                Ok(sqlx::query(Self::RENEW_OUTBOX_LEASES)
                    .bind(serde_json::Value::from(ids.to_vec()).to_string())
                    .bind(lease_until)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected())
            }

            #[tracing::instrument(skip_all, fields(outbox_id = message.id))]
            async fn finish_outbox(
                &self,
                message: &$crate::store::OutboxMessage,
                outcome: $crate::store::OutboxOutcome,
            ) -> $crate::store::StoreResult<()> {
                use $crate::store::OutboxOutcome;
                let now = $crate::domain::now();
                match outcome {
                    OutboxOutcome::Delivered(record) => {
                        return self.finish_delivered(message, record).await
                    }
                    OutboxOutcome::Retry { at, error } => {
                        sqlx::query(
                            "UPDATE outbox SET attempts = attempts + 1, available_at = $2, lease_until = NULL, \
                             last_error = $3 WHERE id = $1",
                        )
                        .bind(message.id)
                        .bind(at)
                        .bind(error)
                        .execute(&mut *self.write_connection().await?)
                        .await?;
                    }
                    OutboxOutcome::Defer { at } => {
                        sqlx::query("UPDATE outbox SET available_at = $2, lease_until = NULL WHERE id = $1")
                            .bind(message.id)
                            .bind(at)
                            .execute(&mut *self.write_connection().await?)
                            .await?;
                    }
                    OutboxOutcome::Abandon { error } => {
                        sqlx::query(
                            "UPDATE outbox SET state = 'abandoned', finished_at = $2, lease_until = NULL, \
                             attempts = attempts + 1, last_error = $3 WHERE id = $1",
                        )
                        .bind(message.id)
                        .bind(now)
                        .bind(error)
                        .execute(&mut *self.write_connection().await?)
                        .await?;
                    }
                }
                Ok(())
            }

            async fn outbox_backlog(&self) -> $crate::store::StoreResult<$crate::store::OutboxBacklog> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT kind, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY kind ORDER BY kind",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok($crate::store::OutboxBacklog { by_kind: rows })
            }

            async fn chat_message(
                &self,
                request_id: &str,
                destination: &str,
            ) -> $crate::store::StoreResult<Option<serde_json::Value>> {
                let row: Option<(sqlx::types::Json<serde_json::Value>,)> = sqlx::query_as(
                    "SELECT message FROM chat_messages WHERE request_id = $1 AND destination = $2",
                )
                .bind(request_id)
                .bind(destination)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(message,)| message.0))
            }
        }
    };
}

pub(super) use implement_store;
