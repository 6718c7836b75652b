//! The `openapi.json` document: it parses as a valid `OpenAPI` 3.1 description
//! (oas3), every operation resolves its schema references, and its content
//! is pinned by a snapshot, so any change to the contract shows in review.

use hexmatch_server::http::openapi;

fn document() -> String {
    openapi().to_pretty_json().expect("serialisable")
}

#[test]
fn openapi_is_a_valid_3_1_document_with_resolvable_references() {
    let spec = oas3::from_json(document()).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
    let ops: Vec<_> = spec.operations().collect();
    let mut seen: Vec<String> = ops.iter().map(|(p, m, _)| format!("{m} {p}")).collect();
    seen.sort();
    let expected = [
        "DELETE /v1/drivers/{driver_id}",
        "GET /livez",
        "GET /metrics",
        "GET /readyz",
        "GET /v1/cluster",
        "GET /v1/drivers/nearest",
        "GET /v1/drivers/{driver_id}",
        "GET /v1/locations/stream",
        "GET /v1/matches/{order_id}",
        "GET /v1/regions",
        "POST /v1/drivers/{driver_id}/location",
        "POST /v1/locations",
        "POST /v1/matches",
        "POST /v1/matches/batch",
        "POST /v1/matches/{order_id}/complete",
        "POST /v1/matches/{order_id}/confirm",
        "POST /v1/matches/{order_id}/release",
        "PUT /v1/drivers/{driver_id}",
    ];
    assert_eq!(seen, expected);
    for (path, method, op) in ops {
        for resp in op.responses(&spec).values() {
            for media in resp.content.values() {
                if let Some(schema) = &media.schema {
                    schema
                        .resolve(&spec)
                        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                }
            }
        }
        if let Some(body) = &op.request_body {
            let body = body
                .resolve(&spec)
                .unwrap_or_else(|e| panic!("{method} {path} body: {e}"));
            for media in body.content.values() {
                if let Some(schema) = &media.schema {
                    schema
                        .resolve(&spec)
                        .unwrap_or_else(|e| panic!("{method} {path} body schema: {e}"));
                }
            }
        }
    }
}

#[test]
fn openapi_snapshot() {
    let doc: serde_json::Value = serde_json::from_str(&document()).expect("json");
    insta::assert_json_snapshot!("openapi", doc);
}
