//! The store under the engine: group commit keeps each request's fate its own and the
//! audit chain whole, revoked agents are refused by the database, and outbox claims
//! respect the worker's pacing without a backlog hiding other destinations.

use std::sync::Arc;

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::audit::NewAuditEvent;
use signoff::config::{Config, Secret};
use signoff::domain::{now, ApprovalRequest, AuditKind, OutboxKind};
use signoff::engine::Engine;
use signoff::store::{
    receiver_host, AgentRecord, CandidateQuery, ConversationEndpoint, DeliveryRecord,
    NewOutboxMessage, NewRequest, OutboxOutcome, RequestChange, Store, StoreError,
};

use crate::support::{backends, Backend, TestDatabase};

/// A migrated store on a fresh database with an agent `bot`, and a stored request of that
/// agent to copy. No server: nothing else claims from its outbox.
async fn store_with_request(
    backend: Backend,
    directory: &tempfile::TempDir,
) -> Option<(TestDatabase, Arc<dyn Store>, ApprovalRequest)> {
    let database = TestDatabase::create(backend, directory).await?;
    let config = Config {
        database_url: Secret::new(database.url.clone()),
        ..Config::default()
    };
    let store = signoff::store::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    let policy = signoff::policy::Policy::parse(
        "version: 1\ndefault: deny\nrules:\n  - name: reads\n    match: [\"*.get\"]\n    effect: allow\n",
    )
    .unwrap();
    let engine = Engine::new(store.clone(), policy);
    let credentials = engine.create_agent("bot", Vec::new()).await.unwrap();
    let agent = engine
        .authenticate_agent(&credentials.api_key)
        .await
        .unwrap()
        .unwrap();
    let submission = signoff::engine::Submission {
        action: "users.get".into(),
        args: json!({}),
        context: Default::default(),
        on_behalf_of: None,
        callback_url: None,
    };
    let submitted = engine
        .submit_request(&agent, submission, None)
        .await
        .unwrap();
    let id = match submitted {
        signoff::engine::Submitted::Created(request) => request.id,
        other => panic!("not created: {other:?}"),
    };
    let template = store.request(&id).await.unwrap().unwrap();
    Some((database, store, template))
}

fn copy_with_id(template: &ApprovalRequest, id: &str) -> ApprovalRequest {
    ApprovalRequest {
        id: id.to_string(),
        ..template.clone()
    }
}

async fn insert(
    store: &Arc<dyn Store>,
    request: ApprovalRequest,
    outbox: Vec<NewOutboxMessage>,
) -> Result<(), StoreError> {
    let audit = vec![NewAuditEvent {
        at: now(),
        request_id: Some(request.id.clone()),
        kind: AuditKind::Submitted,
        actor: "agent:bot".into(),
        payload: json!({}),
    }];
    store
        .insert_request(NewRequest {
            request: &request,
            audit,
            outbox,
            idempotency: None,
        })
        .await
}

