//! Client authentication (docs/REFERENCE.md §2, §6): JWTs signed with HS256 (`auth.secret`, plus
//! `auth.secrets` for rotation) or RS256/ES256 (`auth.public_key_file`), carried in `?token=` or
//! `Authorization: Bearer`.
//!
//! A verified token becomes a [`Grant`]: the client id (`sub`), the expiry (`exp`), and the
//! optional `channels` (subscribe) and `publish` patterns, compiled once into boxed slices so
//! that an idle session keeps a few words, not the token. Nothing here touches a socket: the
//! upgrade handler refuses with 4401 and the session enforces the expiry on its heartbeat.
//!
//! Claims:
//! - `sub` (required): the client id; must be a valid client id.
//! - `exp` (required): seconds since the Unix epoch; no leeway (the issuer's and the node's
//!   clocks are assumed NTP-synchronised).
//! - `channels` (optional): patterns (`*` = any run of characters) the session may subscribe
//!   to; absent = any channel. The personal channel `user:<sub>` is always allowed, and no
//!   pattern ever opens another client's personal channel.
//! - `publish` (optional): when present it *replaces* `client_publish` for that session (the
//!   token's issuer holds the secret and is the authority: it may grant moderators a channel
//!   that `client_publish` keeps closed to everyone else, or `[]` to forbid publishing).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol;

/// The most patterns one claim may carry (they live as long as the session).
pub const MAX_PATTERNS: usize = 256;

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (?token= or Authorization: Bearer)")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("bad token: {0}")]
    Invalid(String),
}

/// Why the key material in the configuration is unusable; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: String,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    pub permissions: Option<Box<Permissions>>,
}

/// The optional claims, present only when the token carried at least one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subscribe patterns; None = any channel.
    pub channels: Option<Box<[Box<str>]>>,
    /// Publish patterns; None = the node's `client_publish`.
    pub publish: Option<Box<[Box<str>]>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
}

/// Checks tokens against every configured key.
pub struct Verifier {
    /// Each key with the one algorithm it accepts (no algorithm confusion: an HMAC secret never
    /// verifies an RS256 token and the other way round).
    keys: Vec<(DecodingKey, Validation)>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

// === impl Verifier ===

impl Verifier {
    /// The verifier for these keys (the configuration's `auth.secret` and `auth.secrets`, and
    /// `auth.public_key_file`, which is read and checked), or None when there are none: auth
    /// is off. Takes the keys, not the configuration: the configuration holds data, this
    /// builds from it.
    pub fn from_keys<'a>(
        secrets: impl IntoIterator<Item = &'a str>,
        public_key_file: Option<&Path>,
    ) -> Result<Option<Verifier>, KeyError> {
        let mut keys = Vec::new();
        for secret in secrets {
            keys.push((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if let Some(path) = public_key_file {
            keys.push(load_public_key(path)?);
        }
        Ok((!keys.is_empty()).then_some(Verifier { keys }))
    }

    /// Verify `token` (signature, algorithm, `exp`, `sub`) and compile its claims.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let mut last = AuthError::Invalid("signature does not match any key".into());
        for (key, validation) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return grant(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                        // Try the next key: another secret or the public key may match.
                        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => continue,
                        ErrorKind::MissingRequiredClaim(c) => {
                            AuthError::Invalid(format!("missing claim `{c}`"))
                        }
                        kind => AuthError::Invalid(describe(kind)),
                    };
                    // Anything but a signature or algorithm mismatch is the token's fault,
                    // whichever key is tried.
                    return Err(last);
                }
            }
        }
        if let Some(alg) = jsonwebtoken::decode_header(token).ok().map(|h| h.alg) {
            if !self.keys.iter().any(|(_, v)| v.algorithms.contains(&alg)) {
                last = AuthError::Invalid(format!("algorithm {alg:?} is not accepted"));
            }
        } else {
            last = AuthError::Invalid("not a JWT".into());
        }
        Err(last)
    }
}

/// Why a token was refused, in the words of the close reason (`bad token: …`): the library's
/// own error texts are type names (`InvalidToken`) or parser internals.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "not a JWT (header.claims.signature, base64url)".into()
        }
        ErrorKind::Json(_) => "its header or claims are not the expected JSON".into(),
        ErrorKind::InvalidClaimFormat(c) => format!("claim `{c}` has the wrong type"),
        ErrorKind::ImmatureSignature => "not valid yet (`nbf` is in the future)".into(),
        ErrorKind::InvalidIssuer => "issuer (`iss`) not accepted".into(),
        ErrorKind::InvalidAudience => "audience (`aud`) not accepted".into(),
        ErrorKind::InvalidSubject => "subject (`sub`) not accepted".into(),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => "its algorithm is not accepted".into(),
        _ => "it cannot be verified with the configured keys".into(),
    }
}

/// Turn verified claims into a grant, validating `sub` and the patterns.
fn grant(claims: Claims) -> Result<Grant, AuthError> {
    if !protocol::valid_client_id(&claims.sub) {
        return Err(AuthError::Invalid(format!(
            "`sub` must be {}",
            protocol::CLIENT_ID_RULE
        )));
    }
    let channels = compile("channels", claims.channels)?;
    let publish = compile("publish", claims.publish)?;
    let permissions = (channels.is_some() || publish.is_some())
        .then(|| Box::new(Permissions { channels, publish }));
    Ok(Grant {
        sub: claims.sub,
        exp: claims.exp,
        permissions,
    })
}

