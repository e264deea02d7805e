//! Property tests of the decision engine: random sequences of submissions,
//! votes, modifications, cancellations, expiries and executions, checked step by step
//! against a model of the decision rules (README) and, at the end, against the
//! invariants every request must keep whatever happened to it.
//!
//! One server per backend serves every case; each case has its own agent and requests.
//! `PROPTEST_CASES=300 cargo test --test integration properties` runs longer.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};
use signoff::audit::AuditEvent;
use signoff::domain::{
    ApprovalRequest, ExecutionOutcome, Principal, RequestContext, Status, VoteKind, VoteRequest,
    Voter,
};
use signoff::engine::{EngineError, Submission, Submitted};
use signoff::policy::Effect;
use signoff::store::{AgentRecord, RequestChange};

use crate::spawn_app;
use crate::support::{backends, Backend, TestApp};

/// Deploys: `dev` is allowed, `forbidden` denied, a missing environment denied too (the
/// `when` conditions fail closed); staging, canary and production need approval in tiers
/// of rising risk. Alice is one person under two CLI principals.
const POLICY: &str = r#"version: 1
default: deny
people:
  alice: ["cli:alice", "cli:alice2"]
groups:
  ops: ["person:alice", "cli:bob", "cli:carol"]
  release: ["cli:carol", "cli:dave", "cli:erin"]
  leads: ["person:alice", "cli:carol"]
tiers:
  staging:
    route: ["slack:C0STAGING"]
    approvers: ["group:ops"]
    approvals: 1
    ttl: 30m
  canary:
    route: ["slack:C0CANARY"]
    approvers: ["cli:bob", "cli:dave"]
    approvals: 1
    ttl: 30m
  production:
    route: ["slack:C0PROD"]
    approvers: ["group:release", "group:leads"]
    approvals: {release: 1, leads: 1}
    ttl: 1h
rules:
  - name: dev
    match: ["deploy.app"]
    when: "args.environment == 'dev'"
    effect: allow
  - name: forbidden
    match: ["deploy.app"]
    when: "args.environment == 'forbidden'"
    effect: deny
    reason: "Nobody deploys to forbidden"
  - name: staging
    match: ["deploy.app"]
    when: "args.environment == 'staging'"
    effect: require_approval
    tier: staging
  - name: canary
    match: ["deploy.app"]
    when: "args.environment == 'canary'"
    effect: require_approval
    tier: canary
  - name: production
    match: ["deploy.app"]
    when: "args.environment == 'production'"
    effect: require_approval
    tier: production
"#;

const ACTION: &str = "deploy.app";

/// The model's view of the policy's tiers, lowest risk first: who approves (as people,
/// `alice` for both of her principals), how many must, and for a per-group quorum how
/// many from each group (its members as people).
struct TierModel {
    name: &'static str,
    approvals: usize,
    approvers: &'static [&'static str],
    groups: &'static [(usize, &'static [&'static str])],
}

impl TierModel {
    /// Do these people meet the quorum? Per group: some assignment of distinct people to
    /// every slot exists (searched exhaustively, independently of the engine's matching).
    fn met_by(&self, people: &BTreeSet<&str>) -> bool {
        if self.groups.is_empty() {
            return people.len() >= self.approvals;
        }
        let slots: Vec<&[&str]> = self
            .groups
            .iter()
            .flat_map(|(count, members)| std::iter::repeat_n(*members, *count))
            .collect();
        fn fill(slots: &[&[&str]], free: &BTreeSet<&str>) -> bool {
            let Some((members, rest)) = slots.split_first() else {
                return true;
            };
            free.iter().any(|who| {
                members.contains(who) && {
                    let mut left = free.clone();
                    left.remove(who);
                    fill(rest, &left)
                }
            })
        }
        fill(&slots, people)
    }
}

const TIERS: [TierModel; 3] = [
    TierModel {
        name: "staging",
        approvals: 1,
        approvers: &["alice", "cli:bob", "cli:carol"],
        groups: &[],
    },
    TierModel {
        name: "canary",
        approvals: 1,
        approvers: &["cli:bob", "cli:dave"],
        groups: &[],
    },
    TierModel {
        name: "production",
        approvals: 2,
        approvers: &["alice", "cli:carol", "cli:dave", "cli:erin"],
        groups: &[
            (1, &["cli:carol", "cli:dave", "cli:erin"]),
            (1, &["alice", "cli:carol"]),
        ],
    },
];

/// Everyone who votes in the sequences; mallory approves nothing.
const VOTERS: [&str; 7] = [
    "cli:alice",
    "cli:alice2",
    "cli:bob",
    "cli:carol",
    "cli:dave",
    "cli:erin",
    "cli:mallory",
];

/// The person behind a principal, as the policy's `people` map says.
fn person(principal: &str) -> &str {
    match principal {
        "cli:alice" | "cli:alice2" => "alice",
        other => other,
    }
}

