//! Channel names: the one validator every publishing path goes through.
//!
//! A channel name is 1–128 characters of `A-Z a-z 0-9 _ - . : @` (docs/REFERENCE.md §2). The
//! gateway has its own copy of this rule; the publisher checks it too so that it never publishes a
//! message no client could subscribe to, and so that a bad name is a 400 rather than a silent
//! no-op.

use std::fmt;

/// The longest channel name, in characters (all allowed characters are ASCII, so also bytes).
pub const MAX_LEN: usize = 128;

/// A channel name that passed [`Channel::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(String);

/// Why a channel name was refused; the message is fit to show to an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("channel name contains {0:?}; allowed are A-Z a-z 0-9 _ - . : @")]
    BadChar(char),
}

impl Channel {
    /// Checks `name` against the channel-name rule.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if let Some(c) = name.chars().find(|&c| !is_allowed(c)) {
            return Err(ChannelError::BadChar(c));
        }
        // Every allowed character is one byte, so the byte length is the character count.
        if name.len() > MAX_LEN {
            return Err(ChannelError::TooLong);
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for name in [
            "ticks",
            "chat:lobby",
            "user:12345",
            "a.b-c_d@e",
            "A",
            &"x".repeat(128),
        ] {
            assert_eq!(Channel::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(Channel::parse(""), Err(ChannelError::Empty));
        assert_eq!(Channel::parse(&"x".repeat(129)), Err(ChannelError::TooLong));
        for (name, bad) in [
            ("a b", ' '),
            ("a*", '*'),
            ("é", 'é'),
            ("a,b", ','),
            ("a\n", '\n'),
            ("room/1", '/'),
        ] {
            assert_eq!(Channel::parse(name), Err(ChannelError::BadChar(bad)));
        }
    }
}