fn compile(
    claim: &str,
    patterns: Option<Vec<String>>,
) -> Result<Option<Box<[Box<str>]>>, AuthError> {
    let Some(patterns) = patterns else {
        return Ok(None);
    };
    if patterns.len() > MAX_PATTERNS {
        return Err(AuthError::Invalid(format!(
            "`{claim}` has more than {MAX_PATTERNS} patterns"
        )));
    }
    for p in &patterns {
        if !protocol::valid_pattern(p) {
            return Err(AuthError::Invalid(format!(
                "`{claim}` pattern is not a channel pattern"
            )));
        }
    }
    Ok(Some(
        patterns.into_iter().map(String::into_boxed_str).collect(),
    ))
}

/// Whether `name` matches one of `patterns`.
pub fn allowed(patterns: &[Box<str>], name: &str) -> bool {
    patterns.iter().any(|p| protocol::pattern_matches(p, name))
}

/// Read an RSA or EC public key (PEM) and check that it can verify: a key that does not parse
/// would otherwise refuse every token at run time instead of stopping start-up.
fn load_public_key(path: &Path) -> Result<(DecodingKey, Validation), KeyError> {
    const KEY: &str = "auth.public_key_file";
    let fail = |message: String| KeyError { key: KEY, message };
    let pem = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let candidates = [
        (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256),
        (DecodingKey::from_ec_pem(&pem), Algorithm::ES256),
    ];
    for (key, alg) in candidates {
        let Ok(key) = key else { continue };
        let validation = validation(alg);
        // A token with a well-formed but wrong signature: a usable key says "invalid
        // signature"; an unusable one fails on the key itself.
        let probe = probe_token(alg);
        match jsonwebtoken::decode::<serde_json::Value>(&probe, &key, &validation) {
            Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                return Ok((key, validation))
            }
            Err(e) => {
                return Err(fail(format!(
                    "{}: not a usable {alg:?} public key: {e}",
                    path.display()
                )))
            }
            Ok(_) => return Err(fail(format!("{}: key accepts anything", path.display()))),
        }
    }
    Err(fail(format!(
        "{}: not a PEM RSA or EC (P-256) public key",
        path.display()
    )))
}

fn probe_token(alg: Algorithm) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(format!(r#"{{"alg":"{alg:?}","typ":"JWT"}}"#));
    let claims = b64.encode(r#"{"sub":"probe","exp":4102444800}"#);
    // Sizes of a real signature, so that the key is exercised rather than the length check.
    let sig = b64.encode(vec![1u8; if alg == Algorithm::ES256 { 64 } else { 256 }]);
    format!("{header}.{claims}.{sig}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn verifier(secrets: &[&str]) -> Verifier {
        Verifier::from_keys(secrets.iter().copied(), None)
            .unwrap()
            .unwrap()
    }

    fn token(secret: &str, alg: Algorithm, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn verifies_and_compiles_claims() {
        let v = verifier(&[SECRET]);
        let exp = now_secs() + 60;
        let g = v
            .verify(&token(
                SECRET,
                Algorithm::HS256,
                json!({"sub": "42", "exp": exp, "channels": ["chat:*"]}),
            ))
            .unwrap();
        assert_eq!(g.sub, "42");
        assert_eq!(g.exp, exp);
        let p = g.permissions.unwrap();
        assert!(allowed(p.channels.as_deref().unwrap(), "chat:x"));
        assert!(p.publish.is_none());
        let g = v
            .verify(&token(
                SECRET,
                Algorithm::HS256,
                json!({"sub": "42", "exp": exp}),
            ))
            .unwrap();
        assert!(g.permissions.is_none());
    }

    #[test]
    fn refuses_what_it_should() {
        let v = verifier(&[SECRET, "another-secret-of-at-least-32-bytes!!"]);
        let exp = now_secs() + 60;
        let ok = json!({"sub": "42", "exp": exp});
        // Rotation: the second secret verifies too.
        assert!(v
            .verify(&token(
                "another-secret-of-at-least-32-bytes!!",
                Algorithm::HS256,
                ok.clone()
            ))
            .is_ok());
        let cases = [
            token(
                "wrong-secret-wrong-secret-wrong-secret",
                Algorithm::HS256,
                ok.clone(),
            ),
            token(SECRET, Algorithm::HS384, ok.clone()),
            token(SECRET, Algorithm::HS256, json!({"exp": exp})),
            token(SECRET, Algorithm::HS256, json!({"sub": "42"})),
            token(SECRET, Algorithm::HS256, json!({"sub": "a b", "exp": exp})),
            token(
                SECRET,
                Algorithm::HS256,
                json!({"sub": "42", "exp": exp, "channels": ["bad name"]}),
            ),
            token(
                SECRET,
                Algorithm::HS256,
                json!({"sub": "42", "exp": exp, "publish": "chat:*"}),
            ),
            "not.a.jwt".to_owned(),
            String::new(),
        ];
        for t in cases {
            assert!(
                matches!(v.verify(&t), Err(AuthError::Invalid(_))),
                "{t}: {:?}",
                v.verify(&t)
            );
        }
        let expired = token(
            SECRET,
            Algorithm::HS256,
            json!({"sub": "42", "exp": now_secs() - 1}),
        );
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn public_key_file_must_be_a_usable_key() {
        let dir = std::env::temp_dir().join(format!("gw-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        for path in [bad, dir.join("missing.pem")] {
            let e = Verifier::from_keys([], Some(&path)).err().expect("refused");
            assert_eq!(e.key, "auth.public_key_file");
        }
        let _ = std::fs::remove_dir_all(&dir);
        let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/es256-public.pem");
        let v = Verifier::from_keys([], Some(&good)).unwrap().unwrap();
        assert_eq!(v.keys[0].1.algorithms, vec![Algorithm::ES256]);
        // An HS256 token cannot pass as ES256 (no algorithm confusion).
        let t = token(
            SECRET,
            Algorithm::HS256,
            json!({"sub": "1", "exp": now_secs() + 60}),
        );
        assert!(v.verify(&t).is_err());
    }
}