fn tier_index(name: &str) -> Option<usize> {
    TIERS.iter().position(|tier| tier.name == name)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Environment {
    Dev,
    Staging,
    Canary,
    Production,
    Forbidden,
    /// No `environment` at all.
    Missing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Args {
    environment: Environment,
    /// Lets a modification change the args without changing the verdict.
    service: &'static str,
}

impl Args {
    fn to_json(self) -> Value {
        let environment = match self.environment {
            Environment::Dev => "dev",
            Environment::Staging => "staging",
            Environment::Canary => "canary",
            Environment::Production => "production",
            Environment::Forbidden => "forbidden",
            Environment::Missing => return json!({"service": self.service}),
        };
        json!({"environment": environment, "service": self.service})
    }
}

/// What the policy says of some args, in the model's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelVerdict {
    Allow,
    Deny,
    Tier(usize),
}

fn model_verdict(args: Args) -> ModelVerdict {
    match args.environment {
        Environment::Dev => ModelVerdict::Allow,
        Environment::Staging => ModelVerdict::Tier(0),
        Environment::Canary => ModelVerdict::Tier(1),
        Environment::Production => ModelVerdict::Tier(2),
        Environment::Forbidden | Environment::Missing => ModelVerdict::Deny,
    }
}

/// Which of the case's requests an operation is about.
#[derive(Clone, Copy, Debug)]
struct Target {
    index: Index,
    /// Most operations go to a request they can change, when there is one (a pending one,
    /// an approved one to execute): most requests are final a few operations after their
    /// submission, and final requests only refuse.
    changeable: bool,
}

/// Which revision a vote says its voter saw.
#[derive(Clone, Copy, Debug)]
enum Seen {
    /// A typed command: acts on the current revision.
    Typed,
    Current,
    /// A revision that is not (or no longer) current.
    Stale,
}

/// How a request is brought past its expiry.
#[derive(Clone, Copy, Debug)]
enum Expiry {
    /// The sweeper's step.
    Sweep,
    /// `expire_request` on the one request.
    Direct,
    /// A vote arriving after the expiry, which must be refused and expire it.
    LateVote,
}

#[derive(Clone, Debug)]
enum Op {
    Submit {
        args: Args,
        on_behalf_of: Option<&'static str>,
    },
    Approve {
        request: Target,
        voter: &'static str,
        seen: Seen,
    },
    Deny {
        request: Target,
        voter: &'static str,
        reason: &'static str,
        seen: Seen,
    },
    Modify {
        request: Target,
        voter: &'static str,
        args: Args,
        seen: Seen,
    },
    Cancel {
        request: Target,
    },
    Expire {
        request: Target,
        how: Expiry,
    },
    Execute {
        request: Target,
        outcome: ExecutionOutcome,
    },
}

/// One case: the agent's owners and what happens.
#[derive(Clone, Debug)]
struct Case {
    owners: Vec<&'static str>,
    ops: Vec<Op>,
}

/// Mostly args that need people: args the policy decides alone make requests that are
/// final from the start.
fn args_strategy() -> impl Strategy<Value = Args> {
    let environment = prop_oneof![
        1 => Just(Environment::Dev),
        3 => Just(Environment::Staging),
        2 => Just(Environment::Canary),
        4 => Just(Environment::Production),
        1 => Just(Environment::Forbidden),
        1 => Just(Environment::Missing),
    ];
    (environment, prop::sample::select(vec!["web", "api"])).prop_map(|(environment, service)| {
        Args {
            environment,
            service,
        }
    })
}

fn target_strategy() -> impl Strategy<Value = Target> {
    (any::<Index>(), prop::bool::weighted(0.8))
        .prop_map(|(index, changeable)| Target { index, changeable })
}

fn seen_strategy() -> impl Strategy<Value = Seen> {
    prop_oneof![
        2 => Just(Seen::Typed),
        2 => Just(Seen::Current),
        1 => Just(Seen::Stale),
    ]
}

fn voter_strategy() -> impl Strategy<Value = &'static str> {
    prop::sample::select(VOTERS.to_vec())
}

