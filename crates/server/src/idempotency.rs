//! Idempotency keys and conflict detection, the two steps every command takes between
//! validation and the sequencer.
//!
//! A mutating request may carry `Idempotency-Key` (a placement may name `client_order_id`
//! instead). The key is scoped to the caller. The first request with a key is recorded,
//! durably, before its command is sequenced; its answer is stored when it has one. The same
//! key with the same request (method, path and body) gets the stored answer again, marked
//! `idempotent-replayed: true`; with another request it gets 409
//! `IDEMPOTENCY_KEY_REUSED`; while the first is still running, 409 `IDEMPOTENCY_KEY_IN_FLIGHT`.
//! A 5xx answer is not kept: the request may be retried with the same key.
//! Order commands over the WebSocket take the same step through [`keyed`], as the request
//! their REST twin would be.
//!
//! A placement's order id is chosen before the key is recorded and kept with it, so a
//! placement interrupted by a crash is settled on retry: if the journal holds the order the
//! retry answers with it, otherwise the placement runs (with the same id). Any other command
//! interrupted by a crash between its journal commit and the stored answer cannot be told
//! apart from one never made; its retry gets 409 `IDEMPOTENCY_KEY_UNRESOLVED`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Body as HttpBody;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use store::IdempotencyBegin;

use crate::app::{App, now_ms};
use crate::auth::Caller;
use crate::error::{ApiError, too_large};

/// The request header.
pub const KEY_HEADER: &str = "idempotency-key";
/// The header marking a stored answer given again.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key.
pub const KEY_CHARS_MAX: usize = 128;
/// Expired keys deleted per sweep.
pub const PURGE_ROWS_MAX: usize = 10_000;

/// The order id a keyed placement must use, put into the request for its handler.
#[derive(Clone, Copy, Debug)]
pub struct ChosenOrderId(pub u64);

/// Requests in flight, by (user, key), and objects with a command in flight.
#[derive(Default)]
pub struct InFlight {
    keys: Mutex<HashSet<(u64, String)>>,
    objects: Mutex<HashSet<(&'static str, u64)>>,
}

/// Holds an entry of [`InFlight`] until dropped.
pub struct Busy<'a> {
    set: &'a InFlight,
    key: Option<(u64, String)>,
    object: Option<(&'static str, u64)>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.set.keys.lock().expect("in-flight lock").remove(&key);
        }
        if let Some(object) = self.object.take() {
            self.set
                .objects
                .lock()
                .expect("in-flight lock")
                .remove(&object);
        }
    }
}

impl InFlight {
    /// Marks an object (`"order"`, id) as having a command in flight; 409 when another
    /// command on it is still running (a cancel and a modify of one order, say).
    pub fn object(&self, kind: &'static str, id: u64) -> Result<Busy<'_>, ApiError> {
        if !self
            .objects
            .lock()
            .expect("in-flight lock")
            .insert((kind, id))
        {
            let mut busy = ApiError::conflict(
                "CONFLICTING_COMMAND",
                format!(
                    "another command on this {kind} is still running; retry when it is answered"
                ),
            );
            busy.retry_after_s = Some(1);
            return Err(busy);
        }
        Ok(Busy {
            set: self,
            key: None,
            object: Some((kind, id)),
        })
    }

    fn key(&self, user: u64, key: &str) -> Result<Busy<'_>, ApiError> {
        let entry = (user, key.to_string());
        if !self
            .keys
            .lock()
            .expect("in-flight lock")
            .insert(entry.clone())
        {
            return Err(ApiError::conflict(
                "IDEMPOTENCY_KEY_IN_FLIGHT",
                "a request with this idempotency key is still running",
            ));
        }
        Ok(Busy {
            set: self,
            key: Some(entry),
            object: None,
        })
    }
}

fn is_placement(request: &Request) -> bool {
    request.method() == Method::POST && request.uri().path() == "/api/v1/orders"
}

/// A key a client sent (in `field`), when it is 1 to [`KEY_CHARS_MAX`] printable characters.
pub(crate) fn checked_key(key: &str, field: &str) -> Result<String, ApiError> {
    if !key.is_empty() && key.len() <= KEY_CHARS_MAX && key.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(key.to_string());
    }
    Err(ApiError::invalid(
        "INVALID_IDEMPOTENCY_KEY",
        field,
        format!("{field} must be 1 to {KEY_CHARS_MAX} printable characters"),
    ))
}

