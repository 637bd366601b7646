//! Who is calling: passwords (argon2id), session tokens (JWT, HS256 only, `exp` and `aud`
//! required), and API keys that sign each request with HMAC-SHA256 over its timestamp,
//! method, path and body, inside a time window and never twice.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ApiError;

/// Named bounds.
pub mod limits {
    /// Signatures remembered to refuse replays (each for the signature window).
    pub const REPLAY_CACHE_ENTRIES_MAX: usize = 1_000_000;
    /// Longest password accepted, in bytes (argon2's cost grows with it).
    pub const PASSWORD_BYTES_MAX: usize = 256;
    /// Shortest password accepted.
    pub const PASSWORD_BYTES_MIN: usize = 8;
    /// Leeway on a token's expiry for clock skew, in seconds.
    pub const TOKEN_LEEWAY_S: u64 = 5;
    /// Session tokens remembered as verified (each until it expires); when full, the memory
    /// is emptied and tokens are verified again as they come.
    pub const VERIFIED_TOKENS_MAX: usize = 16_384;
}

/// Header naming the API key of a signed request.
pub const KEY_HEADER: &str = "x-agora-key";
/// Header with the signed request's timestamp, milliseconds since the epoch.
pub const TIMESTAMP_HEADER: &str = "x-agora-timestamp";
/// Header with the hex HMAC-SHA256 signature.
pub const SIGNATURE_HEADER: &str = "x-agora-signature";

/// What a caller may do; each role may do what the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Trades on their own account.
    User,
    /// Also runs the job queue.
    Operator,
    /// Also manages users, markets, assets and funds.
    Admin,
}

impl Role {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a name.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// How a caller proved who they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A session token.
    Session,
    /// A signed request.
    ApiKey,
}

/// An authenticated caller, put into the request by the authentication layer.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// The user.
    pub user: u64,
    /// Their role.
    pub role: Role,
    /// How they authenticated.
    pub method: Method,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role",
                role.as_str()
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().copied().ok_or_else(|| {
            ApiError::unauthorized(
                "sign in: send Authorization: Bearer <token>, or sign the request with an API key",
            )
        })
    }
}

/// The claims of a session token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    aud: String,
    iat: u64,
    exp: u64,
}

/// Session keys, the signature window and the replay cache.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    audience: String,
    session_ttl_s: u64,
    window_ms: i64,
    /// Signature → when it may be forgotten (ms).
    seen: Mutex<HashMap<[u8; 32], i64>>,
    /// Session tokens verified before → their caller and expiry (seconds since the epoch). A
    /// bot sends the same token with every request: its signature and claims are checked
    /// once, its expiry every time.
    verified: Mutex<HashMap<Box<str>, (Caller, u64)>>,
}