fn submit_strategy() -> impl Strategy<Value = Op> {
    // Alice (as her second principal) and carol approve too; mallory approves nothing.
    let on_behalf_of = prop::option::of(prop::sample::select(vec![
        "cli:alice2",
        "cli:carol",
        "cli:mallory",
    ]));
    (args_strategy(), on_behalf_of)
        .prop_map(|(args, on_behalf_of)| Op::Submit { args, on_behalf_of })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => submit_strategy(),
        5 => (target_strategy(), voter_strategy(), seen_strategy())
            .prop_map(|(request, voter, seen)| Op::Approve { request, voter, seen }),
        1 => (
            target_strategy(),
            voter_strategy(),
            prop::sample::select(vec!["too risky", "  "]),
            seen_strategy(),
        )
            .prop_map(|(request, voter, reason, seen)| Op::Deny { request, voter, reason, seen }),
        3 => (target_strategy(), voter_strategy(), args_strategy(), seen_strategy())
            .prop_map(|(request, voter, args, seen)| Op::Modify { request, voter, args, seen }),
        1 => target_strategy().prop_map(|request| Op::Cancel { request }),
        1 => (
            target_strategy(),
            prop_oneof![Just(Expiry::Sweep), Just(Expiry::Direct), Just(Expiry::LateVote)],
        )
            .prop_map(|(request, how)| Op::Expire { request, how }),
        2 => (
            target_strategy(),
            prop_oneof![Just(ExecutionOutcome::Succeeded), Just(ExecutionOutcome::Failed)],
        )
            .prop_map(|(request, outcome)| Op::Execute { request, outcome }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    // Owners: nobody, alice under her first principal (so alice2 is refused too), or dave.
    let owners = prop::sample::select(vec![vec![], vec!["cli:alice"], vec!["cli:dave"]]);
    (
        owners,
        submit_strategy(),
        prop::collection::vec(op_strategy(), 0..25),
    )
        .prop_map(|(owners, first, rest)| Case {
            owners,
            ops: std::iter::once(first).chain(rest).collect(),
        })
}

/// What the model expects a request to be.
#[derive(Clone, Debug)]
struct Modelled {
    id: String,
    args: Args,
    on_behalf_of: Option<&'static str>,
    status: Status,
    revision: u32,
    tier: Option<usize>,
    /// People whose approvals count on the current revision.
    approvals: BTreeSet<&'static str>,
    executed: bool,
}

impl Modelled {
    fn approvals_required(&self) -> usize {
        self.tier.map_or(0, |tier| TIERS[tier].approvals)
    }

    fn seen(&self, seen: Seen) -> Option<u32> {
        match seen {
            Seen::Typed => None,
            Seen::Current => Some(self.revision),
            Seen::Stale if self.revision > 1 => Some(self.revision - 1),
            Seen::Stale => Some(self.revision + 1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Approve,
    Deny,
    Modify,
}

/// The refusal the decision rules give this vote, in the order the engine checks, if any.
fn expected_refusal(
    request: &Modelled,
    requesters: &BTreeSet<&str>,
    voter: &str,
    kind: Kind,
    seen: Option<u32>,
) -> Option<&'static str> {
    if request.status != Status::Pending {
        return Some("not_pending");
    }
    if seen.is_some_and(|seen| seen != request.revision) {
        return Some("stale_revision");
    }
    let who = person(voter);
    if kind != Kind::Deny && requesters.contains(who) {
        return Some("requester_cannot_approve");
    }
    let tier = request.tier.expect("a pending request has a tier");
    if !TIERS[tier].approvers.contains(&who) {
        return Some("not_an_approver");
    }
    if kind == Kind::Approve && request.approvals.contains(who) {
        return Some("already_voted");
    }
    None
}

fn code(error: &EngineError) -> String {
    match error {
        EngineError::Refused(refusal) => refusal.code().to_string(),
        EngineError::Conflict { code, .. } => code.to_string(),
        other => format!("unexpected error: {other}"),
    }
}

/// One case run against the app: the model and what it needs to check the invariants.
struct Run<'a> {
    app: &'a TestApp,
    agent: AgentRecord,
    /// The people who may not approve any request of this case: the agent's owners.
    owners: BTreeSet<&'static str>,
    requests: Vec<Modelled>,
    /// The audit trail's last event before the case began.
    first_seq: i64,
}

impl Run<'_> {
    /// The position of the targeted request, if the case has one yet: among those the
    /// operation can change (`wanted`), when the target asks for that and there are some.
    fn pick(&self, target: Target, wanted: impl Fn(&Modelled) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.requests.len())
            .filter(|&position| wanted(&self.requests[position]))
            .collect();
        if target.changeable && !candidates.is_empty() {
            return Some(*target.index.get(&candidates));
        }
        (!self.requests.is_empty()).then(|| target.index.index(self.requests.len()))
    }

    fn requesters(&self, request: &Modelled) -> BTreeSet<&'static str> {
        let mut requesters = self.owners.clone();
        requesters.extend(request.on_behalf_of.map(person));
        requesters
    }

    async fn stored(&self, id: &str) -> ApprovalRequest {
        self.app.engine().request(id).await.expect("stored request")
    }

    /// The audit events about `id` after `seq`, without deliveries (the outbox worker
    /// records those whenever it gets to them).
    async fn audit_after(&self, id: &str, seq: i64) -> Vec<AuditEvent> {
        let events = self
            .app
            .store()
            .await
            .audit_events(seq, 10_000)
            .await
            .expect("audit events");
        events
            .into_iter()
            .filter(|event| event.request_id.as_deref() == Some(id) && event.kind != "delivered")
            .collect()
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Submit { args, on_behalf_of } => self.submit(*args, *on_behalf_of).await,
            Op::Approve {
                request,
                voter,
                seen,
            } => {
                let vote = VoteRequest::Approve { note: None };
                self.vote(*request, voter, Kind::Approve, vote, *seen, None)
                    .await
            }
            Op::Deny {
                request,
                voter,
                reason,
                seen,
            } => {
                let vote = VoteRequest::Deny {
                    reason: reason.to_string(),
                };
                self.vote(*request, voter, Kind::Deny, vote, *seen, None)
                    .await
            }
            Op::Modify {
                request,
                voter,
                args,
                seen,
            } => {
                let vote = VoteRequest::Modify {
                    args: args.to_json(),
                    note: None,
                };
                self.vote(*request, voter, Kind::Modify, vote, *seen, Some(*args))
                    .await
            }
            Op::Cancel { request } => self.cancel(*request).await,
            Op::Expire { request, how } => self.expire(*request, *how).await,
            Op::Execute { request, outcome } => self.execute(*request, *outcome).await,
        }
    }

    async fn submit(
        &mut self,
        args: Args,
        on_behalf_of: Option<&'static str>,
    ) -> Result<(), TestCaseError> {
        let submission = Submission {
            action: ACTION.into(),
            args: args.to_json(),
            context: RequestContext::default(),
            on_behalf_of: on_behalf_of.map(|principal| principal.parse().expect("principal")),
            callback_url: None,
        };
        let submitted = self
            .app
            .engine()
            .submit_request(&self.agent, submission, None)
            .await
            .map_err(|error| TestCaseError::fail(format!("submission failed: {error}")))?;
        let Submitted::Created(request) = submitted else {
            return Err(TestCaseError::fail(
                "a submission without a key was replayed",
            ));
        };
        let (status, tier) = match model_verdict(args) {
            ModelVerdict::Allow => (Status::Approved, None),
            ModelVerdict::Deny => (Status::Denied, None),
            ModelVerdict::Tier(tier) => (Status::Pending, Some(tier)),
        };
        let modelled = Modelled {
            id: request.id.clone(),
            args,
            on_behalf_of,
            status,
            revision: 1,
            tier,
            approvals: BTreeSet::new(),
            executed: false,
        };
        self.check_matches(&modelled, &request)?;
        self.requests.push(modelled);
        Ok(())
    }

    /// Casts the vote, checks the engine's answer against the model's, and that a refused
    /// vote changed nothing.
    async fn vote(
        &mut self,
        target: Target,
        voter: &'static str,
        kind: Kind,
        vote: VoteRequest,
        seen: Seen,
        new_args: Option<Args>,
    ) -> Result<(), TestCaseError> {
        let Some(position) = self.pick(target, |request| request.status == Status::Pending) else {
            return Ok(());
        };
        let modelled = self.requests[position].clone();
        let requesters = self.requesters(&modelled);
        let seen_revision = modelled.seen(seen);
        let mut expected = expected_refusal(&modelled, &requesters, voter, kind, seen_revision);
        let mut next = modelled.clone();
        if expected.is_none() {
            let who = person(voter);
            match (&vote, new_args) {
                (VoteRequest::Deny { reason }, _) => {
                    if reason.trim().is_empty() {
                        expected = Some("reason_required");
                    } else {
                        next.status = Status::Denied;
                    }
                }
                (VoteRequest::Modify { .. }, Some(args)) => {
                    let current = modelled.tier.expect("a pending request has a tier");
                    let tier = match model_verdict(args) {
                        ModelVerdict::Deny => None,
                        ModelVerdict::Allow => Some(current),
                        // Up, never down.
                        ModelVerdict::Tier(asked) => Some(asked.max(current)),
                    };
                    if args == modelled.args {
                        expected = Some("args_unchanged");
                    } else if let Some(tier) = tier {
                        next.args = args;
                        next.revision += 1;
                        next.tier = Some(tier);
                        next.approvals.clear();
                        // The modifier's vote counts only in a tier they approve in.
                        if TIERS[tier].approvers.contains(&who) {
                            next.approvals.insert(who);
                        }
                    } else {
                        expected = Some("modification_denied");
                    }
                }
                _ => {
                    next.approvals.insert(who);
                }
            }
            if next.status == Status::Pending
                && next
                    .tier
                    .is_some_and(|tier| TIERS[tier].met_by(&next.approvals))
            {
                next.status = Status::Approved;
            }
        }

        let before = self.stored(&modelled.id).await;
        let seq = self.app.audit_seq().await;
        let principal: Principal = voter.parse().expect("principal");
        let result = self
            .app
            .engine()
            .record_vote(&modelled.id, &Voter::new(principal), vote, seen_revision)
            .await;
        let after = self.stored(&modelled.id).await;
        match (expected, result) {
            (None, Ok((answered, _))) => {
                prop_assert_eq!(&answered, &after, "the answer is what was stored");
                self.check_matches(&next, &after)?;
                self.requests[position] = next;
            }
            (Some(refusal), Err(error)) => {
                prop_assert_eq!(refusal, code(&error), "refusal of {}", voter);
                prop_assert_eq!(&before, &after, "a refused vote changed the request");
                let events = self.audit_after(&modelled.id, seq).await;
                prop_assert!(events.is_empty(), "a refused vote was audited: {events:?}");
            }
            (None, Err(error)) => {
                return Err(TestCaseError::fail(format!(
                    "{voter}'s vote was refused ({}: {error}); the model expected it to count",
                    code(&error)
                )))
            }
            (Some(refusal), Ok((answered, effect))) => {
                return Err(TestCaseError::fail(format!(
                    "{voter}'s vote counted ({effect:?}, now {:?} at revision {}); the model expected {refusal}",
                    answered.status, answered.revision
                )))
            }
        }
        Ok(())
    }

    async fn cancel(&mut self, target: Target) -> Result<(), TestCaseError> {
        let Some(position) = self.pick(target, |request| request.status == Status::Pending) else {
            return Ok(());
        };
        let id = self.requests[position].id.clone();
        let before = self.stored(&id).await;
        let result = self
            .app
            .engine()
            .cancel_request(&self.agent.name, &id)
            .await;
        if self.requests[position].status == Status::Pending {
            prop_assert!(result.is_ok(), "cancel refused: {:?}", result.err());
            self.requests[position].status = Status::Cancelled;
        } else {
            let error = result.expect_err("a final request was cancelled");
            prop_assert_eq!(code(&error), "not_pending");
            prop_assert_eq!(&before, &self.stored(&id).await);
        }
        let stored = self.stored(&id).await;
        self.check_matches(&self.requests[position], &stored)
    }

    async fn expire(&mut self, target: Target, how: Expiry) -> Result<(), TestCaseError> {
        let Some(position) = self.pick(target, |request| request.status == Status::Pending) else {
            return Ok(());
        };
        let id = self.requests[position].id.clone();
        let engine = self.app.engine();
        if self.requests[position].status != Status::Pending {
            let before = self.stored(&id).await;
            prop_assert_eq!(engine.expire_request(&id).await.ok(), Some(false));
            prop_assert_eq!(&before, &self.stored(&id).await);
            return Ok(());
        }
        self.make_overdue(&id).await;
        match how {
            Expiry::Sweep => {
                engine.expire_overdue().await.expect("sweep");
            }
            Expiry::Direct => {
                engine.expire_request(&id).await.expect("expire");
            }
            Expiry::LateVote => {
                let voter = Voter::new("cli:bob".parse().expect("principal"));
                let vote = VoteRequest::Approve { note: None };
                let refusal = engine
                    .record_vote(&id, &voter, vote, None)
                    .await
                    .expect_err("a vote after the expiry counted");
                prop_assert!(
                    ["expired", "not_pending"].contains(&code(&refusal).as_str()),
                    "{refusal}"
                );
            }
        }
        self.requests[position].status = Status::Expired;
        let stored = self.stored(&id).await;
        self.check_matches(&self.requests[position], &stored)
    }

    /// Moves the request's expiry into the past, as time passing would for it alone:
    /// moving the test clock would make every pending request of the case overdue at once,
    /// and the model expires one request at a time.
    async fn make_overdue(&self, id: &str) {
        let store = self.app.store().await;
        let current = self.stored(id).await;
        let mut overdue = current.clone();
        overdue.expires_at = Some(current.created_at - chrono::Duration::seconds(1));
        overdue.version += 1;
        store
            .update_request(RequestChange {
                request: &overdue,
                expected_status: current.status,
                expected_revision: current.revision,
                expected_version: current.version,
                audit: Vec::new(),
                outbox: Vec::new(),
            })
            .await
            .expect("move the expiry into the past");
    }

    async fn execute(
        &mut self,
        target: Target,
        outcome: ExecutionOutcome,
    ) -> Result<(), TestCaseError> {
        let Some(position) = self.pick(target, |request| {
            request.status == Status::Approved && !request.executed
        }) else {
            return Ok(());
        };
        let modelled = self.requests[position].clone();
        let before = self.stored(&modelled.id).await;
        let result = self
            .app
            .engine()
            .record_execution(&self.agent.name, &modelled.id, outcome, Value::Null)
            .await;
        let expected = match (modelled.status, modelled.executed) {
            (Status::Approved, false) => None,
            (Status::Approved, true) => Some("already_executed"),
            _ => Some("not_approved"),
        };
        match (expected, result) {
            (None, Ok(executed)) => {
                prop_assert_eq!(
                    executed.executed.map(|execution| execution.outcome),
                    Some(outcome)
                );
                self.requests[position].executed = true;
            }
            (Some(refusal), Err(error)) => {
                prop_assert_eq!(refusal, code(&error));
                prop_assert_eq!(&before, &self.stored(&modelled.id).await);
            }
            (expected, result) => {
                return Err(TestCaseError::fail(format!(
                    "execution of a {:?} request: expected {expected:?}, got {:?}",
                    modelled.status,
                    result.map(|request| request.status)
                )))
            }
        }
        Ok(())
    }

    /// The stored request is in the state the model expects.
    fn check_matches(
        &self,
        modelled: &Modelled,
        stored: &ApprovalRequest,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(stored.status, modelled.status, "status of {}", &stored.id);
        prop_assert_eq!(
            stored.revision,
            modelled.revision,
            "revision of {}",
            &stored.id
        );
        prop_assert_eq!(
            stored.tier.as_deref(),
            modelled.tier.map(|tier| TIERS[tier].name),
            "tier of {}",
            &stored.id
        );
        prop_assert_eq!(&stored.args, &modelled.args.to_json());
        if stored.status == Status::Pending {
            prop_assert_eq!(
                stored.approvals_required as usize,
                modelled.approvals_required()
            );
            let approvers: BTreeSet<&str> = stored
                .current_approvers()
                .into_iter()
                .map(|principal| person(principal.as_str()))
                .collect();
            prop_assert_eq!(
                &approvers,
                &modelled.approvals,
                "approvals of {}",
                &stored.id
            );
        }
        Ok(())
    }

    /// The invariants over every request of the case and the whole audit chain.
    async fn check_invariants(&self) -> Result<(), TestCaseError> {
        let engine = self.app.engine();
        // Only this case's part of the trail: reading all of it each case would make a
        // long run (`PROPTEST_CASES=1000`) quadratic.
        let mut events: Vec<AuditEvent> = Vec::new();
        let mut after = self.first_seq;
        loop {
            let page = self
                .app
                .store()
                .await
                .audit_events(after, 1000)
                .await
                .expect("read the audit trail");
            let Some(last) = page.last() else { break };
            after = last.seq;
            events.extend(page.into_iter().filter(|event| {
                self.requests
                    .iter()
                    .any(|request| event.request_id.as_deref() == Some(request.id.as_str()))
            }));
        }
        for modelled in &self.requests {
            let request = self.stored(&modelled.id).await;
            self.check_matches(modelled, &request)?;
            let mine: Vec<&AuditEvent> = events
                .iter()
                .filter(|event| event.request_id.as_deref() == Some(request.id.as_str()))
                .collect();
            check_one_decision(&request, &mine)?;
            check_execution(&request, &mine)?;
            check_final_args(self, &request)?;
            if request.status == Status::Approved {
                check_approval(&request, &self.requesters(modelled))?;
            }
        }
        let verified = engine.verify_audit_chain().await.expect("read the chain");
        prop_assert!(verified.is_ok(), "the audit chain broke: {verified:?}");
        Ok(())
    }
}