/// An event about no request, as the CLI writes them.
fn operator_event(kind: AuditKind, payload: serde_json::Value) -> NewAuditEvent {
    NewAuditEvent {
        at: now(),
        request_id: None,
        kind,
        actor: "operator".into(),
        payload,
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_request_does_not_take_its_group_with_it(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    // Eighteen new ids, one id twice, and one that is already stored, all at once: they
    // share commits, and only the two duplicates may fail.
    let mut ids: Vec<String> = (0..18).map(|n| format!("apr_group_{n}")).collect();
    ids.extend(["apr_group_twice".to_string(), "apr_group_twice".to_string()]);
    ids.push(template.id.clone());
    let inserts = ids.iter().map(|id| {
        let store = store.clone();
        let request = copy_with_id(&template, id);
        tokio::spawn(async move { insert(&store, request, Vec::new()).await })
    });
    let results: Vec<_> = futures::future::join_all(inserts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let refused: Vec<_> = ids
        .iter()
        .zip(&results)
        .filter(|(_, result)| result.is_err())
        .map(|(id, result)| (id.clone(), result.as_ref().unwrap_err().to_string()))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(
        |(id, error)| (id == "apr_group_twice" || *id == template.id)
            && error.contains("already exists")
    ));
    for n in 0..18 {
        assert!(store
            .request(&format!("apr_group_{n}"))
            .await
            .unwrap()
            .is_some());
    }
    assert!(store.request("apr_group_twice").await.unwrap().is_some());
    let events = store.audit_events(0, 1000).await.unwrap();
    let mut chain = signoff::audit::ChainVerifier::default();
    for event in &events {
        chain.check(event).unwrap();
    }
    // The agent, the template's own events, then one event per stored copy.
    assert_eq!(
        events
            .iter()
            .filter(|event| event
                .request_id
                .as_deref()
                .is_some_and(|id| id.starts_with("apr_group_")))
            .count(),
        19
    );
}

#[apply(backends)]
#[tokio::test]
async fn appends_by_another_process_between_commits_keep_the_chain_whole(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    // A second store on the same database stands for the CLI: its appends are unknown to
    // the first, which remembers the audit head its last commit left.
    let config = Config {
        database_url: Secret::new(database.url.clone()),
        ..Config::default()
    };
    let other_process = signoff::store::connect(&config).await.unwrap();
    for round in 0..3 {
        insert(
            &store,
            copy_with_id(&template, &format!("apr_turn_{round}")),
            Vec::new(),
        )
        .await
        .unwrap();
        other_process
            .append_audit(vec![operator_event(
                AuditKind::AgentCreated,
                json!({"round": round}),
            )])
            .await
            .unwrap();
    }
    insert(&store, copy_with_id(&template, "apr_turn_last"), Vec::new())
        .await
        .unwrap();
    let events = store.audit_events(0, 1000).await.unwrap();
    let mut chain = signoff::audit::ChainVerifier::default();
    for event in &events {
        chain.check(event).unwrap();
    }
    let kinds: Vec<_> = events
        .iter()
        .rev()
        .take(7)
        .map(|event| event.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "submitted",
            "agent_created",
            "submitted",
            "agent_created",
            "submitted",
            "agent_created",
            "submitted"
        ]
    );
}

#[apply(backends)]
#[tokio::test]
async fn the_database_refuses_requests_of_a_revoked_agent(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let revoked = operator_event(AuditKind::AgentRevoked, json!({"agent": "bot"}));
    assert!(store.revoke_agent("bot", revoked).await.unwrap());
    let seq = store.latest_audit_seq().await.unwrap();
    let refused = insert(
        &store,
        copy_with_id(&template, "apr_after_revoke"),
        Vec::new(),
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::AgentRevoked)),
        "{refused:?}"
    );
    assert!(store.request("apr_after_revoke").await.unwrap().is_none());
    assert_eq!(store.latest_audit_seq().await.unwrap(), seq);
}

/// One claim in the shape the worker makes it: of the candidates, the oldest message per
/// paced destination and every webhook.
async fn claim(store: &Arc<dyn Store>, waiting: Vec<String>) -> Vec<signoff::store::OutboxMessage> {
    let candidates = store
        .outbox_candidates(
            now(),
            &CandidateQuery {
                skip: &waiting,
                skip_hosts: &[],
                per_queue: 4,
                limit: 256,
            },
        )
        .await
        .unwrap();
    let mut paced = std::collections::HashSet::new();
    let ids: Vec<i64> = candidates
        .iter()
        .filter(|candidate| candidate.kind == "webhook" || paced.insert(&candidate.destination))
        .map(|candidate| candidate.id)
        .collect();
    let lease_until = now() + chrono::Duration::seconds(60);
    store.claim_outbox(now(), lease_until, &ids).await.unwrap()
}

