//! The OpenAPI document describes every route the server has.

use reqwest::{Method, StatusCode};

use crate::harnesses;

/// Every route of the server: a new route must be added here and to the document.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    ("get", "/api/v1/ws"),
    ("post", "/api/v1/auth/login"),
    ("get", "/api/v1/me"),
    ("post", "/api/v1/api-keys"),
    ("get", "/api/v1/api-keys"),
    ("delete", "/api/v1/api-keys/{key_id}"),
    ("get", "/api/v1/balances"),
    ("get", "/api/v1/assets"),
    ("get", "/api/v1/markets"),
    ("get", "/api/v1/markets/{market}"),
    ("get", "/api/v1/markets/{market}/depth"),
    ("get", "/api/v1/markets/{market}/ticker"),
    ("get", "/api/v1/markets/{market}/trades"),
    ("get", "/api/v1/markets/{market}/candles"),
    ("get", "/api/v1/markets/{market}/liquidity"),
    ("get", "/api/v1/markets/{market}/price-impact"),
    ("post", "/api/v1/orders"),
    ("get", "/api/v1/orders"),
    ("delete", "/api/v1/orders"),
    ("get", "/api/v1/orders/{id}"),
    ("delete", "/api/v1/orders/{id}"),
    ("patch", "/api/v1/orders/{id}"),
    ("get", "/api/v1/trades"),
    ("post", "/api/v1/admin/users"),
    ("get", "/api/v1/admin/users"),
    ("post", "/api/v1/admin/assets"),
    ("post", "/api/v1/admin/markets"),
    ("patch", "/api/v1/admin/markets/{market}"),
    ("post", "/api/v1/admin/markets/{market}/halt"),
    ("post", "/api/v1/admin/markets/{market}/resume"),
    ("post", "/api/v1/admin/deposits"),
    ("put", "/api/v1/admin/users/{id}/reputation"),
    ("get", "/api/v1/admin/withdrawals"),
    ("post", "/api/v1/admin/withdrawals/{id}/complete"),
    ("post", "/api/v1/admin/withdrawals/{id}/cancel"),
    ("post", "/api/v1/withdrawals"),
    ("get", "/api/v1/withdrawals"),
    ("get", "/api/v1/withdrawals/{id}"),
    ("delete", "/api/v1/withdrawals/{id}"),
    ("get", "/api/v1/queues"),
    ("put", "/api/v1/queues/{queue}"),
    ("get", "/api/v1/queues/{queue}/jobs"),
    ("post", "/api/v1/queues/{queue}/jobs"),
    ("get", "/api/v1/queues/{queue}/dead"),
    ("get", "/api/v1/failures/summary"),
    ("post", "/api/v1/queues/{queue}/pause"),
    ("post", "/api/v1/queues/{queue}/resume"),
    ("post", "/api/v1/queues/{queue}/fetch"),
    ("get", "/api/v1/jobs/{id}"),
    ("post", "/api/v1/jobs/{id}/retry"),
    ("post", "/api/v1/jobs/{id}/discard"),
    ("post", "/api/v1/jobs/{id}/heartbeat"),
    ("post", "/api/v1/jobs/{id}/progress"),
    ("post", "/api/v1/jobs/{id}/complete"),
    ("post", "/api/v1/jobs/{id}/fail"),
    ("post", "/api/v1/jobs/{id}/release"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_every_route() {
    let h = harnesses("openapi").await.into_iter().next().unwrap();
    let doc = h
        .expect(
            StatusCode::OK,
            Method::GET,
            "/api/v1/openapi.json",
            None,
            None,
        )
        .await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no response"
            );
            documented.push((method.clone(), path.clone()));
        }
    }
    for (method, path) in ROUTES {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not in the document"
        );
        // The route exists: it answers with something other than the fallback's 404 body.
        let concrete = path
            .replace("{key_id}", "nope")
            .replace("{market}", "NO-PE")
            .replace("{id}", "1");
        let (_, body) = h
            .call(
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                &concrete,
                None,
                None,
            )
            .await;
        assert_ne!(
            body["error"]["code"], "NOT_FOUND",
            "{method} {path} is not routed"
        );
    }
    assert_eq!(documented.len(), ROUTES.len(), "documented: {documented:?}");
    let page = h
        .client
        .get(format!("{}/api/v1/docs", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("/api/v1/orders"));
    h.stop().await;
}