impl Authenticator {
    /// Keys from `secret`; tokens carry `audience` and live `session_ttl_s`.
    pub fn new(secret: &[u8], audience: &str, session_ttl_s: u64, window_s: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = limits::TOKEN_LEEWAY_S;
        Authenticator {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            audience: audience.into(),
            session_ttl_s,
            window_ms: (window_s * 1000) as i64,
            seen: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// A session token for `user`, and when it expires (seconds since the epoch).
    pub fn issue(&self, user: u64, role: Role, now_s: u64) -> Result<(String, u64), ApiError> {
        let exp = now_s + self.session_ttl_s;
        let claims = Claims {
            sub: user.to_string(),
            role,
            aud: self.audience.clone(),
            iat: now_s,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(ApiError::internal)?;
        Ok((token, exp))
    }

    /// The caller a session token names, if it is valid.
    pub fn verify_token(&self, token: &str) -> Result<Caller, ApiError> {
        // Tokens cannot be revoked: one whose signature and claims held once holds until it
        // expires, which is checked as the full validation checks it.
        let now_s = jsonwebtoken::get_current_timestamp();
        let live = |exp: u64| now_s <= exp.saturating_add(limits::TOKEN_LEEWAY_S);
        if let Some(&(caller, exp)) = self.verified_tokens().get(token)
            && live(exp)
        {
            return Ok(caller);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| ApiError::unauthorized(format!("invalid session token: {e}")))?;
        let user = data
            .claims
            .sub
            .parse()
            .map_err(|_| ApiError::unauthorized("invalid session token: bad subject"))?;
        let caller = Caller {
            user,
            role: data.claims.role,
            method: Method::Session,
        };
        if live(data.claims.exp) {
            let mut verified = self.verified_tokens();
            if verified.len() >= limits::VERIFIED_TOKENS_MAX {
                verified.clear();
            }
            verified.insert(token.into(), (caller, data.claims.exp));
        }
        Ok(caller)
    }

    fn verified_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, (Caller, u64)>> {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a signed request: the timestamp within the window, the signature right for
    /// `secret`, and not seen before.
    #[allow(clippy::too_many_arguments)]
    pub fn verify_signature(
        &self,
        secret: &str,
        timestamp: &str,
        signature: &str,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<(), ApiError> {
        let stamp: i64 = timestamp.parse().map_err(|_| {
            ApiError::unauthorized("x-agora-timestamp must be milliseconds since the epoch")
        })?;
        if (now_ms - stamp).abs() > self.window_ms {
            return Err(ApiError::unauthorized(format!(
                "the request's timestamp is more than {} s from the server's clock",
                self.window_ms / 1000
            )));
        }
        let given = decode_hex(signature)
            .filter(|bytes| bytes.len() == 32)
            .ok_or_else(|| ApiError::unauthorized("x-agora-signature must be 64 hex digits"))?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(ApiError::internal)?;
        mac.update(signing_prefix(timestamp, method, path_and_query).as_bytes());
        mac.update(body);
        mac.verify_slice(&given)
            .map_err(|_| ApiError::unauthorized("the request's signature does not match"))?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&given);
        let mut seen = self.seen.lock().expect("replay cache lock");
        if seen.len() >= limits::REPLAY_CACHE_ENTRIES_MAX {
            seen.retain(|_, forget_at| *forget_at > now_ms);
            if seen.len() >= limits::REPLAY_CACHE_ENTRIES_MAX {
                return Err(ApiError::unavailable(
                    "OVERLOADED",
                    "too many signed requests in the window; retry shortly",
                ));
            }
        }
        if seen.insert(key, stamp + self.window_ms).is_some() {
            return Err(ApiError::unauthorized(
                "this signed request was already received (replay)",
            ));
        }
        Ok(())
    }
}

/// What a signature covers before the body: `timestamp\nMETHOD\npath?query\n`.
pub fn signing_prefix(timestamp: &str, method: &str, path_and_query: &str) -> String {
    format!("{timestamp}\n{method}\n{path_and_query}\n")
}

/// Signs a request as a client would (used by the CLI and the tests).
pub fn sign(
    secret: &str,
    timestamp: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signing_prefix(timestamp, method, path_and_query).as_bytes());
    mac.update(body);
    encode_hex(&mac.finalize().into_bytes())
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).map_err(ApiError::internal)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(ApiError::internal)
}

/// Whether `password` matches a stored hash.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), ApiError> {
    if password.len() < limits::PASSWORD_BYTES_MIN || password.len() > limits::PASSWORD_BYTES_MAX {
        return Err(ApiError::invalid(
            "INVALID_PASSWORD",
            "password",
            format!(
                "password must be {} to {} bytes",
                limits::PASSWORD_BYTES_MIN,
                limits::PASSWORD_BYTES_MAX
            ),
        ));
    }
    Ok(())
}

/// `N` bytes from the operating system's generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random generator works");
    bytes
}

/// Lower-case hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(DIGITS[(byte >> 4) as usize] as char);
        text.push(DIGITS[(byte & 15) as usize] as char);
    }
    text
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = random_bytes::<32>();
        assert_eq!(decode_hex(&encode_hex(&bytes)).unwrap(), bytes);
        assert!(decode_hex("zz").is_none());
        assert!(decode_hex("abc").is_none());
    }

    /// A token verified once is remembered, but only until it expires; a tampered copy is
    /// another token and is verified in full.
    #[test]
    fn remembered_tokens_still_expire_and_tampered_ones_are_checked() {
        let auth = Authenticator::new(b"a secret of enough length", "agora", 60, 30);
        let now = jsonwebtoken::get_current_timestamp();
        // Issued so that it expires (leeway included) within two seconds.
        let issued_at = now + 1 - limits::TOKEN_LEEWAY_S - 60;
        let (token, _) = auth.issue(7, Role::User, issued_at).unwrap();
        assert_eq!(auth.verify_token(&token).unwrap().user, 7);
        assert_eq!(auth.verify_token(&token).unwrap().user, 7, "remembered");
        // One character of the signature's middle changed.
        let at = token.len() - 10;
        let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        assert!(auth.verify_token(&tampered).is_err());
        std::thread::sleep(std::time::Duration::from_millis(2_100));
        assert!(
            auth.verify_token(&token).is_err(),
            "an expired token is refused though remembered"
        );
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::User);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
