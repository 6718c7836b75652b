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
    std::fs::remove_dir_all(&dir).ok();
}

/// JWTs from a platform that already issues them: HS256 with a shared
/// secret, ES256 and RS256 with a public key; the subject names the client and
/// the `scope` claim (or `scopes`) gives its scopes. A token that is
/// expired, from another issuer, or signed with another key is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn jwts_signed_with_a_configured_key_carry_their_scopes() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let dir = std::env::temp_dir().join(format!("hexmatch-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hs_secret = "a-shared-hs256-secret-for-tests";
    let hs_file = dir.join("hs256.secret");
    std::fs::write(&hs_file, hs_secret).unwrap();
    // ES256 and RS256 key pairs made with openssl (PKCS#8 private, SPKI
    // public).
    let keypair = |name: &str, algorithm: &str, option: &str| {
        let (private, public) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.pub.pem")),
        );
        let (private_s, public_s) = (private.to_str().unwrap(), public.to_str().unwrap());
        for args in [
            vec![
                "genpkey",
                "-algorithm",
                algorithm,
                "-pkeyopt",
                option,
                "-out",
                private_s,
            ],
            vec!["pkey", "-in", private_s, "-pubout", "-out", public_s],
        ] {
            let status = std::process::Command::new("openssl")
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?}");
        }
        (private, public)
    };
    let (es_private, es_public) = keypair("es256", "EC", "ec_paramgen_curve:P-256");
    let (rs_private, rs_public) = keypair("rs256", "RSA", "rsa_keygen_bits:2048");
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec!["root".into()],
        jwt_hs256_secret_file: Some(hs_file),
        jwt_es256_public_key_file: Some(es_public),
        jwt_rs256_public_key_file: Some(rs_public),
        jwt_issuer: Some("platform".into()),
        ..test_config()
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hs = |claims: serde_json::Value, secret: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let es_key = EncodingKey::from_ec_pem(&std::fs::read(&es_private).unwrap()).unwrap();
    let es = |claims: serde_json::Value| {
        encode(&Header::new(Algorithm::ES256), &claims, &es_key).unwrap()
    };
    let rs_key = EncodingKey::from_rsa_pem(&std::fs::read(&rs_private).unwrap()).unwrap();
    let rs = |claims: serde_json::Value| {
        encode(&Header::new(Algorithm::RS256), &claims, &rs_key).unwrap()
    };
    let driver = json!({"lat": 41.88, "lon": -87.63, "ts": t_str(0)});
    let order = json!({"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63}});

    let courier = hs(
        json!({"sub": "courier-app", "iss": "platform", "exp": now + 600, "scope": "read locations"}),
        hs_secret,
    );
    let api = srv.api_with_token(Some(&courier));
    api.put_json("/v1/drivers/d1", &driver).await.expect(200);
    let r = api.post_json("/v1/matches", &order).await;
    r.expect_error(403, "forbidden");
    assert!(r.body.contains("courier-app"), "{}", r.body);

    let dispatch =
        es(json!({"sub": "dispatch", "iss": "platform", "exp": now + 600, "scopes": ["matches"]}));
    srv.api_with_token(Some(&dispatch))
        .post_json("/v1/matches", &order)
        .await
        .expect(201);

    let ops = rs(json!({"sub": "ops", "iss": "platform", "exp": now + 600, "scope": "read"}));
    srv.api_with_token(Some(&ops))
        .get("/v1/matches/o1")
        .await
        .expect(200);
    srv.api_with_token(Some(&ops))
        .post_json("/v1/matches/o1/confirm", &json!({}))
        .await
        .expect_error(403, "forbidden");

    let before = srv.snapshot(&["o1"]);
    for bad in [
        hs(
            json!({"sub": "x", "iss": "platform", "exp": now - 3600, "scope": "admin"}),
            hs_secret,
        ),
        hs(
            json!({"sub": "x", "iss": "elsewhere", "exp": now + 600, "scope": "admin"}),
            hs_secret,
        ),
        hs(
            json!({"sub": "x", "iss": "platform", "exp": now + 600, "scope": "admin"}),
            "another-secret-entirely-123",
        ),
        hs(
            json!({"sub": "x", "iss": "platform", "scope": "admin"}),
            hs_secret,
        ),
        "not.a.jwt".to_owned(),
    ] {
        srv.api_with_token(Some(&bad))
            .put_json("/v1/drivers/d2", &driver)
            .await
            .expect_error(401, "unauthorized");
    }
    assert_eq!(
        srv.snapshot(&["o1"]),
        before,
        "a refused token changed state"
    );
    // Static tokens keep working beside JWTs.
    srv.api_with_token(Some("root"))
        .get("/v1/regions")
        .await
        .expect(200);
    srv.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}
