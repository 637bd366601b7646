//! The HTTP surface: one router, its layers in one place, and the OpenAPI document that is
//! generated from the handlers' own annotations (a route without one is not registered).
//!
//! One layer, [`front`], takes every request through these steps, in order: request id and
//! access log, HTTP metrics, admission by priority class (`crate::admission`: the lowest
//! classes are shed first, with 503 `OVERLOADED`, as the requests in flight near
//! `limits.requests_in_flight_max`), the request timeout (503 `TIMEOUT`), authentication,
//! which puts a [`Caller`] into the request when it carries valid credentials and refuses it
//! with 401 when it carries invalid ones, the rate limits per address and per user (429
//! `RATE_LIMITED`), then idempotency keys (`crate::idempotency`). The body limit is the one
//! other layer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body as HttpBody;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::app::{App, now_ms};
use crate::auth::{Caller, KEY_HEADER, Method, Role, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::error::{ApiError, too_large};

mod account;
mod admin;
mod market;
mod ops;
mod orders;

pub use account::balances_of;
pub use market::find_market;
pub use orders::{recovered_placement, ws_command};
mod queue;
mod withdrawals;

/// Shared state of the handlers.
pub type AppState = State<Arc<App>>;

/// The request id header, taken from the request or generated.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Agora",
        description = "Peer-to-peer exchange and settlement server. Amounts, prices and quantities are decimal strings.",
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&Security),
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                KEY_HEADER,
                "An API key id; the request also carries x-agora-timestamp and x-agora-signature (HMAC-SHA256 over timestamp, method, path and body)",
            ))),
        );
    }
}

/// The routes and their OpenAPI document.
pub fn routes() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(ops::routes())
        .merge(account::routes())
        .merge(market::routes())
        .merge(orders::routes())
        .merge(admin::routes())
        .merge(queue::routes())
        .merge(withdrawals::routes())
        .routes(utoipa_axum::routes!(crate::ws::upgrade))
        .split_for_parts()
}

/// The whole application with its layers.
pub fn router(app: Arc<App>) -> Router {
    let (routes, mut openapi) = routes();
    openapi.info.version = env!("CARGO_PKG_VERSION").into();
    let openapi = Arc::new(openapi);
    let limits = app.config.limits.clone();
    let doc = openapi.clone();
    routes
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json((*doc).clone()) }
            }),
        )
        .route(
            "/api/v1/docs",
            axum::routing::get(move || {
                let page = ops::docs_page(&openapi);
                async move { axum::response::Html(page) }
            }),
        )
        .fallback(|| async { ApiError::not_found("NOT_FOUND", "no such route") })
        .layer(DefaultBodyLimit::max(limits.body_bytes_max))
        .layer(middleware::from_fn_with_state(app.clone(), front))
        .with_state(app)
}

