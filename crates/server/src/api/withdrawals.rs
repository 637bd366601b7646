//! Withdrawals: a user asks for funds to leave to a destination (an account or an address),
//! which holds them; an admin completes the withdrawal once paid out (the held funds leave the
//! ledger) or cancels it (they return). The user may cancel a withdrawal still pending.
//!
//! Every change is a journaled command; the listings read the `withdrawals` read model, after
//! waiting until it includes every command acknowledged so far. Another user's withdrawal is
//! answered as unknown (404).

use std::collections::HashMap;
use std::sync::Arc;

use agora_core::CoreCommand;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use store::{WITHDRAWAL_STATUSES, WithdrawalFilter, WithdrawalRow};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::asset_by_symbol;
use super::created;
use super::market::page_limit;
use crate::app::App;
use crate::auth::{Caller, Role};
use crate::error::{ApiError, Body, ErrorBody};
use crate::wire::{self, from_units};

/// Longest destination, in bytes (what the journal keeps).
pub const DESTINATION_BYTES_MAX: usize = agora_core::limits::DESTINATION_BYTES_MAX;
/// Withdrawals a listing returns when it names no limit.
pub const WITHDRAWALS_PAGE_DEFAULT: usize = 100;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(request, list_own))
        .routes(routes!(get_own, cancel_own))
        .routes(routes!(list_all))
        .routes(routes!(complete))
        .routes(routes!(cancel))
}

/// A request to withdraw funds.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWithdrawal {
    /// Asset symbol.
    pub asset: String,
    /// Amount, a decimal string with at most the asset's decimal places.
    pub amount: String,
    /// Where the funds go: an account or an address, 1 to 256 bytes of printable text.
    #[schema(min_length = 1, max_length = 256)]
    pub destination: String,
}

/// A withdrawal as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct WithdrawalView {
    /// Withdrawal id.
    pub id: u64,
    /// Owner.
    pub user_id: u64,
    /// Asset symbol.
    pub asset: String,
    /// Amount, a decimal string.
    pub amount: String,
    /// Where the funds go.
    pub destination: String,
    /// `pending` (funds held), `completed` (paid out) or `cancelled` (funds returned).
    pub status: String,
    /// Journal sequence number of the request.
    pub requested_seq: u64,
    /// Journal sequence number of the last change.
    pub updated_seq: u64,
}

/// Symbol and decimals of every asset, by id.
async fn assets(app: &App) -> Result<HashMap<u32, (String, u32)>, ApiError> {
    app.read(|state| {
        state
            .ledger()
            .assets()
            .map(|(id, a)| (id, (a.symbol.clone(), a.decimals)))
            .collect()
    })
    .await
}

fn view(row: &WithdrawalRow, assets: &HashMap<u32, (String, u32)>) -> WithdrawalView {
    let (asset, decimals) = assets
        .get(&row.asset)
        .cloned()
        .unwrap_or_else(|| (row.asset.to_string(), 0));
    WithdrawalView {
        id: row.id,
        user_id: row.user,
        asset,
        amount: from_units(row.amount, decimals),
        destination: row.destination.clone(),
        status: row.status.into(),
        requested_seq: row.requested_seq,
        updated_seq: row.updated_seq,
    }
}

fn destination(text: &str) -> Result<String, ApiError> {
    let text = text.trim();
    if text.is_empty() || text.len() > DESTINATION_BYTES_MAX || text.chars().any(|c| c.is_control())
    {
        return Err(ApiError::invalid(
            "INVALID_DESTINATION",
            "destination",
            format!(
                "destination must be 1 to {DESTINATION_BYTES_MAX} bytes of text without control characters"
            ),
        ));
    }
    Ok(text.to_string())
}

#[utoipa::path(post, path = "/api/v1/withdrawals", tag = "withdrawals",
    summary = "Ask to withdraw funds (they are held until an admin completes or cancels it)",
    security(("session" = []), ("api_key" = [])),
    request_body = NewWithdrawal,
    responses(
        (status = 201, description = "Requested and durable; the amount is held", body = WithdrawalView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 409, description = "The idempotency key was used for another request, or is in flight", body = ErrorBody),
        (status = 422, description = "A field breaks its rule, or the funds are not available", body = ErrorBody),
    ))]