/// The key a placement body without an explicit one carries: its client order id, if any.
pub(crate) fn placement_key(body: &[u8]) -> Result<Option<String>, ApiError> {
    Ok(client_order_id(body)?.map(|id| format!("client-order-id:{id}")))
}

/// The step between authentication and the handlers: a mutating request with a key (the
/// header, or a placement's client order id) runs under [`keyed`]; any other goes on.
pub async fn idempotency(
    app: &Arc<App>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let Some(caller) = request.extensions().get::<Caller>().copied() else {
        return Ok(next.run(request).await);
    };
    if !mutating {
        return Ok(next.run(request).await);
    }
    let header = match request.headers().get(KEY_HEADER) {
        None => None,
        Some(value) => Some(checked_key(value.to_str().unwrap_or_default(), KEY_HEADER)?),
    };
    let placement = is_placement(&request);
    // Without a key, only a placement's body can carry one (its client order id); any other
    // request goes on without its body being read here.
    if header.is_none() && !placement {
        return Ok(next.run(request).await);
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, app.config.limits.body_bytes_max)
        .await
        .map_err(|_| too_large())?;
    // A placement without the header may name a client order id, which then is its key.
    let key = match header {
        Some(key) => Some(key),
        None => placement_key(&bytes)?,
    };
    let Some(key) = key else {
        return Ok(next
            .run(Request::from_parts(parts, HttpBody::from(bytes)))
            .await);
    };
    let method = parts.method.clone();
    // The query is part of the request: `DELETE /orders?market=…` names its market there.
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |target| target.to_string());
    let body = bytes.clone();
    let run = move |chosen: Option<ChosenOrderId>| {
        let mut request = Request::from_parts(parts, HttpBody::from(bytes));
        if let Some(chosen) = chosen {
            request.extensions_mut().insert(chosen);
        }
        next.run(request)
    };
    keyed(app, caller, key, (method, target, body), placement, run).await
}

/// Runs the command `run` under `key`, the same for a request over HTTP and a command over
/// the WebSocket: refused while the key is in flight, the stored answer given again for the
/// same `(method, path and query, body)`, 409 for another; otherwise `run` is called (a
/// placement with the order id kept with the key) and its answer stored.
///
/// The work runs in a task of its own and goes on to its end when the caller stops waiting
/// (a client that disconnects, a request past its timeout): a command already handed to the
/// sequencer then still has its answer stored under the key, and a retry gets that answer
/// instead of running the command again.
pub(crate) async fn keyed<F, Fut>(
    app: &Arc<App>,
    caller: Caller,
    key: String,
    request: (Method, String, axum::body::Bytes),
    placement: bool,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<ChosenOrderId>) -> Fut + Send + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let app = app.clone();
    tokio::spawn(async move { keyed_to_the_end(&app, caller, &key, request, placement, run).await })
        .await
        .map_err(ApiError::internal)?
}

