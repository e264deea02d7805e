//! Judged intake: requests whose verdict depends on counters or a grant are judged inside
//! the transaction that inserts them, in groups, on what the database holds plus what the
//! group's earlier requests add.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};
use tokio::sync::oneshot;

use super::audit::{seal_events, AUDIT_HEAD};
use super::backend::{Backend, Column, Param, SqlStore};
use super::counters::{counted, CounterChanges};
use super::grants::grant_spends;
use super::group_commit::{GroupCommit, QueuedRequest};
use super::requests::{refused_request_insert, StoredRequest, StoredRequestRef};
use super::{
    IntakeFacts, IntakeLookup, Judge, JudgedRequest, NewOutboxMessage, NewRequest, StoreError,
    StoreResult,
};
use crate::audit::{NewAuditEvent, PreparedAuditEvent};
use crate::domain::{ApprovalRequest, Grant};

/// How often one intake is judged and written again after losing a grant's use to
/// another process.
const JUDGEMENT_ATTEMPTS: usize = 5;

/// A judged intake waiting for the writer task, and where to send its outcome.
pub(super) struct QueuedJudgement {
    lookup: IntakeLookup,
    judge: Judge,
    answer: oneshot::Sender<StoreResult<ApprovalRequest>>,
}

/// One counter read of a group: (agent, action, field, window in milliseconds).
type CounterKey<'a> = (&'a str, &'a str, Option<&'a str>, i64);

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    i32: Column<DB>,
    f64: Column<DB>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Option<DateTime<Utc>>: Column<DB>,
    Json<Value>: Column<DB>,
    Json<StoredRequest>: Column<DB>,
    Json<Grant>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Option<&'q str>: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
    for<'q> Json<&'q Grant>: Param<'q, DB>,
    for<'q> Json<StoredRequestRef<'q>>: Param<'q, DB>,
{
    /// Starts the judged-intake writer task, on a copy of this store without it. One: the
    /// groups a second writer would split off cost more round trips per request than the
    /// overlap saves (and intakes of one agent and action wait for each other anyway).
    pub(super) fn with_judged_commit(self) -> Self {
        let judged_commit = GroupCommit::start(1, {
            let store = self.clone();
            move |group| {
                let store = store.clone();
                async move { store.commit_judgements(group).await }
            }
        });
        Self {
            judged_commit: Some(judged_commit),
            ..self
        }
    }

    /// See `Store::insert_judged_request`: queued for the next judged group commit.
    #[tracing::instrument(skip_all, fields(agent = %lookup.agent, action = %lookup.action))]
    pub(super) async fn insert_judged_request(
        &self,
        lookup: IntakeLookup,
        judge: Judge,
    ) -> StoreResult<ApprovalRequest> {
        let (answer, outcome) = oneshot::channel();
        let queued = QueuedJudgement {
            lookup,
            judge,
            answer,
        };
        match &self.judged_commit {
            Some(commit) => commit.queue(queued)?,
            None => self.commit_judgements(vec![queued]).await,
        }
        outcome
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
    }

    /// Judges and writes a group in one transaction; if it fails, each is tried alone, so
    /// one bad request never takes the others with it.
    async fn commit_judgements(&self, group: Vec<QueuedJudgement>) {
        let written = self.write_judgements(&group).await;
        match written {
            Ok(answers) => {
                for (queued, answer) in group.into_iter().zip(answers) {
                    let _ = queued.answer.send(answer);
                }
            }
            Err(error) if group.len() == 1 && !matches!(error, StoreError::Conflict(_)) => {
                if let Some(queued) = group.into_iter().next() {
                    let _ = queued.answer.send(Err(error));
                }
            }
            Err(_) => {
                for queued in group {
                    let answer = self.write_judgement_alone(&queued).await;
                    let _ = queued.answer.send(answer);
                }
            }
        }
    }

    /// One judged intake in its own transaction, judged again on fresh facts while another
    /// process's commit wins the race for a grant's last uses (without the pair's lock,
    /// which only counters take, its compare-and-set can lose).
    async fn write_judgement_alone(
        &self,
        queued: &QueuedJudgement,
    ) -> StoreResult<ApprovalRequest> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.write_judgements(std::slice::from_ref(queued)).await {
                Ok(mut answers) => {
                    return answers
                        .pop()
                        .unwrap_or(Err(StoreError::Conflict("nothing judged".into())))
                }
                Err(StoreError::Conflict(_)) if attempts < JUDGEMENT_ATTEMPTS => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// One transaction: the (agent, action) pairs that read counters serialised (in a fixed
    /// order, so two replicas' groups cannot deadlock), the group's counters and grants read
    /// once, each
    /// request judged in arrival order on them plus what earlier requests of the group add,
    /// then every row written. The answers are per request (a judge may refuse its own).
    async fn write_judgements(
        &self,
        group: &[QueuedJudgement],
    ) -> StoreResult<Vec<StoreResult<ApprovalRequest>>> {
        let mut transaction = DB::begin_write(self).await?;
        // Counters need the pair's intakes to take turns; a grant's uses do not (the
        // compare-and-set that spends them fails the group, which is then retried alone).
        let mut pairs: Vec<(&str, &str)> = group
            .iter()
            .filter(|queued| !queued.lookup.counters.is_empty())
            .map(|queued| (queued.lookup.agent.as_str(), queued.lookup.action.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        for (agent, action) in pairs {
            DB::serialize_intake(&mut transaction, agent, action).await?;
        }
        let stored = Self::stored_facts(&mut transaction, group).await?;
        let mut judged: Vec<JudgedRequest> = Vec::new();
        let mut answers: Vec<Option<StoreError>> = Vec::new();
        for (queued, stored) in group.iter().zip(stored) {
            let facts = with_earlier(stored, &queued.lookup, &judged);
            match (queued.judge)(facts) {
                Ok(judgement) => {
                    judged.push(judgement);
                    answers.push(None);
                }
                Err(error) => answers.push(Some(error)),
            }
        }
        let rows: Vec<QueuedRequest> = judged
            .iter()
            .map(|judgement| {
                QueuedRequest::new(NewRequest {
                    request: &judgement.request,
                    audit: Vec::new(),
                    outbox: Vec::new(),
                    idempotency: None,
                })
                .map(|(queued, _outcome)| queued)
            })
            .collect::<StoreResult<_>>()?;
        let outbox: Vec<&NewOutboxMessage> = judged
            .iter()
            .flat_map(|judgement| &judgement.outbox)
            .collect();
        let counters = CounterChanges::of_new(judged.iter().map(|judgement| &judgement.request));
        let spends = grant_spends(&judged);
        // No decision is announced: a request decided as it is stored has nobody waiting
        // on it yet (the plain group commit announces none either).
        let audit: Vec<PreparedAuditEvent> = judged
            .iter()
            .flat_map(|judgement| judgement.audit.iter().cloned().map(NewAuditEvent::prepare))
            .collect();
        let audit: Vec<&PreparedAuditEvent> = audit.iter().collect();
        // Checked, statement by statement: the judges of one group may have used different
        // policies (a reload between submissions), so the spend can fail even here.
        Self::spend_grant_uses(&mut transaction, &spends).await?;
        if DB::BATCHES_STATEMENTS {
            Self::write_judged_batch(&mut transaction, &rows, &outbox, &audit, &counters).await?;
        } else {
            if !rows.is_empty() {
                let mut insert = QueryBuilder::new("");
                Self::push_request_rows(&mut insert, &rows);
                DB::execute_built(&mut insert, &mut transaction)
                    .await
                    .map_err(refused_request_insert)?;
            }
            Self::append_outbox(&mut transaction, &outbox).await?;
        }
        for judgement in &judged {
            if let Some((key, response)) = &judgement.idempotency {
                let mut answer = QueryBuilder::new("");
                Self::push_idempotency_answer(&mut answer, &judgement.request.id, key, response);
                if DB::execute_built(&mut answer, &mut transaction).await? == 0 {
                    return Err(StoreError::IdempotencyKeyTakenOver);
                }
            }
        }
        if !DB::BATCHES_STATEMENTS {
            Self::append_prepared_audit_events(&mut transaction, &audit).await?;
            // Under the audit lock, as every change of the buckets is: they cannot deadlock.
            Self::adjust_counters(&mut transaction, &counters).await?;
        }
        let requests: Vec<ApprovalRequest> = judged
            .into_iter()
            .map(|judgement| judgement.request)
            .collect();
        DB::commit(transaction).await?;
        let mut requests = requests.into_iter();
        Ok(answers
            .into_iter()
            .map(|refused| match refused {
                Some(error) => Err(error),
                None => requests
                    .next()
                    .ok_or_else(|| StoreError::Conflict("nothing judged".into())),
            })
            .collect())
    }

    /// The group's writes that need no look at a row count as one batch of statements, one
    /// round trip (SQLite): requests, outbox rows, audit events chained onto the head,
    /// buckets.
    async fn write_judged_batch(
        connection: &mut DB::Connection,
        rows: &[QueuedRequest],
        outbox: &[&NewOutboxMessage],
        audit: &[&PreparedAuditEvent],
        counters: &CounterChanges,
    ) -> StoreResult<()> {
        let head: Option<(i64, String)> = sqlx::query_as(AUDIT_HEAD)
            .fetch_optional(&mut *connection)
            .await?;
        let sealed = seal_events(head, audit.iter().copied());
        let mut batch = QueryBuilder::new("SELECT 1");
        if !rows.is_empty() {
            batch.push("; ");
            Self::push_request_rows(&mut batch, rows);
        }
        if !outbox.is_empty() {
            batch.push("; ");
            Self::push_outbox_rows(&mut batch, outbox);
        }
        if !sealed.is_empty() {
            batch.push("; ");
            Self::push_audit_rows(&mut batch, &sealed);
        }
        Self::push_counter_changes(&mut batch, counters);
        DB::execute_built(&mut batch, connection)
            .await
            .map_err(refused_request_insert)?;
        Ok(())
    }

    /// Each lookup's counters and active grants as the database has them: one read per
    /// counter of an (agent, action) in the group and one of its grants, however many of
    /// the group's requests ask.
    async fn stored_facts(
        connection: &mut DB::Connection,
        group: &[QueuedJudgement],
    ) -> StoreResult<Vec<IntakeFacts>> {
        let mut facts: Vec<IntakeFacts> = group
            .iter()
            .map(|queued| IntakeFacts {
                counters: vec![0.0; queued.lookup.counters.len()],
                grants: Vec::new(),
            })
            .collect();
        let mut counter_reads: BTreeMap<CounterKey<'_>, Vec<(usize, usize)>> = BTreeMap::new();
        let mut grant_reads: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (index, queued) in group.iter().enumerate() {
            let lookup = &queued.lookup;
            for (counter, (field, since)) in lookup.counters.iter().enumerate() {
                let window = (lookup.now - *since).num_milliseconds();
                counter_reads
                    .entry((&lookup.agent, &lookup.action, field.as_deref(), window))
                    .or_default()
                    .push((index, counter));
            }
            if lookup.grants {
                grant_reads
                    .entry((&lookup.agent, &lookup.action))
                    .or_default()
                    .push(index);
            }
        }
        for ((agent, action, field, _window), slots) in counter_reads {
            let sinces: Vec<DateTime<Utc>> = slots
                .iter()
                .map(|&(index, counter)| group[index].lookup.counters[counter].1)
                .collect();
            let values = Self::read_counter(connection, agent, action, field, &sinces).await?;
            for ((index, counter), value) in slots.into_iter().zip(values) {
                facts[index].counters[counter] = value;
            }
        }
        for ((agent, action), indexes) in grant_reads {
            let Some(earliest) = indexes.iter().map(|&index| group[index].lookup.now).min() else {
                continue;
            };
            let grants = Self::active_grants(connection, agent, action, earliest).await?;
            for index in indexes {
                let now = group[index].lookup.now;
                facts[index].grants = grants
                    .iter()
                    .filter(|grant| grant.expires_at > now)
                    .cloned()
                    .collect();
            }
        }
        Ok(facts)
    }
}

/// `stored` plus what the requests judged earlier in the same group add to the counters
/// (they are not written yet) and take from the grants' uses.
fn with_earlier(
    mut stored: IntakeFacts,
    lookup: &IntakeLookup,
    earlier: &[JudgedRequest],
) -> IntakeFacts {
    let same_pair: Vec<&ApprovalRequest> = earlier
        .iter()
        .map(|judgement| &judgement.request)
        .filter(|request| {
            request.agent == lookup.agent
                && request.action == lookup.action
                && counted(request.status)
        })
        .collect();
    for ((field, since), value) in lookup.counters.iter().zip(&mut stored.counters) {
        *value += same_pair
            .iter()
            .filter(|request| request.created_at > *since)
            .map(|request| match field {
                None => 1.0,
                Some(field) => request
                    .args
                    .get(field)
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
            })
            .sum::<f64>();
    }
    stored.grants.retain_mut(|grant| {
        let spent = earlier
            .iter()
            .filter(|judgement| {
                judgement
                    .grant_used
                    .as_ref()
                    .is_some_and(|used| used.grant_id == grant.id)
            })
            .count();
        let left = usize::try_from(grant.uses_left)
            .unwrap_or(0)
            .saturating_sub(spent);
        grant.uses_left = u32::try_from(left).unwrap_or(u32::MAX);
        left > 0
    });
    stored
}
