//! The outbox worker: claims due messages, posts and updates chat cards, sends signed
//! webhooks, retries with exponential backoff (honouring Retry-After) and paces each
//! destination. Runs on every replica; claims are leases, so nothing is done twice at once.
//!
//! No agent can starve another here (ARCHITECTURE.md): the claim loop never waits for a delivery
//! (each runs in its own task); it claims only what there is room for (a few webhooks in
//! flight per receiver host, a few cards in all), so a slow or dead receiver holds only its
//! own host's slots; and a paced channel takes its next card from the agent whose turn it
//! is, round-robin, so one agent's flood does not push another's card back. Leases of
//! deliveries still running are renewed, so no other replica takes them meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::Utc;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::{watch, Notify};
use tokio_util::task::TaskTracker;

use crate::audit::NewAuditEvent;
use crate::callbacks::{self, CallbackRefused};
use crate::channels::slack::api::SlackCallError;
use crate::channels::slack::{CardSync, CardSyncError, SlackChannel};
use crate::domain::now;
use crate::engine::{Engine, EngineResult};
use crate::store::{
    receiver_host, CandidateQuery, DeliveryRecord, OutboxCandidate, OutboxMessage, OutboxOutcome,
};
use crate::telemetry;

/// Why a message for a channel this server does not run is dropped (quietly: expected).
const NOT_CONFIGURED: &str = "is not configured on this server";

/// A claimed message is ours this long unless renewed; every call inside has a shorter
/// timeout, and running deliveries are renewed every third of it.
const LEASE: Duration = Duration::from_secs(60);
/// Cards and reminders being posted at once, in all.
const CARDS_IN_FLIGHT: usize = 8;
/// Webhooks being sent at once, in all, and to any one receiver host: a dead receiver
/// holds at most its host's share.
const WEBHOOKS_IN_FLIGHT: usize = 64;
const WEBHOOKS_PER_HOST: usize = 4;
/// Candidates read per look: the first few of each (destination, agent) queue.
const CANDIDATES: i64 = 256;
/// How often the worker looks for due work when nothing wakes it.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhooks are retried at least 24 h (README: webhooks); give up after three days.
const WEBHOOK_GIVE_UP: chrono::Duration = chrono::Duration::days(3);
const WEBHOOK_MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Cards keep being retried (a Slack outage delays cards, never loses them), at most this far apart.
const CARD_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Recording a successful delivery is retried this far apart at most (see `finish`).
const RECORD_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// About one post per second per destination, with a short burst.
const BURST: f64 = 3.0;
const PER_SECOND: f64 = 1.0;
/// Destinations whose round-robin state is kept before it starts over (bounds memory).
const TRACKED_DESTINATIONS: usize = 10_000;

pub struct Delivery {
    engine: Engine,
    slack: Option<Arc<SlackChannel>>,
    http: reqwest::Client,
    lease: Duration,
    pacing: Mutex<HashMap<String, TokenBucket>>,
    /// Per paced destination, whose turn it is among the agents with cards waiting.
    turns: Mutex<HashMap<String, Turns>>,
    in_flight: Mutex<InFlight>,
    /// A delivery finished: there is room to claim again.
    freed: Notify,
    deliveries: TaskTracker,
}

/// What this worker is delivering now.
#[derive(Debug, Default)]
struct InFlight {
    /// Their leases are renewed until they finish.
    ids: HashSet<i64>,
    cards: usize,
    webhooks: usize,
    by_host: HashMap<String, usize>,
}

/// Round-robin among the agents of one destination: the agent served longest ago (or
/// never) goes next.
#[derive(Debug, Default)]
struct Turns {
    served: HashMap<String, u64>,
    next: u64,
}

impl Delivery {
    pub fn new(engine: Engine, slack: Option<Arc<SlackChannel>>, http: reqwest::Client) -> Self {
        Self {
            engine,
            slack,
            http,
            lease: LEASE,
            pacing: Mutex::default(),
            turns: Mutex::default(),
            in_flight: Mutex::default(),
            freed: Notify::new(),
            deliveries: TaskTracker::new(),
        }
    }

