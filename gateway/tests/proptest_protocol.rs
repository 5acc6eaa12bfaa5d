//! Property tests of the client protocol's pure functions: whatever a client sends, parsing
//! never panics, and whatever it accepts names a valid channel.

use gateway::protocol::{self, ClientFrame};
use proptest::prelude::*;

/// JSON-ish text: frames built from the protocol's own vocabulary, so that the generator
/// reaches the accepting paths and not only `bad_json`.
fn frame_text() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("subscribe".to_owned()),
        Just("unsubscribe".to_owned()),
        Just("publish".to_owned()),
        Just("ping".to_owned()),
        Just("presence".to_owned()),
        Just("refresh".to_owned()),
        "[a-z]{0,8}",
    ];
    let channel = prop_oneof!["[A-Za-z0-9_.:@-]{0,130}", ".{0,20}", "user:[0-9]{1,4}"];
    let id = prop_oneof![
        Just("1".to_owned()),
        Just("\"r1\"".to_owned()),
        Just("{\"a\":1}".to_owned()),
        Just("null".to_owned()),
        "-?[0-9]{1,5}",
    ];
    let data = prop_oneof![
        Just("1"),
        Just("\"x\""),
        Just("{\"t\":[1,2]}"),
        Just("null")
    ];
    (kind, channel, id, data, any::<u8>()).prop_map(|(kind, channel, id, data, mask)| {
        let mut fields = Vec::new();
        if mask & 1 != 0 {
            fields.push(format!(
                "\"type\":{}",
                serde_json::to_string(&kind).unwrap()
            ));
        }
        if mask & 2 != 0 {
            fields.push(format!(
                "\"channel\":{}",
                serde_json::to_string(&channel).unwrap()
            ));
        }
        if mask & 4 != 0 {
            fields.push(format!("\"id\":{id}"));
        }
        if mask & 8 != 0 {
            fields.push(format!("\"data\":{data}"));
        }
        if mask & 16 != 0 {
            fields.push("\"token\":\"a.b.c\"".to_owned());
        }
        if mask & 32 != 0 {
            fields.push("\"since\":\"e:1-0\"".to_owned());
        }
        format!("{{{}}}", fields.join(","))
    })
}

fn check_frame(text: &str) {
    match protocol::parse_client_frame(text) {
        Ok(
            ClientFrame::Subscribe { channel, .. }
            | ClientFrame::Unsubscribe { channel, .. }
            | ClientFrame::Publish { channel, .. }
            | ClientFrame::Presence { channel, .. },
        ) => assert!(protocol::valid_channel(&channel), "{text}"),
        Ok(ClientFrame::Ping { .. } | ClientFrame::Refresh { .. }) => {}
        Err(e) => {
            assert!(!e.code().is_empty());
            // The error frame built from it is valid JSON, whatever the input.
            let frame =
                protocol::error_frame(e.code(), &e.to_string(), None, protocol::salvage_id(text));
            serde_json::from_str::<serde_json::Value>(&frame).expect("error frame is JSON");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        check_frame(&text);
    }

    #[test]
    fn frame_shaped_text_parses_to_valid_channels(text in frame_text()) {
        check_frame(&text);
    }

    #[test]
    fn valid_channel_is_the_documented_rule(name in ".{0,140}") {
        let expected = (1..=128).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b));
        prop_assert_eq!(protocol::valid_channel(&name), expected);
    }

    #[test]
    fn patterns_without_star_are_equality(a in "[a-c:]{0,6}", b in "[a-c:]{0,6}") {
        prop_assert_eq!(protocol::pattern_matches(&a, &b), a == b);
    }

    #[test]
    fn star_matches_what_it_should(
        prefix in "[a-c]{0,4}",
        middle in "[a-c*]{0,4}",
        suffix in "[a-c]{0,4}",
        name in "[a-c]{0,10}",
    ) {
        // `*` alone matches everything; `prefix*` is a prefix test; `*suffix` a suffix test.
        prop_assert!(protocol::pattern_matches("*", &name));
        prop_assert_eq!(
            protocol::pattern_matches(&format!("{prefix}*"), &name),
            name.starts_with(&prefix)
        );
        prop_assert_eq!(
            protocol::pattern_matches(&format!("*{suffix}"), &name),
            name.ends_with(&suffix)
        );
        // A pattern matches itself with every `*` read as the empty string, and never panics.
        let literal = format!("{prefix}{middle}{suffix}");
        prop_assert!(protocol::pattern_matches(&literal, &literal.replace('*', "")));
        let _ = protocol::pattern_matches(&literal, &name);
    }

    #[test]
    fn valid_patterns_are_channels_with_stars(pattern in "[a-z:*]{0,10}|.{0,10}") {
        let literal = pattern.replace('*', "x");
        prop_assert_eq!(protocol::valid_pattern(&pattern), protocol::valid_channel(&literal));
    }
}
