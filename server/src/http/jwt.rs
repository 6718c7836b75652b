//! JSON Web Tokens as client credentials, for platforms that already issue
//! them: signed with a configured key (HS256 with a shared secret, RS256
//! or ES256 with a public key), unexpired, and, when configured, from the
//! right issuer for the right audience. The subject (`sub`) names the
//! client; its scopes come from the `scope` claim (space-separated, as
//! OAuth writes it) or a `scopes` array.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{ClientToken, Secret, ServeConfig, TokenScope};
use crate::error::{ApiError, ErrorCode};

/// The keys JWTs are checked against.
pub struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<Algorithm> = self.keys.iter().map(|(a, _)| *a).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

fn scope_of(name: &str) -> Option<TokenScope> {
    Some(match name {
        "read" => TokenScope::Read,
        "locations" => TokenScope::Locations,
        "matches" => TokenScope::Matches,
        "admin" => TokenScope::Admin,
        _ => return None,
    })
}

impl JwtVerifier {
    /// The verifier `config` asks for (`None`: no JWT keys configured).
    ///
    /// # Errors
    /// A key file that cannot be read or is not a key of its kind.
    pub fn from_config(config: &ServeConfig) -> Result<Option<Self>, String> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let mut keys = Vec::new();
        if let Some(path) = &config.jwt_hs256_secret_file {
            let secret = read(path)?;
            let secret = secret.trim_ascii();
            if secret.len() < Secret::MIN_LEN {
                return Err(format!(
                    "{}: an HS256 secret needs at least {} bytes",
                    path.display(),
                    Secret::MIN_LEN
                ));
            }
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)));
        }
        if let Some(path) = &config.jwt_rs256_public_key_file {
            let key = DecodingKey::from_rsa_pem(&read(path)?)
                .map_err(|e| format!("{}: not an RSA public key: {e}", path.display()))?;
            keys.push((Algorithm::RS256, key));
        }
        if let Some(path) = &config.jwt_es256_public_key_file {
            let key = DecodingKey::from_ec_pem(&read(path)?)
                .map_err(|e| format!("{}: not an EC public key: {e}", path.display()))?;
            keys.push((Algorithm::ES256, key));
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            keys,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        }))
    }

    /// The client a JWT names, with its scopes.
    ///
    /// # Errors
    /// `unauthorized` for a token that is not a JWT, not signed by a
    /// configured key, expired, or for another issuer or audience.
    pub fn verify(&self, token: &str) -> Result<ClientToken, ApiError> {
        let refused = |why: String| ApiError::new(ErrorCode::Unauthorized, why);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| refused(format!("the bearer token is not valid: {e}")))?;
        let Some((alg, key)) = self.keys.iter().find(|(a, _)| *a == header.alg) else {
            return Err(refused(format!(
                "JWTs signed with {:?} are not accepted here",
                header.alg
            )));
        };
        let mut validation = Validation::new(*alg);
        validation.leeway = 30;
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| refused(format!("the JWT is not valid: {e}")))?;
        let claims = data.claims;
        let names = claims
            .scope
            .iter()
            .flat_map(|s| s.split_whitespace())
            .chain(claims.scopes.iter().flatten().map(String::as_str));
        Ok(ClientToken {
            name: claims.sub,
            token: Secret::new(String::new()),
            scopes: names.filter_map(scope_of).collect(),
        })
    }
}
