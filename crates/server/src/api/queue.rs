//! The job queue over HTTP: queues and their jobs for operators, and the external-worker
//! protocol.

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;

use crate::app::App;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
}