async fn request(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewWithdrawal>,
) -> Result<Response, ApiError> {
    let destination = destination(&new.destination)?;
    let (asset, decimals) = asset_by_symbol(&app, &new.asset, "asset").await?;
    let amount = wire::amount("amount", &new.amount, decimals)?;
    if amount == 0 {
        return Err(ApiError::invalid(
            "INVALID_AMOUNT",
            "amount",
            "amount must be positive",
        ));
    }
    let id = app.next_withdrawal_id();
    let ack = app
        .submit(CoreCommand::RequestWithdrawal {
            id,
            user: caller.user,
            asset,
            amount,
            destination: destination.clone(),
        })
        .await?;
    Ok(created(WithdrawalView {
        id,
        user_id: caller.user,
        asset: new.asset,
        amount: from_units(amount, decimals),
        destination,
        status: "pending".into(),
        requested_seq: ack.seq,
        updated_seq: ack.seq,
    }))
}

/// Filters of a listing.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `pending`, `completed` or `cancelled`.
    pub status: Option<String>,
    /// Only ids below this one: the next page after the last id of the previous one.
    pub before_id: Option<u64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// Filters of the admins' listing.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AdminListQuery {
    /// Only this user's.
    pub user_id: Option<u64>,
    /// `pending`, `completed` or `cancelled`.
    pub status: Option<String>,
    /// Only ids below this one: the next page after the last id of the previous one.
    pub before_id: Option<u64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

fn status_filter(status: Option<&str>) -> Result<Option<&'static str>, ApiError> {
    status
        .map(|status| {
            WITHDRAWAL_STATUSES
                .iter()
                .copied()
                .find(|s| *s == status)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "INVALID_FIELD",
                        "status",
                        "status must be pending, completed or cancelled",
                    )
                })
        })
        .transpose()
}

async fn listing(
    app: &App,
    filter: WithdrawalFilter<'_>,
    limit: usize,
) -> Result<Json<Vec<WithdrawalView>>, ApiError> {
    app.caught_up().await?;
    let rows = app.store.withdrawals(&filter, limit).await?;
    let assets = assets(app).await?;
    Ok(Json(rows.iter().map(|row| view(row, &assets)).collect()))
}

#[utoipa::path(get, path = "/api/v1/withdrawals", tag = "withdrawals",
    summary = "The caller's withdrawals, newest first",
    security(("session" = []), ("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Withdrawals", body = Vec<WithdrawalView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn list_own(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<WithdrawalView>>, ApiError> {
    let limit = page_limit(query.limit, WITHDRAWALS_PAGE_DEFAULT)?;
    let filter = WithdrawalFilter {
        user: Some(caller.user),
        status: status_filter(query.status.as_deref())?,
        before_id: query.before_id,
    };
    listing(&app, filter, limit).await
}

/// The withdrawal `id` as of every acknowledged command, when `caller` owns it.
async fn own(app: &App, caller: &Caller, id: u64) -> Result<WithdrawalRow, ApiError> {
    let row = any(app, id).await?;
    if row.user != caller.user {
        return Err(unknown());
    }
    Ok(row)
}

/// The withdrawal `id` as of every acknowledged command, whoever owns it.
async fn any(app: &App, id: u64) -> Result<WithdrawalRow, ApiError> {
    app.caught_up().await?;
    app.store.withdrawal(id).await?.ok_or_else(unknown)
}

fn unknown() -> ApiError {
    ApiError::not_found("UNKNOWN_WITHDRAWAL", "no such withdrawal")
}

fn not_pending(status: &str) -> ApiError {
    ApiError::conflict(
        "WITHDRAWAL_NOT_PENDING",
        format!("the withdrawal is {status}, not pending"),
    )
}

#[utoipa::path(get, path = "/api/v1/withdrawals/{id}", tag = "withdrawals",
    summary = "One of the caller's withdrawals",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Withdrawal id")),
    responses(
        (status = 200, description = "The withdrawal", body = WithdrawalView),
        (status = 400, description = "The id is not a withdrawal id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such withdrawal of the caller's", body = ErrorBody),
    ))]
async fn get_own(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<WithdrawalView>, ApiError> {
    let row = own(&app, &caller, id).await?;
    Ok(Json(view(&row, &assets(&app).await?)))
}

/// Ends a pending withdrawal: `complete` pays it out, otherwise it is cancelled.
async fn finish(
    app: &App,
    row: WithdrawalRow,
    complete: bool,
) -> Result<Json<WithdrawalView>, ApiError> {
    let _busy = app.in_flight.object("withdrawal", row.id)?;
    if row.status != "pending" {
        return Err(not_pending(row.status));
    }
    let command = if complete {
        CoreCommand::CompleteWithdrawal { id: row.id }
    } else {
        CoreCommand::CancelWithdrawal { id: row.id }
    };
    // A command that ended it may have been acknowledged after the row was read.
    let ack = app.submit(command).await.map_err(|e| match e.code {
        "UNKNOWN_WITHDRAWAL" => ApiError::conflict(
            "WITHDRAWAL_NOT_PENDING",
            "the withdrawal was completed or cancelled meanwhile",
        ),
        _ => e,
    })?;
    let row = WithdrawalRow {
        status: if complete { "completed" } else { "cancelled" },
        updated_seq: ack.seq,
        ..row
    };
    Ok(Json(view(&row, &assets(app).await?)))
}

#[utoipa::path(delete, path = "/api/v1/withdrawals/{id}", tag = "withdrawals",
    summary = "Cancel one of the caller's pending withdrawals (the funds return)",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Withdrawal id")),
    responses(
        (status = 200, description = "Cancelled and durable", body = WithdrawalView),
        (status = 400, description = "The id is not a withdrawal id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such withdrawal of the caller's", body = ErrorBody),
        (status = 409, description = "Not pending, or another command on it is running", body = ErrorBody),
    ))]