#[apply(backends)]
#[tokio::test]
async fn claims_skip_destinations_out_of_pacing_tokens(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    for n in 0..3 {
        let request = copy_with_id(&template, &format!("apr_paced_{n}"));
        let message = |kind: OutboxKind, destination: &str| NewOutboxMessage {
            request_id: request.id.clone(),
            kind,
            destination: destination.to_string(),
            payload: json!({}),
            available_at: now(),
        };
        let outbox = vec![
            message(OutboxKind::Card, "slack:CBUSY"),
            message(OutboxKind::Card, "slack:CQUIET"),
            message(OutboxKind::Webhook, "https://hooks.example.com/signoff"),
        ];
        insert(&store, request, outbox).await.unwrap();
    }
    let claimed = claim(&store, vec!["slack:CBUSY".to_string()]).await;
    let mut destinations: Vec<_> = claimed.iter().map(|m| m.destination.as_str()).collect();
    destinations.sort_unstable();
    // No message for the waiting channel, one for the other, and every webhook (not paced).
    assert_eq!(
        destinations,
        [
            "https://hooks.example.com/signoff",
            "https://hooks.example.com/signoff",
            "https://hooks.example.com/signoff",
            "slack:CQUIET"
        ]
    );
    assert_eq!(
        claimed
            .iter()
            .find(|m| m.kind == "card")
            .unwrap()
            .request_id,
        "apr_paced_0"
    );

    let claimed = claim(&store, Vec::new()).await;
    let mut claimed: Vec<_> = claimed
        .iter()
        .map(|m| (m.destination.as_str(), m.request_id.as_str()))
        .collect();
    claimed.sort_unstable();
    assert_eq!(
        claimed,
        [
            ("slack:CBUSY", "apr_paced_0"),
            ("slack:CQUIET", "apr_paced_1")
        ]
    );
}

#[apply(backends)]
#[tokio::test]
async fn a_long_backlog_for_one_channel_hides_no_other_destination(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    // More due messages for one channel than any fixed window of the oldest would hold,
    // all older than the other destinations' work.
    let hour_ago = now() - chrono::Duration::hours(1);
    let backlog = (0..600)
        .map(|n| NewOutboxMessage {
            request_id: "apr_busy".into(),
            kind: OutboxKind::Reminder,
            destination: "slack:CBUSY".into(),
            payload: json!({"n": n}),
            available_at: hour_ago + chrono::Duration::milliseconds(n),
        })
        .collect();
    insert(&store, copy_with_id(&template, "apr_busy"), backlog)
        .await
        .unwrap();
    let message = |kind: OutboxKind, destination: &str| NewOutboxMessage {
        request_id: "apr_other".into(),
        kind,
        destination: destination.to_string(),
        payload: json!({}),
        available_at: now(),
    };
    let others = vec![
        message(OutboxKind::Card, "slack:CQUIET"),
        message(OutboxKind::Webhook, "https://hooks.example.com/signoff"),
    ];
    insert(&store, copy_with_id(&template, "apr_other"), others)
        .await
        .unwrap();

    let claimed = claim(&store, Vec::new()).await;
    let mut claimed: Vec<_> = claimed
        .iter()
        .map(|m| (m.destination.as_str(), m.payload["n"].as_i64()))
        .collect();
    claimed.sort_unstable();
    assert_eq!(
        claimed,
        [
            ("https://hooks.example.com/signoff", None),
            ("slack:CBUSY", Some(0)),
            ("slack:CQUIET", None)
        ]
    );
}

