//! Attacks on authentication: forged and stale session tokens, tampered and replayed signed
//! requests. Each is refused with 401 and changes nothing.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Harness, JWT_SECRET, harnesses};

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn forge(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64_url::encode(bytes)
}

mod base64_url {
    /// Unpadded URL-safe base64, as JWTs use.
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

async fn status_with(h: &Harness, token: &str) -> (StatusCode, Value) {
    h.call(Method::GET, "/api/v1/me", Some(token), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_session_tokens_are_refused() {
    for h in harnesses("auth_tokens").await {
        let admin = h.admin().await;
        let (alice, token) = h.user(&admin, "alice").await;
        assert_eq!(status_with(&h, &token).await.0, StatusCode::OK);
        let now = now_s();
        let claims = |aud: &str, exp: u64, role: &str| json!({"sub": alice.to_string(), "role": role, "aud": aud, "iat": now, "exp": exp});
        let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let admin_claims = b64(claims("agora", now + 600, "admin").to_string().as_bytes());
        // The role raised inside the payload, under the original signature.
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], admin_claims, parts[2]);
        let attacks = [
            ("algorithm none", format!("{header_none}.{admin_claims}.")),
            (
                "expired",
                forge(claims("agora", now - 120, "user"), JWT_SECRET),
            ),
            (
                "wrong audience",
                forge(claims("another-service", now + 600, "user"), JWT_SECRET),
            ),
            (
                "no audience",
                forge(
                    json!({"sub": alice.to_string(), "role": "admin", "exp": now + 600}),
                    JWT_SECRET,
                ),
            ),
            (
                "wrong key",
                forge(
                    claims("agora", now + 600, "admin"),
                    "some-other-secret-of-enough-length-000",
                ),
            ),
            ("tampered payload", tampered),
            ("garbage", "not.a.token".to_string()),
        ];
        for (attack, forged) in attacks {
            let (status, body) = status_with(&h, &forged).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{attack}: {body}");
            assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{attack}");
        }
        // A well-formed HS256 token with the right key is honoured, so the refusals above are
        // about what each attack changed.
        let (status, _) =
            status_with(&h, &forge(claims("agora", now + 600, "user"), JWT_SECRET)).await;
        assert_eq!(status, StatusCode::OK);
        // A user token cannot reach admin routes.
        let (status, _) = h
            .call(Method::GET, "/api/v1/admin/users", Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Wrong password and unknown user look the same.
        for (name, password) in [("alice", "wrong-password"), ("mallory", "alice-password")] {
            let (status, body) = h
                .call(
                    Method::POST,
                    "/api/v1/auth/login",
                    None,
                    Some(json!({"username": name, "password": password})),
                )
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"]["message"], "wrong user name or password");
        }
        h.stop().await;
    }
}

/// Sends a signed request.
#[allow(clippy::too_many_arguments)]
async fn signed(
    h: &Harness,
    method: Method,
    path: &str,
    key: &str,
    secret: &str,
    timestamp: i64,
    body: Option<Value>,
    tamper: impl FnOnce(String) -> String,
) -> (StatusCode, Value) {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let stamp = timestamp.to_string();
    let signature = tamper(server::auth::sign(
        secret,
        &stamp,
        method.as_str(),
        path,
        bytes.as_bytes(),
    ));
    let mut request = h
        .client
        .request(method, format!("{}{path}", h.base))
        .header("x-agora-key", key)
        .header("x-agora-timestamp", &stamp)
        .header("x-agora-signature", signature);
    if !bytes.is_empty() {
        request = request
            .header("content-type", "application/json")
            .body(bytes);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_are_checked_and_never_replayed() {
    for h in harnesses("auth_keys").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, token) = h.user(&admin, "alice").await;
        let (_, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        let key = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/api-keys",
                Some(&token),
                Some(json!({"label": "bot"})),
            )
            .await;
        let (key_id, secret) = (
            key["key_id"].as_str().unwrap(),
            key["secret"].as_str().unwrap(),
        );
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        };
        let order = json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "0.1"});

        let stamp = now();
        let (status, placed) = signed(
            &h,
            Method::POST,
            "/api/v1/orders",
            key_id,
            secret,
            stamp,
            Some(order.clone()),
            |s| s,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{placed}");
        // The very same request again is a replay.
        let (status, body) = signed(
            &h,
            Method::POST,
            "/api/v1/orders",
            key_id,
            secret,
            stamp,
            Some(order.clone()),
            |s| s,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("replay")
        );

        let flip = |s: String| {
            let mut bytes = s.into_bytes();
            bytes[0] = if bytes[0] == b'0' { b'1' } else { b'0' };
            String::from_utf8(bytes).unwrap()
        };
        let cases: Vec<(&str, i64, &str, &str)> = vec![
            ("tampered signature", now(), key_id, secret),
            ("stale timestamp", now() - 60_000, key_id, secret),
            ("future timestamp", now() + 60_000, key_id, secret),
            ("unknown key", now(), "ak_unknown", secret),
            ("wrong secret", now(), key_id, "0000"),
        ];
        for (i, (attack, stamp, key, secret)) in cases.into_iter().enumerate() {
            let (status, body) = if i == 0 {
                signed(
                    &h,
                    Method::POST,
                    "/api/v1/orders",
                    key,
                    secret,
                    stamp,
                    Some(order.clone()),
                    flip,
                )
                .await
            } else {
                signed(
                    &h,
                    Method::POST,
                    "/api/v1/orders",
                    key,
                    secret,
                    stamp,
                    Some(order.clone()),
                    |s| s,
                )
                .await
            };
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{attack}: {body}");
        }
        // A signature over another body does not cover this one.
        let stamp = now().to_string();
        let signature = server::auth::sign(
            secret,
            &stamp,
            "POST",
            "/api/v1/orders",
            order.to_string().as_bytes(),
        );
        let other = json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "0.9"});
        let response = h
            .client
            .post(format!("{}/api/v1/orders", h.base))
            .header("x-agora-key", key_id)
            .header("x-agora-timestamp", &stamp)
            .header("x-agora-signature", signature)
            .json(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // Only the one good order was placed.
        let orders = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/orders",
                Some(&token),
                None,
            )
            .await;
        assert_eq!(orders.as_array().unwrap().len(), 1, "{orders}");

        // Bob cannot revoke Alice's key; Alice can, and then it is refused.
        let path = format!("/api/v1/api-keys/{key_id}");
        let (status, _) = h.call(Method::DELETE, &path, Some(&bob_token), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let bob_keys = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/api-keys",
                Some(&bob_token),
                None,
            )
            .await;
        assert_eq!(bob_keys, json!([]));
        h.expect(
            StatusCode::NO_CONTENT,
            Method::DELETE,
            &path,
            Some(&token),
            None,
        )
        .await;
        let (status, _) = signed(
            &h,
            Method::GET,
            "/api/v1/balances",
            key_id,
            secret,
            now(),
            None,
            |s| s,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        h.stop().await;
    }
}
