//! The decision rules through the engine the CLI and chat channels share.

use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use signoff::domain::{Status, VoteEffect, VoteRefusal, VoteRequest};
use signoff::engine::EngineError;

use crate::spawn_app;
use crate::support::{backends, Backend};

fn refusal(result: Result<impl std::fmt::Debug, EngineError>) -> VoteRefusal {
    match result {
        Err(EngineError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[apply(backends)]
#[tokio::test]
async fn two_person_rule_needs_two_different_people(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("finance-bot", &[]).await;
    let request = app
        .submit_ok(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 900}}),
        )
        .await;
    let id = request["id"].as_str().unwrap();

    let (after_first, effect) = app.approve(id, "cli:alice").await.unwrap();
    assert_eq!(
        effect,
        VoteEffect::Counted {
            approvals: 1,
            required: 2
        }
    );
    assert_eq!(after_first.status, Status::Pending);

    let version = app.stored(id).await.version;
    assert_eq!(
        refusal(app.approve(id, "cli:alice").await),
        VoteRefusal::AlreadyApproved("cli:alice".into())
    );
    assert_eq!(
        app.stored(id).await.version,
        version,
        "a refused vote changed the request"
    );

    let (decided, effect) = app.approve(id, "cli:frank").await.unwrap();
    assert_eq!(effect, VoteEffect::Decided(Status::Approved));
    let decision = decided.decision.unwrap();
    assert_eq!(
        decision.by.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        vec!["cli:alice", "cli:frank"]
    );
    assert_eq!(app.stored(id).await.status, Status::Approved);
}

#[apply(backends)]
#[tokio::test]
async fn requesters_owners_and_outsiders_cannot_approve(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("mail-bot", &["cli:bob"]).await;
    let id = &app
        .submit_id(
            &agent,
            json!({"action": "email.send", "on_behalf_of": "cli:alice"}),
        )
        .await;
    let audit_before = app.audit_kinds(Some(id)).await;

    assert_eq!(
        refusal(app.approve(id, "cli:alice").await),
        VoteRefusal::Requester("cli:alice".into())
    );
    assert_eq!(
        refusal(app.approve(id, "cli:bob").await),
        VoteRefusal::Requester("cli:bob".into())
    );
    assert_eq!(
        refusal(app.approve(id, "cli:mallory").await),
        VoteRefusal::NotEligible("cli:mallory".into(), "medium".into())
    );
    // finance is not an approver of the medium tier.
    assert!(matches!(
        refusal(app.approve(id, "cli:frank").await),
        VoteRefusal::NotEligible(..)
    ));
    assert_eq!(
        refusal(
            app.vote(id, "cli:carol", VoteRequest::Deny { reason: " ".into() })
                .await
        ),
        VoteRefusal::ReasonRequired
    );

    let stored = app.stored(id).await;
    assert_eq!(stored.status, Status::Pending);
    assert!(stored.votes.is_empty());
    assert_eq!(
        app.audit_kinds(Some(id)).await,
        audit_before,
        "refusals must not be recorded as changes"
    );

    let (_, effect) = app.approve(id, "cli:carol").await.unwrap();
    assert_eq!(effect, VoteEffect::Decided(Status::Approved));
}

#[apply(backends)]
#[tokio::test]
async fn one_deny_ends_the_request(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let id = &app
        .submit_id(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 500}}),
        )
        .await;
    app.approve(id, "cli:alice").await.unwrap();
    let (denied, effect) = app
        .vote(
            id,
            "cli:grace",
            VoteRequest::Deny {
                reason: "customer already refunded".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(effect, VoteEffect::Decided(Status::Denied));
    let decision = denied.decision.unwrap();
    assert_eq!(
        decision.reason.as_deref(),
        Some("customer already refunded")
    );
    assert_eq!(decision.by[0].as_str(), "cli:grace");

    assert_eq!(
        refusal(app.approve(id, "cli:bob").await),
        VoteRefusal::NotPending(Status::Denied)
    );
    let (_, body) = app.get_request(&agent, id, None).await;
    assert_eq!(body["status"], "denied");
    assert_eq!(body["votes"].as_array().unwrap().len(), 2);
}

#[apply(backends)]
#[tokio::test]
async fn modify_starts_a_new_revision(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let agent = app.create_agent("bot", &[]).await;
    let request = app
        .submit_ok(
            &agent,
            json!({"action": "payments.refund", "args": {"amount": 2000}}),
        )
        .await;
    let id = request["id"].as_str().unwrap();
    let original_hash = request["action_hash"].as_str().unwrap().to_string();

    app.approve(id, "cli:alice").await.unwrap();
    assert_eq!(
        refusal(
            app.vote(
                id,
                "cli:bob",
                VoteRequest::Modify {
                    args: json!("nope"),
                    note: None
                }
            )
            .await
        ),
        VoteRefusal::ArgsNotObject
    );
    let (modified, effect) = app
        .vote(
            id,
            "cli:bob",
            VoteRequest::Modify {
                args: json!({"amount": 150}),
                note: Some("cap it".into()),
            },
        )
        .await
        .unwrap();
    // Alice's approval was on revision 1 and is void; Bob's counts as the first of revision 2.
    assert_eq!(
        effect,
        VoteEffect::Counted {
            approvals: 1,
            required: 2
        }
    );
    assert_eq!(modified.revision, 2);

    let (_, effect) = app.approve(id, "cli:alice").await.unwrap();
    assert_eq!(effect, VoteEffect::Decided(Status::Approved));

    let (_, body) = app.get_request(&agent, id, None).await;
    assert_eq!(body["decision"]["modified"], true);
    assert_eq!(body["decision"]["args"], json!({"amount": 150}));
    assert_eq!(body["args"], json!({"amount": 150}));
    assert_eq!(body["decision"]["by"], json!(["cli:bob", "cli:alice"]));
    assert_ne!(body["action_hash"].as_str().unwrap(), original_hash);
    assert_eq!(
        body["action_hash"],
        signoff::domain::action_hash("payments.refund", &json!({"amount": 150}))
    );
}
