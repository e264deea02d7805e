//! The Teams click acknowledgement: a signed `adaptiveCard/action` invoke (Approve) on a
//! fresh pending request until the HTTP answer carrying the card, beside the Slack approve
//! click in the same run, and the token verification alone, for its share.

use std::time::Instant;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;
use signoff::channels::teams::auth::TokenVerifier;
use signoff::config::{Secret, TeamsConfig};

use crate::fake_teams;
use crate::harness::{settle_disk, Database, Harness};
use crate::latency::histogram;
use crate::Args;

const CONVERSATION: &str = "19:bench@thread.tacv2";
const APPROVER: &str = "00000000-0000-0000-0000-00000000bec4";

const TEAMS_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0BENCH"]
    approvers: ["slack:U0BENCH", "cli:bench"]
    ttl: 1h
  teams:
    route: ["teams:19:bench@thread.tacv2"]
    approvers: ["teams:00000000-0000-0000-0000-00000000bec4"]
    ttl: 1h
rules:
  - name: email
    match: ["email.send"]
    effect: require_approval
    tier: medium
  - name: deploy
    match: ["deploy.*"]
    effect: require_approval
    tier: teams
"#;

pub struct TeamsAck {
    pub teams: Histogram<u64>,
    pub slack: Histogram<u64>,
    pub verify: Histogram<u64>,
}

pub async fn measure(
    args: &Args,
    database: &Database,
    directory: &std::path::Path,
    samples: usize,
) -> anyhow::Result<TeamsAck> {
    let bot_framework = fake_teams::start().await?;
    let service_url = format!("{bot_framework}/teams/");
    let policy = directory.join("bench-teams-policy.yaml");
    std::fs::write(&policy, TEAMS_POLICY)?;
    let teams_config = TeamsConfig {
        app_id: fake_teams::APP_ID.into(),
        app_password: Secret::new("bench-secret"),
        tenant_id: String::new(),
        openid_metadata_url: format!("{bot_framework}/openid"),
        token_url: format!("{bot_framework}/{{tenant}}/token"),
        default_service_url: service_url.clone(),
        allowed_service_urls: vec![service_url.clone()],
    };
    let harness = Harness::start_configured(args, database, directory, false, |config| {
        config.policy = policy.clone();
        config.teams = Some(teams_config.clone());
    })
    .await?;
    // The Bot Framework reuses a token for many activities: signed once, outside the timing.
    let token = fake_teams::token(&service_url)?;
    let slack = harness.slack_ack_latency(samples).await?;
    let teams = teams_ack_latency(&harness, &token, &service_url, samples).await?;
    harness.stop().await;

    let verifier = TokenVerifier::new(
        reqwest::Client::new(),
        &format!("{bot_framework}/openid"),
        fake_teams::APP_ID,
    );
    let now = chrono::Utc::now();
    let bearer = format!("Bearer {token}");
    // The first call fetches the keys; what is timed is the cached path every click takes.
    verifier
        .verify(Some(&bearer), fake_teams::CHANNEL_ID, &service_url, now)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut verify = histogram();
    for _ in 0..samples.max(1) * 5 {
        let started = Instant::now();
        verifier
            .verify(Some(&bearer), fake_teams::CHANNEL_ID, &service_url, now)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        let _ = verify.record(started.elapsed().as_micros() as u64);
    }
    Ok(TeamsAck {
        teams,
        slack,
        verify,
    })
}

async fn teams_ack_latency(
    harness: &Harness,
    token: &str,
    service_url: &str,
    samples: usize,
) -> anyhow::Result<Histogram<u64>> {
    settle_disk();
    let mut histogram = histogram();
    for _ in 0..samples {
        let request = harness
            .submit(&json!({"action": "deploy.api", "args": {"version": 7}}))
            .await?;
        let id = request["id"].as_str().unwrap_or_default();
        let activity = json!({
            "type": "invoke", "name": "adaptiveCard/action", "id": "bench-invoke",
            "channelId": fake_teams::CHANNEL_ID, "serviceUrl": service_url,
            "from": {"id": format!("29:{APPROVER}"), "aadObjectId": APPROVER},
            "conversation": {"id": CONVERSATION},
            "value": {"action": {"type": "Action.Execute", "verb": "approve",
                                 "data": {"request_id": id, "revision": 1}}},
        });
        let started = Instant::now();
        let response = harness
            .http
            .post(format!("{}/teams/messages", harness.base_url))
            .bearer_auth(token)
            .json(&activity)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        let elapsed = started.elapsed();
        if !status.is_success() {
            bail!("invoke answered {status}");
        }
        if !String::from_utf8_lossy(&body).contains("Approved") {
            bail!("invoke answer does not show the approval");
        }
        let _ = histogram.record(elapsed.as_micros() as u64);
    }
    Ok(histogram)
}