/// At most one decision: one final event for a final request, none for a pending one.
fn check_one_decision(
    request: &ApprovalRequest,
    events: &[&AuditEvent],
) -> Result<(), TestCaseError> {
    let finals: Vec<&str> = events
        .iter()
        .filter(|event| ["decided", "expired", "cancelled"].contains(&event.kind.as_str()))
        .map(|event| event.kind.as_str())
        .collect();
    let expected: &[&str] = match request.status {
        Status::Pending => &[],
        Status::Approved | Status::Denied => &["decided"],
        Status::Expired => &["expired"],
        Status::Cancelled => &["cancelled"],
    };
    prop_assert_eq!(
        finals.as_slice(),
        expected,
        "final events of {} ({:?})",
        &request.id,
        request.status
    );
    prop_assert_eq!(request.decision.is_some(), request.status.is_final());
    Ok(())
}

/// An execution is recorded at most once, and only after an approval.
fn check_execution(request: &ApprovalRequest, events: &[&AuditEvent]) -> Result<(), TestCaseError> {
    let executions: Vec<&&AuditEvent> = events
        .iter()
        .filter(|event| event.kind == "executed")
        .collect();
    prop_assert!(executions.len() <= 1, "executed twice: {executions:?}");
    prop_assert_eq!(request.executed.is_some(), executions.len() == 1);
    if let Some(execution) = executions.first() {
        prop_assert_eq!(request.status, Status::Approved);
        let decided = events
            .iter()
            .find(|event| event.kind == "decided")
            .map(|event| event.seq);
        prop_assert!(
            decided.is_some_and(|decided| decided < execution.seq),
            "executed before it was approved"
        );
    }
    Ok(())
}