    /// How long a claim holds unless renewed (tests shorten it).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Runs until `shutdown`; in-flight deliveries finish (each is bounded by its timeout).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let signal = self.engine.outbox_signal();
        let renewing = tokio::spawn(self.clone().renew_leases());
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.step().await {
                Ok(claimed) if claimed > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "claiming outbox messages failed"),
            }
            // Nothing to send now. Look again when a waiting channel gets a token, when
            // work arrives for a destination that is not waiting, when a delivery ends
            // (room to claim), or at the poll interval (work written by other processes,
            // retries coming due). Work for a waiting channel alone is no reason to look:
            // its messages could not be sent yet.
            let look_again = tokio::time::Instant::now()
                + self
                    .next_token_in()
                    .unwrap_or(POLL_INTERVAL)
                    .min(POLL_INTERVAL);
            loop {
                tokio::select! {
                    _ = signal.woken() => {
                        let arrived = signal.take_destinations();
                        if arrived.iter().any(|destination| !self.is_waiting(destination)) {
                            break;
                        }
                    }
                    _ = self.freed.notified() => break,
                    _ = tokio::time::sleep_until(look_again) => break,
                    _ = shutdown.changed() => break,
                }
            }
        }
        // Wait for deliveries already started, so their outcomes are recorded; their
        // leases are renewed until then.
        self.deliveries.close();
        self.deliveries.wait().await;
        let _ = renewing.await;
    }

    /// One look: reads the due candidates, chooses what there is room for (pacing, round
    /// robin, per-host caps), claims it and starts each delivery in its own task. Never
    /// waits for a delivery. Returns how many were claimed.
    #[tracing::instrument(skip_all)]
    pub async fn step(self: &Arc<Self>) -> EngineResult<usize> {
        let waiting = self.waiting_destinations();
        // Hosts at their cap: their webhooks are not read, so they cannot fill the read.
        let full_hosts: Vec<String> = lock(&self.in_flight)
            .by_host
            .iter()
            .filter(|(_, &count)| count >= WEBHOOKS_PER_HOST)
            .map(|(host, _)| host.clone())
            .collect();
        let at = now();
        let candidates = self
            .engine
            .outbox_candidates(
                at,
                &CandidateQuery {
                    skip: &waiting,
                    skip_hosts: &full_hosts,
                    per_queue: WEBHOOKS_PER_HOST as i64,
                    limit: CANDIDATES,
                },
            )
            .await?;
        let chosen = self.choose(candidates);
        if chosen.is_empty() {
            return Ok(0);
        }
        let claimed = self
            .engine
            .claim_outbox(at, at + to_chrono(self.lease), &chosen)
            .await?;
        let count = claimed.len();
        for message in claimed {
            self.start(message);
        }
        Ok(count)
    }

    /// What to claim of `candidates` (oldest first): webhooks while their host and the
    /// worker have room; for each paced destination with a token, one card, from the agent
    /// whose turn it is.
    fn choose(&self, candidates: Vec<OutboxCandidate>) -> Vec<i64> {
        let mut chosen = Vec::new();
        let mut paced: Vec<(String, Vec<OutboxCandidate>)> = Vec::new();
        {
            let in_flight = lock(&self.in_flight);
            let mut webhook_room = WEBHOOKS_IN_FLIGHT.saturating_sub(in_flight.webhooks);
            let mut host_room: HashMap<String, usize> = HashMap::new();
            for candidate in candidates {
                if candidate.kind == "webhook" {
                    let host = receiver_host(&candidate.destination);
                    let room = host_room.entry(host).or_insert_with_key(|host| {
                        WEBHOOKS_PER_HOST
                            .saturating_sub(in_flight.by_host.get(host).copied().unwrap_or(0))
                    });
                    if *room > 0 && webhook_room > 0 {
                        *room -= 1;
                        webhook_room -= 1;
                        chosen.push(candidate.id);
                    }
                    continue;
                }
                // Left for a replica that runs Slack: claiming it here could only fail it.
                if self.slack.is_none() && is_slack(&candidate.destination) {
                    continue;
                }
                match paced
                    .iter_mut()
                    .find(|(destination, _)| *destination == candidate.destination)
                {
                    Some((_, queue)) => queue.push(candidate),
                    None => paced.push((candidate.destination.clone(), vec![candidate])),
                }
            }
            let card_room = CARDS_IN_FLIGHT.saturating_sub(in_flight.cards);
            paced.truncate(card_room);
        }
        let mut turns = lock(&self.turns);
        if turns.len() > TRACKED_DESTINATIONS {
            turns.clear();
        }
        for (destination, queue) in paced {
            if self.pace(&destination).is_some() {
                continue;
            }
            let turns = turns.entry(destination).or_default();
            // Oldest first among agents never served or served equally long ago.
            let Some(next) = queue
                .iter()
                .min_by_key(|candidate| turns.served.get(&candidate.agent).copied())
            else {
                continue;
            };
            turns.next += 1;
            let turn = turns.next;
            turns.served.insert(next.agent.clone(), turn);
            chosen.push(next.id);
        }
        chosen
    }

    /// Counts the message in flight and delivers it in a task of its own.
    fn start(self: &Arc<Self>, message: OutboxMessage) {
        let host = (message.kind == "webhook").then(|| receiver_host(&message.destination));
        {
            let mut in_flight = lock(&self.in_flight);
            in_flight.ids.insert(message.id);
            match &host {
                Some(host) => {
                    in_flight.webhooks += 1;
                    *in_flight.by_host.entry(host.clone()).or_default() += 1;
                }
                None => in_flight.cards += 1,
            }
        }
        let worker = self.clone();
        self.deliveries.spawn(async move {
            let outcome = worker.deliver(&message).await;
            worker.finish(&message, outcome).await;
            {
                let mut in_flight = lock(&worker.in_flight);
                in_flight.ids.remove(&message.id);
                match &host {
                    Some(host) => {
                        in_flight.webhooks = in_flight.webhooks.saturating_sub(1);
                        if let Some(count) = in_flight.by_host.get_mut(host) {
                            *count = count.saturating_sub(1);
                            if *count == 0 {
                                in_flight.by_host.remove(host);
                            }
                        }
                    }
                    None => in_flight.cards = in_flight.cards.saturating_sub(1),
                }
            }
            worker.freed.notify_one();
        });
    }

    /// Extends the leases of running deliveries every third of a lease, until the worker
    /// has stopped and its last delivery ended.
    async fn renew_leases(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.lease / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.deliveries.wait() => return,
            }
            let ids: Vec<i64> = lock(&self.in_flight).ids.iter().copied().collect();
            if ids.is_empty() {
                continue;
            }
            let until = now() + to_chrono(self.lease);
            if let Err(error) = self.engine.renew_outbox_leases(&ids, until).await {
                // The next tick tries again; a lease is three ticks long.
                tracing::warn!(%error, count = ids.len(), "renewing outbox leases failed");
            }
        }
    }

    async fn finish(&self, message: &OutboxMessage, outcome: OutboxOutcome) {
        let unconfigured =
            matches!(&outcome, OutboxOutcome::Abandon { error } if error.ends_with(NOT_CONFIGURED));
        if let (false, OutboxOutcome::Retry { error, .. } | OutboxOutcome::Abandon { error }) =
            (unconfigured, &outcome)
        {
            let destination_kind = if message.kind == "webhook" {
                "webhook"
            } else {
                message
                    .destination
                    .split_once(':')
                    .map_or("unknown", |(kind, _)| kind)
            };
            metrics::counter!(telemetry::DELIVERY_FAILURES, "destination" => destination_kind.to_string())
                .increment(1);
            tracing::warn!(outbox_id = message.id, kind = %message.kind, destination = %message.destination, %error, "delivery failed");
        }
        // Reconcile after, rather than record before: Slack gives a card's `ts` only once
        // it is posted, and chat.postMessage has no idempotency key, so nothing could be
        // recorded first that would stop a second post. Instead a delivery that happened
        // is recorded until the record holds: its lease is renewed meanwhile (the message
        // is still in flight), so no replica posts the card (or sends the webhook) again.
        // Only a crash in that window can still repeat it.
        let delivered = matches!(outcome, OutboxOutcome::Delivered(_));
        let mut pause = Duration::from_millis(100);
        loop {
            match self.engine.finish_outbox(message, outcome.clone()).await {
                Ok(()) => return,
                Err(error) if delivered => {
                    tracing::warn!(%error, outbox_id = message.id, "recording a delivery failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECORD_MAX_BACKOFF);
                }
                Err(error) => {
                    // The lease runs out and the message is tried again: at least once,
                    // never lost.
                    tracing::error!(%error, outbox_id = message.id, "recording a delivery outcome failed");
                    return;
                }
            }
        }
    }

    #[tracing::instrument(skip_all, fields(outbox_id = message.id, kind = %message.kind))]
    async fn deliver(&self, message: &OutboxMessage) -> OutboxOutcome {
        match (message.kind.as_str(), message.destination.split_once(':')) {
            ("card", Some((crate::channels::SLACK, channel))) => {
                self.deliver_slack_card(message, channel).await
            }
            ("reminder", Some((crate::channels::SLACK, _))) => {
                self.deliver_slack_reminder(message).await
            }
            ("webhook", _) => self.deliver_webhook(message).await,
            _ => OutboxOutcome::Abandon {
                error: format!(
                    "no channel configured for {} {}",
                    message.kind, message.destination
                ),
            },
        }
    }

    async fn deliver_slack_card(&self, message: &OutboxMessage, channel: &str) -> OutboxOutcome {
        let Some(slack) = &self.slack else {
            return OutboxOutcome::Abandon {
                error: format!("Slack {NOT_CONFIGURED}"),
            };
        };
        let result = slack
            .sync_card(
                &self.engine,
                &message.request_id,
                &message.destination,
                channel,
            )
            .await;
        card_outcome(
            message,
            result.map(|sync| match sync {
                CardSync::Posted { reference } => DeliveryRecord {
                    chat_message: Some(reference),
                    audit: Some(delivered_event(message, "card")),
                },
                CardSync::Updated => DeliveryRecord::default(),
            }),
        )
    }

    async fn deliver_slack_reminder(&self, message: &OutboxMessage) -> OutboxOutcome {
        let Some(slack) = &self.slack else {
            return OutboxOutcome::Abandon {
                error: format!("Slack {NOT_CONFIGURED}"),
            };
        };
        let result = slack
            .post_reminder(
                &self.engine,
                &message.request_id,
                &message.destination,
                &message.payload,
            )
            .await;
        card_outcome(message, result.map(|()| DeliveryRecord::default()))
    }

    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
    /// HMAC-SHA256(secret, id.timestamp.body)>`. The id is stable across retries.
    async fn deliver_webhook(&self, message: &OutboxMessage) -> OutboxOutcome {
        // The URL passed at submission, but the config may have changed since.
        if let Err(refused) = self
            .engine
            .callback_guard()
            .check_before_connect(&message.destination)
        {
            return refused_webhook(message, &refused);
        }
        let secret = match self.engine.webhook_secret(&message.request_id).await {
            Ok(secret) => secret,
            Err(error) => {
                return OutboxOutcome::Retry {
                    at: retry_at(message.attempts, WEBHOOK_MAX_BACKOFF, None),
                    error: error.to_string(),
                }
            }
        };
        let body = serde_json::to_vec(&message.payload).unwrap_or_default();
        // Stable across retries, unique across databases (the request id is random).
        let id = format!("msg_{}_{}", message.request_id, message.id);
        let timestamp = Utc::now().timestamp();
        let signature = match sign_webhook(&secret, &id, timestamp, &body) {
            Ok(signature) => signature,
            Err(error) => return OutboxOutcome::Abandon { error },
        };
        let sent = self
            .http
            .post(&message.destination)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .timeout(WEBHOOK_TIMEOUT)
            .body(body)
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => {
                return OutboxOutcome::Delivered(DeliveryRecord {
                    chat_message: None,
                    audit: Some(delivered_event(message, "webhook")),
                });
            }
            // 410 Gone: the receiver asks us to stop.
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                return OutboxOutcome::Abandon {
                    error: "receiver answered 410 Gone".into(),
                };
            }
            Ok(response) => format!("receiver answered {}", response.status()),
            Err(error) => match callbacks::refusal_in(&error) {
                Some(refused) => return refused_webhook(message, refused),
                None => format!("could not reach the receiver: {error}"),
            },
        };
        if message.created_at + WEBHOOK_GIVE_UP < Utc::now() {
            return OutboxOutcome::Abandon {
                error: format!(
                    "{failure}; gave up after {} days",
                    WEBHOOK_GIVE_UP.num_days()
                ),
            };
        }
        OutboxOutcome::Retry {
            at: retry_at(message.attempts, WEBHOOK_MAX_BACKOFF, None),
            error: failure,
        }
    }

    /// Paced destinations with no token to spend now.
    fn waiting_destinations(&self) -> Vec<String> {
        self.lock_pacing()
            .iter()
            .filter(|(_, bucket)| !bucket.has_token())
            .map(|(destination, _)| destination.clone())
            .collect()
    }

    fn is_waiting(&self, destination: &str) -> bool {
        self.lock_pacing()
            .get(destination)
            .is_some_and(|bucket| !bucket.has_token())
    }

    /// How soon the first waiting destination gets a token; `None` when none waits.
    fn next_token_in(&self) -> Option<Duration> {
        self.lock_pacing()
            .values()
            .filter_map(TokenBucket::next_token_in)
            .min()
    }

    fn lock_pacing(&self) -> MutexGuard<'_, HashMap<String, TokenBucket>> {
        lock(&self.pacing)
    }

    /// `None` when `destination` may be sent to now, else how long to wait.
    fn pace(&self, destination: &str) -> Option<Duration> {
        self.lock_pacing()
            .entry(destination.to_string())
            .or_insert_with(TokenBucket::full)
            .take()
    }
}