#[apply(backends)]
#[tokio::test]
async fn candidates_hold_each_agents_oldest_message_behind_another_agents_backlog(
    #[case] backend: Backend,
) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    store
        .create_agent(
            &AgentRecord {
                name: "late".into(),
                api_key_hash: "hash-of-late".into(),
                webhook_secret: "whsec_bGF0ZQ==".into(),
                owners: Vec::new(),
                created_at: now(),
                revoked_at: None,
            },
            operator_event(AuditKind::AgentCreated, json!({"agent": "late"})),
        )
        .await
        .unwrap();
    let hour_ago = now() - chrono::Duration::hours(1);
    let card = |id: &str, at| NewOutboxMessage {
        request_id: id.to_string(),
        kind: OutboxKind::Card,
        destination: "slack:CSHARED".into(),
        payload: json!({}),
        available_at: at,
    };
    // Far more of the flooding agent's cards than one read takes, all older.
    for n in 0..300 {
        let id = format!("apr_flood_{n}");
        let at = hour_ago + chrono::Duration::milliseconds(n);
        insert(&store, copy_with_id(&template, &id), vec![card(&id, at)])
            .await
            .unwrap();
    }
    let late = ApprovalRequest {
        agent: "late".into(),
        ..copy_with_id(&template, "apr_late")
    };
    insert(&store, late, vec![card("apr_late", now())])
        .await
        .unwrap();

    let candidates = store
        .outbox_candidates(
            now(),
            &CandidateQuery {
                skip: &[],
                skip_hosts: &[],
                per_queue: 2,
                limit: 256,
            },
        )
        .await
        .unwrap();
    let seen: Vec<(&str, &str)> = candidates
        .iter()
        .map(|candidate| (candidate.agent.as_str(), candidate.destination.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("bot", "slack:CSHARED"),
            ("bot", "slack:CSHARED"),
            ("late", "slack:CSHARED")
        ]
    );
}

#[apply(backends)]
#[tokio::test]
async fn a_full_hosts_webhooks_are_left_out_of_the_read_rather_than_fill_it(
    #[case] backend: Backend,
) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let hour_ago = now() - chrono::Duration::hours(1);
    // A URL per request on one (dead) host: more queues than a read holds, all older.
    let dead: Vec<NewOutboxMessage> = (0..40)
        .map(|n| NewOutboxMessage {
            request_id: "apr_dead".into(),
            kind: OutboxKind::Webhook,
            destination: format!("https://dead.example.com/hook/{n}"),
            payload: json!({}),
            available_at: hour_ago + chrono::Duration::milliseconds(n),
        })
        .collect();
    insert(&store, copy_with_id(&template, "apr_dead"), dead)
        .await
        .unwrap();
    let alive = NewOutboxMessage {
        request_id: "apr_alive".into(),
        kind: OutboxKind::Webhook,
        destination: "https://alive.example.com/hook".into(),
        payload: json!({}),
        available_at: now(),
    };
    insert(&store, copy_with_id(&template, "apr_alive"), vec![alive])
        .await
        .unwrap();
    let read = |skip_hosts: Vec<String>| {
        let store = store.clone();
        async move {
            store
                .outbox_candidates(
                    now(),
                    &CandidateQuery {
                        skip: &[],
                        skip_hosts: &skip_hosts,
                        per_queue: 4,
                        limit: 32,
                    },
                )
                .await
                .unwrap()
        }
    };
    // Filled by the dead host...
    assert!(read(Vec::new())
        .await
        .iter()
        .all(|candidate| candidate.destination.starts_with("https://dead.")));
    // ...unless it is left out.
    let candidates = read(vec![receiver_host("https://dead.example.com/hook/0")]).await;
    let destinations: Vec<&str> = candidates
        .iter()
        .map(|candidate| candidate.destination.as_str())
        .collect();
    assert_eq!(destinations, ["https://alive.example.com/hook"]);
}

