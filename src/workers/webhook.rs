//! Webhooks to agents: Standard Webhooks signatures, one attempt, and what its result means
//! for the outbox message (delivered, retry with backoff, or give up).

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::delivery::retry_at;
use crate::callbacks::{self, CallbackRefused};
use crate::engine::Engine;
use crate::store::{OutboxMessage, OutboxOutcome};

const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhooks are retried at least 24 h (README: webhooks); give up after three days.
const WEBHOOK_GIVE_UP: chrono::Duration = chrono::Duration::days(3);
const WEBHOOK_MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Sends the webhook `message` once. `http` is the client whose resolver refuses what
/// callbacks may not reach (`CallbackGuard::webhook_client`).
///
/// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
/// HMAC-SHA256(secret, id.timestamp.body)>`. The id is stable across retries.
pub(super) async fn send_webhook(
    engine: &Engine,
    http: &reqwest::Client,
    message: &OutboxMessage,
) -> OutboxOutcome {
    let now = engine.now();
    // The URL passed at submission, but the config may have changed since.
    if let Err(refused) = engine
        .callback_guard()
        .check_before_connect(&message.destination)
    {
        return refused_webhook(message, &refused);
    }
    let secret = match engine.webhook_secret(&message.request_id).await {
        Ok(secret) => secret,
        Err(error) => {
            return OutboxOutcome::Retry {
                at: retry_at(now, message.attempts, WEBHOOK_MAX_BACKOFF, None),
                error: error.to_string(),
            }
        }
    };
    let body = serde_json::to_vec(&message.payload).unwrap_or_default();
    // Stable across retries, unique across databases (the request id is random).
    let id = format!("msg_{}_{}", message.request_id, message.id);
    // The receiver checks this against its own clock: always the real time.
    let timestamp = Utc::now().timestamp();
    let signature = match sign_webhook(&secret, &id, timestamp, &body) {
        Ok(signature) => signature,
        Err(error) => return OutboxOutcome::Abandon { error },
    };
    let sent = http
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
            return OutboxOutcome::Delivered(Default::default());
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
    give_up_or_retry(message, now, failure)
}

fn give_up_or_retry(message: &OutboxMessage, now: DateTime<Utc>, failure: String) -> OutboxOutcome {
    if message.created_at + WEBHOOK_GIVE_UP < now {
        return OutboxOutcome::Abandon {
            error: format!(
                "{failure}; gave up after {} days",
                WEBHOOK_GIVE_UP.num_days()
            ),
        };
    }
    OutboxOutcome::Retry {
        at: retry_at(now, message.attempts, WEBHOOK_MAX_BACKOFF, None),
        error: failure,
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
}
