//! Alerts: what an alert request may contain, and the message that is published for it.
//!
//! `POST /alerts` and `publisher alert` both build an [`Alert`] here, so both publish the same
//! shape on `alerts.channel`: `{"level":"critical","title":"…"|null,"text":"…","at":"<RFC 3339
//! with milliseconds, UTC>"}`. `title` is always present and `null` when none was given.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The longest alert text, in characters.
pub const MAX_TEXT_CHARS: usize = 4096;
/// The longest alert title, in characters.
pub const MAX_TITLE_CHARS: usize = 256;

/// How serious an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Critical,
}

/// An alert as a client asks for it (the `POST /alerts` body). The level is a plain string
/// here so that an unknown one is reported as such rather than as a malformed body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRequest {
    pub level: String,
    #[serde(default)]
    pub title: Option<String>,
    pub text: String,
}

/// A validated alert, stamped with the time it was accepted: exactly what is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub level: Level,
    pub title: Option<String>,
    pub text: String,
    pub at: String,
}

/// Why an alert was refused; the message is fit to show to an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlertError {
    #[error("unknown level {0:?}; expected one of info, warning, critical")]
    Level(String),
    #[error("text must not be empty")]
    EmptyText,
    #[error("text is longer than {MAX_TEXT_CHARS} characters")]
    TextTooLong,
    #[error("title is longer than {MAX_TITLE_CHARS} characters")]
    TitleTooLong,
}

impl AlertError {
    /// The stable `error` code of the API's JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Level(_) => "invalid_level",
            Self::EmptyText | Self::TextTooLong => "invalid_text",
            Self::TitleTooLong => "invalid_title",
        }
    }
}

// === impl Level ===

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl FromStr for Level {
    type Err = AlertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            other => Err(AlertError::Level(other.to_owned())),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Alert ===

impl Alert {
    /// Validates the parts of an alert and stamps it with the current time. A blank title is
    /// the same as none; the text is kept as given (only checked for being non-blank).
    pub fn new(level: Level, title: Option<String>, text: String) -> Result<Self, AlertError> {
        if text.trim().is_empty() {
            return Err(AlertError::EmptyText);
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(AlertError::TextTooLong);
        }
        let title = title.filter(|t| !t.trim().is_empty());
        if title
            .as_ref()
            .is_some_and(|t| t.chars().count() > MAX_TITLE_CHARS)
        {
            return Err(AlertError::TitleTooLong);
        }
        Ok(Self {
            level,
            title,
            text,
            at: rfc3339_millis(SystemTime::now()),
        })
    }

    /// Validates a client's request, see [`Alert::new`].
    pub fn from_request(request: AlertRequest) -> Result<Self, AlertError> {
        let level = request.level.parse()?;
        Self::new(level, request.title, request.text)
    }
}

/// `2026-11-27T13:01:10.123Z`: the time format of every timestamp the publisher emits.
pub fn rfc3339_millis(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(level: &str, title: Option<&str>, text: &str) -> AlertRequest {
        AlertRequest {
            level: level.to_owned(),
            title: title.map(str::to_owned),
            text: text.to_owned(),
        }
    }

    #[test]
    fn publishes_level_title_text_at() {
        let alert = Alert::from_request(request("critical", Some("Fire"), "Building 3")).unwrap();
        let json: serde_json::Value = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["level"], "critical");
        assert_eq!(json["title"], "Fire");
        assert_eq!(json["text"], "Building 3");
        let at = json["at"].as_str().unwrap();
        assert_eq!(at.len(), "2026-11-27T13:01:10.123Z".len(), "{at}");
        assert!(at.ends_with('Z'));
        humantime::parse_rfc3339(at).unwrap();
    }

    #[test]
    fn missing_or_blank_title_is_null() {
        for title in [None, Some("  ")] {
            let alert = Alert::from_request(request("info", title, "x")).unwrap();
            assert_eq!(
                serde_json::to_value(&alert).unwrap()["title"],
                serde_json::Value::Null
            );
        }
    }

    #[test]
    fn refuses_bad_alerts() {
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        let long_title = "t".repeat(MAX_TITLE_CHARS + 1);
        let cases = [
            (request("fatal", None, "x"), "invalid_level"),
            (request("CRITICAL", None, "x"), "invalid_level"),
            (request("info", None, " "), "invalid_text"),
            (request("info", None, &long), "invalid_text"),
            (request("info", Some(&long_title), "x"), "invalid_title"),
        ];
        for (request, code) in cases {
            assert_eq!(Alert::from_request(request).unwrap_err().code(), code);
        }
    }
}