/// The args a request holds were never denied by the policy (but where the policy decided
/// at submission), and its tier is never below the one the policy asks for them.
fn check_final_args(run: &Run<'_>, request: &ApprovalRequest) -> Result<(), TestCaseError> {
    let decided_by_policy = request.decision.as_ref().is_some_and(|decision| {
        decision
            .by
            .iter()
            .all(|principal| principal.as_str().starts_with("policy:"))
    });
    if decided_by_policy {
        return Ok(());
    }
    let context = serde_json::to_value(&request.context).expect("context");
    let verdict = run
        .app
        .engine()
        .check(&request.agent, &request.action, &request.args, &context);
    prop_assert_ne!(
        verdict.effect,
        Effect::Deny,
        "{} holds denied args",
        &request.id
    );
    let rank = |tier: Option<&str>| tier.and_then(tier_index);
    let tier = rank(request.tier.as_deref());
    prop_assert!(
        tier.is_some(),
        "{} asked people but has no tier",
        &request.id
    );
    if verdict.effect == Effect::RequireApproval {
        prop_assert!(
            tier >= rank(verdict.tier.as_deref()),
            "{} is in {:?} but its args ask for {:?}",
            &request.id,
            request.tier,
            verdict.tier
        );
    }
    // Up, never down.
    let history: Vec<Option<usize>> = request
        .previous_tiers
        .iter()
        .map(|tier| rank(Some(tier)))
        .chain(std::iter::once(tier))
        .collect();
    prop_assert!(
        history.windows(2).all(|pair| pair[0] < pair[1]),
        "{} moved down: {:?} then {:?}",
        &request.id,
        request.previous_tiers,
        request.tier
    );
    Ok(())
}