async fn cancel_own(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<WithdrawalView>, ApiError> {
    let row = own(&app, &caller, id).await?;
    finish(&app, row, false).await
}

#[utoipa::path(get, path = "/api/v1/admin/withdrawals", tag = "admin",
    summary = "Every user's withdrawals, newest first",
    security(("session" = []), ("api_key" = [])),
    params(AdminListQuery),
    responses(
        (status = 200, description = "Withdrawals", body = Vec<WithdrawalView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn list_all(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<AdminListQuery>,
) -> Result<Json<Vec<WithdrawalView>>, ApiError> {
    caller.require(Role::Admin)?;
    let limit = page_limit(query.limit, WITHDRAWALS_PAGE_DEFAULT)?;
    let filter = WithdrawalFilter {
        user: query.user_id,
        status: status_filter(query.status.as_deref())?,
        before_id: query.before_id,
    };
    listing(&app, filter, limit).await
}

#[utoipa::path(post, path = "/api/v1/admin/withdrawals/{id}/complete", tag = "admin",
    summary = "Record that a pending withdrawal was paid out (the held funds leave the ledger)",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Withdrawal id")),
    responses(
        (status = 200, description = "Completed and durable", body = WithdrawalView),
        (status = 400, description = "The id is not a withdrawal id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such withdrawal", body = ErrorBody),
        (status = 409, description = "Not pending, or another command on it is running", body = ErrorBody),
    ))]
async fn complete(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<WithdrawalView>, ApiError> {
    caller.require(Role::Admin)?;
    let row = any(&app, id).await?;
    finish(&app, row, true).await
}

#[utoipa::path(post, path = "/api/v1/admin/withdrawals/{id}/cancel", tag = "admin",
    summary = "Cancel a pending withdrawal (the held funds return to the user)",
    security(("session" = []), ("api_key" = [])),
    params(("id" = u64, Path, description = "Withdrawal id")),
    responses(
        (status = 200, description = "Cancelled and durable", body = WithdrawalView),
        (status = 400, description = "The id is not a withdrawal id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such withdrawal", body = ErrorBody),
        (status = 409, description = "Not pending, or another command on it is running", body = ErrorBody),
    ))]
async fn cancel(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<WithdrawalView>, ApiError> {
    caller.require(Role::Admin)?;
    let row = any(&app, id).await?;
    finish(&app, row, false).await
}
