//! A minimal stand-in for the Bot Framework (OpenID metadata, a JWKS with endorsements, the
//! token endpoint, the connector), and the signing key the bench's tokens use: made at
//! start-up for this run only, never stored.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const APP_ID: &str = "bench-teams-app";
pub const KEY_ID: &str = "bench-key";
pub const CHANNEL_ID: &str = "msteams";

/// The run's signing key and its JWK parts (`n`, `e`, base64url).
struct SigningKey {
    key: EncodingKey,
    modulus: String,
    exponent: String,
}

fn signing_key() -> anyhow::Result<&'static SigningKey> {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    if let Some(key) = KEY.get() {
        return Ok(key);
    }
    use base64::Engine as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    use rsa::Generate as _;
    let key = rsa::PrivateKey::generate();
    let der = key.to_pkcs1_der()?;
    let base64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    Ok(KEY.get_or_init(|| SigningKey {
        key: EncodingKey::from_rsa_der(der.as_bytes()),
        modulus: base64.encode(key.n_bytes()),
        exponent: base64.encode(key.e_bytes()),
    }))
}

/// Starts the fake on a free loopback port; returns its base URL (`http://127.0.0.1:PORT`).
pub async fn start() -> anyhow::Result<String> {
    let key = signing_key()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let jwks_uri = format!("{base}/keys");
    let app = Router::new().fallback(move |request: Request| {
        let jwks_uri = jwks_uri.clone();
        async move { answer(request.uri().path(), &jwks_uri, key) }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(base)
}

fn answer(path: &str, jwks_uri: &str, key: &SigningKey) -> Json<Value> {
    Json(match path {
        "/openid" => json!({"jwks_uri": jwks_uri}),
        "/keys" => json!({"keys": [{"kty": "RSA", "kid": KEY_ID, "n": key.modulus,
                                    "e": key.exponent, "endorsements": [CHANNEL_ID]}]}),
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
    Ok(jsonwebtoken::encode(&header, &claims, &signing_key()?.key)?)
}