#[apply(backends)]
#[tokio::test]
async fn a_renewed_lease_keeps_a_running_delivery_from_being_claimed_again(
    #[case] backend: Backend,
) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let hook = |id: &str| NewOutboxMessage {
        request_id: id.to_string(),
        kind: OutboxKind::Webhook,
        destination: format!("https://hooks.example.com/{id}"),
        payload: json!({}),
        available_at: now(),
    };
    for id in ["apr_renewed", "apr_lapsed"] {
        insert(&store, copy_with_id(&template, id), vec![hook(id)])
            .await
            .unwrap();
    }
    let start = now();
    let ids: Vec<i64> = store
        .outbox_candidates(
            start,
            &CandidateQuery {
                skip: &[],
                skip_hosts: &[],
                per_queue: 4,
                limit: 10,
            },
        )
        .await
        .unwrap()
        .iter()
        .map(|candidate| candidate.id)
        .collect();
    let claimed = store
        .claim_outbox(start, start + chrono::Duration::seconds(1), &ids)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    // A second worker at the same moment gets nothing.
    assert!(store
        .claim_outbox(start, start + chrono::Duration::seconds(1), &ids)
        .await
        .unwrap()
        .is_empty());
    let renewed = claimed
        .iter()
        .find(|message| message.request_id == "apr_renewed")
        .unwrap();
    assert_eq!(
        store
            .renew_outbox_leases(&[renewed.id], start + chrono::Duration::seconds(60))
            .await
            .unwrap(),
        1
    );
    // Later than the first lease: only the message whose lease was not renewed is free.
    let later = start + chrono::Duration::seconds(5);
    let candidates = store
        .outbox_candidates(
            later,
            &CandidateQuery {
                skip: &[],
                skip_hosts: &[],
                per_queue: 4,
                limit: 10,
            },
        )
        .await
        .unwrap();
    let ids: Vec<i64> = candidates.iter().map(|candidate| candidate.id).collect();
    assert_eq!(ids.len(), 1);
    let again = store
        .claim_outbox(
            later,
            later + chrono::Duration::seconds(60),
            &[renewed.id, ids[0]],
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].request_id, "apr_lapsed");
    // A finished delivery's lease is not renewed back to life.
    store
        .finish_outbox(renewed, OutboxOutcome::Delivered(DeliveryRecord::default()))
        .await
        .unwrap();
    assert_eq!(
        store
            .renew_outbox_leases(&[renewed.id], later + chrono::Duration::seconds(60))
            .await
            .unwrap(),
        0
    );
}

#[apply(backends)]
#[tokio::test]
async fn a_delivery_finishes_with_its_chat_reference_and_audit_event(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let card = NewOutboxMessage {
        request_id: "apr_card".into(),
        kind: OutboxKind::Card,
        destination: "slack:CCARDS".into(),
        payload: json!({}),
        available_at: now(),
    };
    insert(&store, copy_with_id(&template, "apr_card"), vec![card])
        .await
        .unwrap();
    let claimed = claim(&store, Vec::new()).await;
    assert_eq!(claimed.len(), 1);
    let seq = store.latest_audit_seq().await.unwrap();
    let reference = json!({"channel": "CCARDS", "ts": "1700000000.000001"});
    let record = DeliveryRecord {
        chat_message: Some(reference.clone()),
        audit: Some(NewAuditEvent {
            at: now(),
            request_id: Some("apr_card".into()),
            kind: AuditKind::Delivered,
            actor: "system:delivery".into(),
            payload: json!({"kind": "card", "destination": "slack:CCARDS"}),
        }),
    };
    store
        .finish_outbox(&claimed[0], OutboxOutcome::Delivered(record))
        .await
        .unwrap();

    assert_eq!(
        store
            .chat_message("apr_card", "slack:CCARDS")
            .await
            .unwrap(),
        Some(reference)
    );
    assert_eq!(store.latest_audit_seq().await.unwrap(), seq + 1);
    assert!(store.pending_outbox(10).await.unwrap().is_empty());
    assert!(claim(&store, Vec::new()).await.is_empty());
}

