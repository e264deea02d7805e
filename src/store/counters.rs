//! The `request_counters` buckets behind `recent_count` and `recent_sum`: changed with every
//! request's insert and status change, in its transaction, and read by judged intake.
//!
//! A bucket holds, for one agent, action and minute (or hour), how many requests are
//! pending or approved (field `''`) and what each numeric args key of theirs adds up to. A
//! window is read as whole hours, whole minutes next to its start and, exactly, the
//! requests of its first, partial minute: a few index probes however full the window is.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::StoreResult;
use crate::domain::{ApprovalRequest, Status};

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
/// Every request is counted in its minute's bucket and its hour's.
const SPANS: [i64; 2] = [MINUTE, HOUR];
/// A request with more numeric args keys than this keeps no sums in buckets (its `''`
/// rows say so in `overflow`), so one request cannot write thousands of rows.
const MAX_SUMMED_FIELDS: usize = 16;
/// Only whole numbers up to this size are summed in buckets: their sums stay exact in a
/// double, whatever is added and taken away. Any other value is marked in its field row's
/// `overflow` (a huge one added then taken away would otherwise round the rest away).
const MAX_EXACT_VALUE: f64 = 2_147_483_648.0;
/// Bucket rows per upsert statement (eight bind parameters each).
const ROWS_PER_STATEMENT: usize = 500;

/// The buckets of one (agent, action, field `$5`): whole minutes in `[$6, $7)`, whole hours
/// from `$7`, and how many of them (and of the same buckets' `''` rows) hold requests whose
/// values they could not sum (read only for a sum). Four range probes of the primary key,
/// spelled out so neither planner scans the pair's history. (The parameters fit
/// `Backend::COUNTED_BETWEEN`'s, which it is sent with.)
const BUCKETS: &str = "SELECT CAST(COALESCE(SUM(total), 0) AS DOUBLE PRECISION) AS total, \
     CAST(COALESCE(SUM(CASE WHEN overflow > 0 THEN 1 ELSE 0 END), 0) AS BIGINT) AS overflow \
     FROM (\
     SELECT total, overflow FROM request_counters WHERE agent = $1 AND action = $2 \
     AND field = $5 AND span_seconds = 60 AND bucket_start >= $6 AND bucket_start < $7 \
     UNION ALL SELECT total, overflow FROM request_counters WHERE agent = $1 AND action = $2 \
     AND field = $5 AND span_seconds = 3600 AND bucket_start >= $7 \
     UNION ALL SELECT 0, overflow FROM request_counters WHERE agent = $1 AND action = $2 \
     AND field = '' AND $5 <> '' AND span_seconds = 60 AND bucket_start >= $6 AND bucket_start < $7 \
     UNION ALL SELECT 0, overflow FROM request_counters WHERE agent = $1 AND action = $2 \
     AND field = '' AND $5 <> '' AND span_seconds = 3600 AND bucket_start >= $7) AS buckets";

/// One round trip for a counter: the buckets' row (no `created_at`), then the requests
/// before the first whole minute.
fn counter_sql(counted_between: &str) -> String {
    format!(
        "SELECT NULL AS created_at, total, overflow FROM ({BUCKETS}) AS buckets \
         UNION ALL SELECT created_at, value, 0 FROM ({counted_between}) AS requests"
    )
}

/// Does a request in this status count toward `recent_count` and `recent_sum`?
pub(super) fn counted(status: Status) -> bool {
    matches!(status, Status::Pending | Status::Approved)
}

