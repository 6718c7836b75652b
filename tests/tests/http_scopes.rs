//! Tokens with names and scopes: a token opens only the routes of its
//! scopes (`read`, `locations`, `matches`, `admin`), a refusal is 403
//! `forbidden` and changes nothing, and plain `api_tokens` keep every
//! scope.

// Test set-up: paths and files made here.
#![allow(clippy::unwrap_used)]

use hexmatch_server::config::{ClientToken, Secret, TokenScope};
use hexmatch_tests::http::{ServeConfig, TestServer, t_str, test_config};
use serde_json::json;

fn token(name: &str, scopes: &[TokenScope]) -> ClientToken {
    ClientToken {
        name: name.to_owned(),
        token: Secret::new(format!("{name}-token")),
        scopes: scopes.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_opens_only_the_routes_of_its_scopes() {
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec!["root".into()],
        tokens: vec![
            token("viewer", &[TokenScope::Read]),
            token("fleet", &[TokenScope::Locations]),
            token("dispatch", &[TokenScope::Read, TokenScope::Matches]),
        ],
        ..test_config()
    })
    .await;
    let viewer = srv.api_with_token(Some("viewer-token"));
    let fleet = srv.api_with_token(Some("fleet-token"));
    let dispatch = srv.api_with_token(Some("dispatch-token"));
    let root = srv.api_with_token(Some("root"));
    let driver = json!({"lat": 41.88, "lon": -87.63, "ts": t_str(0)});
    let order = json!({"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63}});

    // The finding: any token could move, claim and delete anything.
    let before = srv.snapshot(&["o1"]);
    let r = viewer.put_json("/v1/drivers/d1", &driver).await;
    r.expect_error(403, "forbidden");
    assert!(
        r.body.contains("viewer") && r.body.contains("locations"),
        "{}",
        r.body
    );
    dispatch
        .put_json("/v1/drivers/d1", &driver)
        .await
        .expect_error(403, "forbidden");
    viewer
        .post_json("/v1/matches", &order)
        .await
        .expect_error(403, "forbidden");
    fleet
        .post_json("/v1/matches", &order)
        .await
        .expect_error(403, "forbidden");
    assert_eq!(
        srv.snapshot(&["o1"]),
        before,
        "a refused request changed state"
    );

    fleet.put_json("/v1/drivers/d1", &driver).await.expect(200);
    viewer
        .get("/v1/drivers/nearest?lat=41.88&lon=-87.63")
        .await
        .expect(200);
    fleet
        .get("/v1/drivers/nearest?lat=41.88&lon=-87.63")
        .await
        .expect_error(403, "forbidden");
    dispatch.post_json("/v1/matches", &order).await.expect(201);
    dispatch.get("/v1/matches/o1").await.expect(200);
    viewer
        .post_json("/v1/matches/o1/confirm", &json!({}))
        .await
        .expect_error(403, "forbidden");
    dispatch
        .post_json("/v1/matches/o1/release", &json!({}))
        .await
        .expect(200);
    // Removing a driver is admin's; a plain api token has every scope.
    fleet
        .delete("/v1/drivers/d1")
        .await
        .expect_error(403, "forbidden");
    assert_eq!(root.delete("/v1/drivers/d1").await.status.as_u16(), 204);
    srv.shutdown().await;
}

#[test]
fn a_tokens_file_is_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("hexmatch-scopes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens.toml");
    std::fs::write(
        &file,
        "[[tokens]]\nname = \"dispatch\"\ntoken = \"abc\"\nscopes = [\"read\", \"matches\"]\n",
    )
    .unwrap();
    let args = || hexmatch_server::ServeArgs {
        tokens_file: Some(file.clone()),
        ..hexmatch_server::ServeArgs::default()
    };
    let config = args().resolve().expect("a valid file");
    assert_eq!(config.tokens.len(), 1);
    assert!(config.tokens[0].allows(TokenScope::Matches));
    assert!(!config.tokens[0].allows(TokenScope::Locations));
    // An unknown scope names the file.
    std::fs::write(
        &file,
        "[[tokens]]\nname = \"x\"\ntoken = \"abc\"\nscopes = [\"everything\"]\n",
    )
    .unwrap();
    let err = args().resolve().expect_err("an unknown scope");
    assert!(
        matches!(err, hexmatch_server::config::ConfigError::File { ref path, .. } if *path == file),
        "{err}"
    );
}
