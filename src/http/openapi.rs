//! The OpenAPI 3.1 document of the agent API and health routes, served at `GET /openapi.json`.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDocument;
use utoipa::{Modify, OpenApi};

use super::{admin, agent_api, health};

/// Every route of `router()` but `/openapi.json` itself and the channels' callbacks (signed
/// by Slack or Teams, not called by agents); tests/integration/openapi.rs holds the two to
/// each other.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "signoff",
        description = "Approval gateway for AI agents. Every `/v1` call needs \
            `Authorization: Bearer <api key>`; errors are `{\"error\":{\"code\",\"message\"}}`."
    ),
    paths(
        agent_api::submit_request,
        agent_api::list_requests,
        agent_api::get_request,
        agent_api::cancel_request,
        agent_api::record_execution,
        agent_api::check_policy,
        agent_api::list_grants,
        health::healthz,
        health::readyz,
        health::metrics,
        admin::reload_policy,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "requests", description = "Approval requests"),
        (name = "policy", description = "Policy evaluation"),
        (name = "grants", description = "Standing grants"),
        (name = "health", description = "Liveness and readiness"),
        (name = "admin", description = "Operator endpoints (admin_token)"),
    ),
)]
pub struct ApiDoc;

/// The `bearer` scheme the /v1 operations name; the derive has no syntax for declaring it.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDocument) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An agent's API key, `sk_…`, from `signoff agents add`",
                    ))
                    .build(),
            ),
        );
    }
}

pub async fn openapi_json() -> Json<OpenApiDocument> {
    Json(ApiDoc::openapi())
}