/// A webhook whose address callbacks may not reach is never sent, and not retried: the
/// address will not become allowed by waiting (a change to `callback_allowed_networks`
/// is a restart, and DNS pointing a callback inside is an attack, not an outage).
fn refused_webhook(message: &OutboxMessage, refused: &CallbackRefused) -> OutboxOutcome {
    tracing::warn!(
        outbox_id = message.id,
        request_id = %message.request_id,
        destination = %message.destination,
        reason = %refused,
        "webhook not sent: its callback address is not allowed; giving up"
    );
    OutboxOutcome::Abandon {
        error: format!("callback address refused: {refused}"),
    }
}

/// The maps and counters behind these locks hold no invariant a panic could break halfway.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_slack(destination: &str) -> bool {
    destination
        .split_once(':')
        .is_some_and(|(kind, _)| kind == crate::channels::SLACK)
}

/// The audit event for a card's first post or a webhook's delivery.
fn delivered_event(message: &OutboxMessage, kind: &str) -> NewAuditEvent {
    NewAuditEvent {
        at: now(),
        request_id: Some(message.request_id.clone()),
        kind: crate::domain::AuditKind::Delivered,
        actor: "system:delivery".into(),
        payload: serde_json::json!({"kind": kind, "destination": message.destination}),
    }
}

