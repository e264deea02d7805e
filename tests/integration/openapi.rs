//! GET /openapi.json: the document and the router agree both ways, and real answers validate
//! against the schemas the document gives for them.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::{json, Value};

use crate::spawn_app;
use crate::support::{backends, error_code, Backend, TestApp};

/// The methods probed on every documented path; HEAD and OPTIONS follow GET and CORS rules.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The router's source; compiled in, so changing the routes rebuilds and reruns this test.
const ROUTER_SOURCE: &str = include_str!("../../src/http/mod.rs");

#[apply(backends)]
#[tokio::test]
async fn the_document_and_the_router_agree(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let doc = fetch_document(&app).await;
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let documented = documented_operations(&doc);

    // Every route the router declares is documented, but the document itself.
    let routed = routes_in_router_source();
    assert!(
        routed
            .iter()
            .filter(|(_, path)| path.starts_with("/v1/"))
            .count()
            >= 6,
        "found too few /v1 routes in src/http/mod.rs: {routed:?}; has the router changed shape?"
    );
    let undocumented: Vec<_> = routed
        .iter()
        .filter(|(_, path)| path != "/openapi.json")
        .filter(|operation| !documented.contains(*operation))
        .collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in /openapi.json: {undocumented:?}"
    );

    for (method, path) in &documented {
        let operation = &doc["paths"][path][method];
        let response = app
            .http
            .request(http_method(method), app.url(&concrete(path)))
            .send()
            .await
            .unwrap();
        let status = response.status();
        if path.starts_with("/v1/") || path.starts_with("/admin/") {
            // Routed and guarded: without a key the answer is 401, never 404 or 405.
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(
                response.headers()["www-authenticate"],
                "Bearer",
                "{method} {path}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(error_code(&body), "unauthorized");
            validate_response(&doc, method, path, status, &body);
            assert_eq!(
                operation["security"],
                json!([{"bearer": []}]),
                "{method} {path} must name the bearer scheme"
            );
        } else if path == "/metrics" {
            // Prometheus text, not JSON.
            assert_eq!(status, StatusCode::OK, "{method} {path}");
            assert!(response.text().await.unwrap().contains("# TYPE"));
            assert!(operation.get("security").is_none(), "{method} {path}");
        } else {
            assert_eq!(status, StatusCode::OK, "{method} {path}");
            let body: Value = response.json().await.unwrap();
            validate_response(&doc, method, path, status, &body);
            assert!(operation.get("security").is_none(), "{method} {path}");
        }
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no responses"
        );
    }

    // No method the document leaves out is served on a documented path.
    let paths: BTreeSet<&String> = documented.iter().map(|(_, path)| path).collect();
    for path in paths {
        for method in METHODS {
            if documented.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let response = app
                .http
                .request(http_method(method), app.url(&concrete(path)))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is served but not documented"
            );
        }
    }

    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");

    let idempotency_key = parameter(&doc, "post", "/v1/requests", "Idempotency-Key");
    assert_eq!(idempotency_key["in"], "header");
    assert_eq!(idempotency_key["required"], false);
    let wait = parameter(&doc, "get", "/v1/requests/{id}", "wait");
    assert_eq!(wait["in"], "query");
    assert_eq!(wait["schema"]["type"], "number");
    assert_eq!(
        parameter(&doc, "get", "/v1/requests/{id}", "id")["in"],
        "path"
    );

    let mut dangling = Vec::new();
    find_dangling_refs(&doc, &doc, &mut dangling);
    assert!(dangling.is_empty(), "unresolved $refs: {dangling:?}");
}