/// A vote and a delivery's finish touch the same outbox row and both append to the audit
/// trail; they must take those locks in one order (on PostgreSQL the other order deadlocks
/// and one of them fails after `deadlock_timeout`).
#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_racing_a_delivery_finish_never_deadlocks(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    // A channel per request: a vote's new card for a delivered request stays pending.
    let card = |id: &str| NewOutboxMessage {
        request_id: id.to_string(),
        kind: OutboxKind::Card,
        destination: format!("slack:{id}"),
        payload: json!({}),
        available_at: now(),
    };
    let event = |id: &str, kind: AuditKind| NewAuditEvent {
        at: now(),
        request_id: Some(id.to_string()),
        kind,
        actor: "system:test".into(),
        payload: json!({}),
    };
    for n in 0..40 {
        let id = format!("apr_race_{n}");
        insert(&store, copy_with_id(&template, &id), vec![card(&id)])
            .await
            .unwrap();
        let claimed = claim(&store, Vec::new()).await;
        let claimed = claimed
            .into_iter()
            .find(|message| message.request_id == id)
            .unwrap();
        let stored = store.request(&id).await.unwrap().unwrap();
        let changed = ApprovalRequest {
            version: stored.version + 1,
            ..stored.clone()
        };
        let finish = store.finish_outbox(
            &claimed,
            OutboxOutcome::Delivered(DeliveryRecord {
                chat_message: Some(json!({"channel": "CRACE", "ts": "1"})),
                audit: Some(event(&id, AuditKind::Delivered)),
            }),
        );
        let vote = store.update_request(RequestChange {
            request: &changed,
            expected_status: stored.status,
            expected_revision: stored.revision,
            expected_version: stored.version,
            audit: vec![event(&id, AuditKind::Vote)],
            outbox: vec![card(&id)],
        });
        let (finished, voted) = tokio::join!(finish, vote);
        finished.unwrap();
        voted.unwrap();
    }
}

#[apply(backends)]
#[tokio::test]
async fn the_decision_watcher_finds_which_awaited_requests_are_decided(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, decided)) = store_with_request(backend, &directory).await else {
        return;
    };
    let pending = ApprovalRequest {
        status: signoff::domain::Status::Pending,
        decision: None,
        ..copy_with_id(&decided, "apr_still_pending")
    };
    insert(&store, pending, Vec::new()).await.unwrap();

    let awaited = vec![
        "apr_still_pending".to_string(),
        decided.id.clone(),
        "apr_unknown".to_string(),
    ];
    assert_eq!(
        store.decided_among(&awaited).await.unwrap(),
        vec![decided.id.clone()]
    );
    assert!(store.decided_among(&[]).await.unwrap().is_empty());
}