async fn keyed_to_the_end<F, Fut>(
    app: &Arc<App>,
    caller: Caller,
    key: &str,
    (method, path, body): (Method, String, axum::body::Bytes),
    placement: bool,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<ChosenOrderId>) -> Fut,
    Fut: Future<Output = Response>,
{
    let _busy = app.in_flight.key(caller.user, key)?;
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(&body);
    let hash: [u8; 32] = hasher.finalize().into();
    let chosen = placement.then(|| app.next_order_id());
    let now = now_ms();
    let expires = now.saturating_add((app.config.idempotency_ttl_s as i64).saturating_mul(1000));
    let begin = app
        .store
        .idempotency_begin(caller.user, key, &hash, chosen, now, expires)
        .await?;
    let order_id = match begin {
        IdempotencyBegin::Started => chosen,
        IdempotencyBegin::Existing(row) => {
            if row.request_hash != hash {
                return Err(ApiError::conflict(
                    "IDEMPOTENCY_KEY_REUSED",
                    "this idempotency key was used with another request",
                )
                .field(KEY_HEADER));
            }
            if let (Some(status), Some(body)) = (row.status, row.response) {
                return Ok(replayed(status, body));
            }
            // Pending and not running here: the server stopped while it ran.
            let Some(order_id) = row.order_id else {
                return Err(ApiError::conflict(
                    "IDEMPOTENCY_KEY_UNRESOLVED",
                    "the server restarted while this request ran, and whether its command took effect is unknown; check the state, then retry with a new key",
                ));
            };
            if let Some(body) = crate::api::recovered_placement(app, order_id).await? {
                app.store
                    .idempotency_finish(caller.user, key, StatusCode::CREATED.as_u16(), &body)
                    .await?;
                return Ok(replayed(StatusCode::CREATED.as_u16(), body));
            }
            Some(order_id)
        }
    };
    let response = run(order_id.map(ChosenOrderId)).await;
    let status = response.status();
    // A handler's answer is JSON or empty; anything else is the framework refusing the path
    // or the method before a handler ran (rendered as an error body by an outer layer). Those,
    // like server errors and answers that ask for a retry (`Retry-After`: another command on
    // the same order was running), are not kept: the key stays free for the retry.
    let from_handler = status.is_success()
        || response
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let retry = response
        .headers()
        .contains_key(axum::http::header::RETRY_AFTER);
    if status.is_server_error() || !from_handler || retry {
        app.store.idempotency_forget(caller.user, key).await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(ApiError::internal)?;
    app.store
        .idempotency_finish(caller.user, key, status.as_u16(), &body)
        .await?;
    Ok(Response::from_parts(parts, HttpBody::from(body)))
}

fn replayed(status: u16, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    // Kept bodies are JSON, or empty (a 204), which is given again without a content type.
    let mut response = if body.is_empty() {
        status.into_response()
    } else {
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// The `client_order_id` of a placement body, when it has a well-formed one.
fn client_order_id(bytes: &[u8]) -> Result<Option<String>, ApiError> {
    // Most placements name none: they are not parsed twice to find that out.
    const FIELD: &[u8] = b"client_order_id";
    if !bytes.windows(FIELD.len()).any(|w| w == FIELD) {
        return Ok(None);
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(bytes)
    else {
        // The handler reports a malformed body.
        return Ok(None);
    };
    match map.get("client_order_id") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(id))
            if !id.is_empty()
                && id.len() <= KEY_CHARS_MAX
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(ApiError::invalid(
            "INVALID_FIELD",
            "client_order_id",
            format!("client_order_id must be 1 to {KEY_CHARS_MAX} printable characters"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_command_on_a_busy_object_is_refused_until_the_first_ends() {
        let in_flight = InFlight::default();
        let cancel = in_flight.object("order", 7).unwrap();
        let modify = in_flight.object("order", 7).map(|_| ()).unwrap_err();
        assert_eq!(
            (modify.status, modify.code),
            (StatusCode::CONFLICT, "CONFLICTING_COMMAND")
        );
        // Another order, or the same id of another kind, is not in the way.
        let _other = in_flight.object("order", 8).unwrap();
        let _withdrawal = in_flight.object("withdrawal", 7).unwrap();
        drop(cancel);
        assert!(in_flight.object("order", 7).is_ok());
    }

    #[test]
    fn a_key_in_flight_is_refused_until_its_request_ends() {
        let in_flight = InFlight::default();
        let first = in_flight.key(1, "k").unwrap();
        let again = in_flight.key(1, "k").map(|_| ()).unwrap_err();
        assert_eq!(again.code, "IDEMPOTENCY_KEY_IN_FLIGHT");
        assert!(in_flight.key(2, "k").is_ok(), "keys are per user");
        drop(first);
        assert!(in_flight.key(1, "k").is_ok());
    }

    #[test]
    fn client_order_ids_are_checked() {
        assert_eq!(
            client_order_id(br#"{"client_order_id":"a-1"}"#)
                .unwrap()
                .as_deref(),
            Some("a-1")
        );
        assert_eq!(client_order_id(br#"{"qty":"1"}"#).unwrap(), None);
        assert_eq!(client_order_id(b"not json").unwrap(), None);
        for bad in [
            r#"{"client_order_id":""}"#,
            r#"{"client_order_id":5}"#,
            r#"{"client_order_id":"a b"}"#,
        ] {
            assert_eq!(
                client_order_id(bad.as_bytes())
                    .unwrap_err()
                    .field
                    .as_deref(),
                Some("client_order_id")
            );
        }
    }
}
