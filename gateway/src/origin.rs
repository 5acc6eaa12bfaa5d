//! The Origin allowlist for browser clients (docs/REFERENCE.md §6), used for WebSocket
//! upgrades (refused: 4403) and for the CORS header of `/client.js`. A request without an
//! `Origin` header is a non-browser client and is not subject to it.

use axum::http::{header, HeaderMap, HeaderValue};

/// Check the request's `Origin` against `allowed`: empty = same host only (the Origin's host
/// name equals the `Host` header's, whatever the ports: nodes of one machine on :8080 and
/// :8081 serve each other's pages), `*` = any, `https://*.example.com` = any subdomain,
/// anything else = exact match.
pub fn check(allowed: &[String], headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| "Origin header is not ASCII".to_owned())?;
    if allows(
        allowed,
        origin,
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) {
        Ok(())
    } else {
        Err(format!("origin {origin} is not allowed"))
    }
}

/// The value of `Access-Control-Allow-Origin` for this request: its `Origin` when `allowed`
/// admits it, else None (no header: the browser keeps the response from the page).
pub fn cors_origin(allowed: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    check(allowed, headers).ok()?;
    Some(origin.clone())
}

/// `host` of `host[:port]` or `[v6][:port]`.
fn host_name(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn allows(allowed: &[String], origin: &str, host: Option<&str>) -> bool {
    if allowed.is_empty() {
        let Some(origin_host) = origin.split_once("://").map(|(_, h)| h) else {
            return false; // `null` (sandboxed pages, file://) has no host
        };
        return host.is_some_and(|h| host_name(h).eq_ignore_ascii_case(host_name(origin_host)));
    }
    allowed.iter().any(|pattern| {
        if pattern == "*" {
            return true;
        }
        match pattern.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
            None => pattern.eq_ignore_ascii_case(origin),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::allows;

    #[test]
    fn same_host_by_default() {
        assert!(allows(&[], "http://localhost:8080", Some("localhost:8080")));
        assert!(!allows(&[], "http://evil.example", Some("localhost:8080")));
        assert!(!allows(&[], "http://localhost:8080", None));
        // The port is not part of "same host": two local nodes serve each other's pages.
        assert!(allows(&[], "http://localhost:8081", Some("localhost:8080")));
        assert!(allows(
            &[],
            "https://Push.Example.com",
            Some("push.example.com")
        ));
        assert!(allows(&[], "http://[::1]:8081", Some("[::1]:8080")));
        assert!(!allows(&[], "http://[::2]:8080", Some("[::1]:8080")));
        assert!(!allows(
            &[],
            "http://localhost.evil:8080",
            Some("localhost:8080")
        ));
        assert!(!allows(
            &[],
            "http://127.0.0.1:8080",
            Some("localhost:8080")
        ));
        assert!(!allows(&[], "null", Some("null")));
    }

    #[test]
    fn patterns() {
        let list = vec![
            "https://app.example.com".to_owned(),
            "https://*.example.org".to_owned(),
        ];
        assert!(allows(&list, "https://app.example.com", None));
        assert!(allows(&list, "https://a.b.example.org", None));
        assert!(!allows(&list, "https://example.org", None));
        assert!(!allows(&list, "http://a.example.org", None));
        assert!(!allows(&list, "https://evilexample.org", None));
        assert!(allows(&["*".to_owned()], "https://anything", None));
    }
}
