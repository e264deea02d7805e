//! A local fake of the Bot Framework: OpenID metadata, a JWKS with endorsements, the token
//! endpoint and the Bot Connector (records every call; can be told to fail with 500 or 429
//! and Retry-After). Also what sends activities to signoff with tokens signed by the
//! tests' own RSA keys, as the Bot Framework would.
//!
//! The signing keys are generated once per test process and never written anywhere; the
//! fake's JWKS publishes their moduli and exponents.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const APP_ID: &str = "00000000-test-app-0000-000000000001";
pub const APP_PASSWORD: &str = "test-bot-secret";
pub const TENANT: &str = "tenant-0001";
pub const CHANNEL: &str = "19:ops@thread.tacv2";
pub const CHANNEL_ID: &str = "msteams";

/// The tests' two signing keys: the one published at start, and the one a rotation brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKey {
    First,
    Second,
}

/// A signing key made for this process: what signs tokens, and the JWK parts (`n`, `e`,
/// base64url) the fake publishes.
struct GeneratedKey {
    signing: EncodingKey,
    modulus: String,
    exponent: String,
}

impl GeneratedKey {
    fn generate() -> Self {
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::traits::PublicKeyParts as _;
        use rsa::Generate as _;
        let key = rsa::PrivateKey::generate();
        let der = key.to_pkcs1_der().expect("encode the test key");
        let base64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Self {
            signing: EncodingKey::from_rsa_der(der.as_bytes()),
            modulus: base64.encode(key.n_bytes()),
            exponent: base64.encode(key.e_bytes()),
        }
    }
}

/// Both test keys, generated side by side on first use.
fn generated_keys() -> &'static [GeneratedKey; 2] {
    static KEYS: OnceLock<[GeneratedKey; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        std::thread::scope(|scope| {
            let second = scope.spawn(GeneratedKey::generate);
            let first = GeneratedKey::generate();
            [first, second.join().expect("generate the second test key")]
        })
    })
}

impl TestKey {
    fn generated(self) -> &'static GeneratedKey {
        let [first, second] = generated_keys();
        match self {
            TestKey::First => first,
            TestKey::Second => second,
        }
    }

    fn signing(self) -> &'static EncodingKey {
        &self.generated().signing
    }

    fn public(self) -> (String, String) {
        let key = self.generated();
        (key.modulus.clone(), key.exponent.clone())
    }
}

/// A published key: its id, which key, the channels it is endorsed for.
#[derive(Clone, Debug)]
pub struct PublishedKey {
    pub kid: String,
    pub key: TestKey,
    pub endorsements: Vec<String>,
}

/// How the next connector call should fail.
#[derive(Clone, Debug)]
pub enum ConnectorFailure {
    ServerError,
    RateLimited { retry_after_seconds: u64 },
}

/// One call the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct Recorded {
    calls: Vec<Call>,
    failed: usize,
    failures: VecDeque<ConnectorFailure>,
    published: Vec<PublishedKey>,
    jwks_fetches: usize,
    token_requests: Vec<HashMap<String, String>>,
    emails: HashMap<String, String>,
}

#[derive(Clone)]
struct FakeState {
    recorded: Arc<Mutex<Recorded>>,
    next_id: Arc<AtomicU64>,
    base: Arc<String>,
}

pub struct FakeTeams {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Whether signoff is configured with `TENANT` as its tenant (the default).
    pub tenant_pinned: bool,
    state: FakeState,
}