/// What a chat delivery's result means for its outbox message.
fn card_outcome(
    message: &OutboxMessage,
    result: Result<DeliveryRecord, CardSyncError>,
) -> OutboxOutcome {
    match result {
        Ok(record) => OutboxOutcome::Delivered(record),
        Err(CardSyncError::Slack(SlackCallError::Permanent(error))) => {
            OutboxOutcome::Abandon { error }
        }
        Err(CardSyncError::Slack(SlackCallError::Retry { reason, after })) => {
            OutboxOutcome::Retry {
                at: retry_at(message.attempts, CARD_MAX_BACKOFF, after),
                error: reason,
            }
        }
        Err(CardSyncError::Engine(error)) => OutboxOutcome::Retry {
            at: retry_at(message.attempts, CARD_MAX_BACKOFF, None),
            error: error.to_string(),
        },
    }
}

/// `v1,<base64 signature>` for a Standard Webhooks secret (`whsec_<base64 key>`).
pub fn sign_webhook(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .map_err(|_| "the agent's webhook secret is not base64".to_string())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|error| error.to_string())?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Exponential backoff with jitter from 1 s, capped; never sooner than Retry-After.
fn retry_at(attempts: i32, cap: Duration, retry_after: Option<Duration>) -> chrono::DateTime<Utc> {
    let exponent = attempts.clamp(0, 20) as u32;
    let backoff = Duration::from_secs(1u64 << exponent).min(cap);
    let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
    let wait = retry_after.map_or(jittered, |after| after.max(jittered));
    now() + to_chrono(wait)
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full() -> Self {
        Self {
            tokens: BURST,
            updated: Instant::now(),
        }
    }

    fn has_token(&self) -> bool {
        self.next_token_in().is_none()
    }

    /// `None` when a token is there now.
    fn next_token_in(&self) -> Option<Duration> {
        let tokens = self.tokens + self.updated.elapsed().as_secs_f64() * PER_SECOND;
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / PER_SECOND))
    }

    fn take(&mut self) -> Option<Duration> {
        let elapsed = self.updated.elapsed().as_secs_f64();
        self.updated = Instant::now();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / PER_SECOND))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let signature = sign_webhook(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_grows_and_respects_retry_after() {
        let soon = retry_at(0, CARD_MAX_BACKOFF, None) - now();
        assert!(soon <= chrono::Duration::seconds(1));
        let capped = retry_at(30, CARD_MAX_BACKOFF, None) - now();
        assert!(
            capped <= chrono::Duration::seconds(300) && capped >= chrono::Duration::seconds(149)
        );
        let told = retry_at(0, CARD_MAX_BACKOFF, Some(Duration::from_secs(30))) - now();
        assert!(told >= chrono::Duration::seconds(29));
    }

    #[test]
    fn pacing_allows_a_burst_then_about_one_per_second() {
        let mut bucket = TokenBucket::full();
        for _ in 0..3 {
            assert!(bucket.has_token());
            assert_eq!(bucket.next_token_in(), None);
            assert_eq!(bucket.take(), None);
        }
        // Spent: the worker knows how long to sleep before this channel may be sent to.
        assert!(!bucket.has_token());
        let next = bucket.next_token_in().expect("no token left");
        assert!(next > Duration::ZERO && next <= Duration::from_secs(1));
        let wait = bucket.take().expect("the burst is spent");
        assert!(wait <= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn the_outbox_signal_says_which_destinations_have_work() {
        let signal = crate::engine::OutboxSignal::default();
        // No destinations, no wake-up.
        signal.wake(Vec::new());
        let nothing = tokio::time::timeout(Duration::from_millis(20), signal.woken()).await;
        assert!(nothing.is_err());
        signal.wake(vec!["slack:C1".into()]);
        signal.wake(vec![
            "slack:C1".into(),
            "https://hooks.example.com/x".into(),
        ]);
        // Wake-ups coalesce; the destinations are all kept, each once.
        tokio::time::timeout(Duration::from_secs(1), signal.woken())
            .await
            .expect("woken");
        let mut arrived: Vec<_> = signal.take_destinations().into_iter().collect();
        arrived.sort();
        assert_eq!(arrived, ["https://hooks.example.com/x", "slack:C1"]);
        assert!(signal.take_destinations().is_empty());
    }
}
