//! Races: simultaneous votes and simultaneous submissions with one Idempotency-Key.

use std::collections::HashSet;

use reqwest::StatusCode;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::domain::{Status, VoteRequest};

use crate::spawn_app;
use crate::support::{backends, Backend};

/// A policy whose `crowd` tier has 50 approvers and needs two of them.
fn crowd_policy() -> String {
    let people: Vec<String> = (0..50).map(|n| format!("\"cli:person{n}\"")).collect();
    format!(
        "version: 1\ndefault: deny\ngroups:\n  crowd: [{}]\ntiers:\n  crowd:\n    approvers: [\"group:crowd\"]\n    approvals: 2\n    ttl: 1h\nrules:\n  - name: crowd\n    match: [\"crowd.*\"]\n    effect: require_approval\n    tier: crowd\n",
        people.join(", ")
    )
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conflicting_votes_give_one_decision(#[case] backend: Backend) {
    let app = spawn_app!(backend, &crowd_policy());
    let agent = app.create_agent("bot", &[]).await;
    let id = app.submit_id(&agent, json!({"action": "crowd.act"})).await;

    let mut votes = Vec::new();
    for n in 0..50 {
        let engine = app.engine().clone();
        let id = id.clone();
        votes.push(tokio::spawn(async move {
            let principal = signoff::domain::Voter::new(format!("cli:person{n}").parse().unwrap());
            let vote = if n % 3 == 0 {
                VoteRequest::Deny {
                    reason: format!("no from {n}"),
                }
            } else {
                VoteRequest::Approve { note: None }
            };
            engine.record_vote(&id, &principal, vote, None).await
        }));
    }
    let mut decided = 0;
    for vote in votes {
        if let Ok((_, signoff::domain::VoteEffect::Decided(_))) = vote.await.unwrap() {
            decided += 1;
        }
    }
    assert_eq!(decided, 1, "exactly one vote may decide");

    let stored = app.stored(&id).await;
    assert!(matches!(stored.status, Status::Approved | Status::Denied));
    let decision = stored.decision.clone().unwrap();
    if stored.status == Status::Approved {
        assert_eq!(decision.by.len(), 2);
        let distinct: HashSet<_> = decision.by.iter().collect();
        assert_eq!(distinct.len(), 2);
    }
    let mut decided_events = 0;
    app.engine()
        .export_audit(|event| {
            if event.request_id.as_deref() == Some(id.as_str()) && event.kind == "decided" {
                decided_events += 1;
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(decided_events, 1);
    let verified = app.engine().verify_audit_chain().await.unwrap();
    assert!(verified.is_ok(), "{verified:?}");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_person_clicking_twice_counts_once(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 1000}}),
        )
        .await;

    let clicks: Vec<_> = (0..10)
        .map(|_| {
            let engine = app.engine().clone();
            let id = id.clone();
            tokio::spawn(async move {
                engine
                    .record_vote(
                        &id,
                        &signoff::domain::Voter::new("cli:alice".parse().unwrap()),
                        VoteRequest::Approve { note: None },
                        None,
                    )
                    .await
            })
        })
        .collect();
    let mut accepted = 0;
    for click in clicks {
        if click.await.unwrap().is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 1);
    let stored = app.stored(&id).await;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.current_approvers().len(), 1);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_submissions_with_one_key_create_one_request(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let body = json!({"action": "email.send", "args": {"to": "x@y.z"}});

    let submissions: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, key, body) = (
                app.http.clone(),
                app.url("/v1/requests"),
                agent.key.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(key)
                    .header("Idempotency-Key", "same-key")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                (status, response.json::<serde_json::Value>().await.unwrap())
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for submission in submissions {
        let (status, body) = submission.await.unwrap();
        match status {
            StatusCode::CREATED => {
                ids.insert(body["id"].as_str().unwrap().to_string());
            }
            StatusCode::CONFLICT => assert_eq!(body["error"]["code"], "idempotency_in_flight"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same request");
    assert_eq!(app.request_count().await, 1);
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_are_committed_together_and_all_kept(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let submissions: Vec<_> = (0..60)
        .map(|n| {
            let request = app
                .http
                .post(app.url("/v1/requests"))
                .bearer_auth(&agent.key)
                .json(&json!({"action": if n % 2 == 0 { "users.get" } else { "email.send" }, "args": {"n": n}}));
            tokio::spawn(async move { request.send().await.unwrap().json::<serde_json::Value>().await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    for submission in submissions {
        let body = submission.await.unwrap();
        let id = body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"))
            .to_string();
        // Acknowledged means stored.
        assert_eq!(app.stored(&id).await.id, id);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 60);
    assert_eq!(app.request_count().await, 60);
    assert!(app.engine().verify_audit_chain().await.unwrap().is_ok());
}
