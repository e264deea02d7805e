//! The outbox worker: claims due messages, has chat channels post and update cards and
//! reminders, sends signed webhooks, retries with exponential backoff (honouring
//! Retry-After) and paces each destination. Runs on every replica; claims are leases, so
//! nothing is done twice at once. It names no chat platform: cards go to whichever
//! `ChatChannel` the registry holds for a destination's platform.
//!
//! No agent can starve another here (ARCHITECTURE.md): the claim loop never waits for a
//! delivery (each runs in its own task); it claims only what there is room for (a few
//! webhooks in flight per receiver host, a few cards in all), so a slow or dead receiver
//! holds only its own host's slots; and a paced destination takes its next card from the
//! agent whose turn it is, round-robin, so one agent's flood does not push another's card
//! back. Leases of deliveries still running are renewed, so no other replica takes them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pacing::{TokenBucket, Turns};
use super::webhook::send_webhook;
use crate::audit::NewAuditEvent;
use crate::channels::{CardSync, CardView, ChannelError, ChatChannels, Reminder};
use crate::domain::{AuditKind, Destination, OutboxKind};
use crate::engine::{Engine, EngineResult};
use crate::store::{
    receiver_host, CandidateQuery, DeliveryRecord, OutboxCandidate, OutboxMessage, OutboxOutcome,
};
use crate::telemetry;

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
/// Cards keep being retried (a chat outage delays cards, never loses them), at most this far apart.
const CARD_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Recording a successful delivery is retried this far apart at most (see `finish`).
const RECORD_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Destinations whose round-robin state is kept before it starts over (bounds memory).
const TRACKED_DESTINATIONS: usize = 10_000;

pub struct Delivery {
    engine: Engine,
    channels: ChatChannels,
    http: reqwest::Client,
    lease: Duration,
    pacing: Mutex<HashMap<String, TokenBucket>>,
    /// Per paced destination, whose turn it is among the agents with cards waiting.
    turns: Mutex<HashMap<String, Turns>>,
    /// Destinations of platforms this process runs no channel for (another replica may):
    /// left out of every read, so their rows can never crowd out what this one can send.
    /// Route destinations are few (the policy names them), so this stays small.
    foreign: Mutex<HashSet<String>>,
    in_flight: Mutex<InFlight>,
    /// A delivery finished: there is room to claim again.
    freed: Notify,
    /// The last delivery in flight finished.
    idle: Notify,
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

impl Delivery {
    /// A worker for `engine`'s outbox: cards through `channels`, webhooks through `http`
    /// (the client that refuses addresses callbacks may not reach).
    pub fn new(engine: Engine, channels: ChatChannels, http: reqwest::Client) -> Self {
        Self {
            engine,
            channels,
            http,
            lease: LEASE,
            pacing: Mutex::default(),
            turns: Mutex::default(),
            foreign: Mutex::default(),
            in_flight: Mutex::default(),
            freed: Notify::new(),
            idle: Notify::new(),
            deliveries: TaskTracker::new(),
        }
    }