/// An approval has the quorum of distinct eligible people on the final revision, none of
/// them the requester or an owner (under any of their principals).
fn check_approval(
    request: &ApprovalRequest,
    requesters: &BTreeSet<&str>,
) -> Result<(), TestCaseError> {
    let decision = request.decision.as_ref().expect("approved with a decision");
    prop_assert_eq!(&decision.args, &request.args);
    prop_assert_eq!(decision.modified, request.revision > 1);
    if decision
        .by
        .iter()
        .all(|principal| principal.as_str().starts_with("policy:"))
    {
        prop_assert_eq!(request.revision, 1, "a policy approval was modified");
        return Ok(());
    }
    let tier = request
        .tier
        .as_deref()
        .and_then(tier_index)
        .expect("approved by people in a known tier");
    let people: BTreeSet<&str> = decision
        .by
        .iter()
        .map(|principal| person(principal.as_str()))
        .collect();
    prop_assert_eq!(
        people.len(),
        decision.by.len(),
        "someone counted twice: {:?}",
        &decision.by
    );
    prop_assert!(
        people.len() >= TIERS[tier].approvals
            && TIERS[tier].met_by(&people)
            && request.approvals_required as usize == TIERS[tier].approvals,
        "{} approved by {:?}, below the quorum of {}",
        &request.id,
        &decision.by,
        TIERS[tier].name
    );
    for principal in &decision.by {
        let who = person(principal.as_str());
        prop_assert!(
            TIERS[tier].approvers.contains(&who),
            "{principal} approves nothing in {}",
            TIERS[tier].name
        );
        prop_assert!(
            !requesters.contains(who),
            "{principal} approved their own request {}",
            &request.id
        );
        prop_assert!(
            request.votes.iter().any(|vote| &vote.principal == principal
                && vote.revision == request.revision
                && vote.vote == VoteKind::Approve),
            "{principal} did not approve revision {} of {}",
            request.revision,
            &request.id
        );
    }
    Ok(())
}