#[apply(backends)]
#[tokio::test]
async fn real_answers_match_their_schemas(#[case] backend: Backend) {
    let app = spawn_app!(backend);
    let doc = fetch_document(&app).await;
    let agent = app.create_agent("finance-bot", &[]).await;
    let request_schema = &doc["paths"]["/v1/requests"]["post"]["responses"]["201"]["content"]
        ["application/json"]["schema"];

    // Pending, with every context field and a person on whose behalf the agent acts.
    let (status, pending) = app
        .submit(
            &agent,
            json!({
                "action": "payments.refund",
                "args": {"amount": 2000, "order": "A-1"},
                "context": {"summary": "refund", "reason": "damaged", "reversible": false,
                            "links": ["https://example.com/o/1"]},
                "on_behalf_of": "slack:U0XYZ"
            }),
        )
        .await;
    validate_response(&doc, "post", "/v1/requests", status, &pending);
    assert_eq!(keys(&pending), required(&doc, request_schema));
    let pending_id = pending["id"].as_str().unwrap().to_string();

    // A vote fills `votes`.
    app.approve(&pending_id, "cli:alice").await.unwrap();
    let (status, voted) = app.get_request(&agent, &pending_id, None).await;
    assert_eq!(voted["votes"].as_array().map(Vec::len), Some(1));
    validate_response(&doc, "get", "/v1/requests/{id}", status, &voted);
    assert_eq!(keys(&voted), required(&doc, request_schema));

    // Cancelled: a decision by the agent.
    let (status, cancelled) = app
        .post_json(
            &agent,
            &format!("/v1/requests/{pending_id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    validate_response(&doc, "post", "/v1/requests/{id}/cancel", status, &cancelled);
    assert_eq!(keys(&cancelled), required(&doc, request_schema));

    // Allowed by policy, then executed: `decision` and `executed` filled.
    let allowed = app
        .submit_ok(&agent, json!({"action": "users.get", "args": {"id": 7}}))
        .await;
    assert_eq!(keys(&allowed), required(&doc, request_schema));
    let (status, executed) = app
        .post_json(
            &agent,
            &format!("/v1/requests/{}/execution", allowed["id"].as_str().unwrap()),
            json!({"outcome": "succeeded", "detail": {"refund_id": "re_1"}}),
        )
        .await;
    assert!(executed["executed"].is_object(), "{executed}");
    validate_response(
        &doc,
        "post",
        "/v1/requests/{id}/execution",
        status,
        &executed,
    );
    assert_eq!(keys(&executed), required(&doc, request_schema));

    // Denied by policy, with a reason.
    let (status, denied) = app.submit(&agent, json!({"action": "db.drop_users"})).await;
    assert_eq!(denied["status"], "denied");
    validate_response(&doc, "post", "/v1/requests", status, &denied);

    // `callback_url` is the one optional property: present only when given.
    let (status, with_callback) = app
        .submit(
            &agent,
            json!({"action": "email.send", "callback_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    validate_response(&doc, "post", "/v1/requests", status, &with_callback);
    let mut expected = required(&doc, request_schema);
    expected.insert("callback_url".into());
    assert_eq!(keys(&with_callback), expected);

    let (status, listed) = read(
        app.http
            .get(app.url("/v1/requests"))
            .bearer_auth(&agent.key),
    )
    .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(4));
    validate_response(&doc, "get", "/v1/requests", status, &listed);

    let (status, checked) = app
        .post_json(
            &agent,
            "/v1/check",
            json!({"action": "payments.refund", "args": {"amount": 2000}}),
        )
        .await;
    assert_eq!(checked["verdict"], "require_approval");
    validate_response(&doc, "post", "/v1/check", status, &checked);

    // Errors have the documented body under the documented status.
    let (status, missing) = app.get_request(&agent, "apr_unknown", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    validate_response(&doc, "get", "/v1/requests/{id}", status, &missing);
    let (status, bad_wait) = read(
        app.http
            .get(app.url(&format!("/v1/requests/{pending_id}?wait=soon")))
            .bearer_auth(&agent.key),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    validate_response(&doc, "get", "/v1/requests/{id}", status, &bad_wait);
    let (status, not_pending) = app
        .post_json(
            &agent,
            &format!("/v1/requests/{pending_id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    validate_response(
        &doc,
        "post",
        "/v1/requests/{id}/cancel",
        status,
        &not_pending,
    );
    let (status, mismatch) = {
        app.submit_with_key(&agent, json!({"action": "users.get"}), Some("k1"))
            .await;
        app.submit_with_key(&agent, json!({"action": "users.list"}), Some("k1"))
            .await
    };
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    validate_response(&doc, "post", "/v1/requests", status, &mismatch);

    let (status, ready) = read(app.http.get(app.url("/readyz"))).await;
    validate_response(&doc, "get", "/readyz", status, &ready);
}

async fn fetch_document(app: &TestApp) -> Value {
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    response.json().await.unwrap()
}

async fn read(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn http_method(method: &str) -> Method {
    Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap()
}

/// (method, path) of every operation, methods in lower case as OpenAPI writes them.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if METHODS.contains(&method.as_str()) {
                operations.insert((method.clone(), path.clone()));
            }
        }
    }
    operations
}

/// (method, path) of every `.route("path", get(..).post(..))` in src/http/mod.rs. axum cannot
/// list a router's routes, so the source is the only place to read them from.
fn routes_in_router_source() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut rest = ROUTER_SOURCE;
    while let Some(start) = rest.find(".route(") {
        let call = &rest[start + ".route(".len()..];
        let mut depth = 1;
        let end = call
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(index, _)| index)
            .expect("a .route( call closes");
        let arguments = &call[..end];
        let path = arguments.split('"').nth(1).expect("a route path literal");
        for method in METHODS {
            let needle = format!("{method}(");
            let mut from = 0;
            while let Some(found) = arguments[from..].find(&needle) {
                let at = from + found;
                // `get(` as a method router, not the tail of a name like `target(`.
                let standalone = arguments[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                if standalone {
                    routes.insert((method.to_string(), path.to_string()));
                }
                from = at + needle.len();
            }
        }
        rest = &call[end..];
    }
    routes
}

/// A documented path with every `{param}` filled in with a plausible id.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "apr_0000000000000000000000000a"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn parameter<'a>(doc: &'a Value, method: &str, path: &str, name: &str) -> &'a Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|parameters| parameters.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("{method} {path} documents no parameter {name}"))
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect()
}

fn required(doc: &Value, schema: &Value) -> BTreeSet<String> {
    let schema = merged(doc, schema);
    schema["required"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .map(|name| name.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Validates `body` against the schema documented for `status` of `method path`; the status
/// itself must be documented.
fn validate_response(doc: &Value, method: &str, path: &str, status: StatusCode, body: &Value) {
    let response = &doc["paths"][path][method]["responses"][status.as_str()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which it does not document: {body}"
    );
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    let mut problems = Vec::new();
    validate(doc, schema, body, "$", &mut problems);
    assert!(
        problems.is_empty(),
        "{method} {path} {status} does not match its schema:\n  {}\nbody: {body}",
        problems.join("\n  ")
    );
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local $ref");
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("unresolved $ref {reference}"));
            resolve(doc, target)
        }
        None => schema,
    }
}

/// The schema with its `$ref` followed and its `allOf` parts folded into one object schema.
fn merged(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    let Some(parts) = schema["allOf"].as_array() else {
        return schema.clone();
    };
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for part in parts {
        let part = merged(doc, part);
        if let Some(more) = part["properties"].as_object() {
            properties.extend(more.clone());
        }
        if let Some(more) = part["required"].as_array() {
            required.extend(more.iter().cloned());
        }
    }
    json!({"type": "object", "properties": properties, "required": required})
}

/// A small JSON Schema check for what utoipa emits: `$ref`, `allOf`, `oneOf`, `type` (one or
/// several), `enum`, `format: date-time`, `minimum`, `required`, `properties` and `items`.
/// Stricter than JSON Schema in one way: an object may only hold documented properties.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = merged(doc, schema);
    if let Some(branches) = schema["oneOf"].as_array() {
        let matching = branches
            .iter()
            .filter(|branch| {
                let mut branch_problems = Vec::new();
                validate(doc, branch, value, at, &mut branch_problems);
                branch_problems.is_empty()
            })
            .count();
        if matching != 1 {
            problems.push(format!("{at}: {value} matches {matching} oneOf branches"));
        }
        return;
    }
    if let Some(types) = match &schema["type"] {
        Value::String(one) => Some(vec![one.as_str()]),
        Value::Array(several) => Some(several.iter().filter_map(Value::as_str).collect()),
        _ => None,
    } {
        let fits = types.iter().any(|kind| match *kind {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            problems.push(format!("{at}: {value} is not of type {types:?}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some("date-time"), Some(text)) = (schema["format"].as_str(), value.as_str()) {
        if chrono::DateTime::parse_from_rfc3339(text).is_err() {
            problems.push(format!("{at}: {text:?} is not an RFC 3339 date-time"));
        }
    }
    if let (Some(minimum), Some(number)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if number < minimum {
            problems.push(format!("{at}: {number} is below the minimum {minimum}"));
        }
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                problems.push(format!("{at}: required property {name:?} is missing"));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, item) in object {
                match properties.get(name) {
                    Some(property) => {
                        validate(doc, property, item, &format!("{at}.{name}"), problems)
                    }
                    None => problems.push(format!("{at}: property {name:?} is not documented")),
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{index}]"), problems);
        }
    }
}

fn find_dangling_refs(doc: &Value, node: &Value, dangling: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                let found = reference
                    .strip_prefix('#')
                    .and_then(|pointer| doc.pointer(pointer));
                if found.is_none() {
                    dangling.push(reference.to_string());
                }
            }
            for child in map.values() {
                find_dangling_refs(doc, child, dangling);
            }
        }
        Value::Array(items) => {
            for child in items {
                find_dangling_refs(doc, child, dangling);
            }
        }
        _ => {}
    }
}