/// Runs `sql` on the test's database behind the store's back.
async fn execute_sql(database: &TestDatabase, sql: &str) -> u64 {
    use sqlx::Connection as _;
    if database.url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(&database.url)
            .await
            .unwrap();
        sqlx::query(sql)
            .execute(&mut connection)
            .await
            .unwrap()
            .rows_affected()
    } else {
        let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
        sqlx::query(sql)
            .execute(&mut connection)
            .await
            .unwrap()
            .rows_affected()
    }
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_cannot_expire_hold_up_none_of_the_others(#[case] backend: Backend) {
    let directory = tempfile::tempdir().unwrap();
    let Some((database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let overdue = |id: &str, expired_at: chrono::DateTime<chrono::Utc>| ApprovalRequest {
        status: signoff::domain::Status::Pending,
        decision: None,
        expires_at: Some(expired_at),
        ..copy_with_id(&template, id)
    };
    // A whole sweep batch of requests that cannot be read, due before two healthy ones.
    let long_ago = now() - chrono::Duration::hours(2);
    let broken = signoff::engine::SWEEP_BATCH;
    let mut requests: Vec<ApprovalRequest> = (0..broken)
        .map(|n| {
            overdue(
                &format!("apr_broken_{n:04}"),
                long_ago + chrono::Duration::milliseconds(n as i64),
            )
        })
        .collect();
    requests.push(overdue(
        "apr_healthy_1",
        now() - chrono::Duration::minutes(1),
    ));
    requests.push(overdue(
        "apr_healthy_2",
        now() - chrono::Duration::minutes(1),
    ));
    let inserts = requests.into_iter().map(|request| {
        let store = store.clone();
        tokio::spawn(async move { insert(&store, request, Vec::new()).await })
    });
    for inserted in futures::future::join_all(inserts).await {
        inserted.unwrap().unwrap();
    }
    let corrupted = execute_sql(
        &database,
        "UPDATE requests SET body = '{\"unreadable\": true}' WHERE id LIKE 'apr_broken_%'",
    )
    .await;
    assert_eq!(corrupted, broken as u64);

    let policy = signoff::policy::Policy::parse("version: 1\ndefault: deny\n").unwrap();
    let engine = Engine::new(store.clone(), policy);
    let expired = tokio::time::timeout(std::time::Duration::from_secs(60), engine.expire_overdue())
        .await
        .expect("the sweep ends")
        .expect("the sweep goes on past requests it cannot expire");
    assert_eq!(expired, 2);
    for id in ["apr_healthy_1", "apr_healthy_2"] {
        let request = store.request(id).await.unwrap().unwrap();
        assert_eq!(request.status, signoff::domain::Status::Expired, "{id}");
    }
    // The unreadable ones stay due, for the next sweep to try (and log) again.
    let still_due = store
        .due_request_ids(signoff::store::Due::Expiry, now(), 10_000)
        .await
        .unwrap();
    assert_eq!(still_due.len(), broken);
    assert!(still_due.iter().all(|id| id.starts_with("apr_broken_")));
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_whose_idempotency_key_was_taken_over_cannot_commit(#[case] backend: Backend) {
    use signoff::store::{IdempotencyKey, Reservation};
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, template)) = store_with_request(backend, &directory).await else {
        return;
    };
    let attempt = || IdempotencyKey::new("bot", "retried", "same body");
    let insert_with_key = |request: ApprovalRequest, key: IdempotencyKey| {
        let store = store.clone();
        async move {
            let response = json!({"id": request.id});
            store
                .insert_request(NewRequest {
                    request: &request,
                    audit: Vec::new(),
                    outbox: Vec::new(),
                    idempotency: Some((&key, response)),
                })
                .await
        }
    };

    // The first attempt reserved the key long ago and seems dead; the retry takes it over.
    let slow = attempt();
    let long_ago = now() - chrono::Duration::minutes(5);
    let reserved = store.reserve_idempotency_key(&slow, long_ago).await;
    assert_eq!(reserved.unwrap(), Reservation::Reserved);
    let retry = attempt();
    let reserved = store.reserve_idempotency_key(&retry, now()).await;
    assert_eq!(reserved.unwrap(), Reservation::Reserved);

    // The slow attempt wakes up and inserts, in a group with others: it alone is refused.
    let seq = store.latest_audit_seq().await.unwrap();
    let others: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            let request = copy_with_id(&template, &format!("apr_beside_{n}"));
            tokio::spawn(async move { insert(&store, request, Vec::new()).await })
        })
        .collect();
    let fenced = insert_with_key(copy_with_id(&template, "apr_slow"), slow.clone()).await;
    assert!(
        matches!(fenced, Err(StoreError::IdempotencyKeyTakenOver)),
        "{fenced:?}"
    );
    for other in others {
        other.await.unwrap().unwrap();
    }
    assert!(store.request("apr_slow").await.unwrap().is_none());
    assert_eq!(store.latest_audit_seq().await.unwrap(), seq + 8);

    // Its clean-up does not free the key the retry holds.
    store.release_idempotency_key(&slow).await.unwrap();
    let third = store.reserve_idempotency_key(&attempt(), now()).await;
    assert_eq!(third.unwrap(), Reservation::InFlight);

    // The retry commits, and its answer is the key's.
    insert_with_key(copy_with_id(&template, "apr_retry"), retry)
        .await
        .unwrap();
    assert!(store.request("apr_retry").await.unwrap().is_some());
    let answered = store.reserve_idempotency_key(&attempt(), now()).await;
    assert_eq!(
        answered.unwrap(),
        Reservation::Completed {
            body_hash: "same body".into(),
            response: json!({"id": "apr_retry"}),
        }
    );
}