async fn run_case(app: &TestApp, case: Case) -> Result<(), TestCaseError> {
    let first_seq = app.audit_seq().await;
    static AGENTS: AtomicUsize = AtomicUsize::new(0);
    let name = format!("agent-{}", AGENTS.fetch_add(1, Ordering::Relaxed));
    app.create_agent(&name, &case.owners).await;
    let agent = app
        .store()
        .await
        .agent(&name)
        .await
        .expect("read agent")
        .expect("agent exists");
    let mut run = Run {
        app,
        agent,
        owners: case.owners.iter().map(|owner| person(owner)).collect(),
        requests: Vec::new(),
        first_seq,
    };
    for op in &case.ops {
        run.apply(op).await?;
    }
    run.check_invariants().await
}

/// The model's reading of the policy is the engine's.
fn check_the_model(app: &TestApp) {
    for environment in [
        Environment::Dev,
        Environment::Staging,
        Environment::Canary,
        Environment::Production,
        Environment::Forbidden,
        Environment::Missing,
    ] {
        let args = Args {
            environment,
            service: "web",
        };
        let verdict = app
            .engine()
            .check("any-agent", ACTION, &args.to_json(), &json!({}));
        let engine = match verdict.effect {
            Effect::Allow => ModelVerdict::Allow,
            Effect::Deny => ModelVerdict::Deny,
            Effect::RequireApproval => {
                ModelVerdict::Tier(verdict.tier.as_deref().and_then(tier_index).unwrap())
            }
        };
        assert_eq!(engine, model_verdict(args), "{environment:?}");
    }
    let policy = app.engine().policy();
    for (index, tier) in TIERS.iter().enumerate() {
        let compiled = policy.tier(tier.name).expect("tier");
        assert_eq!(policy.tier_rank(tier.name), Some(index));
        assert_eq!(compiled.approvals as usize, tier.approvals);
        for voter in VOTERS {
            let voter = policy.identify(&Voter::new(voter.parse().unwrap()));
            assert_eq!(
                policy.admits(tier.name, &voter),
                tier.approvers.contains(&person(voter.principal.as_str())),
                "{} in {}",
                voter.principal,
                tier.name
            );
        }
    }
}

