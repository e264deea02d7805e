//! Open-loop latency: the arrival schedule (a thread keeping due times), intake sent at a
//! fixed rate, the search for the highest sustainable rate, the histograms of single
//! operations (policy evaluation, long-poll wake, Slack click).

use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use signoff::channels::VoteTarget;
use signoff::domain::{Status, VoteRequest, Voter};
use signoff::policy::EvaluationInput;
use tokio::task::JoinSet;

use crate::harness::{settle_disk, Harness, SIGNING_SECRET};
use crate::policies;
use crate::report::micros;

/// The latency ceiling a rate must stay under to count as sustainable.
pub const P99_CEILING: Duration = Duration::from_millis(5);
/// A looser ceiling, to see throughput against the floor when latency may grow.
pub const THROUGHPUT_CEILING: Duration = Duration::from_millis(100);

pub struct LoadResult {
    pub histogram: Histogram<u64>,
    pub errors: u64,
}

/// Due times at `rate` per second for `seconds`. A thread of its own keeps the schedule: a
/// thread's sleep is accurate to tens of microseconds, tokio's timers only to the
/// millisecond, and a late send would be counted against the server.
pub fn schedule(rate: f64, seconds: f64) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (sender, due_times) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for due in paced(rate, seconds) {
            if sender.send(due).is_err() {
                break;
            }
        }
    });
    due_times
}

/// Due times at `rate` per second for `seconds`, from now; each is yielded once it has
/// come, the calling thread sleeping until then.
pub fn paced(rate: f64, seconds: f64) -> impl Iterator<Item = Instant> {
    let total = (rate * seconds).max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    (0..total).map(move |index| {
        let due = started + interval * index as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        due
    })
}

/// An empty latency histogram: any value, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new(3).expect("three significant digits are valid")
}

/// Attempts per rate step: a step is sustained when one of them has no errors and its p99
/// under the ceiling. This VM's disk stalls for 20-300 ms a few times every few seconds at
/// any write rate; a stall fails one attempt, an overloaded server fails all of them.
pub const ATTEMPTS_PER_STEP: usize = 3;

/// What a rate search found, step by step.
#[derive(Clone, Debug, Default)]
pub struct Sustained {
    /// The highest step sustained in one of `ATTEMPTS_PER_STEP` attempts.
    pub highest: f64,
    /// The highest step sustained with every step below it sustained too.
    pub unbroken: f64,
    /// Each step's rate, whether it was sustained, and its best attempt's p50 and p99.
    pub steps: Vec<(f64, bool, u64, u64)>,
}

impl Sustained {
    /// Both figures with their ratios to `floor`.
    pub fn against(&self, floor: f64) -> String {
        format!(
            "{:.0} req/s ({:.2}x); {:.0} req/s ({:.2}x) with every lower step sustained too",
            self.highest,
            self.highest / floor,
            self.unbroken,
            self.unbroken / floor,
        )
    }