    /// How long a claim holds unless renewed (tests shorten it).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Runs until `cancel`; in-flight deliveries finish (each is bounded by its timeout).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let signal = self.engine.outbox_signal();
        let renewing = tokio::spawn(self.clone().renew_leases());
        while !cancel.is_cancelled() {
            match self.step().await {
                Ok(claimed) if claimed > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "claiming outbox messages failed"),
            }
            // Nothing to send now. Look again when a waiting destination gets a token, when
            // work arrives for a destination that is not waiting, when a delivery ends
            // (room to claim), or at the poll interval (work written by other processes,
            // retries coming due). Work for a waiting destination alone is no reason to
            // look: its messages could not be sent yet.
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
                    _ = cancel.cancelled() => break,
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
        let mut skip = self.waiting_destinations();
        skip.extend(lock(&self.foreign).iter().cloned());
        // Hosts at their cap: their webhooks are not read, so they cannot fill the read.
        let full_hosts: Vec<String> = lock(&self.in_flight)
            .by_host
            .iter()
            .filter(|(_, &count)| count >= WEBHOOKS_PER_HOST)
            .map(|(host, _)| host.clone())
            .collect();
        let at = self.engine.now();
        let candidates = self
            .engine
            .outbox_candidates(
                at,
                &CandidateQuery {
                    skip: &skip,
                    skip_hosts: &full_hosts,
                    per_queue: WEBHOOKS_PER_HOST as i64,
                    limit: CANDIDATES,
                },
            )
            .await?;
        let foreign_before = lock(&self.foreign).len();
        let chosen = self.choose(candidates);
        if chosen.is_empty() {
            // The read was filled by destinations this process cannot serve: now that they
            // are left out, read again at once instead of at the next poll.
            if lock(&self.foreign).len() > foreign_before {
                return Box::pin(self.step()).await;
            }
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

    /// Delivers everything due now (as far as pacing allows) and returns once those
    /// deliveries have finished and been recorded: the step tests and operators drive.
    /// Returns how many messages were delivered or given up on.
    pub async fn deliver_due(self: &Arc<Self>) -> EngineResult<usize> {
        let mut handled = 0;
        loop {
            let claimed = self.step().await?;
            self.until_idle().await;
            if claimed == 0 {
                return Ok(handled);
            }
            handled += claimed;
        }
    }

    /// Returns once no delivery is in flight.
    async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if lock(&self.in_flight).ids.is_empty() {
                return;
            }
            idle.await;
        }
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
                if candidate.kind == OutboxKind::Webhook {
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
                // Left for a replica that runs this destination's channel: claiming it
                // here could only fail it.
                if !self.channels.delivers_to(&candidate.destination) {
                    lock(&self.foreign).insert(candidate.destination);
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
            if let Some(next) =
                turns.take_turn(queue.iter().map(|candidate| candidate.agent.as_str()))
            {
                chosen.push(queue[next].id);
            }
        }
        chosen
    }

    /// Counts the message in flight and delivers it in a task of its own.
    fn start(self: &Arc<Self>, message: OutboxMessage) {
        let host = is_webhook(&message).then(|| receiver_host(&message.destination));
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
            let idle = {
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
                in_flight.ids.is_empty()
            };
            worker.freed.notify_one();
            if idle {
                worker.idle.notify_waiters();
            }
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
            let until = self.engine.now() + to_chrono(self.lease);
            if let Err(error) = self.engine.renew_outbox_leases(&ids, until).await {
                // The next tick tries again; a lease is three ticks long.
                tracing::warn!(%error, count = ids.len(), "renewing outbox leases failed");
            }
        }
    }

