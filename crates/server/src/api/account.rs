//! Signing in, the caller's own account, API keys and balances.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use ledger::Owner;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::created;
use crate::app::{App, now_ms};
use crate::auth::{self, Caller, Role};
use crate::error::{ApiError, Body, ErrorBody};
use crate::wire::from_units;

/// API keys one user may hold.
pub const API_KEYS_PER_USER_MAX: usize = 20;
/// Longest label of an API key.
pub const API_KEY_LABEL_CHARS_MAX: usize = 64;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(me))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(balances))
}

/// Credentials.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A session.
#[derive(Serialize, ToSchema)]
pub struct Session {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
    /// The signed-in user.
    pub user: UserView,
}

/// A user.
#[derive(Serialize, ToSchema)]
pub struct UserView {
    /// Id.
    pub id: u64,
    /// Name.
    pub username: String,
    /// `user`, `operator` or `admin`.
    pub role: String,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

impl From<store::UserRow> for UserView {
    fn from(row: store::UserRow) -> UserView {
        UserView {
            id: row.id,
            username: row.username,
            role: row.role,
            created_ms: row.created_ms,
        }
    }
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "account", summary = "Sign in with a password",
    request_body = Login,
    responses(
        (status = 200, description = "Signed in", body = Session),
        (status = 401, description = "Wrong name or password", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn login(
    State(app): State<Arc<App>>,
    Body(login): Body<Login>,
) -> Result<Json<Session>, ApiError> {
    if login.username.len() > 64 || login.password.len() > auth::limits::PASSWORD_BYTES_MAX {
        return Err(ApiError::unauthorized("wrong user name or password"));
    }
    let user = app.store.user_by_name(&login.username).await?;
    // An unknown name costs the same hashing as a wrong password, so that timing does not
    // tell which names exist.
    let hash = user
        .as_ref()
        .map_or_else(|| DUMMY_HASH.to_string(), |u| u.password_hash.clone());
    let password = login.password;
    let matches = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password))
        .await
        .map_err(ApiError::internal)?;
    let user = user
        .filter(|_| matches)
        .ok_or_else(|| ApiError::unauthorized("wrong user name or password"))?;
    let role = Role::parse(&user.role).unwrap_or(Role::User);
    let (token, expires_at) = app.auth.issue(user.id, role, (now_ms() / 1000) as u64)?;
    Ok(Json(Session {
        token,
        expires_at,
        user: user.into(),
    }))
}

/// An argon2id hash of a random password nobody knows, verified against when the user name
/// is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3Ysq3k0tGgb2W3BZ1kZQYkq3nQfQ6rHc0mB2qXh7y9E";

#[utoipa::path(get, path = "/api/v1/me", tag = "account", summary = "The signed-in user",
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ))]
async fn me(State(app): State<Arc<App>>, caller: Caller) -> Result<Json<UserView>, ApiError> {
    let user = app
        .store
        .user_by_id(caller.user)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the session's user is gone"))?;
    Ok(Json(user.into()))
}

/// A new API key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// What the key is for.
    #[serde(default)]
    pub label: String,
}

/// An API key as listed (without its secret).
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    /// Send as `x-agora-key`.
    pub key_id: String,
    /// Label.
    pub label: String,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Revoked keys are refused.
    pub revoked: bool,
}

/// A created API key, with its secret, shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    /// Send as `x-agora-key`.
    pub key_id: String,
    /// Signs requests; not shown again.
    pub secret: String,
    /// Label.
    pub label: String,
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "account", summary = "Create an API key for signed requests",
    security(("session" = [])),
    request_body = NewKey,
    responses(
        (status = 201, description = "Created; the secret is in this answer only", body = CreatedKey),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 422, description = "Too many keys or a bad label", body = ErrorBody),
    ))]
async fn create_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Body(new): Body<NewKey>,
) -> Result<Response, ApiError> {
    if new.label.chars().count() > API_KEY_LABEL_CHARS_MAX {
        return Err(ApiError::invalid(
            "INVALID_LABEL",
            "label",
            format!("label must be at most {API_KEY_LABEL_CHARS_MAX} characters"),
        ));
    }
    let live = app
        .store
        .api_keys_of(caller.user)
        .await?
        .into_iter()
        .filter(|k| !k.revoked)
        .count();
    if live >= API_KEYS_PER_USER_MAX {
        return Err(ApiError::invalid(
            "TOO_MANY_API_KEYS",
            "label",
            format!(
                "a user may hold at most {API_KEYS_PER_USER_MAX} live API keys; revoke one first"
            ),
        ));
    }
    let key_id = format!("ak_{}", auth::encode_hex(&auth::random_bytes::<12>()));
    let secret = auth::encode_hex(&auth::random_bytes::<32>());
    app.store
        .create_api_key(&key_id, caller.user, &secret, &new.label, now_ms())
        .await?;
    Ok(created(CreatedKey {
        key_id,
        secret,
        label: new.label,
    }))
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "account", summary = "The caller's API keys",
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Keys, without secrets", body = Vec<KeyView>),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ))]
async fn list_keys(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let keys = app.store.api_keys_of(caller.user).await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| KeyView {
                key_id: k.key_id,
                label: k.label,
                created_ms: k.created_ms,
                revoked: k.revoked,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{key_id}", tag = "account", summary = "Revoke one of the caller's API keys",
    security(("session" = []), ("api_key" = [])),
    params(("key_id" = String, Path, description = "The key")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such key of the caller's", body = ErrorBody),
    ))]
async fn revoke_key(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if app.store.revoke_api_key(&key_id, Some(caller.user)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("UNKNOWN_API_KEY", "no such API key"))
    }
}

/// A balance in one asset.
#[derive(Serialize, ToSchema)]
pub struct BalanceView {
    /// Asset symbol.
    pub asset: String,
    /// Free to use.
    pub available: String,
    /// Reserved by open orders, escrows and withdrawals.
    pub held: String,
}

#[utoipa::path(get, path = "/api/v1/balances", tag = "account", summary = "The caller's balances",
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "One entry per asset", body = Vec<BalanceView>),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ))]
async fn balances(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<Vec<BalanceView>>, ApiError> {
    balances_of(&app, caller.user).await.map(Json)
}

/// A user's balance in every asset.
pub async fn balances_of(app: &App, user: u64) -> Result<Vec<BalanceView>, ApiError> {
    app.read(move |state| {
        let ledger = state.ledger();
        ledger
            .assets()
            .map(|(id, asset)| {
                let balance = ledger.balance(Owner::User(user), id);
                BalanceView {
                    asset: asset.symbol.clone(),
                    available: from_units(balance.available, asset.decimals),
                    held: from_units(balance.held, asset.decimals),
                }
            })
            .collect()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_hash_costs_a_real_verification() {
        // If it did not parse, an unknown name would be answered faster than a wrong
        // password, and the timing would tell which names exist.
        assert!(argon2::password_hash::PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!auth::verify_password(DUMMY_HASH, "anything"));
    }
}
