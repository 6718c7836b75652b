//! The `openapi.json` document: it parses as a valid `OpenAPI` 3.1 description
//! (oas3) and passes `openapi-spec-validator`, every operation resolves its
//! schema references, the request a client builds for nearest from the
//! document's examples is answered, and its content is pinned by a
//! snapshot, so any change to the contract shows in review.

mod common;

use hexmatch_server::http::openapi;
use serde_json::Value;

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
        "GET /v1/density",
        "GET /v1/drivers",
        "GET /v1/drivers/nearest",
        "GET /v1/drivers/{driver_id}",
        "GET /v1/events",
        "GET /v1/locations/stream",
        "GET /v1/matches/{order_id}",
        "GET /v1/regions",
        "GET /v1/regions/{region}/stats",
        "POST /v1/drivers/within",
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

/// Every event has its schema: the envelope, each payload, the gap
/// message; the feed's response is an event stream of `Event`.
#[test]
fn every_event_shape_has_a_schema() {
    let spec: Value = serde_json::from_str(&document()).expect("json");
    let schemas = &spec["components"]["schemas"];
    for name in [
        "Event",
        "EventData",
        "EventGap",
        "EventType",
        "MatchOut",
        "DriverOut",
        "DriverStatusChange",
        "ZoneCrossing",
        "ZoneKind",
    ] {
        assert!(schemas.get(name).is_some(), "no schema {name}");
    }
    let text = schemas["EventData"].to_string();
    for t in [
        "match.reserved",
        "match.confirmed",
        "match.released",
        "match.expired",
        "match.completed",
        "driver.expired",
        "driver.status",
        "driver.entered",
        "driver.left",
    ] {
        assert!(text.contains(t), "EventData does not name {t}: {text}");
    }
    let ok = &spec["paths"]["/v1/events"]["get"]["responses"]["200"]["content"];
    assert_eq!(
        ok["text/event-stream"]["schema"]["$ref"],
        "#/components/schemas/Event"
    );
}

#[test]
fn openapi_snapshot() {
    let doc: serde_json::Value = serde_json::from_str(&document()).expect("json");
    insta::assert_json_snapshot!("openapi", doc);
}

/// The document passes `openapi-spec-validator`, the validator
/// integrators run. It once reported 15 errors: responses without a
/// description, and the query parameters of nearest and of the stream
/// declared as required path parameters.
#[test]
fn openapi_passes_openapi_spec_validator() {
    let dir = std::env::temp_dir().join(format!("hexmatch-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("openapi.json");
    std::fs::write(&file, document()).expect("written");
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 runs (the test needs Python 3 with openapi-spec-validator)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "openapi-spec-validator (pip install openapi-spec-validator):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `GET /v1/drivers/nearest` as Swagger UI's "Try it out" does
/// from the document: each parameter where its `in` says, with its
/// example. A real server with the bundled drivers answers it with the
/// drivers nearest to the example point (parameters declared in the path
/// once built a URL with no query string: 400 `lat is required`).
#[test]
fn the_nearest_request_built_from_the_document_is_answered() {
    let spec: Value = serde_json::from_str(&document()).expect("json");
    let op = &spec["paths"]["/v1/drivers/nearest"]["get"];
    let params = op["parameters"].as_array().expect("parameters");
    let mut query = form_urlencoded::Serializer::new(String::new());
    for p in params {
        let name = p["name"].as_str().expect("name");
        assert_eq!(p["in"], "query", "{name} is not a query parameter: {p}");
        let example = &p["example"];
        if p["required"] == true {
            assert!(!example.is_null(), "required {name} has no example: {p}");
        }
        match example {
            Value::Null => {}
            Value::String(s) => {
                query.append_pair(name, s);
            }
            other => {
                query.append_pair(name, &other.to_string());
            }
        }
    }
    let query = query.finish();
    let trips = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/chicago_trips.csv");
    let node = common::Node::spawn(&["--load-drivers", trips, "--driver-ttl-s", "0"]);
    let url = format!("{}/v1/drivers/nearest?{query}", node.base);
    let resp = reqwest::blocking::get(&url).expect("request sent");
    let status = resp.status().as_u16();
    let body: Value = resp.json().expect("json body");
    assert_eq!(status, 200, "{url}: {body}");
    let drivers = body["drivers"].as_array().expect("drivers");
    let k = params
        .iter()
        .find(|p| p["name"] == "k")
        .and_then(|p| p["example"].as_u64())
        .expect("k has an example");
    assert_eq!(drivers.len() as u64, k, "{url}: {body}");
}