/// The args keys a `recent_sum` can name (letters, digits, '_') whose values are numbers,
/// or `None` when there are more than `MAX_SUMMED_FIELDS` of them.
fn summed_fields(args: &Value) -> Option<Vec<(&str, f64)>> {
    let Some(object) = args.as_object() else {
        return Some(Vec::new());
    };
    let fields: Vec<(&str, f64)> = object
        .iter()
        .filter(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .filter_map(|(key, value)| Some((key.as_str(), value.as_f64()?)))
        .collect();
    (fields.len() <= MAX_SUMMED_FIELDS).then_some(fields)
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BucketKey {
    agent: String,
    action: String,
    field: String,
    span_seconds: i64,
    bucket_start: i64,
}

#[derive(Debug, Default)]
struct BucketChange {
    requests: i64,
    total: f64,
    overflow: i64,
}

/// What a transaction changes in the buckets, one entry per bucket (PostgreSQL's upsert
/// may touch a row only once per statement), in key order.
#[derive(Debug, Default)]
pub(super) struct CounterChanges {
    buckets: BTreeMap<BucketKey, BucketChange>,
}

impl CounterChanges {
    /// The buckets that new requests join.
    pub(super) fn of_new<'a>(requests: impl IntoIterator<Item = &'a ApprovalRequest>) -> Self {
        let mut changes = Self::default();
        for request in requests {
            changes.count(request, request.status, &request.args, 1);
        }
        changes
    }

    /// Adds (`sign` 1) or takes away (-1) what `request`, in `status` with `args`, counts.
    pub(super) fn count(
        &mut self,
        request: &ApprovalRequest,
        status: Status,
        args: &Value,
        sign: i64,
    ) {
        if !counted(status) {
            return;
        }
        let fields = summed_fields(args);
        let second = request.created_at.timestamp();
        for span_seconds in SPANS {
            let bucket_start = second.div_euclid(span_seconds) * span_seconds;
            let mut bump = |field: &str, total: f64, overflow: i64| {
                let change = self
                    .buckets
                    .entry(BucketKey {
                        agent: request.agent.clone(),
                        action: request.action.clone(),
                        field: field.to_string(),
                        span_seconds,
                        bucket_start,
                    })
                    .or_default();
                change.requests += sign;
                change.total += total * sign as f64;
                change.overflow += overflow * sign;
            };
            bump("", 1.0, i64::from(fields.is_none()));
            for (field, value) in fields.iter().flatten() {
                if value.fract() == 0.0 && value.abs() <= MAX_EXACT_VALUE {
                    bump(field, *value, 0);
                } else {
                    bump(field, 0.0, 1);
                }
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buckets
            .values()
            .all(|change| change.requests == 0 && change.total == 0.0 && change.overflow == 0)
    }
}

/// The whole minute a window starting at `since` begins with.
fn first_whole_minute(since: DateTime<Utc>) -> i64 {
    since.timestamp().div_euclid(MINUTE) * MINUTE + MINUTE
}

fn at_second(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(second, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Later than any request: the end of a read of requests that has no buckets after it.
/// (A year SQLite's text timestamps still order correctly.)
fn far_future() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    f64: Column<DB>,
    DateTime<Utc>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
{
    /// Upserts of `changes`, as statements for a batch (each preceded by "; ").
    pub(super) fn push_counter_changes<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        changes: &'rows CounterChanges,
    ) {
        let buckets: Vec<_> = changes.buckets.iter().collect();
        for chunk in buckets.chunks(ROWS_PER_STATEMENT) {
            sql.push("; ");
            Self::push_counter_upsert(sql, chunk);
        }
    }

    /// Applies `changes` on `connection`.
    pub(super) async fn adjust_counters(
        connection: &mut DB::Connection,
        changes: &CounterChanges,
    ) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let buckets: Vec<_> = changes.buckets.iter().collect();
        for chunk in buckets.chunks(ROWS_PER_STATEMENT) {
            let mut upsert = QueryBuilder::new("");
            Self::push_counter_upsert(&mut upsert, chunk);
            DB::execute_built(&mut upsert, connection).await?;
        }
        Ok(())
    }

    fn push_counter_upsert<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        buckets: &[(&'rows BucketKey, &'rows BucketChange)],
    ) {
        sql.push(
            "INSERT INTO request_counters (agent, action, field, span_seconds, bucket_start, \
             requests, total, overflow) ",
        );
        sql.push_values(buckets, |mut row, (key, change)| {
            row.push_bind(key.agent.as_str())
                .push_bind(key.action.as_str())
                .push_bind(key.field.as_str())
                .push_bind(key.span_seconds)
                .push_bind(key.bucket_start)
                .push_bind(change.requests)
                .push_bind(change.total)
                .push_bind(change.overflow);
        });
        // An emptied bucket's total is exactly zero, whatever rounding the floating-point
        // additions and subtractions left.
        sql.push(
            " ON CONFLICT (agent, action, field, span_seconds, bucket_start) DO UPDATE SET \
             requests = request_counters.requests + excluded.requests, \
             total = CASE WHEN request_counters.requests + excluded.requests = 0 THEN 0 \
             ELSE request_counters.total + excluded.total END, \
             overflow = request_counters.overflow + excluded.overflow",
        );
    }

    /// One counter of one agent and action (`field` `None` counts, `Some` sums that args
    /// key) over each window `(since, now]` of `sinces`: the windows of one rule in one
    /// group, which start within moments of each other, share the reads.
    pub(super) async fn read_counter(
        connection: &mut DB::Connection,
        agent: &str,
        action: &str,
        field: Option<&str>,
        sinces: &[DateTime<Utc>],
    ) -> StoreResult<Vec<f64>> {
        let (Some(earliest), Some(latest)) = (sinces.iter().min(), sinces.iter().max()) else {
            return Ok(Vec::new());
        };
        let whole_minutes_from = first_whole_minute(*latest);
        let whole_hours_from = (whole_minutes_from + HOUR - 1).div_euclid(HOUR) * HOUR;
        let name = field.unwrap_or("");
        let rows: Vec<(Option<DateTime<Utc>>, f64, i64)> =
            sqlx::query_as(&counter_sql(DB::COUNTED_BETWEEN))
                .bind(agent)
                .bind(action)
                .bind(*earliest)
                .bind(at_second(whole_minutes_from))
                .bind(name)
                .bind(whole_minutes_from)
                .bind(whole_hours_from)
                .fetch_all(&mut *connection)
                .await?;
        let mut bucketed = 0.0;
        let mut overflow = 0;
        let mut requests: Vec<(DateTime<Utc>, f64)> = Vec::with_capacity(rows.len());
        for (created_at, value, overflowed) in rows {
            match created_at {
                Some(created_at) => requests.push((created_at, value)),
                None => (bucketed, overflow) = (value, overflowed),
            }
        }
        // A sum over a window that holds a value the buckets could not sum reads requests.
        if field.is_some() && overflow > 0 {
            bucketed = 0.0;
            requests = sqlx::query_as(DB::COUNTED_BETWEEN)
                .bind(agent)
                .bind(action)
                .bind(*earliest)
                .bind(far_future())
                .bind(name)
                .fetch_all(&mut *connection)
                .await?;
        }
        Ok(sinces
            .iter()
            .map(|since| {
                bucketed
                    + requests
                        .iter()
                        .filter(|(created_at, _)| created_at > since)
                        .map(|(_, value)| value)
                        .sum::<f64>()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summed_fields_are_numeric_keys_a_rule_can_name() {
        let cases = [
            (
                json!({"amount": 5, "note": "x", "rate": 0.5}),
                Some(vec![("amount", 5.0), ("rate", 0.5)]),
            ),
            (
                json!({"a.b": 1, "": 2, "ok_1": -3}),
                Some(vec![("ok_1", -3.0)]),
            ),
            (json!(["not", "an", "object"]), Some(vec![])),
            (json!({"nested": {"amount": 1}, "flag": true}), Some(vec![])),
        ];
        for (args, expected) in cases {
            assert_eq!(summed_fields(&args), expected, "{args}");
        }
        let many: serde_json::Map<String, Value> = (0..=MAX_SUMMED_FIELDS)
            .map(|index| (format!("f{index}"), json!(index)))
            .collect();
        assert_eq!(summed_fields(&Value::Object(many)), None);
    }

    #[test]
    fn windows_read_whole_minutes_after_their_first_partial_one() {
        let cases = [
            ("2026-12-08T10:00:00Z", "2026-12-08T10:01:00Z"),
            ("2026-12-08T10:00:00.5Z", "2026-12-08T10:01:00Z"),
            ("2026-12-08T10:00:59.999Z", "2026-12-08T10:01:00Z"),
        ];
        for (since, whole) in cases {
            let since: DateTime<Utc> = since.parse().unwrap();
            let whole: DateTime<Utc> = whole.parse().unwrap();
            assert_eq!(first_whole_minute(since), whole.timestamp(), "{since}");
        }
    }

    #[test]
    fn a_request_counts_in_its_minute_and_hour_and_leaving_takes_it_back() {
        let mut request =
            crate::domain::fixtures::pending_refund("slack:U0REQUESTER", "slack:U01ALICE");
        request.created_at = "2026-12-08T10:17:42Z".parse().unwrap();
        request.args = json!({"amount": 7});
        let mut changes = CounterChanges::of_new([&request]);
        let starts: Vec<(String, i64, i64)> = changes
            .buckets
            .keys()
            .map(|key| (key.field.clone(), key.span_seconds, key.bucket_start))
            .collect();
        let minute = "2026-12-08T10:17:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp();
        let hour = "2026-12-08T10:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp();
        assert_eq!(
            starts,
            vec![
                ("".into(), 60, minute),
                ("".into(), 3600, hour),
                ("amount".into(), 60, minute),
                ("amount".into(), 3600, hour)
            ]
        );
        changes.count(&request, Status::Pending, &request.args.clone(), -1);
        assert!(changes.is_empty());
        // A fraction or a huge number is not summed, only marked.
        for amount in [json!(19.99), json!(1e20)] {
            request.args = json!({ "amount": amount });
            let marked = CounterChanges::of_new([&request]);
            let rows: Vec<(f64, i64)> = marked
                .buckets
                .iter()
                .filter(|(key, _)| key.field == "amount")
                .map(|(_, change)| (change.total, change.overflow))
                .collect();
            assert_eq!(rows, vec![(0.0, 1), (0.0, 1)], "{amount}");
        }
        let denied = CounterChanges::of_new([&ApprovalRequest {
            status: Status::Denied,
            ..request
        }]);
        assert!(denied.buckets.is_empty());
    }
}
