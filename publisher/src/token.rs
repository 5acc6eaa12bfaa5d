//! `publisher token`: client tokens for the gateways (HS256 JWTs signed with `auth.secret`),
//! with the claims the gateway reads: `sub` (client id), `exp`, `iat`, and the optional
//! `channels` (subscribe) and `publish` patterns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::Config;

/// The longest validity `publisher token` signs: a longer-lived bearer token is a password.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why no token was made; the message never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("auth.secret is not configured (PUBLISHER__AUTH__SECRET)")]
    NoSecret,
    #[error("--sub must be 1-123 characters of A-Z a-z 0-9 _ - . : @")]
    BadSub,
    #[error("--{0}: `{1}` is not a channel pattern (1-128 characters of A-Z a-z 0-9 _ - . : @ *)")]
    BadPattern(&'static str, String),
    #[error("--ttl must be between 1 s and 366 days")]
    BadTtl,
    #[error("signing: {0}")]
    Sign(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publish: Option<Vec<String>>,
}

fn valid_name(s: &str, max: usize, star: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
                || (star && b == b'*')
        })
}

fn patterns(
    flag: &'static str,
    list: Option<Vec<String>>,
) -> Result<Option<Vec<String>>, TokenError> {
    let Some(list) = list else { return Ok(None) };
    let list: Vec<String> = list
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(bad) = list.iter().find(|p| !valid_name(p, 128, true)) {
        return Err(TokenError::BadPattern(flag, bad.clone()));
    }
    Ok(Some(list))
}

/// Sign a token for client `sub`, valid for `ttl` from now.
pub fn mint(
    config: &Config,
    sub: &str,
    channels: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    ttl: Duration,
) -> Result<String, TokenError> {
    let secret = config.auth.secret.as_ref().ok_or(TokenError::NoSecret)?;
    if !valid_name(sub, 123, false) {
        return Err(TokenError::BadSub);
    }
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(TokenError::BadTtl);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub,
        iat: now,
        exp: now + ttl.as_secs(),
        channels: patterns("channels", channels)?,
        publish: patterns("publish", publish)?,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| TokenError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn mints_and_refuses() {
        let mut config = Config::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            mint(&config, "1", None, None, hour),
            Err(TokenError::NoSecret)
        );
        config.auth.secret = Some(Secret::new("x".repeat(32)));
        let token = mint(&config, "12345", Some(vec!["chat:*".into()]), None, hour).unwrap();
        assert_eq!(token.split('.').count(), 3);
        assert!(!token.contains(&"x".repeat(32)));
        assert_eq!(
            mint(&config, "a b", None, None, hour),
            Err(TokenError::BadSub)
        );
        assert!(matches!(
            mint(&config, "1", Some(vec!["a b".into()]), None, hour),
            Err(TokenError::BadPattern("channels", _))
        ));
        assert_eq!(
            mint(&config, "1", None, None, Duration::ZERO),
            Err(TokenError::BadTtl)
        );
    }
}