impl FakeTeams {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Bot Framework");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let state = FakeState {
            recorded: Arc::new(Mutex::new(Recorded {
                published: vec![PublishedKey {
                    kid: "key-1".into(),
                    key: TestKey::First,
                    endorsements: vec![CHANNEL_ID.into()],
                }],
                ..Recorded::default()
            })),
            next_id: Arc::new(AtomicU64::new(1)),
            base: Arc::new(base.clone()),
        };
        let app = Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake Bot Framework");
        });
        Self {
            base,
            tenant_pinned: true,
            state,
        }
    }

    /// The service URL the fake's connector answers at (allowed in tests).
    pub fn service_url(&self) -> String {
        format!("{}/teams/", self.base)
    }

    pub fn openid_metadata_url(&self) -> String {
        format!("{}/openid", self.base)
    }

    pub fn token_url(&self) -> String {
        format!("{}/{{tenant}}/oauth2/v2.0/token", self.base)
    }

    /// Replaces the published key set (a key rotation).
    pub fn publish(&self, keys: Vec<PublishedKey>) {
        self.state.recorded.lock().unwrap().published = keys;
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.recorded.lock().unwrap().jwks_fetches
    }

    /// The form fields of every token request.
    pub fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.state.recorded.lock().unwrap().token_requests.clone()
    }

    pub fn add_member_email(&self, member: &str, email: &str) {
        self.state
            .recorded
            .lock()
            .unwrap()
            .emails
            .insert(member.into(), email.into());
    }

    pub fn fail_next(&self, failures: Vec<ConnectorFailure>) {
        self.state
            .recorded
            .lock()
            .unwrap()
            .failures
            .extend(failures);
    }

    pub fn failed_calls(&self) -> usize {
        self.state.recorded.lock().unwrap().failed
    }

    /// Successful connector calls (under any service URL), oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.state.recorded.lock().unwrap().calls.clone()
    }

    /// Successful calls of `method` whose path contains `fragment`.
    pub fn calls_to(&self, method: &str, fragment: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|call| call.method == method && call.path.contains(fragment))
            .collect()
    }

    /// Activities posted to `conversation` (cards and replies), oldest first.
    pub fn posted(&self, conversation: &str) -> Vec<Call> {
        self.calls_to(
            "POST",
            &format!("/v3/conversations/{}/activities", encode(conversation)),
        )
    }

    /// Card updates to `conversation`.
    pub fn updated(&self, conversation: &str) -> Vec<Call> {
        self.calls_to(
            "PUT",
            &format!("/v3/conversations/{}/activities/", encode(conversation)),
        )
    }

    /// The card posted or last updated in `conversation` for `request_id`.
    pub fn latest_card(&self, conversation: &str, request_id: &str) -> Option<Value> {
        let prefix = format!("/v3/conversations/{}/activities", encode(conversation));
        self.calls()
            .into_iter()
            .rev()
            .filter(|call| call.path.contains(&prefix) && call.method != "GET")
            .filter_map(|call| {
                call.body["attachments"]
                    .as_array()
                    .and_then(|all| all.first().cloned())
            })
            .map(|attachment| attachment["content"].clone())
            .find(|card| card.to_string().contains(request_id))
    }
}

/// Conversation ids as they appear in the connector's paths.
pub fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn handle(State(state): State<FakeState>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let headers: HeaderMap = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_else(|_| Bytes::new());
    if method == Method::GET && path == "/openid" {
        return Json(json!({"issuer": "https://api.botframework.com", "jwks_uri": format!("{}/keys", state.base)}))
            .into_response();
    }
    if method == Method::GET && path == "/keys" {
        let mut recorded = state.recorded.lock().unwrap();
        recorded.jwks_fetches += 1;
        let keys: Vec<Value> = recorded
            .published
            .iter()
            .map(|published| {
                let (n, e) = published.key.public();
                json!({"kty": "RSA", "use": "sig", "kid": published.kid, "n": n, "e": e,
                       "endorsements": published.endorsements})
            })
            .collect();
        return Json(json!({"keys": keys})).into_response();
    }
    if method == Method::POST && path.ends_with("/oauth2/v2.0/token") {
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        let mut recorded = state.recorded.lock().unwrap();
        recorded.token_requests.push(form);
        let n = recorded.token_requests.len();
        return Json(json!({"token_type": "Bearer", "expires_in": 3600, "access_token": format!("bot-token-{n}")}))
            .into_response();
    }
    let call = Call {
        method: method.to_string(),
        path: path.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut recorded = state.recorded.lock().unwrap();
    if let Some(failure) = recorded.failures.pop_front() {
        recorded.failed += 1;
        return match failure {
            ConnectorFailure::ServerError => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            ConnectorFailure::RateLimited {
                retry_after_seconds,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_seconds.to_string())],
            )
                .into_response(),
        };
    }
    recorded.calls.push(call);
    if method == Method::GET {
        let member = path.rsplit('/').next().unwrap_or_default().to_string();
        let member = url::form_urlencoded::parse(format!("m={member}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        return match recorded.emails.get(&member) {
            Some(email) => Json(json!({"id": member, "email": email, "userPrincipalName": email}))
                .into_response(),
            None => Json(json!({"id": member})).into_response(),
        };
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    Json(json!({"id": format!("activity-{id}")})).into_response()
}

/// What a test changes about a token; the defaults make a valid one.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub kid: String,
    pub key: TestKey,
    pub issuer: String,
    pub audience: String,
    /// Seconds from the app's clock.
    pub expires_in: i64,
    pub not_before_in: i64,
    pub service_url: Option<String>,
}

