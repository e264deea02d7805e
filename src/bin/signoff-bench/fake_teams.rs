//! A minimal stand-in for the Bot Framework (OpenID metadata, a JWKS with endorsements, the
//! token endpoint, the connector), and the signing key the bench's tokens use: the
//! throwaway test key under tests/support/teams_keys, never a real one.

use axum::extract::Request;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const APP_ID: &str = "bench-teams-app";
pub const KEY_ID: &str = "bench-key";
pub const CHANNEL_ID: &str = "msteams";
const PRIVATE_KEY: &[u8] = include_bytes!("../../../tests/support/teams_keys/first.pem");
const PUBLIC_KEYS: &str = include_str!("../../../tests/support/teams_keys/public.json");

/// Starts the fake on a free loopback port; returns its base URL (`http://127.0.0.1:PORT`).
pub async fn start() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let jwks_uri = format!("{base}/keys");
    let app = Router::new().fallback(move |request: Request| {
        let jwks_uri = jwks_uri.clone();
        async move { answer(request.uri().path(), &jwks_uri) }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(base)
}

fn answer(path: &str, jwks_uri: &str) -> Json<Value> {
    Json(match path {
        "/openid" => json!({"jwks_uri": jwks_uri}),
        "/keys" => {
            let public: Value = serde_json::from_str(PUBLIC_KEYS).unwrap_or_default();
            json!({"keys": [{"kty": "RSA", "kid": KEY_ID, "n": public["first"]["n"],
                             "e": public["first"]["e"], "endorsements": [CHANNEL_ID]}]})
        }
        path if path.ends_with("/token") => {
            json!({"access_token": "bench-bot-token", "expires_in": 3600})
        }
        _ => json!({"id": "bench-activity"}),
    })
}

/// A Bot Framework token for activities from `service_url`, valid for an hour.
pub fn token(service_url: &str) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KEY_ID.into());
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "https://api.botframework.com", "aud": APP_ID,
                        "exp": now + 3600, "nbf": now - 60, "serviceurl": service_url});
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(PRIVATE_KEY)?,
    )?)
}