/// A lost compare-and-set changes nothing, and lets go of the database at once: another
/// process (the CLI, a replica) can write straight after, without waiting for this one's
/// next write to release SQLite's write lock.
#[apply(backends)]
#[tokio::test]
async fn a_lost_compare_and_set_leaves_the_database_free_for_others(#[case] backend: Backend) {
    use sqlx::Connection as _;
    let directory = tempfile::tempdir().unwrap();
    let Some((database, store, stored)) = store_with_request(backend, &directory).await else {
        return;
    };
    let mut changed = stored.successor();
    changed.reminded_at = Some(now());
    let lost = store
        .update_request(RequestChange {
            request: &changed,
            expected_status: stored.status,
            expected_revision: stored.revision,
            // Another change won in between.
            expected_version: stored.version - 1,
            audit: vec![NewAuditEvent {
                at: now(),
                request_id: Some(stored.id.clone()),
                kind: AuditKind::Reminded,
                actor: "system:test".into(),
                payload: json!({}),
            }],
            outbox: Vec::new(),
        })
        .await;
    assert!(matches!(lost, Err(StoreError::Conflict(_))), "{lost:?}");
    assert_eq!(store.request(&stored.id).await.unwrap().unwrap(), stored);
    // Another process writes, waiting at most two seconds for the lock.
    let written = match backend {
        Backend::Sqlite => {
            let options = database
                .url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .busy_timeout(std::time::Duration::from_secs(2));
            let mut other = sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap();
            sqlx::query("BEGIN IMMEDIATE; UPDATE requests SET id = id WHERE id = ?; COMMIT")
                .bind(&stored.id)
                .execute(&mut other)
                .await
                .map(|_| ())
        }
        Backend::Postgres => {
            let mut other = sqlx::PgConnection::connect(&database.url).await.unwrap();
            sqlx::query("SET lock_timeout = '2s'")
                .execute(&mut other)
                .await
                .unwrap();
            sqlx::query("UPDATE requests SET id = id WHERE id = $1")
                .bind(&stored.id)
                .execute(&mut other)
                .await
                .map(|_| ())
        }
    };
    written.expect("another process could not write after a lost compare-and-set");
}

#[apply(backends)]
#[tokio::test]
async fn conversation_endpoints_are_recorded_replaced_and_kept_per_destination(
    #[case] backend: Backend,
) {
    let directory = tempfile::tempdir().unwrap();
    let Some((_database, store, _)) = store_with_request(backend, &directory).await else {
        return;
    };
    let endpoint = |service_url: &str, tenant: Option<&str>| ConversationEndpoint {
        destination: "chat:room-1".into(),
        service_url: service_url.into(),
        tenant: tenant.map(str::to_string),
    };
    assert_eq!(
        store.conversation_endpoint("chat:room-1").await.unwrap(),
        None
    );
    for recorded in [
        endpoint("https://a.example/", None),
        endpoint("https://a.example/", None),
        endpoint("https://a.example/", Some("t1")),
        endpoint("https://b.example/", Some("t1")),
    ] {
        store.record_conversation_endpoint(&recorded).await.unwrap();
        assert_eq!(
            store.conversation_endpoint("chat:room-1").await.unwrap(),
            Some(recorded)
        );
    }
    assert_eq!(
        store.conversation_endpoint("chat:room-2").await.unwrap(),
        None
    );
}