impl TokenSpec {
    pub fn valid(service_url: &str) -> Self {
        Self {
            kid: "key-1".into(),
            key: TestKey::First,
            issuer: "https://api.botframework.com".into(),
            audience: APP_ID.into(),
            expires_in: 3600,
            not_before_in: -60,
            service_url: Some(service_url.into()),
        }
    }

    pub fn sign(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &self.claims(now), self.key.signing()).expect("sign")
    }
}

/// Tokens an attacker would try, each otherwise like `spec` (same claims).
#[derive(Clone, Copy, Debug)]
pub enum ForgedToken {
    /// `alg: none`, no signature.
    Unsigned,
    /// HS256 keyed with the published public key's modulus (algorithm confusion).
    SymmetricWithThePublicKey,
    /// RS256 and correctly signed, but no `kid` in the header.
    WithoutKeyId,
}

impl TokenSpec {
    fn claims(&self, now: chrono::DateTime<chrono::Utc>) -> Value {
        let mut claims = json!({
            "iss": self.issuer,
            "aud": self.audience,
            "exp": now.timestamp() + self.expires_in,
            "nbf": now.timestamp() + self.not_before_in,
        });
        if let Some(service_url) = &self.service_url {
            claims["serviceurl"] = json!(service_url);
        }
        claims
    }

    pub fn forge(&self, forgery: ForgedToken, now: chrono::DateTime<chrono::Utc>) -> String {
        use base64::Engine as _;
        let base64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = self.claims(now);
        match forgery {
            ForgedToken::Unsigned => {
                let header = json!({"alg": "none", "typ": "JWT", "kid": self.kid});
                format!(
                    "{}.{}.",
                    base64.encode(header.to_string()),
                    base64.encode(claims.to_string())
                )
            }
            ForgedToken::SymmetricWithThePublicKey => {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some(self.kid.clone());
                let (modulus, _) = self.key.public();
                let key = EncodingKey::from_secret(modulus.as_bytes()).expect("HS256 key");
                jsonwebtoken::encode(&header, &claims, &key).expect("sign")
            }
            ForgedToken::WithoutKeyId => {
                let header = Header::new(Algorithm::RS256);
                jsonwebtoken::encode(&header, &claims, self.key.signing()).expect("sign")
            }
        }
    }
}

/// An `adaptiveCard/action` invoke by `user` (an AAD object id) in `conversation`.
pub fn invoke_activity(
    service_url: &str,
    conversation: &str,
    user: &str,
    verb: &str,
    data: Value,
) -> Value {
    json!({
        "type": "invoke",
        "name": "adaptiveCard/action",
        "id": "invoke-1",
        "channelId": CHANNEL_ID,
        "serviceUrl": service_url,
        "from": {"id": format!("29:{user}"), "aadObjectId": user},
        "conversation": {"id": conversation, "tenantId": TENANT},
        "channelData": {"tenant": {"id": TENANT}},
        "value": {"action": {"type": "Action.Execute", "verb": verb, "data": data}},
    })
}

/// A `message` activity: `text` as typed, with the bot's mention in front.
pub fn message_activity(service_url: &str, conversation: &str, user: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": "message-1",
        "channelId": CHANNEL_ID,
        "serviceUrl": service_url,
        "from": {"id": format!("29:{user}"), "aadObjectId": user},
        "conversation": {"id": conversation, "tenantId": TENANT},
        "channelData": {"tenant": {"id": TENANT}},
        "text": format!("<at>signoff</at> {text}"),
    })
}

/// The bot was added to `conversation`, reached at `service_url`.
pub fn conversation_update(service_url: &str, conversation: &str) -> Value {
    json!({
        "type": "conversationUpdate",
        "id": "update-1",
        "channelId": CHANNEL_ID,
        "serviceUrl": service_url,
        "from": {"id": "29:installer", "aadObjectId": "installer"},
        "conversation": {"id": conversation, "tenantId": TENANT},
        "channelData": {"tenant": {"id": TENANT}},
        "membersAdded": [{"id": format!("28:{APP_ID}")}],
    })
}
