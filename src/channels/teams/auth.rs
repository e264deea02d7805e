//! Verifying the Bot Framework's bearer tokens on inbound activities: RS256 over a key from
//! the JWKS the OpenID metadata names (both cached; an unknown key id refetches the set at
//! most once a minute, and the new set replaces the old), issuer, audience, validity with
//! five minutes of skew, the key's endorsements and the token's `serviceurl`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Who signs the tokens the Bot Framework sends to bots.
pub const ISSUER: &str = "https://api.botframework.com";
/// Allowed difference between our clock and the token's `exp` / `nbf`.
const CLOCK_SKEW_SECONDS: i64 = 300;
/// An unknown key id refetches the key set only if the last fetch is at least this old, so
/// tokens with made-up key ids cannot make us hammer the key endpoint.
const REFETCH_AFTER: chrono::Duration = chrono::Duration::seconds(60);
/// Keys are fetched again after this even when every key id is known (rotation without
/// new key ids).
const KEYS_LIFETIME: chrono::Duration = chrono::Duration::hours(24);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was refused. Every kind is answered with 401 and nothing changes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("no key with id {0:?} in the Bot Framework's key set")]
    UnknownKey(String),
    #[error("the signing key is not endorsed for channel {0:?}")]
    NotEndorsed(String),
    #[error("the token's serviceurl does not match the activity's")]
    ServiceUrlMismatch,
    #[error("the token is expired or not yet valid")]
    Expired,
    #[error("the Bot Framework's keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

/// A key of the JWKS as the Bot Framework publishes it: the stock JWK types drop
/// `endorsements`, the channels a key may sign for.
#[derive(Debug, Deserialize)]
struct Jwk {
    #[serde(default)]
    kid: String,
    #[serde(default)]
    kty: String,
    #[serde(default)]
    n: String,
    #[serde(default)]
    e: String,
    #[serde(default)]
    endorsements: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct OpenIdMetadata {
    jwks_uri: String,
}

/// The claims signoff reads; issuer and audience are checked by the decoder.
#[derive(Debug, Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    serviceurl: Option<String>,
}

struct VerifyingKey {
    key: DecodingKey,
    endorsements: Vec<String>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<VerifyingKey>>,
    fetched_at: Option<DateTime<Utc>>,
}

/// Verifies inbound tokens for one bot (`app_id`).
pub struct TokenVerifier {
    http: reqwest::Client,
    openid_metadata_url: String,
    validation: Validation,
    keys: ArcSwap<KeySet>,
    jwks_uri: tokio::sync::OnceCell<String>,
    /// One fetch at a time; those who waited find the new set.
    fetching: tokio::sync::Mutex<()>,
}

impl TokenVerifier {
    pub fn new(http: reqwest::Client, openid_metadata_url: &str, app_id: &str) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[app_id]);
        // Validity is checked against the engine's clock below, with our own skew.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp", "iss", "aud"]
            .into_iter()
            .map(String::from)
            .collect();
        Self {
            http,
            openid_metadata_url: openid_metadata_url.to_string(),
            validation,
            keys: ArcSwap::from_pointee(KeySet::default()),
            jwks_uri: tokio::sync::OnceCell::new(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Checks `authorization` (the header's value) for an activity of `channel_id` from
    /// `service_url`, at `now`.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        channel_id: &str,
        service_url: &str,
        now: DateTime<Utc>,
    ) -> Result<(), AuthError> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| AuthError::Invalid(error.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Invalid("not RS256".into()));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("no key id".into()))?;
        let key = self.key(&kid, now).await?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation)
            .map_err(|error| AuthError::Invalid(error.to_string()))?
            .claims;
        let now_seconds = now.timestamp();
        if claims.exp + CLOCK_SKEW_SECONDS < now_seconds
            || claims
                .nbf
                .is_some_and(|nbf| nbf - CLOCK_SKEW_SECONDS > now_seconds)
        {
            return Err(AuthError::Expired);
        }
        if !key
            .endorsements
            .iter()
            .any(|endorsement| endorsement == channel_id)
        {
            return Err(AuthError::NotEndorsed(channel_id.to_string()));
        }
        if claims.serviceurl.as_deref() != Some(service_url) {
            return Err(AuthError::ServiceUrlMismatch);
        }
        Ok(())
    }

    /// The key `kid`, fetching the key set when it is unknown (at most once a minute) or
    /// the set is old.
    async fn key(&self, kid: &str, now: DateTime<Utc>) -> Result<Arc<VerifyingKey>, AuthError> {
        let stale = |set: &KeySet| {
            set.fetched_at
                .is_none_or(|fetched| now - fetched >= KEYS_LIFETIME)
        };
        let may_refetch = |set: &KeySet| {
            set.fetched_at
                .is_none_or(|fetched| now - fetched >= REFETCH_AFTER)
        };
        {
            let set = self.keys.load();
            if let Some(key) = set.keys.get(kid).filter(|_| !stale(&set)) {
                return Ok(key.clone());
            }
            if !may_refetch(&set) {
                return Err(AuthError::UnknownKey(kid.to_string()));
            }
        }
        let _fetching = self.fetching.lock().await;
        // Someone else may have fetched while we waited.
        let set = self.keys.load_full();
        let set = if may_refetch(&set) && (stale(&set) || !set.keys.contains_key(kid)) {
            match self.fetch(now).await {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    self.keys.store(fresh.clone());
                    fresh
                }
                // Keys merely due for a refresh still verify while the endpoint is down.
                Err(error) if set.keys.contains_key(kid) => {
                    tracing::warn!(%error, "refreshing the Bot Framework's keys failed; using the cached ones");
                    set
                }
                Err(error) => return Err(error),
            }
        } else {
            set
        };
        set.keys
            .get(kid)
            .cloned()
            .ok_or_else(|| AuthError::UnknownKey(kid.to_string()))
    }

    async fn fetch(&self, now: DateTime<Utc>) -> Result<KeySet, AuthError> {
        let jwks_uri = self
            .jwks_uri
            .get_or_try_init(|| async {
                let metadata: OpenIdMetadata = self.get_json(&self.openid_metadata_url).await?;
                crate::config::check_outbound_url(&metadata.jwks_uri)
                    .map_err(AuthError::KeysUnavailable)?;
                Ok::<_, AuthError>(metadata.jwks_uri)
            })
            .await?;
        let set: JwkSet = self.get_json(jwks_uri).await?;
        let keys = set
            .keys
            .into_iter()
            .filter(|jwk| jwk.kty == "RSA" && !jwk.kid.is_empty())
            .filter_map(|jwk| {
                let key = DecodingKey::from_rsa_components(&jwk.n, &jwk.e).ok()?;
                Some((
                    jwk.kid,
                    Arc::new(VerifyingKey {
                        key,
                        endorsements: jwk.endorsements,
                    }),
                ))
            })
            .collect();
        tracing::info!("fetched the Bot Framework's signing keys");
        Ok(KeySet {
            keys,
            fetched_at: Some(now),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, AuthError> {
        let unavailable = |error: reqwest::Error| AuthError::KeysUnavailable(error.to_string());
        self.http
            .get(url)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}