/// Every step a request takes before its handler, in order, as one layer: each layer of a
/// router clones a boxed service and boxes a future once more per request, and as seven
/// layers these steps cost the REST benchmark 15% to 25% more server CPU per request.
async fn front(State(app): AppState, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = request.method().clone();
    if let Ok(value) = HeaderValue::from_str(&id) {
        request.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let response = match crate::admission::admit(&app, &request) {
        Err(refused) => refused.into_response(),
        Ok(_admitted) => {
            let timeout = Duration::from_millis(app.config.limits.request_timeout_ms);
            tokio::time::timeout(timeout, guarded(&app, request, next))
                .await
                .unwrap_or_else(|_| {
                    ApiError::unavailable("TIMEOUT", "the request took too long").into_response()
                })
        }
    };
    let mut response = plain_errors_as_json(response).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    app.http_metrics.record(route, &method, status, elapsed);
    tracing::info!(
        request_id = %id,
        %method,
        route,
        status,
        micros = elapsed.as_micros() as u64,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Series of the HTTP metrics kept with their handles.
pub const HTTP_METRIC_SERIES_MAX: usize = 1_024;

/// The handles of `agora_http_requests_total` and `agora_http_request_duration_seconds` by
/// route, method and status, so that a request neither builds its labels nor looks them up
/// in the registry each time. Methods outside the standard ones are counted as `other`, so
/// a client cannot add series by making methods up.
#[derive(Default)]
pub struct HttpMetrics {
    series: std::sync::Mutex<HttpSeries>,
}

#[derive(Default)]
struct HttpSeries {
    by_route: std::collections::HashMap<String, Vec<(&'static str, u16, HttpHandles)>>,
    count: usize,
}

#[derive(Clone)]
struct HttpHandles {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

impl HttpMetrics {
    fn record(&self, route: &str, method: &axum::http::Method, status: u16, elapsed: Duration) {
        let method = method_label(method);
        let handles = {
            let mut series = self.series.lock().expect("HTTP metrics lock");
            let known = series.by_route.get(route).and_then(|known| {
                known
                    .iter()
                    .find(|(m, s, _)| *m == method && *s == status)
                    .map(|(_, _, handles)| handles.clone())
            });
            match known {
                Some(handles) => handles,
                None => {
                    let labels = [
                        ("route", route.to_string()),
                        ("method", method.to_string()),
                        ("status", status.to_string()),
                    ];
                    let handles = HttpHandles {
                        requests: metrics::counter!("agora_http_requests_total", &labels),
                        duration: metrics::histogram!(
                            "agora_http_request_duration_seconds",
                            &labels
                        ),
                    };
                    if series.count < HTTP_METRIC_SERIES_MAX {
                        series.count += 1;
                        series.by_route.entry(route.to_string()).or_default().push((
                            method,
                            status,
                            handles.clone(),
                        ));
                    }
                    handles
                }
            }
        };
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
    }
}

/// A request method as a metric label.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// The steps inside the admission and the timeout: authentication, the rate limits,
/// idempotency, then the handler.
async fn guarded(app: &Arc<App>, request: Request, next: Next) -> Response {
    let request = match authenticate(app, request).await {
        Ok(request) => request,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = crate::limit::check_request(app, &request) {
        return refused.into_response();
    }
    crate::idempotency::idempotency(app, request, next)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The request's own id when it sends a usable one, else a new one.
fn request_id(request: &Request) -> String {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_string)
}

/// A process-wide counter from a random start: unique within the process, different after a
/// restart, and without a system call per request. Request ids only tie log lines together;
/// nothing relies on them being secret.
fn new_request_id() -> String {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        std::sync::atomic::AtomicU64::new(u64::from_le_bytes(crate::auth::random_bytes::<8>()))
    });
    format!(
        "{:016x}",
        next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The framework's own refusals (a path or query parameter that does not parse, a method
/// the route does not have) come as plain text or empty; they get the API's error body too.
async fn plain_errors_as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (code, message) = match status {
        axum::http::StatusCode::METHOD_NOT_ALLOWED => (
            "METHOD_NOT_ALLOWED",
            "this route does not take this method".to_string(),
        ),
        _ if text.is_empty() => ("BAD_REQUEST", "the request was refused".to_string()),
        _ => ("INVALID_PARAMETER", text),
    };
    ApiError::new(status, code, message).into_response()
}

/// Puts the caller into the request: a session token, or a signed request (whose body is
/// read here to check the signature, then handed on unchanged). A request without
/// credentials goes on as it came; one with invalid credentials is refused with 401.
async fn authenticate(app: &App, mut request: Request) -> Result<Request, ApiError> {
    // Everything needed from the headers is copied out first: the request is not shared
    // across the awaits below.
    let credentials = match credentials(request.headers())? {
        None => return Ok(request),
        Some(Credentials::Session(token)) => {
            let caller = app.auth.verify_token(&token)?;
            request.extensions_mut().insert(caller);
            return Ok(request);
        }
        Some(Credentials::Signed(signed)) => signed,
    };
    let (key_id, timestamp, signature) = credentials;
    let key = app
        .store
        .api_key(&key_id)
        .await?
        .filter(|key| !key.revoked)
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
    let user = app
        .store
        .user_by_id(key.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the API key's user is gone"))?;
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, app.config.limits.body_bytes_max)
        .await
        .map_err(|_| too_large())?;
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    app.auth.verify_signature(
        &key.secret,
        &timestamp,
        &signature,
        parts.method.as_str(),
        &path,
        &bytes,
        now_ms(),
    )?;
    let mut request = Request::from_parts(parts, HttpBody::from(bytes));
    request.extensions_mut().insert(Caller {
        user: key.user_id,
        role: Role::parse(&user.role).unwrap_or(Role::User),
        method: Method::ApiKey,
    });
    Ok(request)
}

/// What a request presents.
enum Credentials {
    /// A session token.
    Session(String),
    /// Key id, timestamp and signature.
    Signed((String, String, String)),
}

fn credentials(headers: &axum::http::HeaderMap) -> Result<Option<Credentials>, ApiError> {
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .map_err(|_| ApiError::unauthorized(format!("the {name} header is not text")))
            })
            .transpose()
    };
    if let Some(value) = text(header::AUTHORIZATION.as_str())? {
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <token>"))?;
        return Ok(Some(Credentials::Session(token.trim().to_string())));
    }
    let Some(key_id) = text(KEY_HEADER)? else {
        return Ok(None);
    };
    let required = |name: &str| {
        text(name)?.ok_or_else(|| ApiError::unauthorized(format!("a signed request needs {name}")))
    };
    Ok(Some(Credentials::Signed((
        key_id,
        required(TIMESTAMP_HEADER)?,
        required(SIGNATURE_HEADER)?,
    ))))
}

/// A JSON answer with a status.
pub fn created<T: serde::Serialize>(value: T) -> Response {
    (axum::http::StatusCode::CREATED, axum::Json(value)).into_response()
}