    async fn finish(&self, message: &OutboxMessage, outcome: OutboxOutcome) {
        if let OutboxOutcome::Retry { error, .. } | OutboxOutcome::Abandon { error } = &outcome {
            let destination_kind = if is_webhook(message) {
                "webhook".to_string()
            } else {
                Destination::parse(&message.destination)
                    .map_or("unknown".to_string(), |d| d.platform().to_string())
            };
            metrics::counter!(telemetry::DELIVERY_FAILURES, "destination" => destination_kind)
                .increment(1);
            tracing::warn!(outbox_id = message.id, kind = %message.kind, destination = %message.destination, %error, "delivery failed");
        }
        // Reconcile after, rather than record before: a chat platform gives a card's
        // reference only once it is posted, and has no idempotency key, so nothing could be
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
        let kind = message.kind;
        if kind == OutboxKind::Webhook {
            return match send_webhook(&self.engine, &self.http, message).await {
                OutboxOutcome::Delivered(_) => OutboxOutcome::Delivered(DeliveryRecord {
                    chat_message: None,
                    audit: Some(self.delivered_event(message, OutboxKind::Webhook)),
                }),
                other => other,
            };
        }
        let channel = Destination::parse(&message.destination).and_then(|destination| {
            let channel = self.channels.for_destination(&destination)?.clone();
            Some((destination, channel))
        });
        let Some((destination, channel)) = channel else {
            return OutboxOutcome::Abandon {
                error: format!(
                    "no channel on this server delivers {} to {}",
                    message.kind, message.destination
                ),
            };
        };
        let posted = match self
            .engine
            .chat_message(&message.request_id, &message.destination)
            .await
        {
            Ok(posted) => posted,
            Err(error) => return self.chat_outcome(message, Err(error.into())),
        };
        let result = match kind {
            OutboxKind::Card => match self.engine.request(&message.request_id).await {
                Ok(request) => channel
                    .sync_card(
                        &CardView::of(&request, &self.engine.policy()),
                        &destination,
                        posted.as_ref(),
                    )
                    .await
                    .map(|sync| match sync {
                        CardSync::Posted { reference } => DeliveryRecord {
                            chat_message: Some(reference),
                            audit: Some(self.delivered_event(message, OutboxKind::Card)),
                        },
                        CardSync::Updated => DeliveryRecord::default(),
                    }),
                Err(error) => Err(error.into()),
            },
            OutboxKind::Reminder => {
                // A reminder goes in the card's thread: it waits until the card is posted.
                let Some(posted) = posted else {
                    return self.chat_outcome(
                        message,
                        Err(ChannelError::Retry {
                            reason: "the card is not posted yet".into(),
                            after: None,
                        }),
                    );
                };
                let reminder: Reminder =
                    serde_json::from_value(message.payload.clone()).unwrap_or_default();
                channel
                    .post_reminder(&reminder, &destination, &posted)
                    .await
                    .map(|()| DeliveryRecord::default())
            }
            // Sent above; a webhook never reaches a chat channel.
            OutboxKind::Webhook => Err(ChannelError::Permanent("not a chat message".into())),
        };
        self.chat_outcome(message, result)
    }

    /// What a chat delivery's result means for its outbox message.
    fn chat_outcome(
        &self,
        message: &OutboxMessage,
        result: Result<DeliveryRecord, ChannelError>,
    ) -> OutboxOutcome {
        let now = self.engine.now();
        match result {
            Ok(record) => OutboxOutcome::Delivered(record),
            Err(ChannelError::Permanent(error)) => OutboxOutcome::Abandon { error },
            Err(ChannelError::Retry { reason, after }) => OutboxOutcome::Retry {
                at: retry_at(now, message.attempts, CARD_MAX_BACKOFF, after),
                error: reason,
            },
        }
    }

    /// The audit event for a card's first post or a webhook's delivery.
    fn delivered_event(&self, message: &OutboxMessage, kind: OutboxKind) -> NewAuditEvent {
        NewAuditEvent {
            at: self.engine.now(),
            request_id: Some(message.request_id.clone()),
            kind: AuditKind::Delivered,
            actor: "system:delivery".into(),
            payload: serde_json::json!({"kind": kind.as_str(), "destination": message.destination}),
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

fn is_webhook(message: &OutboxMessage) -> bool {
    message.kind == OutboxKind::Webhook
}

/// The maps and counters behind these locks hold no invariant a panic could break halfway.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Exponential backoff with jitter from 1 s, capped; never sooner than Retry-After.
pub(super) fn retry_at(
    now: DateTime<Utc>,
    attempts: i32,
    cap: Duration,
    retry_after: Option<Duration>,
) -> DateTime<Utc> {
    let exponent = attempts.clamp(0, 20) as u32;
    let backoff = Duration::from_secs(1u64 << exponent).min(cap);
    let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
    let wait = retry_after.map_or(jittered, |after| after.max(jittered));
    now + to_chrono(wait)
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_respects_retry_after() {
        let now = crate::domain::now();
        let soon = retry_at(now, 0, CARD_MAX_BACKOFF, None) - now;
        assert!(soon <= chrono::Duration::seconds(1));
        let capped = retry_at(now, 30, CARD_MAX_BACKOFF, None) - now;
        assert!(
            capped <= chrono::Duration::seconds(300) && capped >= chrono::Duration::seconds(149)
        );
        let told = retry_at(now, 0, CARD_MAX_BACKOFF, Some(Duration::from_secs(30))) - now;
        assert!(told >= chrono::Duration::seconds(29));
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