/// 64 cases per backend unless `PROPTEST_CASES` says otherwise: each case is a few dozen
/// real transactions.
fn runner_config() -> ProptestConfig {
    let mut config = ProptestConfig {
        // Failures are reported with their shrunk sequence; nothing is written to disk.
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 64;
    }
    config
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_keep_the_decision_invariants(#[case] backend: Backend) {
    let app = spawn_app!(backend, POLICY);
    check_the_model(&app);
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(runner_config());
    // Proptest drives sync closures: this worker blocks on each case while the server's
    // tasks run on the others.
    let result = tokio::task::block_in_place(|| {
        runner.run(&case_strategy(), |case| {
            runtime.block_on(run_case(&app, case))
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Grants: one restart tier that grants, a deny for production restarts.
const GRANT_POLICY: &str = r#"version: 1
default: deny
tiers:
  ops:
    route: ["slack:C0OPS"]
    approvers: ["cli:bob"]
    ttl: 30m
    grants: {max_ttl: 8h, max_uses: 5}
rules:
  - name: restarts
    match: ["ops.restart"]
    effect: require_approval
    tier: ops
  - name: no-prod
    match: ["ops.restart"]
    when: "has(args.env) && args.env == 'prod'"
    effect: deny
"#;

#[derive(Clone, Copy, Debug)]
enum GrantOp {
    /// Submit the granted args (0), other args (1) or args the policy denies (2).
    Submit(u8),
    /// Move the clock on by this many minutes.
    Wait(u16),
    Revoke,
}

fn grant_ops() -> impl Strategy<Value = (u32, u64, Vec<GrantOp>)> {
    let op = prop_oneof![
        6 => (0u8..3).prop_map(GrantOp::Submit),
        2 => (1u16..90).prop_map(GrantOp::Wait),
        1 => Just(GrantOp::Revoke),
    ];
    (1u32..=5, 1u64..=3, proptest::collection::vec(op, 1..14))
}

fn grant_args(which: u8) -> Value {
    match which {
        0 => json!({"service": "web"}),
        1 => json!({"service": "db"}),
        _ => json!({"service": "web", "env": "prod"}),
    }
}

/// One case: a grant of `uses` uses and `hours` hours, then the ops; every submission's
/// outcome is checked against the model: a grant never approves what the policy denies,
/// never more than its uses, never after it expires or is revoked.
async fn run_grant_case(
    app: &TestApp,
    (uses, hours, ops): (u32, u64, Vec<GrantOp>),
) -> Result<(), TestCaseError> {
    static AGENTS: AtomicUsize = AtomicUsize::new(0);
    let name = format!("granted-{}", AGENTS.fetch_add(1, Ordering::Relaxed));
    let agent = app.create_agent(&name, &[]).await;
    let first = app
        .submit_id(
            &agent,
            json!({"action": "ops.restart", "args": grant_args(0)}),
        )
        .await;
    let bob = Voter::new("cli:bob".parse().unwrap());
    app.engine()
        .record_vote_asking_grant(
            &first,
            &bob,
            VoteRequest::Approve { note: None },
            None,
            Some(signoff::domain::GrantAsk {
                ttl_seconds: hours * 3600,
                uses: Some(uses),
                when: None,
            }),
        )
        .await
        .map_err(|error| TestCaseError::fail(error.to_string()))?;
    let grant = app.engine().list_grants(Some(&name)).await.unwrap()[0].clone();
    let mut uses_left = uses;
    let mut waited = std::time::Duration::ZERO;
    let lifetime = std::time::Duration::from_secs(hours * 3600);
    let mut revoked = false;
    for op in ops {
        match op {
            GrantOp::Wait(minutes) => {
                let step = std::time::Duration::from_secs(u64::from(minutes) * 60);
                app.advance(step);
                waited += step;
            }
            GrantOp::Revoke => {
                let revoking = app.engine().revoke_grant(&grant.id, &bob).await;
                prop_assert_eq!(revoking.is_ok(), !revoked, "{:?}", revoking);
                revoked = true;
            }
            GrantOp::Submit(which) => {
                let request = app
                    .submit_ok(
                        &agent,
                        json!({"action": "ops.restart", "args": grant_args(which)}),
                    )
                    .await;
                let covered = which == 0 && !revoked && waited < lifetime && uses_left > 0;
                let expected = match which {
                    2 => "denied",
                    _ if covered => "approved",
                    _ => "pending",
                };
                prop_assert_eq!(request["status"].as_str(), Some(expected), "{}", request);
                if covered {
                    uses_left -= 1;
                    prop_assert_eq!(
                        &request["decision"]["by"],
                        &json!([format!("grant:{}", grant.id)])
                    );
                }
            }
        }
    }
    let stored = app.engine().list_grants(Some(&name)).await.unwrap();
    prop_assert_eq!(stored[0].uses_left, uses_left);
    Ok(())
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_never_exceed_their_uses_time_or_the_policy(#[case] backend: Backend) {
    let app = spawn_app!(backend, GRANT_POLICY);
    let runtime = tokio::runtime::Handle::current();
    let mut config = runner_config();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 24;
    }
    let mut runner = TestRunner::new(config);
    let result = tokio::task::block_in_place(|| {
        runner.run(&grant_ops(), |case| {
            runtime.block_on(run_grant_case(&app, case))
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
