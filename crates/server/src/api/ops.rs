//! Health, metrics and the API's own documentation page.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;

/// Read models further behind the core than this many commands make the server not ready.
pub const PROJECTION_LAG_READY_MAX: u64 = 100_000;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(prometheus))
}

/// The process answers.
#[derive(Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    pub status: &'static str,
}

/// Whether the server can take work, per component.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ok` when every component is.
    pub status: &'static str,
    /// Per component: `ok`, or what is wrong.
    pub components: Components,
}

/// Component states.
#[derive(Serialize, ToSchema)]
pub struct Components {
    /// The database answers.
    pub store: String,
    /// The sequencer takes commands.
    pub sequencer: String,
    /// The read models follow the journal.
    pub projections: String,
    /// The job queue's tables answer.
    pub queue: String,
}

#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process is up", body = Live)))]
async fn live() -> Json<Live> {
    Json(Live { status: "ok" })
}

#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Every component is ready", body = Ready),
        (status = 503, description = "A component is not ready", body = Ready),
    ))]
async fn ready(State(app): State<Arc<App>>) -> Response {
    let store = match app.store.user_count().await {
        Ok(_) => "ok".to_string(),
        Err(error) => format!("failing: {error}"),
    };
    let sequencer = match app.sequencer.stopped() {
        None => "ok".to_string(),
        Some(reason) => format!("stopped: {reason}"),
    };
    let (projected, acked) = app.positions();
    let lag = acked.saturating_sub(projected);
    let projections = if lag <= PROJECTION_LAG_READY_MAX {
        "ok".to_string()
    } else {
        format!("{lag} commands behind")
    };
    let queue = match app.queue.queues().await {
        Ok(_) => "ok".to_string(),
        Err(error) => format!("failing: {error}"),
    };
    let all_ok = [&store, &sequencer, &projections, &queue]
        .iter()
        .all(|s| s.as_str() == "ok");
    let body = Ready {
        status: if all_ok { "ok" } else { "unavailable" },
        components: Components {
            store,
            sequencer,
            projections,
            queue,
        },
    };
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
async fn prometheus(State(app): State<Arc<App>>) -> Response {
    // Queue depths are gauges read from the tables at scrape time.
    if let Err(error) = app.queue.record_depth().await {
        tracing::warn!(%error, "reading queue depths for /metrics failed");
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// A page listing every operation of the OpenAPI document, rendered here so that it works
/// without loading anything from elsewhere.
pub fn docs_page(openapi: &utoipa::openapi::OpenApi) -> String {
    let mut rows = String::new();
    for (path, item) in &openapi.paths.paths {
        let operations = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation {
                let summary = operation
                    .summary
                    .clone()
                    .or_else(|| operation.description.clone())
                    .unwrap_or_default();
                rows.push_str(&format!(
                    "<tr><td><code>{method}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                    escape(path),
                    escape(&summary)
                ));
            }
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Agora API</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 12px;vertical-align:top}}</style>\
         </head><body><h1>Agora API {}</h1><p>The machine-readable document is \
         <a href=\"/api/v1/openapi.json\">/api/v1/openapi.json</a> (OpenAPI 3.1).</p>\
         <table>{rows}</table></body></html>",
        escape(&openapi.info.version)
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