    /// Every step: `rate ✓`, `rate ✗ (p99 …)`, or `rate ✗ (errors)` when every attempt had some.
    pub fn step_list(&self) -> String {
        self.steps
            .iter()
            .map(|(rate, sustained, _, p99)| {
                if *sustained {
                    format!("{rate:.0} ✓")
                } else if *p99 == u64::MAX {
                    format!("{rate:.0} ✗ (errors)")
                } else {
                    format!("{rate:.0} ✗ (p99 {})", micros(*p99))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Steps up by about 1.4x from 50 per second; a step is sustained when one of
/// `ATTEMPTS_PER_STEP` attempts has no errors and p99 under `ceiling`. A step that is not
/// sustained only ends the search when even its best attempt had errors or a median over
/// the ceiling: then the work is past what the machine keeps up with. Otherwise only its
/// tail was late, as a stall of the disk's sync makes it at any rate, so higher rates are
/// still tried.
pub async fn max_sustainable_rate<Run, Running>(mut run: Run, ceiling: Duration) -> Sustained
where
    Run: FnMut(f64) -> Running,
    Running: std::future::Future<Output = LoadResult>,
{
    let mut rate = 50.0;
    let mut found = Sustained::default();
    loop {
        settle_disk();
        // The attempt with the best tail, and the fewest errors and lowest median of any.
        let mut best: Option<(u64, u64)> = None;
        let (mut fewest_errors, mut lowest_p50) = (u64::MAX, u64::MAX);
        let mut passed = false;
        for attempt in 1..=ATTEMPTS_PER_STEP {
            let result = run(rate).await;
            let p50 = result.histogram.value_at_quantile(0.5);
            let p99 = result.histogram.value_at_quantile(0.99);
            eprintln!(
                "  {rate:.0}/s attempt {attempt}: p50 {} p99 {} errors {}",
                micros(p50),
                micros(p99),
                result.errors
            );
            fewest_errors = fewest_errors.min(result.errors);
            lowest_p50 = lowest_p50.min(p50);
            if result.errors == 0 && best.is_none_or(|(_, best_p99)| p99 < best_p99) {
                best = Some((p50, p99));
            }
            passed = result.errors == 0 && Duration::from_micros(p99) <= ceiling;
            if passed {
                break;
            }
        }
        let (p50, p99) = best.unwrap_or((lowest_p50, u64::MAX));
        found.steps.push((rate, passed, p50, p99));
        if passed {
            found.highest = rate;
            if found.steps.iter().all(|(_, sustained, _, _)| *sustained) {
                found.unbroken = rate;
            }
        } else if fewest_errors > 0 || Duration::from_micros(lowest_p50) > ceiling {
            return found;
        }
        rate = (rate * 1.4).round();
    }
}

/// p50 and p99 of one evaluation, in nanoseconds, for policies of 10, 100 and 1,000 rules.
pub fn policy_evaluation() -> Vec<(usize, u64, u64)> {
    let args = json!({"amount": 2500, "currency": "EUR"});
    let context = json!({"reversible": false});
    let mut results = Vec::new();
    for rules in [10, 100, 1000] {
        let policy = policies::generated_policy(rules);
        let mut histogram = histogram();
        for _ in 0..20_000 {
            let started = Instant::now();
            let verdict = policy.evaluate(EvaluationInput {
                action: "payments.refund",
                args: &args,
                agent: "finance-bot",
                context: &context,
            });
            let elapsed = started.elapsed().as_nanos() as u64;
            std::hint::black_box(verdict);
            let _ = histogram.record(elapsed);
        }
        results.push((
            rules,
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99),
        ));
    }
    results
}

impl Harness {
    /// Sends at `rate` per second for `seconds`, never waiting for answers before sending
    /// the next; latency counts from when each request was due.
    pub async fn run_load(&self, body: &Value, rate: f64, seconds: f64) -> LoadResult {
        // One request built up front and cloned per send (its body is shared bytes), so
        // the generator spends its share of the two cores on sending, not on serialising.
        let prototype = self.intake(body).timeout(Duration::from_secs(10)).build();
        let Ok(prototype) = prototype else {
            return LoadResult {
                histogram: histogram(),
                errors: 1,
            };
        };
        let mut due_times = schedule(rate, seconds);
        let mut tasks = JoinSet::new();
        while let Some(due) = due_times.recv().await {
            let Some(request) = prototype.try_clone() else {
                break;
            };
            let http = self.http.clone();
            tasks.spawn(async move {
                // The answer is read to its end, as an agent would: only then does the
                // client put the connection back in its pool for the next request.
                let ok = match http.execute(request).await {
                    Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                };
                (ok, due.elapsed())
            });
        }
        let mut histogram = histogram();
        let mut errors = 0;
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok((true, latency)) => {
                    let _ = histogram.record(latency.as_micros() as u64);
                }
                _ => errors += 1,
            }
        }
        LoadResult { histogram, errors }
    }

    pub async fn max_sustainable_rate(
        &self,
        body: &Value,
        seconds: f64,
        ceiling: Duration,
    ) -> Sustained {
        max_sustainable_rate(|rate| self.run_load(body, rate, seconds), ceiling).await
    }

    /// From the vote's commit to the waiting agent's answer, sequentially.
    pub async fn wake_latency(&self, samples: usize) -> anyhow::Result<Histogram<u64>> {
        settle_disk();
        let mut histogram = histogram();
        let voter = Voter::new(
            "cli:bench"
                .parse()
                .map_err(|error| anyhow::anyhow!("{error}"))?,
        );
        for _ in 0..samples {
            let request = self.submit(&json!({"action": "email.send"})).await?;
            let id = request["id"].as_str().unwrap_or_default().to_string();
            let poll = self
                .http
                .get(format!("{}/v1/requests/{id}?wait=30", self.base_url))
                .bearer_auth(&self.key)
                .send();
            let waiting = tokio::spawn(async move {
                let response = poll.await?;
                let answered = Instant::now();
                // Read to the end so the connection goes back to the pool.
                response.bytes().await?;
                Ok::<_, reqwest::Error>(answered)
            });
            // Give the long-poll time to register; what is measured starts at the commit.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.server
                .engine()
                .record_vote(&id, &voter, VoteRequest::Approve { note: None }, None)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let committed = Instant::now();
            let answered = waiting.await??;
            let _ =
                histogram.record(answered.saturating_duration_since(committed).as_micros() as u64);
        }
        Ok(histogram)
    }

    /// A signed Approve click by an eligible approver on a fresh pending request, to the
    /// HTTP answer: the button's value names the request and revision as the real card's
    /// does, so each click commits an approval (checked after the timing).
    pub async fn slack_ack_latency(&self, samples: usize) -> anyhow::Result<Histogram<u64>> {
        settle_disk();
        let mut histogram = histogram();
        for _ in 0..samples {
            let request = self.submit(&json!({"action": "email.send"})).await?;
            let id = request["id"].as_str().unwrap_or_default();
            let revision = request["revision"].as_u64().unwrap_or(1);
            let button = VoteTarget {
                request_id: id.to_string(),
                revision: u32::try_from(revision)?,
                grant_seconds: None,
            }
            .encode();
            let payload = json!({
                "type": "block_actions", "user": {"id": "U0BENCH"}, "trigger_id": "1.2.3",
                "channel": {"id": "C0BENCH"}, "container": {"channel_id": "C0BENCH"},
                "actions": [{"action_id": "approve", "value": button, "type": "button"}]
            });
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("payload", &payload.to_string())
                .finish();
            let timestamp = chrono::Utc::now().timestamp();
            let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes())?;
            mac.update(format!("v0:{timestamp}:{body}").as_bytes());
            let signature = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
            let started = Instant::now();
            let response = self
                .http
                .post(format!("{}/slack/interactions", self.base_url))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-slack-signature", signature)
                .header("x-slack-request-timestamp", timestamp.to_string())
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let answer = response.bytes().await?;
            let elapsed = started.elapsed();
            if !status.is_success() {
                bail!("click answered {status}");
            }
            // A refused click is answered with its explanation; a counted one with nothing.
            let decided = self
                .server
                .engine()
                .request(id)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            if decided.status != Status::Approved {
                bail!(
                    "the click did not approve the request: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            let _ = histogram.record(elapsed.as_micros() as u64);
        }
        Ok(histogram)
    }
}
